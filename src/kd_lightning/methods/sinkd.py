"""SinKD: Sinkhorn Distance Minimization for KD (Cui, Qin et al.; LREC-COLING 2024, TNNLS 2024; arXiv 2402.17110)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.transport import SinKDLoss, annealed_temperature
from kd_lightning.methods.base import DistillationModule


class SinKD(DistillationModule):
    """SinKD: ``(1 − α)·CE + α·L_KD + β·λ_s·Σ_ij P_ij·‖p^S_i − p^T_j‖_1`` over the batch's B×B pairs.

    ``p = softmax(z/τ_sin)``; ``P`` is the entropic OT plan (ε, ``n_iters`` Sinkhorn iterations,
    computed in the log domain so small ε stays finite) between the B student and B teacher
    probability vectors (:class:`~kd_lightning.losses.transport.SinKDLoss`). ``L_KD`` is the official
    soft cross-entropy ``−Σ p_T^T log p_S^T`` without T² (``kd_mode="kl"``: T²·KL). With
    ``anneal_temperature`` the KD temperature goes linearly from ``temperature`` at epoch 0 to 1 at
    the last epoch (the official ``kd_anneal``). Checked against the official repository
    (``2018cx/SinKD``, ``loss.py``): same cost, kernel, row-then-column normalisation and
    ``Σ P·D``; ``marginals="unit"`` reproduces its scale (rows and columns sum to 1, value ∝ B),
    ``"uniform"`` is the standard OT coupling (1/B each; B times smaller). The official training
    loop adds the Sinkhorn term under a different flag than the one creating it; here it is always
    added (β = 0 disables it). Defaults: the official Sinkhorn internals and GLUE weights
    (τ_sin = 2, ε = 0.1, 20 iterations, λ_s = 1e-3, β = 0.8, α = 0.9); T = 4 (the scripts use 2-4).
    The paper is NLP-only: there are no published image-classification hyperparameters.

    Args:
        alpha: α, weight of the KD term (CE gets 1 − α).
        temperature: T of the KD term (its initial value when annealed).
        sinkhorn_weight: β.
        sinkhorn_scale: λ_s.
        sinkhorn_temperature: τ_sin.
        epsilon: ε of the entropic regularisation.
        n_iters: Sinkhorn iterations.
        marginals: ``"unit"`` (official scale) or ``"uniform"`` (1/B).
        kd_mode: ``"soft_ce"`` (official, no T²) or ``"kl"`` (T²·KL).
        anneal_temperature: anneal T linearly to 1 over the run.
        anneal_epochs: length E of the annealing; ``None`` takes the Trainer's ``max_epochs``.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        alpha: float = 0.9,
        temperature: float = 4.0,
        sinkhorn_weight: float = 0.8,
        sinkhorn_scale: float = 1e-3,
        sinkhorn_temperature: float = 2.0,
        epsilon: float = 0.1,
        n_iters: int = 20,
        marginals: Literal["unit", "uniform"] = "unit",
        kd_mode: Literal["soft_ce", "kl"] = "soft_ce",
        anneal_temperature: bool = False,
        anneal_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        try:
            self.criterion = SinKDLoss(
                alpha=alpha,
                temperature=temperature,
                sinkhorn_weight=sinkhorn_weight,
                sinkhorn_scale=sinkhorn_scale,
                sinkhorn_temperature=sinkhorn_temperature,
                epsilon=epsilon,
                n_iters=n_iters,
                marginals=marginals,
                kd_mode=kd_mode,
            )
        except ValueError as err:
            raise KDConfigError(f"model.init_args.{err}") from None
        if anneal_epochs is not None and anneal_epochs < 1:
            raise KDConfigError(f"model.init_args.anneal_epochs must be >= 1 or null, got {anneal_epochs}.")
        self.anneal_temperature = anneal_temperature
        self.anneal_epochs = anneal_epochs

    def kd_temperature(self) -> float:
        """The KD temperature of the current epoch (constant unless ``anneal_temperature``)."""
        initial = self.criterion.temperature
        if not self.anneal_temperature:
            return initial
        epochs = self.anneal_epochs
        if epochs is None:
            max_epochs = self.trainer.max_epochs if self._trainer is not None else None
            if max_epochs is None or max_epochs < 1:
                raise KDConfigError(
                    "model.init_args.anneal_temperature needs the run's length: set model.init_args.anneal_epochs "
                    "or trainer.max_epochs."
                )
            epochs = max_epochs
        return annealed_temperature(initial, self.current_epoch, epochs)

    def distillation_loss(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        temperature = self.kd_temperature()
        if self.anneal_temperature and self._trainer is not None:
            self.log("train/kd_temperature", temperature, on_step=False, on_epoch=True)
        return self.criterion(student_logits, teacher_logits, target, temperature=temperature)
