"""LanguageModelDistillation's tokenizer checks and the exact_tokens vocabulary mapping (issue 17 platform)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data.text import TextDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.lm_distill import LMDistill
from kd_lightning.models.lm import HFCausalLM
from tests.helpers.tiny_hf import CHAT_TEMPLATE, TINY_LLAMA, WORDS, make_tokenizer

pytest.importorskip("transformers")


def lm(tokenizer: Path | None, seed: int = 0, **config: int) -> HFCausalLM:
    torch.manual_seed(seed)
    return HFCausalLM(config={**TINY_LLAMA, **config}, tokenizer=None if tokenizer is None else str(tokenizer))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        "base": make_tokenizer(root / "base"),
        "chat": make_tokenizer(root / "chat", chat_template=CHAT_TEMPLATE),
        "other": make_tokenizer(root / "other", words=[*WORDS[:-1], "woke"]),
        # Same words written in two schemes (GPT-2 byte-level vs SentencePiece); the teacher lacks 4 of them.
        "byte": make_tokenizer(root / "byte", scheme="byte_level"),
        "sp": make_tokenizer(root / "sp", scheme="metaspace", words=[*WORDS[:10], "bird", "flew"]),
    }


def test_different_tokenizers_without_mapping_are_refused_at_setup(tokenizers: dict[str, Path]) -> None:
    module = LMDistill(student=lm(tokenizers["base"]), teacher=lm(tokenizers["other"], seed=1))
    with pytest.raises(KDConfigError) as info:
        module.check_vocabularies("the data")
    message = str(info.value)
    assert message.startswith("model.init_args.student/teacher: the tokenizers differ: student ")
    assert "set model.init_args.vocab_mapping: exact_tokens" in message and "\n" not in message
    same = LMDistill(student=lm(tokenizers["base"]), teacher=lm(tokenizers["base"], seed=1))
    same.check_vocabularies("the data")  # equal fingerprints pass
    assert same.vocab_map is None
    LMDistill(student=lm(None), teacher=lm(tokenizers["other"])).check_vocabularies("d")  # one side unknown: no check


def test_a_chat_template_on_one_side_only_is_refused(tokenizers: dict[str, Path]) -> None:
    module = LMDistill(student=lm(tokenizers["base"]), teacher=lm(tokenizers["chat"], seed=1))
    with pytest.raises(KDConfigError) as info:
        module.check_vocabularies("the data")
    assert str(info.value).startswith(
        "model.init_args.student/teacher: a chat template missing on one side: the teacher's tokenizer has one, "
        "the student's"
    )
    relaxed = LMDistill(
        student=lm(tokenizers["base"]), teacher=lm(tokenizers["chat"], seed=1), check_chat_template=False
    )
    relaxed.check_vocabularies("the data")


def test_mapping_needs_tokenizers_and_one_teacher_and_no_chunked_loss(tokenizers: dict[str, Path]) -> None:
    with pytest.raises(KDConfigError, match=r"^model.init_args.vocab_mapping: maps token strings, but the teacher"):
        LMDistill(student=lm(tokenizers["byte"]), teacher=lm(None), vocab_mapping="exact_tokens").check_vocabularies(
            "d"
        )
    with pytest.raises(KDConfigError, match=r"^model.init_args.vocab_mapping: must be null or 'exact_tokens'"):
        LMDistill(student=lm(None), teacher=lm(None), vocab_mapping="ids")
    with pytest.raises(KDConfigError, match=r"^model.init_args.chunked: cannot be combined with vocab_mapping"):
        LMDistill(
            student=lm(tokenizers["byte"]), teacher=lm(tokenizers["sp"]), vocab_mapping="exact_tokens", chunked=True
        ).check_vocabularies("d")


def test_exact_tokens_mapping_translates_inputs_and_projects_teacher_logits(tokenizers: dict[str, Path]) -> None:
    student, teacher = lm(tokenizers["byte"]), lm(tokenizers["sp"], seed=1)
    module = LMDistill(student=student, teacher=teacher, vocab_mapping="exact_tokens")
    with pytest.warns(UserWarning, match=r"only 24 of the student's 32 token ids \(75.0%\).*teacher coverage 85.7%"):
        module.check_vocabularies("the data")
    s_vocab, t_vocab = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    index = module.vocab_map.student_to_teacher
    for word in WORDS[:10]:  # "Ġthe" (student) is "▁the" (teacher)
        assert index[s_vocab["Ġ" + word]] == t_vocab["▁" + word]
    for word in WORDS[10:]:  # "and", "then", "it", "slept": not in the teacher's vocabulary
        assert index[s_vocab["Ġ" + word]] == -1
    ids = torch.tensor([[s_vocab["<s>"], s_vocab["Ġthe"], s_vocab["Ġcat"], s_vocab["Ġand"]]])
    with torch.no_grad():
        projected = module.run_teacher(ids, attention_mask=torch.ones_like(ids))
        module._vocab_map_hooks[0].remove(), module._vocab_map_hooks[1].remove()
        t_ids = torch.tensor([[t_vocab["<s>"], t_vocab["▁the"], t_vocab["▁cat"], t_vocab["<unk>"]]])
        raw = teacher(t_ids, attention_mask=torch.ones_like(t_ids))
    assert projected.shape == (1, 4, 32)
    torch.testing.assert_close(projected[..., s_vocab["Ġcat"]], raw[..., t_vocab["▁cat"]])
    assert (projected[..., s_vocab["Ġslept"]] == -1.0e4).all()
    probs = projected.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4)) and (probs[..., index < 0] == 0).all()


def test_a_fit_with_exact_tokens_mapping_trains_the_student_and_keeps_the_teacher(
    tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    for i in range(5):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(WORDS[i:] + WORDS[:i]) * 4)
    text = tmp_path / "doc0.txt"
    data = TextDataModule(
        paths=[str(tmp_path)], tokenizer=str(tokenizers["byte"]), local_files_only=True, block_size=16, batch_size=2,
        val_fraction=0.2, test_fraction=0.0, add_bos=False, add_eos=False,
    )  # fmt: skip
    student, teacher = lm(tokenizers["byte"]), lm(tokenizers["sp"], seed=1)
    module = LMDistill(
        student=student, teacher=teacher, vocab_mapping="exact_tokens", vocab_mapping_min_coverage=0.5,
        vocab_mapping_renormalize_student=True, objective="reverse_kl",
    )  # fmt: skip
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data)
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and 0 < float(loss) < 50  # renormalised student: no ~1e4 penalty on unmapped ids
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    # The data module's tokenizer must be the student's.
    wrong = TextDataModule(paths=[str(text)], tokenizer=str(tokenizers["sp"]), local_files_only=True, block_size=16)
    module.trainer.datamodule = wrong  # what setup sees
    with pytest.raises(KDConfigError, match=r"^data.init_args.tokenizer: .* tokenizes with .*sp"):
        module.check_tokenizers("TextDataModule")
