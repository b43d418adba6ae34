"""MST-Distill's losses in plain torch (Li et al., ACM MM 2025, arXiv 2507.07015; official code
github.com/Gray-OREO/MST-Distill ``KD_methods/MST.py`` and ``main-MST-Distill.py``).

``KD(p <- q) = T^2 KL(softmax(q/T) || softmax(p/T))``, averaged over the batch (``F.kl_div(log_softmax(p/T),
softmax(q/T), "batchmean") * T^2``): network ``p`` learns from ``q``.

- Stage 1, co-training of every network ``n`` (student and teachers): ``L1 = sum_n [CE(z_n, y) +
  sum_{m != n} KD(z_n <- z_m)]``; the targets are *not* detached in the code (:func:`co_training_loss`).
- Stage 2, MaskNets: ``L2_j = KD(z_j <- sg(z_S))`` for the masked teacher ``j`` (:func:`masknet_loss`).
- Stage 3, student + GateNet: ``g = softmax(GateNet(z_S))``; top-k experts ``I``;
  ``L_kd = (1/k) sum_{i in I} KD(z_S <- sg(z_i))`` (:func:`topk_expert_kd`) or the soft variant
  ``KD(z_S <- sum_e g_e sg(z_e))`` (:func:`soft_expert_kd`); ``L_lb`` (:func:`load_balancing_loss`);
  ``L3 = w_task CE + w_kl L_kd + w_lb L_lb`` with the code's weight decay (:func:`decayed_weight`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, label_cross_entropy, upcast
from kd_lightning.losses.terms import active, weighted_terms

__all__ = [
    "co_training_loss",
    "decayed_weight",
    "load_balancing_loss",
    "masknet_loss",
    "mst_kd",
    "mst_student_loss",
    "soft_expert_kd",
    "topk_expert_kd",
]

LBMode = Literal["kl", "cv"]
Routing = Literal["topk", "soft"]


def mst_kd(student_logits: Tensor, target_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``KD(p <- q) = T^2 KL(softmax(q/T) || softmax(p/T))``, batchmean; gradients reach both sides."""
    log_p = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    q = F.softmax(upcast(target_logits) / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def co_training_loss(
    logits: Mapping[str, Tensor],
    target: Tensor,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    detach_targets: bool = False,
) -> dict[str, Tensor]:
    """Stage 1: every network learns from the labels and from every other network (mutual KD).

    ``L_n = w_ce CE(z_n, y) + w_kd sum_{m != n} KD(z_n <- z_m)``; returns ``{"loss": sum_n L_n, name_n: L_n}``.
    The code does not detach the targets (``distillation_loss``): each KD term also trains the network it learns
    from; ``detach_targets`` stops that.
    """
    check_temperature(temperature)
    if len(logits) < 2:
        raise KDConfigError("logits", f"co-training needs at least two networks, got {list(logits)}")
    per_network: dict[str, Tensor] = {}
    for name, z in logits.items():
        parts: dict[str, Tensor] = {}
        if active(ce_weight):
            parts["ce"] = label_cross_entropy(z, target)
        if active(kd_weight):
            kd = sum(
                (mst_kd(z, other.detach() if detach_targets else other, temperature)
                 for other_name, other in logits.items() if other_name != name),
                start=z.new_zeros((), dtype=torch.float32),
            )  # fmt: skip
            parts["kd"] = kd
        per_network[name] = weighted_terms(parts, {"ce": ce_weight, "kd": kd_weight})["loss"]
    return weighted_terms(per_network)


def masknet_loss(masked_teacher_logits: Tensor, student_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Stage 2: ``KD(z_j <- sg(z_S))``, the masked teacher pulled toward the (fixed) student."""
    return mst_kd(masked_teacher_logits, student_logits.detach(), temperature)


def load_balancing_loss(gate_probs: Tensor, mode: LBMode = "kl") -> Tensor:
    """Load balancing of the gate probabilities ``g`` ``[B, E]`` (code: ``load_balancing_loss``).

    - ``"kl"``: ``KL(U || mean_b g) / E`` with ``U`` uniform over the ``E`` experts. The ``1/E`` is the code's:
      ``nn.KLDivLoss(reduction="batchmean")`` on the 1-D ``[E]`` vector divides the sum by ``E``.
    - ``"cv"``: coefficient of variation of the importance ``sum_b g``: ``std / mean`` (unbiased std).
    """
    if mode == "kl":
        mean = upcast(gate_probs).mean(dim=0)
        uniform = torch.full_like(mean, 1.0 / mean.shape[0])
        return (uniform * (uniform.log() - mean.log())).sum() / mean.shape[0]
    if mode == "cv":
        importance = upcast(gate_probs).sum(dim=0)
        return importance.std() / importance.mean()
    raise KDConfigError("lb_mode", f"must be 'kl' or 'cv', got {mode!r}")


def topk_expert_kd(
    student_logits: Tensor, expert_logits: Tensor, gate_probs: Tensor, k: int = 1, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Top-k routing (code: ``k_ways_MTGdistillation_detached``): ``(1/k) sum_{i in topk(g)} KD(z_S <- sg(z_i))``.

    Args:
        student_logits: ``[B, C]``.
        expert_logits: ``[B, E, C]``, the experts' logits (detached here).
        gate_probs: ``[B, E]``; only their ranking is used, so **no gradient of this term reaches the gate**.
        k: experts per sample.

    Returns:
        ``(loss, indices [B, k])``.
    """
    _, indices = torch.topk(gate_probs.detach(), k=k, dim=1)
    chosen = torch.gather(
        expert_logits.detach(), 1, indices.unsqueeze(-1).expand(-1, -1, expert_logits.shape[-1])
    )  # [B, k, C]
    loss = sum(mst_kd(student_logits, chosen[:, i], temperature) for i in range(k)) / k
    return loss, indices


def soft_expert_kd(
    student_logits: Tensor,
    expert_logits: Tensor,
    gate_probs: Tensor,
    temperature: float = 4.0,
    detach_weights: bool = False,
) -> Tensor:
    """Soft routing: ``KD(z_S <- sum_e g_e sg(z_e))``, the gate-weighted sum of the experts' *logits*.

    The code's ``weighted_MTGdistillation_detached`` (defined, unused) detaches the whole aggregated target, so
    the gate gets no gradient from it (``detach_weights=True``); by default the weights keep their gradient and
    the gate learns from the KD term too.
    """
    weights = gate_probs.detach() if detach_weights else gate_probs
    target = (weights.unsqueeze(-1) * expert_logits.detach()).sum(dim=1)
    return mst_kd(student_logits, target, temperature)


def decayed_weight(initial: float, stage3_epoch: int, factor: float, every: int) -> float:
    """The code's schedule: after stage-3 epoch ``e`` with ``e % every == 0`` the weight is multiplied by ``factor``.

    ``main-MST-Distill.py`` updates ``w *= factor if epoch % every == 0`` at the *end* of each stage-3 epoch, so the
    update fires after epoch 0 already: epoch 0 uses ``initial``, epochs ``1..every`` use ``initial * factor``,
    and so on: ``w(e) = initial * factor ** ceil(e / every)``. ``every = 0`` turns the decay off.
    """
    if every <= 0 or stage3_epoch <= 0:
        return float(initial)
    return float(initial) * float(factor) ** math.ceil(stage3_epoch / every)


def mst_student_loss(
    student_logits: Tensor,
    expert_logits: Tensor,
    gate_logits: Tensor,
    target: Tensor,
    k: int = 1,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    lb_weight: float = 1.0,
    lb_mode: LBMode = "kl",
    routing: Routing = "topk",
    detach_soft_weights: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Stage 3: ``w_task CE(z_S, y) + w_kl L_kd + w_lb L_lb``; returns ``(terms, topk indices or None)``.

    ``terms`` = ``{"loss", "ce", "kd", "lb"}`` (weighted; weight-0 terms left out). ``gate_logits`` ``[B, E]``
    go through a softmax; ``expert_logits`` ``[B, E, C]`` are detached.
    """
    check_temperature(temperature)
    gate_probs = gate_logits.softmax(dim=-1)
    parts: dict[str, Tensor] = {}
    indices: Tensor | None = None
    if active(ce_weight):
        parts["ce"] = label_cross_entropy(student_logits, target)
    if routing == "topk":
        kd, indices = topk_expert_kd(student_logits, expert_logits, gate_probs, k, temperature)
        if active(kd_weight):
            parts["kd"] = kd
    elif routing == "soft":
        if active(kd_weight):
            parts["kd"] = soft_expert_kd(student_logits, expert_logits, gate_probs, temperature, detach_soft_weights)
    else:
        raise KDConfigError("routing", f"must be 'topk' or 'soft', got {routing!r}")
    if active(lb_weight):
        parts["lb"] = load_balancing_loss(gate_probs, lb_mode)
    return weighted_terms(parts, {"ce": ce_weight, "kd": kd_weight, "lb": lb_weight}), indices
