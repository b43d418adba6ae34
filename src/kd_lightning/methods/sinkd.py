"""SinKD: Sinkhorn Distance Minimization for KD (Cui, Qin et al.; LREC-COLING 2024, TNNLS 2024; arXiv 2402.17110)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.losses.transport import SinKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class SinKD(ClassificationDistillation):
    """SinKD: ``(1 − α)·CE + α·L_KD + β·λ_s·Σ_ij P_ij·‖p^S_i − p^T_j‖_1`` over the batch's B×B pairs.

    ``p = softmax(z/τ_sin)``; ``P`` is the entropic OT plan (ε, ``n_iters`` Sinkhorn iterations,
    computed in the log domain so small ε stays finite) between the B student and B teacher
    probability vectors (:class:`~kd_lightning.losses.transport.SinKDLoss`, configured as ``loss``).
    ``L_KD`` is the official soft cross-entropy ``−Σ p_T^T log p_S^T`` without T² (``kd_mode="kl"``:
    T²·KL). With ``anneal_temperature`` the KD temperature goes linearly from ``temperature`` at epoch 0
    to 1 at the last epoch (the official ``kd_anneal``; logged as ``train/kd_temperature``). Checked
    against the official repository (``2018cx/SinKD``, ``loss.py``): same cost, kernel, row-then-column
    normalisation and ``Σ P·D``; ``marginals="unit"`` reproduces its scale (rows and columns sum to 1,
    value ∝ B), ``"uniform"`` is the standard OT coupling (1/B each; B times smaller). The official training
    loop adds the Sinkhorn term under a different flag than the one creating it; here it is always
    added (β = 0 disables it). Defaults: the official Sinkhorn internals and GLUE weights
    (τ_sin = 2, ε = 0.1, 20 iterations, λ_s = 1e-3, β = 0.8, α = 0.9); T = 4 (the scripts use 2-4).
    The paper is NLP-only: there are no published image-classification hyperparameters.

    Args:
        loss: the SinKD loss (``alpha``, ``temperature``, ``sinkhorn_weight``, ``sinkhorn_scale``,
            ``sinkhorn_temperature``, ``epsilon``, ``n_iters``, ``marginals``, ``kd_mode``,
            ``anneal_temperature``, ``anneal_epochs``); ``None``: the defaults above.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    object_arguments = (*ClassificationDistillation.object_arguments, "loss")

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: SinKDLoss | None = None, **kwargs: Any) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = loss if loss is not None else SinKDLoss()
