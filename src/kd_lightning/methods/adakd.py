"""AdaKD: LLM-oriented token-adaptive knowledge distillation (Xie et al.; AAAI 2026; arXiv 2510.11615)."""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import Tensor, nn
from torch.optim import Optimizer

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.methods.base import DistillationModule


class AdaKD(DistillationModule):
    """AdaKD: distil the hardest fraction ``r`` of the items (LATF), each at its own temperature (IDTS).

    ``L = kd_ratio·mean_{i∈S} T_i²·D(p_T^{T_i} ‖ p_S^{T_i}) + (1 − kd_ratio)·CE`` with ``S`` the
    ``max(1, ⌊r·N⌋)`` items of highest difficulty ``s_i`` (Hellinger distance of the T = 1
    distributions by default) and ``T_i = T_base·exp(−c·tanh(log(s_i/median_S s)))``
    (:class:`~kd_lightning.losses.adakd.AdaKDLoss`). For images an item is a sample. ``r`` is updated
    once per optimizer step from the trend of an EMA of the rank-averaged AdaKD loss; ``r`` and the EMA
    state are buffers of ``criterion`` (checkpointed). Logged: ``train/adakd_ratio``,
    ``train/adakd_selected`` (fraction of the batch distilled), ``train/adakd_temperature`` (mean T_i).

    Verified against the official ``SassyRong/AdaKD`` code (``loss/losses.py``: scores, selection,
    temperatures, per-token loss; ``distillation.py``: LATF update; ``scripts/gpt2/AdaKD/AdaKD.sh``:
    defaults). RECONSTRUCTION: the temperatures are detached by default (official: gradients reach the
    student through the score; ``detach_temperature=False``); the paper has no vision results, so the
    CIFAR/digits recipes (``min_ratio``, ``kd_ratio``) are ours.

    Args:
        divergence: ``D``, ``"reverse_kl"`` (released script) or ``"forward_kl"``.
        score: difficulty, ``"hellinger"`` (released script), ``"reverse_kl"`` or ``"forward_kl"``.
        latf: LATF item selection on/off.
        idts: IDTS temperatures on/off (off: every item at ``base_temperature``).
        temperature_soften: ablation: harder items get higher temperatures.
        base_temperature: ``T_base``.
        temperature_scale: ``c``.
        initial_ratio: ``r_0``.
        min_ratio: ``r_min`` (official 0.1; the spec suggests >= 0.3 for one item per image).
        ratio_step: ``σ``.
        loss_tolerance: ``ε``.
        ema_decay: decay of the loss EMA.
        warmup_fraction: fraction of training before LATF starts comparing the EMA to its reference.
        review_ratio: probability of distilling the whole batch.
        kd_ratio: weight of the AdaKD term; ``1 − kd_ratio`` weights CE on labels.
        detach_temperature: no gradient through ``T_i`` (see above).
        student, teacher, **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    #: Its step needs nothing of the teacher but its logits (it wraps the base's training step): a
    #: :class:`~kd_lightning.callbacks.TeacherLogitCache` may serve them.
    uses_teacher_logits_only = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        divergence: Literal["reverse_kl", "forward_kl"] = "reverse_kl",
        score: Literal["hellinger", "reverse_kl", "forward_kl"] = "hellinger",
        latf: bool = True,
        idts: bool = True,
        temperature_soften: bool = False,
        base_temperature: float = 1.0,
        temperature_scale: float = 0.5,
        initial_ratio: float = 1.0,
        min_ratio: float = 0.1,
        ratio_step: float = 0.05,
        loss_tolerance: float = 0.05,
        ema_decay: float = 0.99,
        warmup_fraction: float = 0.05,
        review_ratio: float = 0.0,
        kd_ratio: float = 1.0,
        detach_temperature: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, **kwargs)
        try:
            self.criterion = AdaKDLoss(
                divergence=divergence,
                score=score,
                latf=latf,
                idts=idts,
                temperature_soften=temperature_soften,
                base_temperature=base_temperature,
                temperature_scale=temperature_scale,
                initial_ratio=initial_ratio,
                min_ratio=min_ratio,
                ratio_step=ratio_step,
                loss_tolerance=loss_tolerance,
                ema_decay=ema_decay,
                warmup_fraction=warmup_fraction,
                review_ratio=review_ratio,
                kd_ratio=kd_ratio,
                detach_temperature=detach_temperature,
            )
        except ValueError as err:
            raise KDConfigError(f"model.init_args.{err}") from None

    @property
    def ratio(self) -> float:
        """The current LATF fraction ``r``."""
        return float(self.criterion.ratio)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        criterion = self.criterion
        stats = {"adakd_ratio": float(criterion.ratio), "adakd_selected": criterion.last_selected_fraction}
        if criterion.idts and math.isfinite(criterion.last_mean_temperature):
            stats["adakd_temperature"] = criterion.last_mean_temperature
        for name, value in stats.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Once per optimizer step: update ``r`` from the rank-averaged AdaKD loss of this step."""
        self.criterion.update_schedule(self.training_progress())
