"""Task siblings of the distillation core: what classification, language modelling and masked-image
modelling add to :class:`~kd_lightning.methods.core.DistillationModule` (batches, metrics, data checks, the
supervised module that trains a missing teacher).

Detection and segmentation siblings plug in the same way: implement ``training_loss``, ``evaluate``
(compute mAP/mIoU once over the split with torchmetrics), ``check_data`` and ``inputs_of``; the core brings
teachers, optimisation, schedules, logging, NaN checks and export.
"""

from kd_lightning.methods.tasks.classification import ClassificationDistillation, Supervised, check_class_targets
from kd_lightning.methods.tasks.language_model import LanguageModelDistillation, LMSupervised
from kd_lightning.methods.tasks.masked_image import MaskedImageDistillation

__all__ = [
    "ClassificationDistillation",
    "LMSupervised",
    "LanguageModelDistillation",
    "MaskedImageDistillation",
    "Supervised",
    "check_class_targets",
]
