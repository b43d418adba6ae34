"""Token-level KD of vision-language models: SFT + token KD (KL or DBiLD) on the answer tokens."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from kd_lightning.losses.vlm_kd import VLMTokenKDLoss
from kd_lightning.methods.tasks.vision_language import VisionLanguageDistillation

__all__ = ["VLMTokenKD"]


class VLMTokenKD(VisionLanguageDistillation):
    """SFT + token KD for VLMs: the "token KD" (``loss: kl``) and "DBiLD token KD" (``loss: dbild``) baselines.

    Teacher and student read the same image and question; on the answer tokens (labels != -100, EOS included)::

        L = [w_CE · Σ_t CE(z^S_t, y_{t+1}) + w_KD · Σ_t D_t] / N_valid

    with ``D_t = τ²·KL(p_T^τ ‖ p_S^τ)`` (``kl``) or DBiLD's bidirectional top-k logit-difference loss
    (``dbild``; :class:`~kd_lightning.losses.bild.DBiLDLoss`, itself a RECONSTRUCTION of Switch-KD's loss, Sun et al.
    2026) — :class:`~kd_lightning.losses.vlm_kd.VLMTokenKDLoss`. ``N_valid`` is counted over the accumulation group
    and the ranks (:class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation`). Student and
    teacher must share the tokenizer and the number of visual tokens. The teacher runs in training (no offline
    teacher logits).

    RECONSTRUCTION: the papers name these baselines without one recipe; the weights, τ, and the τ² factor are
    arguments.

    Args:
        student: the VLM to train.
        teacher: the frozen VLM teacher.
        loss: ``"kl"`` or ``"dbild"``.
        temperature: τ of ``kl``.
        temperature_squared: multiply the ``kl`` term by τ².
        kd_weight: w_KD.
        ce_weight: w_CE.
        dbild_args: :class:`~kd_lightning.losses.bild.DBiLDLoss` arguments (``mass``, ``k_min``, ``k_max``,
            ``temperature``, ``reverse_weight``, ``mass_temperature``, ``k_source``).
        **kwargs: :class:`~kd_lightning.methods.tasks.vision_language.VisionLanguageDistillation`'s arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        loss: Literal["kl", "dbild"] = "kl",
        temperature: float = 1.0,
        temperature_squared: bool = True,
        kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        dbild_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.criterion = VLMTokenKDLoss(loss, temperature, temperature_squared, kd_weight, ce_weight, dbild_args)
        self.loss = loss
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.ce_weight = ce_weight

    def distillation_sums(self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        return self.criterion(student, teacher, targets, mask)
