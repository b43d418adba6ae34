"""Word-level knowledge distillation for translation (Kim & Rush 2016, §3.1): the seq2seq task's KD baseline."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.losses.seq2seq_kd import WordLevelKDLoss
from kd_lightning.methods.tasks.seq2seq import Seq2SeqDistillation


class Seq2SeqKD(Seq2SeqDistillation):
    """Word-level KD of an encoder-decoder student on the reference targets (teacher forcing).

    ``L = Σ_{valid t} [w_CE·CE_ε(z^S_t, y_t) + w_KD·τ²·KL(p_T^τ(·|y_<t, x) ‖ p_S^τ(·|y_<t, x))] / N_valid``
    (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016, word-level KD; Hinton et al. 2015's τ).
    The loss is :class:`~kd_lightning.losses.seq2seq_kd.WordLevelKDLoss`. Sequence-level KD (training on the
    teacher's beam outputs) is not implemented here.

    RECONSTRUCTION: the weights (0.5/0.5), τ = 1 and ε = 0 on the CE term are choices of this baseline, not
    prescribed by the paper (which interpolates CE and KD with one α); all are arguments.

    Args:
        student: seq2seq student (:class:`~kd_lightning.models.seq2seq.TinySeq2Seq`, ``HFSeq2SeqLM``).
        teacher: seq2seq teacher (same vocabulary).
        temperature: τ > 0.
        ce_weight: weight of the label cross-entropy.
        kd_weight: weight of ``τ²·KL(p_T ‖ p_S)``.
        label_smoothing: ε of the CE term.
        **kwargs: :class:`~kd_lightning.methods.tasks.seq2seq.Seq2SeqDistillation` and the core's arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        temperature: float = 1.0,
        ce_weight: float = 0.5,
        kd_weight: float = 0.5,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = WordLevelKDLoss(temperature, ce_weight, kd_weight, label_smoothing)

    def distillation_sums(self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return self.criterion(student, teacher, targets, mask)
