"""On-policy-distillation gradient alignment ("Unmasking On-Policy Distillation", Armandpour et al., Apple,
arXiv 2605.10889, 2026): pure-torch math of the diagnostic behind ``kd diagnose-opd``.

At a node ``u`` (a prompt plus a prefix of a student rollout) the student's next-token policy is
``π = softmax(z / T)``. For candidate tokens ``k ∈ K_u`` (the student's top-K tokens plus the sampled one),
``P_succ(u, k)`` is the fraction of student continuations from ``(u, k)`` that the verifier accepts. The ideal
objective ``L_ideal(u) = Σ_k π(k) P_succ(u, k)`` has the logit-space gradient

    g*_u = ∂L_ideal/∂z_u = π_K ⊙ (P_succ − ⟨π_K, P_succ⟩)          (on K_u, 0 elsewhere; π_K = π renormalised on K_u)

and a distillation configuration with target ``q`` (a teacher, or the student in a privileged context) moves the
logits along the descent direction of its loss:

    forward KL  KL(q ‖ π):  g_c = q − π
    reverse KL  KL(π ‖ q):  g_c = −π ⊙ (log π − log q − KL(π ‖ q))

The alignment of the configuration at ``u`` is ``cos(g*_u, g_c)``; it is undefined (the node is skipped and
counted) when all candidates succeed equally often (``g* = 0``) or when ``g_c = 0`` (``q = π``).

RECONSTRUCTION (the paper's abstract and a digest only; no code): the logit-space cosine (the paper may use
parameter space), the node selection rule (every ``every``-th token + the ``top_entropy`` highest-entropy
positions), K = 8 and M = 8, renormalising π on K_u, the distillation temperature (the sampling temperature on
both sides), whether the distillation direction is compared on the whole vocabulary (``space="vocab"``, default:
g* is zero off K_u) or on K_u only (``space="candidates"``: π and q renormalised on K_u), and the confidence
intervals (normal approximation; by default over per-question means, since nodes of one rollout are correlated)
are all choices of this reconstruction and arguments here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError

__all__ = [
    "DIVERGENCES",
    "SPACES",
    "alignment_cosine",
    "candidate_set",
    "difference_ci",
    "distillation_direction",
    "forward_kl_direction",
    "ideal_gradient",
    "mean_ci",
    "node_alignments",
    "position_bucket",
    "renormalise",
    "reverse_kl_direction",
    "select_nodes",
    "summarise",
    "token_entropy",
]

DIVERGENCES = ("forward_kl", "reverse_kl")
SPACES = ("vocab", "candidates")


# ---------------------------------------------------------------------------------------------- nodes
def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``H(softmax(z / T))`` (nats) over the last dimension of ``logits`` ``[..., V]``."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def select_nodes(entropy: Tensor, every: int = 16, top_entropy: int = 32) -> Tensor:
    """Node positions of one rollout: every ``every``-th response token (0, every, 2·every, ...) and the
    ``top_entropy`` positions of highest student entropy (ties: the earlier position), sorted, without repeats.

    Args:
        entropy: ``[N]`` student entropy at each response position.
        every: stride of the regular nodes (0: none).
        top_entropy: how many highest-entropy positions to add (0: none).
    """
    if every < 0 or top_entropy < 0:
        raise KDConfigError("nodes", f"every={every}, top_entropy={top_entropy} must be >= 0", "pass 0 to disable one")
    n = int(entropy.shape[0])
    chosen: set[int] = set(range(0, n, every)) if every > 0 else set()
    if top_entropy > 0 and n:
        order = torch.argsort(-entropy.float(), stable=True)[: min(top_entropy, n)]
        chosen.update(int(i) for i in order)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def candidate_set(logits: Tensor, sampled_token: int, k: int = 8) -> Tensor:
    """``K_u``: the ``k`` most probable student tokens (most probable first) plus the sampled token when it is not
    among them, as ``[|K_u|]`` ids (``|K_u|`` is ``k`` or ``k + 1``; ``min(k, V)`` when the vocabulary is smaller)."""
    if k < 1:
        raise KDConfigError("candidates", f"must be >= 1, got {k}", "use the paper's K = 8")
    top = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1).indices
    if bool((top == sampled_token).any()):
        return top
    return torch.cat([top, top.new_tensor([sampled_token])])


def renormalise(probs: Tensor, candidates: Tensor) -> Tensor:
    """``π`` restricted to ``candidates`` and renormalised: ``π(k) / Σ_{j∈K} π(j)`` for ``k ∈ K`` (``[..., K]``)."""
    restricted = probs.gather(-1, candidates)
    return restricted / restricted.sum(-1, keepdim=True).clamp_min(torch.finfo(restricted.dtype).tiny)


# ---------------------------------------------------------------------------------------------- directions
def ideal_gradient(pi: Tensor, p_succ: Tensor) -> Tensor:
    """``g* = π ⊙ (P_succ − ⟨π, P_succ⟩)``: the gradient of ``L_ideal = Σ_k π(k) P_succ(k)`` with respect to the
    logits of ``π = softmax(z)`` (over the last dimension; ``pi`` is a distribution over the same entries)."""
    expected = (pi * p_succ).sum(-1, keepdim=True)
    return pi * (p_succ - expected)


def forward_kl_direction(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """``q − π``: minus the gradient of ``KL(q ‖ π)`` with respect to the student's logits (log-probs in)."""
    return teacher_log_probs.exp() - student_log_probs.exp()


def reverse_kl_direction(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """``−π ⊙ (log π − log q − KL(π ‖ q))``: minus the gradient of ``KL(π ‖ q)`` with respect to the student's
    logits (log-probs in; entries with ``π = 0`` contribute 0)."""
    pi = student_log_probs.exp()
    ratio = torch.where(pi > 0, student_log_probs - teacher_log_probs, torch.zeros_like(pi))
    kl = (pi * ratio).sum(-1, keepdim=True)
    return -pi * (ratio - kl)


def distillation_direction(divergence: str, student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """The descent direction (logit space) of ``divergence`` in :data:`DIVERGENCES`."""
    if divergence == "forward_kl":
        return forward_kl_direction(student_log_probs, teacher_log_probs)
    if divergence == "reverse_kl":
        return reverse_kl_direction(student_log_probs, teacher_log_probs)
    raise KDConfigError("divergences", f"unknown divergence {divergence!r}", f"choose from {', '.join(DIVERGENCES)}")


def alignment_cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> float:
    """``cos(a, b)`` of two flattened vectors, ``nan`` when either has (near-)zero norm (undefined)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if float(na) <= eps or float(nb) <= eps:
        return math.nan
    return float((a @ b) / (na * nb))


def node_alignments(
    student_logits: Tensor,
    teacher_logits: Mapping[str, Tensor],
    candidates: Tensor,
    p_succ: Tensor,
    divergences: Sequence[str] = DIVERGENCES,
    temperature: float = 1.0,
    space: str = "vocab",
    equal_tol: float = 0.0,
) -> dict[str, Any]:
    """Alignment of every configuration and divergence at one node.

    Args:
        student_logits: ``[V]`` the student's logits at the node.
        teacher_logits: configuration name -> ``[V]`` logits of its target ``q`` at the node (same vocabulary).
        candidates: ``[K]`` ids of ``K_u``.
        p_succ: ``[K]`` success-rate estimates of the candidates.
        divergences: subset of :data:`DIVERGENCES`.
        temperature: ``π = softmax(z / T)``, ``q = softmax(z_q / T)``.
        space: ``"vocab"`` (g_c on the whole vocabulary, g* zero off K_u) or ``"candidates"`` (π and q
            renormalised on K_u, both directions on K_u).
        equal_tol: the node is skipped when ``max P_succ − min P_succ <= equal_tol``.

    Returns:
        ``{"ideal": g* (in ``space``), "spread": max − min P_succ, "expected_success": ⟨π_K, P_succ⟩,
        "skipped": None | "equal_success", "cosine": {(configuration, divergence): float (nan: undefined)},
        "directions": {(configuration, divergence): g_c (in ``space``)}}``. In ``"candidates"`` space a vector
        ``v[j]`` belongs to token ``candidates[j]`` (the logits of the other tokens do not enter).
    """
    if space not in SPACES:
        raise KDConfigError("space", f"unknown space {space!r}", f"choose from {', '.join(SPACES)}")
    log_pi = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pi_k = renormalise(log_pi.exp(), candidates)
    p_succ = p_succ.to(pi_k)
    g_k = ideal_gradient(pi_k, p_succ)
    spread = float(p_succ.max() - p_succ.min()) if p_succ.numel() else 0.0
    ideal = torch.zeros_like(log_pi).index_put((candidates,), g_k) if space == "vocab" else g_k
    skipped = "equal_success" if spread <= equal_tol else None
    cosines: dict[tuple[str, str], float] = {}
    directions: dict[tuple[str, str], Tensor] = {}
    for name, logits in teacher_logits.items():
        log_q = F.log_softmax(logits.float() / temperature, dim=-1)
        if space == "vocab":
            s, t = log_pi, log_q
        else:
            s = torch.log(renormalise(log_pi.exp(), candidates))
            t = torch.log(renormalise(log_q.exp(), candidates))
        for divergence in divergences:
            direction = distillation_direction(divergence, s, t)
            directions[(name, divergence)] = direction
            cosines[(name, divergence)] = math.nan if skipped else alignment_cosine(ideal, direction)
    return {
        "ideal": ideal,
        "spread": spread,
        "expected_success": float((pi_k * p_succ).sum()),
        "skipped": skipped,
        "cosine": cosines,
        "directions": directions,
    }


# ---------------------------------------------------------------------------------------------- aggregation
def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise KDConfigError("ci_level", f"must be in (0, 1), got {level}", "use 0.95")
    return NormalDist().inv_cdf(0.5 + level / 2)


def mean_ci(values: Iterable[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean and normal-approximation confidence interval ``mean ± z·s/√n`` (``s``: sample standard deviation) of
    the finite ``values``; ``None`` bounds with fewer than two values, ``None`` mean with none."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _z(level) * sd / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def difference_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> dict[str, float | None]:
    """``mean(a) − mean(b)`` with a normal-approximation (Welch) interval; ``None`` where undefined."""
    xa = [float(v) for v in a if v is not None and math.isfinite(float(v))]
    xb = [float(v) for v in b if v is not None and math.isfinite(float(v))]
    if not xa or not xb:
        return {"difference": None, "ci_low": None, "ci_high": None}
    diff = sum(xa) / len(xa) - sum(xb) / len(xb)
    if len(xa) < 2 or len(xb) < 2:
        return {"difference": diff, "ci_low": None, "ci_high": None}

    def var(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    half = _z(level) * math.sqrt(var(xa) / len(xa) + var(xb) / len(xb))
    return {"difference": diff, "ci_low": diff - half, "ci_high": diff + half}


def position_bucket(relative_position: float, buckets: int = 3) -> str:
    """The label (``"0-33%"``, ...) of the equal-width bucket of ``relative_position`` in [0, 1]."""
    if buckets < 1:
        raise KDConfigError("position_buckets", f"must be >= 1, got {buckets}", "use 3")
    index = min(int(relative_position * buckets), buckets - 1)
    lo, hi = round(100 * index / buckets), round(100 * (index + 1) / buckets)
    return f"{lo}-{hi}%"


def _unit_values(rows: Sequence[Mapping[str, Any]], ci_unit: str, value: str = "cosine") -> list[float]:
    values = [(r["question"], float(r[value])) for r in rows if _finite(r.get(value))]
    if ci_unit == "node":
        return [v for _, v in values]
    if ci_unit != "question":
        raise KDConfigError("ci_unit", f"unknown unit {ci_unit!r}", "choose question or node")
    per: dict[Any, list[float]] = {}
    for question, value in values:
        per.setdefault(question, []).append(value)
    return [sum(v) / len(v) for v in per.values()]


def _finite(value: Any) -> bool:
    try:
        return value is not None and value != "" and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _group_stats(rows: Sequence[Mapping[str, Any]], ci_unit: str, level: float, value: str) -> dict[str, Any]:
    stats = mean_ci(_unit_values(rows, ci_unit, value), level)
    defined = [r for r in rows if _finite(r.get(value))]
    return {
        "mean": stats["mean"],
        "ci_low": stats["ci_low"],
        "ci_high": stats["ci_high"],
        "n_nodes": len(defined),
        "n_questions": len({r["question"] for r in defined}),
        "n_skipped": len(rows) - len(defined),
    }


def summarise(
    rows: Sequence[Mapping[str, Any]],
    ci_unit: str = "question",
    level: float = 0.95,
    buckets: int = 3,
    key: Callable[[Mapping[str, Any]], str] = lambda r: f"{r['configuration']}/{r['divergence']}",
    value: str = "cosine",
) -> dict[str, Any]:
    """Mean alignment with CIs per ``configuration/divergence``: by rollout correctness (``correct``,
    ``incorrect``, ``all``), by relative-position bucket, and ``incorrect − correct`` (the paper's finding is
    that it is positive). ``ci_unit="question"`` averages each question's nodes first (the CI's sample is the
    questions); ``"node"`` treats nodes as independent. Rows need ``question``, ``rollout_correct``,
    ``relative_position``, ``value`` (default ``cosine``; empty/nan: skipped) and the fields of ``key``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    by_correctness: dict[str, Any] = {}
    by_position: dict[str, Any] = {}
    gap: dict[str, Any] = {}
    for name, members in groups.items():
        correct = [r for r in members if _truthy(r["rollout_correct"])]
        incorrect = [r for r in members if not _truthy(r["rollout_correct"])]
        by_correctness[name] = {
            "correct": _group_stats(correct, ci_unit, level, value),
            "incorrect": _group_stats(incorrect, ci_unit, level, value),
            "all": _group_stats(members, ci_unit, level, value),
        }
        positions: dict[str, list[Mapping[str, Any]]] = {}
        for r in members:
            positions.setdefault(position_bucket(float(r["relative_position"]), buckets), []).append(r)
        by_position[name] = {
            label: _group_stats(positions[label], ci_unit, level, value)
            for label in sorted(positions, key=lambda s: int(s.split("-")[0]))
        }
        gap[name] = difference_ci(_unit_values(incorrect, ci_unit, value), _unit_values(correct, ci_unit, value), level)
    return {"by_correctness": by_correctness, "by_position": by_position, "incorrect_minus_correct": gap}


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
