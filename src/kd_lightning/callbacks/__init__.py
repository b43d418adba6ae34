"""Callbacks that a Trainer runs around a method."""

from kd_lightning.callbacks.logit_cache import TeacherLogitCache
from kd_lightning.callbacks.snr import SNREvaluation
from kd_lightning.callbacks.throughput import SamplesPerSecond

__all__ = ["SNREvaluation", "SamplesPerSecond", "TeacherLogitCache"]
