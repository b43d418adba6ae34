"""AdaKD: LLM-oriented token-adaptive knowledge distillation (Xie et al.; AAAI 2026; arXiv 2510.11615)."""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class AdaKD(ClassificationDistillation):
    """AdaKD: distil the hardest fraction ``r`` of the items (LATF), each at its own temperature (IDTS).

    ``L = kd_ratio·mean_{i∈S} T_i²·D(p_T^{T_i} ‖ p_S^{T_i}) + (1 − kd_ratio)·CE`` with ``S`` the
    ``max(1, ⌊r·N⌋)`` items of highest difficulty ``s_i`` (Hellinger distance of the T = 1
    distributions by default) and ``T_i = T_base·exp(−c·tanh(log(s_i/median_S s)))``
    (:class:`~kd_lightning.losses.adakd.AdaKDLoss`, configured as ``loss``). For images an item is a sample.
    ``r`` is updated once per optimizer step from the trend of an EMA of the rank-averaged AdaKD loss; ``r``
    and the EMA state are buffers of the loss (checkpointed). Logged: ``train/adakd_ratio``,
    ``train/adakd_selected`` (fraction of the batch distilled), ``train/adakd_temperature`` (mean T_i).

    Verified against the official ``SassyRong/AdaKD`` code (``loss/losses.py``: scores, selection,
    temperatures, per-token loss; ``distillation.py``: LATF update; ``scripts/gpt2/AdaKD/AdaKD.sh``:
    defaults). RECONSTRUCTION: the temperatures are detached by default (official: gradients reach the
    student through the score; ``detach_temperature=False``); the paper has no vision results, so the
    CIFAR/digits recipes (``min_ratio``, ``kd_ratio``) are ours.

    Args:
        loss: the AdaKD loss and its LATF schedule (``divergence``, ``score``, ``latf``, ``idts``,
            ``base_temperature``, ``min_ratio``, ``kd_ratio``, ...: see :class:`~kd_lightning.losses.adakd.AdaKDLoss`);
            ``None``: the released script's defaults.
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    object_arguments = (*ClassificationDistillation.object_arguments, "loss")

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: AdaKDLoss | None = None, **kwargs: Any) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = loss if loss is not None else AdaKDLoss()

    @property
    def ratio(self) -> float:
        """The current LATF fraction ``r``."""
        return float(self.criterion.ratio)
