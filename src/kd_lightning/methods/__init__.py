"""Distillation methods as LightningModules (one class per file).

The registry is this module: every class listed in ``__all__`` is usable by its short name
in configs (``class_path: PLD``).
"""

from kd_lightning.methods.base import ClassificationModule, DistillationModule
from kd_lightning.methods.dkd import DKD
from kd_lightning.methods.logit_standard_kd import LogitStandardKD
from kd_lightning.methods.pld import PLD
from kd_lightning.methods.supervised import Supervised
from kd_lightning.methods.vanilla_kd import VanillaKD

__all__ = [
    "DKD",
    "PLD",
    "ClassificationModule",
    "DistillationModule",
    "LogitStandardKD",
    "Supervised",
    "VanillaKD",
]
