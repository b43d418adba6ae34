"""Callbacks that a Trainer runs around a method."""

from kd_lightning.callbacks.throughput import SamplesPerSecond

__all__ = ["SamplesPerSecond"]
