"""The scheduled-loss protocol: warm-ups, ramps and adaptive schedules driven by training progress.

A loss that changes over training (DKD's warm-up, SinKD's temperature annealing, TAID's interpolation
coefficient, AdaKD's selection ratio) subclasses :class:`ScheduledLoss`. The distillation core finds
every such submodule of a method and

- calls :meth:`~ScheduledLoss.set_progress` before each training step (epoch, optimizer step, fraction
  of the run),
- calls :meth:`~ScheduledLoss.step_schedule` once per optimizer step, after the backward pass (not once
  per micro-batch under gradient accumulation), for schedules that move with the loss,
- logs :meth:`~ScheduledLoss.schedule_stats` as ``train/<name>``.

No method hand-writes a schedule. Outside a Trainer, call them yourself (or never: a loss with no
progress set behaves as at the end of its warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kd_lightning.errors import KDConfigError

__all__ = ["Progress", "ScheduledLoss"]


@dataclass(frozen=True)
class Progress:
    """Where training is.

    Attributes:
        epoch: the current epoch, counted from 0.
        step: optimizer steps completed.
        fraction: ``step / total optimizer steps`` in ``[0, 1]``; ``None`` when the run has no known length.
        max_epochs: the run's epoch budget, ``None`` when unknown.
    """

    epoch: int = 0
    step: int = 0
    fraction: float | None = None
    max_epochs: int | None = None


class ScheduledLoss:
    """Mixin for losses with a schedule (use with ``nn.Module``). See the module docstring.

    Attributes:
        needs_run_length: the schedule reads ``Progress.fraction``: the run must have a known length.
    """

    needs_run_length: bool = False
    progress: Progress | None = None

    def set_progress(self, progress: Progress) -> None:
        """Before each training step: remember where training is."""
        if self.needs_run_length and progress.fraction is None:
            raise KDConfigError(
                "trainer.max_epochs",
                f"{type(self).__name__} schedules over the whole run and needs its length",
                "set trainer.max_epochs or trainer.max_steps",
            )
        self.progress = progress

    def step_schedule(self, progress: Progress) -> None:
        """Once per optimizer step, after backward: move an adaptive schedule (default: nothing)."""

    def schedule_stats(self) -> dict[str, float | Tensor]:
        """Values to log each training step as ``train/<name>`` (default: none)."""
        return {}
