"""DHO: Dual-Head Optimization for semi-supervised distillation (Kang, Lee, Jang, Hwang; arXiv 2505.07675, 2025)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.dho import (
    DHO_ALPHA_GRID,
    DHO_BETA_GRID,
    DHO_LOSS_PRESETS,
    DHOLoss,
    check_mixing,
    mix_heads,
    mixed_log_probs,
    search_mixing,
)
from kd_lightning.losses.terms import active
from kd_lightning.methods.core import describe
from kd_lightning.methods.tasks.classification import ClassificationDistillation, regime_parts
from kd_lightning.models.taps import FeatureTaps, UnknownModuleError

__all__ = ["DHO"]

_HEADS = ("ce_head", "kd_head")


class DHO(ClassificationDistillation):
    """Dual-Head Optimization: a CE head and a KD head on one student backbone, mixed at inference.

    The student's last ``nn.Linear`` (``head``, e.g. SmallCNN's ``fc``) is the CE head; a second ``nn.Linear``
    of the same shape, the KD head (a part of this module: ``kd_head``), reads the same feature (the input of
    ``head``). The backbone runs once per input and feeds both heads. Training (official ``erjui/DHO``)::

        L = w_CE·CE(z^CE(x_l), y_l) + w_KDl·τ²·KL(p_T^τ(x_l) ‖ p_KD^τ(x_l)) + w_KDu·τ²·KL(p_T^τ(x_u) ‖ p_KD^τ(x_u))

    so CE reaches only the CE head and the backbone, KD only the KD head and the backbone. ``loss_weights``
    picks the official weights: ``"few_shot"`` (``train_others.py``: 0.5, 0.5, 0.5) or ``"imagenet"``
    (``train_imgnet_semi.py``: 1, 1, 1); ``ce_weight``/``kd_labeled_weight``/``kd_unlabeled_weight`` override.

    Inference mixes the heads in probability space, ``p = α·softmax(z^CE) + (1 − α)·softmax(z^KD/β)``;
    :meth:`forward` returns ``log p`` (so validation/test accuracy and cross-entropy apply unchanged) and
    ``predict_step`` returns ``p``. ``α`` and ``β`` are buffers (``mix_alpha``, ``mix_beta``), saved in
    checkpoints. With ``mixing="search"`` each validation pass (and ``kd validate``) collects both heads'
    logits of the whole validation split (all DDP ranks), grid-searches ``(α, β)`` on them
    (:func:`~kd_lightning.losses.dho.search_mixing`) and stores the best pair; the test split and
    ``predict`` only read the stored pair. ``mixing="fixed"`` keeps ``alpha``/``beta`` (the ImageNet code's
    0.5, 0.5). ``dual_head=False`` is the single-head ablation: the same three losses on the student's own
    head, inference with that head alone.

    Logged: ``train/{loss,ce,kd_labeled,kd_unlabeled}``; ``train/acc`` (mixed prediction with the stored
    ``(α, β)`` on the labeled part); ``{val,test}/acc_ce_head``, ``{val,test}/acc_kd_head``, ``val/mix_alpha``,
    ``val/mix_beta`` and, when searching, ``val/acc_mixed_searched`` (the best grid point's accuracy on the
    gathered validation split).

    RECONSTRUCTION (choices the official code does not settle, each an argument or stated here):

    - ``val/acc``, ``val/loss`` and the fidelity metrics of a validation pass use the ``(α, β)`` found *on that
      pass* (the official code selects its best epoch by this searched validation accuracy; a checkpoint
      monitoring ``val/acc`` thus holds the pair it was scored with). The sanity-check pass does not search.
    - ``forward_parts="separate"`` runs the labeled and the unlabeled batch through the student in two
      forwards, as the official code does (BatchNorm statistics per part); ``"joint"`` runs their
      concatenation once. The teacher always runs once on the concatenation (frozen, eval mode).
    - ``kd_head_init="fresh"``: a newly initialised KD head (official ResNet/MobileNet students: two fresh
      ``nn.Linear``); ``"copy"``: a copy of the CE head (the CLIP-ViT students start both heads from the same
      zero-shot classifier).
    - ``kd_feature_scale``: the KD head reads ``scale · f/‖f‖`` (official CLIP-ViT students: 100) instead of
      ``f``; ``None`` (default, ResNet path) keeps the raw feature.
    - ``alpha``/``beta`` are also the stored pair before the first search; search ties: see ``search_mixing``.

    Args:
        student: the classifier; its ``head`` must be an ``nn.Linear`` whose output is the logits.
        teacher: the frozen teacher (logits; the paper's is a CLIP zero-/few-shot classifier).
        temperature: τ of both KD terms (official: 2).
        loss_weights: ``"few_shot"`` or ``"imagenet"`` (see above).
        ce_weight: w_CE; ``None``: the preset's.
        kd_labeled_weight: w_KDl; ``None``: the preset's.
        kd_unlabeled_weight: w_KDu; ``None``: the preset's.
        head: module path of the student's classifier layer (the CE head).
        kd_head_init: ``"fresh"`` or ``"copy"``.
        kd_feature_scale: see above.
        dual_head: ``False`` for the single-head ablation.
        mixing: ``"search"`` or ``"fixed"``.
        alpha: α, the CE head's weight in the mixture (in [0, 1]).
        beta: β, the KD head's inference temperature (> 0).
        alpha_grid: α values searched (official: 0, 0.05, …, 1).
        beta_grid: β values searched (official: 0.5, 0.75, 1, 1.25, 1.5, 2, 4).
        forward_parts: ``"separate"`` or ``"joint"`` (see above).
        **kwargs: the arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    data_regimes: ClassVar[frozenset[str]] = frozenset({"semi_supervised"})
    uses_teacher_logits_only: ClassVar[bool | None] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 2.0,
        loss_weights: str = "few_shot",
        ce_weight: float | None = None,
        kd_labeled_weight: float | None = None,
        kd_unlabeled_weight: float | None = None,
        head: str = "fc",
        kd_head_init: str = "fresh",
        kd_feature_scale: float | None = None,
        dual_head: bool = True,
        mixing: str = "search",
        alpha: float = 0.5,
        beta: float = 0.5,
        alpha_grid: Sequence[float] = DHO_ALPHA_GRID,
        beta_grid: Sequence[float] = DHO_BETA_GRID,
        forward_parts: str = "separate",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_temperature(temperature)
        if loss_weights not in DHO_LOSS_PRESETS:
            raise KDConfigError(
                "loss_weights",
                f"must be one of {sorted(DHO_LOSS_PRESETS)}, got {loss_weights!r}",
                "few_shot: 0.5/0.5/0.5",
            )
        preset = DHO_LOSS_PRESETS[loss_weights]
        weights = [
            preset[i] if w is None else w for i, w in enumerate((ce_weight, kd_labeled_weight, kd_unlabeled_weight))
        ]
        self.criterion = DHOLoss(temperature, *weights)  # checks the weights
        for name, value, choices in (
            ("kd_head_init", kd_head_init, ("fresh", "copy")),
            ("mixing", mixing, ("search", "fixed")),
            ("forward_parts", forward_parts, ("separate", "joint")),
        ):
            if value not in choices:
                raise KDConfigError(name, f"must be one of {list(choices)}, got {value!r}")
        if kd_feature_scale is not None:
            check_temperature(kd_feature_scale, "kd_feature_scale")
        check_mixing(alpha, beta)
        self.alpha_grid, self.beta_grid = [float(a) for a in alpha_grid], [float(b) for b in beta_grid]
        for field, grid in (("alpha_grid", self.alpha_grid), ("beta_grid", self.beta_grid)):
            if not grid:
                raise KDConfigError(field, "is empty", "give at least one value")
        for value in self.alpha_grid:
            check_mixing(value, 1.0, alpha_field="alpha_grid")
        for value in self.beta_grid:
            check_mixing(0.0, value, beta_field="beta_grid")
        self.temperature = temperature
        self.head = head
        self.dual_head = dual_head
        self.mixing = mixing
        self.forward_parts = forward_parts
        self.kd_feature_scale = kd_feature_scale
        self.kd_head: nn.Linear | None = None
        self.taps: FeatureTaps | None = None
        self._val_outputs: list[tuple[Tensor, ...]] = []
        if dual_head:
            ce_head = self._ce_head(student, head)
            self.kd_head = copy.deepcopy(ce_head) if kd_head_init == "copy" else self._fresh_like(ce_head)
            self.taps = FeatureTaps(student, [f"{head}:input", head], transient=True)
            self.register_buffer("mix_alpha", torch.tensor(float(alpha)))
            self.register_buffer("mix_beta", torch.tensor(float(beta)))

    @staticmethod
    def _ce_head(student: nn.Module, head: str) -> nn.Linear:
        try:
            FeatureTaps(student, [head], transient=True)  # resolves the path (close matches if unknown); no hooks
        except UnknownModuleError as err:
            raise KDConfigError("head", str(err), "name the student's classifier layer") from None
        module = student.get_submodule(head)
        if not isinstance(module, nn.Linear):
            raise KDConfigError(
                "head",
                f"{describe(student)}.{head} is a {describe(module)}, not an nn.Linear",
                "name the student's last Linear layer (the CE head; the KD head copies its shape)",
            )
        return module

    @staticmethod
    def _fresh_like(layer: nn.Linear) -> nn.Linear:
        fresh = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        return fresh.to(device=layer.weight.device, dtype=layer.weight.dtype)

    # ------------------------------------------------------------------ forward passes
    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z^CE, z^KD)`` from one backbone forward (single head: the student's logits twice)."""
        if not self.dual_head:
            logits = self.student(x)
            return logits, logits
        assert self.taps is not None and self.kd_head is not None
        _, feats = self.taps(x)
        feature = feats[f"{self.head}:input"]
        if self.kd_feature_scale is not None:
            feature = self.kd_feature_scale * F.normalize(feature, dim=-1)
        return feats[self.head], self.kd_head(feature)

    def forward(self, x: Tensor) -> Tensor:
        """``log p(y|x)`` of the mixed heads with the stored ``(α, β)`` (single head: its logits)."""
        if not self.dual_head:
            return self.student(x)
        z_ce, z_kd = self.heads(x)
        return mixed_log_probs(z_ce, z_kd, self.mix_alpha, self.mix_beta)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities: the stored mixture of the heads (single head: its softmax)."""
        x = self.inputs_of(batch)
        if not self.dual_head:
            return self.student(x).float().softmax(-1)
        z_ce, z_kd = self.heads(x)
        return mix_heads(z_ce, z_kd, self.mix_alpha, self.mix_beta)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        labeled, unlabeled = regime_parts(batch)
        if labeled is None:
            raise KDConfigError("data", "DHO's training batches need a labeled part", "use SemiSupervisedDataModule")
        x_l, y = labeled
        self.check_targets(y)
        crit = self.criterion
        x_u = unlabeled[0] if unlabeled is not None and active(crit.kd_unlabeled_weight) else None
        n_l = x_l.shape[0]
        teacher_l = teacher_u = None
        teacher_parts = ([x_l] if active(crit.kd_labeled_weight) else []) + ([x_u] if x_u is not None else [])
        if teacher_parts:
            t = self.teacher_forward(torch.cat(teacher_parts) if len(teacher_parts) > 1 else teacher_parts[0])
            if active(crit.kd_labeled_weight):
                teacher_l, teacher_u = t[:n_l], (t[n_l:] if x_u is not None else None)
            else:
                teacher_u = t
        z_kd_u = None
        if x_u is not None and self.forward_parts == "joint":
            z_ce, z_kd = self.heads(torch.cat((x_l, x_u)))
            z_ce_l, z_kd_l, z_kd_u = z_ce[:n_l], z_kd[:n_l], z_kd[n_l:]
        else:
            z_ce_l, z_kd_l = self.heads(x_l)
            if x_u is not None:
                z_kd_u = self.heads(x_u)[1]
        terms = crit(z_ce_l, y, z_kd_l, teacher_l, z_kd_u, teacher_u)
        return terms, self._prediction(z_ce_l.detach(), z_kd_l.detach()), y

    def _prediction(self, z_ce: Tensor, z_kd: Tensor) -> Tensor:
        if not self.dual_head:
            return z_ce
        return mixed_log_probs(z_ce, z_kd, self.mix_alpha, self.mix_beta)

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self) -> None:
        super().build_metrics()
        if self.dual_head:
            n = int(self.num_classes)
            for stage in ("val", "test"):
                for name in _HEADS:
                    self.metrics[f"{stage}_acc_{name}"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        if not self.dual_head:
            super().evaluate(batch, batch_idx, stage)
            return
        x, y = self.unpack(batch)
        z_ce, z_kd = self.heads(x)
        if stage != "val":  # test: the stored (α, β), never a search
            self.eval_extra(x, y, self._report(stage, y, z_ce, z_kd), stage)
            return
        teacher = self.run_teacher(x).float() if self.fidelity else None
        self._val_outputs.append((z_ce.detach().float(), z_kd.detach().float(), y, teacher))

    def _report(self, stage: str, y: Tensor, z_ce: Tensor, z_kd: Tensor) -> Tensor:
        """Log loss, accuracies and per-head accuracies of the mixed prediction; return its log-probabilities."""
        log_p = self._prediction(z_ce, z_kd)
        flat, flat_y = log_p.reshape(-1, log_p.shape[-1]), y.reshape(-1)
        batch_size = flat_y.shape[0]
        self.log(f"{stage}/loss", F.nll_loss(flat, flat_y), batch_size=batch_size, sync_dist=True)
        for name in (f"{stage}_acc", f"{stage}_acc_top{self.top_k}"):
            self.metrics[name].update(flat, flat_y)
            self.log(name.replace("_", "/", 1), self.metrics[name], batch_size=batch_size, prog_bar=True)
        for name, z in zip(_HEADS, (z_ce, z_kd), strict=True):
            metric = self.metrics[f"{stage}_acc_{name}"]
            metric.update(z.reshape(-1, z.shape[-1]), flat_y)
            self.log(f"{stage}/acc_{name}", metric, batch_size=batch_size)
        return log_p

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        """Search ``(α, β)`` on the whole validation split (``mixing="search"``), then log the pass's metrics."""
        if not self.dual_head or not self._val_outputs:
            return
        z_ce, z_kd, y = (torch.cat([out[i] for out in self._val_outputs]) for i in range(3))
        teachers = [out[3] for out in self._val_outputs]
        teacher = torch.cat(teachers) if teachers[0] is not None else None  # type: ignore[arg-type]
        self._val_outputs = []
        sanity = self._trainer is not None and self.trainer.sanity_checking
        if self.mixing == "search" and not sanity:
            all_ce, all_kd, all_y = (self._gather_rows(t) for t in (z_ce, z_kd, y.reshape(-1)))
            alpha, beta, acc = search_mixing(
                all_ce.reshape(-1, all_ce.shape[-1]),
                all_kd.reshape(-1, all_kd.shape[-1]),
                all_y,
                self.alpha_grid,
                self.beta_grid,
            )
            with torch.no_grad():
                self.mix_alpha.fill_(alpha)
                self.mix_beta.fill_(beta)
            self.log("val/acc_mixed_searched", acc, sync_dist=True)
        self.log("val/mix_alpha", self.mix_alpha, sync_dist=True)
        self.log("val/mix_beta", self.mix_beta, sync_dist=True)
        log_p = self._report("val", y, z_ce, z_kd)
        if teacher is not None:
            self.eval_with_teacher(y, log_p, teacher, "val")

    def _gather_rows(self, rows: Tensor) -> Tensor:
        """``rows`` of every DDP rank, concatenated in rank order (ranks may hold different counts)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1:
            return rows
        sizes = self.all_gather(torch.tensor(rows.shape[0], device=rows.device)).reshape(-1)
        longest = int(sizes.max())
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        gathered = self.all_gather(padded)  # [world, longest, ...]
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)])

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> dict[str, Any]:
        """Adds the KD head and the stored ``(α, β)``: the exported student alone is the CE head's predictor."""
        meta = super().export_metadata()
        if self.dual_head:
            assert self.kd_head is not None
            meta["dho"] = {
                "head": self.head,
                "kd_head": {k: v.detach().cpu() for k, v in self.kd_head.state_dict().items()},
                "kd_feature_scale": self.kd_feature_scale,
                "alpha": float(self.mix_alpha),
                "beta": float(self.mix_beta),
            }
        return meta
