"""TSD-KD: Token-Selective Dual Knowledge Distillation of reasoning LMs (Kim & Baek, ICLR 2026; arXiv 2603.13260)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.tsd_kd import EntropyMask, PLDenominator, PrefixScope, TSDKDLoss
from kd_lightning.methods.tasks.reasoning import (
    ReasoningDistillation,
    check_generation_length,
    response_logits,
)

__all__ = ["TSDKD", "reference_responses"]

IGNORE_INDEX = -100


def reference_responses(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """The dataset's reference solutions of a reasoning batch as right-padded responses ``(ids [B, N], mask [B, N])``.

    Response tokens are the labelled positions (``labels != -100``) after each row's ``prompt_lengths`` in the
    right-padded ``input_ids``; ``N`` is the longest one.
    """
    input_ids, labels, starts = batch["input_ids"], batch["labels"], batch["prompt_lengths"].to(batch["labels"].device)
    width = int((labels != IGNORE_INDEX).sum(-1).max().item()) if labels.numel() else 0
    index = starts.unsqueeze(-1) + torch.arange(width, device=labels.device).unsqueeze(0)
    inside = index < labels.shape[1]
    index = index.clamp(max=labels.shape[1] - 1)
    mask = (labels.gather(1, index) != IGNORE_INDEX) & inside
    return input_ids.gather(1, index).masked_fill(~mask, 0), mask


class TSDKD(ReasoningDistillation):
    """TSD-KD: on-policy distillation with an entropy-weighted JSD, an entropy regulariser and teacher re-ranking.

    Each training step the student samples a response to every problem prompt (λ = ``on_policy_fraction`` = 1:
    always, temperature 1, no top-k: the release's GKD settings); the frozen teacher (same tokenizer) and the
    student score the same response after the same student prompt (:func:`response_logits`), and
    :class:`~kd_lightning.losses.tsd_kd.TSDKDLoss` is applied on the response tokens::

        L = w_dir · Σ_t w_t·JSD_β,t / N  +  w_ent · Σ_{t∈E} H_S,t / |E|  +  α · mean_{t<d} PL_t
        w_t = sigmoid(H_S,t − H_T,t) (detached),  β = 0.9,  E = {H_S ≥ quantile_0.1(H_S)},  α = 0.1

    with ``PL_t`` the Plackett–Luce (ListMLE) loss of the teacher's order of the student's top-K (K = 10) tokens,
    on the positions before ``d``, where the cumulative normalised student entropy reaches 0.1 (see
    :mod:`kd_lightning.losses.tsd_kd`). Logged: ``train/direct``, ``train/entropy``, ``train/indirect``
    (weighted), ``train/student_entropy``, ``train/teacher_entropy``, ``train/confidence_weight`` (mean w_t),
    ``train/prefix_fraction`` (share of the response tokens in the ranked prefix), ``train/response_tokens``.

    Normalisation: the terms are per-micro-batch means as in the release (JSD over the response tokens, the
    entropy term over ``|E|``, the ranking term over the prefix); :meth:`token_loss_sums` returns them times
    the micro-batch's response tokens, so the base's token normalisation gives back their mean over a
    gradient-accumulation group weighted by response tokens.

    RECONSTRUCTION / choices (arguments; defaults differ from the release where it looks unintended):

    - ``pl_denominator="listmle"`` (default): textbook ListMLE ``−Σ_k (s_πk − log Σ_{j≥k} e^{s_πj})``;
      ``"code"`` reproduces the release's ``logcumsumexp`` without flipping (denominator over ``j ≤ k``), whose
      gradient pushes the teacher's LOWER-ranked candidates up: probably a bug.
    - ``prefix_scope="sequence"`` (default): one ``d`` per response, from its own entropies (the paper's
      "uncertain prefix of the response"); ``"batch"`` is the release: ``d`` from the batch's flattened valid
      entropies, used as every row's prefix length, so it grows with the batch size (≈ 0.1·B responses'
      worth of tokens at uniform entropy).
    - ``entropy_mask="valid"`` (default): the regulariser's tokens are valid response tokens;
      ``"all_code"`` also takes padded positions above the threshold, as the release does.
    - The response mask includes the first EOS (the release uses pad = EOS, so its EOS is not trained).
    - ``entropy_quantile`` and ``prefix_threshold`` are one argument (0.1) in the release.
    - ``on_policy_fraction`` < 1 flips one coin per batch (GKD's / the release's λ): heads, student samples;
      tails, the dataset's reference solutions.

    Args:
        student: causal LM with ``generate`` (TinyGPT, HFCausalLM).
        teacher: frozen causal LM with the student's tokenizer.
        beta: β of the JSD mixture ``m = β·p_T + (1 − β)·p_S`` (un-normalised JSD).
        entropy_quantile: q of the entropy threshold.
        prefix_threshold: cumulative normalised entropy that ends the ranked prefix.
        top_k: K student candidates re-ranked by the teacher.
        pl_denominator: ``"listmle"`` or ``"code"``.
        prefix_scope: ``"sequence"`` or ``"batch"``.
        entropy_mask: ``"valid"`` or ``"all_code"``.
        temperature: τ of the loss's softmaxes (entropies, JSD, ranking scores).
        direct_weight, entropy_weight, indirect_weight: weights of the three terms (0 removes a term: ablations).
        on_policy_fraction: λ, probability that a batch is re-sampled by the student.
        max_new_tokens: longest sampled response.
        sampling_temperature: temperature of the student's sampling.
        sampling_top_k: top-k filter of the sampling (``None``: the full distribution, as the release).
        **kwargs: :class:`~kd_lightning.methods.tasks.reasoning.ReasoningDistillation`'s arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        beta: float = 0.9,
        entropy_quantile: float = 0.1,
        prefix_threshold: float = 0.1,
        top_k: int = 10,
        pl_denominator: PLDenominator = "listmle",
        prefix_scope: PrefixScope = "sequence",
        entropy_mask: EntropyMask = "valid",
        temperature: float = 1.0,
        direct_weight: float = 1.0,
        entropy_weight: float = 1.0,
        indirect_weight: float = 0.1,
        on_policy_fraction: float = 1.0,
        max_new_tokens: int = 64,
        sampling_temperature: float = 1.0,
        sampling_top_k: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.loss_fn = TSDKDLoss(
            beta=beta,
            entropy_quantile=entropy_quantile,
            prefix_threshold=prefix_threshold,
            top_k=top_k,
            pl_denominator=pl_denominator,
            prefix_scope=prefix_scope,
            entropy_mask=entropy_mask,
            temperature=temperature,
            direct_weight=direct_weight,
            entropy_weight=entropy_weight,
            indirect_weight=indirect_weight,
        )
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise KDConfigError("on_policy_fraction", f"must be in [0, 1], got {on_policy_fraction!r}")
        check_generation_length("max_new_tokens", max_new_tokens)
        if not sampling_temperature > 0:
            raise KDConfigError("sampling_temperature", f"must be > 0, got {sampling_temperature!r}")
        if sampling_top_k is not None and sampling_top_k < 1:
            raise KDConfigError("sampling_top_k", f"must be >= 1 or null, got {sampling_top_k!r}")
        if on_policy_fraction > 0 and not callable(getattr(student, "generate", None)):
            raise KDConfigError(
                "student", f"{type(student).__name__} has no generate()", "TSD-KD samples responses with it"
            )
        self.on_policy_fraction = on_policy_fraction
        self.max_new_tokens = max_new_tokens
        self.sampling_temperature = sampling_temperature
        self.sampling_top_k = sampling_top_k
        self._stats: dict[str, Tensor] = {}

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        if not len(self.teachers):
            raise KDConfigError(
                "model.init_args.teacher", "TSD-KD needs a teacher", "give a teacher network (and teacher_ckpt)"
            )

    # ------------------------------------------------------------------ sequences
    def responses(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, bool]:
        """``(response_ids, response_mask, sampled)``: the student's samples (probability λ) or the references."""
        for key in ("prompt_ids", "prompt_mask", "labels", "prompt_lengths"):
            if key not in batch:
                raise KDConfigError(
                    "data.class_path", f"TSD-KD needs reasoning batches with {key!r}", "use ReasoningDataModule"
                )
        on_policy = self.on_policy_fraction >= 1.0 or torch.rand(()).item() < self.on_policy_fraction
        if not on_policy:
            ids, mask = reference_responses(batch)
            return ids, mask, False
        out = self.sample(
            self.student,
            batch["prompt_ids"],
            batch["prompt_mask"],
            max_new_tokens=self.max_new_tokens,
            temperature=self.sampling_temperature,
            top_k=self.sampling_top_k,
        )
        return out.response_ids, out.response_mask, True

    # ------------------------------------------------------------------ loss
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        ids, mask, sampled = self.responses(batch)
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].bool()
        student = response_logits(self.student, prompt_ids, prompt_mask, ids, mask)
        teacher = response_logits(self.lm_teacher_logits, prompt_ids, prompt_mask, ids, mask)
        student, teacher = self.align(student, teacher)
        terms = self.loss_fn(student, teacher, mask)
        count = mask.sum()
        scale = count.to(terms["loss"].dtype)
        self._stats = {
            **self.loss_fn.last_stats,
            "response_tokens": mask.sum(-1).float().mean(),
            "on_policy": torch.tensor(float(sampled)),
        }
        return {name: value * scale for name, value in terms.items()}, count

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        for name, value in self._stats.items():
            if name != "entropy_tokens" and name != "prefix_tokens":
                self.log(f"train/{name}", value.detach().float(), on_step=True, on_epoch=True, batch_size=1)
        return loss
