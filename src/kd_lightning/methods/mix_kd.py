"""MIX-KD: Partial MixUp + MIXSTD (Choi, Jeon, Shukla, Turaga; WACV 2023; arXiv 2211.03946)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.mix_kd import MixKDLoss, MixupPlan, UnmixedSampling, apply_mixup, mix_targets, sample_mixup
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class MixKD(ClassificationDistillation):
    """MIX-KD: distil on a partially mixed batch with per-sample std-scaled logits.

    Each training batch is mixed inside :meth:`training_loss` (Partial MixUp):
    ``x̃_i = λ_i x_{π₁(i)} + (1−λ_i) x_{π₂(i)}``, ``ỹ_i = λ_i e_{y_{π₁(i)}} + (1−λ_i) e_{y_{π₂(i)}}``,
    ``λ_i ~ Beta(a, a)``, with λ reset to 1 for ``⌊p·B⌋`` drawn samples
    (:func:`~kd_lightning.losses.mix_kd.sample_mixup`). Student *and teacher* see x̃. Then (MIXSTD)::

        L = γ·CE(softmax(z_S/σ_S), ỹ) + α·KL(softmax(z_T/σ_T) ‖ softmax(z_S/σ_S))

    σ = per-sample unbiased std of the logits (not detached), KL 'batchmean', no τ². Defaults are the
    official CIFAR-100 ones (γ = 0.1, α = 0.9, a = 1, p = 0.9, sampling with replacement). Verified
    against the official code (hchoi71/MIX-KD ``loops_mixstd.py``, ``MIXSTD.py``); ``scale_T`` of the
    official script is unused there and not offered. ``train/acc`` scores the student against the
    dominant label (argmax of ỹ) of each mixed sample, as the official loop does; ``train/mixed``
    logs the fraction of mixed samples. Validation and test use clean inputs (the official
    validation also divides by σ, which leaves the accuracy unchanged).

    Args:
        mixup: ``"partial"`` (PMU), ``"full"`` (FMU: every sample mixed, i.e. PMU with p = 0) or
            ``"none"`` (no mixing: the batch is only permuted).
        unmixed_fraction: p, the fraction of draws reset to λ = 1 in PMU. With
            ``unmixed_sampling="replacement"`` (official ``torch.randint``) p = 0.9 leaves about
            1 − e^{−0.9} ≈ 59 % of the samples unmixed, not 90 %.
        unmixed_sampling: ``"replacement"`` (official) or ``"exact"`` (exactly ⌊p·B⌋ distinct samples).
        beta_a: a, the Beta(a, a) parameter of λ.
        distill: ``"mixstd"`` (the paper's loss) or ``"kd"`` (baseline: ``γ·CE(z_S, ỹ) + α·τ²·KL_τ``
            on the mixed batch).
        gamma: γ, weight of the soft-target CE.
        alpha: α, weight of the KL.
        temperature: τ of the ``"kd"`` baseline (unused by ``"mixstd"``).
        eps: added to σ (the official code has none; guards constant logits).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        mixup: Literal["partial", "full", "none"] = "partial",
        unmixed_fraction: float = 0.9,
        unmixed_sampling: UnmixedSampling = "replacement",
        beta_a: float = 1.0,
        distill: Literal["mixstd", "kd"] = "mixstd",
        gamma: float = 0.1,
        alpha: float = 0.9,
        temperature: float = 4.0,
        eps: float = 1e-7,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if mixup not in ("partial", "full", "none"):
            raise KDConfigError(f"model.init_args.mixup must be 'partial', 'full' or 'none', got {mixup!r}.")
        if not 0.0 <= unmixed_fraction <= 1.0:
            raise KDConfigError(f"model.init_args.unmixed_fraction must be in [0, 1], got {unmixed_fraction}.")
        if unmixed_sampling not in ("replacement", "exact"):
            raise KDConfigError(
                f"model.init_args.unmixed_sampling must be 'replacement' or 'exact', got {unmixed_sampling!r}."
            )
        if not beta_a > 0:
            raise KDConfigError(f"model.init_args.beta_a must be > 0, got {beta_a}.")
        self.mixup = mixup
        self.unmixed_fraction = unmixed_fraction
        self.unmixed_sampling = unmixed_sampling
        self.beta_a = beta_a
        try:
            self.criterion = MixKDLoss(distill=distill, gamma=gamma, alpha=alpha, temperature=temperature, eps=eps)
        except ValueError as err:
            raise KDConfigError(f"model.init_args.{err}") from None

    def effective_unmixed_fraction(self) -> float:
        """p passed to the sampler: the configured one for PMU, 0 for FMU, 1 for no mixing."""
        return {"partial": self.unmixed_fraction, "full": 0.0, "none": 1.0}[self.mixup]

    def mix_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, MixupPlan]:
        """Mixed inputs, mixed one-hot targets ``[B, C]`` and the draw, for a clean batch."""
        num_classes = self.num_classes
        if num_classes is None:
            raise KDConfigError("MixKD needs num_classes to build mixed targets: pass model.init_args.num_classes.")
        p = self.effective_unmixed_fraction()
        # "none": p = 1 with exact sampling resets every λ to 1.
        sampling = "exact" if self.mixup == "none" else self.unmixed_sampling
        plan = sample_mixup(x.shape[0], p, self.beta_a, sampling, x.device)
        return apply_mixup(x, plan), mix_targets(y, int(num_classes), plan), plan

    def training_loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        x, y = self.unpack(batch)
        mixed_x, soft_y, plan = self.mix_batch(x, y)
        student_logits = self.student(mixed_x)
        teacher_logits = self.teacher_forward(mixed_x)
        parts = self.criterion(student_logits, teacher_logits, soft_y)
        if self._trainer is not None:
            mixed = (~plan.unmixed).float().mean()
            self.log("train/mixed", mixed, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return parts, student_logits, soft_y.argmax(-1)
