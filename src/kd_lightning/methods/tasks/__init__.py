"""Task siblings of the distillation core: what classification, language modelling and masked-image
modelling add to :class:`~kd_lightning.methods.core.DistillationModule` (batches, metrics, data checks, the
supervised module that trains a missing teacher).

Detection and segmentation siblings plug in the same way: implement ``training_loss``, ``evaluate``
(compute mAP/mIoU once over the split with torchmetrics), ``check_data`` and ``inputs_of``; the core brings
teachers, optimisation, schedules, logging, NaN checks and export.
"""

from kd_lightning.methods.tasks.classification import ClassificationDistillation, Supervised, check_class_targets
from kd_lightning.methods.tasks.detection import (
    DetectionContext,
    DetectionDistillation,
    DetectionSupervised,
    split_detection_batch,
)
from kd_lightning.methods.tasks.diffusion import DiffusionDistillation, DiffusionSupervised
from kd_lightning.methods.tasks.language_model import LanguageModelDistillation, LMSupervised
from kd_lightning.methods.tasks.masked_image import MaskedImageDistillation
from kd_lightning.methods.tasks.node_classification import NodeClassificationDistillation, NodeSupervised
from kd_lightning.methods.tasks.reasoning import ReasoningDistillation, ReasoningSupervised
from kd_lightning.methods.tasks.retrieval import RetrievalDistillation, RetrievalSupervised
from kd_lightning.methods.tasks.segmentation import (
    SegmentationDistillation,
    SegmentationSupervised,
    check_segmentation_batch,
)

__all__ = [
    "ClassificationDistillation",
    "DetectionContext",
    "DetectionDistillation",
    "DetectionSupervised",
    "DiffusionDistillation",
    "DiffusionSupervised",
    "LMSupervised",
    "LanguageModelDistillation",
    "MaskedImageDistillation",
    "NodeClassificationDistillation",
    "NodeSupervised",
    "ReasoningDistillation",
    "ReasoningSupervised",
    "RetrievalDistillation",
    "RetrievalSupervised",
    "SegmentationDistillation",
    "SegmentationSupervised",
    "Supervised",
    "check_class_targets",
    "check_segmentation_batch",
    "split_detection_batch",
]
