"""Vision-language task sibling: :class:`VisionLanguageDistillation` (VLM teacher -> VLM student) and
:class:`VLMSupervised` (the student alone; how ``kd fit`` trains a missing VLM teacher).

Both train :class:`~kd_lightning.models.vlm.VisionLanguageModel` networks on the dict batches of
:class:`~kd_lightning.data.vqa.DigitVQADataModule` (visual question answering)::

    images [B, 3, H, W]; input_ids, attention_mask, labels [B, T] right-padded (question prompt + answer + EOS,
    labels -100 on the prompt and padding); instruction_mask [B, T] (the question's tokens); prompt_ids,
    prompt_mask [B, P] left-padded prompts; answers, family (question type); sample_index; num_items_in_batch

Everything of :class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation` applies (token sums,
global token normalisation, token loss/ppl/acc, teacher fidelity metrics), with the images passed to every network
(:meth:`VisionLanguageDistillation.student_logits`, :meth:`VisionLanguageDistillation.teacher_logits`) and to
generation: the verifier evaluation answers every question greedily from its image and logs ``val|test/pass@1``
(exact-match accuracy) and ``pass@1/<question type>``.

Checks: the networks must be VLMs (at construction); at setup the data must serve images (task
``vision_language``), the student's and a teacher's recorded tokenizers must be the same (fingerprints), and their
numbers of visual tokens must be equal unless the method sets ``allows_different_image_tokens = True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.methods.core import DistillationModule, SingleNetwork, describe
from kd_lightning.methods.tasks.language_model import (
    LanguageModelDistillation,
    lm_batch,
    masked_token_cross_entropy,
    next_token_ce_sums,
)
from kd_lightning.models.vlm import is_vision_language_model

__all__ = ["VLMSupervised", "VisionLanguageDistillation", "batch_images"]

#: The data task these methods train on (``DigitVQADataModule.task``).
VISION_LANGUAGE = "vision_language"
#: Image shape of the setup probes when neither the data nor the encoder says one.
DEFAULT_PROBE_IMAGE = (3, 16, 64)


def batch_images(batch: Any) -> Tensor:
    """The ``images`` of a vision-language batch (a one-line error when the batch has none)."""
    if not isinstance(batch, Mapping) or "images" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KDConfigError(
            "data.class_path",
            f"vision-language methods need dict batches with 'images', got {got}",
            "use DigitVQADataModule (or a data module with the same batches)",
        )
    return batch["images"]


class VisionLanguageDistillation(LanguageModelDistillation):
    """A VLM student learns from frozen VLM teacher(s) on visual question answering (see the module docstring).

    Subclasses implement :meth:`distillation_sums` (token sums from aligned, shifted student/teacher logits of the
    text positions) or :meth:`token_loss_sums`; :meth:`student_logits`, :meth:`teacher_logits` and (for hidden
    states / attentions) the networks' ``forward_detailed`` take the batch's images.

    Args:
        student: the VLM to train (:class:`~kd_lightning.models.vlm.VisionLanguageModel`).
        teacher: the frozen VLM teacher.
        **kwargs: :class:`~kd_lightning.methods.tasks.language_model.LanguageModelDistillation`'s arguments
            (``eval_max_new_tokens``, ``fidelity``, ``optimizer``, ...). ``vocab_mapping`` is not supported.
    """

    #: A method that maps between different numbers of visual tokens sets this (the setup check then passes).
    allows_different_image_tokens: ClassVar[bool] = False
    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # VLMSupervised, set below

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, **kwargs: Any) -> None:
        if kwargs.get("vocab_mapping") is not None:
            raise KDConfigError(
                "vocab_mapping",
                "is not supported by the vision-language methods",
                "give the student and the teacher the same tokenizer",
            )
        super().__init__(student=student, teacher=teacher, **kwargs)
        for field, network in self.networks_to_check().items():
            if not is_vision_language_model(network):
                raise KDConfigError(
                    field,
                    f"{describe(network)} is not a vision-language model (no visual_tokens / num_image_tokens)",
                    "wrap it: class_path: VisionLanguageModel with vision: DigitPatchEncoder and language: <the LM>",
                )

    # ------------------------------------------------------------------ forward passes
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return self.student(input_ids, attention_mask=attention_mask, images=images)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, attention_mask, _ = lm_batch(batch)
        return self(input_ids, attention_mask, batch_images(batch))

    def student_logits(self, batch: Any) -> Tensor:
        """The student's logits ``[B, T, V]`` at the text positions of a batch (its images read)."""
        input_ids, attention_mask, _ = lm_batch(batch)
        return self.student(input_ids, attention_mask=attention_mask, images=batch_images(batch))

    def teacher_logits(self, batch: Any, name: str | None = None) -> Tensor:
        """A teacher's logits ``[B, T, V]`` at the text positions (no autograd, ``teacher_precision``)."""
        input_ids, attention_mask, _ = lm_batch(batch)
        return self.run_teacher(input_ids, attention_mask=attention_mask, images=batch_images(batch), name=name)

    def generation_inputs(self, batch: Any) -> dict[str, Any]:
        return {"images": batch_images(batch)}

    # ------------------------------------------------------------------ checks
    def check_data(self, datamodule: Any) -> None:
        if datamodule is not None and getattr(datamodule, "task", None) != VISION_LANGUAGE:
            raise KDConfigError(
                "data.class_path",
                f"{type(datamodule).__name__} serves {getattr(datamodule, 'task', 'unknown')!r} batches without "
                f"images, but {type(self).__name__} trains vision-language models",
                "use DigitVQADataModule (task vision_language)",
            )
        self._probe_shape = self._image_shape(datamodule)
        super().check_data(datamodule)

    def _image_shape(self, datamodule: Any) -> tuple[int, ...]:
        shape = getattr(datamodule, "image_shape", None)
        if shape is None:
            size = getattr(getattr(self.student, "vision", None), "image_size", None)
            shape = (3, *size) if size is not None else DEFAULT_PROBE_IMAGE
        return tuple(int(v) for v in shape)

    def check_vocabularies(self, data_name: str) -> None:
        self.check_vlm_pairs()
        super().check_vocabularies(data_name)

    def check_vlm_pairs(self) -> None:
        """Same tokenizer fingerprints and (unless allowed) the same number of visual tokens for student and
        teachers."""
        networks = self.networks_to_check()
        student = networks.get("student")
        if student is None:
            return
        mine = getattr(student, "tokenizer_identity", None)
        for field, network in networks.items():
            if field == "student":
                continue
            theirs = getattr(network, "tokenizer_identity", None)
            if mine is not None and theirs is not None and mine.fingerprint != theirs.fingerprint:
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"its tokenizer {theirs.describe()} differs from the student's {mine.describe()}, so the same "
                    "token id means different tokens",
                    "give both VLMs' language models the same tokenizer",
                )
            n_s, n_t = int(student.num_image_tokens), int(network.num_image_tokens)
            if n_s != n_t and not self.allows_different_image_tokens:
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"makes {n_t} visual tokens per image but the student makes {n_s}, and {type(self).__name__} "
                    "compares them position by position",
                    "build both with the same num_image_tokens, or use a method that handles different counts",
                )

    def probe_vocab(self, field: str, module: nn.Module) -> int:
        """Run the VLM once on two tokens and a blank image; return its output vocabulary size."""
        param = next(iter(module.parameters()), None)
        device = param.device if param is not None else self.device
        probe = torch.zeros(1, 2, dtype=torch.long, device=device)
        images = torch.zeros(1, *getattr(self, "_probe_shape", DEFAULT_PROBE_IMAGE), device=device)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(probe, attention_mask=torch.ones_like(probe, dtype=torch.bool), images=images)
        except KDConfigError:
            raise
        except Exception as err:
            raise KDConfigError(
                f"model.init_args.{field}",
                f"{describe(module)} fails on token ids (1, 2) and an image {tuple(images.shape)} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                "check the vision encoder's image_size against the data's images",
            ) from None
        finally:
            module.train(was_training)
        vocab = int(out.shape[-1])
        if self.num_classes is not None and vocab < int(self.num_classes):
            raise KDConfigError(
                f"model.init_args.{field}",
                f"{describe(module)} predicts {vocab} tokens but the tokenizer has {self.num_classes} ids",
                f"build its language model with vocab_size={self.num_classes} (or larger)",
            )
        return vocab

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        _, _, labels = lm_batch(batch)
        student, teacher = self.align(self.student_logits(batch), self.teacher_logits(batch))
        s, y, mask = shift_for_next_token(student, labels)
        return self.distillation_sums(s, teacher[:, :-1], y, mask), mask.sum()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        self.evaluate_with_verifier(self.student, batch, stage)
        _, _, labels = lm_batch(batch)
        s, y, mask = shift_for_next_token(self.student_logits(batch), labels)
        if not bool(mask.any()):
            return
        n = int(mask.sum())
        ce = masked_token_cross_entropy(s, y, mask)[mask]
        self._update(stage, "loss", ce, n)
        self._update(stage, "ppl", ce, n, prog_bar=True)
        self._update(stage, "acc", (s.argmax(-1) == y)[mask], n, prog_bar=True)
        if self.fidelity:
            teacher = self.teacher_logits(batch)[:, :-1]
            self._update(stage, "teacher_ppl", masked_token_cross_entropy(teacher, y, mask)[mask], n)
            self._update(stage, "teacher_acc", (teacher.argmax(-1) == y)[mask], n)
            s_aligned, t_aligned = self.align(s, teacher)
            self._update(stage, "agreement", (s_aligned.argmax(-1) == t_aligned.argmax(-1))[mask], n)
            self._update(stage, "kl_to_teacher", forward_kl(s_aligned, t_aligned, reduction="none")[mask], n)


class VLMSupervised(SingleNetwork, VisionLanguageDistillation):
    """Supervised fine-tuning of one VLM on the answers (next-token CE on the answer tokens and EOS), judged by the
    verifier: the student-alone baseline, and how ``kd fit`` trains a missing VLM teacher.

    ``L = Σ_{answer tokens t} CE(z_t, y_{t+1}) / N_valid`` (label smoothing ε optional), the images read.

    Args:
        model: the VLM.
        label_smoothing: ε in [0, 1).
        **kwargs: the evaluation arguments (``eval_max_new_tokens``, ...), ``optimizer``, ``lr_scheduler``, ...
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)

    def check_vocabularies(self, data_name: str) -> None:
        vocab = self.probe_vocab("model", self.student)
        if self.num_classes is None:
            self.num_classes = vocab

    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        return next_token_ce_sums(self.student_logits(batch), lm_batch(batch)[2], self.label_smoothing)


VisionLanguageDistillation.teacher_training_module = VLMSupervised
