"""SegPixelKD and SegCIRKD: per-pixel KD and cross-image relations on native-stride maps of a segmenter."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.seg_cirkd import SegCIRKD
from kd_lightning.methods.seg_pixel_kd import SegPixelKD
from kd_lightning.models.segmentation import DeepLabV3Segmenter
from tests.helpers.segmentation_data import SyntheticSegmentationData, make_scenes
from tests.helpers.tiny import tiny_trainer

ADAM = partial(torch.optim.Adam, lr=0.005)
SHAPE = (3, 64, 64)
SMALL_MEMORY = {
    "memory_pixel_size": 64,
    "memory_region_size": 16,
    "memory_pixel_contrast": 32,
    "memory_region_contrast": 8,
}


def student() -> DeepLabV3Segmenter:
    torch.manual_seed(1)
    return DeepLabV3Segmenter(4, "tiny", tiny_widths=(8, 16, 32), head_channels=32)


def teacher() -> DeepLabV3Segmenter:
    torch.manual_seed(2)
    return DeepLabV3Segmenter(4, "tiny", tiny_widths=(16, 32, 64), head_channels=64)


def native(model: DeepLabV3Segmenter, x: Tensor) -> tuple[Tensor, Tensor]:
    feature = nn.Sequential(*list(model.classifier)[:4])(model.backbone(x)["out"])
    return model.classifier[4](feature), feature


def pixel_kd_by_hand(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """τ² · mean over pixels of Σ_k p_T (log p_T − log p_S), softmax over classes."""
    p_t = (t / tau).softmax(1)
    return tau**2 * (p_t * (p_t.log() - (s / tau).log_softmax(1))).sum(1).mean()


def affinity_by_hand(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """The official double loop over image pairs (i, j): KL of row-softmaxed affinities, batchmean over rows."""
    b = s.shape[0]
    fs, ft = F.normalize(s.flatten(2), dim=1), F.normalize(t.flatten(2), dim=1)
    total = s.new_zeros(())
    for i in range(b):
        for j in range(b):
            a_s, a_t = fs[i].T @ fs[j] / tau, ft[i].T @ ft[j] / tau
            total = total + F.kl_div(a_s.log_softmax(1), a_t.log_softmax(1), log_target=True, reduction="batchmean")
    return total / b**2


def test_pixel_kd_is_ce_plus_per_pixel_kl_of_native_logits() -> None:
    module = SegPixelKD(student(), teacher(), tau=2.0, weight=0.5, input_shape=SHAPE)
    x, y = make_scenes(3, 4, 64, seed=3)
    module.eval()
    terms = module.training_loss((x, y))
    s_logits, _ = native(module.student, x)
    t_logits, _ = native(module.teacher, x)
    assert s_logits.shape == (3, 4, 8, 8)
    torch.testing.assert_close(terms["pixel_kd"], 0.5 * pixel_kd_by_hand(s_logits, t_logits, 2.0))
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["pixel_kd"])
    # a student equal to its teacher has no pixel-KD loss
    same = SegPixelKD(teacher(), teacher(), input_shape=SHAPE).eval()
    assert float(same.training_loss((x, y))["pixel_kd"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_cirkd_terms_match_the_official_definitions() -> None:
    module = SegCIRKD(student(), teacher(), memory_pixel_weight=0.0, memory_region_weight=0.0, input_shape=SHAPE)
    assert not hasattr(module, "memory")
    x, y = make_scenes(3, 4, 64, seed=5)
    module.eval()
    terms = module.training_loss((x, y))
    assert set(terms) == {"loss", "ce", "pixel_kd", "pair"}
    s_logits, s_feat = native(module.student, x)
    t_logits, t_feat = native(module.teacher, x)
    assert s_feat.shape[1] == 32 and t_feat.shape[1] == 64  # no projection: widths may differ
    torch.testing.assert_close(terms["pixel_kd"], pixel_kd_by_hand(s_logits, t_logits, 1.0))
    torch.testing.assert_close(terms["pair"], affinity_by_hand(s_feat, t_feat, 0.1), rtol=1e-4, atol=1e-5)
    terms["loss"].backward()
    assert module.student.classifier[0].convs[0][0].weight.grad is not None
    assert all(p.grad is None for p in module.teacher.parameters())


def test_cirkd_memory_builds_a_projection_that_is_optimised_and_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = SyntheticSegmentationData(train_size=16, val_size=8)
    net_t = teacher()
    before = {k: v.clone() for k, v in net_t.state_dict().items()}
    module = SegCIRKD(student(), net_t, optimizer=ADAM, memory_pixel_enqueue="class", **SMALL_MEMORY)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, data)
    logged = set(trainer.callback_metrics)
    assert {"train/pixel_kd", "train/pair", "train/memory_pixel", "train/memory_region", "val/miou"} <= logged
    assert all(torch.equal(v, before[k]) for k, v in net_t.state_dict().items())
    assert all(not m.training for m in module.teacher.modules())
    optimised = {id(p) for g in module.configure_optimizers().param_groups for p in g["params"]}
    assert {id(p) for p in module.memory.parameters()} <= optimised
    path = tmp_path / "cirkd.ckpt"
    trainer.save_checkpoint(path)
    restored = SegCIRKD.load_from_checkpoint(path, student=student(), teacher=teacher())
    ours, theirs = module.state_dict(), restored.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_pixel_kd_fit_logs_its_term(tmp_path: Path) -> None:
    data = SyntheticSegmentationData(train_size=16, val_size=8)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(SegPixelKD(student(), teacher(), optimizer=ADAM), data)
    assert {"train/pixel_kd", "train/ce", "val/miou"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (SegPixelKD, {"tau": 0.0}, r"^model.init_args.tau: must be a finite number > 0"),
        (SegPixelKD, {"weight": 0.0}, r"^model.init_args.weight: is 0"),
        (SegCIRKD, {"pair_tau": -1.0}, r"^model.init_args.pair_tau: must be a finite number > 0"),
        (SegCIRKD, {"kd_weight": -1.0}, r"^model.init_args.kd_weight: must be a finite number >= 0"),
        (SegCIRKD, {"pair_pool_size": 0}, r"^model.init_args.pair_pool_size: must be >= 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(KDConfigError, match=message) as err:
        cls(student(), teacher(), **kwargs)
    assert "\n" not in str(err.value)
