"""The vision-language task sibling (VisionLanguageDistillation, VLMSupervised) and VLMTokenKD."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from kd_lightning.data.vqa import DigitVQADataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.losses.vlm_kd import VLMTokenKDLoss
from kd_lightning.methods import VLMSupervised, VLMTokenKD
from kd_lightning.models.lm import TinyGPT
from kd_lightning.models.vlm import DigitPatchEncoder, VisionLanguageModel
from tests.helpers.cli import TINY_VQA, fit_config


def vlm(seed: int = 0, d_model: int = 16, num_image_tokens: int | None = None, language=None) -> VisionLanguageModel:
    torch.manual_seed(seed)
    encoder = DigitPatchEncoder(channels=(4, 8), image_size=(16, 64))
    lm = language or TinyGPT(d_model=d_model, n_layers=1, n_heads=2, max_seq_len=64)
    return VisionLanguageModel(encoder, lm, num_image_tokens=num_image_tokens)


# ---------------------------------------------------------------------------------------------- setup checks
def test_different_tokenizers_are_refused_naming_the_teacher(tmp_path) -> None:
    pytest.importorskip("transformers")
    from kd_lightning.models.lm import HFCausalLM
    from tests.helpers.tiny_hf import TINY_LLAMA, WORDS, make_tokenizer

    first = make_tokenizer(tmp_path / "a")
    second = make_tokenizer(tmp_path / "b", words=list(reversed(WORDS)))
    student = vlm(language=HFCausalLM(config=TINY_LLAMA, tokenizer=str(first)))
    teacher = vlm(language=HFCausalLM(config=TINY_LLAMA, tokenizer=str(second)))
    with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher: its tokenizer .* differs") as err:
        VLMTokenKD(student=student, teacher=teacher).check_vlm_pairs()
    assert "\n" not in str(err.value) and "same tokenizer" in str(err.value)
    same = vlm(seed=1, language=HFCausalLM(config=TINY_LLAMA, tokenizer=str(first)))
    VLMTokenKD(student=student, teacher=same).check_vlm_pairs()


def test_different_visual_token_counts_are_refused_unless_the_method_allows_them() -> None:
    with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher: makes 2 visual tokens .* student makes 4"):
        VLMTokenKD(student=vlm(), teacher=vlm(num_image_tokens=2)).check_vlm_pairs()

    class Mapping(VLMTokenKD):
        allows_different_image_tokens = True

    Mapping(student=vlm(), teacher=vlm(num_image_tokens=2)).check_vlm_pairs()


def test_networks_that_are_not_vlms_and_data_without_images_are_refused() -> None:
    lm = TinyGPT(d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.student: TinyGPT is not a vision-language model"):
        VLMTokenKD(student=lm, teacher=vlm())
    with pytest.raises(KDConfigError, match=r"model\.init_args\.model: TinyGPT is not"):
        VLMSupervised(model=lm)
    from kd_lightning.data.reasoning import ReasoningDataModule

    with pytest.raises(KDConfigError, match=r"data\.class_path: ReasoningDataModule serves 'language_modeling'"):
        VLMSupervised(model=vlm()).check_data(ReasoningDataModule(num_train=4, num_val=2, num_test=2))


def test_bad_loss_arguments_name_their_field() -> None:
    with pytest.raises(KDConfigError, match=r"model\.init_args\.loss"):
        VLMTokenKD(student=vlm(), teacher=vlm(), loss="mse")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"model\.init_args\.dbild_args"):
        VLMTokenKD(student=vlm(), teacher=vlm(), loss="kl", dbild_args={"mass": 0.5})
    with pytest.raises(KDConfigError, match=r"model\.init_args\.kd_weight"):
        VLMTokenKD(student=vlm(), teacher=vlm(), kd_weight=-1.0)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.vocab_mapping"):
        VLMTokenKD(student=vlm(), teacher=vlm(), vocab_mapping="exact_tokens")


# ---------------------------------------------------------------------------------------------- the loss
def test_kl_token_loss_by_hand() -> None:
    student = torch.tensor([[[1.0, 2.0, 0.5], [9.0, -3.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.2, 1.5, 1.0], [0.0, 5.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[1, 0]])
    mask = torch.tensor([[True, False]])  # the second token is not an answer token
    tau, w_kd, w_ce = 2.0, 0.7, 0.3

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    p = softmax([0.2 / tau, 1.5 / tau, 1.0 / tau])
    q = softmax([1.0 / tau, 2.0 / tau, 0.5 / tau])
    kl = tau**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    ce = -math.log(softmax([1.0, 2.0, 0.5])[1])
    terms = VLMTokenKDLoss("kl", tau, True, w_kd, w_ce)(student, teacher, targets, mask)
    assert terms["kl"].item() == pytest.approx(w_kd * kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(w_ce * ce, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(w_kd * kl + w_ce * ce, rel=1e-5)
    terms["loss"].backward()
    assert student.grad is not None and float(student.grad[0, 1].abs().max()) == 0.0  # masked token: no gradient
    assert teacher.grad is None  # the teacher is a target
    same = VLMTokenKDLoss("kl", 3.0, True, 1.0, 0.0)(teacher.detach(), teacher.detach(), targets, mask)
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-7)


def test_dbild_token_loss_is_dbild_token_sum_plus_ce() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 20), torch.randn(2, 3, 20)
    targets = torch.randint(0, 20, (2, 3))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    args = {"mass": 0.8, "k_min": 3, "k_max": 6, "temperature": 2.0}
    terms = VLMTokenKDLoss("dbild", kd_weight=0.5, ce_weight=0.0, dbild_args=args)(student, teacher, targets, mask)
    expected = DBiLDLoss(**args).token_sum(student, teacher, mask)
    assert set(terms) == {"loss", "dbild"}
    assert terms["loss"].item() == pytest.approx(0.5 * expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_training_steps_leave_the_teacher_frozen_in_eval_mode_and_move_the_student() -> None:
    student, teacher = vlm(seed=0), vlm(seed=1, d_model=32)
    method = VLMTokenKD(
        student=student, teacher=teacher, loss="dbild", eval_max_new_tokens=2, optimizer=torch.optim.AdamW
    )
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    data = DigitVQADataModule(num_train=16, num_val=4, num_test=4, batch_size=8, eval_batch_size=4)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(method, datamodule=data)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert "val/pass@1" in trainer.callback_metrics and "val/agreement" in trainer.callback_metrics


@pytest.mark.parametrize("config", ["vqa_token_kd.yaml", "vqa_dbild_kd.yaml"])
def test_cli_fit_logs_exact_match_per_question_type(config: str) -> None:
    cli = fit_config(config, *TINY_VQA, "--test_after_fit=true")
    metrics = cli.results  # val/... of the last epoch, test/... of the best checkpoint
    for stage in ("val", "test"):
        for key in ("pass@1", "pass@1/count", "pass@1/exists", "pass@1/left_of", "pass@1/caption", "agreement"):
            assert f"{stage}/{key}" in metrics, sorted(metrics)
            assert 0.0 <= float(metrics[f"{stage}/{key}"]) <= 1.0
    assert isinstance(cli.model, VLMTokenKD) and cli.model.loss == config.split("_")[1].replace("token", "kl")
