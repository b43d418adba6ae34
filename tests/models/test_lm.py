"""Causal LMs: TinyGPT (causality, padding, cached generation) and the Hugging Face wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.models.lm import HFCausalLM, TinyGPT, completion_mask, sample_next_token


def tiny(**kwargs) -> TinyGPT:
    torch.manual_seed(0)
    defaults = dict(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=32)
    return TinyGPT(**{**defaults, **kwargs}).eval()


def test_forward_shapes_and_head_on_hidden_states() -> None:
    model = tiny()
    ids = torch.randint(0, 40, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 7, 40)
    hidden = model.hidden_states(ids)
    assert hidden.shape == (3, 7, 16)
    assert torch.allclose(model.lm_head(hidden), logits)
    assert model.vocab_size == 40 and model.lm_head.weight.shape == (40, 16)
    assert TinyGPT().vocab_size == 264  # the byte tokenizer's vocabulary


def test_weight_tying_option_and_state_dict_round_trip() -> None:
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight is not untied.token_embedding.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 40 * 16
    copy = tiny()
    torch.nn.init.zeros_(copy.token_embedding.weight)
    copy.load_state_dict(tied.state_dict())
    assert copy.lm_head.weight is copy.token_embedding.weight  # still tied after loading
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(copy(ids), tied(ids))


def test_attention_is_causal() -> None:
    model = tiny()
    ids = torch.randint(0, 40, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 40
    a, b = model(ids), model(changed)
    assert torch.allclose(a[0, :6], b[0, :6], atol=1e-6)
    assert not torch.allclose(a[0, 6:], b[0, 6:], atol=1e-4)


def test_right_and_left_padding_leave_real_tokens_unchanged() -> None:
    model = tiny()
    ids = torch.randint(0, 40, (1, 6))
    alone = model(ids)[0]
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    right_mask = torch.tensor([[True] * 6 + [False] * 3])
    assert torch.allclose(model(right, right_mask)[0, :6], alone, atol=1e-5)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    left_mask = torch.tensor([[False] * 3 + [True] * 6])
    out = model(left, left_mask)
    assert torch.allclose(out[0, 3:], alone, atol=1e-5)  # positions count real tokens only
    assert torch.isfinite(out).all()  # padding queries see themselves: no NaN


def _greedy_reference(model: TinyGPT, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Full recomputation at every step (no cache)."""
    for _ in range(steps):
        token = model(ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token, dtype=torch.bool)], 1)
    return ids


def test_cached_generation_matches_full_recomputation_with_left_padding() -> None:
    model = tiny()
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # second prompt left-padded
    out = model.generate(ids, mask, max_new_tokens=5, temperature=0.0)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :6], ids)
    assert torch.equal(out, _greedy_reference(model, ids, mask, 5))
    assert torch.equal(model.generate(ids, mask, max_new_tokens=5, top_k=1), out)  # top-1 sampling is greedy


def test_generation_stops_at_eos_and_pads_after_it() -> None:
    model = tiny()
    ids = torch.randint(0, 40, (3, 4))
    first = model.generate(ids, max_new_tokens=1, temperature=0.0)[:, -1]
    eos = int(first[0])  # row 0 emits EOS at once
    out = model.generate(ids, max_new_tokens=6, temperature=0.0, eos_token_id=eos, pad_token_id=39)
    assert out[0, 4].item() == eos
    assert (out[0, 5:] == 39).all()
    mask = completion_mask(out, 4, eos)
    assert mask[0].tolist() == [False] * 4 + [True] + [False] * (out.shape[1] - 5)
    assert not mask[:, :4].any()


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(200, 1)
    draws = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {2, 3}
    again = sample_next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    model = tiny()
    ids = torch.randint(0, 40, (2, 3))
    a = model.generate(ids, max_new_tokens=4, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, max_new_tokens=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_clear_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(KDConfigError, match="n_heads"):
        TinyGPT(d_model=10, n_heads=3)


def test_trains_a_step() -> None:
    model = tiny().train()
    ids = torch.randint(0, 40, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- HF
LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def hf_model() -> HFCausalLM:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return HFCausalLM(config=LLAMA, dtype="float32").eval()


def test_hf_wrapper_follows_the_interface(hf_model: HFCausalLM) -> None:
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    logits = hf_model(ids, mask)
    assert logits.shape == (2, 7, 64)
    hidden = hf_model.hidden_states(ids, mask)
    assert hidden.shape == (2, 7, 16)
    assert torch.allclose(hf_model.lm_head(hidden), logits, atol=1e-5)
    assert hf_model.vocab_size == 64 and isinstance(hf_model.lm_head, torch.nn.Linear)


def test_hf_generation_with_left_padding(hf_model: HFCausalLM) -> None:
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    out = hf_model.generate(ids, mask, max_new_tokens=3, temperature=0.0)
    assert out.shape == (2, 8)
    assert torch.equal(out[:, :5], ids)
    sampled = hf_model.generate(ids, mask, max_new_tokens=3, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 8)


def test_hf_wrapper_loads_a_local_checkpoint_and_checks_arguments(hf_model: HFCausalLM, tmp_path: Path) -> None:
    hf_model.model.save_pretrained(tmp_path / "ckpt")
    loaded = HFCausalLM(str(tmp_path / "ckpt"), local_files_only=True).eval()
    ids = torch.randint(0, 64, (1, 6))
    assert torch.allclose(loaded(ids), hf_model(ids), atol=1e-6)
    with pytest.raises(KDConfigError, match="exactly one of path_or_name"):
        HFCausalLM()
    with pytest.raises(KDConfigError, match="model_type"):
        HFCausalLM(config={"vocab_size": 10})
