"""Sequence-to-sequence (translation) task sibling: :class:`Seq2SeqDistillation` and :class:`Seq2SeqSupervised`.

Both train encoder-decoder models (:mod:`kd_lightning.models.seq2seq`: ``TinySeq2Seq``, ``HFSeq2SeqLM``) on the
dict batches of :class:`~kd_lightning.data.translation.TranslationDataModule`::

    input_ids, attention_mask [B, S]; decoder_input_ids, decoder_attention_mask [B, T] (BOS + target);
    labels [B, T] (target + EOS, -100 at padding: position t predicts labels[t], no shift);
    references, sources (list[str]); sample_index [B]; num_items_in_batch [] (training)

What they share:

- **Global token normalisation** (as the LM task): a method returns loss *sums* over the valid target tokens
  (:meth:`Seq2SeqDistillation.token_loss_sums`, or :meth:`~Seq2SeqDistillation.distillation_sums` from student and
  teacher logits); ``training_step`` divides by the valid tokens of the accumulation group on every rank
  (``num_items_in_batch``, :func:`~kd_lightning.losses.lm.normalize_token_sum`).
- **Hooks for methods**: :meth:`~Seq2SeqDistillation.decoder_kwargs` ``(batch, stage) -> dict`` adds arguments to
  the student's forward in training *and* to its ``generate`` in evaluation (e.g. attention maps + an injection
  operator); :meth:`~Seq2SeqDistillation.student_output` / :meth:`~Seq2SeqDistillation.teacher_output` run the
  networks on a batch (``Seq2SeqOutput``).
- **Evaluation** (val/test, synced across DDP ranks): ``loss`` (mean token cross-entropy), ``acc`` (token top-1,
  teacher-forced) and, from greedy decoding of the student, sacreBLEU ``bleu`` and ``chrf`` over the split
  (corpus-level: the sentences' sufficient statistics are summed in torchmetrics sum states, so the score equals
  ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` on the whole split however it is sharded).
- **Checks at setup** (one-line errors): the data's task is translation; the student's, the teacher's and the
  data tokenizer's vocabulary sizes are equal, and so are their pad/BOS/EOS ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.lm import normalize_token_sum
from kd_lightning.methods.core import DistillationModule, SingleNetwork, describe

__all__ = [
    "IGNORE_INDEX",
    "SacreBLEUMetric",
    "Seq2SeqDistillation",
    "Seq2SeqSupervised",
    "seq2seq_batch",
]

IGNORE_INDEX = -100
#: The data task these methods train on (``TranslationDataModule.task``).
TRANSLATION = "translation"
_BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")


def seq2seq_batch(batch: Any) -> dict[str, Any]:
    """The batch as a dict with the seq2seq keys (a one-line error otherwise)."""
    if not isinstance(batch, Mapping) or any(k not in batch for k in _BATCH_KEYS):
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KDConfigError(
            "data.class_path",
            f"seq2seq methods need dict batches with {list(_BATCH_KEYS)}, got {got}",
            "use TranslationDataModule (or a data module with the same batches)",
        )
    return batch  # type: ignore[return-value]


def _import_sacrebleu() -> Any:
    try:
        import sacrebleu.metrics
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "BLEU/chrF evaluation needs sacrebleu: pip install 'kd-lightning[translation]' (or pip install sacrebleu)."
        ) from err
    return sacrebleu.metrics


class SacreBLEUMetric(Metric):
    """Corpus BLEU or chrF by sacreBLEU, synced across processes through summed sufficient statistics.

    ``update(hypotheses, references)`` adds the sentences' statistics (n-gram matches and totals, lengths;
    character/word n-gram counts for chrF) to a float64 sum state; ``compute()`` is sacreBLEU's corpus score from
    the sums: exactly ``sacrebleu.corpus_bleu(all_hyps, [all_refs])`` (one reference per sentence).

    Args:
        kind: ``"bleu"`` or ``"chrf"``.
        **options: arguments of ``sacrebleu.metrics.BLEU`` / ``CHRF`` (``tokenize``, ``lowercase``, ``word_order``).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, kind: str = "bleu", **options: Any) -> None:
        super().__init__()
        metrics = _import_sacrebleu()
        if kind not in ("bleu", "chrf"):
            raise KDConfigError("kind", f"must be 'bleu' or 'chrf', got {kind!r}")
        self.kind = kind
        self.scorer = metrics.BLEU(**options) if kind == "bleu" else metrics.CHRF(**options)
        width = len(self.scorer._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", default=torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:  # type: ignore[override]
        if len(hypotheses) != len(references):
            raise KDConfigError("references", f"{len(hypotheses)} hypotheses for {len(references)} references")
        if not hypotheses:
            return
        stats = self.scorer._extract_corpus_statistics(list(hypotheses), [list(references)])
        summed = torch.as_tensor(np.asarray(stats, dtype=np.float64).sum(0), dtype=torch.float64)
        self.stats += summed.to(self.stats.device)

    def compute(self) -> Tensor:
        values = self.stats.cpu().numpy()
        stats = values.round().astype(np.int64).tolist() if self.kind == "bleu" else values.tolist()
        return torch.tensor(float(self.scorer._compute_score_from_stats(stats).score), dtype=torch.float64)


class Seq2SeqDistillation(DistillationModule):
    """Translation: an encoder-decoder student learns from frozen encoder-decoder teacher(s) (module docstring).

    Subclasses implement :meth:`distillation_sums` (token losses summed over the valid target tokens, from student
    and teacher logits ``[B, T, V]``) or :meth:`token_loss_sums` (their own forward passes), and may override
    :meth:`decoder_kwargs`.

    Args:
        student: seq2seq model (``forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
            **decoder_kwargs) -> Seq2SeqOutput``, ``generate``).
        teacher: seq2seq teacher (frozen, eval mode, run under ``no_grad``).
        num_classes: the tokenizer's vocabulary size; ``None`` takes the data module's.
        eval_max_new_tokens: longest greedy translation in evaluation; ``None``: 1.25 x the data's longest
            reference (+ EOS) + 4.
        val_decode_every_n_epochs: decode (BLEU/chrF) the validation set every n-th epoch (``0``: only the test
            set is decoded; loss and accuracy are logged every epoch).
        bleu_options: arguments of ``sacrebleu.metrics.BLEU`` (default ``{}``: 13a tokenisation, exp smoothing).
        chrf_options: arguments of ``sacrebleu.metrics.CHRF`` (default ``{}``: chrF2, character 6-grams).
        **kwargs: the core's arguments (``teacher_ckpt``, ``optimizer``, ``lr_scheduler``, ...).
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # Seq2SeqSupervised, set below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        eval_max_new_tokens: int | None = None,
        val_decode_every_n_epochs: int = 1,
        bleu_options: dict[str, Any] | None = None,
        chrf_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if eval_max_new_tokens is not None and eval_max_new_tokens < 1:
            raise KDConfigError("eval_max_new_tokens", f"must be >= 1 or null, got {eval_max_new_tokens}")
        if val_decode_every_n_epochs < 0:
            raise KDConfigError("val_decode_every_n_epochs", f"must be >= 0, got {val_decode_every_n_epochs}")
        self.num_classes = num_classes
        self.eval_max_new_tokens = eval_max_new_tokens
        self.val_decode_every_n_epochs = val_decode_every_n_epochs
        self.bleu_options = dict(bleu_options or {})
        self.chrf_options = dict(chrf_options or {})
        self.tokenizer: Any = None  # the data's (set at setup); decodes hypotheses for BLEU/chrF
        self.metrics = nn.ModuleDict()

    # ------------------------------------------------------------------ forward passes
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor, **kwargs: Any
    ) -> Any:
        """The student's forward (a ``Seq2SeqOutput``)."""
        return self.student(input_ids, attention_mask, decoder_input_ids, **kwargs)

    def inputs_of(self, batch: Any) -> Any:
        return seq2seq_batch(batch)["input_ids"]

    def batch_size_of(self, batch: Any) -> int:
        return int(seq2seq_batch(batch)["input_ids"].shape[0])

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"student": self.student, **self.teacher_fields()}

    def decoder_kwargs(self, batch: Any, stage: str) -> dict[str, Any]:
        """Extra arguments of the student's ``forward`` (training, evaluation) and ``generate`` (evaluation
        decoding), e.g. ``{"cross_attention_maps": maps, "injection": "add"}``. ``stage``: ``"train"``, ``"val"``,
        ``"test"`` or ``"predict"``. Nothing by default."""
        return {}

    def student_output(self, batch: Any, stage: str = "train", **extra: Any) -> Any:
        """The student's teacher-forced ``Seq2SeqOutput`` on ``batch`` (with :meth:`decoder_kwargs` and ``extra``)."""
        b = seq2seq_batch(batch)
        kwargs = {**self.decoder_kwargs(batch, stage), **extra}
        return self.student(
            b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b.get("decoder_attention_mask"), **kwargs
        )

    def teacher_output(self, batch: Any, name: str | None = None, **extra: Any) -> Any:
        """A teacher's teacher-forced ``Seq2SeqOutput`` (no grad, eval mode; no :meth:`decoder_kwargs`)."""
        b = seq2seq_batch(batch)
        return self.run_teacher(
            b["input_ids"],
            b["attention_mask"],
            b["decoder_input_ids"],
            b.get("decoder_attention_mask"),
            name=name,
            **extra,
        )

    # ------------------------------------------------------------------ checks
    def check_data(self, datamodule: Any) -> None:
        data_name = type(datamodule).__name__ if datamodule is not None else "the data"
        task = getattr(datamodule, "task", TRANSLATION)
        if datamodule is not None and task != TRANSLATION:
            raise KDConfigError(
                "data.class_path",
                f"{type(self).__name__} trains on translation data, but {data_name} serves {task!r} batches",
                "use TranslationDataModule",
            )
        trainer = self._trainer
        if datamodule is not None and trainer is not None and hasattr(datamodule, "accumulate_grad_batches"):
            datamodule.accumulate_grad_batches = int(trainer.accumulate_grad_batches)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.tokenizer = tokenizer
        data_vocab = getattr(datamodule, "vocab_size", None)
        if self.num_classes is None:
            self.num_classes = int(data_vocab) if data_vocab is not None else None
        elif data_vocab is not None and int(data_vocab) != self.num_classes:
            raise KDConfigError(
                "model.init_args.num_classes",
                f"is {self.num_classes} but the tokenizer of {data_name} has {data_vocab} ids",
                f"set num_classes to {data_vocab} (or leave it empty to take the data's)",
            )
        for field, network in self.networks_to_check().items():
            self.check_network(field, network, data_name)
        if self.eval_max_new_tokens is None and hasattr(datamodule, "longest_target_tokens"):
            self.eval_max_new_tokens = math.ceil(1.25 * datamodule.longest_target_tokens()) + 4
        if not self.metrics:
            self.build_metrics()

    def check_network(self, field: str, network: nn.Module, data_name: str) -> None:
        """The network's vocabulary size and special ids must be the data tokenizer's (one-line errors)."""
        where = f"model.init_args.{field}"
        vocab = getattr(network, "vocab_size", None)
        if vocab is None:
            raise KDConfigError(
                where,
                f"{describe(network)} has no vocab_size",
                "use a seq2seq model of kd_lightning.models.seq2seq (TinySeq2Seq, HFSeq2SeqLM)",
            )
        if self.num_classes is not None and int(vocab) != int(self.num_classes):
            raise KDConfigError(
                f"{where}.init_args.vocab_size",
                f"{describe(network)} predicts {vocab} tokens but the tokenizer of {data_name} has {self.num_classes}",
                f"build it with vocab_size: {self.num_classes} (= data.init_args.max_vocab)",
            )
        tokenizer = self.tokenizer
        if tokenizer is None:
            return
        for role in ("pad_token_id", "bos_token_id", "eos_token_id"):
            mine, theirs = getattr(network, role, None), getattr(tokenizer, role, None)
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                raise KDConfigError(
                    f"{where}.init_args.{role}",
                    f"is {mine} but the tokenizer of {data_name} uses {theirs}",
                    f"set {role}: {theirs}",
                )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._save_tokenizer()

    @rank_zero_only
    def _save_tokenizer(self) -> None:
        trainer = self._trainer
        folder = getattr(trainer, "log_dir", None) if trainer is not None else None
        if folder and self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(Path(folder) / "tokenizer.json")

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """``({"loss": Σ_tokens total, **Σ_tokens parts}, number of valid target tokens)`` for a micro-batch."""
        b = seq2seq_batch(batch)
        labels = b["labels"]
        mask = labels != IGNORE_INDEX
        student = self.student_output(batch, "train").logits
        teacher = self.teacher_output(batch).logits
        return self.distillation_sums(student, teacher, labels.masked_fill(~mask, 0), mask), mask.sum()

    def distillation_sums(self, student: Tensor, teacher: Tensor, targets: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``{"loss": Σ total, **Σ parts}`` over the tokens of ``mask`` (logits ``[B, T, V]``)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither distillation_sums nor token_loss_sums.")

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        """Per-token means of the micro-batch (the step itself uses :meth:`token_loss_sums`)."""
        sums, count = self.token_loss_sums(batch)
        return {k: v / count.clamp_min(1) for k, v in sums.items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        sums, num_tokens = self.token_loss_sums(batch)
        self.check_finite(sums, batch, batch_idx)
        count = num_tokens.clamp_min(1)
        self.log_terms("train", {k: v.detach() / count for k, v in sums.items()}, batch_size=int(count))
        for loss in self.scheduled_losses():
            for name, value in loss.schedule_stats().items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        trainer = self._trainer
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        world_size = int(trainer.world_size) if trainer is not None else 1
        group = batch.get("num_items_in_batch") if isinstance(batch, Mapping) else None
        if group is None:  # per-micro-batch mean (Lightning divides by the accumulation factor)
            return normalize_token_sum(sums["loss"], num_tokens, 1, world_size)
        return normalize_token_sum(sums["loss"], group, accumulate, world_size)

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self) -> None:
        for stage in ("val", "test"):
            self.metrics[f"{stage}_loss"] = MeanMetric()
            self.metrics[f"{stage}_acc"] = MeanMetric()
            self.metrics[f"{stage}_bleu"] = SacreBLEUMetric("bleu", **self.bleu_options)
            self.metrics[f"{stage}_chrf"] = SacreBLEUMetric("chrf", **self.chrf_options)

    def _decodes(self, stage: str) -> bool:
        if stage != "val":
            return True
        n = self.val_decode_every_n_epochs
        return n > 0 and (self.current_epoch + 1) % n == 0 if self._trainer is not None else n > 0

    @torch.no_grad()
    def translate(self, batch: Any, stage: str = "predict", max_new_tokens: int | None = None) -> list[str]:
        """Greedy translations of the batch by the student (with :meth:`decoder_kwargs`), decoded to text."""
        if self.tokenizer is None:
            raise KDConfigError(
                "data.class_path",
                "decoding needs the data's tokenizer (set at setup from the data module's 'tokenizer')",
                "use TranslationDataModule, or set the module's tokenizer",
            )
        b = seq2seq_batch(batch)
        steps = max_new_tokens or self.eval_max_new_tokens or 2 * int(b["labels"].shape[1]) + 4
        was_training = self.student.training
        self.student.eval()
        try:
            ids = self.student.generate(
                b["input_ids"], b["attention_mask"], max_new_tokens=steps, **self.decoder_kwargs(batch, stage)
            )
        finally:
            self.student.train(was_training)
        return [self.tokenizer.decode(row) for row in ids.tolist()]

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        b = seq2seq_batch(batch)
        labels = b["labels"]
        mask = labels != IGNORE_INDEX
        n = int(mask.sum())
        if n:
            logits = self.student_output(batch, stage).logits
            flat = upcast(logits).reshape(-1, logits.shape[-1])
            ce = F.cross_entropy(flat, labels.masked_fill(~mask, 0).reshape(-1), reduction="none").reshape(labels.shape)
            self._update(stage, "loss", ce[mask], n)
            self._update(stage, "acc", (logits.argmax(-1) == labels)[mask].float(), n, prog_bar=True)
        if self._decodes(stage) and "references" in b:
            hypotheses = self.translate(batch, stage)
            for name in ("bleu", "chrf"):
                metric = self.metrics[f"{stage}_{name}"]
                metric.update(hypotheses, list(b["references"]))
                self.log(f"{stage}/{name}", metric, batch_size=len(hypotheses), prog_bar=name == "bleu")

    def _update(self, stage: str, name: str, values: Tensor, count: int, prog_bar: bool = False) -> None:
        metric = self.metrics[f"{stage}_{name}"]
        metric.update(values.float())
        self.log(f"{stage}/{name}", metric, batch_size=count, prog_bar=prog_bar)

    def predict_step(self, batch: Any, batch_idx: int) -> list[str]:
        return self.translate(batch, "predict")

    def export_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}


class Seq2SeqSupervised(SingleNetwork, Seq2SeqDistillation):
    """Label-smoothed cross-entropy training of one seq2seq model: translation teachers and the student alone.

    ``L = Σ_{valid t} CE_ε(z_t, y_t) / N_valid`` (``N_valid`` over the accumulation group and the DDP ranks),
    label smoothing ε = 0.1 by default (Vaswani et al. 2017; the NMT default). ``kd fit`` trains missing
    translation teachers with it.

    Args:
        model: the seq2seq model.
        label_smoothing: ε in [0, 1).
        **kwargs: ``optimizer``, ``lr_scheduler`` and the other arguments of :class:`Seq2SeqDistillation`.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.1, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)

    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        b = seq2seq_batch(batch)
        labels = b["labels"]
        mask = labels != IGNORE_INDEX
        logits = self.student_output(batch, "train").logits
        flat = upcast(logits).reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(
            flat, labels.masked_fill(~mask, 0).reshape(-1), reduction="none", label_smoothing=self.label_smoothing
        )
        total = (ce.reshape(labels.shape) * mask.to(ce.dtype)).sum()
        return {"loss": total, "ce": total.detach()}, mask.sum()


Seq2SeqDistillation.teacher_training_module = Seq2SeqSupervised
