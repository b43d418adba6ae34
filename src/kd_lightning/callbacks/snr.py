"""Evaluation per signal-to-noise ratio for RadioML-style batches ``(x, y, snr)``.

:class:`SNREvaluation` counts, for every SNR of the evaluation data, a confusion matrix of the trained network
(and of the teacher of a distillation module), and at the end of the test (optionally validation) epoch:

* logs ``{stage}/acc_snr_{snr}`` per SNR, ``{stage}/acc_band_{band}`` per SNR band, and the teacher's
  ``{stage}/teacher_acc_snr_{snr}`` / ``{stage}/teacher_acc_band_{band}``;
* writes ``snr_{stage}_accuracy.csv`` (one row per SNR plus ``all``), ``snr_{stage}_confusion.csv`` (confusion
  matrix per band, long format) and ``snr_{stage}_accuracy.png`` (accuracy vs SNR; needs matplotlib, the
  ``plot`` extra — without it only the CSVs are written, with a warning) in the run's log folder.

Counts are summed over DDP ranks (one ``all_gather_object`` of the SNR values seen and one all-reduce of the
counts), so every rank logs the same numbers. As with any metric under a ``DistributedSampler``, frames
duplicated to even out the ranks are counted twice.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = ["SNREvaluation", "SNRSummary", "confusion_by_snr", "summarize_by_snr"]

Stage = Literal["val", "test"]


def confusion_by_snr(preds: Tensor, targets: Tensor, snrs: Tensor, num_classes: int) -> dict[int, Tensor]:
    """Confusion matrices ``{snr: counts[true, pred]}`` (int64, on CPU) of one batch of predictions."""
    preds, targets, snrs = preds.reshape(-1).long(), targets.reshape(-1).long(), snrs.reshape(-1)
    if not preds.shape == targets.shape == snrs.shape:
        raise KDConfigError(
            f"preds, targets and snrs must have one value per frame, got {preds.shape}, {targets.shape}, {snrs.shape}."
        )
    snr_values, snr_index = torch.unique(snrs.long().cpu(), return_inverse=True)
    key = (snr_index * num_classes + targets.cpu()) * num_classes + preds.cpu()
    counts = torch.bincount(key, minlength=len(snr_values) * num_classes * num_classes)
    counts = counts.reshape(len(snr_values), num_classes, num_classes)
    return {int(s): counts[i] for i, s in enumerate(snr_values.tolist())}


def _band_ranges(edges: Sequence[float], names: Sequence[str]) -> list[tuple[str, float, float]]:
    bounds = [-math.inf, *edges, math.inf]
    return [(name, bounds[i], bounds[i + 1]) for i, name in enumerate(names)]


@dataclass
class SNRSummary:
    """Accuracy per SNR and confusion matrices per SNR band of one network on one evaluation stage.

    Attributes:
        snrs: SNR values, ascending.
        frames: frames per SNR.
        accuracy: accuracy per SNR (``nan`` where no frame).
        overall: accuracy over all frames (all SNRs).
        bands: ``{band: (low, high)}``: band ``b`` holds ``low <= snr < high``.
        band_accuracy: accuracy per band (``nan`` when empty).
        band_confusion: ``{band: counts[true, pred]}``.
        confusion: ``{snr: counts[true, pred]}``.
    """

    snrs: list[int]
    frames: list[int]
    accuracy: list[float]
    overall: float
    bands: dict[str, tuple[float, float]] = field(default_factory=dict)
    band_accuracy: dict[str, float] = field(default_factory=dict)
    band_confusion: dict[str, Tensor] = field(default_factory=dict)
    confusion: dict[int, Tensor] = field(default_factory=dict)


def _accuracy(matrix: Tensor) -> float:
    total = int(matrix.sum())
    return float(matrix.diagonal().sum()) / total if total else float("nan")


def summarize_by_snr(
    confusion: Mapping[int, Tensor],
    band_edges: Sequence[float] = (-4.0, 10.0),
    band_names: Sequence[str] = ("low", "mid", "high"),
) -> SNRSummary:
    """Accuracy per SNR, overall and per band from ``{snr: confusion}`` (see :class:`SNRSummary`)."""
    if len(band_names) != len(band_edges) + 1:
        raise KDConfigError(
            f"band_names needs len(band_edges) + 1 = {len(band_edges) + 1} names, got {list(band_names)}."
        )
    snrs = sorted(confusion)
    if not snrs:
        return SNRSummary([], [], [], float("nan"))
    k = next(iter(confusion.values())).shape[0]
    total = torch.zeros(k, k, dtype=torch.long)
    for matrix in confusion.values():
        total += matrix.cpu()
    bands = _band_ranges(band_edges, band_names)
    band_confusion = {}
    for name, low, high in bands:
        matrix = torch.zeros(k, k, dtype=torch.long)
        for s in snrs:
            if low <= s < high:
                matrix += confusion[s].cpu()
        band_confusion[name] = matrix
    return SNRSummary(
        snrs=snrs,
        frames=[int(confusion[s].sum()) for s in snrs],
        accuracy=[_accuracy(confusion[s]) for s in snrs],
        overall=_accuracy(total),
        bands={name: (low, high) for name, low, high in bands},
        band_accuracy={name: _accuracy(m) for name, m in band_confusion.items()},
        band_confusion=band_confusion,
        confusion={s: confusion[s].cpu() for s in snrs},
    )


class SNREvaluation(Callback):
    """Accuracy per SNR, per SNR band and confusion matrices per band, for the network and the teacher.

    Reads the SNR from ``batch[snr_index]`` of every evaluation batch and runs the network (and the teacher
    of a distillation module, ``pl_module.teacher``) once more on ``batch[0]`` without gradients: one extra
    forward per evaluation batch. See the module docstring for what is logged and written.

    Args:
        stages: evaluation stages to measure: ``"test"`` and/or ``"val"`` (validation every epoch; the
            sanity check is skipped).
        band_edges: SNR band boundaries in dB; band ``i`` holds ``edges[i-1] <= snr < edges[i]``. The default
            gives low < −4 dB, −4 <= mid < 10, high >= 10 dB.
        band_names: one name per band (``len(band_edges) + 1``).
        include_teacher: also evaluate ``pl_module.teacher`` when the module has one.
        dirpath: where to write the CSV/PNG files; ``None`` = the trainer's ``log_dir`` (else
            ``default_root_dir``).
        plot: write the PNG plot (needs matplotlib).
        snr_index: position of the SNR in the batch tuple.
    """

    def __init__(
        self,
        stages: Sequence[Stage] = ("test",),
        band_edges: Sequence[float] = (-4.0, 10.0),
        band_names: Sequence[str] = ("low", "mid", "high"),
        include_teacher: bool = True,
        dirpath: str | None = None,
        plot: bool = True,
        snr_index: int = 2,
    ) -> None:
        super().__init__()
        bad = [s for s in stages if s not in ("val", "test")]
        if bad:
            raise KDConfigError(f"SNREvaluation stages must be 'val' and/or 'test', got {list(stages)}.")
        if len(band_names) != len(band_edges) + 1:
            raise KDConfigError(
                f"SNREvaluation band_names needs len(band_edges) + 1 = {len(band_edges) + 1} names, "
                f"got {list(band_names)}."
            )
        if list(band_edges) != sorted(band_edges):
            raise KDConfigError(f"SNREvaluation band_edges must be ascending, got {list(band_edges)}.")
        self.stages = tuple(stages)
        self.band_edges = tuple(float(e) for e in band_edges)
        self.band_names = tuple(band_names)
        self.include_teacher = include_teacher
        self.dirpath = dirpath
        self.plot = plot
        self.snr_index = snr_index
        self._counts: dict[str, dict[str, dict[int, Tensor]]] = {}
        self._warned_no_snr = False
        #: ``{stage: {"student": SNRSummary, "teacher": SNRSummary}}`` after each measured epoch (every rank).
        self.results: dict[str, dict[str, SNRSummary]] = {}
        #: files written by the last measured epoch, per stage (rank 0).
        self.files: dict[str, list[Path]] = {}

    # ------------------------------------------------------------------ accumulation
    def _active(self, trainer: L.Trainer, stage: Stage) -> bool:
        return stage in self.stages and not (stage == "val" and trainer.sanity_checking)

    def _networks(self, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        networks: dict[str, nn.Module] = {"student": pl_module}
        teacher = getattr(pl_module, "teacher", None)
        if self.include_teacher and isinstance(teacher, nn.Module):
            networks["teacher"] = teacher
        return networks

    def _reset(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if self._active(trainer, stage):
            self._counts[stage] = {name: {} for name in self._networks(pl_module)}

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, stage: Stage) -> None:
        if not self._active(trainer, stage) or stage not in self._counts:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) <= self.snr_index:
            if not self._warned_no_snr:
                warnings.warn(
                    f"SNREvaluation: the {stage} batches carry no SNR at position {self.snr_index} "
                    "(expected (x, y, snr) batches, as RadioMLDataModule yields); nothing is measured.",
                    stacklevel=2,
                )
                self._warned_no_snr = True
            return
        x, y, snr = batch[0], batch[1], batch[self.snr_index]
        # The step's precision context (autocast), so that predictions match the step's own metrics.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for name, network in self._networks(pl_module).items():
                logits = network(x)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                counts = self._counts[stage][name]
                for s, matrix in confusion_by_snr(logits.argmax(-1), y, snr, logits.shape[-1]).items():
                    counts[s] = counts[s] + matrix if s in counts else matrix

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module, "test")

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, batch, "val")

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, batch, "test")

    # ------------------------------------------------------------------ epoch end
    @staticmethod
    def _sync(trainer: L.Trainer, device: torch.device, local: dict[int, Tensor]) -> dict[int, Tensor]:
        """Sum ``{snr: confusion}`` over DDP ranks (ranks may have seen different SNRs)."""
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        snrs = sorted(local)
        num_classes = next(iter(local.values())).shape[0] if local else None
        if distributed:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (snrs, num_classes))
            snrs = sorted({s for seen, _ in gathered for s in seen})
            num_classes = next((k for _, k in gathered if k is not None), None)
        if num_classes is None:
            return {}
        dense = torch.zeros(len(snrs), num_classes, num_classes, dtype=torch.long)
        for i, s in enumerate(snrs):
            if s in local:
                dense[i] = local[s]
        if distributed:
            dense = trainer.strategy.reduce(dense.to(device), reduce_op="sum").cpu()
        return {s: dense[i] for i, s in enumerate(snrs)}

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        if not self._active(trainer, stage) or stage not in self._counts:
            return
        summaries = {}
        for name, local in self._counts.pop(stage).items():
            summary = summarize_by_snr(self._sync(trainer, pl_module.device, local), self.band_edges, self.band_names)
            if not summary.snrs:
                continue
            summaries[name] = summary
            prefix = f"{stage}/" + ("" if name == "student" else f"{name}_")
            for s, acc in zip(summary.snrs, summary.accuracy):
                pl_module.log(f"{prefix}acc_snr_{s}", acc, sync_dist=True)
            for band, acc in summary.band_accuracy.items():
                if not math.isnan(acc):
                    pl_module.log(f"{prefix}acc_band_{band}", acc, sync_dist=True)
        self.results[stage] = summaries
        directory = self._directory(trainer)  # every rank: log_dir may be a collective
        if summaries and trainer.is_global_zero:
            classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
            self.files[stage] = self.write(summaries, directory, stage, classes)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    # ------------------------------------------------------------------ files
    def _directory(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        log_dir = trainer.log_dir
        return Path(log_dir if log_dir is not None else trainer.default_root_dir)

    def write(
        self,
        summaries: Mapping[str, SNRSummary],
        directory: str | Path,
        stage: str,
        classes: Sequence[str] | None = None,
    ) -> list[Path]:
        """Write the CSVs (and the PNG when ``plot`` and matplotlib allow) for one stage; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = list(summaries)
        first = summaries[names[0]]
        accuracy_csv = directory / f"snr_{stage}_accuracy.csv"
        with accuracy_csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["snr", "frames", *(f"{n}_acc" for n in names)])
            for i, s in enumerate(first.snrs):
                writer.writerow([s, first.frames[i], *(_fmt(summaries[n].accuracy[i]) for n in names)])
            writer.writerow(["all", sum(first.frames), *(_fmt(summaries[n].overall) for n in names)])
            for band, (low, high) in first.bands.items():
                frames = int(first.band_confusion[band].sum())
                writer.writerow(
                    [f"band:{band}[{low:g},{high:g})", frames, *(_fmt(summaries[n].band_accuracy[band]) for n in names)]
                )
        confusion_csv = directory / f"snr_{stage}_confusion.csv"
        with confusion_csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["network", "band", "true", "pred", "count"])
            for name in names:
                for band, matrix in summaries[name].band_confusion.items():
                    k = matrix.shape[0]
                    labels = list(classes) if classes is not None and len(classes) == k else list(range(k))
                    for t in range(k):
                        for p in range(k):
                            writer.writerow([name, band, labels[t], labels[p], int(matrix[t, p])])
        files = [accuracy_csv, confusion_csv]
        if self.plot:
            png = self._plot(summaries, directory / f"snr_{stage}_accuracy.png", stage)
            if png is not None:
                files.append(png)
        return files

    @staticmethod
    def _plot(summaries: Mapping[str, SNRSummary], path: Path, stage: str) -> Path | None:
        try:
            from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
        except ImportError:
            warnings.warn(
                "SNREvaluation: matplotlib is not installed (pip install 'kd-lightning[plot]'); "
                f"wrote the CSVs but not {path.name}.",
                stacklevel=2,
            )
            return None
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, summary in summaries.items():
            label = f"{name} ({100 * summary.overall:.1f}% overall)"
            ax.plot(summary.snrs, [100 * a for a in summary.accuracy], marker="o", label=label)
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{stage} accuracy vs SNR")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
