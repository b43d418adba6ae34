"""``TeacherLogitCache``: read exact teacher logits per (image, view) instead of running the teacher.

Add it to ``trainer.callbacks`` of a logit-only method (VanillaKD, DKD, ...) on a data module that
numbers its views (CIFAR with ``return_view: true``)::

    trainer:
      callbacks:
        - class_path: kd_lightning.callbacks.TeacherLogitCache
          init_args: {cache_dir: runs/teacher_logits, build: lazy}
    data:
      init_args: {return_view: true}

The training loss then reads the teacher's logits of each batch's ``(index, view)`` rows from
:class:`~kd_lightning.teachers.logit_cache.ViewLogitStore`; validation still runs the teacher (fidelity
metrics). Results equal the online run's within fp16 rounding of the stored logits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from kd_lightning.data.views import ViewSpace
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.tasks.classification import ClassificationDistillation
from kd_lightning.teachers.logit_cache import ViewLogitStore, cache_key, teacher_digest

__all__ = ["TeacherLogitCache"]


def _batch_index_view(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping) and "index" in batch and "view" in batch:
        return batch["index"], batch["view"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 4:
        return batch[2], batch[3]
    raise KDConfigError(
        "TeacherLogitCache needs training batches (x, y, index, view); this batch has none: set "
        "data.init_args.return_view=true (a data module that numbers its augmentation views)."
    )


class TeacherLogitCache(Callback):
    """Serve a frozen teacher's logits from an exact per-(image, view) cache.

    The cache lives in ``cache_dir/<key>/``, ``key`` a fingerprint of the teacher's weights (every
    parameter and buffer), its precision (``teacher_precision``), the training images and targets, and
    the transform (padding, fill, normalisation, view numbering). Any change gives a new folder; an
    existing folder is reused by later runs (other students, methods, seeds) and shared by the DDP
    ranks of one machine (rank 0 creates it, the others wait at a barrier and open it). With several
    machines, give each a local ``cache_dir`` (files on a shared network file system are not coherent).

    The cached path refuses what it cannot represent exactly, with the setting to change: methods
    that need more than the teacher's logits or train their teacher, data without numbered views
    (mixup, CutMix, RandAugment and custom transforms have none), and a teacher in train mode.

    Args:
        cache_dir: parent folder of the caches.
        build: ``"lazy"``: compute the missing rows of each batch with the teacher, store them, use
            them (the first epochs still run the teacher on the new views). ``"full"``: before
            training, compute every (image, view) row missing from the cache in batched teacher
            forwards (sharded over DDP ranks); training then never runs the teacher.
        build_batch_size: images per teacher forward of a full build.
        on_device: also hold the whole cache on the training device (1.6 GB for CIFAR-100) and
            look rows up there, with no host round trip per step. ``None``: on CUDA devices only.
    """

    def __init__(
        self,
        cache_dir: str = "runs/teacher_logits",
        build: Literal["lazy", "full"] = "lazy",
        build_batch_size: int = 1024,
        on_device: bool | None = None,
    ) -> None:
        if build not in ("lazy", "full"):
            raise KDConfigError(f"TeacherLogitCache.build must be 'lazy' or 'full', got {build!r}.")
        if build_batch_size < 1:
            raise KDConfigError(f"TeacherLogitCache.build_batch_size must be >= 1, got {build_batch_size}.")
        self.cache_dir = cache_dir
        self.build = build
        self.build_batch_size = build_batch_size
        self.on_device = on_device
        self.store: ViewLogitStore | None = None
        self.space: ViewSpace | None = None
        self.key: str | None = None
        self.lookups = 0
        self.misses = 0
        self._epoch_lookups = 0
        self._epoch_misses = 0
        self._dev_logits: Tensor | None = None
        self._dev_filled: Tensor | None = None
        self._missing_rows = 0
        self._checked_range = False

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_module(pl_module: L.LightningModule) -> None:
        """Raise :class:`KDConfigError` unless ``pl_module`` can take its teacher logits from a cache."""

        name = type(pl_module).__name__
        if not isinstance(pl_module, ClassificationDistillation) and len(getattr(pl_module, "teachers", ())):
            raise KDConfigError(
                f"TeacherLogitCache serves classification distillation methods; model {name} is not one (its teacher "
                "outputs are not per-image class logits): remove TeacherLogitCache from trainer.callbacks."
            )
        if not isinstance(pl_module, ClassificationDistillation) or not len(getattr(pl_module, "teachers", ())):
            raise KDConfigError(
                f"TeacherLogitCache serves classification distillation methods; model {name} has no teacher: "
                "remove TeacherLogitCache from trainer.callbacks."
            )
        if pl_module.trains_teacher:
            raise KDConfigError(
                f"model {name} trains its teacher (trains_teacher=True): its logits change every step and cannot "
                "be cached. Remove TeacherLogitCache from trainer.callbacks."
            )
        if not pl_module.teacher_logits_only():
            raise KDConfigError(
                f"model {name} overrides training_loss/training_step/teacher_forward (it needs teacher features, "
                "mixes its inputs, or runs the teacher itself), so stored logits cannot replace its teacher. Remove "
                f"TeacherLogitCache from trainer.callbacks (or, if {name}'s training step needs nothing of the "
                "teacher but self.teacher_logits(batch, x), set uses_teacher_logits_only = True on the class)."
            )

    @staticmethod
    def view_space(datamodule: Any) -> ViewSpace:
        """The data module's enumerated views, or a :class:`KDConfigError` saying why there are none."""
        getter = getattr(datamodule, "teacher_view_space", None)
        if getter is None:
            name = type(datamodule).__name__ if datamodule is not None else "no data module"
            raise KDConfigError(
                f"TeacherLogitCache needs a data module that numbers its augmentation views (finite, exact views such "
                f"as CIFAR's crop+flip with data.init_args.return_view=true); {name} does not. Mixup, CutMix, "
                "RandAugment and custom transforms have no finite view space: remove TeacherLogitCache from "
                "trainer.callbacks."
            )
        return getter()

    def _check_teacher_mode(self, pl_module: Any) -> None:
        if pl_module.teacher.training:
            raise KDConfigError(
                f"TeacherLogitCache: the teacher ({type(pl_module.teacher).__name__}) is in train mode, so its outputs "
                "depend on the batch (BatchNorm statistics, dropout) and cannot be cached. Keep it in eval mode (the "
                "default of DistillationModule) or remove TeacherLogitCache from trainer.callbacks."
            )

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_module(pl_module)
        self.space = self.view_space(trainer.datamodule)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        space = self.space if self.space is not None else self.view_space(trainer.datamodule)
        self._check_teacher_mode(pl_module)
        payload = {
            "teacher": teacher_digest(pl_module.teacher),
            "teacher_class": f"{type(pl_module.teacher).__module__}.{type(pl_module.teacher).__qualname__}",
            "teacher_precision": getattr(pl_module, "teacher_precision", None),
            "num_classes": int(pl_module.num_classes),
            "data": space.identity,
        }
        self.key = cache_key(payload)
        folder = Path(self.cache_dir) / self.key
        shape = (space.num_samples, space.num_views, int(pl_module.num_classes))
        if trainer.is_global_zero:
            ViewLogitStore.create(folder, *shape, meta=payload)
        trainer.strategy.barrier("teacher_logit_cache_create")
        self.store = ViewLogitStore(folder)
        views = space.views.numpy()
        if self.build == "full":
            self._build_full(trainer, pl_module, space)
            trainer.strategy.barrier("teacher_logit_cache_build")
        self._missing_rows = self.store.missing(views)
        on_device = self.on_device if self.on_device is not None else pl_module.device.type == "cuda"
        if on_device:
            self._dev_logits = torch.from_numpy(np.array(self.store.logits)).to(pl_module.device)
            self._dev_filled = torch.from_numpy(self.store.filled.astype(bool)).to(pl_module.device)
        self._checked_range = False
        pl_module.attach_teacher_logit_source(self.teacher_logits)
        filled = 1 - self._missing_rows / max(1, space.num_samples * len(views))
        rank_zero_info(f"TeacherLogitCache: {folder} ({filled:.1%} of {space.num_samples}x{len(views)} views filled)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_teacher_mode(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_lookups = 0
        self._epoch_misses = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_lookups:
            rate = 1.0 - self._epoch_misses / self._epoch_lookups
            pl_module.log("train/teacher_cache_hit_rate", rate, on_step=False, on_epoch=True, rank_zero_only=True)
        if self.store is not None and self._epoch_misses:
            self.store.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.store is not None:
            self.store.flush()
        if hasattr(pl_module, "attach_teacher_logit_source"):
            pl_module.attach_teacher_logit_source(None)
        self._dev_logits = self._dev_filled = None

    # ------------------------------------------------------------------ build
    def _build_full(self, trainer: L.Trainer, pl_module: Any, space: ViewSpace) -> None:
        store = self.store
        assert store is not None and space.render is not None
        views = space.views.long()
        mine = np.arange(trainer.global_rank, space.num_samples, trainer.world_size)
        todo_i, todo_v = [], []
        for start in range(0, len(mine), 4096):  # find the missing rows without a [N, V] copy
            rows = mine[start : start + 4096]
            missing = ~store.filled[rows][:, views.numpy()].astype(bool)
            ii, vv = np.nonzero(missing)
            todo_i.append(rows[ii])
            todo_v.append(views.numpy()[vv])
        index = np.concatenate(todo_i) if todo_i else np.empty(0, dtype=np.int64)
        view = np.concatenate(todo_v) if todo_v else np.empty(0, dtype=np.int64)
        total = len(index)
        if total == 0:
            return
        started, reported = time.perf_counter(), 0.0
        rank_zero_info(f"TeacherLogitCache: computing {total} teacher rows on rank 0 (build='full').")
        for start in range(0, total, self.build_batch_size):
            i = torch.from_numpy(index[start : start + self.build_batch_size])
            v = torch.from_numpy(view[start : start + self.build_batch_size])
            x = space.render(i, v, pl_module.device)
            logits = pl_module.teacher_forward(x)
            store.write(i.numpy(), v.numpy(), logits)
            done = min(start + self.build_batch_size, total) / total
            if done - reported >= 0.1 or done == 1.0:
                reported = done
                rank_zero_info(f"TeacherLogitCache: {done:.0%} built ({time.perf_counter() - started:.0f} s)")
        store.flush()

    # ------------------------------------------------------------------ lookups
    def teacher_logits(self, pl_module: Any, batch: Any, x: Tensor) -> Tensor:
        """Teacher logits (float32 ``[B, C]``) of a training batch, filling missing rows with the teacher."""
        self._check_teacher_mode(pl_module)
        store = self.store
        if store is None:
            raise RuntimeError("TeacherLogitCache.teacher_logits called before on_fit_start.")
        index, view = _batch_index_view(batch)
        if self._dev_logits is not None and self._dev_filled is not None:
            out = self._lookup_on_device(pl_module, index, view, x)
        else:
            out = self._lookup_on_host(pl_module, index, view, x)
        self.lookups += len(out)
        self._epoch_lookups += len(out)
        return out.to(torch.float32)

    def _fill(self, pl_module: Any, x: Tensor, miss: Tensor) -> Tensor:
        if self.build == "full":
            rank_zero_info("TeacherLogitCache: rows missing after a full build (a view outside the data's view set?).")
        count = int(miss.sum())
        self.misses += count
        self._epoch_misses += count
        return pl_module.teacher_forward(x[miss.to(x.device)])

    def _lookup_on_host(self, pl_module: Any, index: Tensor, view: Tensor, x: Tensor) -> Tensor:
        store = self.store
        assert store is not None
        i = index.detach().cpu().long().numpy()
        v = view.detach().cpu().long().numpy()
        store.check_rows(i, v)
        filled = store.is_filled(i, v)
        if not filled.all():
            miss = torch.from_numpy(~filled)
            logits = self._fill(pl_module, x, miss)
            store.write(i[~filled], v[~filled], logits)
        return torch.from_numpy(store.read(i, v)).to(x.device)

    def _lookup_on_device(self, pl_module: Any, index: Tensor, view: Tensor, x: Tensor) -> Tensor:
        store, logits, filled = self.store, self._dev_logits, self._dev_filled
        assert store is not None and logits is not None and filled is not None
        i = index.to(logits.device, torch.long, non_blocking=True)
        v = view.to(logits.device, torch.long, non_blocking=True)
        if not self._checked_range:  # one check (and one sync) per fit: later batches come from the same loader
            store.check_rows(i.cpu().numpy(), v.cpu().numpy())
            self._checked_range = True
        if self._missing_rows > 0:
            hit = filled[i, v]
            if not bool(hit.all()):  # one sync per step while the cache still has holes
                miss = ~hit
                new = self._fill(pl_module, x, miss).to(torch.float16).to(logits.device)
                mi, mv = i[miss], v[miss]
                logits[mi, mv] = new
                filled[mi, mv] = True
                store.write(mi.cpu().numpy(), mv.cpu().numpy(), new)
                self._missing_rows -= int(torch.unique(mi * store.num_views + mv).numel())
        return logits[i, v]
