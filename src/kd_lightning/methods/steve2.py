"""STEVE-2-style hierarchical mirrored distillation of an acting teacher (+ an extra expert) into one agent.

Zhao et al., "Do We Really Need a Complex Agent System? Distill Embodied Agent into a Single Model" (STEVE-2),
arXiv 2404.04619. Verified (abstract only): a hierarchical KD framework with "a hierarchical system for
multi-granular task division", "a mirrored distillation method for parallel simulation data" and "an extra expert
model for bringing additional knowledge into parallel simulation"; after distillation the single agent completes
open-ended tasks without expert guidance (Minecraft navigation and creation, "1.4x - 7.3x"). Checked again for this
implementation: the abstract on arXiv mirrors (takara.ai, arxivlens, researchtrend, emergentmind) and papers with
code ("No code implementations yet"); the method section, equations and tables could not be read. **Everything
below is a reconstruction** (``methods/14_steve2_embodied.md``), every choice an argument:

- **hierarchy** — task -> sub-task (manager) -> subgoal (conductor) -> action (actor); the student
  (:class:`~kd_lightning.models.policy.HierarchicalPolicy`, egocentric view + instruction, one forward pass) mirrors
  the teacher's levels and is distilled at each: ``L = Σ_l λ_l Σ_f [w_T τ² KL(T‖S) + w_E CE(S, y_E)]``
  (:class:`~kd_lightning.losses.hierarchical_policy_kd.HierarchicalPolicyKDLoss`); the student's ``hierarchy``
  sets the depth (``{actor: ...}`` alone is flat policy distillation);
- **mirrored distillation over parallel simulation** — N vectorised environments run the student; the teacher
  labels the student's own states (DAgger: teacher-driven steps with probability ``β_i``, decaying), and mirror
  rollouts branch teacher(+expert) continuations off the student's states (data-module arguments
  ``beta_schedule``, ``mirror_every``, ``mirror_horizon``);
- **extra expert** — the scripted privileged expert (BabyAI bot / Crafter planner) brings its knowledge into the
  parallel simulation as advice on the teacher's steps (data ``expert_advice``) and as extra labels
  (``expert_weight``); both 0 is the ablation without it.

The teacher is a privileged network (full grid / semantic map), frozen and in eval mode; ``kd fit`` trains a
missing one by DAgger from the expert (:class:`~kd_lightning.methods.tasks.policy.PolicySupervised`). Not
reconstructed: the paper's multimodal LLM agents and Minecraft, the optional mirror preference loss of the spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from kd_lightning.losses.hierarchical_policy_kd import HierarchicalPolicyKDLoss
from kd_lightning.methods.tasks.policy import PolicyDistillation

__all__ = ["HierarchicalMirroredKD"]


class HierarchicalMirroredKD(PolicyDistillation):
    """Per-level distillation of a privileged teacher and an extra expert into a hierarchical student.

    Args:
        student: the deployed policy (``HierarchicalPolicy``, ``observation: image``).
        teacher: the privileged teacher policy; ``None``: the expert alone (its labels, ``expert_weight``).
        teacher_weight: ``w_T`` of the per-level KL to the teacher.
        expert_weight: ``w_E`` of the per-level cross-entropy to the extra expert's labels (0: no extra labels).
        temperature: ``τ`` of the KL.
        level_weights: ``λ_l`` per level (default actor 1, conductor 0.5, manager 0.5).
        **kwargs: the core's arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        teacher_weight: float = 1.0,
        expert_weight: float = 0.5,
        temperature: float = 1.0,
        level_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.loss = HierarchicalPolicyKDLoss(teacher_weight, expert_weight, temperature, level_weights)

    def uses_teacher_outputs(self) -> bool:
        return self.loss.teacher_weight > 0

    def policy_loss(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        return self.loss(student, labels, teacher)
