"""Embodied-policy task sibling: :class:`PolicyDistillation` (agents distilled from acting teachers) and
:class:`PolicySupervised` (one policy learned from the scripted expert's labels: behaviour cloning / DAgger, and
how ``kd fit`` trains a missing privileged teacher).

Data: :class:`~kd_lightning.data.embodied.EnvRolloutDataModule`. Training batches are transitions
``{image, mission, privileged, privileged_vector, labels, action, return, source}``; the expert's ``labels``
hold one column per factor of the environment's hierarchy (``-1``: no label). Evaluation batches are per-episode
statistics of one role (student, teacher, expert), from episodes the data module runs with :meth:`act`.

Networks (:class:`~kd_lightning.models.policy.HierarchicalPolicy`) read one view: the student ``image`` +
``mission`` (what a deployed agent has), a teacher the ``privileged`` simulator state. At setup every network's
view, shape, categories and hierarchy are checked against the environment, and a student that reads privileged
state is refused.

Metrics: ``<stage>/success`` (episodes solved), ``length``, ``return``, ``efficiency`` (SPL-style:
``success·L_E / max(L_E, L)`` against the expert's length on the same seed) per role (``teacher_success``, ...);
Crafter adds each achievement's success rate, the family rates (``success_navigation``, ``success_creation``:
mean rate of the family's achievements) and the Crafter score ``exp(mean ln(1 + p_i)) − 1`` (p in %). Each
training epoch logs the collection: ``rollout/steps_per_s``, ``env_steps``, ``mirror_steps``, ``beta``, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.hierarchical_policy_kd import HierarchicalPolicyKDLoss
from kd_lightning.methods.core import DistillationModule, SingleNetwork, describe

__all__ = ["EMBODIED", "PolicyDistillation", "PolicySupervised", "crafter_score"]

#: The data task these methods train on (``EnvRolloutDataModule.task``).
EMBODIED = "embodied"
EPISODE_STATS = ("success", "length", "return", "efficiency")
PRIVILEGED_VIEWS = ("privileged",)


def crafter_score(success_rates_percent: Tensor) -> Tensor:
    """Crafter's score: ``exp(mean_i ln(1 + p_i)) − 1`` over the achievements' success rates ``p_i`` in percent."""
    return torch.exp(torch.log1p(success_rates_percent).mean()) - 1


def _sub_hierarchy_problem(
    network: Mapping[str, Mapping[str, int]], env: Mapping[str, Mapping[str, int]]
) -> str | None:
    for level, factors in network.items():
        if level not in env:
            return f"has level {level!r}, the environment's levels are {list(env)}"
        for factor, size in factors.items():
            if env[level].get(factor) != size:
                return f"has {level}/{factor} with {size} classes, the environment's is {dict(env[level])}"
    if list(network)[-1] != list(env)[-1]:
        return f"does not end with the action level {list(env)[-1]!r}"
    return None


class PolicyDistillation(DistillationModule):
    """Embodied agents: a student policy learns, on its own states, from frozen acting teacher(s) and the expert.

    Args:
        student: the deployed policy (``HierarchicalPolicy`` with ``observation: image``).
        teacher: a privileged teacher policy (``observation: privileged``); ``None`` lets the scripted expert play
            the teacher (its labels only).
        allow_privileged_student: accept a student that reads privileged state (an upper bound, not an agent).
        **kwargs: the core's arguments (``teacher_ckpt``, ``optimizer``, ...).

    Subclasses implement :meth:`policy_loss` (``(student outputs, teacher outputs or None, labels, batch) ->
    terms``).
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # PolicySupervised, set below
    requires_teacher: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        allow_privileged_student: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.allow_privileged_student = allow_privileged_student
        self.env_factors: list[str] = []
        self.achievement_names: tuple[str, ...] = ()
        self.achievement_families: dict[str, tuple[str, ...]] = {}
        self.task_family = ""
        self.metrics = nn.ModuleDict()

    # ------------------------------------------------------------------ checks
    def networks_to_check(self) -> dict[str, nn.Module]:
        return {
            "student": self.student,
            **{f"teacher.{n}" if n != "teacher" else "teacher": t for n, t in self.teachers.items()},
        }

    def check_data(self, datamodule: Any) -> None:
        if datamodule is None:
            return
        if getattr(datamodule, "task", None) != EMBODIED:
            raise KDConfigError(
                "data",
                f"{type(self).__name__} trains policies in environments, got {type(datamodule).__name__}",
                "use EnvRolloutDataModule",
            )
        shapes = datamodule.input_shapes
        categories = {"image": datamodule.image_categories, "privileged": datamodule.privileged_categories}
        vocab = int(datamodule.observation_space["mission"].high.max()) + 1
        for name, network in self.networks_to_check().items():
            field = f"model.init_args.{name}"
            key = getattr(network, "input_key", None)
            if key is None:
                raise KDConfigError(field, f"{describe(network)} is not a policy network", "use HierarchicalPolicy")
            if key in PRIVILEGED_VIEWS and not datamodule.expose_privileged:
                raise KDConfigError(
                    field,
                    f"reads the privileged simulator state, which {datamodule.env_id} does not expose here "
                    "(data.init_args.expose_privileged is false)",
                    "set data.init_args.expose_privileged: true, or give a teacher with observation: image",
                )
            if name == "student" and key in PRIVILEGED_VIEWS and not self.allow_privileged_student:
                raise KDConfigError(
                    field,
                    "reads the privileged simulator state, which a deployed agent does not have",
                    "use observation: image for the student (or allow_privileged_student: true for an upper bound)",
                )
            if tuple(network.input_shape) != shapes[key]:
                raise KDConfigError(
                    f"{field}.init_args.input_shape",
                    f"is {list(network.input_shape)} but {datamodule.env_id}'s {key!r} observation is "
                    f"{list(shapes[key])}",
                    f"set input_shape: {list(shapes[key])}",
                )
            wanted = categories[key]
            have = network.input_categories
            if (wanted is None) != (have is None) or (wanted is not None and tuple(wanted) != tuple(have)):
                raise KDConfigError(
                    f"{field}.init_args.input_categories",
                    f"is {None if have is None else list(have)} but {datamodule.env_id}'s {key!r} observation has "
                    f"{'pixels' if wanted is None else list(wanted)}",
                    f"set input_categories: {'null' if wanted is None else list(wanted)}",
                )
            if network.vocab_size and network.vocab_size < vocab:
                raise KDConfigError(
                    f"{field}.init_args.vocab_size",
                    f"is {network.vocab_size} but missions use {vocab} word ids",
                    f"set vocab_size: {vocab}",
                )
            if key in PRIVILEGED_VIEWS and network.vector_size not in (0, shapes["privileged_vector"][0]):
                raise KDConfigError(
                    f"{field}.init_args.vector_size",
                    f"is {network.vector_size} but privileged_vector has {shapes['privileged_vector'][0]} values",
                    f"set vector_size: {shapes['privileged_vector'][0]}",
                )
            problem = _sub_hierarchy_problem(network.hierarchy, datamodule.hierarchy)
            if problem:
                raise KDConfigError(
                    f"{field}.init_args.hierarchy", problem, "use (a part of) the environment's hierarchy"
                )
        self.env_factors = list(datamodule.factor_names)
        self.achievement_names = tuple(datamodule.achievement_names)
        self.achievement_families = dict(datamodule.achievement_families)
        self.task_family = datamodule.task_family
        self._build_metrics()

    def _build_metrics(self) -> None:
        if len(self.metrics):
            return
        for stage in ("val", "test"):
            for role in ("student", "teacher", "expert"):
                for stat in EPISODE_STATS:
                    self.metrics[f"{stage}_{role}_{stat}"] = MeanMetric()
                for i, _ in enumerate(self.achievement_names):
                    self.metrics[f"{stage}_{role}_ach{i}"] = MeanMetric()

    # ------------------------------------------------------------------ acting
    def inputs_of(self, batch: Any) -> Any:
        """The observation dict the student reads (its view and the mission): ``predict`` returns its outputs."""
        return {key: batch[key] for key in (self.student.input_key, "mission") if key in batch}

    def act(self, observation: Mapping[str, Tensor], role: str, greedy: bool = True) -> Tensor | None:
        """Actions of ``role`` (``student`` or ``teacher``) for a batch of observations; ``None`` when the role has no
        network (the data module then lets the expert act)."""
        if role == "student":
            network = self.student
            outputs = network(observation)
        elif len(self.teachers):
            network = self.teacher
            outputs = self.run_teacher(observation)
        else:
            return None
        logits = outputs[network.action_key].float()
        if greedy:
            return logits.argmax(dim=-1)
        return torch.distributions.Categorical(logits=logits).sample()

    def evaluation_roles(self, stage: str) -> tuple[str, ...]:
        """Roles evaluated in ``stage``: the student always; teacher and expert at test (reference rows)."""
        if stage == "test":
            return ("student", "teacher", "expert") if len(self.teachers) else ("student", "expert")
        return ("student",)

    # ------------------------------------------------------------------ training
    def labels_of(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The expert's labels as ``{"level/factor": (B,)}``."""
        labels = batch["labels"]
        if labels.shape[-1] != len(self.env_factors):
            raise KDConfigError(
                "data",
                f"labels have {labels.shape[-1]} columns, the hierarchy {len(self.env_factors)} factors",
                "use the environment's data module",
            )
        return {name: labels[:, j] for j, name in enumerate(self.env_factors)}

    def batch_size_of(self, batch: Any) -> int:
        return int(batch["labels"].shape[0])

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        labels = self.labels_of(batch)
        teacher = self.run_teacher(batch) if len(self.teachers) and self.uses_teacher_outputs() else None
        student = self.student(batch)
        terms = self.policy_loss(student, teacher, labels, batch)
        with torch.no_grad():
            action = self.student.action_key
            valid = labels[action] >= 0
            agree = (student[action].argmax(-1) == labels[action]).float()
            terms = {**terms, "expert_agreement": (agree * valid).sum() / valid.sum().clamp_min(1)}
        return terms

    def uses_teacher_outputs(self) -> bool:
        return True

    def policy_loss(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} implements no policy_loss")

    def log_terms(self, stage: str, terms: Mapping[str, Tensor], batch_size: int) -> None:
        super().log_terms(stage, {k: v for k, v in terms.items() if k != "expert_agreement"}, batch_size)
        if "expert_agreement" in terms:
            self.log(
                f"{stage}/expert_agreement",
                terms["expert_agreement"],
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
            )

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        stats = getattr(self.trainer.datamodule, "collection_stats", None) or {}
        for name, value in stats.items():
            self.log(f"rollout/{name}", float(value), on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        role = batch["role"]
        prefix = "" if role == "student" else f"{role}_"
        n = int(batch["success"].shape[0])
        for stat in EPISODE_STATS:
            metric = self.metrics[f"{stage}_{role}_{stat}"]
            metric.update(batch[stat].to(self.device))
            self.log(f"{stage}/{prefix}{stat}", metric, batch_size=n, prog_bar=(stat == "success" and not prefix))
        if self.task_family and not self.achievement_names:
            metric = self.metrics[f"{stage}_{role}_success"]
            self.log(f"{stage}/{prefix}success_{self.task_family}", metric, batch_size=n)
        for i, _ in enumerate(self.achievement_names):
            self.metrics[f"{stage}_{role}_ach{i}"].update(batch["achievements"][:, i].to(self.device))

    def _achievement_epoch_end(self, stage: str) -> None:
        if not self.achievement_names:
            return
        for role in ("student", "teacher", "expert"):
            metrics = [self.metrics[f"{stage}_{role}_ach{i}"] for i in range(len(self.achievement_names))]
            if not metrics[0].update_called:
                continue
            prefix = "" if role == "student" else f"{role}_"
            rates = torch.stack([m.compute() for m in metrics]) * 100.0
            self.log(f"{stage}/{prefix}crafter_score", crafter_score(rates), batch_size=1)
            by_name = dict(zip(self.achievement_names, rates))
            for family, names in self.achievement_families.items():
                family_rates = [by_name[n] for n in names if n in by_name]
                if family_rates:
                    self.log(
                        f"{stage}/{prefix}success_{family}", torch.stack(family_rates).mean() / 100.0, batch_size=1
                    )
            if role == "student":
                for name, rate in by_name.items():
                    self.log(f"{stage}/achievement/{name}", rate / 100.0, batch_size=1)
            for metric in metrics:
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._achievement_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._achievement_epoch_end("test")

    def export_metadata(self) -> dict[str, Any]:
        return {"task": EMBODIED, "hierarchy": getattr(self.student, "hierarchy", None)}


class PolicySupervised(SingleNetwork, PolicyDistillation):
    """One policy learned from the scripted expert's labels at every level it predicts (no teacher network).

    ``L = Σ_l λ_l Σ_f CE(z^f, y_E^f)`` on the states the data module collects: behaviour cloning with
    ``beta_schedule: constant`` and ``beta0: 1`` (expert-driven data), DAgger (Ross et al. 2011) with a decaying
    schedule (student-driven data, expert labels). ``kd fit`` trains a missing privileged teacher with it (DAgger
    from the expert on privileged inputs).

    Args:
        model: the policy (any view: a privileged network is accepted here).
        label_smoothing: ε of the cross-entropy.
        level_weights: ``λ_l`` per level (default actor 1, conductor 0.5, manager 0.5).
        **kwargs: ``optimizer``, ``lr_scheduler`` and the core's switches.
    """

    takes_teacher: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        label_smoothing: float = 0.0,
        level_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=model, allow_privileged_student=True, **kwargs)
        self.set_label_smoothing(label_smoothing)
        self.loss = HierarchicalPolicyKDLoss(
            teacher_weight=0.0, expert_weight=1.0, level_weights=level_weights, label_smoothing=label_smoothing
        )

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.student}

    def policy_loss(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor] | None,
        labels: Mapping[str, Tensor],
        batch: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        return self.loss(student, labels)


PolicyDistillation.teacher_training_module = PolicySupervised
