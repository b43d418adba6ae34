"""Supervised training: teachers and student-alone baselines."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.methods.base import ClassificationModule


class Supervised(ClassificationModule):
    """Cross-entropy training of one network, with optional label smoothing.

    ``L = CE(z, y)`` with targets ``(1 − ε)·onehot(y) + ε/C`` when ``label_smoothing = ε > 0``.
    Used by ``kd fit`` to train missing teachers and for the student-alone baseline.

    Args:
        model: the network to train (``forward`` returns logits).
        label_smoothing: ε in [0, 1).
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes`` and the other arguments of
            :class:`~kd_lightning.methods.base.ClassificationModule`.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.init_args.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.model = model
        self.label_smoothing = label_smoothing

    @property
    def network(self) -> nn.Module:
        return self.model

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def training_loss(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        x, y = self.unpack(batch)
        logits = self.model(x)
        ce = label_cross_entropy(logits, y, self.label_smoothing)
        return {"loss": ce, "ce": ce}, logits
