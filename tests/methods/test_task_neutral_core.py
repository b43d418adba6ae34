"""The core makes no classification assumption: a dense (segmentation-like) task sibling is ~30 lines.

The sibling below implements only the four task hooks (``training_loss``, ``evaluate``, ``check_data``,
``inputs_of`` — the last by default); teachers, freezing, optimisation, schedules, NaN checks, logging and export
come from :class:`~kd_lightning.methods.core.DistillationModule`.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex

from kd_lightning.errors import KDConfigError, TrainingDivergedError
from kd_lightning.losses import weighted_terms
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.methods.core import DistillationModule
from tests.helpers.tiny import tiny_trainer

IGNORE = 255


class PixelDistillation(DistillationModule):
    """Per-pixel classification: logits ``[B, C, H, W]``, labels ``[B, H, W]`` (255 = ignore), mIoU."""

    requires_teacher = False  # distils when given a teacher, trains alone otherwise

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, num_classes: int = 3, **kwargs: Any):
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.num_classes = num_classes
        self.miou = nn.ModuleDict(
            {s: MulticlassJaccardIndex(num_classes, ignore_index=IGNORE) for s in ("val", "test")}
        )

    def training_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = self.student(x)
        terms = {"ce": F.cross_entropy(logits, y, ignore_index=IGNORE)}
        if len(self.teachers):
            s, t = logits.movedim(1, -1), self.run_teacher(x).movedim(1, -1)
            terms["kd"] = forward_kl(s, t, temperature=2.0, mask=y != IGNORE) * 4.0
        return weighted_terms(terms)

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        x, y = batch
        self.miou[stage].update(self.student(x).argmax(1), y)
        self.log(f"{stage}/miou", self.miou[stage], batch_size=x.shape[0])

    def check_data(self, datamodule: Any) -> None:
        if datamodule is not None and getattr(datamodule, "num_classes", self.num_classes) != self.num_classes:
            raise KDConfigError("model.init_args.num_classes", "does not match the data")


def segmenter(width: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, classes, 1))


def scenes(n: int = 32, seed: int = 0, nan: bool = False) -> DataLoader:
    """Images whose left/right halves and a bright square decide the class of each pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, 8, 8, dtype=torch.long)
    y[:, :, 4:] = 1
    for i in range(n):
        r, c = torch.randint(0, 5, (2,), generator=g).tolist()
        y[i, r : r + 3, c : c + 3] = 2
    x = (y.float() + 0.3 * torch.randn(n, 8, 8, generator=g)).unsqueeze(1)
    y[:, 0, 0] = IGNORE
    if nan:
        x[3, 0, 2, 2] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=g)


def test_the_core_has_no_classification_arguments() -> None:
    arguments = set(inspect.signature(DistillationModule.__init__).parameters)
    assert not arguments & {"num_classes", "top_k", "fidelity", "label_smoothing"}


def test_a_dense_sibling_trains_alone_and_distils_with_a_frozen_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher_module = PixelDistillation(segmenter(16), optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = tiny_trainer(tmp_path / "t", max_epochs=8)
    trainer.fit(teacher_module, scenes(), scenes(seed=1))
    teacher_miou = float(trainer.callback_metrics["val/miou"])
    assert teacher_miou > 0.6

    teacher = teacher_module.student
    before = copy.deepcopy(teacher.state_dict())
    student = PixelDistillation(segmenter(4), teacher=teacher, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    trainer = tiny_trainer(tmp_path / "s", max_epochs=2)
    trainer.fit(student, scenes(), scenes(seed=1))
    assert {"train/ce", "train/kd", "train/loss", "val/miou"} <= set(trainer.callback_metrics)
    assert not student.teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    exported = torch.load(student.export_student(tmp_path / "seg.pt"), weights_only=True)
    assert set(exported["state_dict"]) == set(segmenter(4).state_dict())


def test_the_core_stops_on_nan_inputs_naming_the_batch(tmp_path: Path) -> None:
    module = PixelDistillation(segmenter(4))
    with pytest.raises(
        TrainingDivergedError, match=r"train/loss: non-finite at step \d+ .*inputs of this batch contain"
    ):
        tiny_trainer(tmp_path).fit(module, scenes(nan=True))
