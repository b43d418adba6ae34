"""Swing Distillation (Li, Wu, Dong, Wu, Bian, Xiong 2022; arXiv 2212.08349) — UNVERIFIED reconstruction."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.swing import NoiseKind, NoiseTarget, PrivacyScores, SwingLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class SwingKD(ClassificationDistillation):
    """Swing Distillation: per-item temperatures from a privacy score, and noisy soft targets.

    **The whole method is an UNVERIFIED reconstruction from the paper's abstract** (no paper body
    or code was available; :mod:`kd_lightning.losses.swing` states every choice)::

        T_i = T_min + (T_max − T_min)·π_i
        q̃_i = normalise(max(softmax(z_T,i/T_i) + ξ_i, 0)),   ξ_i ~ Laplace(0, Δ/ε), drawn every step
        L   = (1 − α)·CE(z_S, y) + α·mean_i T_i²·KL(q̃_i ‖ softmax(z_S,i/T_i))

    The paper scores tokens of text; on images an item is a sample and π_i comes from
    ``privacy_scores``. Clipping and renormalising changes the noise distribution, and ε is the
    budget of one Laplace release, not a differential-privacy guarantee for the trained student.
    ``benchmarks/swing_canary.py`` measures the leakage this is meant to reduce.

    Args:
        privacy_scores: π per item: ``None`` (all 0), a per-class list (or ``{class: score}``
            dict) looked up with the label, a per-sample tensor or ``.pt``/``.npy`` path looked up
            with the dataset index (needs ``data.init_args.return_index=true``), or, from Python, a
            callable ``fn(inputs, targets, indices) -> Tensor``.
        t_min: temperature at π = 0.
        t_max: temperature at π = 1.
        alpha: α, weight of the soft-target term (``1 − α`` weighs the cross-entropy).
        noise: ``"laplace"``, ``"gaussian"`` or ``"none"``.
        epsilon: ε, privacy budget of the noise (``.inf`` disables it).
        sensitivity: Δ, sensitivity of the noised vector.
        delta: δ of the Gaussian option (σ = Δ·sqrt(2 ln(1.25/δ))/ε).
        noise_on: ``"probs"`` (add to the tempered teacher probabilities, then clip and
            renormalise) or ``"logits"`` (add to the tempered teacher logits) — [UNVERIFIED].
        soften_student: divide the student's logits by T_i as well (the formula above). ``False``:
            plain student softmax, no T_i² factor — a variant, not from the paper.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    object_arguments = (*ClassificationDistillation.object_arguments, "privacy_scores")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        privacy_scores: list[float] | dict[int, float] | str | Tensor | Callable[..., Tensor] | None = None,
        t_min: float = 1.0,
        t_max: float = 10.0,
        alpha: float = 0.5,
        noise: NoiseKind = "laplace",
        epsilon: float = 10.0,
        sensitivity: float = 1.0,
        delta: float = 1e-5,
        noise_on: NoiseTarget = "probs",
        soften_student: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        field = "model.init_args"
        try:
            self.criterion = SwingLoss(
                t_min, t_max, alpha, noise, epsilon, sensitivity, delta, noise_on, soften_student=soften_student
            )
            self.privacy = PrivacyScores(privacy_scores, self.num_classes, name=f"{field}.privacy_scores")
        except (ValueError, TypeError, FileNotFoundError) as err:
            message = str(err)
            if not message.startswith(field):
                message = f"{field}: {message}"
            raise KDConfigError(message) from None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        try:
            self.privacy.fit_classes(int(self.num_classes))
        except ValueError as err:
            raise KDConfigError(str(err)) from None
        table = self.privacy.table
        if self.privacy.needs_index and stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and getattr(datamodule, "return_index", True) is False:
                raise KDConfigError(
                    "model.init_args.privacy_scores is a per-sample table, looked up by dataset index, but "
                    f"{type(datamodule).__name__} serves no indices: set --data.init_args.return_index=true."
                )
            train_set = getattr(datamodule, "train_set", None)
            if train_set is not None and hasattr(train_set, "__len__") and len(train_set) > len(table):
                raise KDConfigError(
                    f"model.init_args.privacy_scores has {len(table)} per-sample scores but the training set "
                    f"has {len(train_set)} samples: give one score per training sample."
                )

    @staticmethod
    def batch_indices(batch: Any) -> Tensor | None:
        """Dataset indices of a batch ``(x, y, index)`` or ``{"index": ...}``; ``None`` when absent."""
        if isinstance(batch, Mapping):
            return batch.get("index")
        return batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None

    def training_loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        x, y = self.unpack(batch)
        try:
            privacy = self.privacy(x, y, self.batch_indices(batch))
        except ValueError as err:
            raise KDConfigError(str(err)) from None
        student_logits = self.student(x)
        teacher_logits = self.teacher_forward(x)
        parts = self.criterion(student_logits, teacher_logits, y, privacy=privacy)
        if self._trainer is None:  # called outside a Trainer (e.g. by hand): nothing to log to
            return parts, student_logits
        batch_size = y.numel()
        temperatures = self.criterion.t_min + (self.criterion.t_max - self.criterion.t_min) * privacy.float()
        self.log("train/mean_temperature", temperatures.mean(), on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(
            "train/private_fraction",
            (privacy > 0.5).float().mean(),
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
        )
        return parts, student_logits
