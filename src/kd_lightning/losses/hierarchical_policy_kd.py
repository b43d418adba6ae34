"""Per-level policy distillation for hierarchical agents (STEVE-2 reconstruction) and the reward-only baseline.

For every level ``l`` of the hierarchy (manager, conductor, actor) and every factor ``f`` of that level, on the
states the data holds (the student's own, in DAgger-style collection):

``L_l = Σ_f [ w_T · τ² · KL(softmax(z_T^f/τ) ‖ softmax(z_S^f/τ)) + w_E · CE(z_S^f, y_E^f) ]``

``L = Σ_l λ_l · L_l``

``z_T`` are the (privileged) teacher's logits, ``y_E`` the extra expert's labels (``-1``: no valid label; such
samples are dropped from both terms of that factor, per sample). STEVE-2 (Zhao et al., arXiv 2404.04619) states
only "hierarchical knowledge distillation" with a "mirrored distillation method" and "an extra expert model"; this
loss is our reconstruction (``methods/14_steve2_embodied.md`` §6): τ = 1, ``w_E`` = 0.5, ``λ`` = (actor 1,
conductor 0.5, manager 0.5) by default. A flat policy distillation is the same loss over the actor level only.

:func:`reinforce_loss` is the reward-only baseline's objective (REINFORCE with a mean baseline and an entropy bonus).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.terms import check_weights

__all__ = ["DEFAULT_LEVEL_WEIGHTS", "HierarchicalPolicyKDLoss", "masked_cross_entropy", "reinforce_loss"]

#: Level weights of the reconstruction (§6 of the spec): L = L_actor + 0.5·L_conductor + 0.5·L_manager.
DEFAULT_LEVEL_WEIGHTS = {"actor": 1.0, "conductor": 0.5, "manager": 0.5}


def masked_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the samples whose label is ``>= 0`` (0 when there is none; the graph is kept)."""
    valid = labels >= 0
    per_item = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none", label_smoothing=label_smoothing)
    return (per_item * valid).sum() / valid.sum().clamp_min(1)


class HierarchicalPolicyKDLoss(nn.Module):
    """``{"loss": Σ_l λ_l·L_l, "<level>": λ_l·L_l}`` over the levels the student predicts (see the module doc).

    Args:
        teacher_weight: ``w_T``, weight of the KL to the teacher at every level (0: expert labels only).
        expert_weight: ``w_E``, weight of the cross-entropy to the extra expert's labels (0: teacher only).
        temperature: ``τ`` of the teacher KL (the term is scaled by ``τ²``).
        level_weights: ``λ_l`` per level name; levels not named weigh 1.
        label_smoothing: of the expert cross-entropy.
    """

    def __init__(
        self,
        teacher_weight: float = 1.0,
        expert_weight: float = 0.5,
        temperature: float = 1.0,
        level_weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise KDConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        check_weights(teacher_weight=teacher_weight, expert_weight=expert_weight)
        if teacher_weight == 0 and expert_weight == 0:
            raise KDConfigError("expert_weight", "and teacher_weight are both 0: nothing to learn from", "set one > 0")
        if not temperature > 0:
            raise KDConfigError("temperature", f"must be > 0, got {temperature}")
        weights = dict(DEFAULT_LEVEL_WEIGHTS if level_weights is None else level_weights)
        check_weights(**{f"level_weights.{k}": v for k, v in weights.items()})
        self.teacher_weight = teacher_weight
        self.expert_weight = expert_weight
        self.temperature = temperature
        self.level_weights = weights

    def forward(
        self,
        student: Mapping[str, Tensor],
        labels: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``student``/``teacher``: ``{"level/factor": logits (B, K)}``; ``labels``: ``{"level/factor": (B,)}``."""
        if teacher is None and self.expert_weight == 0:
            raise KDConfigError("teacher", "is missing and expert_weight is 0: nothing to learn from", "give a teacher")
        per_level: dict[str, Tensor] = {}
        for key, logits in student.items():
            level = key.split("/", 1)[0]
            if key not in labels:
                raise KDConfigError(
                    "labels", f"have no {key!r} (the student predicts it)", "use the environment's hierarchy"
                )
            target = labels[key]
            valid = target >= 0
            term = logits.new_zeros(())
            if teacher is not None and self.teacher_weight and key in teacher:
                if teacher[key].shape != logits.shape:
                    raise KDConfigError(
                        "teacher",
                        f"predicts {key} with shape {tuple(teacher[key].shape)}, the student {tuple(logits.shape)}",
                        "give both the same hierarchy",
                    )
                kl = forward_kl(logits, teacher[key].detach(), self.temperature, mask=valid)
                term = term + self.teacher_weight * self.temperature**2 * kl
            if self.expert_weight:
                term = term + self.expert_weight * masked_cross_entropy(logits, target, self.label_smoothing)
            per_level[level] = per_level.get(level, logits.new_zeros(())) + term
        out = {level: self.level_weights.get(level, 1.0) * value for level, value in per_level.items()}
        return {"loss": torch.stack(list(out.values())).sum(), **out}


def reinforce_loss(
    logits: Tensor, actions: Tensor, returns: Tensor, entropy_weight: float = 0.01, normalise: bool = True
) -> dict[str, Tensor]:
    """REINFORCE with a batch-mean baseline: ``−mean((G − mean G)·log π(a|s)) − β·mean H(π(·|s))``.

    Args:
        logits: action logits ``(B, A)``.
        actions: the actions taken ``(B,)``.
        returns: the discounted returns-to-go ``(B,)``.
        entropy_weight: ``β`` of the entropy bonus.
        normalise: divide the advantages by their standard deviation.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    advantages = returns - returns.mean()
    if normalise and advantages.numel() > 1:
        advantages = advantages / advantages.std().clamp_min(1e-6)
    chosen = log_probs.gather(1, actions.long()[:, None]).squeeze(1)
    policy = -(advantages.detach() * chosen).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return {"loss": policy - entropy_weight * entropy, "policy": policy, "entropy": -entropy_weight * entropy}
