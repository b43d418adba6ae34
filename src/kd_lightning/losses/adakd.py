"""AdaKD: token-adaptive knowledge distillation (Xie et al., AAAI 2026; arXiv 2510.11615), pure torch.

Two switchable parts around a logit divergence ``D``, both driven by a per-item difficulty score
``s_i`` (teacher–student discrepancy at T = 1, no gradient):

- **LATF** distils only the hardest fraction ``r`` of the valid items,
  ``n_sel = max(1, ⌊r·N_valid⌋)``; ``r`` follows the trend of an EMA of the distillation loss
  (shrinks while the loss falls by more than ε relative, grows back when it rises).
- **IDTS** gives each selected item its own temperature
  ``T_i = T_base·exp(−c·tanh(log(s_i/median_S s)))``: harder items get a *lower* temperature
  (``temperature_soften=True`` flips the sign: the paper's ablation).

``L_AdaKD = mean_{i∈S} T_i²·D(softmax(z_T,i/T_i), softmax(z_S,i/T_i))``. Items are the leading positions
of ``[..., C]`` logits (samples of ``[B, C]``, tokens of ``[B, T, V]``); a boolean ``mask`` of the
leading shape marks the valid items (masked items are never selected). The LATF state (``r``, the
EMA and its reference) are persistent buffers of :class:`AdaKDLoss`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import forward_kl, reduce_items, reverse_kl
from kd_lightning.losses.schedule import Progress, ScheduledLoss
from kd_lightning.losses.taid import pending_over_ranks
from kd_lightning.losses.terms import weighted_terms

__all__ = ["AdaKDLoss", "adakd_difficulty", "idts_temperatures", "select_hardest"]

Score = Literal["hellinger", "reverse_kl", "forward_kl"]
Divergence = Literal["reverse_kl", "forward_kl"]
_DIVERGENCES = {"reverse_kl": reverse_kl, "forward_kl": forward_kl}


def adakd_difficulty(student_logits: Tensor, teacher_logits: Tensor, score: Score = "hellinger") -> Tensor:
    """Per-item difficulty ``s_i`` at T = 1, shape ``[...]`` (no gradient).

    ``"hellinger"``: ``‖√p_S − √p_T‖₂/√2`` ∈ [0, 1] (released script); ``"reverse_kl"``:
    ``KL(p_S ‖ p_T)`` (official CLI default); ``"forward_kl"``: ``KL(p_T ‖ p_S)``.
    """
    with torch.no_grad():
        s, t = upcast(student_logits).detach(), upcast(teacher_logits).detach()
        if score == "hellinger":
            diff = F.softmax(s, dim=-1).sqrt() - F.softmax(t, dim=-1).sqrt()
            return diff.pow(2).sum(-1).sqrt() / math.sqrt(2.0)
        if score == "reverse_kl":
            return reverse_kl(s, t, reduction="none")
        if score == "forward_kl":
            return forward_kl(s, t, reduction="none")
    raise KDConfigError(f"score must be 'hellinger', 'reverse_kl' or 'forward_kl', got {score!r}.")


def select_hardest(scores: Tensor, ratio: float, mask: Tensor | None = None) -> Tensor:
    """Boolean mask (shape of ``scores``) of the ``max(1, ⌊ratio·N_valid⌋)`` highest-scoring valid items.

    No item is selected when no item is valid. Ties are broken by ``torch.topk``.
    """
    if not 0.0 < ratio <= 1.0:
        raise KDConfigError(f"ratio must be in (0, 1], got {ratio}.")
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if valid.shape != scores.shape:
        raise KDConfigError(f"mask must have the items' shape {tuple(scores.shape)}, got {tuple(valid.shape)}.")
    n_valid = int(valid.sum().item())
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_valid == 0:
        return selected.reshape(scores.shape)
    n_sel = max(1, math.floor(ratio * n_valid))
    ranked = scores.detach().reshape(-1).masked_fill(~valid.reshape(-1), float("-inf"))
    selected[torch.topk(ranked, n_sel).indices] = True
    return selected.reshape(scores.shape)


def idts_temperatures(
    scores: Tensor,
    base_temperature: float = 1.0,
    scale: float = 0.5,
    soften: bool = False,
    mask: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """IDTS temperatures ``T_i = T_base·exp(∓c·tanh(log(s_i/m)))``, ``m`` the median of ``scores[mask]``.

    ``−`` (default): harder items (``s_i > m``) get ``T_i < T_base``; ``soften=True`` uses ``+``. The
    median is ``torch.median``'s (the lower of the two middle values for an even count), as in the
    official code. ``eps`` keeps the ratio finite when scores are 0: ``(s_i + eps)/(m + eps)``, so equal
    scores give ``T_i = T_base``. Items outside ``mask`` get ``T_base``.
    """
    check_temperature(base_temperature, "base_temperature")
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    temperatures = torch.full_like(scores, float(base_temperature))
    if not valid.any():
        return temperatures
    median = scores[valid].median()
    u = torch.tanh(torch.log((scores + eps) / (median + eps)))
    sign = 1.0 if soften else -1.0
    return torch.where(valid, base_temperature * torch.exp(sign * scale * u), temperatures)


class AdaKDLoss(nn.Module, ScheduledLoss):
    """AdaKD: LATF item selection + IDTS temperatures around a divergence, plus an optional cross-entropy.

    ``total = kd_ratio·L_AdaKD + (1 − kd_ratio)·CE(z_S, y)``; returns ``{"loss", "adakd", "ce"}``
    (weighted parts; ``"ce"`` only when ``kd_ratio < 1``). With ``latf=False`` every valid item is
    used; with ``idts=False`` every item has ``T_base`` — both off is ``T_base²·D`` at ``T_base``.

    LATF schedule (official ``distillation.py``, once per optimizer step, from the rank-averaged
    unweighted ``L_AdaKD`` ℓ_n)::

        e_n = λ·e_{n−1} + (1 − λ)·ℓ_n   (e_0 = ℓ_0)
        reference e_ref := e_n at the first update with progress > warmup_fraction
        afterwards: Δ = e_ref − e_n;  Δ >  ε·e_ref → r ← max(r_min, r·(1 − σ)), e_ref ← e_n
                                      Δ < −ε·e_ref → r ← min(1, r·(1 + σ)),     e_ref ← e_n

    In training mode every call records its ``L_AdaKD``; :meth:`update_schedule` averages the calls since
    the last update (``all_reduce`` when ``torch.distributed`` is initialised) and steps once.

    Args:
        divergence: ``D``: ``"reverse_kl"`` (released script, ``rkd``) or ``"forward_kl"``.
        score: difficulty score: ``"hellinger"`` (released script), ``"reverse_kl"`` (official CLI
            default) or ``"forward_kl"``.
        latf: select the hardest fraction ``r`` of the items.
        idts: per-item temperatures.
        temperature_soften: IDTS ablation, harder items get *higher* temperatures.
        base_temperature: ``T_base`` (released 1.0).
        temperature_scale: ``c`` (released script 0.5, CLI default 0.6).
        initial_ratio: ``r_0`` (official 1.0).
        min_ratio: ``r_min`` (official 0.1).
        ratio_step: ``σ``, relative change of ``r`` (released 0.05, CLI default 0.1).
        loss_tolerance: ``ε``, relative EMA change that moves ``r`` (released 0.05, CLI default 0.1).
        ema_decay: ``λ`` of the loss EMA (official 0.99).
        warmup_fraction: fraction of training before the reference EMA is taken (released 0.05).
        review_ratio: probability of distilling every valid item in a batch (official default 0).
        kd_ratio: weight of ``L_AdaKD``; ``1 − kd_ratio`` weights the cross-entropy (released 1.0).
        detach_temperature: IDTS temperatures carry no gradient. RECONSTRUCTION: the official code
            computes the score from non-detached student logits, so gradients also flow through
            ``T_i``; ``False`` reproduces that.
        score_eps: ``eps`` of :func:`idts_temperatures`.
        ignore_index: label of items left out of the cross-entropy (padding tokens).
    """

    needs_run_length = True

    ratio: Tensor
    ema: Tensor
    reference: Tensor
    has_reference: Tensor
    num_updates: Tensor

    def __init__(
        self,
        divergence: Divergence = "reverse_kl",
        score: Score = "hellinger",
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
        score_eps: float = 1e-8,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if divergence not in _DIVERGENCES:
            raise KDConfigError(f"divergence must be one of {sorted(_DIVERGENCES)}, got {divergence!r}.")
        if score not in ("hellinger", "reverse_kl", "forward_kl"):
            raise KDConfigError(f"score must be 'hellinger', 'reverse_kl' or 'forward_kl', got {score!r}.")
        check_temperature(base_temperature, "base_temperature")
        bounds = {  # name: (value, valid, allowed range)
            "temperature_scale": (temperature_scale, temperature_scale >= 0, ">= 0"),
            "min_ratio": (min_ratio, 0.0 < min_ratio <= 1.0, "in (0, 1]"),
            "initial_ratio": (initial_ratio, min_ratio <= initial_ratio <= 1.0, f"in [min_ratio={min_ratio}, 1]"),
            "ratio_step": (ratio_step, 0.0 <= ratio_step < 1.0, "in [0, 1)"),
            "loss_tolerance": (loss_tolerance, loss_tolerance >= 0, ">= 0"),
            "ema_decay": (ema_decay, 0.0 <= ema_decay < 1.0, "in [0, 1)"),
            "warmup_fraction": (warmup_fraction, 0.0 <= warmup_fraction <= 1.0, "in [0, 1]"),
            "review_ratio": (review_ratio, 0.0 <= review_ratio <= 1.0, "in [0, 1]"),
            "kd_ratio": (kd_ratio, 0.0 <= kd_ratio <= 1.0, "in [0, 1]"),
            "score_eps": (score_eps, score_eps >= 0, ">= 0"),
        }
        for name, (value, ok, allowed) in bounds.items():
            if not ok:
                raise KDConfigError(f"{name} must be {allowed}, got {value}.")
        self.divergence: Divergence = divergence
        self.score: Score = score
        self.latf, self.idts, self.temperature_soften = latf, idts, temperature_soften
        self.base_temperature, self.temperature_scale = base_temperature, temperature_scale
        self.initial_ratio, self.min_ratio, self.ratio_step = initial_ratio, min_ratio, ratio_step
        self.loss_tolerance, self.ema_decay, self.warmup_fraction = loss_tolerance, ema_decay, warmup_fraction
        self.review_ratio, self.kd_ratio = review_ratio, kd_ratio
        self.detach_temperature, self.score_eps, self.ignore_index = detach_temperature, score_eps, ignore_index
        self.register_buffer("ratio", torch.tensor(float(initial_ratio)))
        self.register_buffer("ema", torch.tensor(0.0))
        self.register_buffer("reference", torch.tensor(0.0))
        self.register_buffer("has_reference", torch.tensor(False))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        # Sum and count of the loss values recorded since the last schedule update. Plain attributes, not
        # buffers: DDP broadcasts buffers from rank 0 at every forward, overwriting each rank's own values.
        self._pending_total: Tensor | None = None
        self._pending_count = 0
        #: Diagnostics of the last call: fraction of valid items selected, mean temperature of the selected.
        self.last_selected_fraction: float = float("nan")
        self.last_mean_temperature: float = float("nan")

    # ------------------------------------------------------------------ loss
    def distillation_terms(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(per_item_loss, selected, temperatures)``: ``T_i²·D_i`` per item (0 where not selected)."""
        teacher_logits = teacher_logits.detach()
        scores = adakd_difficulty(student_logits, teacher_logits, self.score)
        use_all = not self.latf or (self.review_ratio > 0 and torch.rand(()).item() < self.review_ratio)
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        selected = valid if use_all else select_hardest(scores, float(self.ratio), valid)
        s = upcast(student_logits)
        if self.idts:
            if not self.detach_temperature:  # official: the score (hence T_i) depends on the student logits
                scores = self._attached_scores(s, upcast(teacher_logits))
            temperatures = idts_temperatures(
                scores, self.base_temperature, self.temperature_scale, self.temperature_soften, selected, self.score_eps
            )
        else:
            temperatures = torch.full_like(scores, float(self.base_temperature))
        scale = temperatures.unsqueeze(-1)
        per_item = _DIVERGENCES[self.divergence](s / scale, upcast(teacher_logits) / scale, reduction="none")
        per_item = temperatures.pow(2) * per_item
        return reduce_items(per_item, selected, "none"), selected, temperatures

    def _attached_scores(self, s: Tensor, t: Tensor) -> Tensor:
        if self.score == "hellinger":
            diff = F.softmax(s, dim=-1).sqrt() - F.softmax(t, dim=-1).sqrt()
            return diff.pow(2).sum(-1).clamp_min(torch.finfo(s.dtype).tiny).sqrt() / math.sqrt(2.0)  # finite gradient
        return _DIVERGENCES[self.score](s, t, reduction="none")

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target if self.kd_ratio < 1.0 else None)
        if mask is not None and mask.shape != student_logits.shape[:-1]:
            raise KDConfigError(
                f"mask must have the items' shape {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}."
            )
        per_item, selected, temperatures = self.distillation_terms(student_logits, teacher_logits, mask)
        distil = reduce_items(per_item, selected)
        with torch.no_grad():
            n_valid = selected.numel() if mask is None else int(mask.sum().item())
            n_sel = int(selected.sum().item())
            self.last_selected_fraction = n_sel / max(n_valid, 1)
            self.last_mean_temperature = temperatures[selected].mean().item() if n_sel else float("nan")
        if self.training:
            self.record(distil)
        terms = {"adakd": distil}
        if self.kd_ratio < 1.0:
            if target is None:
                raise KDConfigError(f"kd_ratio={self.kd_ratio} < 1 mixes in a cross-entropy: pass target.")
            flat = upcast(student_logits).reshape(-1, student_logits.shape[-1])
            ce = F.cross_entropy(flat, target.reshape(-1), ignore_index=self.ignore_index, reduction="none")
            keep = target != self.ignore_index
            keep = keep if mask is None else keep & mask.to(torch.bool)
            terms["ce"] = reduce_items(ce.reshape(target.shape), keep)
        return weighted_terms(terms, {"adakd": self.kd_ratio, "ce": 1.0 - self.kd_ratio})

    def token_sum(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
        """The AdaKD term over the tokens of ``mask`` as a sum (no CE): a token objective of LMDistill.

        AdaKD averages over its *selected* tokens; that mean is scaled by the number of valid tokens, so
        dividing by them gives the official mean. In training it records the mean for the schedule.
        """
        num_valid = mask.sum().clamp_min(1)
        per_item, selected, temperatures = self.distillation_terms(student_logits, teacher_logits, mask)
        num_selected = selected.sum().clamp_min(1)
        with torch.no_grad():
            self.last_selected_fraction = float(selected.sum() / num_valid)
            chosen = temperatures[selected]
            self.last_mean_temperature = float(chosen.mean()) if chosen.numel() else math.nan
        mean_selected = per_item.sum() / num_selected
        if self.training:
            self.record(mean_selected.detach())
        return mean_selected * num_valid

    # ------------------------------------------------------------------ LATF schedule
    def record(self, loss: Tensor) -> None:
        """Keep a (detached) ``L_AdaKD`` value for the next :meth:`update_schedule` (``forward`` does in training)."""
        value = loss.detach().double()
        self._pending_total = value if self._pending_total is None else self._pending_total + value
        self._pending_count += 1

    @torch.no_grad()
    def update_ratio(self, loss: float | Tensor, progress: float) -> None:
        """One LATF step from the loss value ``loss`` at training progress ``progress`` ∈ [0, 1]."""
        value = torch.as_tensor(loss, dtype=self.ema.dtype, device=self.ema.device)
        if self.num_updates.item() == 0:
            self.ema.copy_(value)
        else:
            self.ema.mul_(self.ema_decay).add_((1.0 - self.ema_decay) * value)
        self.num_updates += 1
        if not self.latf:
            return
        if not bool(self.has_reference):
            if progress > self.warmup_fraction:
                self.reference.copy_(self.ema)
                self.has_reference.fill_(True)
            return
        change = self.reference - self.ema
        tolerance = self.loss_tolerance * self.reference
        if change > tolerance:  # steadily falling: focus on fewer, harder items
            self.ratio.copy_(torch.clamp(self.ratio * (1.0 - self.ratio_step), min=self.min_ratio))
            self.reference.copy_(self.ema)
        elif change < -tolerance:  # rising: give items back
            self.ratio.copy_(torch.clamp(self.ratio * (1.0 + self.ratio_step), max=1.0))
            self.reference.copy_(self.ema)

    @torch.no_grad()
    def update_schedule(self, progress: float) -> bool:
        """Step LATF with the mean ``L_AdaKD`` recorded since the last call (all ranks); whether it stepped."""
        total, count = pending_over_ranks(self._pending_total, self._pending_count, self.ratio.device)
        self._pending_total, self._pending_count = None, 0
        if count.item() == 0:
            return False
        self.update_ratio(total / count, progress)
        return True

    def step_schedule(self, progress: Progress) -> None:
        """Scheduled-loss protocol: once per optimizer step, one LATF update (:meth:`update_schedule`)."""
        self.update_schedule(progress.fraction if progress.fraction is not None else 0.0)

    def schedule_stats(self) -> dict[str, float | Tensor]:
        stats: dict[str, float | Tensor] = {
            "adakd_ratio": float(self.ratio),
            "adakd_selected": self.last_selected_fraction,
        }
        if self.idts and math.isfinite(self.last_mean_temperature):
            stats["adakd_temperature"] = self.last_mean_temperature
        return stats
