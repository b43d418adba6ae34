"""The segmentation task sibling: supervised training, native-stride maps for methods, whole/slide evaluation,
mIoU logging (student and teacher), export with torchvision key names, and one-line errors for bad inputs."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import segmentation as tvs

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.seg_cwd import SegCWD
from kd_lightning.methods.tasks.segmentation import SegmentationDistillation, SegmentationSupervised
from kd_lightning.models.segmentation import DeepLabV3Segmenter, FCNSegmenter
from tests.helpers.segmentation_data import SyntheticSegmentationData, make_scenes
from tests.helpers.tiny import tiny_trainer

ADAM = partial(torch.optim.Adam, lr=0.005)


class LogitMSE(SegmentationDistillation):
    """A minimal method: MSE between native logits; records what the hook receives."""

    def map_roles(self) -> tuple[str, ...]:
        return ("logits",)

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        self.seen = {"student": student_maps["logits"].shape, "teacher": teacher_maps["logits"].shape}
        self.seen["masks"] = masks.shape
        self.seen["teacher_grad"] = teacher_maps["logits"].requires_grad
        return {"mse": F.mse_loss(student_maps["logits"], teacher_maps["logits"])}

    def predict_logits(self, x: Tensor, size: Any = None, key: str = "student") -> Tensor:
        self.calls = getattr(self, "calls", {"student": 0, "teacher": 0})
        self.calls[key] += 1
        return super().predict_logits(x, size, key)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmentationSupervised, dict[str, float]]:
    """DeepLabV3-tiny with an auxiliary head trained alone for 20 short epochs (~6 s on one core)."""
    torch.manual_seed(0)
    module = SegmentationSupervised(DeepLabV3Segmenter(4, "tiny", aux_loss=True), optimizer=ADAM)
    trainer = tiny_trainer(tmp_path_factory.mktemp("supervised"), max_epochs=20)
    trainer.fit(module, SyntheticSegmentationData())
    return module, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_supervised_training_reaches_a_clearly_non_trivial_miou(trained) -> None:
    _, metrics = trained
    assert metrics["val/miou"] > 0.6  # chance level on 4 classes with a dominant background is ~0.1
    assert metrics["val/pixel_acc"] > 0.9
    names = {"val/iou/background", "val/iou/shape_1", "val/iou/shape_2", "val/iou/shape_3", "val/loss"}
    assert names | {"train/ce", "train/aux", "train/loss"} <= set(metrics)
    assert not any("teacher" in name for name in metrics)
    per_class = [metrics[f"val/iou/{n}"] for n in ("background", "shape_1", "shape_2", "shape_3")]
    assert metrics["val/miou"] == pytest.approx(sum(per_class) / 4, abs=1e-6)


def test_training_loss_is_ce_plus_weighted_aux_ce(trained) -> None:
    module, _ = trained
    images, masks = _batch()
    module.eval()
    terms = module.training_loss((images, masks))
    out = module.student(images)
    ce = F.cross_entropy(out["out"], masks, ignore_index=255)
    aux = F.cross_entropy(out["aux"], masks, ignore_index=255)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["aux"], 0.4 * aux)  # CIRKD's auxiliary weight
    torch.testing.assert_close(terms["loss"], ce + 0.4 * aux)


def _batch(n: int = 4, seed: int = 5) -> tuple[Tensor, Tensor]:
    return make_scenes(n, 4, 64, seed=seed)


def test_whole_eval_upsamples_the_native_logits_like_torchvision(trained) -> None:
    module, _ = trained
    module.eval()
    images, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(module.predict_logits(images), module.student(images)["out"])
        half = module.predict_logits(images, (32, 32))  # labels at another size than the images
        assert half.shape == (4, 4, 32, 32)
        corners = SegmentationSupervised(module.student, align_corners=True).predict_logits(images)
    assert corners.shape == (4, 4, 64, 64) and not torch.allclose(corners, module.student(images)["out"])


def test_slide_eval_equals_whole_eval_when_a_window_covers_the_image(trained) -> None:
    module, _ = trained
    module.eval()
    images, _ = _batch()
    with torch.no_grad():
        whole = module.predict_logits(images)
        for window in [(64, 64), (80, 96)]:
            slide = SegmentationSupervised(module.student, eval_mode="slide", window=window)
            torch.testing.assert_close(slide.predict_logits(images), whole)


class Pointwise(nn.Module):
    """A per-pixel network: its logits at a pixel do not depend on the window around it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.conv(x)}


@pytest.mark.parametrize(("window", "stride"), [((24, 24), (16, 16)), ((40, 20), (7, 13)), ((64, 30), None)])
def test_slide_eval_averages_overlapping_windows_by_count(window, stride) -> None:
    net = Pointwise()
    images, _ = _batch(2)
    whole = SegmentationSupervised(net).predict_logits(images)
    slide = SegmentationSupervised(net, eval_mode="slide", window=window, stride=stride).predict_logits(images)
    torch.testing.assert_close(slide, whole)  # every pixel covered; overlaps average identical values


def test_slide_eval_with_small_windows_is_close_to_whole_eval(trained, tmp_path: Path) -> None:
    module, metrics = trained
    slide = SegmentationSupervised(module.student, eval_mode="slide", window=(48, 48), stride=(16, 16))
    trainer = tiny_trainer(tmp_path)
    result = trainer.validate(slide, SyntheticSegmentationData(), verbose=False)[0]
    assert result["val/miou"] == pytest.approx(metrics["val/miou"], abs=0.1)
    images, _ = _batch()
    module.eval()
    with torch.no_grad():
        agree = (slide.predict_logits(images).argmax(1) == module.predict_logits(images).argmax(1)).float().mean()
    assert agree > 0.9


def test_a_method_gets_native_stride_maps_and_the_teacher_is_measured_once(trained, tmp_path: Path) -> None:
    trained_module, metrics = trained
    teacher = copy.deepcopy(trained_module.student)  # the method freezes its teacher: leave the fixture's alone
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = LogitMSE(DeepLabV3Segmenter(4, "tiny", tiny_widths=(8, 16, 32)), teacher, optimizer=ADAM)
    trainer = tiny_trainer(tmp_path, max_epochs=2)
    trainer.fit(module, SyntheticSegmentationData())
    # 64x64 images, output stride 8: the hook sees 8x8 logits (before upsampling) and full-size masks
    assert module.seen == {
        "student": (8, 4, 8, 8),
        "teacher": (8, 4, 8, 8),
        "masks": (8, 64, 64),
        "teacher_grad": False,
    }
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/mse", "train/ce", "val/miou", "val/teacher_miou", "val/teacher_pixel_acc"} <= set(logged)
    assert logged["val/teacher_miou"] == pytest.approx(metrics["val/miou"], abs=1e-6)
    # two validation batches: the teacher ran on them in the first epoch only (the sanity check skips it)
    assert module.calls["teacher"] == 2 and module.calls["student"] == 2 * 2 + 2
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(not m.training for m in teacher.modules())


def test_export_loads_into_a_plain_torchvision_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    module = SegmentationSupervised(DeepLabV3Segmenter(3, "resnet50", aux_loss=True), num_classes=3)
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = module.export_student(tmp_path / "student.pt")
    saved = torch.load(path, weights_only=True)
    assert saved["num_classes"] == 3 and saved["task"] == "segmentation" and saved["ignore_index"] == 255
    plain = tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    plain.load_state_dict(saved["state_dict"])  # strict: torchvision's own key names
    plain.eval(), module.student.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)["out"], module.student(x)["out"])


def test_the_supervised_module_trains_missing_teachers_and_takes_no_teacher() -> None:
    assert SegCWD.teacher_training_module is SegmentationSupervised
    net = DeepLabV3Segmenter(4, "tiny")
    module = SegmentationSupervised(  # as kd fit's teacher training builds it
        model=net, label_smoothing=0.1, optimizer=ADAM, lr_scheduler=None, lr_scheduler_interval="epoch"
    )
    assert module.model is net and module.label_smoothing == 0.1
    with pytest.raises(KDConfigError, match=r"takes no teacher"):
        SegmentationSupervised(net, teacher=DeepLabV3Segmenter(4, "tiny"))


# ---------------------------------------------------------------------------------------------- bad inputs
def _fit(module: SegmentationDistillation, tmp_path: Path, data: SyntheticSegmentationData | None = None) -> None:
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, data or SyntheticSegmentationData(train_size=8, val_size=8))


def tiny(classes: int = 4, **kwargs: Any) -> DeepLabV3Segmenter:
    return DeepLabV3Segmenter(classes, "tiny", tiny_widths=(4, 8, 8), **kwargs)


class NoTaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.head(x)}


@pytest.mark.parametrize(
    ("build", "data", "message"),
    [
        (
            lambda: SegmentationSupervised(tiny(5)),
            None,
            r"^model.init_args.model: DeepLabV3Segmenter outputs 5 classes but num_classes \(the data's\) is 4\. "
            r"build it with num_classes=4$",
        ),
        (
            lambda: LogitMSE(tiny(), tiny(6)),
            None,
            r"^model.init_args.teacher: DeepLabV3Segmenter outputs 6 classes but num_classes .* is 4\.",
        ),
        (
            lambda: SegmentationSupervised(tiny(), num_classes=5),
            None,
            r"^model.init_args.num_classes: is 5 but SyntheticSegmentationData has 4 classes\.",
        ),
        (
            lambda: SegmentationSupervised(tiny()),
            SyntheticSegmentationData(train_size=8, val_size=8, classes=[1, 6]),
            r"^data: the masks hold labels in \[0, 6\] besides the ignore label 255, but there are 4 classes\. "
            r"map the labels to trainIds 0\.\.3",
        ),
        (
            lambda: LogitMSE(tiny(output_stride=16), tiny()),
            None,
            r"^model.init_args.student: its logits map \('classifier'\) is 4x4 but the teacher's \('classifier'\) is "
            r"8x8 on a 64x64 input\. give both networks the same output stride",
        ),
        (
            lambda: SegmentationSupervised(tiny(), ignore_index=0),
            None,
            r"^model.init_args.ignore_index: is 0 but SyntheticSegmentationData marks unlabelled pixels with 255",
        ),
    ],
    ids=["student-classes", "teacher-classes", "num-classes", "labels", "output-stride", "ignore-index"],
)
def test_bad_data_and_networks_fail_at_setup_in_one_line(build, data, message: str, tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=message) as err:
        _fit(build(), tmp_path, data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: LogitMSE(tiny(), tiny(), student_maps={"logits": "clasifier"}),
            r"^model.init_args.student_maps: DeepLabV3Segmenter has no submodule 'clasifier' .*close matches: "
            r"'classifier'",
        ),
        (
            lambda: LogitMSE(tiny(), tiny(), teacher_maps={"logit": "classifier"}),
            r"^model.init_args.teacher_maps: names roles \['logit'\] that LogitMSE does not read\. "
            r"it reads \['logits'\]",
        ),
        (
            lambda: LogitMSE(NoTaps(), tiny()),
            r"^model.init_args.student_maps: LogitMSE reads the 'logits' map but NoTaps has none \(it lists no "
            r"tap_names\)\. give student_maps: \{logits: <module path>\}",
        ),
        (
            lambda: SegmentationSupervised(tiny(), eval_mode="slide"),
            r"^model.init_args.window: eval_mode 'slide' needs the window size",
        ),
        (
            lambda: SegmentationSupervised(tiny(), eval_mode="slide", window=(0, 8)),
            r"^model.init_args.window: must be two positive sizes",
        ),
    ],
    ids=["unknown-path", "unknown-role", "no-tap-names", "slide-without-window", "bad-window"],
)
def test_bad_arguments_fail_at_construction_in_one_line(build, message: str) -> None:
    with pytest.raises(KDConfigError, match=message) as err:
        build()
    assert "\n" not in str(err.value)


def test_explicit_paths_serve_models_without_tap_names(tmp_path: Path) -> None:
    module = LogitMSE(NoTaps(), tiny(), student_maps={"logits": "head"}, optimizer=ADAM)
    with pytest.raises(KDConfigError, match=r"its logits map \('head'\) is 64x64 but the teacher's"):
        _fit(module, tmp_path)  # a stride-1 "network" against a stride-8 teacher
    fcn = FCNSegmenter(4, "tiny", tiny_widths=(4, 8, 8))
    module = LogitMSE(fcn, tiny(), student_maps={"logits": "classifier.4"}, optimizer=ADAM)
    _fit(module, tmp_path)
    assert module.seen["student"] == (8, 4, 8, 8)
