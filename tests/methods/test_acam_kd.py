"""DetACAMKD and SegACAMKD: terms equal the per-map ACAMLoss sums, every FPN level gets its own STCA-FF + ASCM,
short fits keep the teacher frozen and round-trip the parts, bad inputs are one-line errors."""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.acam import ACAMLoss
from kd_lightning.methods.det_acam_kd import DetACAMKD
from kd_lightning.methods.seg_acam_kd import SegACAMKD
from kd_lightning.methods.seg_cwd import SegCWD
from kd_lightning.models.detection import FasterRCNNDetector, FCOSDetector, RetinaNetDetector
from kd_lightning.models.segmentation import DeepLabV3Segmenter
from tests.helpers.detection_data import ShapesDataModule
from tests.helpers.segmentation_data import SyntheticSegmentationData, make_scenes
from tests.helpers.tiny import tiny_trainer

WIDE = {"tiny_widths": (32, 64, 128), "fpn_channels": 64}
NARROW = {"tiny_widths": (16, 32, 64), "fpn_channels": 32}
SHAPE = (3, 64, 64)
LEVELS = ["0", "1", "2", "p6", "p7"]


def adam() -> Any:
    return functools.partial(torch.optim.Adam, lr=3e-3)


def detector(cls: type = RetinaNetDetector, **kwargs: Any) -> nn.Module:
    return cls(3, **{"backbone": "tiny", "min_size": 64, "max_size": 64, **NARROW, **kwargs})


def seg_student() -> DeepLabV3Segmenter:
    torch.manual_seed(1)
    return DeepLabV3Segmenter(4, "tiny", aux_loss=True, tiny_widths=(8, 16, 32))


def seg_teacher() -> DeepLabV3Segmenter:
    torch.manual_seed(2)
    return DeepLabV3Segmenter(4, "tiny", tiny_widths=(16, 32, 64))


def _parts_are_optimised(module: nn.Module, optimizer: torch.optim.Optimizer, teacher: nn.Module) -> None:
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    acam = [p for p in module.acam.parameters()]
    assert acam and all(id(p) in optimised for p in acam)
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_defaults_are_the_spec_defaults() -> None:
    for cls in (DetACAMKD, SegACAMKD):
        params = inspect.signature(cls.__init__).parameters
        defaults = {name: params[name].default for name in params if params[name].default is not inspect._empty}
        assert {
            "lambda_kd": 1.0,
            "lambda_div": 0.5,
            "num_masks": 6,
            "key_channels": None,
            "max_tokens": 1024,
            "reduction": 16,
            "spatial_kernel": 3,
            "mask_objective": "min",
            "mask_source": "cooperative",
            "student_grad_through_masks": False,
            "adapter": "always",
        }.items() <= defaults.items()
    assert inspect.signature(SegACAMKD.__init__).parameters["feature_role"].default == "backbone"


# ------------------------------------------------------------------------------------------------ detection
def test_every_fpn_level_gets_its_own_modules_and_the_terms_sum_the_levels() -> None:
    torch.manual_seed(0)
    module = DetACAMKD(detector(), detector(**WIDE), lambda_kd=2.0, lambda_div=0.25)
    module.prepare()
    assert module.levels == LEVELS and list(module.acam) == LEVELS
    assert all(isinstance(part, ACAMLoss) and part.adapter.in_channels == 32 for part in module.acam.values())
    assert module.acam["0"].fusion.key_channels == 16  # C_T / 4 of the 64-channel teacher FPN
    sizes = {"0": 8, "1": 4, "2": 2, "p6": 1, "p7": 1}
    s = {level: torch.randn(2, 32, n, n) for level, n in sizes.items()}
    t = {level: torch.randn(2, 64, n, n) for level, n in sizes.items()}
    terms = module.distill_terms(s, t, None)  # type: ignore[arg-type]
    per_level = [module.acam[level](s[level], t[level]) for level in LEVELS]
    torch.testing.assert_close(terms["acam_channel"], 2.0 * sum(p["channel"] for p in per_level))
    torch.testing.assert_close(terms["acam_spatial"], 2.0 * sum(p["spatial"] for p in per_level))
    torch.testing.assert_close(terms["acam_div"], 0.25 * sum(p["diversity"] for p in per_level))


@pytest.mark.parametrize(
    "options",
    [
        {"mask_objective": "adversarial"},
        {"mask_objective": "detach"},
        {"mask_source": "teacher"},
        {"student_grad_through_masks": True, "adapter": "auto"},
    ],
    ids=["adversarial", "detach", "teacher_masks", "student_grad"],
)
def test_training_step_in_every_mode_reaches_student_and_parts_not_the_teacher(options: dict) -> None:
    torch.manual_seed(0)
    teacher = detector(FCOSDetector, **WIDE)
    module = DetACAMKD(detector(FCOSDetector), teacher, distill_levels=["0", "1"], **options)
    module.prepare()
    assert (module.acam["0"].fusion is None) == (options.get("mask_source") == "teacher")
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    terms = module.training_loss((images, targets))
    assert {"acam_channel", "acam_spatial", "acam_div", "classification"} <= set(terms)
    terms["loss"].backward()
    assert module.student.backbone.body.layer1[0].weight.grad is not None
    assert module.acam["0"].units.spatial_units.weight.grad is not None
    assert module.acam["1"].adapter.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("cls", [RetinaNetDetector, FCOSDetector])
def test_detection_fit_keeps_the_teacher_frozen_and_round_trips(cls: type, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = detector(cls, **WIDE)
    before = copy.deepcopy(teacher.state_dict())
    module = DetACAMKD(detector(cls), teacher, optimizer=adam(), lambda_kd=0.5)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, ShapesDataModule(train_size=16, val_size=8))
    assert {"train/loss", "train/acam_channel", "train/acam_spatial", "train/acam_div", "val/map"} <= set(
        trainer.callback_metrics
    )
    assert all(not m.training for m in teacher.modules())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    _parts_are_optimised(module, trainer.optimizers[0], teacher)
    assert list(module.acam) == LEVELS
    path = tmp_path / "acam.ckpt"
    trainer.save_checkpoint(path)
    loaded = DetACAMKD.load_from_checkpoint(
        path, student=detector(cls), teacher=detector(cls, **WIDE), optimizer=adam()
    )
    assert loaded.lambda_kd == 0.5 and list(loaded.acam) == LEVELS  # rebuilt from the stored channels
    state, expected = loaded.state_dict(), module.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def test_fpn_levels_that_differ_are_refused_by_the_detection_sibling() -> None:
    with pytest.raises(KDConfigError, match=r"\['p6', 'p7'\] are not an FPN level of the teacher") as err:
        DetACAMKD(detector(), detector(FasterRCNNDetector))
    assert "\n" not in str(err.value)
    with pytest.raises(KDConfigError, match=r"^model.init_args.distill_levels: \['p8'\] is not an FPN level"):
        DetACAMKD(detector(), detector(), distill_levels=["p8"])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: DetACAMKD(detector(), detector(), mask_objective="adversarial", student_grad_through_masks=True),
            r"^model.init_args.student_grad_through_masks: cannot be true with mask_objective 'adversarial'",
        ),
        (lambda: DetACAMKD(detector(), detector(), mask_objective="max"), r"^model.init_args.mask_objective: "),
        (lambda: DetACAMKD(detector(), detector(), lambda_div=-1.0), r"^model.init_args.lambda_div: must be a finite"),
        (
            lambda: DetACAMKD(detector(), detector(), mask_objective="detach", lambda_div=0.0),
            r"^model.init_args.lambda_div: is 0 with mask_objective 'detach'",
        ),
        (lambda: SegACAMKD(seg_student(), seg_teacher(), num_masks=0), r"^model.init_args.num_masks: must be a posit"),
        (lambda: SegACAMKD(seg_student(), seg_teacher(), feature_role="logits"), r"^model.init_args.feature_role: "),
    ],
)
def test_bad_arguments_are_one_line_errors(make: Any, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ segmentation
def test_segmentation_terms_are_acam_on_the_last_backbone_map() -> None:
    module = SegACAMKD(seg_student(), seg_teacher(), lambda_kd=3.0, input_shape=SHAPE)
    assert module.student_paths == {"backbone": "backbone.layer4"}
    assert (module.acam.adapter.in_channels, module.acam.adapter.out_channels) == (32, 64)
    x, y = make_scenes(2, 4, 64, seed=3)
    module.eval()  # deterministic BatchNorm for the comparison
    torch.manual_seed(0)
    terms = module.training_loss((x, y))
    assert set(terms) == {"loss", "ce", "aux", "acam_channel", "acam_spatial", "acam_div"}
    s_map, t_map = module.student.backbone(x)["out"], module.teacher.backbone(x)["out"]
    assert s_map.shape == (2, 32, 8, 8)  # native stride 8
    expected = module.acam(s_map, t_map)
    torch.testing.assert_close(terms["acam_channel"], 3.0 * expected["channel"])
    torch.testing.assert_close(terms["acam_spatial"], 3.0 * expected["spatial"])
    torch.testing.assert_close(terms["acam_div"], 0.5 * expected["diversity"])
    terms["loss"].backward()
    assert module.student.backbone.layer1[0][0].weight.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())
    head = SegACAMKD(seg_student(), seg_teacher(), feature_role="head_feature", input_shape=SHAPE)
    assert (head.acam.adapter.in_channels, head.acam.adapter.out_channels) == (32, 64)


def test_segmentation_fit_keeps_the_teacher_frozen_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = SyntheticSegmentationData(train_size=16, val_size=8)
    net_t = seg_teacher()
    before = {k: v.clone() for k, v in net_t.state_dict().items()}
    module = SegACAMKD(seg_student(), net_t, mask_objective="adversarial", optimizer=adam())
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert {"train/acam_channel", "train/acam_spatial", "train/acam_div", "train/ce", "val/miou"} <= set(
        trainer.callback_metrics
    )
    assert all(torch.equal(v, before[k]) for k, v in net_t.state_dict().items())
    assert all(not m.training for m in module.teacher.modules())
    _parts_are_optimised(module, trainer.optimizers[0], net_t)
    path = tmp_path / "seg_acam.ckpt"
    trainer.save_checkpoint(path)
    restored = SegACAMKD.load_from_checkpoint(path, student=seg_student(), teacher=seg_teacher())
    assert restored.acam is not None and restored.acam.mask_objective == "adversarial"
    ours, theirs = module.state_dict(), restored.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


class FlatFeature(nn.Module):
    """A segmenter whose ``backbone`` tap is a flattened ``[N, C, H·W]`` map (not ``[N, C, H, W]``)."""

    def __init__(self, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, width, 3, stride=8, padding=1)
        self.flat = nn.Flatten(2)
        self.classifier = nn.Conv2d(width, classes, 1)
        self.tap_names = {"logits": "classifier", "backbone": "flat"}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feature = self.body(x)
        self.flat(feature)
        return {"out": F.interpolate(self.classifier(feature), size=x.shape[-2:], mode="bilinear")}


def test_a_feature_tap_of_the_wrong_rank_is_a_one_line_error() -> None:
    with pytest.raises(
        KDConfigError,
        match=r"^model.init_args.student_maps: the 'backbone' map \('flat'\) is "
        r"\[N, 8, 64\] but SegACAMKD needs a \[N, C, H, W\] feature map",
    ) as err:
        SegACAMKD(FlatFeature(), seg_teacher(), input_shape=SHAPE)
    assert "\n" not in str(err.value)
    with pytest.raises(KDConfigError, match=r"^model.init_args.teacher_maps: the 'backbone' map"):
        SegACAMKD(seg_student(), FlatFeature(), input_shape=SHAPE)


def test_the_segmentation_sibling_refuses_a_wrong_rank_tap_for_every_method() -> None:
    with pytest.raises(
        KDConfigError, match=r"^model.init_args.student_maps: the 'backbone' map is \[N, 8, 64\], not \[N, C, H, W\]"
    ) as err:
        SegCWD(FlatFeature(), seg_teacher(), feature_weight=1.0, feature_role="backbone", input_shape=SHAPE)
    assert "\n" not in str(err.value)
