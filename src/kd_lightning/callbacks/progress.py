"""Compact progress: :class:`EpochSummary` prints one line per epoch; :func:`quiet_lightning` mutes Lightning's chatter.

``EpochSummary`` replaces Lightning's progress bar where a bar is noise (short CPU runs, notebooks, logs)::

    VanillaKD: student SmallCNN (1.4 K params), teacher SmallCNN (94.2 K params); 30 epochs x 17 steps on cpu
    epoch  1/30  loss 1.412  val acc 71.2%  agreement 70.1%  (0.6 s)
    ...

In a config::

    trainer:
      enable_progress_bar: false
      callbacks:
        - class_path: EpochSummary
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

__all__ = ["EpochSummary", "format_epoch_line", "quiet_lightning", "summaries"]

#: Loggers of Lightning's info lines ("GPU available: ...", "TPU available: ...", "💡 Tip: ... litlogger",
#: "Seed set to 0", "`Trainer.fit` stopped", "Restoring states from the checkpoint ..."). Their warnings are
#: Python warnings, not log records: muting these loggers hides no warning.
LIGHTNING_INFO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.utilities.seed",
)


@contextlib.contextmanager
def quiet_lightning(level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, Lightning's info lines are not printed (their loggers' level is ``level``); restored after."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


def format_epoch_line(
    epoch: int,
    max_epochs: int | None,
    metrics: dict[str, float],
    seconds: float,
    prefix: str = "",
) -> str:
    """``[prefix ]epoch  3/30  loss 0.412  val acc 91.2%  agreement 90.1%  (1.2 s)``.

    Args:
        epoch: the epoch just finished, counted from 1.
        max_epochs: the run's epochs (``None`` or ``-1``: unknown, printed without ``/N``).
        metrics: ``loss`` (training loss of the epoch) and the validation metrics ``val acc``, ``val ppl``,
            ``val loss``, ``agreement`` (with the teacher); absent ones are left out. Accuracies and the
            agreement are fractions, printed as percentages.
        seconds: wall time of the epoch (training and validation).
        prefix: put first (e.g. ``teacher``).
    """
    width = len(str(max_epochs)) if max_epochs and max_epochs > 0 else 1
    total = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    parts = [f"{prefix + ' ' if prefix else ''}epoch {epoch:>{width}}{total}"]
    for name in ("loss", "val acc", "val ppl", "val loss", "agreement"):
        value = metrics.get(name)
        if value is None:
            continue
        if name in ("val acc", "agreement"):
            parts.append(f"{name} {100 * value:.1f}%")
        elif name == "val ppl":
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.3f}")
    parts.append(f"({seconds:.1f} s)")
    return "  ".join(parts)


def _scalar(metrics: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = metrics.get(name)
        if value is not None and getattr(value, "numel", lambda: 1)() == 1:
            return float(value)
    return None


class EpochSummary(Callback):
    """One line per training epoch, on global rank 0 only (a compact alternative to the progress bar).

    Prints a header when training starts (method, networks and their parameter counts, epochs, steps per
    epoch, device), then after each epoch the epoch's mean training loss, the validation accuracy (or
    perplexity, or loss) and the agreement with the teacher when measured, and the epoch's wall time.
    Validation metrics appear only on epochs that ran validation.

    Args:
        prefix: word put before every line (the kd CLI uses ``teacher`` for a teacher it trains).
        header: print the header line when training starts.
        stream: where to print (default: standard output).
    """

    def __init__(self, prefix: str = "", header: bool = True, stream: TextIO | None = None) -> None:
        self.prefix = prefix
        self.header = header
        self.stream = stream
        self._started = 0.0
        self._validated = False

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, file=self.stream or sys.stdout, flush=True)

    def header_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``VanillaKD: student SmallCNN (1.4 K params), teacher SmallCNN (94.2 K params); 30 epochs x 17 steps on
        cpu``."""
        networks = []
        student = getattr(pl_module, "student", None)
        teachers = getattr(pl_module, "teachers", None)
        if student is not None:
            role = "student" if teachers is not None and len(teachers) else "model"
            networks.append(f"{role} {_describe(student)}")
        for name, teacher in teachers.items() if teachers is not None else ():
            networks.append(f"{name} {_describe(teacher)}")
        if not networks:
            networks.append(_describe(pl_module))
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        steps = trainer.num_training_batches
        length = f"{epochs} epochs" if epochs else f"{trainer.max_steps} steps"
        if isinstance(steps, int) and epochs:
            length += f" x {steps} steps"
        device = trainer.strategy.root_device.type
        devices = f"{trainer.world_size} x {device}" if trainer.world_size > 1 else device
        head = f"{self.prefix}: " if self.prefix else ""
        return f"{head}{type(pl_module).__name__}: {', '.join(networks)}; {length} on {devices}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.header:
            self._print(trainer, self.header_line(trainer, pl_module))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def epoch_metrics(self, trainer: L.Trainer) -> dict[str, float]:
        """The values the epoch's line shows (see :func:`format_epoch_line`)."""
        metrics = dict(trainer.callback_metrics)
        values = {"loss": _scalar(metrics, "train/loss_epoch", "train/loss")}
        if self._validated:
            values["val acc"] = _scalar(metrics, "val/acc")
            values["val ppl"] = _scalar(metrics, "val/ppl")
            if values["val acc"] is None and values["val ppl"] is None:
                values["val loss"] = _scalar(metrics, "val/loss")
            values["agreement"] = _scalar(metrics, "val/agreement")
        return {k: v for k, v in values.items() if v is not None}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        line = format_epoch_line(
            trainer.current_epoch + 1,
            trainer.max_epochs,
            self.epoch_metrics(trainer),
            time.perf_counter() - self._started,
            self.prefix,
        )
        self._print(trainer, line)


def _describe(module: Any) -> str:
    count = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else 0
    return f"{type(module).__name__} ({get_human_readable_count(count).strip()} params)"


def summaries(callbacks: Sequence[Callback]) -> list[EpochSummary]:
    """The :class:`EpochSummary` callbacks among ``callbacks``."""
    return [c for c in callbacks if isinstance(c, EpochSummary)]
