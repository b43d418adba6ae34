"""Learning-rate schedules that torch lacks (usable as ``lr_scheduler`` class paths in configs)."""

from __future__ import annotations

import math

import torch

from kd_lightning.errors import KDConfigError

__all__ = ["WarmupCosineLR", "WarmupMultiStepLR"]


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


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """MMDetection's detection schedule: linear warm-up, then step decay at fixed milestones.

    ``lr(t) = base·(r + (1 − r)·t/W)`` for ``t < W`` (``r = warmup_ratio``), then ``base·γ^k`` with ``k`` the
    number of milestones ``≤ t``. With ``lr_scheduler_interval: step`` the units are iterations, as mmdet's
    ``warmup='linear', warmup_iters=500, warmup_ratio=0.001`` with ``step=[8, 11]`` (1x) or ``[16, 22]`` (2x)
    epochs converted to iterations.

    Args:
        optimizer: the optimiser.
        milestones: scheduler steps at which the rate is multiplied by ``gamma`` (increasing).
        gamma: decay factor.
        warmup_steps: ``W``, steps of linear warm-up (0: none).
        warmup_ratio: ``r``, the starting fraction of the base rate.
        last_epoch: as in torch schedulers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: list[int],
        gamma: float = 0.1,
        warmup_steps: int = 500,
        warmup_ratio: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones) or any(m < 0 for m in milestones):
            raise KDConfigError("milestones", f"must be increasing non-negative steps, got {list(milestones)}")
        if warmup_steps < 0 or not 0 < warmup_ratio <= 1:
            raise KDConfigError(
                "warmup_steps", f"needs warmup_steps >= 0 and 0 < warmup_ratio <= 1, got {warmup_steps}, {warmup_ratio}"
            )
        self.milestones, self.gamma = list(milestones), gamma
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at scheduler step ``step``."""
        decay = self.gamma ** sum(step >= m for m in self.milestones)
        if step < self.warmup_steps:
            return decay * (self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup_steps)
        return decay

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
