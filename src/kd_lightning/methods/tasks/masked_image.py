"""Masked-image-modelling task sibling: :class:`MaskedImageDistillation`.

Masked pre-training trains no classifier: a method draws patch masks, reconstructs the removed patches and
distils features. What the task adds to the core: images from any batch layout (a tensor, ``(x, *rest)`` or
``{"input": x}``; labels are not needed), evaluation of the same named terms on masks drawn from a fixed seed
(the same masks every epoch, so validation losses are comparable), and an image-shape check at ``setup``.
A missing teacher is trained as a supervised classifier on the data's labels
(:class:`~kd_lightning.methods.tasks.classification.Supervised`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.core import DistillationModule
from kd_lightning.methods.tasks.classification import Supervised

__all__ = ["MaskedImageDistillation"]


class MaskedImageDistillation(DistillationModule):
    """Base of masked-image distillation methods.

    Subclasses implement :meth:`masked_loss` (named terms for images ``x``, a mask drawn with ``generator``
    or at random) and :meth:`expected_input_shape`.

    Args:
        student: the network pre-trained by masked modelling.
        teacher: the network distilled from.
        eval_mask_seed: seed of the validation/test masks (batch ``i`` uses ``eval_mask_seed + i``).
        **kwargs: the core's arguments (``teacher_ckpt``, ``optimizer``, ...).
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = Supervised

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None = None, eval_mask_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.eval_mask_seed = eval_mask_seed

    @staticmethod
    def images(batch: Any) -> Tensor:
        """The images of a batch: a tensor, ``(x, *rest)`` or ``{"input": x, ...}``."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, Mapping):
            return batch["input"]
        return batch[0]

    def inputs_of(self, batch: Any) -> Tensor:
        return self.images(batch)

    def masked_loss(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Named terms ``{"loss", ...}`` for images ``x`` with masks drawn from ``generator`` (random if ``None``)."""
        raise NotImplementedError(f"{type(self).__name__} implements no masked_loss")

    def expected_input_shape(self) -> tuple[int, ...] | None:
        """The image shape ``(C, H, W)`` the networks take (``None``: no check)."""
        return None

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        return self.masked_loss(self.images(batch))

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        x = self.images(batch)
        generator = torch.Generator().manual_seed(self.eval_mask_seed + batch_idx)
        self.log_terms(stage, self.masked_loss(x, generator), batch_size=x.shape[0])

    def check_data(self, datamodule: Any) -> None:
        input_shape = getattr(datamodule, "input_shape", None)
        expected = self.expected_input_shape()
        if input_shape is not None and expected is not None and tuple(input_shape) != tuple(expected):
            raise KDConfigError(
                "model.init_args.student",
                f"{type(datamodule).__name__} gives images of shape {tuple(input_shape)} but the networks expect "
                f"{tuple(expected)}",
                "set img_size/in_chans of model.init_args.student and teacher to match the data",
            )
