"""Reward-only baseline for embodied distillation: the student trained by REINFORCE on the environment's reward.

Williams (1992): ``∇J = E[(G_t − b) ∇ log π(a_t|s_t)]`` with the discounted return-to-go ``G_t`` (data ``gamma``),
a batch-mean baseline ``b`` and an entropy bonus (:func:`~kd_lightning.losses.hierarchical_policy_kd.reinforce_loss`).
No teacher, no expert labels: the "no distillation" row of the embodied benchmarks, given the same environment
steps. Needs on-policy data: ``on_policy: true`` and ``beta_schedule: constant`` with ``beta0: 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.hierarchical_policy_kd import reinforce_loss
from kd_lightning.methods.core import SingleNetwork
from kd_lightning.methods.tasks.policy import PolicyDistillation

__all__ = ["PolicyGradient"]


class PolicyGradient(SingleNetwork, PolicyDistillation):
    """REINFORCE on the student's own episodes (see the module docstring).

    Args:
        model: the policy (``HierarchicalPolicy``; only its action head is trained).
        entropy_weight: ``β`` of the entropy bonus.
        normalise_advantages: divide advantages by their standard deviation in each batch.
        **kwargs: ``optimizer``, ``lr_scheduler`` and the core's switches.
    """

    takes_teacher: ClassVar[bool] = False

    def __init__(
        self, model: nn.Module, entropy_weight: float = 0.01, normalise_advantages: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(student=model, **kwargs)
        if entropy_weight < 0:
            raise KDConfigError("entropy_weight", f"must be >= 0, got {entropy_weight}")
        self.entropy_weight = entropy_weight
        self.normalise_advantages = normalise_advantages

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.student}

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if datamodule is not None and not (
            datamodule.on_policy and datamodule.beta_schedule == "constant" and datamodule.beta0 == 0
        ):
            raise KDConfigError(
                "data.init_args.on_policy",
                "REINFORCE needs the student's own current episodes, but the data keep old or teacher-driven steps",
                "set data.init_args.on_policy: true, beta_schedule: constant and beta0: 0",
            )

    def policy_loss(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        logits = student[self.student.action_key]
        return reinforce_loss(logits, batch["action"], batch["return"], self.entropy_weight, self.normalise_advantages)
