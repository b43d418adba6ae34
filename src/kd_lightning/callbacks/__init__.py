"""Callbacks that a Trainer runs around a method."""

from kd_lightning.callbacks.logit_cache import TeacherLogitCache
from kd_lightning.callbacks.progress import EpochSummary
from kd_lightning.callbacks.snr import SNREvaluation

__all__ = ["EpochSummary", "SNREvaluation", "TeacherLogitCache"]
