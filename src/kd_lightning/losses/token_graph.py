"""Token-level relationship graph distillation (TRG; Zhang, Liu, He 2023, arXiv 2306.12442), pure torch.

RECONSTRUCTION. The paper's idea is verified from its abstract: the nodes of the graph are *tokens*
(pixels of a CNN feature map, patches of a ViT), the student imitates the teacher's token-level relations,
and a token-wise "contextual loss" transfers the relations inside each image. The exact formulas below
(cosine similarities, row softmax at a temperature with the self-edge excluded, KL rows, uniform token
sampling, the weights) are our reconstruction (``/work/shared/methods/02_trg.md``), not read from the
paper's body or official code (none was found). Every term has its own weight so it can be switched off.

Notation: ``t_i`` teacher token, ``s_i`` projected student token (same width), ``û = u/‖u‖``.

* graph rows ``A_ij = exp(cos(x_i, x_j)/τ) / Σ_{m≠i} exp(cos(x_i, x_m)/τ)`` for ``j ≠ i`` (:func:`token_graph`);
* edge loss: one cross-instance graph over the ``B·k`` sampled tokens, ``mean_i KL(A^T_i ‖ A^S_i)``;
* node loss: ``mean_i ‖ŝ_i − t̂_i‖²`` over the sampled tokens;
* contextual loss: one graph per image over all its ``N`` tokens (temperature ``τ_c``), ``mean_{b,n} KL``.

Similarities and softmaxes run in float32 (autocast off); the teacher tokens are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, gather_tokens, upcast
from kd_lightning.losses.divergences import kl_divergence
from kd_lightning.losses.logit import kd_kl_div
from kd_lightning.losses.terms import active, check_weights, weighted_terms

__all__ = [
    "TRGLoss",
    "contextual_loss",
    "edge_loss",
    "gather_tokens",
    "node_loss",
    "sample_token_indices",
    "token_graph",
    "tokens_from_features",
]

Grid = tuple[int, int]


def _pair(grid: int | Sequence[int] | None, name: str) -> Grid | None:
    if grid is None:
        return None
    pair = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(g) for g in grid)
    if len(pair) != 2 or min(pair) < 1:
        raise KDConfigError(f"{name} must be a positive int or [height, width], got {grid!r}.")
    return pair  # type: ignore[return-value]


def tokens_from_features(
    features: Tensor,
    num_prefix_tokens: int = 0,
    grid: int | Sequence[int] | None = None,
    token_grid: Sequence[int] | None = None,
) -> Tensor:
    """Turn a feature map or a token sequence into tokens ``[B, N, D]``, optionally pooled to ``grid``.

    Args:
        features: a CNN map ``[B, C, H, W]`` (token ``h·W + w`` is ``features[:, :, h, w]``) or ViT tokens
            ``[B, P + N, D]``.
        num_prefix_tokens: ``P``, the leading CLS / distillation / register tokens of a ViT, dropped.
            Ignored for 4-D maps.
        grid: adaptive-average-pool the spatial grid to ``(h, w)`` (an int means square); ``None`` keeps it.
        token_grid: the ``(H, W)`` patch grid of ViT tokens, needed only to pool them; ``None`` assumes a
            square grid.

    Raises:
        ValueError: features that are not 3-D/4-D, too many prefix tokens, or tokens that cannot be laid
            out on a grid for pooling.
    """
    target = _pair(grid, "grid")
    if features.dim() == 4:
        fmap = features
    elif features.dim() == 3:
        if not 0 <= num_prefix_tokens < features.shape[1]:
            raise KDConfigError(
                f"num_prefix_tokens={num_prefix_tokens} must be in [0, {features.shape[1]}) for tokens of shape "
                f"{tuple(features.shape)}."
            )
        tokens = features[:, num_prefix_tokens:]
        if target is None:
            return tokens
        n = tokens.shape[1]
        if token_grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise KDConfigError(
                    f"{n} tokens do not form a square grid, so they cannot be pooled to {target}: give their "
                    "token_grid (a timm ViT's patch_embed.grid_size) or check num_prefix_tokens."
                )
            token_grid = (side, side)
        h, w = (int(g) for g in token_grid)
        if h * w != n:
            raise KDConfigError(f"token_grid {tuple(token_grid)} holds {h * w} tokens, not {n}.")
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    else:
        raise KDConfigError(
            "TRG needs spatial features: a CNN map [B, C, H, W] or ViT tokens [B, N, D], got shape "
            f"{tuple(features.shape)} (a pooled vector has no tokens: tap an earlier layer)."
        )
    if target is not None and tuple(fmap.shape[-2:]) != target:
        fmap = F.adaptive_avg_pool2d(fmap, target)
    return fmap.flatten(2).transpose(1, 2)


def sample_token_indices(
    batch_size: int, num_tokens: int, k: int | None, generator: torch.Generator | None = None
) -> Tensor:
    """``[B, k]`` token indices, uniform without replacement per image (CPU ``long``).

    ``k = None`` or ``k >= num_tokens`` keeps every token (``arange`` rows). Use the same indices for
    teacher and student.
    """
    if k is not None and k < 1:
        raise KDConfigError(f"num_sampled_tokens must be >= 1 or None (all tokens), got {k}.")
    if k is None or k >= num_tokens:
        return torch.arange(num_tokens).expand(batch_size, num_tokens).clone()
    return torch.rand(batch_size, num_tokens, generator=generator).argsort(dim=1)[:, :k]


def _off_diagonal(square: Tensor) -> Tensor:
    """``[..., M, M]`` to ``[..., M, M-1]``: each row without its diagonal entry, other entries in order."""
    m = square.shape[-1]
    flat = square.flatten(-2)[..., 1:]  # drop [0, 0]; the rest falls in rows of M + 1 starting after each diagonal
    return flat.reshape(*square.shape[:-2], m - 1, m + 1)[..., :-1].reshape(*square.shape[:-2], m, m - 1)


def _similarity_logits(nodes: Tensor, temperature: float) -> Tensor:
    """Cosine similarities ``[..., M, M-1]`` (self excluded) over ``τ``, in float32 with autocast off."""
    if nodes.shape[-2] < 2:
        raise KDConfigError(
            f"a token graph needs at least 2 nodes, got {nodes.shape[-2]} (shape {tuple(nodes.shape)})."
        )
    with torch.autocast(device_type=nodes.device.type, enabled=False):
        x = F.normalize(nodes if nodes.dtype == torch.float64 else nodes.float(), dim=-1)
        return _off_diagonal(x @ x.transpose(-1, -2)) / temperature


def token_graph(nodes: Tensor, temperature: float = 0.1) -> Tensor:
    """Row-stochastic graph ``[..., M, M]`` of cosine similarities at ``τ``, self-edges excluded (diagonal 0).

    ``A_ij = exp(cos(x_i, x_j)/τ) / Σ_{m≠i} exp(cos(x_i, x_m)/τ)`` for ``j ≠ i``. For inspection; the losses
    work on the ``M − 1`` off-diagonal entries directly.
    """
    check_temperature(temperature)
    probs = _similarity_logits(nodes, temperature).softmax(-1)
    m = nodes.shape[-2]
    out = probs.new_zeros(*probs.shape[:-2], m, m)
    off = ~torch.eye(m, dtype=torch.bool, device=probs.device)
    out[..., off] = probs.reshape(*probs.shape[:-2], -1)
    return out


def _check_tokens(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise KDConfigError(
            f"{name}: student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ: "
            "project the student to the teacher's width and pool both to the same grid."
        )


def _relation_kl(student_nodes: Tensor, teacher_nodes: Tensor, temperature: float) -> Tensor:
    s = _similarity_logits(student_nodes, temperature)
    t = _similarity_logits(teacher_nodes.detach(), temperature)
    return kl_divergence(t, s)  # rows are the items: mean over rows of KL(A^T_i ‖ A^S_i)


def edge_loss(student_nodes: Tensor, teacher_nodes: Tensor, temperature: float = 0.1) -> Tensor:
    """Cross-instance graph term: all ``B·k`` nodes of ``[B, k, D]`` in one graph, ``mean_i KL(A^T_i ‖ A^S_i)``."""
    check_temperature(temperature, "edge_temperature")
    _check_tokens(student_nodes, teacher_nodes, "edge_loss")
    d = student_nodes.shape[-1]
    return _relation_kl(student_nodes.reshape(-1, d), teacher_nodes.reshape(-1, d), temperature)


def node_loss(student_nodes: Tensor, teacher_nodes: Tensor) -> Tensor:
    """``mean_i ‖ŝ_i − t̂_i‖²`` (L2-normalised tokens, summed over features, averaged over tokens)."""
    _check_tokens(student_nodes, teacher_nodes, "node_loss")
    with torch.autocast(device_type=student_nodes.device.type, enabled=False):
        s = F.normalize(upcast(student_nodes), dim=-1)
        t = F.normalize(upcast(teacher_nodes.detach()), dim=-1)
        return (s - t).pow(2).sum(-1).mean()


def contextual_loss(student_tokens: Tensor, teacher_tokens: Tensor, temperature: float = 0.1) -> Tensor:
    """Inner-instance term: one graph per image over its ``N`` tokens, ``mean_{b,n} KL(C^T_{b,n} ‖ C^S_{b,n})``."""
    check_temperature(temperature, "context_temperature")
    _check_tokens(student_tokens, teacher_tokens, "contextual_loss")
    if student_tokens.dim() != 3:
        raise KDConfigError(f"contextual_loss expects tokens [B, N, D], got {tuple(student_tokens.shape)}.")
    return _relation_kl(student_tokens, teacher_tokens, temperature)


def _as_list(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [value] if isinstance(value, Tensor) else list(value)


_TERMS = ("ce", "kd", "node", "edge", "context")


class TRGLoss(nn.Module):
    """TRG objective (RECONSTRUCTION, see the module docstring):

    ``w_CE·CE(z_S, y) + w_KD·T²·KL(p_T ‖ p_S) + Σ_pairs (w_node·L_node + w_edge·L_edge + w_ctx·L_ctx)``.

    Node and edge terms use ``k`` tokens per image sampled uniformly without replacement, the same indices
    for teacher and student; the contextual term uses all tokens. Terms with weight 0 are neither computed
    nor returned.

    Args:
        ce_weight: w_CE.
        kd_weight: w_KD, weight of Hinton's logit term (0 turns it off).
        temperature: T of the logit term.
        node_weight: w_node.
        edge_weight: w_edge.
        context_weight: w_ctx.
        edge_temperature: τ of the cross-instance graph.
        context_temperature: τ_c of the per-image graphs.
        num_sampled_tokens: k per image; ``None`` uses every token.

    Call as ``loss(student_logits, teacher_logits, target, student_tokens, teacher_tokens, generator=g)``
    with tokens ``[B, N, D]`` (or lists of them, one per tapped pair, summed); returns ``{"loss": total,
    **weighted_parts}``. The indices used are kept in :attr:`last_indices` (one ``[B, k]`` per pair).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        temperature: float = 4.0,
        node_weight: float = 1.0,
        edge_weight: float = 1.0,
        context_weight: float = 1.0,
        edge_temperature: float = 0.1,
        context_temperature: float = 0.1,
        num_sampled_tokens: int | None = 16,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_temperature(edge_temperature, "edge_temperature")
        check_temperature(context_temperature, "context_temperature")
        if num_sampled_tokens is not None and num_sampled_tokens < 1:
            raise KDConfigError(f"num_sampled_tokens must be >= 1 or None (all tokens), got {num_sampled_tokens}.")
        weights = (ce_weight, kd_weight, node_weight, edge_weight, context_weight)
        check_weights(**{f"{name}_weight": value for name, value in zip(_TERMS, weights, strict=True)})
        if not any(map(active, weights)):
            raise KDConfigError("TRGLoss: every weight is 0, so there is nothing to optimise.")
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.node_weight = node_weight
        self.edge_weight = edge_weight
        self.context_weight = context_weight
        self.edge_temperature = edge_temperature
        self.context_temperature = context_temperature
        self.num_sampled_tokens = num_sampled_tokens
        self.last_indices: list[Tensor] = []

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each term: ``ce``, ``kd``, ``node``, ``edge``, ``context``."""
        return {name: getattr(self, f"{name}_weight") for name in _TERMS}

    def relation_terms(
        self,
        student_tokens: Tensor | Sequence[Tensor],
        teacher_tokens: Tensor | Sequence[Tensor],
        indices: Tensor | Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted ``node`` / ``edge`` / ``context`` terms summed over the token pairs (non-zero weights only)."""
        students, teachers = _as_list(student_tokens), _as_list(teacher_tokens)
        if len(students) != len(teachers) or not students:
            raise KDConfigError(
                f"got {len(students)} student and {len(teachers)} teacher token tensors; need equal > 0."
            )
        given = None if indices is None else _as_list(indices)
        if given is not None and len(given) != len(students):
            raise KDConfigError(f"got {len(given)} index tensors for {len(students)} token pairs.")
        parts: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            parts[name] = parts[name] + value if name in parts else value

        self.last_indices = []
        for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
            if s.dim() != 3:
                raise KDConfigError(f"tokens must be [B, N, D], got student {tuple(s.shape)}.")
            _check_tokens(s, t, "TRGLoss")
            t = t.detach()
            if self.node_weight or self.edge_weight:
                idx = given[i] if given is not None else None
                if idx is None:
                    idx = sample_token_indices(s.shape[0], s.shape[1], self.num_sampled_tokens, generator)
                self.last_indices.append(idx)
                s_nodes, t_nodes = gather_tokens(s, idx), gather_tokens(t, idx)
                if self.node_weight:
                    add("node", node_loss(s_nodes, t_nodes))
                if self.edge_weight:
                    add("edge", edge_loss(s_nodes, t_nodes, self.edge_temperature))
            if self.context_weight:
                add("context", contextual_loss(s, t, self.context_temperature))
        return parts

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        student_tokens: Tensor | Sequence[Tensor],
        teacher_tokens: Tensor | Sequence[Tensor],
        indices: Tensor | Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        terms: dict[str, Tensor] = {}
        if self.ce_weight:
            flat = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
            terms["ce"] = F.cross_entropy(flat, target.reshape(-1))
        if self.kd_weight:
            terms["kd"] = kd_kl_div(student_logits, teacher_logits, self.temperature)
        terms.update(self.relation_terms(student_tokens, teacher_tokens, indices, generator))
        return weighted_terms(terms, self.weights)
