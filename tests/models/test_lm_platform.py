"""HFCausalLM as an LLM-distillation network: left padding, recorded tokenizers, LoRA adapters (issue 17)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.lm import HFCausalLM, TinyGPT, load_hf_tokenizer, tokenizer_identity
from tests.helpers.tiny_hf import CHAT_TEMPLATE, TINY_GPT2, TINY_LLAMA, WORDS, make_model_folder, make_tokenizer

pytest.importorskip("transformers")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model_folder(tmp_path_factory.mktemp("llama") / "base", TINY_LLAMA, seed=0)
    return make_tokenizer(folder, chat_template=CHAT_TEMPLATE)


def _perturb_adapters(model: nn.Module) -> None:
    """A few SGD steps on the adapters only (B starts at 0, so the adapted model starts equal to the base)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 18, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        opt.step()


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_left_padded_rows_give_the_unpadded_logits(config: dict) -> None:
    torch.manual_seed(0)
    model = HFCausalLM(config=config, dtype="float32").eval()
    ids = torch.randint(1, 32, (1, 6))
    reference = model(ids, torch.ones_like(ids))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)], 1)
    batch = torch.cat([padded, torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)])  # left + right padded rows
    batch_mask = torch.stack([mask[0], mask[0].flip(0)])
    logits = model(batch, batch_mask)
    torch.testing.assert_close(logits[0, 3:], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :6], reference[0], atol=1e-5, rtol=1e-5)
    hidden = model.hidden_states(batch, batch_mask)
    torch.testing.assert_close(model.lm_head(hidden[0, 3:]), reference[0], atol=1e-5, rtol=1e-5)


def test_tokenizer_is_recorded_with_a_fingerprint_and_chat_template(tmp_path: Path, base_folder: Path) -> None:
    model = HFCausalLM(str(base_folder), tokenizer=str(base_folder), local_files_only=True)
    ident = model.tokenizer_identity
    assert ident is not None and ident.has_chat_template and ident.size == len(model.tokenizer)
    same = make_tokenizer(tmp_path / "same")  # same vocabulary and specials, no chat template
    other = make_tokenizer(tmp_path / "other", words=[*WORDS[:-1], "woke"])
    swapped = make_tokenizer(tmp_path / "swapped", words=[WORDS[1], WORDS[0], *WORDS[2:]])
    same_id = tokenizer_identity(load_hf_tokenizer(str(same)))
    assert same_id.fingerprint == ident.fingerprint and not same_id.has_chat_template
    assert tokenizer_identity(load_hf_tokenizer(str(other))).fingerprint != ident.fingerprint
    assert tokenizer_identity(load_hf_tokenizer(str(swapped))).fingerprint != ident.fingerprint  # same strings, ids
    assert HFCausalLM(config=TINY_LLAMA).tokenizer_identity is None
    with pytest.raises(KDConfigError, match=r"^tokenizer: no tokenizer folder at .*missing"):
        HFCausalLM(config=TINY_LLAMA, tokenizer=str(tmp_path / "missing"))
    small = dict(TINY_LLAMA, vocab_size=8)
    with pytest.raises(KDConfigError, match="has 18 tokens but the model predicts 8"):
        HFCausalLM(config=small, tokenizer=str(same))


def test_lora_trains_only_adapters_and_disabling_them_gives_the_base(base_folder: Path) -> None:
    pytest.importorskip("peft")
    base = HFCausalLM(str(base_folder), local_files_only=True).eval()
    model = HFCausalLM(str(base_folder), local_files_only=True, lora=LORA).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == model.adapter_names and len(trainable) == 4  # q and v of one layer, A and B
    assert all(".lora_" in n for n in trainable)
    ids = torch.randint(0, 18, (2, 5))
    torch.testing.assert_close(model(ids), base(ids))  # B = 0 at the start
    _perturb_adapters(model)
    assert not torch.allclose(model(ids), base(ids), atol=1e-4)
    with model.adapters_disabled():
        torch.testing.assert_close(model(ids), base(ids))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # restored
    assert not torch.allclose(model(ids), base(ids), atol=1e-4)


def test_lora_target_modules_that_do_not_exist_is_one_line_error() -> None:
    pytest.importorskip("peft")
    with pytest.raises(KDConfigError) as info:
        HFCausalLM(config=TINY_LLAMA, lora={**LORA, "target_modules": ["q_proj", "query"]})
    message = str(info.value)
    assert message.startswith("lora.target_modules: ['query'] match no Linear module of LlamaForCausalLM")
    assert "q_proj, k_proj, v_proj, o_proj" in message and "\n" not in message
    with pytest.raises(KDConfigError, match=r"^lora.target_modules: the pattern"):
        HFCausalLM(config=TINY_LLAMA, lora={"target_modules": r".*\.nothing"})
    with pytest.raises(KDConfigError, match=r"^lora.rank: unknown LoRA option"):
        HFCausalLM(config=TINY_LLAMA, lora={"rank": 4, "target_modules": ["q_proj"]})
    with pytest.raises(KDConfigError, match=r"^lora.target_modules: targets the LM head"):
        HFCausalLM(config=TINY_LLAMA, lora={"target_modules": ["lm_head"]})
    with pytest.raises(KDConfigError, match=r"^adapters_only_checkpoint: is true but the model has no lora"):
        HFCausalLM(config=TINY_LLAMA, adapters_only_checkpoint=True)


def test_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(KDConfigError, match=r"pip install 'kd-lightning\[llm\]'"):
        HFCausalLM(config=TINY_LLAMA, lora=LORA)


def test_adapters_only_state_dict_round_trip_with_strict_loading(base_folder: Path) -> None:
    pytest.importorskip("peft")
    kwargs = {"local_files_only": True, "lora": LORA, "adapters_only_checkpoint": True}
    trained = nn.ModuleDict({"student": HFCausalLM(str(base_folder), **kwargs)})  # a prefix, as in a LightningModule
    _perturb_adapters(trained["student"])
    state = trained.state_dict()
    assert sorted(state) == sorted(f"student.{n}" for n in trained["student"].adapter_names)
    fresh = nn.ModuleDict({"student": HFCausalLM(str(base_folder), **kwargs)})
    ids = torch.randint(0, 18, (2, 5))
    assert not torch.allclose(fresh["student"](ids), trained["student"](ids), atol=1e-4)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(fresh["student"](ids), trained["student"](ids))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict loading still catches wrong keys
        fresh.load_state_dict({**state, "student.model.bogus": torch.zeros(1)}, strict=True)
    full = HFCausalLM(str(base_folder), local_files_only=True, lora=LORA)  # default: the whole model is saved
    assert len(full.state_dict()) > len(state)


def test_save_adapters_writes_a_peft_folder(base_folder: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = HFCausalLM(str(base_folder), local_files_only=True, lora=LORA).eval()
    _perturb_adapters(model)
    folder = model.save_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.randint(0, 18, (2, 5))
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_folder)), str(folder))
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(ids))
    again = HFCausalLM(str(base_folder), local_files_only=True, lora=LORA).eval()
    again.load_adapters(folder)
    torch.testing.assert_close(again(ids), model(ids))


def test_tinygpt_takes_lora_too() -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = TinyGPT(d_model=16, n_layers=1, n_heads=2, max_seq_len=16, lora={"r": 2, "target_modules": ["qkv"]})
    base = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    plain = TinyGPT(d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    plain.load_state_dict(base)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == model.adapter_names
    _perturb_adapters(model)
    ids = torch.randint(0, 18, (2, 5))
    assert not torch.allclose(model(ids), plain(ids), atol=1e-4)
    with model.adapters_disabled():
        torch.testing.assert_close(model(ids), plain(ids))
    with pytest.raises(KDConfigError, match="has no LoRA adapters to disable"), plain.adapters_disabled():
        pass
