"""Self-distillation with weighted ground truth (Borup & Andersen, NeurIPS 2021; arXiv 2102.13088)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.self_distill import GTSelfDistillLoss, SelfDistillLossKind
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class GTSelfDistill(ClassificationDistillation):
    """One generation of ground-truth-weighted self-distillation (teacher = previous generation).

    ``L = α·MSE(softmax(z_S), onehot(y)) + (1 − α)·MSE(softmax(z_S), softmax(z_T)) + c·Σ_θ ‖θ‖₂``

    α weighs the **ground truth** (α = 1: plain training, the teacher is not run; α = 0: pure
    self-distillation, Mobahi et al. 2020). The norm penalty sums the non-squared L2 norms of the
    student's parameter tensors. Loss, penalty and c = 1e-4 are verified against the official
    ``self_distiller.py``; ``loss="ce_kl"`` (CE + τ²·KL) is a variant the paper's theory does not
    cover. Several generations, with α fixed or chosen per generation on held-out data, are run
    by ``kd generations`` (:mod:`kd_lightning.generations`).

    Args:
        alpha: α ∈ [0, 1], weight of the ground truth. Official README example: 0.6.
        reg_coef: c, weight of ``Σ‖θ‖₂`` (0 disables it).
        loss: ``"mse"`` (official) or ``"ce_kl"``.
        temperature: τ of the ``"ce_kl"`` KL term.
        same_architecture: require teacher and student of the same class and parameter shapes
            (self-distillation); ``False`` allows any teacher.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 0.6,
        reg_coef: float = 1e-4,
        loss: SelfDistillLossKind = "mse",
        temperature: float = 1.0,
        same_architecture: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(reg_coef=reg_coef)
        if same_architecture:
            self._check_same_architecture()
        try:
            self.criterion = GTSelfDistillLoss(alpha=alpha, loss=loss, temperature=temperature, reg_coef=reg_coef)
        except ValueError as err:
            raise KDConfigError(f"model.init_args: {err}") from None
        self.alpha = alpha
        self.reg_coef = reg_coef

    def _check_same_architecture(self) -> None:
        s, t = self.student, self.teacher
        s_shapes = {k: tuple(v.shape) for k, v in s.state_dict().items()}
        t_shapes = {k: tuple(v.shape) for k, v in t.state_dict().items()}
        if type(s) is not type(t) or s_shapes != t_shapes:
            raise KDConfigError(
                f"model.init_args.teacher ({type(t).__name__}) and model.init_args.student ({type(s).__name__}) "
                "must be the same architecture with the same arguments for self-distillation; set "
                "model.init_args.same_architecture=false to distil from a different teacher."
            )

    def training_loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        x, y = self.unpack(batch)
        student_logits = self.student(x)
        teacher_logits = self.teacher_forward(x) if self.criterion.uses_teacher else None
        return self.criterion(student_logits, teacher_logits, y, self.student.parameters()), student_logits
