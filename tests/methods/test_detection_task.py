"""The detection task sibling: supervised training reaches a real mAP, batches and setup checks, export."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.tasks.detection import DetectionDistillation, DetectionSupervised, split_detection_batch
from kd_lightning.metrics import detection_map, map_predictions, map_targets
from kd_lightning.models.detection import FCOSDetector, RetinaNetDetector
from tests.helpers.detection_data import ShapesDataModule, ShapesDetection, detection_collate
from tests.helpers.tiny import tiny_trainer

MAP_NAMES = {f"val/{k}" for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")}


def adam(lr: float = 3e-3) -> Any:
    return functools.partial(torch.optim.Adam, lr=lr)


def tiny(cls: type = RetinaNetDetector, classes: int = 3, **kwargs: Any) -> nn.Module:
    defaults: dict[str, Any] = {"backbone": "tiny", "fpn_channels": 32, "min_size": 64, "max_size": 64}
    return cls(classes, **{**defaults, **kwargs})


class Passthrough(DetectionDistillation):
    """A method with no term of its own (the task loss only, with a teacher)."""

    def distill_terms(self, student_feats: Any, teacher_feats: Any, context: Any) -> dict[str, torch.Tensor]:
        self.seen = (student_feats, teacher_feats, context)
        return {"zero": sum(v.sum() for v in student_feats.values()) * 0.0}


def test_supervised_fcos_reaches_a_clearly_nonzero_map_on_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DetectionSupervised(tiny(FCOSDetector), optimizer=adam())
    trainer = tiny_trainer(tmp_path, max_epochs=20, num_sanity_val_steps=0, check_val_every_n_epoch=20)
    trainer.fit(module, ShapesDataModule(train_size=48, val_size=16))
    metrics = trainer.callback_metrics
    assert set(metrics) >= MAP_NAMES
    assert float(metrics["val/map_50"]) > 0.3 and float(metrics["val/map"]) > 0.1
    assert {"train/classification", "train/bbox_regression", "train/bbox_ctrness", "train/loss"} <= set(metrics)
    assert not module.metrics["val_map"].update_called  # computed once, then reset
    trainer.test(module, ShapesDataModule(train_size=48, val_size=16))
    assert "test/map" in trainer.callback_metrics


def test_map_is_computed_once_over_the_split_not_averaged_over_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DetectionSupervised(tiny(FCOSDetector), optimizer=adam())
    data = ShapesDataModule(train_size=16, val_size=16)
    trainer = tiny_trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(module, data)
    for batch_size in (4, 16):  # the batching of the split does not change the number
        data.eval_batch_size = batch_size
        trainer.validate(module, data, verbose=False)
        value = float(trainer.callback_metrics["val/map_50"])
        if batch_size == 4:
            first = value
    assert value == pytest.approx(first, abs=1e-6) and value > 0
    per_batch = []  # what averaging per-batch mAPs would have logged: a different number
    module.student.eval()
    data.eval_batch_size = 4
    for images, targets in data.val_dataloader():
        metric = detection_map("pycocotools")
        with torch.no_grad():
            metric.update(map_predictions(module.student(images)), map_targets(targets))
        per_batch.append(float(metric.compute()["map_50"]))
    assert len(per_batch) == 4 and sum(per_batch) / 4 != pytest.approx(value, abs=1e-4)


def test_class_metrics_log_per_class_ap_by_class_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DetectionSupervised(tiny(FCOSDetector), class_metrics=True, optimizer=adam())
    trainer = tiny_trainer(tmp_path)
    trainer.validate(module, ShapesDataModule(val_size=8), verbose=False)
    names = {f"val/map_class_{n}" for n in ("square_red", "disc_green", "square_blue")}
    assert names <= set(trainer.callback_metrics) and "val/map" in trainer.callback_metrics


def test_batches_a_stacked_tensor_is_split_and_a_default_collate_is_refused() -> None:
    images = torch.zeros(2, 3, 8, 8)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    got_images, got_targets = split_detection_batch((images, targets))
    assert len(got_images) == 2 and got_images[0].shape == (3, 8, 8) and got_targets == targets
    assert len(split_detection_batch([torch.zeros(3, 8, 8)] * 3)[0]) == 3  # images only (predict)
    one_box = [(torch.zeros(3, 8, 8), {"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long)})] * 2
    default = torch.utils.data.default_collate(one_box)  # [images [2, 3, 8, 8], {"boxes": [2, 1, 4], ...}]
    with pytest.raises(KDConfigError, match=r"^data: detection targets must be a list .*detection collate") as info:
        split_detection_batch(default)
    assert "\n" not in str(info.value)
    with pytest.raises(KDConfigError, match=r"^data: a detection batch must start with a list of \[3, H, W\] images"):
        split_detection_batch((torch.zeros(2, 8), [1, 2]))


def test_labels_outside_one_to_k_and_degenerate_boxes_are_refused() -> None:
    module = DetectionSupervised(tiny(), optimizer=adam())
    images = [torch.rand(3, 64, 64)]
    zero = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    with pytest.raises(KDConfigError, match=r"^data: detection labels must be integers in 1..3 \(0 = background\)"):
        module.training_loss((images, zero))
    flat = [{"boxes": torch.tensor([[5.0, 5, 5, 10]]), "labels": torch.tensor([1])}]
    with pytest.raises(KDConfigError, match=r"^data: a training box has non-positive width or height"):
        module.training_loss((images, flat))


def test_class_count_transform_and_level_mismatches_are_one_line_errors() -> None:
    data = ShapesDataModule(num_classes=3)
    with pytest.raises(KDConfigError) as info:
        DetectionSupervised(tiny(classes=5), optimizer=adam()).check_data(data)
    assert str(info.value).startswith(
        "model.init_args.model.init_args.num_classes: is 5 (6 outputs with background) but ShapesDataModule has 3"
    )
    teacher_wrong = Passthrough(tiny(), tiny(classes=4), optimizer=adam())
    with pytest.raises(KDConfigError, match=r"^model.init_args.teacher.init_args.num_classes: is 4 .* has 3 classes"):
        teacher_wrong.check_data(data)
    resized = Passthrough(tiny(), tiny(min_size=96, max_size=96), optimizer=adam())
    with pytest.raises(KDConfigError, match=r"^model.init_args.teacher.init_args.min_size: is \[96\] but the student"):
        resized.check_data(data)
    with pytest.raises(KDConfigError) as info:
        Passthrough(tiny(), tiny(), distill_levels=["0", "p8"], optimizer=adam())
    message = str(info.value)
    assert message.startswith("model.init_args.distill_levels: ['p8'] is not an FPN level of the student")
    assert "['0', '1', '2', 'p6', 'p7']" in message and "\n" not in message
    with pytest.raises(KDConfigError, match=r"^model.init_args.student: Linear is not a torchvision RetinaNet"):
        Passthrough(nn.Linear(2, 2), tiny(), optimizer=adam())
    with pytest.raises(KDConfigError, match=r"^data: .*serves a 'segmentation' task"):
        data.task = "segmentation"
        DetectionSupervised(tiny(), optimizer=adam()).check_data(data)


def test_strides_must_agree_per_distilled_level() -> None:
    from kd_lightning.models.detection import FasterRCNNDetector

    module = Passthrough(tiny(), tiny(FasterRCNNDetector), distill_levels=["0", "1"], optimizer=adam())
    with pytest.raises(KDConfigError, match=r"^model.init_args.teacher: FPN level '0' is \(16, 16\) .* student's is"):
        module.check_data(None)


def test_the_teacher_sees_the_students_transformed_batch_and_targets_are_resized() -> None:
    torch.manual_seed(0)
    module = Passthrough(tiny(min_size=128, max_size=128), tiny(min_size=128, max_size=128), optimizer=adam())
    calls: list[torch.Tensor] = []
    module.teacher.backbone.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    images, targets = detection_collate([ShapesDetection(2, size=64)[i] for i in range(2)])
    terms = module.training_loss((images, targets))
    student_feats, teacher_feats, context = module.seen
    assert torch.equal(calls[-1], context.images.tensors) and context.images.tensors.shape[-1] == 128
    assert context.images.image_sizes == [(128, 128)] * 2
    torch.testing.assert_close(context.targets[0]["boxes"], targets[0]["boxes"] * 2)
    assert list(student_feats) == ["0", "1", "2", "p6", "p7"] and not teacher_feats["0"].requires_grad
    assert set(terms) == {"loss", "classification", "bbox_regression", "zero"}
    assert context.teacher_head is None and context.student_head["cls_logits"].shape[0] == 2


def test_task_weight_scales_the_detection_terms() -> None:
    torch.manual_seed(0)
    batch = detection_collate([ShapesDetection(2, size=64)[i] for i in range(2)])
    model = tiny()
    one = DetectionSupervised(model, optimizer=adam()).training_loss(batch)
    half = DetectionSupervised(model, task_weight=0.5, optimizer=adam()).training_loss(batch)
    torch.testing.assert_close(half["classification"], 0.5 * one["classification"])
    torch.testing.assert_close(half["loss"], 0.5 * one["loss"])


def test_export_loads_into_a_plain_torchvision_retinanet_with_equal_predictions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = RetinaNetDetector(3, backbone="resnet18", min_size=64, max_size=64, score_thresh=0.0)
    module = DetectionSupervised(student, optimizer=adam(1e-3))
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, ShapesDataModule(train_size=4, val_size=2, batch_size=4))
    exported = torch.load(module.export_student(tmp_path / "student.pt"), weights_only=True)
    assert exported["num_classes"] == 3 and exported["task"] == "detection"
    plain = RetinaNet(
        _resnet_fpn_extractor(resnet18(), 5, [2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)),
        4,
        min_size=64,
        max_size=64,
        score_thresh=0.0,
    )
    plain.load_state_dict(exported["state_dict"])
    images = [ShapesDetection(2, size=64, seed=5)[i][0] for i in range(2)]
    module.student.eval()
    plain.eval()
    with torch.no_grad():
        ours, theirs = module.student(images), plain(images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    loader = torch.utils.data.DataLoader(
        ShapesDetection(2, size=64, seed=5), batch_size=2, collate_fn=detection_collate
    )
    predictions = trainer.predict(module, loader)
    torch.testing.assert_close(predictions[0][0]["boxes"], ours[0]["boxes"])


def test_supervised_takes_no_teacher_and_no_label_smoothing() -> None:
    with pytest.raises(KDConfigError, match=r"^model.init_args.label_smoothing: is 0.1"):
        DetectionSupervised(tiny(), label_smoothing=0.1, optimizer=adam())
    assert DetectionDistillation.teacher_training_module is DetectionSupervised
    with pytest.raises(KDConfigError, match=r"teacher"):
        Passthrough(tiny(), optimizer=adam())
