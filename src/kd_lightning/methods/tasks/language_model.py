"""Language-model task sibling: :class:`LanguageModelDistillation` (teacher → student) and :class:`LMSupervised`.

Both train causal LMs on the dict batches of :class:`~kd_lightning.data.text.TextDataModule`::

    {"input_ids": [B, T], "attention_mask": [B, T], "labels": [B, T] (-100 = not predicted),
     "num_items_in_batch": [] (valid tokens of the gradient-accumulation group, optional), ...}

with the next-token convention (the logits at position t predict ``labels[t + 1]``, via
:func:`~kd_lightning.losses.lm.shift_for_next_token`). What the two share:

- **Global token normalisation.** A method computes its loss as a *sum* over the valid tokens of the
  micro-batch; ``training_step`` returns :func:`~kd_lightning.losses.lm.normalize_token_sum` of it, so
  that after Lightning's division by ``accumulate_grad_batches`` and DDP's average over ranks the
  gradient is that of (Σ per-token loss over every valid token of the accumulation group on every
  rank) / (number of those tokens) — the same update as one big batch. ``setup`` tells the data
  module the accumulation factor (``datamodule.accumulate_grad_batches``) so it can count the group's
  tokens. Logged training values are per-token means of the micro-batch.
- **Evaluation** (validation/test, synced across DDP ranks by torchmetrics): ``loss`` (mean token
  cross-entropy), ``ppl`` (its exponential: perplexity), ``acc`` (token top-1 accuracy); with a teacher
  also ``teacher_ppl``, ``teacher_acc``, ``agreement`` (teacher-student top-1 agreement) and
  ``kl_to_teacher`` (mean token KL(p_T ‖ p_S)), all over the valid (label ≠ -100) tokens.
- **Vocabulary checks at setup** instead of the image class-count probe: each network runs once on two
  tokens; it must predict at least the tokenizer's ids, and student and teacher go through
  :func:`~kd_lightning.losses.lm.align_vocab` (padding rows of the same family are sliced with a
  warning; different tokenizers are an error naming both sizes).

Also here: the sequence helpers of the on-policy methods (prompt lengths, sampling continuations with
the student's or teacher's ``generate``) and the sampled-token reverse-KL estimator.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.losses.lm import align_vocab, normalize_token_sum, shift_for_next_token
from kd_lightning.losses.vocab_map import (
    VocabMap,
    build_vocab_map,
    map_input_ids,
    project_teacher_logits,
    restrict_logits,
)
from kd_lightning.methods.core import DistillationModule, SingleNetwork, describe
from kd_lightning.methods.tasks.generation import VerifierEvaluation
from kd_lightning.models.lm import tokenizer_vocabulary

__all__ = [
    "ExpMeanMetric",
    "LMSupervised",
    "LanguageModelDistillation",
    "lm_batch",
    "masked_token_cross_entropy",
    "next_token_ce_sums",
    "prompt_lengths",
    "sample_continuations",
    "sampled_token_reverse_kl",
]

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- helpers
class ExpMeanMetric(MeanMetric):
    """``exp`` of a (weighted) mean, synced across ranks: perplexity from per-token cross-entropies."""

    def compute(self) -> Tensor:
        return torch.exp(super().compute())


def lm_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(input_ids, attention_mask or None, labels)`` of a dict batch; labels default to ``input_ids``.

    Raises:
        KDConfigError: when the batch is not a dict with ``input_ids`` (e.g. an image data module).
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KDConfigError(
            "language-model methods need dict batches with 'input_ids' (and 'attention_mask', 'labels') "
            f"such as TextDataModule's, got {got}: use a text data module (data.class_path: TextDataModule)."
        )
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
    return input_ids, attention_mask, labels


def masked_token_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-token cross-entropy ``−log softmax(z)[y]`` (float32 or wider), 0 where ``mask`` is false."""
    flat = upcast(logits).reshape(-1, logits.shape[-1])
    safe = targets.masked_fill(~mask, 0).reshape(-1)
    ce = F.cross_entropy(flat, safe, reduction="none").reshape(targets.shape)
    return ce * mask.to(ce.dtype)


def vocab_of(logits: Tensor) -> int:
    return int(logits.shape[-1])


def prompt_lengths(labels: Tensor, attention_mask: Tensor | None, prompt_length: int) -> tuple[Tensor, Tensor]:
    """Per row, ``(prompt_len, row_len)``: the tokens that form the prompt and the row's real tokens.

    Rows whose labels start with masked positions (prompt masking of prompt/response data) have the
    prompt ``[0, first predicted position)``; rows predicted from their first token (packed plain text)
    use the first ``prompt_length`` tokens. Prompts are capped to leave one token to continue.
    ``row_len`` counts the attention mask (right padding), or is ``T``. Rows with no predicted token
    get ``prompt_len = row_len`` (nothing to continue).
    """
    batch, length = labels.shape
    row_len = (
        attention_mask.long().sum(-1)
        if attention_mask is not None
        else torch.full((batch,), length, dtype=torch.long, device=labels.device)
    )
    valid = labels != IGNORE_INDEX
    positions = torch.arange(length, device=labels.device).expand(batch, length)
    first = torch.where(valid, positions, torch.full_like(positions, length)).min(-1).values
    prompt = torch.where(first > 0, first, torch.full_like(first, prompt_length))
    prompt = torch.minimum(prompt, (row_len - 1).clamp_min(1))
    prompt = torch.where(valid.any(-1), prompt, row_len)
    return prompt, row_len


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    input_ids: Tensor,
    prompt_len: Tensor,
    new_tokens: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> dict[str, Tensor]:
    """Sample ``new_tokens[b]`` tokens after the prompt ``input_ids[b, :prompt_len[b]]`` with ``model.generate``.

    The model runs in eval mode (dropout off, as TRL's GKD does) under ``no_grad``; rows with equal
    prompt lengths are sampled together (no padding inside a prompt). A continuation stops after its
    first ``eos_token_id`` (kept). Returns a right-padded batch ``{"input_ids", "attention_mask",
    "labels"}`` of width ``max(prompt_len + new_tokens)``: labels are the sampled tokens, ``-100`` on the
    prompt and the padding, so only the continuation is predicted.
    """
    if not hasattr(model, "generate"):
        raise KDConfigError(
            f"{describe(model)} has no generate(input_ids, ..., max_new_tokens=...): on-policy methods sample "
            "with it (TinyGPT and HFCausalLM have one)."
        )
    batch = input_ids.shape[0]
    width = int((prompt_len + new_tokens).max().item()) if batch else 0
    out_ids = torch.full((batch, width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    out_mask = torch.zeros((batch, width), dtype=torch.bool, device=input_ids.device)
    out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        for p in torch.unique(prompt_len).tolist():
            rows = (prompt_len == p).nonzero().squeeze(-1)
            counts = new_tokens[rows]
            n = int(counts.max().item())
            out_ids[rows, :p] = input_ids[rows, :p]
            out_mask[rows, :p] = True
            if n <= 0:
                continue
            prompt = input_ids[rows, :p]
            generated = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt, dtype=torch.bool),
                max_new_tokens=n,
                temperature=temperature,
                top_k=top_k,
                eos_token_id=eos_token_id,
            )
            cont = generated[:, p : p + n].to(input_ids.dtype)
            keep = torch.arange(cont.shape[1], device=cont.device).unsqueeze(0) < counts.unsqueeze(1)
            if eos_token_id is not None:  # up to and including the first EOS
                seen = (cont == eos_token_id).long().cumsum(-1)
                keep &= (seen == 0) | ((seen == 1) & (cont == eos_token_id))
            span = slice(p, p + cont.shape[1])
            out_ids[rows, span] = torch.where(keep, cont, torch.full_like(cont, pad_token_id))
            out_mask[rows, span] = keep
            out_labels[rows, span] = torch.where(keep, cont.long(), torch.full_like(cont, IGNORE_INDEX).long())
    finally:
        model.train(was_training)
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}


def pad_batches(batches: list[dict[str, Tensor]], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad dict batches ``{"input_ids", "attention_mask", "labels"}`` to one width and stack them."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_token_id, "attention_mask": False, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        parts = [F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches]
        out[key] = torch.cat(parts)
    return out


def sampled_token_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Sampled-token reverse-KL estimator on the student's own samples: ``(loss_sum, reward_sum)``.

    Per token ``ℓ_t = −sg(r_t)·log q(y_t)`` with the dense reward ``r_t = log p_T(y_t) − log q(y_t)``
    (MiniLLM's single-step / Thinking Machines on-policy distillation; Decoupling-KL Proposition 1(ii)):
    its gradient ``E_{y~q}[(log q − log p_T)∇log q]`` is ∇KL(q ‖ p_T) when ``y ~ q``. ``reward_sum`` is
    Σ r_t (−Σ r_t estimates the reverse KL). Both summed over ``mask``.
    """
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits).detach() / temperature, dim=-1)
    safe = tokens.masked_fill(~mask, 0).unsqueeze(-1)
    log_q_y = log_q.gather(-1, safe).squeeze(-1)
    reward = (log_p.gather(-1, safe).squeeze(-1) - log_q_y).detach()
    weights = mask.to(log_q_y.dtype)
    return -(reward * log_q_y * weights).sum(), (reward * weights).sum()


# ---------------------------------------------------------------------------------------------- task sibling
class LanguageModelDistillation(VerifierEvaluation, DistillationModule):
    """Language modelling: a causal-LM student learns from frozen LM teacher(s) (see the module docstring).

    Subclasses implement :meth:`distillation_sums` (token losses summed over the valid tokens, from aligned
    student/teacher logits already shifted to the next-token convention) or, when they build their own
    sequences (on-policy sampling), :meth:`token_loss_sums`.

    Args:
        student: causal LM to train (``forward(input_ids, attention_mask) -> logits [B, T, V]``; the chunked and
            on-policy paths also use ``hidden_states``, ``lm_head`` and ``generate``).
        teacher: causal LM to learn from (frozen, eval mode, run under ``no_grad``).
        num_classes: the tokenizer's vocabulary size; ``None`` takes the data module's.
        fidelity: also measure the teacher's perplexity/accuracy, agreement and KL(p_T ‖ p_S) on evaluation data.
        tokenizer_ids_match: whether student and teacher share the token ids when their vocabulary sizes
            differ: ``True`` slices the padding rows (same family, e.g. 151936 vs 152064), ``False`` is an
            error (different tokenizers); ``None`` lets :func:`~kd_lightning.losses.lm.align_vocab` decide.
        vocab_mapping: how to distil between models whose recorded tokenizers differ (see below): ``None``
            (default) refuses them at setup; ``"exact_tokens"`` maps each student token to the teacher token
            of the same string (:mod:`kd_lightning.losses.vocab_map`: byte-level ``Ġ`` and SentencePiece ``▁``
            / ``<0xNN>`` markers normalised, special tokens by string and role): hooks on the teacher's forward
            translate the student's token ids to the teacher's (unmapped ones become its unknown token) and
            project its logits onto the student's vocabulary (probability 0 on unmapped student ids,
            renormalised over the mapped ones), so every method and metric sees student-vocabulary teacher
            logits. One teacher; not with the chunked loss (``chunked``), offline teacher logits or teacher
            generation (``generate`` is not mapped).
        vocab_mapping_min_coverage: warn when fewer than this fraction of the student's token ids have a
            teacher counterpart.
        vocab_mapping_renormalize_student: also renormalise the student's distribution over the mapped ids
            (needed for reverse-KL-type objectives, which are unbounded where the projected teacher has
            probability 0; leave off when a cross-entropy term targets tokens that may be unmapped).
        check_chat_template: refuse a teacher/student pair where only one tokenizer has a chat template.
        eval_max_new_tokens: longest generated answer in the verifier evaluation; ``None``: 1.25 × the data's
            longest reference response + 4 tokens (what ``kd fit`` also uses for the teachers it trains) (data with
            a ``verifier``:
            :class:`~kd_lightning.data.reasoning.ReasoningDataModule`; see
            :mod:`~kd_lightning.methods.tasks.generation`).
        eval_samples: ``k`` of ``avg@k`` in that evaluation (``0``: greedy ``pass@1`` only).
        eval_temperature: sampling temperature of ``avg@k``.
        **kwargs: the core's arguments (``teachers``, ``teacher_ckpt``, ``optimizer``, ...).

    **Tokenizer checks at setup.** When the student and a teacher both record their tokenizer (e.g.
    :class:`~kd_lightning.models.lm.HFCausalLM` with ``tokenizer: <folder>``), their
    :class:`~kd_lightning.models.lm.TokenizerIdentity` fingerprints must be equal (same ids for the same
    strings) unless ``vocab_mapping`` is set, and a chat template on one side only is refused
    (``check_chat_template``); a data module whose tokenizer has a fingerprint must use the student's.
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # LMSupervised, set below
    _warned_no_group_count: bool = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        fidelity: bool = True,
        tokenizer_ids_match: bool | None = None,
        vocab_mapping: Literal["exact_tokens"] | None = None,
        vocab_mapping_min_coverage: float = 0.9,
        vocab_mapping_renormalize_student: bool = False,
        check_chat_template: bool = True,
        eval_max_new_tokens: int | None = None,
        eval_samples: int = 0,
        eval_temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        self.set_generation_eval(eval_max_new_tokens, eval_samples, eval_temperature)
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if vocab_mapping not in (None, "exact_tokens"):
            raise KDConfigError("vocab_mapping", f"must be null or 'exact_tokens', got {vocab_mapping!r}")
        if vocab_mapping is not None and len(self.teachers) > 1:
            raise KDConfigError(
                "vocab_mapping", f"maps one teacher's vocabulary, got {len(self.teachers)} teachers", "give one teacher"
            )
        if not 0.0 <= vocab_mapping_min_coverage <= 1.0:
            raise KDConfigError("vocab_mapping_min_coverage", f"must be in [0, 1], got {vocab_mapping_min_coverage}")
        self.num_classes = num_classes
        self.fidelity = fidelity and bool(len(self.teachers))
        self.tokenizer_ids_match = tokenizer_ids_match
        self.vocab_mapping = vocab_mapping
        self.vocab_mapping_min_coverage = vocab_mapping_min_coverage
        self.vocab_mapping_renormalize_student = vocab_mapping_renormalize_student
        self.check_chat_template = check_chat_template
        self.vocab_map: VocabMap | None = None  # built at setup when vocab_mapping applies
        self._vocab_map_hooks: list[Any] = []
        self.metrics = nn.ModuleDict()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.student(input_ids, attention_mask=attention_mask)

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor]:
        input_ids, _, labels = lm_batch(batch)
        return input_ids, labels

    def inputs_of(self, batch: Any) -> Any:
        return lm_batch(batch)[0]

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        input_ids, attention_mask, _ = lm_batch(batch)
        return self(input_ids, attention_mask)

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"student": self.student, **self.teacher_fields()}

    # ------------------------------------------------------------------ checks
    def check_data(self, datamodule: Any) -> None:
        self.attach_reasoning_data(datamodule)
        trainer = self._trainer
        if datamodule is not None and trainer is not None:
            datamodule.accumulate_grad_batches = int(trainer.accumulate_grad_batches)
        data_name = type(datamodule).__name__ if datamodule is not None else "the data"
        data_vocab = getattr(datamodule, "vocab_size", None) or getattr(datamodule, "num_classes", None)
        if self.num_classes is None:
            self.num_classes = data_vocab
        elif data_vocab is not None and int(data_vocab) != int(self.num_classes):
            raise KDConfigError(
                "model.init_args.num_classes",
                f"is {self.num_classes} but the tokenizer of {data_name} has {data_vocab} ids",
                f"set num_classes to {data_vocab} (or leave it empty to take the data's)",
            )
        self.check_vocabularies(data_name)
        if not self.metrics:
            self.build_metrics()

    def probe_vocab(self, field: str, module: nn.Module) -> int:
        """Run ``module`` once on two tokens and return the size of its output vocabulary."""
        param = next(iter(module.parameters()), None)  # setup() runs before Lightning moves the module
        probe = torch.zeros(1, 2, dtype=torch.long, device=param.device if param is not None else self.device)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(probe, attention_mask=torch.ones_like(probe, dtype=torch.bool))
        except Exception as err:
            raise KDConfigError(
                f"model.init_args.{field}",
                f"{describe(module)} fails on token ids of shape (1, 2) ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]})",
                "it must be a causal LM: forward(input_ids, attention_mask) -> logits",
            ) from None
        finally:
            module.train(was_training)
        if not isinstance(out, Tensor) or out.dim() != 3:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise KDConfigError(
                f"model.init_args.{field}", f"{describe(module)} must return logits [batch, tokens, vocab], got {got}"
            )
        vocab = vocab_of(out)
        if self.num_classes is not None and vocab < int(self.num_classes):
            raise KDConfigError(
                f"model.init_args.{field}",
                f"{describe(module)} predicts {vocab} tokens but the tokenizer has {self.num_classes} ids",
                f"build it with vocab_size={self.num_classes} (or larger)",
            )
        return vocab

    def check_vocabularies(self, data_name: str) -> None:
        mapped_fields = self.check_tokenizers(data_name)
        sizes = {field: self.probe_vocab(field, module) for field, module in self.networks_to_check().items()}
        if self.num_classes is None:
            self.num_classes = min(sizes.values())
        student = sizes["student"]
        for field, size in sizes.items():
            if field == "student" or size == student or field in mapped_fields:
                continue
            try:
                self.align(torch.zeros(1, student, device=self.device), torch.zeros(1, size, device=self.device))
            except KDConfigError as err:
                raise KDConfigError(f"model.init_args.student/{field}", str(err)) from None

    def check_tokenizers(self, data_name: str = "the data") -> set[str]:
        """Compare the tokenizers the networks record (``tokenizer_identity``) and the data module's; build the
        vocabulary map when ``vocab_mapping`` asks for it. Returns the teacher fields that are mapped."""
        networks = self.networks_to_check()
        student = networks["student"]
        ids = {field: getattr(module, "tokenizer_identity", None) for field, module in networks.items()}
        mine = ids["student"]
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_identity = getattr(getattr(datamodule, "tokenizer", None), "identity", None)
        if mine is not None and data_identity is not None and data_identity.fingerprint != mine.fingerprint:
            raise KDConfigError(
                "data.init_args.tokenizer",
                f"{data_name} tokenizes with {data_identity.describe()}, but the student's tokenizer is "
                f"{mine.describe()}",
                "tokenize the data with the student's tokenizer (data.init_args.tokenizer: <the student's folder>)",
            )
        mapped: set[str] = set()
        for field, theirs in ids.items():
            if field == "student" or mine is None or theirs is None:
                if field != "student" and self.vocab_mapping is not None:
                    side = "student" if mine is None else field
                    raise KDConfigError(
                        "model.init_args.vocab_mapping",
                        f"maps token strings, but the {side} records no tokenizer",
                        f"give the {side} its tokenizer (HFCausalLM tokenizer: <folder>), or set vocab_mapping: null",
                    )
                continue
            where = f"model.init_args.student/{field}"
            if self.check_chat_template and mine.has_chat_template != theirs.has_chat_template:
                has, lacks = ("student", field) if mine.has_chat_template else (field, "student")
                raise KDConfigError(
                    where,
                    f"a chat template missing on one side: the {has}'s tokenizer has one, the {lacks}'s "
                    f"({(theirs if lacks != 'student' else mine).name}) has none",
                    "use tokenizers that both have the chat template (or neither), or set "
                    "model.init_args.check_chat_template: false if the data does not use chat formatting",
                )
            if mine.fingerprint == theirs.fingerprint:
                continue
            if self.vocab_mapping is None:
                raise KDConfigError(
                    where,
                    f"the tokenizers differ: student {mine.describe()}, {field} {theirs.describe()}, so the same "
                    "token id means different tokens",
                    "give both models the same tokenizer, or set model.init_args.vocab_mapping: exact_tokens to map "
                    "the teacher's vocabulary onto the student's by token string",
                )
            self.build_vocab_map(student, networks[field])
            mapped.add(field)
        return mapped

    def build_vocab_map(self, student: nn.Module, teacher: nn.Module) -> VocabMap:
        """The ``exact_tokens`` map (student id -> teacher id), a coverage warning, and the teacher's forward hooks
        (input ids translated to the teacher's, logits projected onto the student's vocabulary)."""
        s_info, t_info = tokenizer_vocabulary(student.tokenizer), tokenizer_vocabulary(teacher.tokenizer)
        rows = int(getattr(student, "vocab_size", 0) or s_info["size"])
        vocab_map = build_vocab_map(
            s_info["vocab"],
            t_info["vocab"],
            student_scheme=s_info["scheme"],
            teacher_scheme=t_info["scheme"],
            student_special=s_info["special"],
            teacher_special=t_info["special"],
            student_roles=s_info["roles"],
            teacher_roles=t_info["roles"],
            num_student_rows=max(rows, s_info["size"]),
        )
        teacher_rows = int(getattr(teacher, "vocab_size", 0) or t_info["size"])
        if int(vocab_map.student_to_teacher.max()) >= teacher_rows:
            raise KDConfigError(
                "model.init_args.teacher",
                f"its tokenizer has ids up to {int(vocab_map.student_to_teacher.max())} but it predicts {teacher_rows}",
                "give the teacher its own tokenizer",
            )
        if vocab_map.num_mapped == 0:
            raise KDConfigError(
                "model.init_args.vocab_mapping",
                "exact_tokens found no token string shared by the student's and the teacher's tokenizers",
                "use tokenizers with overlapping vocabularies, or a cross-tokenizer method",
            )
        if vocab_map.student_coverage < self.vocab_mapping_min_coverage:
            warnings.warn(
                f"vocab_mapping exact_tokens: only {vocab_map.num_mapped} of the student's {vocab_map.student_size} "
                f"token ids ({vocab_map.student_coverage:.1%}) have a teacher token of the same string (teacher "
                f"coverage {vocab_map.teacher_coverage:.1%}), below vocab_mapping_min_coverage="
                f"{self.vocab_mapping_min_coverage}; unmapped, e.g.: {vocab_map.unmapped_examples}",
                stacklevel=2,
            )
        if getattr(self, "chunked", False):
            raise KDConfigError(
                "model.init_args.chunked",
                "cannot be combined with vocab_mapping (the chunked loss reads the teacher's own LM head)",
                "set chunked: false",
            )
        unk = t_info["roles"].get("unk")
        unmapped_id = int(unk if unk is not None else (t_info["roles"].get("pad") or t_info["roles"].get("eos") or 0))
        for hook in self._vocab_map_hooks:
            hook.remove()
        self.register_buffer("_vocab_index", vocab_map.student_to_teacher.clone(), persistent=False)

        def to_teacher_ids(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (map_input_ids(args[0], self._vocab_index, unmapped_id), *args[1:]), kwargs
            if "input_ids" in kwargs:
                return args, {**kwargs, "input_ids": map_input_ids(kwargs["input_ids"], self._vocab_index, unmapped_id)}
            return None

        def to_student_vocab(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if isinstance(output, Tensor) and output.dim() >= 1:
                return project_teacher_logits(output, self._vocab_index, check=False)
            return None

        self._vocab_map_hooks = [
            teacher.register_forward_pre_hook(to_teacher_ids, with_kwargs=True),
            teacher.register_forward_hook(to_student_vocab, with_kwargs=True),
        ]
        self.vocab_map = vocab_map
        return vocab_map

    def align(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Student and teacher logits over one vocabulary (:func:`~kd_lightning.losses.lm.align_vocab`).

        With ``vocab_mapping`` the teacher's forward already returns logits over the student's vocabulary
        (:func:`~kd_lightning.losses.vocab_map.project_teacher_logits`); ``vocab_mapping_renormalize_student``
        then restricts the student to the mapped ids here.
        """
        vocab_map = self.vocab_map
        if vocab_map is not None and self.vocab_mapping_renormalize_student:
            mapped = self._vocab_index[: student_logits.shape[-1]] >= 0
            if mapped.numel() == student_logits.shape[-1]:
                student_logits = restrict_logits(student_logits, mapped)
        if student_logits.shape[-1] == teacher_logits.shape[-1]:
            return student_logits, teacher_logits
        return align_vocab(
            student_logits,
            teacher_logits,
            tokenizer_ids_match=self.tokenizer_ids_match,
            tokenizer_size=self.num_classes,
        )

    # ------------------------------------------------------------------ forward passes
    def lm_teacher_logits(self, input_ids: Tensor, attention_mask: Tensor | None, name: str | None = None) -> Tensor:
        """Teacher logits ``[B, T, V]`` without autograd, under ``teacher_precision``'s autocast."""
        return self.run_teacher(input_ids, attention_mask=attention_mask, name=name)

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """``({"loss": Σ_tokens total, **Σ_tokens parts}, number of valid tokens)`` for a micro-batch."""
        input_ids, attention_mask, labels = lm_batch(batch)
        student = self.student(input_ids, attention_mask=attention_mask)
        teacher = self.lm_teacher_logits(input_ids, attention_mask)
        student, teacher = self.align(student, teacher)
        s, y, mask = shift_for_next_token(student, labels)
        return self.distillation_sums(s, teacher[:, :-1], y, mask), mask.sum()

    def distillation_sums(self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``{"loss": Σ total, **Σ parts}`` over the tokens of ``mask`` (logits ``[B, T−1, V]``, aligned)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither distillation_sums nor token_loss_sums.")

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        """Per-token means of the micro-batch (the step itself uses :meth:`token_loss_sums`)."""
        sums, count = self.token_loss_sums(batch)
        return {k: v / count.clamp_min(1) for k, v in sums.items()}

    def group_token_count(self, batch: Any, num_tokens: Tensor) -> Tensor | None:
        """The normaliser of this micro-batch's loss sum: valid tokens of its accumulation group (this rank).

        The data's ``num_items_in_batch``, scaled by (tokens this step trains on) / (valid tokens of the
        batch as loaded) when a method changes the batch (on-policy samples): exact when every
        micro-batch of the group changes in the same proportion. ``None`` without ``num_items_in_batch``.
        """
        if not isinstance(batch, Mapping) or batch.get("num_items_in_batch") is None:
            return None
        group = torch.as_tensor(batch["num_items_in_batch"], device=num_tokens.device)
        loaded = (lm_batch(batch)[2][:, 1:] != IGNORE_INDEX).sum()
        # No host sync: with nothing changed (num_tokens == loaded) the ratio is exactly 1 and this is ``group``.
        return torch.round(group.double() * num_tokens.double() / loaded.clamp_min(1).double()).long()

    def normalize_loss(self, loss_sum: Tensor, group_count: Tensor | None, num_tokens: Tensor) -> Tensor:
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        world_size = int(trainer.world_size) if trainer is not None else 1
        if group_count is None:  # per-micro-batch mean: exact without gradient accumulation only
            if accumulate > 1 and not self._warned_no_group_count:
                warnings.warn(
                    "batches carry no 'num_items_in_batch': the loss is normalised per micro-batch, not over the "
                    f"{accumulate} accumulated micro-batches (use TextDataModule, which counts them).",
                    stacklevel=2,
                )
                self._warned_no_group_count = True
            return normalize_token_sum(loss_sum, num_tokens, 1, world_size)  # Lightning divides by accumulate
        return normalize_token_sum(loss_sum, group_count, accumulate, world_size)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        sums, num_tokens = self.token_loss_sums(batch)
        self.check_finite(sums, batch, batch_idx)
        count = num_tokens.clamp_min(1)
        self.log_terms("train", {k: v.detach() / count for k, v in sums.items()}, batch_size=int(count))
        for loss in self.scheduled_losses():
            for name, value in loss.schedule_stats().items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        return self.normalize_loss(sums["loss"], self.group_token_count(batch, num_tokens), num_tokens)

    def batch_size_of(self, batch: Any) -> int:
        return int(lm_batch(batch)[0].shape[0])

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self) -> None:
        for stage in ("val", "test"):
            self.metrics[f"{stage}_loss"] = MeanMetric()
            self.metrics[f"{stage}_ppl"] = ExpMeanMetric()
            self.metrics[f"{stage}_acc"] = MeanMetric()
            if self.fidelity:
                self.metrics[f"{stage}_teacher_ppl"] = ExpMeanMetric()
                self.metrics[f"{stage}_teacher_acc"] = MeanMetric()
                self.metrics[f"{stage}_agreement"] = MeanMetric()
                self.metrics[f"{stage}_kl_to_teacher"] = MeanMetric()
        self.build_verifier_metrics()

    def _update(self, stage: str, name: str, values: Tensor, num_tokens: int, prog_bar: bool = False) -> None:
        metric = self.metrics[f"{stage}_{name}"]
        metric.update(values.float())
        self.log(f"{stage}/{name}", metric, batch_size=num_tokens, prog_bar=prog_bar)

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        self.evaluate_with_verifier(self.student, batch, stage)
        input_ids, attention_mask, labels = lm_batch(batch)
        logits = self.student(input_ids, attention_mask=attention_mask)
        s, y, mask = shift_for_next_token(logits, labels)
        if not bool(mask.any()):
            return
        n = int(mask.sum())
        ce = masked_token_cross_entropy(s, y, mask)[mask]
        self._update(stage, "loss", ce, n)
        self._update(stage, "ppl", ce, n, prog_bar=True)
        self._update(stage, "acc", (s.argmax(-1) == y)[mask], n, prog_bar=True)
        if self.fidelity:
            self.eval_with_teacher_lm(input_ids, attention_mask, s, y, mask, stage)

    def eval_with_teacher_lm(
        self, input_ids: Tensor, attention_mask: Tensor | None, s: Tensor, y: Tensor, mask: Tensor, stage: str
    ) -> None:
        """Teacher perplexity/accuracy, agreement and KL(p_T ‖ p_S) over the valid tokens."""
        teacher = self.lm_teacher_logits(input_ids, attention_mask)[:, :-1]
        n = int(mask.sum())
        self._update(stage, "teacher_ppl", masked_token_cross_entropy(teacher, y, mask)[mask], n)
        self._update(stage, "teacher_acc", (teacher.argmax(-1) == y)[mask], n)
        s_aligned, t_aligned = self.align(s, teacher)
        self._update(stage, "agreement", (s_aligned.argmax(-1) == t_aligned.argmax(-1))[mask], n)
        self._update(stage, "kl_to_teacher", forward_kl(s_aligned, t_aligned, reduction="none")[mask], n)

    def export_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}


class LMSupervised(SingleNetwork, LanguageModelDistillation):
    """Next-token cross-entropy training of one causal LM: LM teachers and the student-alone baseline.

    ``L = Σ_{valid tokens t} CE(z_t, y_{t+1}) / N_valid`` with ``N_valid`` counted over the whole
    gradient-accumulation group and every DDP rank (global token normalisation), optional label
    smoothing ε. Validation: ``val/loss``, ``val/ppl``, ``val/acc`` (token top-1). ``kd fit`` trains
    missing LM teachers with it. On reasoning batches that carry ``sft_*`` sequences (the data's
    ``privileged_fraction``) it trains on those.

    Args:
        model: the causal LM (``forward(input_ids, attention_mask) -> logits [B, T, V]``).
        label_smoothing: ε in [0, 1).
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes`` (the tokenizer's vocabulary size; the
            data's by default) and the other arguments of :class:`LanguageModelDistillation`.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)

    def check_vocabularies(self, data_name: str) -> None:
        vocab = self.probe_vocab("model", self.student)
        if self.num_classes is None:
            self.num_classes = vocab

    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        if isinstance(batch, Mapping) and "sft_input_ids" in batch:  # reasoning data's privileged_fraction rows
            batch = {
                **batch,
                "input_ids": batch["sft_input_ids"],
                "attention_mask": batch["sft_attention_mask"],
                "labels": batch["sft_labels"],
            }
        input_ids, attention_mask, labels = lm_batch(batch)
        return next_token_ce_sums(self.student(input_ids, attention_mask=attention_mask), labels, self.label_smoothing)


def next_token_ce_sums(
    logits: Tensor, labels: Tensor, label_smoothing: float = 0.0
) -> tuple[dict[str, Tensor], Tensor]:
    """``({"loss": Σ CE, "ce": Σ CE detached}, number of predicted tokens)``: label-smoothed next-token
    cross-entropy summed over the valid (label ≠ -100) tokens, the supervised modules' ``token_loss_sums``."""
    s, y, mask = shift_for_next_token(logits, labels)
    flat = upcast(s).reshape(-1, s.shape[-1])
    ce = F.cross_entropy(flat, y.masked_fill(~mask, 0).reshape(-1), reduction="none", label_smoothing=label_smoothing)
    total = (ce.reshape(y.shape) * mask.to(ce.dtype)).sum()
    return {"loss": total, "ce": total.detach()}, mask.sum()


LanguageModelDistillation.teacher_training_module = LMSupervised
