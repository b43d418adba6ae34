"""Reasoning task sibling: language-model distillation on verifiable problems, judged by a verifier.

:class:`ReasoningDistillation` is :class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation`
for :class:`~kd_lightning.data.reasoning.ReasoningDataModule` batches (problem prompts, reference solutions,
privileged teacher prompts, answers): the base class of the methods that sample their own responses (OPSD,
TSD-KD, SODA, MixSD). The verifier evaluation (``pass@1``, ``avg@k``, ``response_tokens``,
``tokens_per_solved``, ``pass@1/<family>``) and the rollout helpers live in
:mod:`~kd_lightning.methods.tasks.generation` and serve every LM method given reasoning data; this class
refuses data without a verifier and re-exports the helpers.

:class:`ReasoningSupervised` is supervised fine-tuning on the reference solutions with the same evaluation:
the student-alone baseline (``kd fit`` trains missing teachers and bases with the identical ``LMSupervised``).
"""

from __future__ import annotations

from typing import Any

from kd_lightning.errors import KDConfigError
from kd_lightning.methods.tasks.generation import (
    RatioMetric,
    Rollout,
    check_generation_length,
    response_logits,
    rollout,
    sequence_logprob,
)
from kd_lightning.methods.tasks.language_model import LanguageModelDistillation, LMSupervised

__all__ = [
    "RatioMetric",
    "ReasoningDistillation",
    "ReasoningSupervised",
    "Rollout",
    "check_generation_length",
    "response_logits",
    "rollout",
    "sequence_logprob",
]


class ReasoningDistillation(LanguageModelDistillation):
    """Language-model distillation on verifiable reasoning data (see the module docstring).

    Args:
        student: causal LM to train (with ``generate``).
        teacher: frozen teacher LM (``None`` for methods without one).
        **kwargs: :class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation`'s arguments,
            among them ``eval_max_new_tokens``, ``eval_samples`` (``k`` of ``avg@k``), ``eval_temperature``.

    After ``setup`` the module has the data's ``tokenizer``, ``verifier``, ``eos_token_id`` and
    ``pad_token_id``, and the helpers ``sample``, ``decode_responses`` and ``rewards``.
    """

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if datamodule is not None and self.verifier is None:
            raise KDConfigError(
                "data.class_path",
                f"{type(self).__name__} needs problems with prompts, answers and a verifier, which "
                f"{type(datamodule).__name__} does not provide",
                "use ReasoningDataModule (or a data module with the same batches and a verifier)",
            )


class ReasoningSupervised(LMSupervised, ReasoningDistillation):
    """Supervised fine-tuning on reference solutions (next-token CE on the response tokens), judged by the
    verifier: the student-alone baseline, and how ``kd fit`` trains a missing reasoning teacher or base model.

    Like :class:`~kd_lightning.methods.tasks.language_model.LMSupervised` (which ``kd fit`` uses to train
    missing teachers and bases of every LM method, so all of them share one cache entry), but it refuses data
    without a verifier.

    Args:
        model: the causal LM.
        label_smoothing: ε in [0, 1).
        **kwargs: the evaluation arguments (``eval_max_new_tokens``, ...), ``optimizer``, ``lr_scheduler``, ...
    """
