"""COCO mean average precision for detectors (torchmetrics ``MeanAveragePrecision`` with a COCO backend).

mAP is a statistic of the whole split: update the metric with every batch and compute it once per epoch
(never average per-batch mAPs). Under DDP torchmetrics gathers the detections and ground truths of every rank
before computing. pycocotools / faster_coco_eval are imported only when a metric is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from kd_lightning.errors import KDConfigError

__all__ = ["MAP_KEYS", "detection_map", "map_backend", "map_predictions", "map_targets"]

#: The summary values logged per stage (``val/map``, ``val/map_50``...).
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
_MODULES = {"faster_coco_eval": "faster_coco_eval", "pycocotools": "pycocotools"}


def map_backend(backend: Literal["auto", "faster_coco_eval", "pycocotools"] = "auto") -> str:
    """The COCO backend to use: ``"auto"`` picks faster_coco_eval when installed, else pycocotools.

    Raises:
        KDConfigError: the backend is unknown or not installed (naming the ``kd-lightning[dense]`` extra).
    """
    if backend not in ("auto", *_MODULES):
        raise KDConfigError("map_backend", f"must be 'auto', 'faster_coco_eval' or 'pycocotools', got {backend!r}")
    candidates = list(_MODULES) if backend == "auto" else [backend]
    for name in candidates:
        if importlib.util.find_spec(_MODULES[name]) is not None:
            return name
    wanted = " or ".join(candidates)
    raise KDConfigError(
        "map_backend",
        f"COCO mAP needs {wanted}, which is not installed",
        "pip install 'kd-lightning[dense]'",
    )


def detection_map(
    backend: Literal["auto", "faster_coco_eval", "pycocotools"] = "auto",
    iou_type: Literal["bbox", "segm"] = "bbox",
    class_metrics: bool = False,
    **kwargs: Any,
) -> MeanAveragePrecision:
    """A torchmetrics ``MeanAveragePrecision`` with COCO's protocol (IoU 0.50:0.95, 100 detections, COCO areas).

    Args:
        backend: ``"auto"`` (faster_coco_eval if installed, else pycocotools) or one of them.
        iou_type: ``"bbox"`` or ``"segm"`` (masks).
        class_metrics: also compute per-class AP/AR (``map_per_class``; slower).
        **kwargs: other ``MeanAveragePrecision`` arguments (``iou_thresholds``, ``max_detection_thresholds``...).

    Raises:
        KDConfigError: no COCO backend is installed.
    """
    if iou_type not in ("bbox", "segm"):
        raise KDConfigError("iou_type", f"must be 'bbox' or 'segm', got {iou_type!r}")
    return MeanAveragePrecision(
        box_format="xyxy", iou_type=iou_type, class_metrics=class_metrics, backend=map_backend(backend), **kwargs
    )


def map_targets(targets: Sequence[Mapping[str, Tensor]], masks: bool = False) -> list[dict[str, Tensor]]:
    """Batch targets → torchmetrics ground truths: ``boxes`` (xyxy), ``labels``, the real ``iscrowd`` and ``area``.

    A target without ``iscrowd`` counts as non-crowd; without ``area`` (or with area ≤ 0) the box area is used,
    as COCO does for boxes. Crowd regions are matched but never counted as missed (COCO's rule).

    Args:
        targets: per image ``{"boxes" [N, 4] xyxy, "labels" [N], "iscrowd"?, "area"?, "masks"?}``.
        masks: also pass ``masks`` (``iou_type="segm"``).
    """
    out = []
    for target in targets:
        boxes = target["boxes"].detach().float().reshape(-1, 4)
        labels = target["labels"].detach().long().reshape(-1)
        crowd = target.get("iscrowd")
        crowd = torch.zeros_like(labels) if crowd is None else crowd.detach().long().reshape(-1)
        box_area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        area = target.get("area")
        area = box_area if area is None else torch.where(area.detach().float() > 0, area.detach().float(), box_area)
        item = {"boxes": boxes, "labels": labels, "iscrowd": crowd, "area": area}
        if masks:
            item["masks"] = target["masks"].detach().bool()
        out.append(item)
    return out


def map_predictions(detections: Sequence[Mapping[str, Tensor]], masks: bool = False) -> list[dict[str, Tensor]]:
    """Detector outputs → torchmetrics predictions (``boxes``, ``scores``, ``labels``; binary ``masks`` if asked;
    torchvision's soft masks ``[N, 1, H, W]`` are thresholded at 0.5)."""
    out = []
    for det in detections:
        item = {
            "boxes": det["boxes"].detach().float().reshape(-1, 4),
            "scores": det["scores"].detach().float().reshape(-1),
            "labels": det["labels"].detach().long().reshape(-1),
        }
        if masks:
            m = det["masks"].detach()
            if m.dim() == 4:
                m = m[:, 0]
            item["masks"] = m > 0.5 if m.is_floating_point() else m.bool()
        out.append(item)
    return out
