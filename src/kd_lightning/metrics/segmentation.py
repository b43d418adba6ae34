"""Semantic-segmentation metrics: :class:`MeanIoU` over a confusion matrix synced across DDP ranks.

``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` from the ``[C, C]`` confusion matrix (rows = ground truth, columns =
prediction) accumulated over the whole split; ``mIoU`` is the mean over the classes whose union
``TP + FP + FN`` is non-zero (a class absent from both labels and predictions is left out, the nan-mean of
mmseg's ``IoUMetric`` and cityscapesScripts); pixel accuracy is ``Σ TP / #valid pixels``. Pixels labelled
``ignore_index`` (255 for Cityscapes trainIds) are never counted, whatever is predicted there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from kd_lightning.errors import KDConfigError

__all__ = ["MeanIoU", "iou_from_confusion"]


def iou_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """Per-class IoU (nan where the union is 0), mIoU (mean over classes with a non-zero union) and pixel accuracy.

    Args:
        confusion: ``[C, C]`` counts, ``confusion[target, prediction]``.

    Returns:
        ``{"iou": [C] float64, "miou": scalar, "pixel_acc": scalar}``; ``miou``/``pixel_acc`` are nan when no
        pixel was counted.
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = iou[present].mean() if bool(present.any()) else torch.tensor(float("nan"), dtype=torch.float64)
    total = confusion.sum()
    pixel_acc = tp.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
    return {"iou": iou, "miou": miou.to(iou.device), "pixel_acc": pixel_acc.to(iou.device)}


class MeanIoU(Metric):
    """Mean intersection-over-union over a split: a ``[C, C]`` int64 confusion matrix summed across ranks.

    ``update(preds, target)`` takes class indices ``[B, H, W]`` or logits/scores ``[B, C, H, W]`` (arg-maxed)
    and labels ``[B, H, W]`` with ``ignore_index`` for unlabelled pixels. ``compute()`` returns the mIoU (the
    nan-mean over classes present in labels or predictions); :meth:`compute_per_class` also returns per-class
    IoU (nan for absent classes) and pixel accuracy, synced the same way.

    Args:
        num_classes: classes ``C`` (19 for Cityscapes trainIds).
        ignore_index: label of pixels never counted (255: Cityscapes trainIds, VOC boundaries).
        validate_args: check shapes and that labels/predictions lie in ``[0, C)`` (labels may also be
            ``ignore_index``); a host sync per update.
        **kwargs: torchmetrics ``Metric`` options (``dist_sync_on_step``, ``process_group``...).

    Raises:
        KDConfigError: ``num_classes < 1``; with ``validate_args``, a shape mismatch or out-of-range values.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = 255, validate_args: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.validate_args = validate_args
        self.add_state(
            "confusion", default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` ``[B, H, W]`` class ids or ``[B, C, H, W]`` scores, ``target`` ``[B, H, W]``."""
        if preds.is_floating_point() and preds.dim() == target.dim() + 1:
            if self.validate_args and preds.shape[1] != self.num_classes:
                raise KDConfigError(
                    "preds", f"has {preds.shape[1]} score channels but the metric has {self.num_classes} classes"
                )
            preds = preds.argmax(1)
        if self.validate_args:
            self._check(preds, target)
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        valid = self._valid(target)
        n = self.num_classes
        index = target[valid] * n + preds[valid]
        self.confusion += torch.bincount(index, minlength=n * n).reshape(n, n)

    def _valid(self, target: Tensor) -> Tensor:
        """Pixels that count: those not labelled ``ignore_index``."""
        if self.ignore_index is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != self.ignore_index

    def _check(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise KDConfigError(
                "preds",
                f"shape {tuple(preds.shape)} differs from the target's {tuple(target.shape)}",
                "upsample the logits to the label size before the metric",
            )
        if preds.is_floating_point() or target.is_floating_point():
            raise KDConfigError("target", "predictions and labels must be integer class ids (or [B, C, H, W] scores)")
        valid = self._valid(target)
        for name, values in (("target", target[valid]), ("preds", preds[valid])):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= self.num_classes):
                raise KDConfigError(
                    name,
                    f"holds class ids in [{int(values.min())}, {int(values.max())}] but there are {self.num_classes} "
                    f"classes (ignore_index {self.ignore_index})",
                    "map the labels to 0..num_classes-1 and the ignore label",
                )

    def compute(self) -> Tensor:
        """The mIoU: mean IoU over classes with a non-zero union (nan when no pixel was counted)."""
        return iou_from_confusion(self.confusion)["miou"].float()

    def compute_per_class(self) -> dict[str, Tensor]:
        """``{"miou", "iou" [C] (nan for absent classes), "pixel_acc"}`` of the states synced across ranks."""
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        ):
            scores = iou_from_confusion(self.confusion)
        return {name: value.float() for name, value in scores.items()}
