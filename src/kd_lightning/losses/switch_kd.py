"""Switch-KD's token objective (Sun et al., "Switch-KD: Visual-Switch Knowledge Distillation for
Vision-Language Models", CVPR Findings 2026, arXiv 2604.14629) — a **RECONSTRUCTION** (no training code
is released).

Three logit streams over the response tokens of a VQA batch, each ``[B, T, V]``:

- ``z_S``: the student VLM on the image (its own encoder, projector and LM);
- ``z_T``: the teacher VLM on the image (its own visual tokens);
- ``z_SW``: the *switched* forward, the teacher's LM reading the student's visual tokens
  (the "visual switch"; built by :class:`~kd_lightning.methods.switch_kd.SwitchKD`).

Per micro-batch, summed over the tokens of ``mask`` (the LM task normalises by the token count)::

    L = w_SFT·Σ CE(z_S, y) + w_DBiLD·Σ DBiLD(z_S ‖ z_T) + w_SW·Σ D(trained ‖ sg(reference))
    switch_target = "teacher":  trained = z_SW, reference = z_T   (default)
    switch_target = "student":  trained = z_S,  reference = z_SW

``D`` is the DBiLD token sum (:meth:`~kd_lightning.losses.bild.DBiLDLoss.token_sum`, itself a
reconstruction) or a forward KL ``KL(p_ref ‖ p_trained)`` at temperature τ (no τ²). The reference is
always detached; the *trained* side keeps its graph, so with ``switch_target="teacher"`` the gradient of
the switch term runs through the (frozen) teacher LM back to the student's visual tokens.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.terms import active, check_weights, weighted_terms

SwitchDivergence = Literal["dbild", "kl"]
SwitchTarget = Literal["teacher", "student"]
SWITCH_DIVERGENCES: tuple[str, ...] = ("dbild", "kl")
SWITCH_TARGETS: tuple[str, ...] = ("teacher", "student")

__all__ = ["SwitchKDLoss", "masked_token_ce_sum", "switch_token_sum"]


def masked_token_ce_sum(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``Σ_{tokens of mask} −log softmax(z)[y]`` (float32 or wider) of ``[B, T, V]`` logits, ``[B, T]`` targets."""
    flat = upcast(logits).reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(flat, targets.masked_fill(~mask, 0).reshape(-1), reduction="none")
    return (ce.reshape(targets.shape) * mask.to(ce.dtype)).sum()


def switch_token_sum(
    trained_logits: Tensor,
    reference_logits: Tensor,
    mask: Tensor,
    divergence: SwitchDivergence = "dbild",
    dbild: DBiLDLoss | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """``Σ_{tokens of mask} D(trained ‖ sg(reference))`` on ``[B, T, V]`` logits and a ``[B, T]`` bool mask.

    ``divergence="dbild"``: ``dbild.token_sum(trained, reference, mask)`` (``w_KD·(t-LD + s-LD)`` of that
    loss; its defaults when ``None``). ``"kl"``: ``Σ KL(softmax(reference/τ) ‖ softmax(trained/τ))``.
    The reference never receives a gradient.
    """
    check_logits(trained_logits, reference_logits)
    if mask.shape != trained_logits.shape[:-1]:
        raise KDConfigError(
            "mask", f"must have the tokens' shape {tuple(trained_logits.shape[:-1])}, got {tuple(mask.shape)}"
        )
    reference = reference_logits.detach()
    if divergence == "dbild":
        return (dbild if dbild is not None else DBiLDLoss()).token_sum(trained_logits, reference, mask.bool())
    if divergence == "kl":
        return forward_kl(trained_logits, reference, temperature, mask.bool(), "sum")
    raise KDConfigError("switch_loss", f"must be one of {list(SWITCH_DIVERGENCES)}, got {divergence!r}")


class SwitchKDLoss(nn.Module):
    """``w_SFT·Σ CE + w_DBiLD·Σ DBiLD(z_S ‖ z_T) + w_SW·Σ D_switch`` (token sums; see the module docstring).

    Args:
        dbild: the DBiLD loss of both the student–teacher term and (``switch_loss="dbild"``) the switch term
            (RECONSTRUCTION, see :class:`~kd_lightning.losses.bild.DBiLDLoss`); its ``kd_weight`` scales both,
            its ``ce_weight`` is not used (``sft_weight`` is the CE). ``None``: its defaults.
        switch_loss: ``"dbild"`` or ``"kl"`` (forward KL at ``switch_temperature``) for the switch term.
        switch_target: ``"teacher"`` (the switched output is trained towards the teacher's own output) or
            ``"student"`` (the student's output is trained towards the switched output). UNVERIFIED.
        switch_temperature: τ of ``switch_loss="kl"``.
        sft_weight: ``w_SFT`` of the next-token cross-entropy on the answers.
        dbild_weight: ``w_DBiLD`` of DBiLD between the student's and the teacher's logits.
        switch_weight: ``w_SW`` of the switch term (0: no switched forward is needed).

    ``token_sums(student, teacher, targets, mask, switched)`` returns ``{"loss", "sft", "dbild", "switch"}``
    (weighted sums; terms of weight 0 left out).
    """

    def __init__(
        self,
        dbild: DBiLDLoss | None = None,
        switch_loss: SwitchDivergence = "dbild",
        switch_target: SwitchTarget = "teacher",
        switch_temperature: float = 1.0,
        sft_weight: float = 1.0,
        dbild_weight: float = 1.0,
        switch_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if switch_loss not in SWITCH_DIVERGENCES:
            raise KDConfigError("switch_loss", f"must be one of {list(SWITCH_DIVERGENCES)}, got {switch_loss!r}")
        if switch_target not in SWITCH_TARGETS:
            raise KDConfigError("switch_target", f"must be one of {list(SWITCH_TARGETS)}, got {switch_target!r}")
        check_temperature(switch_temperature, "switch_temperature")
        check_weights(sft_weight=sft_weight, dbild_weight=dbild_weight, switch_weight=switch_weight)
        if not (active(sft_weight) or active(dbild_weight) or active(switch_weight)):
            raise KDConfigError(
                "sft_weight, dbild_weight and switch_weight", "are all 0", "give at least one a positive weight"
            )
        self.dbild = dbild if dbild is not None else DBiLDLoss()
        self.switch_loss = switch_loss
        self.switch_target = switch_target
        self.switch_temperature = switch_temperature
        self.sft_weight = sft_weight
        self.dbild_weight = dbild_weight
        self.switch_weight = switch_weight

    @property
    def weights(self) -> dict[str, float]:
        return {"sft": self.sft_weight, "dbild": self.dbild_weight, "switch": self.switch_weight}

    def switch_pair(self, student: Tensor, teacher: Tensor, switched: Tensor) -> tuple[Tensor, Tensor]:
        """``(trained, reference)`` logits of the switch term for ``switch_target``."""
        return (switched, teacher) if self.switch_target == "teacher" else (student, switched)

    def token_sums(
        self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor, switched: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Weighted token sums over ``mask`` of aligned next-token logits ``[B, T, V]`` and targets ``[B, T]``."""
        mask = mask.bool()
        terms: dict[str, Tensor] = {}
        if active(self.sft_weight):
            terms["sft"] = masked_token_ce_sum(student, targets, mask)
        if active(self.dbild_weight):
            check_logits(student, teacher)
            terms["dbild"] = self.dbild.token_sum(student, teacher.detach(), mask)
        if active(self.switch_weight):
            if switched is None:
                raise KDConfigError(
                    "switched", "is required when switch_weight != 0", "pass the switched logits or set switch_weight 0"
                )
            trained, reference = self.switch_pair(student, teacher, switched)
            terms["switch"] = switch_token_sum(
                trained, reference, mask, self.switch_loss, self.dbild, self.switch_temperature
            )
        return weighted_terms(terms, self.weights)
