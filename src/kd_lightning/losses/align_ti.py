"""Align-TI (Chen et al., "Beyond Next-Token Alignment: Distilling Multimodal Large Language Models via Token
Interactions", arXiv 2602.09483, ICML 2026): the loss terms in plain torch — a **RECONSTRUCTION**.

The official repository (github.com/lchen1019/Align-TI) releases model/evaluation code and checkpoints only, no
training or loss code. Verified (abstract on arXiv and in the PMLR v306 proceedings, ``chen26gr``; the
Hugging Face model card; a third-party review quoting the IRS definition up to its expectation): two components,

- **IVA** (Instruction-aware Vision Alignment, prefill): the student imitates the teacher's extraction of
  instruction-relevant visual information by aligning *only the salient visual tokens*, found from the
  instruction-to-vision attention of one layer; that layer is chosen by the Instruction-Relevance Score
  ``IRS(l) = 1 − E_{x1,x2}[sim(α^(l)(x1), α^(l)(x2))]`` over pairs of different inputs (``α^(l)(x)``: the
  vectorised instruction-to-vision attention of layer ``l``; the similarity is cut off in the sources we
  could read — cosine assumed, :func:`instruction_relevance_scores` also offers ``"overlap"``).
- **TPA** (Transition Probability Alignment, decoding): align the teacher's and the student's "sequential
  token-to-token transition probabilities" instead of only per-position next-token distributions.

NOT verified (every one an argument): the IVA loss form and the projector, the salient ratio ρ, the TPA
definition and its top-k, the loss weights. The forms below follow the project spec
(``shared/methods/13e_align_ti.md``)::

    a^(l)(x)   = L1-normalise( mean_{heads, instruction tokens i} A^(l)[i, visual tokens] )        ∈ R^{N_v}
    IRS(l)     = 1 − mean_{x1 ≠ x2} cos(a^(l)(x1), a^(l)(x2))
    S          = top-⌈ρ·N_v⌉ visual tokens by a_T^(l*)(x)
    L_IVA      = mean_{v ∈ S} ‖W h_S^(l_s)[v] − h_T^(l*)[v]‖² / d_T          (W: d_S → d_T, trainable)
    r_X(t)     = softmax(z_X[t, K_t] / τ)          K_t = teacher top-k at position t (X ∈ {T, S})
    J_X(t)     = r_X(t) ⊗ r_X(t+1)                 (k × k joint of two consecutive response positions)
    L_TPA      = Σ_t KL(J_T(t) ‖ J_S(t))            over t with both positions valid

Note on TPA: with teacher-forced logits ``p(·|y≤t)`` is conditioned on the *given* ``y_t``, so the joint is
an outer product and ``log J = log r(t) ⊕ log r(t+1)``: ``KL(J_T ‖ J_S) = KL(r_T(t) ‖ r_S(t)) +
KL(r_T(t+1) ‖ r_S(t+1))`` exactly (tested). Under this reconstruction TPA is a top-k-restricted,
renormalised token KL in which interior positions count twice; a candidate-conditioned transition
(``p(·|y<t, v)`` for every ``v ∈ K_t``) would need k extra forward passes and is not implemented.

Conventions: logits ``[B, T, V]`` already in the next-token convention (both shifted the same way),
``mask [B, T]`` boolean; teacher inputs are detached (gradients reach the student and the projector only);
softmaxes in at least float32; no ``τ²`` factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, upcast

__all__ = [
    "instruction_relevance_scores",
    "instruction_to_vision_attention",
    "iva_attention_kl",
    "iva_loss",
    "num_salient",
    "salient_visual_tokens",
    "transition_probability_alignment",
]

Similarity = Literal["cosine", "overlap"]
SIMILARITIES: tuple[str, ...] = ("cosine", "overlap")


# ---------------------------------------------------------------------------------------------- IRS
def instruction_to_vision_attention(
    attentions: Tensor,
    instruction_mask: Tensor,
    num_image_tokens: int,
    visual_start: int = 0,
    eps: float = 1e-12,
) -> Tensor:
    """``a(x) ∈ R^{N_v}``: mean over heads and instruction tokens of the attention paid to the visual tokens,
    L1-normalised (a distribution over the visual tokens).

    Args:
        attentions: one layer's softmax attention ``[B, H, L, L]`` (row = query, column = key).
        instruction_mask: ``[B, L]`` boolean, True at the instruction (question) tokens; a ``[B, L − N_v]``
            text-only mask (the VQA batches' ``instruction_mask``) is taken to follow the visual tokens
            (LLaVA-style prepending, ``visual_start = 0``) and padded with False in front.
        num_image_tokens: ``N_v``.
        visual_start: index of the first visual token in the sequence.
        eps: floor of the normaliser.

    Returns ``[B, N_v]`` (float32 or wider); a row without instruction tokens (or with no attention on the
    visual tokens) is uniform.
    """
    if attentions.dim() != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise KDConfigError(
            "attentions", f"must be one layer's attention [B, H, L, L], got {tuple(attentions.shape)}", None
        )
    batch, _, length, _ = attentions.shape
    if num_image_tokens < 1 or visual_start < 0 or visual_start + num_image_tokens > length:
        raise KDConfigError(
            "num_image_tokens",
            f"the visual tokens [{visual_start}, {visual_start + num_image_tokens}) do not fit a sequence of {length}",
            "give the VLM's num_image_tokens and where they start",
        )
    mask = instruction_mask.bool()
    if mask.dim() == 2 and mask.shape == (batch, length - num_image_tokens) and visual_start == 0:
        mask = F.pad(mask, (num_image_tokens, 0), value=False)
    if mask.shape != (batch, length):
        raise KDConfigError(
            "instruction_mask",
            f"must be [B, L] = {(batch, length)} or text-only {(batch, length - num_image_tokens)}, "
            f"got {tuple(mask.shape)}",
            None,
        )
    to_visual = upcast(attentions[..., visual_start : visual_start + num_image_tokens]).mean(1)  # [B, L, N_v]
    weights = mask.to(to_visual.dtype)
    pooled = (to_visual * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    total = pooled.sum(-1, keepdim=True)
    uniform = torch.full_like(pooled, 1.0 / num_image_tokens)
    return torch.where(total > eps, pooled / total.clamp_min(eps), uniform)


def _pair_similarity(vectors: Tensor, similarity: Similarity, eps: float) -> Tensor:
    """``[N, N]`` similarities of the rows of ``[N, D]``."""
    if similarity == "cosine":
        unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)
        return unit @ unit.T
    # overlap: Σ_v min(a1_v, a2_v) = 1 − total variation, for L1-normalised rows
    return torch.minimum(vectors.unsqueeze(1), vectors.unsqueeze(0)).sum(-1)


def instruction_relevance_scores(
    per_layer_vectors: Sequence[Tensor] | Tensor,
    similarity: Similarity = "cosine",
    eps: float = 1e-12,
) -> Tensor:
    """``IRS(l) = 1 − mean_{x1 ≠ x2} sim(a^(l)(x1), a^(l)(x2))`` for every layer: ``[num_layers]``.

    A layer whose instruction-to-vision attention is the same for every input scores 0; the more the
    attention depends on the input (the instruction), the higher.

    Args:
        per_layer_vectors: per layer, the ``[N, N_v]`` attention vectors of ``N ≥ 2`` calibration inputs
            (:func:`instruction_to_vision_attention`), or one ``[num_layers, N, N_v]`` tensor.
        similarity: ``"cosine"`` (assumed by the spec) or ``"overlap"`` (``Σ_v min``: 1 − total variation).
        eps: floor of the norms.
    """
    if similarity not in SIMILARITIES:
        raise KDConfigError("similarity", f"must be one of {SIMILARITIES}, got {similarity!r}", None)
    layers = list(per_layer_vectors)
    if not layers:
        raise KDConfigError("per_layer_vectors", "is empty", "give one [N, N_v] tensor per layer")
    scores = []
    for vectors in layers:
        if vectors.dim() != 2 or vectors.shape[0] < 2:
            raise KDConfigError(
                "per_layer_vectors",
                f"each layer needs [N, N_v] vectors of N >= 2 inputs, got {tuple(vectors.shape)}",
                "calibrate on at least two examples",
            )
        n = vectors.shape[0]
        sims = _pair_similarity(upcast(vectors.detach()), similarity, eps)
        off_diagonal = (sims.sum() - sims.diagonal().sum()) / (n * (n - 1))
        scores.append(1.0 - off_diagonal)
    return torch.stack(scores)


# ---------------------------------------------------------------------------------------------- IVA
def num_salient(num_tokens: int, ratio: float) -> int:
    """``max(1, ⌈ρ·N_v⌉)`` (rounded to 9 decimals first, so 0.3·10 is 3, not 4)."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise KDConfigError("salient_ratio", f"must be in (0, 1], got {ratio!r}", "e.g. 0.25 keeps a quarter")
    return max(1, min(num_tokens, math.ceil(round(ratio * num_tokens, 9))))


def salient_visual_tokens(attention: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """The top-ρ fraction of visual tokens by (teacher) attention: ``(indices [B, k], mask [B, N_v])``.

    ``k = max(1, ⌈ρ·N_v⌉)``; indices in decreasing attention, ties broken by ``torch.topk``.
    """
    if attention.dim() != 2:
        raise KDConfigError("attention", f"must be [B, N_v], got {tuple(attention.shape)}", None)
    k = num_salient(attention.shape[-1], ratio)
    indices = attention.detach().topk(k, dim=-1).indices
    mask = torch.zeros_like(attention, dtype=torch.bool).scatter(-1, indices, True)
    return indices, mask


def iva_loss(
    student_hidden_visual: Tensor,
    teacher_hidden_visual: Tensor,
    salient_mask: Tensor | None = None,
    projector: Callable[[Tensor], Tensor] | None = None,
    normalize: bool = False,
) -> Tensor:
    """``L_IVA = mean_{salient (b, v)} ‖W h_S[b, v] − h_T[b, v]‖² / d_T`` (a scalar).

    Args:
        student_hidden_visual: student hidden states at the visual tokens ``[B, N_v, d_S]``.
        teacher_hidden_visual: teacher hidden states at the same tokens ``[B, N_v, d_T]`` (detached here).
        salient_mask: ``[B, N_v]`` boolean (:func:`salient_visual_tokens`); ``None`` uses every token.
        projector: ``W`` (``d_S → d_T``, e.g. an ``nn.Linear``); ``None`` needs ``d_S = d_T``.
        normalize: layer-normalise both sides (no affine) before the squared error: invariant to the scale of
            the teacher's residual stream (not in the spec: an option).
    """
    projected = projector(student_hidden_visual) if projector is not None else student_hidden_visual
    target = teacher_hidden_visual.detach()
    if projected.shape != target.shape:
        raise KDConfigError(
            "projector",
            f"the (projected) student visual states {tuple(projected.shape)} and the teacher's "
            f"{tuple(target.shape)} differ",
            "project the student's hidden size to the teacher's (W: d_S -> d_T)",
        )
    projected, target = upcast(projected), upcast(target)
    if normalize:
        projected = F.layer_norm(projected, projected.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    per_token = (projected - target).pow(2).sum(-1) / target.shape[-1]  # [B, N_v]
    if salient_mask is None:
        return per_token.mean()
    if salient_mask.shape != per_token.shape:
        raise KDConfigError("salient_mask", f"must be {tuple(per_token.shape)}, got {tuple(salient_mask.shape)}", None)
    weights = salient_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def iva_attention_kl(
    student_attention: Tensor,
    teacher_attention: Tensor,
    salient_mask: Tensor,
    eps: float = 1e-8,
) -> Tensor:
    """The spec's alternative IVA: ``mean_b KL(â_T ‖ â_S)``, ``â`` the attention vector restricted to the
    salient tokens and renormalised there (``eps`` floors the probabilities before the log)."""
    if student_attention.shape != teacher_attention.shape or salient_mask.shape != teacher_attention.shape:
        raise KDConfigError(
            "attention",
            f"student {tuple(student_attention.shape)}, teacher {tuple(teacher_attention.shape)} and salient "
            f"mask {tuple(salient_mask.shape)} must all be [B, N_v]",
            None,
        )
    weights = salient_mask.to(upcast(student_attention).dtype)

    def restricted(a: Tensor) -> Tensor:
        kept = upcast(a).clamp_min(0) * weights + eps * weights
        return kept / kept.sum(-1, keepdim=True)

    p = restricted(teacher_attention.detach())
    q = restricted(student_attention)
    log_ratio = torch.where(salient_mask, p.clamp_min(eps).log() - q.clamp_min(eps).log(), torch.zeros_like(p))
    return (p * log_ratio).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- TPA
def transition_probability_alignment(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    top_k: int = 20,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(Σ_t KL(J_T(t) ‖ J_S(t)), number of transitions)`` over consecutive valid positions ``(t, t+1)``.

    ``J_X(t) = softmax(z_X[t, K_t]/τ) ⊗ softmax(z_X[t+1, K_{t+1}]/τ)`` with ``K_t`` the teacher's top-k
    tokens at ``t`` (see the module docstring). The joint is formed explicitly (``[B, T−1, k, k]``).

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` in the next-token convention (teacher detached).
        mask: ``[B, T]`` boolean: positions whose prediction counts (response tokens).
        top_k: k (capped at V).
        temperature: τ of the restricted softmaxes.
    """
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise KDConfigError(
            "logits",
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} must be equal [B, T, V]",
            "align the vocabularies and shift both the same way",
        )
    if mask.shape != student_logits.shape[:2]:
        raise KDConfigError("mask", f"must be {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise KDConfigError("tpa_top_k", f"must be an integer >= 1, got {top_k!r}", None)
    check_temperature(temperature)
    k = min(top_k, student_logits.shape[-1])
    teacher = upcast(teacher_logits.detach())
    index = teacher.topk(k, dim=-1).indices
    log_rt = F.log_softmax(teacher.gather(-1, index) / temperature, dim=-1)
    log_rs = F.log_softmax(upcast(student_logits).gather(-1, index) / temperature, dim=-1)
    log_jt = log_rt[:, :-1, :, None] + log_rt[:, 1:, None, :]  # [B, T-1, k, k]
    log_js = log_rs[:, :-1, :, None] + log_rs[:, 1:, None, :]
    kl = (log_jt.exp() * (log_jt - log_js)).sum((-2, -1))  # [B, T-1]
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    return (kl * valid.to(kl.dtype)).sum(), valid.sum()
