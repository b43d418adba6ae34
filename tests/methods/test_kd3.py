"""KD3: selection, switches, gradients, the MixDistribution hook, frozen teacher, regimes, CLI."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from kd_lightning.data import DigitsDataModule, DigitsWebDataModule, TransferSetDataModule
from kd_lightning.data.semi_supervised import UNLABELED
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.kd3 import lambda_schedule
from kd_lightning.methods import KD3
from kd_lightning.models import SmallCNN
from kd_lightning.models.checkpoints import load_weights
from tests.helpers.cli import fit_config

TERMS = {
    "kd_weight": "kd",
    "pseudo_ce_weight": "pseudo_ce",
    "feature_weight": "feat",
    "classifier_weight": "cls",
    "contrastive_weight": "con",
}


def _model(**kwargs: Any) -> KD3:
    torch.manual_seed(0)
    defaults: dict[str, Any] = {"input_shape": (1, 8, 8), "num_classes": 10}
    return KD3(student=SmallCNN(widths=[4, 8]), teacher=SmallCNN(widths=[8, 16], dropout=0.2), **(defaults | kwargs))


def _batch(n: int = 12) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {UNLABELED: (torch.randn(n, 1, 8, 8, generator=g), torch.arange(n))}


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _transfer_data(batch_size: int = 16) -> TransferSetDataModule:
    return TransferSetDataModule(
        source=DigitsDataModule(), transfer=DigitsWebDataModule(num_images=96), batch_size=batch_size
    )


def _trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
    }
    return L.Trainer(**(options | kwargs))


# ------------------------------------------------------------------ loss terms and switches
def test_all_terms_present_and_finite() -> None:
    model = _model(select=False)
    (terms,) = model.training_loss(_batch())
    assert set(terms) == {"loss", *TERMS.values()}
    assert all(math.isfinite(float(v.detach())) for v in terms.values())
    total = sum(v for k, v in terms.items() if k != "loss")
    assert torch.allclose(terms["loss"], total)


@pytest.mark.parametrize("switch", list(TERMS))
def test_each_weight_switches_its_term_off(switch: str) -> None:
    model = _model(select=False, **{switch: 0.0})
    forwards: list[int] = []
    handle = model.student.register_forward_hook(lambda *_: forwards.append(1))
    (terms,) = model.training_loss(_batch())
    handle.remove()
    assert TERMS[switch] not in terms
    assert set(terms) == {"loss", *(t for s, t in TERMS.items() if s != switch)}
    assert len(forwards) == (1 if switch == "contrastive_weight" else 2)  # no MixDistribution forward without it


def test_projector_is_not_built_when_no_term_needs_it() -> None:
    model = _model(select=False, feature_weight=0.0, classifier_weight=0.0, contrastive_weight=0.0)
    (terms,) = model.training_loss(_batch())
    assert set(terms) == {"loss", "kd", "pseudo_ce"}
    assert model.projector is not None  # built (shapes known) but unused: no gradient reaches it
    terms["loss"].backward()
    assert all(p.grad is None for p in model.projector.parameters())


def test_gradients_reach_student_and_projector_not_teacher() -> None:
    model = _model(select=False)
    (terms,) = model.training_loss(_batch())
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize("anchor", ["student", "teacher", "both"])
def test_contrastive_anchors_give_gradients_to_the_student(anchor: str) -> None:
    model = _model(
        select=False,
        kd_weight=0.0,
        pseudo_ce_weight=0.0,
        feature_weight=0.0,
        classifier_weight=0.0,
        contrastive_anchor=anchor,
    )
    (terms,) = model.training_loss(_batch())
    assert set(terms) == {"loss", "con"}
    terms["loss"].backward()
    assert model.student.blocks[0][0].weight.grad.abs().sum() > 0  # through both forwards
    assert all(p.grad is None for p in model.teacher.parameters())


def test_classifier_alignment_in_weight_space() -> None:
    model = _model(
        select=False,
        classifier_alignment="weights",
        kd_weight=0.0,
        pseudo_ce_weight=0.0,
        feature_weight=0.0,
        contrastive_weight=0.0,
    )
    (terms,) = model.training_loss(_batch())
    assert set(terms) == {"loss", "cls"} and float(terms["cls"].detach()) > 0
    terms["loss"].backward()
    assert model.student.fc.weight.grad is not None and model.projector.weight.grad is not None
    assert model.student.blocks[0][0].weight.grad is None  # data-free: only W_S and P
    assert model.teacher.fc.weight.grad is None


# ------------------------------------------------------------------ selection inside the method
def test_selection_keeps_confident_and_rejects_uniform_instances() -> None:
    model = _model(delta=0.7)
    teacher_logits = torch.zeros(4, 10)
    teacher_logits[0, 3] = 10.0  # confident: kept
    teacher_logits[2, 7] = 10.0
    student_logits = torch.zeros(4, 10)  # uniform: never selected on its own
    mask, labels, confidence, lam = model.selection(student_logits, teacher_logits)
    assert lam == 1.0  # outside a Trainer: the schedule's start
    assert mask.tolist() == [True, False, True, False]
    assert labels[mask].tolist() == [3, 7]
    assert torch.allclose(confidence[1], torch.tensor(0.1))
    # With λ = 0.5 the uniform student halves the confidence above chance: rejected at δ = 0.7.
    half = _model(delta=0.7, lambda_start=0.5)
    assert not half.selection(student_logits, teacher_logits)[0].any()
    assert _model(select=False).selection(student_logits, teacher_logits)[0].all()


def test_nothing_kept_still_gives_a_trainable_zero_loss() -> None:
    model = _model(delta=1.0)  # nothing reaches confidence 1
    (terms,) = model.training_loss(_batch())
    assert set(terms) == {"loss", *TERMS.values()}
    assert float(terms["loss"].detach()) == 0.0
    terms["loss"].backward()


def test_mixing_is_train_only_inside_the_block_and_keeps_bn_statistics() -> None:
    model = _model()
    model.train()
    x = _batch()[UNLABELED][0]
    bn = model.student.blocks[1][1]
    before = bn.running_mean.clone()
    with model.mixing():
        assert _hooks(model.student) == 1
        mixed = model.student(x)
    assert torch.equal(bn.running_mean, before)  # the perturbed batch did not enter the running statistics
    assert _hooks(model.student) == 0
    model.eval()
    with torch.no_grad():
        clean = model.student(x)
    assert not torch.allclose(mixed.detach(), clean)


# ------------------------------------------------------------------ training through a Trainer
def test_fit_keeps_teacher_frozen_removes_hooks_and_logs_selection() -> None:
    model = _model(input_shape=None, num_classes=None, delta=0.5)
    with torch.no_grad():
        model.teacher.fc.weight.mul_(30.0)  # a confident teacher: some web images pass δ, some do not
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    trainer = _trainer()
    L.seed_everything(0)
    trainer.fit(model, datamodule=_transfer_data())
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert _hooks(model.student) == 0 and _hooks(model.teacher) == 0
    metrics = trainer.callback_metrics
    # λ followed training_progress(): the last step is global step 3 of 4.
    assert float(metrics["train/lambda"]) == pytest.approx(lambda_schedule(3 / 4))
    fraction = float(metrics["train/kept_fraction_epoch"])
    counts = [float(metrics[f"train/kept_class/{k}"]) for k in range(10)]
    assert 0.0 < fraction < 1.0 and sum(counts) == pytest.approx(fraction * 4 * 16)  # 4 batches of 16
    assert "val/acc" in metrics


def test_refuses_a_plain_supervised_data_module() -> None:
    model = _model(input_shape=None)
    with pytest.raises(KDConfigError, match="DigitsDataModule serves labeled batches but KD3 trains on unlabeled"):
        _trainer(max_steps=1).fit(model, datamodule=DigitsDataModule(batch_size=16))


def test_projector_is_restored_from_a_checkpoint(tmp_path: Any) -> None:
    model = _model(input_shape=None, num_classes=None)
    trainer = _trainer(max_steps=2)
    trainer.fit(model, datamodule=_transfer_data())
    path = tmp_path / "kd3.ckpt"
    trainer.save_checkpoint(path)
    loaded = KD3.load_from_checkpoint(path, student=SmallCNN(widths=[4, 8]), teacher=SmallCNN(widths=[8, 16]))
    assert loaded.projector is not None
    assert torch.equal(loaded.projector.weight, model.projector.weight)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delta": 1.5}, "model.init_args.delta"),
        ({"lambda_end": -0.1}, "model.init_args.lambda_end"),
        ({"feature_weight": -1.0}, "model.init_args.feature_weight"),
        ({"temperature": 0.0}, "model.init_args.temperature"),
        ({"contrastive_temperature": -1.0}, "model.init_args.contrastive_temperature"),
        ({"classifier_alignment": "cosine"}, "model.init_args.classifier_alignment"),
        ({"contrastive_anchor": "nobody"}, "model.init_args.contrastive_anchor"),
        ({"mix_layer": "blocks.9"}, "model.init_args.mix_layer"),
        ({"teacher_classifier": "head"}, "model.init_args.teacher_classifier"),
        ({"mix_alpha": 0.0}, "model.init_args.mix_alpha"),
        ({"student_feature": "nope:input"}, "model.init_args.student_feature"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(KDConfigError, match=field.replace(".", r"\.")):
        _model(**kwargs)


def test_all_weights_zero_is_refused() -> None:
    with pytest.raises(KDConfigError, match="every KD³ term has weight 0"):
        _model(**{name: 0.0 for name in TERMS})


def test_weight_alignment_needs_linear_classifiers_of_the_feature_size() -> None:
    with pytest.raises(KDConfigError, match=r"student_classifier.*needs a linear classifier"):
        _model(classifier_alignment="weights", student_classifier="blocks.0.0")


# ------------------------------------------------------------------ CLI
def test_cli_fit_of_the_digits_config() -> None:
    cli = fit_config("digits_kd3.yaml")
    model = cli.model
    assert isinstance(model, KD3) and model.projector is not None
    assert model.projector.in_features == 16 and model.projector.out_features == 128  # SmallCNN 8-16 -> 32-64-128
    for name in ("train/loss", "train/kd", "train/pseudo_ce", "train/feat", "train/cls", "train/con"):
        assert name in cli.results and math.isfinite(cli.results[name]), name
    assert 0.0 <= cli.results["train/kept_fraction_epoch"] <= 1.0
    assert "val/acc" in cli.results
    cached = load_weights(copy.deepcopy(model.teacher), model.teacher_ckpt)  # the teacher did not move
    for key, value in cached.state_dict().items():
        assert torch.equal(value, model.teacher.state_dict()[key]), key
    assert not model.teacher.training and _hooks(model.student) == 0


def test_cli_fit_of_the_web_kd_baseline() -> None:
    cli = fit_config("digits_web_kd.yaml")
    assert isinstance(cli.datamodule, TransferSetDataModule)
    assert "train/kd" in cli.results and "train/ce" not in cli.results  # KD alone: the web images have no labels
    assert "val/acc" in cli.results
