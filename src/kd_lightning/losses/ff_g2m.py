"""FF-G2M: full-frequency GNN-to-MLP distillation (Wu, Lin, Huang, Fan & Li, AAAI 2023, arXiv 2305.10758).

A student MLP ``Z_S = MLP(X)`` learns node classification from a frozen GNN's logits ``Z_T`` on one graph, as in
the official code (github.com/LirongWu/FF-G2M, src/train_and_eval.py, src/models.py). With
``KL(a || b) = Σ_k a_k (log a_k − log b_k)`` and ``p_X = softmax(Z_X)``:

- **CE**: ``NLL(log p_S[train], y[train])`` (mean over the labelled nodes).
- **LFD** (low-frequency distillation), over the edges *with* one self loop per node, student at the source and
  teacher at the target (the code's ``criterion(P_S[src], P_T[dst])``):
  ``L_LFD = (1/|E_loop|) Σ_{(i,j) ∈ E_loop} KL(p_T[j] || p_S[i])``.
- **HFD** (high-frequency distillation), over the edges *without* self loops, on absolute logit differences:
  ``q_X(i,j) = softmax(|Z_X[i] − Z_X[j]| / τ)`` over the classes and
  ``L_HFD = (1/|E|) Σ_{(i,j) ∈ E} KL(q_T(i,j) || q_S(i,j))``.
- **GLNN** (node-wise KD, the code's ablation 2): ``L_KD = (1/N) Σ_i KL(p_T[i] || p_S[i])`` over all nodes.

``L = λ·CE + (1 − λ)·(L_LFD + L_HFD)``; the ablations swap the distillation part (see :data:`MODE_TERMS`).
Plain torch: no graph library needed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast
from kd_lightning.losses.terms import active, weighted_terms

__all__ = [
    "MODE_TERMS",
    "FFG2MMode",
    "check_edge_index",
    "ff_g2m_terms",
    "high_frequency_loss",
    "low_frequency_loss",
    "node_kl_loss",
    "with_self_loops",
    "without_self_loops",
]

FFG2MMode = Literal["ff_g2m", "glnn", "lfd", "hfd", "mlp"]
#: The distillation terms of each mode (the code's ``ablation_mode`` 0, 2, 3, 4, 1); each weighted ``1 − λ``.
#: ``"mlp"`` is the code's mode 1: the plain CE with weight 1 (not λ), no teacher term.
MODE_TERMS: dict[str, tuple[str, ...]] = {
    "ff_g2m": ("lfd", "hfd"),
    "glnn": ("kd",),
    "lfd": ("lfd",),
    "hfd": ("hfd",),
    "mlp": (),
}


def check_edge_index(edge_index: Tensor, num_nodes: int) -> None:
    """``edge_index`` must be a ``[2, E]`` integer tensor of node ids in ``[0, num_nodes)``.

    Raises:
        KDConfigError: naming the shape/dtype seen.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2 or edge_index.is_floating_point():
        raise KDConfigError(
            "edge_index",
            f"must be an integer tensor of shape [2, E], got {edge_index.dtype} {tuple(edge_index.shape)}",
            "give the graph as (source row, target row) node ids",
        )
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise KDConfigError(
            "edge_index", f"holds node ids outside [0, {num_nodes})", "the edges must index the rows of the features"
        )


def without_self_loops(edge_index: Tensor) -> Tensor:
    """The edges ``(i, j)`` with ``i != j``."""
    return edge_index[:, edge_index[0] != edge_index[1]]


def with_self_loops(edge_index: Tensor, num_nodes: int) -> Tensor:
    """The edges without their self loops, then exactly one loop ``(i, i)`` per node (DGL's ``remove_self_loop``
    then ``add_self_loop``, as the code builds its graph)."""
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    return torch.cat([without_self_loops(edge_index), torch.stack([loops, loops])], dim=1)


def _kl_rows(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """``(1/rows) Σ_rows KL(exp t || exp s)``: torch's ``KLDivLoss(reduction="batchmean", log_target=True)``."""
    if teacher_log_probs.shape[0] == 0:
        return student_log_probs.sum() * 0.0  # no rows: a zero that keeps the graph
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)


def low_frequency_loss(student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor) -> Tensor:
    """LFD: ``(1/|E|) Σ_{(i,j) ∈ E} KL(p_T[j] || p_S[i])`` over the given edges (source = student node ``i``,
    target = teacher node ``j``); FF-G2M passes the edges with one self loop per node (:func:`with_self_loops`).

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]`` (detached here: no gradient reaches the teacher).
        edge_index: ``[2, E]`` node ids.
    """
    log_s = F.log_softmax(upcast(student_logits), dim=-1)
    log_t = F.log_softmax(upcast(teacher_logits).detach(), dim=-1)
    return _kl_rows(log_t[edge_index[1]], log_s[edge_index[0]])


def edge_difference_log_probs(logits: Tensor, edge_index: Tensor, tau: float) -> Tensor:
    """``log softmax(|Z[i] − Z[j]| / τ)`` over the classes for every edge ``(i, j)``: ``[E, C]``."""
    logits = upcast(logits)
    return F.log_softmax((logits[edge_index[0]] - logits[edge_index[1]]).abs() / tau, dim=-1)


def high_frequency_loss(student_logits: Tensor, teacher_logits: Tensor, edge_index: Tensor, tau: float) -> Tensor:
    """HFD: ``(1/|E|) Σ_{(i,j) ∈ E} KL(q_T(i,j) || q_S(i,j))`` with ``q_X(i,j) = softmax(|Z_X[i] − Z_X[j]| / τ)``
    on LOGITS (not probabilities); FF-G2M passes the edges without self loops (a loop's difference is 0).

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]`` (detached here).
        edge_index: ``[2, E]`` node ids.
        tau: the temperature τ > 0.
    """
    check_temperature(tau, "tau")
    log_q_s = edge_difference_log_probs(student_logits, edge_index, tau)
    log_q_t = edge_difference_log_probs(teacher_logits.detach(), edge_index, tau)
    return _kl_rows(log_q_t, log_q_s)


def node_kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """GLNN's node-wise KD: ``(1/N) Σ_i KL(p_T[i] || p_S[i])`` over every node (temperature 1, as the code)."""
    log_s = F.log_softmax(upcast(student_logits), dim=-1)
    log_t = F.log_softmax(upcast(teacher_logits).detach(), dim=-1)
    return _kl_rows(log_t, log_s)


def ff_g2m_terms(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    targets: Tensor,
    train_mask: Tensor,
    edge_index: Tensor,
    mode: FFG2MMode = "ff_g2m",
    lamb: float = 0.4,
    tau: float = 1.5,
) -> dict[str, Tensor]:
    """FF-G2M's loss and its ablations as weighted terms ``{"loss", "ce", "lfd", "hfd" | "kd"}``.

    ``L = λ·CE + (1 − λ)·Σ_{t ∈ MODE_TERMS[mode]} L_t``; ``mode="mlp"``: ``L = CE``. Terms of weight 0 (``λ = 0``
    drops CE, ``λ = 1`` drops distillation) are not computed.

    Args:
        student_logits: ``[N, C]`` student logits of every node.
        teacher_logits: ``[N, C]`` teacher logits of every node (``None`` only for ``mode="mlp"``).
        targets: ``[N]`` class ids (only the ``train_mask`` ones are read).
        train_mask: ``[N]`` bool, the labelled nodes of the CE.
        edge_index: ``[2, E]`` the graph, with or without self loops (each term builds its own edge set).
        mode: ``"ff_g2m"`` (LFD + HFD), ``"glnn"`` (node-wise KD), ``"lfd"``, ``"hfd"`` or ``"mlp"`` (CE only).
        lamb: λ in [0, 1], the weight of the CE.
        tau: τ of the HFD.
    """
    if mode not in MODE_TERMS:
        raise KDConfigError("mode", f"must be one of {sorted(MODE_TERMS)}, got {mode!r}")
    if not 0.0 <= lamb <= 1.0:
        raise KDConfigError("lamb", f"must be in [0, 1], got {lamb!r}", "it weighs CE (λ) against distillation (1 − λ)")
    distill = MODE_TERMS[mode]
    weights = {"ce": 1.0} if mode == "mlp" else {"ce": lamb, **dict.fromkeys(distill, 1.0 - lamb)}
    if distill and active(1.0 - lamb) and teacher_logits is None:
        raise KDConfigError("teacher_logits", f"mode {mode!r} distils from the teacher's logits and none were given")
    terms: dict[str, Tensor] = {}
    if active(weights["ce"]):
        terms["ce"] = F.cross_entropy(upcast(student_logits[train_mask]), targets[train_mask])
    if active(1.0 - lamb) and distill:
        assert teacher_logits is not None
        num_nodes = student_logits.shape[0]
        if "lfd" in distill:
            terms["lfd"] = low_frequency_loss(student_logits, teacher_logits, with_self_loops(edge_index, num_nodes))
        if "hfd" in distill:
            terms["hfd"] = high_frequency_loss(student_logits, teacher_logits, without_self_loops(edge_index), tau)
        if "kd" in distill:
            terms["kd"] = node_kl_loss(student_logits, teacher_logits)
    return weighted_terms(terms, weights)
