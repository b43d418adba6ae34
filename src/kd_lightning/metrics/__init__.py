"""Task metrics (pure torch + torchmetrics): COCO detection mAP and segmentation mIoU, synced across processes."""

from kd_lightning.metrics.detection import MAP_KEYS, detection_map, map_backend, map_predictions, map_targets
from kd_lightning.metrics.segmentation import MeanIoU, iou_from_confusion

__all__ = [
    "MAP_KEYS",
    "MeanIoU",
    "detection_map",
    "iou_from_confusion",
    "map_backend",
    "map_predictions",
    "map_targets",
]
