"""SegCWD: channel-wise distillation of native-stride logits (and the head feature through a 1x1 adapter)."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.seg_cwd import SegCWD
from kd_lightning.models.segmentation import DeepLabV3Segmenter
from tests.helpers.segmentation_data import SyntheticSegmentationData, make_scenes
from tests.helpers.tiny import tiny_trainer

ADAM = partial(torch.optim.Adam, lr=0.005)
SHAPE = (3, 64, 64)


def student() -> DeepLabV3Segmenter:
    torch.manual_seed(1)
    return DeepLabV3Segmenter(4, "tiny", aux_loss=True, tiny_widths=(8, 16, 32))


def teacher() -> DeepLabV3Segmenter:
    torch.manual_seed(2)
    return DeepLabV3Segmenter(4, "tiny", tiny_widths=(16, 32, 64))


def native(model: DeepLabV3Segmenter, x: Tensor) -> tuple[Tensor, Tensor]:
    """The logits before upsampling and the head feature, computed by hand from the model's parts."""
    feature = nn.Sequential(*list(model.classifier)[:4])(model.backbone(x)["out"])
    return model.classifier[4](feature), feature


def cwd_by_hand(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """τ²/(N·C) Σ p_T (log p_T − log p_S), softmax over each channel's h·w positions."""
    n, c = s.shape[:2]
    p_t = (t.flatten(2) / tau).softmax(-1)
    log_p_s = (s.flatten(2) / tau).log_softmax(-1)
    return tau**2 * (p_t * (p_t.log() - log_p_s)).sum() / (n * c)


def test_defaults_are_the_official_cityscapes_setting() -> None:
    params = inspect.signature(SegCWD.__init__).parameters
    assert (params["tau"].default, params["weight"].default, params["feature_weight"].default) == (4.0, 3.0, 0.0)
    assert params["feature_role"].default == "head_feature"


def test_loss_is_ce_aux_and_cwd_of_the_native_logits() -> None:
    module = SegCWD(student(), teacher(), input_shape=SHAPE)
    assert not hasattr(module, "adapter")  # no feature term, no adapter
    x, y = make_scenes(4, 4, 64, seed=3)
    module.eval()  # deterministic BatchNorm for the comparison
    terms = module.training_loss((x, y))
    s_logits, _ = native(module.student, x)
    t_logits, _ = native(module.teacher, x)
    assert s_logits.shape == (4, 4, 8, 8)  # input / 8: before upsampling
    out = module.student(x)
    torch.testing.assert_close(terms["cwd"], 3.0 * cwd_by_hand(s_logits, t_logits, 4.0))
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out["out"], y, ignore_index=255))
    torch.testing.assert_close(terms["aux"], 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255))
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["aux"] + terms["cwd"])
    assert set(terms) == {"loss", "ce", "aux", "cwd"}
    # gradients reach the student only
    terms["loss"].backward()
    assert module.student.classifier[4].weight.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())


def test_feature_term_goes_through_a_1x1_adapter_built_from_the_probed_shapes() -> None:
    module = SegCWD(student(), teacher(), feature_weight=50.0, weight=0.0, input_shape=SHAPE)
    assert isinstance(module.adapter, nn.Conv2d)
    assert (module.adapter.in_channels, module.adapter.out_channels, module.adapter.kernel_size) == (32, 64, (1, 1))
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in module.adapter.parameters()} <= optimised
    assert not {id(p) for p in module.teacher.parameters()} & optimised
    x, y = make_scenes(2, 4, 64, seed=4)
    module.eval()
    terms = module.training_loss((x, y))
    assert set(terms) == {"loss", "ce", "aux", "cwd_feature"}
    _, s_feature = native(module.student, x)
    _, t_feature = native(module.teacher, x)
    expected = 50.0 * cwd_by_hand(module.adapter(s_feature), t_feature, 4.0)
    torch.testing.assert_close(terms["cwd_feature"], expected)
    # equal widths: no adapter parameters
    same = SegCWD(student(), student(), feature_weight=50.0, input_shape=SHAPE)
    assert isinstance(same.adapter, nn.Identity)
    backbone = SegCWD(student(), teacher(), feature_weight=1.0, feature_role="backbone", input_shape=SHAPE)
    assert (backbone.adapter.in_channels, backbone.adapter.out_channels) == (32, 64)


def test_fit_keeps_the_teacher_frozen_and_checkpoints_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = SyntheticSegmentationData(train_size=32, val_size=16)
    net_t = teacher()
    before = {k: v.clone() for k, v in net_t.state_dict().items()}
    module = SegCWD(student(), net_t, feature_weight=50.0, optimizer=ADAM)
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, data)
    logged = set(trainer.callback_metrics)
    assert {"train/cwd", "train/cwd_feature", "train/ce", "train/aux", "val/miou", "val/teacher_miou"} <= logged
    assert all(torch.equal(v, before[k]) for k, v in net_t.state_dict().items())
    assert all(not m.training for m in module.teacher.modules())
    assert module.adapter.weight.requires_grad

    path = tmp_path / "seg_cwd.ckpt"
    trainer.save_checkpoint(path)
    restored = SegCWD.load_from_checkpoint(path, student=student(), teacher=teacher())
    assert restored.feature_weight == 50.0 and restored.tau == 4.0
    assert isinstance(restored.adapter, nn.Conv2d)  # rebuilt from the stored shapes before loading
    ours, theirs = module.state_dict(), restored.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    first = tiny_trainer(tmp_path).validate(module, data, verbose=False)[0]
    second = tiny_trainer(tmp_path).validate(restored, data, verbose=False)[0]
    assert first["val/miou"] == pytest.approx(second["val/miou"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, r"^model.init_args.tau: must be > 0, got 0.0"),
        ({"weight": 0.0}, r"^model.init_args.weight: and feature_weight are both 0\. use SegmentationSupervised"),
        ({"feature_weight": -1.0}, r"^model.init_args.feature_weight: must be a finite number >= 0, got -1.0"),
        (
            {"feature_weight": 1.0, "feature_role": "neck"},
            r"^model.init_args.student_maps: SegCWD reads the 'neck' map",
        ),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(KDConfigError, match=message) as err:
        SegCWD(student(), teacher(), **kwargs)
    assert "\n" not in str(err.value)
