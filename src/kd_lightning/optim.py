"""Learning-rate schedules that torch lacks (usable as ``lr_scheduler`` class paths in configs)."""

from __future__ import annotations

import math

import torch

from kd_lightning.errors import KDConfigError

__all__ = ["WarmupCosineLR"]


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """MAE's learning-rate schedule: linear warm-up, then half-cycle cosine decay to ``eta_min``.

    ``lr(t) = base·t/W`` for ``t < W``, else ``eta_min + (base - eta_min)·(1 + cos(π·(t - W)/(T - W)))/2``,
    evaluated at the middle of each scheduler step (``t = step + 0.5``), so that one value per epoch follows
    MAE's per-iteration schedule on average. Units are scheduler steps: epochs with ``lr_scheduler_interval:
    epoch``, optimiser steps with ``step``.

    Args:
        optimizer: the optimiser.
        warmup_epochs: ``W``, steps of linear warm-up.
        max_epochs: ``T``, total steps (the learning rate reaches ``eta_min`` at ``T``).
        eta_min: final learning rate (MAE's ``min_lr``, 0).
        last_epoch: as in torch schedulers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_epochs: int,
        max_epochs: int,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup_epochs < max_epochs:
            raise KDConfigError(
                f"WarmupCosineLR needs 0 <= warmup_epochs < max_epochs, got {warmup_epochs}, {max_epochs}."
            )
        self.warmup_epochs, self.max_epochs, self.eta_min = warmup_epochs, max_epochs, eta_min
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """Fraction of the way from ``eta_min`` to the base learning rate at scheduler step ``step``."""
        t = min(step + 0.5, float(self.max_epochs))
        if t < self.warmup_epochs:
            return t / self.warmup_epochs
        return 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup_epochs) / (self.max_epochs - self.warmup_epochs)))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        if self.last_epoch < self.warmup_epochs:  # MAE's warm-up starts from 0, not from eta_min
            return [base * f for base in self.base_lrs]
        return [self.eta_min + (base - self.eta_min) * f for base in self.base_lrs]
