"""DHO: Dual-Head Optimization (Kang, Lee, Jang, Hwang, arXiv 2505.07675, 2025), in plain torch.

A student backbone ``f`` feeds two linear heads: a CE head trained on the labeled inputs only and a KD head
trained on the teacher's soft labels of the labeled and unlabeled inputs (official code ``erjui/DHO``):

    L = w_CE · CE(z^CE(x_l), y_l) + w_KDl · τ²·KL(p_T^τ(x_l) ‖ p_KD^τ(x_l)) + w_KDu · τ²·KL(p_T^τ(x_u) ‖ p_KD^τ(x_u))

(KL summed over classes, averaged over each part's batch: ``"batchmean"``). ``train_others.py`` (few-shot,
ResNet students) uses ``w = (0.5, 0.5, 0.5)``; ``train_imgnet_semi.py`` ``w = (1, 1, 1)``; ``τ = 2`` in both.

At inference the heads are mixed in *probability* space:

    p(y|x) = α · softmax(z^CE) + (1 − α) · softmax(z^KD / β),

with ``(α, β)`` fixed (ImageNet code: 0.5, 0.5) or grid-searched on validation data (few-shot code,
:func:`search_mixing`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, label_cross_entropy, upcast
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "DHO_ALPHA_GRID",
    "DHO_BETA_GRID",
    "DHO_LOSS_PRESETS",
    "DHOLoss",
    "check_mixing",
    "dho_loss",
    "mix_heads",
    "mixed_log_probs",
    "search_mixing",
]

#: Loss weights ``(w_CE, w_KDl, w_KDu)`` of the two official code paths.
DHO_LOSS_PRESETS: dict[str, tuple[float, float, float]] = {
    "few_shot": (0.5, 0.5, 0.5),  # train_others.py: 0.5·L_CE + 0.5·(L_KDl + L_KDu)
    "imagenet": (1.0, 1.0, 1.0),  # train_imgnet_semi.py: L_CE + L_KDl + L_KDu
}
#: The official search grids (``train_others.py``): α ∈ {0, 0.05, …, 1}, β ∈ {0.5, 0.75, 1, 1.25, 1.5, 2, 4}.
DHO_ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 10) for i in range(21))
DHO_BETA_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def dho_loss(
    ce_logits: Tensor | None,
    target: Tensor | None,
    kd_logits_labeled: Tensor | None,
    teacher_logits_labeled: Tensor | None,
    kd_logits_unlabeled: Tensor | None = None,
    teacher_logits_unlabeled: Tensor | None = None,
    temperature: float = 2.0,
    ce_weight: float = 0.5,
    kd_labeled_weight: float = 0.5,
    kd_unlabeled_weight: float = 0.5,
) -> dict[str, Tensor]:
    """The DHO training loss as weighted terms ``{"loss", "ce", "kd_labeled", "kd_unlabeled"}``.

    ``ce = CE(ce_logits, target)`` (CE head on the labeled part); ``kd_labeled`` / ``kd_unlabeled`` =
    ``τ²·KL(softmax(t/τ) ‖ softmax(z^KD/τ))`` averaged over the labeled / unlabeled part (KD head). A term
    whose weight is 0 or whose inputs are ``None`` (e.g. no unlabeled part) is left out. For the single-head
    ablation pass the same head's logits as ``ce_logits`` and ``kd_logits_*``.

    Raises:
        KDConfigError: no term remains.
    """
    terms: dict[str, Tensor] = {}
    if ce_logits is not None and target is not None and active(ce_weight):
        terms["ce"] = label_cross_entropy(ce_logits, target)
    if kd_logits_labeled is not None and teacher_logits_labeled is not None and active(kd_labeled_weight):
        terms["kd_labeled"] = kd_kl_div(upcast(kd_logits_labeled), upcast(teacher_logits_labeled), temperature)
    if kd_logits_unlabeled is not None and teacher_logits_unlabeled is not None and active(kd_unlabeled_weight):
        terms["kd_unlabeled"] = kd_kl_div(upcast(kd_logits_unlabeled), upcast(teacher_logits_unlabeled), temperature)
    weights = {"ce": ce_weight, "kd_labeled": kd_labeled_weight, "kd_unlabeled": kd_unlabeled_weight}
    return weighted_terms(terms, weights)


class DHOLoss(nn.Module):
    """:func:`dho_loss` with its temperature and weights fixed (defaults: the official few-shot path).

    Args:
        temperature: τ of both KD terms.
        ce_weight: w_CE.
        kd_labeled_weight: w_KDl.
        kd_unlabeled_weight: w_KDu.
    """

    def __init__(
        self,
        temperature: float = 2.0,
        ce_weight: float = 0.5,
        kd_labeled_weight: float = 0.5,
        kd_unlabeled_weight: float = 0.5,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_weights(ce_weight=ce_weight, kd_labeled_weight=kd_labeled_weight, kd_unlabeled_weight=kd_unlabeled_weight)
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_labeled_weight = kd_labeled_weight
        self.kd_unlabeled_weight = kd_unlabeled_weight

    def forward(
        self,
        ce_logits: Tensor | None,
        target: Tensor | None,
        kd_logits_labeled: Tensor | None,
        teacher_logits_labeled: Tensor | None,
        kd_logits_unlabeled: Tensor | None = None,
        teacher_logits_unlabeled: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return dho_loss(
            ce_logits,
            target,
            kd_logits_labeled,
            teacher_logits_labeled,
            kd_logits_unlabeled,
            teacher_logits_unlabeled,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            kd_labeled_weight=self.kd_labeled_weight,
            kd_unlabeled_weight=self.kd_unlabeled_weight,
        )


# ---------------------------------------------------------------------- inference: mixing the heads
def check_mixing(alpha: float, beta: float, alpha_field: str = "alpha", beta_field: str = "beta") -> None:
    """``alpha`` in [0, 1] and ``beta`` a finite number > 0.

    Raises:
        KDConfigError: naming the field.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise KDConfigError(alpha_field, f"must be in [0, 1], got {alpha!r}", "it is the CE head's mixing weight")
    check_temperature(beta, beta_field)


def mix_heads(ce_logits: Tensor, kd_logits: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """Mixed class probabilities ``α · softmax(z^CE) + (1 − α) · softmax(z^KD / β)`` (probability space)."""
    ce, kd = upcast(ce_logits), upcast(kd_logits)
    return alpha * ce.softmax(-1) + (1 - alpha) * (kd / beta).softmax(-1)


def mixed_log_probs(ce_logits: Tensor, kd_logits: Tensor, alpha: float | Tensor, beta: float | Tensor) -> Tensor:
    """``log`` of :func:`mix_heads`, computed stably with log-sum-exp (``-inf`` never becomes NaN at α ∈ {0, 1})."""
    ce, kd = upcast(ce_logits), upcast(kd_logits)
    a = torch.as_tensor(alpha, dtype=ce.dtype, device=ce.device)
    b = torch.as_tensor(beta, dtype=kd.dtype, device=kd.device)
    parts = torch.stack((torch.log(a) + ce.log_softmax(-1), torch.log1p(-a) + (kd / b).log_softmax(-1)))
    return torch.logsumexp(parts, dim=0)


def search_mixing(
    ce_logits: Tensor,
    kd_logits: Tensor,
    target: Tensor,
    alphas: Sequence[float] = DHO_ALPHA_GRID,
    betas: Sequence[float] = DHO_BETA_GRID,
) -> tuple[float, float, float]:
    """``(α, β, accuracy)`` of the grid point whose mixed prediction (:func:`mix_heads`) is most accurate.

    Top-1 accuracy is a fraction in [0, 1]. Ties go to the first best point in the official loop order: β
    in the order of ``betas`` (outer loop), then α in the order of ``alphas`` (inner loop), as the official
    strict ``acc > best_acc`` update does (with the default grids: the smallest β, then the smallest α, i.e.
    the most KD-weighted mixture). Unlike the official loop (which starts at ``best_acc = 0`` and so returns
    its initial ``α = 0, β = 1`` when every point scores 0), the first grid point wins when all score 0.
    One host synchronisation at the end.

    Raises:
        KDConfigError: empty grids, grid values out of range, or no items.
    """
    if not len(alphas) or not len(betas):
        raise KDConfigError(
            "alphas" if not len(alphas) else "betas", "the search grid is empty", "give at least one value"
        )
    for a in alphas:
        check_mixing(a, 1.0, alpha_field="alphas")
    for b in betas:
        check_mixing(0.0, b, beta_field="betas")
    if target.numel() == 0:
        raise KDConfigError("target", "there are no items to search the mixing weights on", "give validation data")
    ce_probs = upcast(ce_logits).softmax(-1)
    kd = upcast(kd_logits)
    correct = torch.empty(len(betas), len(alphas), dtype=torch.long, device=ce_probs.device)
    for i, beta in enumerate(betas):
        kd_probs = (kd / beta).softmax(-1)
        for j, alpha in enumerate(alphas):
            pred = (alpha * ce_probs + (1 - alpha) * kd_probs).argmax(-1)
            correct[i, j] = (pred == target).sum()
    best = int(correct.flatten().argmax())  # the first maximum in (β, α) loop order
    i, j = divmod(best, len(alphas))
    return float(alphas[j]), float(betas[i]), float(correct[i, j]) / target.numel()
