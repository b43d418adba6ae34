"""Contrastive Representation Distillation (Tian, Krishnan, Isola; ICLR 2020; arXiv 1910.10699)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.contrastive import SAMPLING_MODES, CRDLoss, Sampling
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.feature_base import FeatureDistillationModule, default_layers

__all__ = ["CRD"]

_CHECKPOINT_KEY = "kd_crd_memory"


class CRD(FeatureDistillationModule):
    """CRD: ``w_CE·CE + w_CRD·(L_NCE(student → teacher bank) + L_NCE(teacher → student bank)) [+ w_KD·KD]``.

    Each side of the NCE loss contrasts an L2-normalised embedding of the penultimate features with its own
    row of the other network's memory bank (the positive) and ``K`` other rows (the negatives); see
    :mod:`kd_lightning.losses.contrastive` for the formula, ``Z`` and the momentum update. The banks hold one
    row per training sample, so the training data must serve ``(x, y, index)`` batches
    (``data.init_args.return_index: true``); their size ``N`` is the training set's, read at ``setup``.
    Defaults are RepDistiller's CIFAR-100 settings (``-a 0 -b 0.8``: CE 1 + 0.8·CRD, embedding 128,
    K = 16384, τ = 0.07, momentum 0.5, "exact" sampling). The loss, ``Z``, the bank initialisation and update,
    the embedding heads and the "exact" sampler were checked against RepDistiller ``crd/criterion.py``,
    ``crd/memory.py`` and ``CIFAR100InstanceSample``; reimplemented, not copied. Not in the official code
    (RECONSTRUCTION, our choices): the NCE terms in log space; under DDP the gathered update, the banks
    broadcast from rank 0 and ``Z`` averaged over the first batches of all ranks; the last occurrence winning
    when an index repeats within one update; the ``"instance"`` and ``"uniform"`` samplers; and clipping
    ``K`` to ``N − 1``. Where the data module holds samples out of ``train_set`` (``hold_out``), their rows are
    never updated but can still be drawn as negatives.

    Args:
        student_layers: one student module path for the features; default the last of ``feature_stages``
            (``"flatten"``, the pooled features before ``fc``, as RepDistiller's ``feat[-1]``).
        teacher_layers: one teacher module path, same default.
        embed_dim: size of the shared embedding space.
        num_negatives: ``K``, negatives per anchor; clipped to ``N − 1`` with a warning on small data.
        nce_temperature: τ of the scores.
        momentum: μ of the memory update ``m ← normalise(μ·m + (1 − μ)·v)``.
        sampling: ``"exact"`` (official: positive = the sample itself, negatives = distinct samples of other
            classes), ``"instance"`` (any other sample, cheaper, needs no labels) or ``"uniform"`` (any sample,
            cheapest; may draw the positive).
        ce_weight: w_CE, weight of the cross-entropy with the labels.
        crd_weight: w_CRD, weight of the CRD term.
        kd_weight: w_KD, weight of the Hinton KD term (0: off; RepDistiller's "CRD+KD" uses 1).
        kd_temperature: temperature of the KD term.
        num_samples: ``N`` when the Trainer gets plain dataloaders instead of a data module; must match the
            data module's training set otherwise. ``None`` reads it from the data module.
        input_shape, clone_features: see :class:`~kd_lightning.methods.feature_base.FeatureDistillationModule`.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.

    Under DDP every rank keeps identical banks: the update gathers all ranks' indices and embeddings, the
    banks are broadcast from rank 0 once, and they are excluded from DDP's per-step buffer broadcast.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
        embed_dim: int = 128,
        num_negatives: int = 16384,
        nce_temperature: float = 0.07,
        momentum: float = 0.5,
        sampling: Sampling = "exact",
        ce_weight: float = 1.0,
        crd_weight: float = 0.8,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        num_samples: int | None = None,
        input_shape: Sequence[int] | None = None,
        clone_features: bool = False,
        **kwargs: Any,
    ) -> None:
        s_layers = (
            list(student_layers) if student_layers else default_layers(student, "student_layers", slice(-1, None))
        )
        t_layers = (
            list(teacher_layers) if teacher_layers else default_layers(teacher, "teacher_layers", slice(-1, None))
        )
        for field, layers in (("student_layers", s_layers), ("teacher_layers", t_layers)):
            if len(layers) != 1:
                raise KDConfigError(f"model.init_args.{field}: CRD embeds one feature per network, got {layers}.")
        checks = (
            ("embed_dim", embed_dim, embed_dim >= 1, ">= 1"),
            ("num_negatives", num_negatives, num_negatives >= 1, ">= 1"),
            ("nce_temperature", nce_temperature, nce_temperature > 0, "> 0"),
            ("momentum", momentum, 0.0 <= momentum < 1.0, "in [0, 1)"),
            ("sampling", sampling, sampling in SAMPLING_MODES, f"one of {SAMPLING_MODES}"),
            ("kd_temperature", kd_temperature, kd_temperature > 0, "> 0"),
            ("num_samples", num_samples, num_samples is None or num_samples >= 2, ">= 2 or null"),
        )
        for name, value, ok, wanted in checks:
            if not ok:
                raise KDConfigError(f"model.init_args.{name} must be {wanted}, got {value!r}.")
        check_weights(ce_weight=ce_weight, crd_weight=crd_weight, kd_weight=kd_weight)
        super().__init__(
            student, teacher, student_layers=s_layers, teacher_layers=t_layers, clone_features=clone_features, **kwargs
        )
        self.embed_dim = embed_dim
        self.num_negatives = num_negatives
        self.nce_temperature = nce_temperature
        self.momentum = momentum
        self.sampling = sampling
        self.ce_weight = ce_weight
        self.crd_weight = crd_weight
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.num_samples = num_samples
        self.crd: CRDLoss | None = None
        self._indices_checked = False
        if input_shape is not None:
            self.build_from_input(tuple(input_shape))

    # ------------------------------------------------------------------ parts
    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """The two embedding heads (``Linear`` + L2 norm) and ``log Z``; the banks follow at ``setup``."""
        self.crd = CRDLoss(
            student_dim=student_shapes[0].numel(),
            teacher_dim=teacher_shapes[0].numel(),
            embed_dim=self.embed_dim,
            num_negatives=self.num_negatives,
            temperature=self.nce_temperature,
            momentum=self.momentum,
            sampling=self.sampling,
        )

    def _build_memory(self, num_samples: int, labels: Tensor | None) -> None:
        assert self.crd is not None
        self.crd.build_memory(num_samples, labels)
        self.crd.to(self.device)
        # The banks are kept identical across ranks by the update itself: spare DDP their per-step broadcast.
        self._ddp_params_and_buffers_to_ignore = [f"crd.memory.{name}" for name, _ in self.crd.memory.named_buffers()]

    def _training_data(self) -> tuple[int, Tensor | None]:
        """``N`` and, for "exact" sampling, the class of every sample of the training set's index space."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            if self.num_samples is None:
                raise KDConfigError(
                    "CRD's memory banks need the training set size: fit with a data module that serves indices "
                    "(data.init_args.return_index: true) or set model.init_args.num_samples."
                )
            if self.sampling == "exact":
                raise KDConfigError(
                    "model.init_args.sampling='exact' draws negatives from other classes and reads the labels from "
                    "the data module's train_set: fit with a data module, or use sampling: instance."
                )
            return self.num_samples, None
        name = type(datamodule).__name__
        if getattr(datamodule, "return_index", True) is False:
            raise KDConfigError(
                f"CRD keeps one memory row per training sample and needs (x, y, index) batches, but {name} serves no "
                "indices: set data.init_args.return_index: true (--data.init_args.return_index=true)."
            )
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None or not callable(getattr(datamodule, "train_targets", None)):
            raise KDConfigError(
                f"CRD sizes its memory banks from {name}'s train_set, train_index_size() and train_targets() "
                "after setup('fit'): use a kd_lightning KDDataModule."
            )
        n = int(datamodule.train_index_size())
        if self.num_samples is not None and self.num_samples != n:
            raise KDConfigError(
                f"model.init_args.num_samples={self.num_samples} but {name}'s training set has {n} samples: "
                "leave num_samples empty to take the data's."
            )
        labels = datamodule.train_targets() if self.sampling == "exact" else None
        return n, labels

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        n, labels = self._training_data()
        assert self.crd is not None
        if self.crd.memory is None:
            self._build_memory(n, labels)
        elif self.crd.memory.num_samples != n:
            raise KDConfigError(
                f"CRD's memory banks hold {self.crd.memory.num_samples} rows but the training set has {n} samples: "
                "the banks are per sample, so a checkpoint can only continue on the same training set."
            )
        self._indices_checked = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        memory = self.crd.memory if self.crd is not None else None
        if memory is not None:
            checkpoint[_CHECKPOINT_KEY] = {"num_samples": memory.num_samples, "labels": memory.has_labels}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # builds the heads from the stored feature shapes
        info = checkpoint.get(_CHECKPOINT_KEY)
        if info is None or self.crd is None:
            return
        n = int(info["num_samples"])
        if self.crd.memory is None:
            # Placeholder rows and labels of the right size; load_state_dict fills them right after this hook.
            self._build_memory(n, torch.zeros(n, dtype=torch.long) if info["labels"] else None)
        elif self.crd.memory.num_samples != n:
            raise KDConfigError(
                f"the checkpoint's CRD memory has {n} rows but this run's training set has "
                f"{self.crd.memory.num_samples} samples: resume on the same training set."
            )

    # ------------------------------------------------------------------ training
    @staticmethod
    def batch_index(batch: Any) -> Tensor:
        """Dataset indices of a training batch ``(x, y, index)`` or ``{"index": ...}``.

        Raises:
            KDConfigError: the batch carries no indices.
        """
        index = batch.get("index") if isinstance(batch, Mapping) else None
        if index is None and isinstance(batch, (tuple, list)) and len(batch) > 2:
            index = batch[2]
        if not isinstance(index, Tensor) or index.dtype.is_floating_point or index.dim() != 1:
            raise KDConfigError(
                "CRD needs training batches (x, y, index) with integer dataset indices; this batch carries no "
                "indices: set data.init_args.return_index: true (datasets built with return_index=True)."
            )
        return index

    def _check_indices(self, index: Tensor) -> None:
        assert self.crd is not None and self.crd.memory is not None
        n = self.crd.memory.num_samples
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= n:
            raise KDConfigError(
                f"CRD got dataset index {high if high >= n else low} but its memory has {n} rows (0..{n - 1}): "
                "indices must be positions in the training set that sized the memory (model.init_args.num_samples)."
            )
        self._indices_checked = True

    def feature_loss(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        batch: Any,
    ) -> dict[str, Tensor]:
        index = self.batch_index(batch)
        if self.crd is None or self.crd.memory is None:
            raise KDConfigError(
                "CRD's memory banks are built at setup('fit') from the training set: train through a Trainer with "
                "a data module that serves indices (or load a checkpoint of a CRD run)."
            )
        if not self._indices_checked:
            self._check_indices(index)
        crd = self.crd(student_feats[0], teacher_feats[0], index, update=True)["loss"]
        terms = {"ce": label_cross_entropy(student_logits, target), "crd": crd}
        if active(self.kd_weight):
            terms["kd"] = kd_kl_div(student_logits.float(), teacher_logits.float(), self.kd_temperature)
        return weighted_terms(terms, {"ce": self.ce_weight, "crd": self.crd_weight, "kd": self.kd_weight})
