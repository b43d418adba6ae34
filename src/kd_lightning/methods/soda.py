"""SODA: semi on-policy black-box distillation with DPO (Chen et al., arXiv 2604.03873, 2026)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dpo import dpo_loss
from kd_lightning.losses.terms import active, check_weights
from kd_lightning.methods.tasks.generation import check_generation_length, response_logits, sequence_logprob
from kd_lightning.methods.tasks.reasoning import ReasoningDistillation

__all__ = ["SODA"]

SNAPSHOT_KEY = "soda_snapshot"


def _pad_right(rows: list[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D id tensors into ``(ids [B, N], mask [B, N])`` (``N >= 1``)."""
    width = max(1, max((int(r.numel()) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = True
    return ids, mask


class SODA(ReasoningDistillation):
    """SODA: DPO with the teacher's answer as chosen and the base student's own answer as rejected.

    Black-box: the teacher (the ``teacher`` slot) is only asked to ``generate`` text; its logits are never
    used (no teacher forward anywhere, also not at setup or evaluation). At the start of the fit, before any
    update and identically on every rank, a **static snapshot** is built for every training prompt ``x_i``
    (keyed by the batch's ``sample_index``):

    - chosen ``y⁺_i``: the teacher's response (``teacher_temperature``; 0 = greedy);
    - rejected ``y⁻_i``: the BASE student π_0's own response (``student_temperature``), sampled once;

    both after the same student prompt ids (``prompt_ids``; identical template for chosen and rejected) and
    at most ``max_new_tokens`` long. Then optionally ``sft_warmup_epochs`` of SFT on the chosen responses
    (``−Σ log π(y⁺|x) / Σ|y⁺|`` per micro-batch), after which the student trains with DPO
    (Rafailov et al., 2023)::

        L = −log σ(β[(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))]) + λ·(−log π(y⁺|x)/|y⁺|)

    log-probs summed over response tokens (divided by the token count with ``length_normalize``),
    averaged over the micro-batch's kept pairs (:func:`~kd_lightning.losses.dpo.dpo_loss`). The reference
    π_ref is a frozen copy of the student (a submodule in eval mode, never updated, not a teacher) taken
    after the warm-up (π_sft) or at the start (π_0). The snapshot and the reference travel with every
    checkpoint, so a resumed run keeps them. Logged: ``train/dpo``, ``train/nll``, ``train/margin``,
    ``train/chosen_reward``, ``train/rejected_reward``, ``train/accuracy`` (margin > 0), ``train/pairs``
    (kept pairs per batch), ``train/sft`` during the warm-up; the snapshot's teacher / base pass rates and
    kept fraction are printed once and kept in :attr:`snapshot_stats`.

    RECONSTRUCTION (only the abstract and a summary are verified; no code): the teacher's sampling
    temperature (greedy by default), the student's (1.0), β = 0.1, one rejected sample per prompt, the
    SFT warm-up (off by default) and the reference model choice, the length normalisation and NLL
    regulariser (off), and the pair filter (on: pairs whose rejected response equals the chosen one or is
    already verified correct are dropped) are all unverified choices, hence arguments. ``rejected_policy:
    after_warmup`` (rejected answers from π_sft) is an extension for bases that are not pre-trained. The teacher must
    share the student's tokenizer (its token ids are read as the student's; a true API teacher's text
    would be re-tokenised).

    Args:
        student: causal LM to train (``forward`` and ``generate``).
        teacher: black-box teacher LM: only its ``generate`` is called.
        beta: β > 0 of DPO.
        length_normalize: divide each sequence log-prob by its token count (TRL's ``sigmoid_norm``).
        nll_weight: λ ≥ 0 of the chosen-response NLL regulariser (per-token mean of each pair).
        max_new_tokens: longest chosen / rejected response.
        teacher_temperature: temperature of the teacher's responses (0 = greedy).
        student_temperature: temperature of the base student's rejected responses (0 = greedy).
        student_top_k: top-k filter of the student's sampling (``None``: full distribution).
        filter_equal: drop pairs whose rejected response equals the chosen one or is verified correct.
        sft_warmup_epochs: epochs of SFT on the chosen responses before DPO.
        reference: ``"after_warmup"`` (π_sft after the warm-up, π_0 without one) or ``"base"`` (always π_0).
        rejected_policy: who answers the rejected side: ``"base"`` (π_0 at fit start, the paper's setting) or
            ``"after_warmup"`` (π_sft, once, when the warm-up ends: for a base that is not pre-trained, such as a
            from-scratch CPU demo student, whose own answers would be noise; an extension, not the paper's).
        snapshot_batch_size: prompts per generation call while building the snapshot.
        snapshot_seed: seed of the snapshot's sampling (``None``: ``torch.initial_seed()``, i.e. the run's seed).
        fidelity: must stay ``False``: the teacher-fidelity metrics would run the black-box teacher's forward.
        **kwargs: :class:`~kd_lightning.methods.tasks.reasoning.ReasoningDistillation`'s arguments
            (``eval_max_new_tokens``, ``optimizer``, ...).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        beta: float = 0.1,
        length_normalize: bool = False,
        nll_weight: float = 0.0,
        max_new_tokens: int = 48,
        teacher_temperature: float = 0.0,
        student_temperature: float = 1.0,
        student_top_k: int | None = None,
        filter_equal: bool = True,
        sft_warmup_epochs: int = 0,
        reference: Literal["after_warmup", "base"] = "after_warmup",
        rejected_policy: Literal["base", "after_warmup"] = "base",
        snapshot_batch_size: int = 32,
        snapshot_seed: int | None = None,
        fidelity: bool = False,
        **kwargs: Any,
    ) -> None:
        if fidelity:
            raise KDConfigError(
                "fidelity",
                "would run the teacher's forward at evaluation, but SODA's teacher is a black box (text only)",
                "leave fidelity false",
            )
        super().__init__(student=student, teacher=teacher, fidelity=False, **kwargs)
        if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise KDConfigError("beta", f"must be a finite number > 0, got {beta!r}", "DPO commonly uses 0.1")
        check_weights(nll_weight=nll_weight)
        check_generation_length("max_new_tokens", max_new_tokens)
        for name, value in (("teacher_temperature", teacher_temperature), ("student_temperature", student_temperature)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise KDConfigError(name, f"must be a finite number >= 0 (0 = greedy), got {value!r}")
        checks = {
            "student_top_k": (student_top_k is None or student_top_k >= 1, ">= 1 or null"),
            "sft_warmup_epochs": (sft_warmup_epochs >= 0, ">= 0"),
            "reference": (reference in ("after_warmup", "base"), "'after_warmup' or 'base'"),
            "rejected_policy": (rejected_policy in ("base", "after_warmup"), "'base' or 'after_warmup'"),
            "snapshot_batch_size": (snapshot_batch_size >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(name, f"must be {allowed}, got {locals()[name]!r}")
        if not len(self.teachers):
            raise KDConfigError("teacher", "is missing", "SODA needs a teacher that writes the chosen responses")
        for field, network in (("student", student), ("teacher", self.teacher)):
            if not callable(getattr(network, "generate", None)):
                raise KDConfigError(
                    field, f"{type(network).__name__} has no generate()", "SODA samples responses with it"
                )
        self.beta = float(beta)
        self.length_normalize = length_normalize
        self.nll_weight = nll_weight
        self.max_new_tokens = max_new_tokens
        self.teacher_temperature = float(teacher_temperature)
        self.student_temperature = float(student_temperature)
        self.student_top_k = student_top_k
        self.filter_equal = filter_equal
        self.sft_warmup_epochs = sft_warmup_epochs
        self.reference_choice = reference
        self.rejected_policy = rejected_policy
        self.snapshot_batch_size = snapshot_batch_size
        self.snapshot_seed = snapshot_seed
        #: Frozen reference policy π_ref (a copy of the student; filled at fit start / after the warm-up).
        self.reference = copy.deepcopy(student)
        self.reference.requires_grad_(False)
        self.reference.eval()
        #: Static preference pairs (CPU tensors, row = sample_index): chosen/rejected ids and masks, keep, ...
        self.snapshot: dict[str, Tensor] | None = None
        self.snapshot_stats: dict[str, float] = {}
        self._reference_ready = False

    # ------------------------------------------------------------------ networks
    def networks_to_check(self) -> dict[str, nn.Module]:
        """Only the student is probed: the black-box teacher's forward is never run."""
        return {"student": self.student}

    def train(self, mode: bool = True) -> SODA:
        super().train(mode)
        self.reference.eval()
        return self

    def set_reference(self) -> None:
        """π_ref ← the student's current weights (frozen, eval mode)."""
        self.reference.load_state_dict(self.student.state_dict())
        self.reference.requires_grad_(False)
        self.reference.eval()
        self._reference_ready = True

    def in_warmup(self) -> bool:
        return self.current_epoch < self.sft_warmup_epochs

    # ------------------------------------------------------------------ snapshot
    def snapshot_loader(self) -> DataLoader:
        """The training prompts in a fixed order (same on every rank), ``snapshot_batch_size`` per batch."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        from kd_lightning.data.reasoning import ReasoningDataModule, collate_reasoning

        dataset, collate = None, None
        if isinstance(datamodule, ReasoningDataModule) and datamodule.train_set is not None:
            dataset = datamodule.train_set
            collate = partial(collate_reasoning, pad_token_id=int(datamodule.pad_token_id))
        else:  # another data module with the same batches: its training loader's dataset, in order
            loader = trainer.train_dataloader
            if loader is None:
                loader = datamodule.train_dataloader() if datamodule is not None else None
            dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
        if dataset is None:
            raise KDConfigError(
                "data.class_path", "SODA needs a map-style training dataset to snapshot", "use ReasoningDataModule"
            )
        return DataLoader(dataset, batch_size=self.snapshot_batch_size, shuffle=False, collate_fn=collate)

    @torch.no_grad()
    def build_snapshot(self, loader: Any, parts: tuple[str, ...] = ("chosen", "rejected")) -> dict[str, Tensor]:
        """Teacher (``"chosen"``) and/or current-student (``"rejected"``) responses for every prompt, once.

        Returns CPU tensors with one row per ``sample_index``: ``present``, ``<part>_ids``, ``<part>_mask``,
        ``<part>_correct`` (verifier; false without one). Sampling runs under a forked RNG seeded with
        ``snapshot_seed`` (the training RNG is untouched), so every rank builds the same pairs.
        """
        seed = self.snapshot_seed if self.snapshot_seed is not None else torch.initial_seed()
        devices = [self.device] if self.device.type == "cuda" else []
        rows: dict[str, dict[int, tuple[Tensor, bool]]] = {part: {} for part in parts}
        vocab = self.num_classes
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in loader:
                missing = [k for k in ("prompt_ids", "prompt_mask", "sample_index") if k not in batch]
                if missing:
                    raise KDConfigError(
                        "data.class_path",
                        f"SODA needs batches with {missing} (prompts to answer, keyed by sample)",
                        "use ReasoningDataModule",
                    )
                prompt_ids = batch["prompt_ids"].to(self.device)
                prompt_mask = batch["prompt_mask"].to(self.device)
                answers = batch.get("answers")
                for part in parts:
                    if part == "chosen":
                        model, temperature, top_k = self.teacher, self.teacher_temperature, None
                    else:
                        model, temperature, top_k = self.student, self.student_temperature, self.student_top_k
                    result = self.sample(
                        model,
                        prompt_ids,
                        prompt_mask,
                        max_new_tokens=self.max_new_tokens,
                        temperature=temperature,
                        top_k=top_k,
                    )
                    if part == "chosen" and vocab is not None and int(result.response_ids.max()) >= vocab:
                        raise KDConfigError(
                            "model.init_args.teacher",
                            f"generated token id {int(result.response_ids.max())} outside the student's {vocab} ids",
                            "the black-box teacher must use the student's tokenizer",
                        )
                    if answers is not None and self.verifier is not None:
                        correct = self.rewards(result, answers).tolist()
                    else:
                        correct = [0.0] * prompt_ids.shape[0]
                    for i, index in enumerate(batch["sample_index"].tolist()):
                        ids = result.response_ids[i][result.response_mask[i]].cpu()
                        rows[part][index] = (ids, correct[i] == 1.0)
        indices = set().union(*(r.keys() for r in rows.values()))
        if not indices:
            raise KDConfigError("data", "the training set is empty", "SODA needs prompts to answer")
        size = max(indices) + 1
        out = {"present": torch.tensor([i in indices for i in range(size)])}
        empty = (torch.zeros(0, dtype=torch.long), False)
        for part, found in rows.items():
            ordered = [found.get(i, empty) for i in range(size)]
            out[f"{part}_ids"], out[f"{part}_mask"] = _pad_right([r[0] for r in ordered], self.pad_token_id)
            out[f"{part}_correct"] = torch.tensor([r[1] for r in ordered])
        return out

    def select_pairs(self, snapshot: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add ``keep`` (and :attr:`snapshot_stats`): with ``filter_equal``, pairs whose rejected response equals
        the chosen one or is verified correct are dropped."""
        present = snapshot["present"]
        n = max(1, int(present.sum()))
        stats = {"pairs": float(present.sum()), "teacher_pass": float(snapshot["chosen_correct"][present].sum()) / n}
        if "rejected_ids" not in snapshot:  # rejected answers come after the warm-up
            self.snapshot_stats = stats
            return {**snapshot, "keep": present.clone()}
        width = max(snapshot["chosen_ids"].shape[1], snapshot["rejected_ids"].shape[1])

        def tokens(part: str) -> Tensor:  # ids with -1 outside the response, at a common width
            ids = F.pad(snapshot[f"{part}_ids"], (0, width - snapshot[f"{part}_ids"].shape[1]), value=-1)
            mask = F.pad(snapshot[f"{part}_mask"], (0, width - snapshot[f"{part}_mask"].shape[1]), value=False)
            return ids.masked_fill(~mask, -1)

        equal = (tokens("chosen") == tokens("rejected")).all(-1)
        dropped = (equal | snapshot["rejected_correct"]) if self.filter_equal else torch.zeros_like(present)
        keep = present & ~dropped
        stats.update(
            base_pass=float(snapshot["rejected_correct"][present].sum()) / n,
            equal=float(equal[present].sum()) / n,
            kept=float(keep.sum()) / n,
        )
        self.snapshot_stats = stats
        return {**snapshot, "keep": keep}

    def _report(self, what: str) -> None:
        stats = ", ".join(f"{k}={v:.3g}" for k, v in self.snapshot_stats.items())
        rank_zero_info(f"SODA {what}: {stats}")

    def on_train_start(self) -> None:
        """Fresh fit: build the snapshot (rejected from the base student π_0 unless ``rejected_policy`` says
        after the warm-up) and, without a warm-up (or with ``reference: base``), set π_ref = π_0."""
        if self.snapshot is None:
            later = self.rejected_policy == "after_warmup" and self.sft_warmup_epochs > 0
            parts = ("chosen",) if later else ("chosen", "rejected")
            self.snapshot = self.select_pairs(self.build_snapshot(self.snapshot_loader(), parts))
            self._report("snapshot")
        if not self._reference_ready and (self.sft_warmup_epochs == 0 or self.reference_choice == "base"):
            self.set_reference()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.in_warmup():
            return
        if self.snapshot is not None and "rejected_ids" not in self.snapshot:  # π_sft answers (rejected_policy)
            rejected = self.build_snapshot(self.snapshot_loader(), ("rejected",))
            self.snapshot = self.select_pairs(
                {**self.snapshot, **{k: v for k, v in rejected.items() if k != "present"}}
            )
            self._report("rejected answers after the warm-up")
        if not self._reference_ready:
            self.set_reference()  # π_sft: the student after the warm-up

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.snapshot is not None:
            checkpoint[SNAPSHOT_KEY] = {
                "pairs": {k: v.clone() for k, v in self.snapshot.items()},
                "stats": dict(self.snapshot_stats),
                "reference_ready": self._reference_ready,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(SNAPSHOT_KEY)
        if saved is not None:
            self.snapshot = {k: v.cpu() for k, v in saved["pairs"].items()}
            self.snapshot_stats = dict(saved["stats"])
            self._reference_ready = bool(saved["reference_ready"])

    # ------------------------------------------------------------------ training
    def pairs_of(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The snapshot rows of a batch (by ``sample_index``), on the batch's device."""
        if self.snapshot is None:
            raise RuntimeError("SODA's snapshot is built at the start of fit (on_train_start)")
        index = batch["sample_index"].cpu()
        present = self.snapshot["present"]
        if int(index.max()) >= present.numel() or not bool(present[index].all()):
            raise KDConfigError(
                "data", "a training batch holds a sample_index missing from the snapshot", "do not change the data"
            )
        device = batch["prompt_ids"].device
        return {k: v[index].to(device) for k, v in self.snapshot.items()}

    def response_sums(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor):
        """``Σ log p(y_t)`` per row of ``model`` over the masked response tokens."""
        width = max(1, int(mask.sum(-1).max()))
        ids, mask = ids[:, :width], mask[:, :width]
        return sequence_logprob(response_logits(model, prompt_ids, prompt_mask, ids, mask), ids, mask)

    def sft_step(self, batch: Mapping[str, Any], pairs: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens = pairs["chosen_mask"].sum()
        logp = self.response_sums(
            self.student, batch["prompt_ids"], batch["prompt_mask"], pairs["chosen_ids"], pairs["chosen_mask"]
        )
        sft = -logp.sum() / tokens.clamp_min(1)
        return {"loss": sft, "sft": sft}

    def dpo_step(
        self, batch: Mapping[str, Any], pairs: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        keep = pairs["keep"]
        prompt_ids, prompt_mask = batch["prompt_ids"][keep], batch["prompt_mask"][keep]
        rows = int(keep.sum())
        width = max(pairs["chosen_ids"].shape[1], pairs["rejected_ids"].shape[1])

        def widen(x: Tensor, fill: Any) -> Tensor:
            return F.pad(x[keep], (0, width - x.shape[1]), value=fill)

        ids = torch.cat(
            [widen(pairs["chosen_ids"], self.pad_token_id), widen(pairs["rejected_ids"], self.pad_token_id)]
        )
        mask = torch.cat([widen(pairs["chosen_mask"], False), widen(pairs["rejected_mask"], False)])
        prompts, prompt_masks = prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1)
        policy = self.response_sums(self.student, prompts, prompt_masks, ids, mask)
        with torch.no_grad():
            ref = self.response_sums(self.reference, prompts, prompt_masks, ids, mask)
        lengths = mask.sum(-1)
        out = dpo_loss(
            policy[:rows],
            policy[rows:],
            ref[:rows],
            ref[rows:],
            beta=self.beta,
            chosen_lengths=lengths[:rows],
            rejected_lengths=lengths[rows:],
            length_normalize=self.length_normalize,
            nll_weight=self.nll_weight,
        )
        terms = {"loss": out["loss"].mean(), "dpo": out["dpo"].mean()}
        if active(self.nll_weight):
            terms["nll"] = out["nll"].mean()
        stats = {
            "margin": out["margin"].mean(),
            "chosen_reward": out["chosen_reward"].mean(),
            "rejected_reward": out["rejected_reward"].mean(),
            "accuracy": (out["margin"] > 0).float().mean(),
        }
        return terms, stats

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        pairs = self.pairs_of(batch)
        size = int(batch["prompt_ids"].shape[0])
        if self.in_warmup():
            terms = self.sft_step(batch, pairs)
            self.check_finite(terms, batch, batch_idx)
            self.log_terms("train", terms, batch_size=size)
            return terms["loss"]
        kept = int(pairs["keep"].sum())
        self.log("train/pairs", float(kept), on_step=True, on_epoch=True, batch_size=size)
        if kept == 0:  # every pair filtered: a zero loss that still reaches every parameter (DDP-safe)
            return torch.stack([p.sum() for p in self.trainable_parameters()]).sum() * 0.0
        terms, stats = self.dpo_step(batch, pairs)
        self.check_finite(terms, batch, batch_idx)
        self.log_terms("train", terms, batch_size=kept)
        for name, value in stats.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=kept)
        return terms["loss"]
