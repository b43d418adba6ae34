"""Signal knowledge distillation (SKD) loss of ClST (Hou et al., IEEE TWC 2024, arXiv 2312.17446). Pure torch.

RECONSTRUCTION: the paper body was not available; its abstract describes soft targets plus a "hybrid loss
that also preserves teacher knowledge", reconstructed here as the Hinton mix of hard-label cross-entropy and
temperature-scaled KL. The defaults τ = 4, α = 0.3 are unverified guesses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import weighted_terms

__all__ = ["SKDLoss"]


class SKDLoss(nn.Module):
    """SKD hybrid loss (RECONSTRUCTION): ``α·CE(y, softmax(z_S)) + (1 − α)·τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``.

    KL summed over classes and averaged over the batch ("batchmean", :func:`~kd_lightning.losses.kd_kl_div`);
    the teacher logits are detached. Returns ``{"loss", "ce", "kd"}`` with the weighted terms.

    Args:
        temperature: τ > 0 (unverified default 4).
        alpha: α in [0, 1], weight of the hard-label cross-entropy (unverified default 0.3); the soft
            term gets ``1 − α``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.3) -> None:
        super().__init__()
        check_temperature(temperature)
        if not 0.0 <= alpha <= 1.0:
            raise KDConfigError(f"alpha must be in [0, 1], got {alpha}.")
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        flat = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
        terms = {
            "ce": F.cross_entropy(flat, target.reshape(-1)),
            "kd": kd_kl_div(student_logits, teacher_logits, self.temperature),
        }
        return weighted_terms(terms, {"ce": self.alpha, "kd": 1.0 - self.alpha})
