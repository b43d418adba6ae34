"""Base of feature- and relation-distillation methods: named taps on both networks, lazily built adapters.

A method names intermediate outputs of the student and the teacher by module path (``student_layers``,
``teacher_layers``; ``"path:input"`` for a module's input, e.g. a pre-activation); the taps read them
without changing either network's ``forward``. Its trainable parts (regressors, projectors, embedding
heads, memory banks) depend on the feature shapes, which are probed once — at ``setup`` from the data
module's ``input_shape``, or in ``__init__`` when ``input_shape`` is given — and stored in checkpoints so
that ``load_from_checkpoint`` rebuilds the parts before loading their weights.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.tasks.classification import ClassificationDistillation
from kd_lightning.models.taps import FeatureTaps, UnknownModuleError

__all__ = ["FeatureDistillationModule", "default_layers"]

_CHECKPOINT_KEY = "kd_feature_shapes"


def default_layers(model: nn.Module, field: str, stages: slice = slice(1, -1)) -> list[str]:
    """Stage names from a zoo model's ``feature_stages`` (by default the stages between stem and pooling).

    Raises:
        KDConfigError: the model lists no ``feature_stages``, so ``field`` must be given.
    """
    names = getattr(model, "feature_stages", None)
    if not names:
        raise KDConfigError(
            f"model.init_args.{field} is required: {type(model).__name__} has no feature_stages to choose from. "
            "List the module paths to distil (kd_lightning.models.module_names(model) prints them)."
        )
    return list(names)[stages]


class FeatureDistillationModule(ClassificationDistillation):
    """Distillation module that reads intermediate features of student and teacher.

    Args:
        student, teacher: the networks (see :class:`DistillationModule`).
        student_layers: module paths tapped on the student, in the order the method pairs them.
        teacher_layers: module paths tapped on the teacher.
        input_shape: one input without batch dimension, e.g. ``(3, 32, 32)``; builds the method's parts
            at construction. ``None`` waits for the data module's ``input_shape`` at ``setup``.
        clone_features: copy tapped tensors; needed for networks that overwrite them in place later
            (``ReLU(inplace=True)``, ``out += identity`` in timm/torchvision ResNets: the taps detect it
            and say so). The CIFAR zoo has no in-place operations.
        **kwargs: the arguments of :class:`DistillationModule`.

    Subclasses implement :meth:`build_parts` (create trainable parts from the feature shapes) and
    :meth:`feature_loss`. Unknown layer names fail at construction with close matches.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: Sequence[str] = (),
        teacher_layers: Sequence[str] = (),
        input_shape: Sequence[int] | None = None,
        clone_features: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        detach_teacher = not self.trains_teacher
        self.student_taps = self._taps(student, self.student_layers, "student_layers", False, clone_features)
        self.teacher_taps = self._taps(teacher, self.teacher_layers, "teacher_layers", detach_teacher, clone_features)
        self.feature_shapes: dict[str, Any] | None = None
        if input_shape is not None:
            self.build_from_input(tuple(input_shape))

    @staticmethod
    def _taps(model: nn.Module, names: list[str], field: str, detach: bool, clone: bool) -> FeatureTaps:
        try:
            return FeatureTaps(model, names, detach=detach, clone=clone, transient=True)
        except (UnknownModuleError, ValueError) as err:
            raise KDConfigError(f"model.init_args.{field}: {err}") from None

    # ------------------------------------------------------------------ shapes and parts
    def probe_shapes(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """Feature shapes (without batch dimension) of every tap, from one forward on zeros."""
        probe = torch.zeros(2, *input_shape, device=self.device)
        shapes: dict[str, Any] = {"input_shape": list(input_shape)}
        for key, taps in (("student", self.student_taps), ("teacher", self.teacher_taps)):
            module = taps.model
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    _, feats = taps(probe)
            finally:
                module.train(was_training)
            shapes[key] = [list(feats[name].shape[1:]) for name in taps.names]
        return shapes

    def build_from_input(self, input_shape: tuple[int, ...]) -> None:
        """Probe the feature shapes for ``input_shape`` and build the method's parts (once)."""
        if self.feature_shapes is not None:
            if list(input_shape) != self.feature_shapes["input_shape"]:
                raise KDConfigError(
                    f"{type(self).__name__} was built for inputs of shape {tuple(self.feature_shapes['input_shape'])}"
                    f" but the data gives {input_shape}: set model.init_args.input_shape to match the data."
                )
            return
        self._build(self.probe_shapes(input_shape))

    def _build(self, shapes: dict[str, Any]) -> None:
        self.feature_shapes = shapes
        self.build_parts([torch.Size(s) for s in shapes["student"]], [torch.Size(s) for s in shapes["teacher"]])
        self.to(self.device)  # parts built after the Trainer moved the module join it there

    @abstractmethod
    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Create the trainable parts (adapters, projectors, ...) from the tapped feature shapes."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:
            self.build_from_input(tuple(input_shape))
        elif self.feature_shapes is None:
            raise KDConfigError(
                f"{type(self).__name__} needs the input shape to build its parts: set model.init_args.input_shape "
                "(e.g. [3, 32, 32]) or use a data module with an input_shape attribute."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.feature_shapes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get(_CHECKPOINT_KEY)
        if self.feature_shapes is None and shapes is not None:
            self._build(shapes)

    # ------------------------------------------------------------------ training
    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor, list[Tensor]]:
        """``(student_logits, student_features, teacher_logits, teacher_features)``; features in layer order."""
        student_logits, student_feats = self.student_taps(x)
        if self.trains_teacher:
            teacher_logits, teacher_feats = self.teacher_taps(x)
        else:
            with torch.no_grad():
                teacher_logits, teacher_feats = self.teacher_taps(x)
        return (
            student_logits,
            [student_feats[name] for name in self.student_taps.names],
            teacher_logits,
            [teacher_feats[name] for name in self.teacher_taps.names],
        )

    def training_loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        x, y = self.unpack(batch)
        student_logits, student_feats, teacher_logits, teacher_feats = self.forward_features(x)
        parts = self.feature_loss(student_feats, teacher_feats, student_logits, teacher_logits, y, batch)
        return parts, student_logits

    @abstractmethod
    def feature_loss(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        batch: Any,
    ) -> dict[str, Tensor]:
        """The method's loss from the tapped features (and logits): ``{"loss": total, **weighted_parts}``."""
