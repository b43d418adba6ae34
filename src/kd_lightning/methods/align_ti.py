"""Align-TI (Chen et al., arXiv 2602.09483, ICML 2026): VLM distillation via token interactions — IVA + TPA on top of
SFT and token KD. RECONSTRUCTION: see :class:`AlignTI` and :mod:`kd_lightning.losses.align_ti`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.align_ti import (
    SIMILARITIES,
    instruction_relevance_scores,
    instruction_to_vision_attention,
    iva_attention_kl,
    iva_loss,
    num_salient,
    salient_visual_tokens,
    transition_probability_alignment,
)
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.core import AUTOCAST_DTYPES
from kd_lightning.methods.tasks.language_model import lm_batch, masked_token_cross_entropy
from kd_lightning.methods.tasks.vision_language import VisionLanguageDistillation, batch_images
from kd_lightning.models.vlm import VLMOutput

__all__ = ["AlignTI", "count_lm_layers"]

_CHECKPOINT_KEY = "align_ti"


def count_lm_layers(vlm: nn.Module) -> int:
    """Transformer layers of a VLM's language model (TinyGPT ``blocks`` or a transformers config)."""
    language = getattr(vlm, "language", vlm)
    blocks = getattr(language, "blocks", None)
    if blocks is not None:
        return len(blocks)
    config = getattr(getattr(language, "model", None), "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if config is not None and getattr(config, name, None) is not None:
            return int(getattr(config, name))
    n = getattr(language, "n_layers", None)
    if n is None:
        raise KDConfigError(
            "model.init_args.student",
            f"cannot tell how many layers {type(language).__name__} has",
            "use TinyGPT or HFCausalLM language models, or give teacher_layer and student_layer",
        )
    return int(n)


class AlignTI(VisionLanguageDistillation):
    """Align-TI: ``L = w_SFT·CE + w_KD·τ²KL(p_T‖p_S) + w_IVA·L_IVA + w_TPA·L_TPA`` on VQA answers.

    - **Layer selection (IRS)**: at the start of fitting, the teacher (and, with ``student_layer: irs``, the
      student) runs on ``calibration_batches`` training batches with attention weights; per layer ``l`` the
      instruction-to-vision attention vectors ``a^(l)(x)`` give ``IRS(l) = 1 − mean_{x1≠x2} sim(a(x1), a(x2))``
      (:func:`~kd_lightning.losses.align_ti.instruction_relevance_scores`); ``l* = argmax IRS``. The student layer
      is the one at the same relative depth (``relative``), its own IRS argmax (``irs``) or a given index. Given
      ``teacher_layer``/``student_layer`` indices skip the calibration. The layers (0-based transformer blocks)
      are logged (``align_ti/teacher_layer``, ``align_ti/student_layer``), kept in buffers (so in every
      checkpoint's state dict) and, with the IRS scores, under the checkpoint key ``"align_ti"``; a restored or
      resumed run keeps them.
    - **IVA**: salient visual tokens ``S`` = top-⌈ρ·N_v⌉ of the teacher's layer-``l*`` instruction-to-vision
      attention on the current batch; ``L_IVA = mean_S ‖W h_S^(l_s) − h_T^(l*)‖²/d_T`` on the blocks' output hidden
      states at the visual positions (``iva_form: hidden_mse``; ``W``: a trainable ``Linear(d_S, d_T)``, saved
      with the module) or ``KL`` between the two attention vectors restricted to ``S`` (``attention_kl``).
    - **TPA**: over consecutive answer positions, KL between the teacher's and student's joints of the top-k
      restricted, renormalised next-token distributions (:func:`~kd_lightning.losses.align_ti.
      transition_probability_alignment`, teacher top-``tpa_top_k``).

    Normalisation: CE, KD and TPA are sums over answer tokens (TPA: over transitions) divided by the valid tokens of
    the accumulation group (the LM task); IVA is a mean over the salient tokens of the micro-batch, entered as
    ``mean · N_tokens`` so that it stays that mean after the division. Zero-weight terms are not computed: without
    IVA no hidden states / attention weights are requested and no layers are calibrated; with only SFT the teacher
    is not run. Needs the teacher's hidden states and attentions: no offline teacher logits.

    RECONSTRUCTION (no training code released; every choice an argument): the IVA loss form and the projector
    ``W``, ρ = 0.25, cosine similarity in IRS, the student-layer rule, the hidden state read (the output of the
    selected block), TPA's definition (the outer-product joint, which factorises with teacher forcing into two
    restricted token KLs), k = 20, the weights (all 1), τ (shared by KD and TPA) and the τ² factor on KD.

    Args:
        student, teacher: VLMs (:class:`~kd_lightning.models.vlm.VisionLanguageModel`) with the same tokenizer and
            number of visual tokens.
        sft_weight, kd_weight, iva_weight, tpa_weight: the term weights (0 switches a term off).
        temperature: τ of the token KD and of TPA's restricted softmaxes.
        temperature_squared: multiply the KD term by τ².
        salient_ratio: ρ in (0, 1].
        tpa_top_k: k of TPA (capped at the vocabulary).
        iva_form: ``"hidden_mse"`` or ``"attention_kl"``.
        iva_normalize: layer-normalise (no affine) the projected student and the teacher states before the MSE
            (``hidden_mse``; not in the spec).
        teacher_layer: fixed teacher block index (negative counts from the end); ``None``: IRS argmax.
        student_layer: ``"relative"`` (same relative depth as the teacher's), ``"irs"`` (own IRS argmax) or an index.
        irs_similarity: ``"cosine"`` or ``"overlap"``.
        calibration_batches: training batches of the IRS calibration (≥ 2 examples in all).
        **kwargs: :class:`~kd_lightning.methods.tasks.vision_language.VisionLanguageDistillation`'s arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        sft_weight: float = 1.0,
        kd_weight: float = 1.0,
        iva_weight: float = 1.0,
        tpa_weight: float = 1.0,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        salient_ratio: float = 0.25,
        tpa_top_k: int = 20,
        iva_form: Literal["hidden_mse", "attention_kl"] = "hidden_mse",
        iva_normalize: bool = False,
        teacher_layer: int | None = None,
        student_layer: int | Literal["relative", "irs"] = "relative",
        irs_similarity: Literal["cosine", "overlap"] = "cosine",
        calibration_batches: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(sft_weight=sft_weight, kd_weight=kd_weight, iva_weight=iva_weight, tpa_weight=tpa_weight)
        if not any(active(w) for w in (sft_weight, kd_weight, iva_weight, tpa_weight)):
            raise KDConfigError(
                "sft_weight, kd_weight, iva_weight, tpa_weight", "are all 0", "give at least one term a positive weight"
            )
        check_temperature(temperature)
        num_salient(1, salient_ratio)  # validates ρ
        if not isinstance(tpa_top_k, int) or isinstance(tpa_top_k, bool) or tpa_top_k < 1:
            raise KDConfigError("tpa_top_k", f"must be an integer >= 1, got {tpa_top_k!r}", "e.g. 20")
        if iva_form not in ("hidden_mse", "attention_kl"):
            raise KDConfigError("iva_form", f"must be 'hidden_mse' or 'attention_kl', got {iva_form!r}", None)
        if irs_similarity not in SIMILARITIES:
            raise KDConfigError("irs_similarity", f"must be one of {SIMILARITIES}, got {irs_similarity!r}", None)
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise KDConfigError("calibration_batches", f"must be an integer >= 1, got {calibration_batches!r}", None)
        self.num_teacher_layers = count_lm_layers(self.teacher)
        self.num_student_layers = count_lm_layers(self.student)
        fixed_teacher = self._check_index("teacher_layer", teacher_layer, self.num_teacher_layers)
        if isinstance(student_layer, str):
            if student_layer not in ("relative", "irs"):
                raise KDConfigError(
                    "student_layer", f"must be 'relative', 'irs' or a layer index, got {student_layer!r}", None
                )
            fixed_student = None
        else:
            fixed_student = self._check_index("student_layer", student_layer, self.num_student_layers)
        self.sft_weight, self.kd_weight = sft_weight, kd_weight
        self.iva_weight, self.tpa_weight = iva_weight, tpa_weight
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.salient_ratio = salient_ratio
        self.tpa_top_k = tpa_top_k
        self.iva_form = iva_form
        self.iva_normalize = iva_normalize
        self.student_layer_rule = student_layer
        self.irs_similarity = irs_similarity
        self.calibration_batches = calibration_batches
        self.irs_scores: dict[str, list[float]] = {}
        # -1 = not chosen yet; persistent buffers travel in every checkpoint's state dict.
        self.register_buffer("teacher_layer_index", torch.tensor(-1 if fixed_teacher is None else fixed_teacher))
        self.register_buffer("student_layer_index", torch.tensor(-1 if fixed_student is None else fixed_student))
        self.iva_projector: nn.Module | None = None
        if active(iva_weight) and iva_form == "hidden_mse":
            self.iva_projector = nn.Linear(int(self.student.hidden_size), int(self.teacher.hidden_size))

    @staticmethod
    def _check_index(field: str, index: int | None, count: int) -> int | None:
        if index is None:
            return None
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise KDConfigError(field, f"must be a layer index in [{-count}, {count}), got {index!r}", None)
        return index % count

    # ------------------------------------------------------------------ layers
    @property
    def layers_chosen(self) -> bool:
        return int(self.teacher_layer_index) >= 0 and int(self.student_layer_index) >= 0

    def relative_student_layer(self, teacher_layer: int) -> int:
        """The student block at the teacher block's relative depth: ``round((l_T + 1)·n_S/n_T) − 1``, clamped."""
        layer = round((teacher_layer + 1) * self.num_student_layers / self.num_teacher_layers) - 1
        return min(max(layer, 0), self.num_student_layers - 1)

    @torch.no_grad()
    def attention_vectors(self, network: nn.Module, batches: Iterable[Any]) -> list[Tensor]:
        """Per layer, the ``[N, N_v]`` instruction-to-vision vectors of the batches' rows that have instruction
        tokens (``network`` in eval mode)."""
        was_training = network.training
        network.eval()
        per_layer: list[list[Tensor]] = []
        try:
            for batch in batches:
                out = self._detailed(network, batch, hidden=False, attentions=True)
                mask = self._instruction_mask(batch)
                rows = mask.any(-1)
                for i, attention in enumerate(out.attentions):
                    vectors = instruction_to_vision_attention(attention, mask, out.num_image_tokens)
                    if len(per_layer) <= i:
                        per_layer.append([])
                    per_layer[i].append(vectors[rows])
        finally:
            network.train(was_training)
        return [torch.cat(parts) for parts in per_layer]

    def calibrate(self, batches: Iterable[Any]) -> tuple[int, int]:
        """Choose the layers from calibration batches (IRS); returns ``(teacher_layer, student_layer)``."""
        batches = list(batches)
        teacher = int(self.teacher_layer_index)
        if teacher < 0:
            scores = self._scores(self.teacher, batches)
            self.irs_scores["teacher"] = scores.tolist()
            teacher = int(scores.argmax())
        student = int(self.student_layer_index)
        if student < 0:
            if self.student_layer_rule == "irs":
                scores = self._scores(self.student, batches)
                self.irs_scores["student"] = scores.tolist()
                student = int(scores.argmax())
            else:
                student = self.relative_student_layer(teacher)
        self.teacher_layer_index.fill_(teacher)
        self.student_layer_index.fill_(student)
        return teacher, student

    def _scores(self, network: nn.Module, batches: list[Any]) -> Tensor:
        vectors = self.attention_vectors(network, batches)
        if not vectors or vectors[0].shape[0] < 2:
            raise KDConfigError(
                "model.init_args.calibration_batches",
                f"the IRS calibration needs at least 2 examples with instruction tokens, got "
                f"{vectors[0].shape[0] if vectors else 0}",
                "use more calibration batches, or give teacher_layer and student_layer",
            )
        return instruction_relevance_scores(vectors, self.irs_similarity)

    def calibration_loader(self) -> Iterable[Any]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
            return datamodule.train_dataloader()
        return self.trainer.train_dataloader

    def on_train_start(self) -> None:
        super().on_train_start()
        if not active(self.iva_weight):
            return
        if not self.layers_chosen:
            batches = []
            for i, batch in enumerate(self.calibration_loader()):
                if i >= self.calibration_batches:
                    break
                batches.append(move_data_to_device(batch, self.device))
            layers = torch.tensor(self.calibrate(batches), device=self.device)
            layers = self.trainer.strategy.broadcast(layers, src=0)  # every rank uses rank 0's choice
            self.teacher_layer_index.fill_(int(layers[0]))
            self.student_layer_index.fill_(int(layers[1]))
            if self.irs_scores:
                rank_zero_info(f"Align-TI IRS scores: {self.irs_scores}")
        rank_zero_info(
            f"Align-TI layers: teacher block {int(self.teacher_layer_index)}, student block "
            f"{int(self.student_layer_index)}"
        )
        if self.logger is not None:
            self.logger.log_metrics(
                {
                    "align_ti/teacher_layer": float(self.teacher_layer_index),
                    "align_ti/student_layer": float(self.student_layer_index),
                },
                step=self.global_step,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_CHECKPOINT_KEY] = {
            "teacher_layer": int(self.teacher_layer_index),
            "student_layer": int(self.student_layer_index),
            "irs_scores": self.irs_scores,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if isinstance(saved, Mapping):
            self.irs_scores = dict(saved.get("irs_scores") or {})

    # ------------------------------------------------------------------ forward passes
    @staticmethod
    def _instruction_mask(batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or "instruction_mask" not in batch:
            raise KDConfigError(
                "data.class_path",
                "Align-TI's IVA needs 'instruction_mask' in the batches (the question's tokens)",
                "use DigitVQADataModule, or set model.init_args.iva_weight: 0",
            )
        return batch["instruction_mask"].bool()

    def _detailed(self, network: nn.Module, batch: Any, hidden: bool, attentions: bool) -> VLMOutput:
        input_ids, attention_mask, _ = lm_batch(batch)
        return network.forward_detailed(
            input_ids,
            attention_mask,
            images=batch_images(batch),
            output_hidden_states=hidden,
            output_attentions=attentions,
        )

    def _teacher_detailed(self, batch: Any, hidden: bool, attentions: bool) -> VLMOutput:
        """The teacher's :class:`VLMOutput` without autograd, under ``teacher_precision``'s autocast."""
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        images = batch_images(batch)
        cast = contextlib.nullcontext() if dtype is None else torch.autocast(images.device.type, dtype=dtype)
        with torch.no_grad(), cast:
            out = self._detailed(self.teacher, batch, hidden, attentions)
        if dtype is not None:
            out.logits = out.logits.float()
            out.hidden_states = tuple(h.float() for h in out.hidden_states)
            out.attentions = tuple(a.float() for a in out.attentions)
        return out

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        _, _, labels = lm_batch(batch)
        use_iva = active(self.iva_weight)
        needs_teacher_logits = active(self.kd_weight) or active(self.tpa_weight)
        student_out = teacher_out = None
        if use_iva:
            if not self.layers_chosen:  # outside a fit (no calibration ran): calibrate on this batch
                self.calibrate([batch])
            kl_form = self.iva_form == "attention_kl"
            student_out = self._detailed(self.student, batch, hidden=not kl_form, attentions=kl_form)
            teacher_out = self._teacher_detailed(batch, hidden=not kl_form, attentions=True)
            student_logits = student_out.logits
        else:
            student_logits = self.student_logits(batch)
        teacher_logits = None
        if needs_teacher_logits:
            teacher_logits = teacher_out.logits if teacher_out is not None else self.teacher_logits(batch)
            student_logits, teacher_logits = self.align(student_logits, teacher_logits)
        s, y, mask = shift_for_next_token(student_logits, labels)
        count = mask.sum()
        terms: dict[str, Tensor] = {}
        if active(self.sft_weight):
            terms["sft"] = masked_token_cross_entropy(s, y, mask).sum()
        if teacher_logits is not None:
            t = teacher_logits[:, :-1]
            if active(self.kd_weight):
                scale = self.temperature**2 if self.temperature_squared else 1.0
                terms["kd"] = scale * forward_kl(s, t, self.temperature, mask, "sum")
            if active(self.tpa_weight):
                terms["tpa"] = transition_probability_alignment(s, t, mask, self.tpa_top_k, self.temperature)[0]
        if use_iva:
            terms["iva"] = self.iva_term(student_out, teacher_out, batch) * count
        weights = {"sft": self.sft_weight, "kd": self.kd_weight, "iva": self.iva_weight, "tpa": self.tpa_weight}
        return weighted_terms(terms, weights), count

    def iva_term(self, student_out: VLMOutput, teacher_out: VLMOutput, batch: Any) -> Tensor:
        """``L_IVA`` of the batch (a mean over the salient visual tokens, or over the rows for ``attention_kl``)."""
        lt, ls = int(self.teacher_layer_index), int(self.student_layer_index)
        n_v = teacher_out.num_image_tokens
        mask = self._instruction_mask(batch)
        a_t = instruction_to_vision_attention(teacher_out.attentions[lt], mask, n_v)
        _, salient = salient_visual_tokens(a_t, self.salient_ratio)
        if self.iva_form == "attention_kl":
            a_s = instruction_to_vision_attention(student_out.attentions[ls], mask, n_v)
            return iva_attention_kl(a_s, a_t, salient)
        h_s = student_out.hidden_states[ls + 1][:, :n_v]  # hidden_states[0] is the embedding output
        h_t = teacher_out.hidden_states[lt + 1][:, :n_v]
        return iva_loss(h_s, h_t, salient, self.iva_projector, self.iva_normalize)
