"""Attribution-guided NMT distillation (Nourbakhsh, Lamsiyah, Danilov, Schommer, arXiv 2603.11342, 2026)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.attribution_nmt import attribution_row_kl
from kd_lightning.methods.tasks.seq2seq import Seq2SeqDistillation
from kd_lightning.models.attribution import (
    ATTRIBUTION_FIELD,
    TEACHER_FREE,
    check_method,
    extract_attributions,
)
from kd_lightning.models.attributor import Attributor
from kd_lightning.models.seq2seq import INJECTION_OPERATORS
from kd_lightning.utils.fingerprint import json_digest, module_digest, update_with_tensor

__all__ = ["MAPS_VERSION", "AttributionGuidedNMT", "MapStore"]

#: Version of the cached maps' layout and key; bump it when either changes.
MAPS_VERSION = 1
IGNORE_INDEX = -100
SPLITS = ("train", "val", "test")
#: Trainer stage names -> data split whose maps a batch of that stage uses.
STAGE_SPLIT = {"train": "train", "val": "val", "test": "test", "predict": "test"}


@dataclass
class MapStore:
    """The maps of one split: ``maps [N, T_max, S_max]`` (example ``i``'s rows ``< target_lengths[i]`` and columns
    ``< source_lengths[i]``, zero elsewhere), indexed by ``sample_index``."""

    maps: Tensor
    source_lengths: Tensor
    target_lengths: Tensor

    def for_batch(self, batch: Mapping[str, Any], split: str) -> Tensor:
        """``[B, T, S]`` maps of a right-padded batch (zero rows/columns at padding: no injection there).

        Raises:
            KDConfigError: a sample's stored lengths differ from the batch's (stale cache or other data).
        """
        index = batch["sample_index"].long().cpu()
        bsz, src_len = batch["input_ids"].shape
        tgt_len = batch["decoder_input_ids"].shape[1]
        if int(index.max()) >= self.maps.shape[0] or int(index.min()) < 0:
            raise KDConfigError(
                ATTRIBUTION_FIELD,
                f"a {split} batch has sample_index {int(index.max())} but {self.maps.shape[0]} maps were extracted",
                "extract the maps for this data (delete the stale map cache so it is rebuilt)",
            )
        source_lengths = batch["attention_mask"].long().sum(-1).cpu()
        target_lengths = (batch["labels"] != IGNORE_INDEX).long().sum(-1).cpu()
        bad = (source_lengths != self.source_lengths[index]) | (target_lengths != self.target_lengths[index])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise KDConfigError(
                ATTRIBUTION_FIELD,
                f"the map of {split} sample {int(index[i])} covers {int(self.target_lengths[index[i]])} target x "
                f"{int(self.source_lengths[index[i]])} source tokens but the batch has {int(target_lengths[i])} x "
                f"{int(source_lengths[i])}",
                "extract the maps for this data and tokenizer (delete the stale map cache so it is rebuilt)",
            )
        out = torch.zeros(bsz, tgt_len, src_len)
        t, s = min(tgt_len, self.maps.shape[1]), min(src_len, self.maps.shape[2])
        out[:, :t, :s] = self.maps[index, :t, :s].float()
        return out.to(batch["input_ids"].device)


class AttributionGuidedNMT(Seq2SeqDistillation):
    """Attribution-guided NMT distillation: the teacher's attribution maps injected into the student's attention.

    Nourbakhsh et al. (arXiv 2603.11342) rank attribution methods by how much a student translator gains when a
    teacher's source-target attribution map ``A [T_tgt, T_src]`` is given to it as a side input, composed with the
    student's cross-attention weights ``P`` (``[B, H, T, S]``, ``A`` broadcast over heads) by one of four operators
    (:func:`~kd_lightning.models.seq2seq.inject_attention`)::

        add:      P' = rownorm(P + A)         multiply: P' = rownorm(P * A + eps)
        average:  P' = (P + A) / 2            replace:  P' = A             context = P' V

    The student (a :class:`~kd_lightning.models.seq2seq.TinySeq2Seq`) is trained with label-smoothed CE only
    (the task's ``label_smoothing``); the maps are inputs at training AND evaluation time (forward simulation:
    validation/test greedy decoding uses row ``t`` at step ``t``), through :meth:`decoder_kwargs`.

    At setup the maps of every train/val/test example are extracted once with
    :func:`~kd_lightning.models.attribution.extract_attributions` (teacher-forced reference, row ``t`` uses only
    ``y_<t``; ``|A|``, padding columns 0, rows sum to 1) and cached as safetensors in ``map_cache_dir`` keyed by the
    teacher's weights, the method and its options, and the data (token ids of every split); a later run with the
    same key reads the file and never runs the teacher. ``uniform`` and ``random`` are the same-shape baselines.

    With ``map_source: attributor`` the :class:`~kd_lightning.models.attributor.Attributor` ``f(src, tgt) -> Â`` is
    first trained on the teacher's TRAIN maps with the per-row ``KL(A ‖ Â)`` (``attributor_epochs``,
    ``attributor_lr``), then its ``Â`` of every split is injected instead (the teacher's maps are never used at
    evaluation). Logged map quality: ``val|test/map_entropy`` (mean row entropy of the injected maps) and, with the
    Attributor, ``val|test/attributor_kl`` (its KL to the teacher's maps of that split).

    Verified (abstract): teacher attribution maps extracted with Inseq over source-target pairs; injection into
    the student's attention under add / multiply / average / replace; utility = the student's BLEU/chrF; the
    methods Attention, Value Zeroing, Layer Gradient x Activation, Saliency, Integrated Gradients, DeepLIFT,
    Input x Gradient, GradientShap; an Attributor transformer reconstructing the maps from (source, target).

    RECONSTRUCTION (the paper's body was not reachable; every choice is an argument): injection into every
    cross-attention layer and head (``injection_layers``), maps also at test time (``forward simulation``), the
    extraction details (last cross-attention layer and head mean for ``attention``, L2 over hidden dims for the
    gradient methods, zero baselines, ``value_zeroing`` as the cosine distance of the decoder output with a
    token's value zeroed in every cross-attention layer), the normalisation, the Attributor's architecture and
    KL objective, label smoothing 0.1 (the task's default). captum's DeepLift only has rescale rules for a few
    nn modules (ReLU, Sigmoid, Tanh, ...): on a GELU/functional-softmax transformer it reduces to
    input x gradient with a zero baseline, as it would through Inseq.

    Args:
        student: the injected student (a TinySeq2Seq: injection needs ``cross_attention_maps``/``injection``).
        teacher: the seq2seq teacher the maps come from (may be absent for ``uniform``/``random``).
        attribution: the attribution method (:data:`~kd_lightning.models.attribution.METHODS`).
        operator: ``add`` | ``multiply`` | ``average`` | ``replace``.
        injection_layers: ``"all"``, ``"last"`` or student decoder layer indices.
        eps: the ``multiply`` operator's ``eps``.
        map_source: ``teacher`` (inject the teacher's maps) or ``attributor`` (inject the Attributor's).
        label_smoothing: ε of the student's cross-entropy (the only training loss).
        attention_layer, attention_heads: ``attention``: teacher decoder layer and heads (``None`` = all).
        ig_steps: ``integrated_gradients`` steps. baseline: ``"zeros"`` or ``"pad"`` embeddings.
        shap_samples, shap_stdev: ``gradient_shap`` samples and noise.
        attribution_layer: ``layer_gradient_x_activation`` teacher module path (``None`` = the encoder output).
        value_zeroing_layers: ``"all"`` or teacher decoder layer indices whose cross-attention values are zeroed.
        map_seed: seed of ``random`` maps and ``gradient_shap``.
        extraction_batch_size: examples per extraction batch. internal_batch_size: rows per captum forward.
        map_cache_dir: folder of the safetensors map cache (``None``: extract every run, no file).
        attributor_dim, attributor_heads, attributor_layers: the Attributor's size.
        attributor_epochs, attributor_lr, attributor_batch_size, attributor_seed: its training.
        **kwargs: :class:`~kd_lightning.methods.tasks.seq2seq.Seq2SeqDistillation` (optimizer, scheduler,
            evaluation settings, ...).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        attribution: str = "attention",
        operator: str = "add",
        injection_layers: str | list[int] = "all",
        eps: float = 1e-6,
        map_source: str = "teacher",
        label_smoothing: float = 0.1,
        attention_layer: int = -1,
        attention_heads: list[int] | None = None,
        ig_steps: int = 16,
        baseline: str = "zeros",
        shap_samples: int = 8,
        shap_stdev: float = 0.09,
        attribution_layer: str | None = None,
        value_zeroing_layers: str | list[int] = "all",
        map_seed: int = 0,
        extraction_batch_size: int = 64,
        internal_batch_size: int = 2048,
        map_cache_dir: str | None = "runs/attribution_maps",
        attributor_dim: int = 32,
        attributor_heads: int = 2,
        attributor_layers: int = 1,
        attributor_epochs: int = 5,
        attributor_lr: float = 3e-3,
        attributor_batch_size: int = 64,
        attributor_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_method(attribution)
        if not 0.0 <= label_smoothing < 1.0:
            raise KDConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        if operator not in INJECTION_OPERATORS:
            raise KDConfigError("operator", f"must be one of {list(INJECTION_OPERATORS)}, got {operator!r}")
        if map_source not in ("teacher", "attributor"):
            raise KDConfigError("map_source", f"must be 'teacher' or 'attributor', got {map_source!r}")
        if eps < 0:
            raise KDConfigError("eps", f"must be >= 0, got {eps}")
        if baseline not in ("zeros", "pad"):
            raise KDConfigError("baseline", f"must be 'zeros' or 'pad', got {baseline!r}")
        if isinstance(injection_layers, str) and injection_layers not in ("all", "last"):
            raise KDConfigError(
                "injection_layers", f"must be 'all', 'last' or a list of indices, got {injection_layers!r}"
            )
        if isinstance(value_zeroing_layers, str) and value_zeroing_layers != "all":
            raise KDConfigError(
                "value_zeroing_layers", f"must be 'all' or a list of indices, got {value_zeroing_layers!r}"
            )
        for name, value in (
            ("ig_steps", ig_steps),
            ("shap_samples", shap_samples),
            ("extraction_batch_size", extraction_batch_size),
            ("internal_batch_size", internal_batch_size),
            ("attributor_batch_size", attributor_batch_size),
            ("attributor_layers", attributor_layers),
            ("attributor_dim", attributor_dim),
        ):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        if attributor_epochs < 0:
            raise KDConfigError("attributor_epochs", f"must be >= 0, got {attributor_epochs}")
        if attributor_lr <= 0:
            raise KDConfigError("attributor_lr", f"must be > 0, got {attributor_lr}")
        if shap_stdev < 0:
            raise KDConfigError("shap_stdev", f"must be >= 0, got {shap_stdev}")
        if not hasattr(student, "attention_modules"):
            raise KDConfigError(
                "student",
                f"{type(student).__name__} cannot take injected attention maps",
                "use kd_lightning.models.seq2seq.TinySeq2Seq as the student",
            )
        if attribution == "value_zeroing" and len(self.teachers) and not hasattr(self.teacher, "attention_modules"):
            raise KDConfigError(
                "attribution",
                f"'value_zeroing' needs a TinySeq2Seq teacher (cross-attention with value_scale), got "
                f"{type(self.teacher).__name__}",
                "use another attribution method for this teacher",
            )
        needs_teacher = attribution not in TEACHER_FREE or map_source == "attributor"
        if needs_teacher and not len(self.teachers):
            raise KDConfigError(
                "teacher",
                f"attribution {attribution!r} extracts the maps from a teacher, but none is given",
                "give one",
            )
        if map_source == "attributor" and attribution in TEACHER_FREE:
            raise KDConfigError(
                "map_source",
                f"'attributor' learns the teacher's maps, but attribution is the {attribution!r} baseline",
                "use map_source: teacher for the baselines",
            )
        self.attribution = attribution
        self.operator = operator
        self.injection_layers = injection_layers
        self.eps = eps
        self.map_source = map_source
        self.extraction_options: dict[str, Any] = {
            "layer": attention_layer,
            "heads": attention_heads,
            "steps": ig_steps,
            "baseline": baseline,
            "shap_samples": shap_samples,
            "shap_stdev": shap_stdev,
            "attribution_layer": attribution_layer,
            "value_zeroing_layers": value_zeroing_layers,
            "seed": map_seed,
        }
        self.extraction_batch_size = extraction_batch_size
        self.internal_batch_size = internal_batch_size
        self.map_cache_dir = map_cache_dir
        self.attributor_settings = {
            "dim": attributor_dim,
            "heads": attributor_heads,
            "layers": attributor_layers,
            "epochs": attributor_epochs,
            "lr": attributor_lr,
            "batch_size": attributor_batch_size,
            "seed": attributor_seed,
        }
        self.attributor: Attributor | None = None
        if map_source == "attributor":
            vocab = int(getattr(student, "vocab_size", 0))
            self.attributor = Attributor(
                vocab,
                d_model=attributor_dim,
                n_heads=attributor_heads,
                n_layers=attributor_layers,
                max_len=int(getattr(student, "max_len", 128)),
                pad_token_id=int(getattr(student, "pad_token_id", 0)),
            )
            self.attributor.requires_grad_(False)  # trained at setup by its own optimiser, then fixed
        self.maps: dict[str, MapStore] = {}
        self.map_quality: dict[str, float] = {}
        self.map_origin: str | None = None
        self.map_path: Path | None = None
        self.map_teacher_digest: str | None = None
        self._map_device = torch.device("cpu")

    # ------------------------------------------------------------------ setup: the maps
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self.maps:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            self.prepare_maps(datamodule)

    def _split_loaders(self, datamodule: Any) -> dict[str, DataLoader]:
        if datamodule is not None and getattr(datamodule, "train_set", None) is None and hasattr(datamodule, "setup"):
            datamodule.setup("fit")
        if datamodule is None or getattr(datamodule, "train_set", None) is None:
            raise KDConfigError(
                "data",
                "AttributionGuidedNMT extracts maps for the data module's train/val/test sets, which are not set up",
                "use kd_lightning.data.translation.TranslationDataModule",
            )
        from kd_lightning.data.translation import collate_translation

        collate = partial(
            collate_translation,
            pad_token_id=datamodule.pad_token_id,
            bos=datamodule.bos_token_id,
            eos=datamodule.eos_token_id,
        )
        sets = {"train": datamodule.train_set, "val": datamodule.val_set, "test": datamodule.test_set}
        return {
            split: DataLoader(dataset, batch_size=self.extraction_batch_size, shuffle=False, collate_fn=collate)
            for split, dataset in sets.items()
            if dataset is not None
        }

    def map_key(self, loaders: Mapping[str, DataLoader], kind: str) -> tuple[str, dict[str, Any]]:
        """``(digest, payload)``: what the cached maps depend on (teacher weights, method, options, data)."""
        import hashlib

        digest = hashlib.sha256(b"translation-pairs\n")
        for split, loader in loaders.items():
            for item in loader.dataset:  # type: ignore[attr-defined]
                update_with_tensor(digest, f"{split}.s", torch.as_tensor(item["source_ids"], dtype=torch.long))
                update_with_tensor(digest, f"{split}.t", torch.as_tensor(item["target_ids"], dtype=torch.long))
        payload: dict[str, Any] = {
            "version": MAPS_VERSION,
            "kind": kind,
            "attribution": self.attribution,
            "options": self.extraction_options,
            "teacher": None if self.attribution in TEACHER_FREE else module_digest(self.teacher),
            "data": digest.hexdigest()[:16],
        }
        if kind == "attributor":
            payload["attributor"] = self.attributor_settings
        return json_digest(payload), payload

    def prepare_maps(self, datamodule: Any) -> None:
        """Load the maps of every split from the cache or extract them (and cache them); see the class docstring."""
        loaders = self._split_loaders(datamodule)
        self.map_teacher_digest = module_digest(self.teacher) if len(self.teachers) else None
        # Lightning calls setup before it moves the module to its device: extract on the run's device.
        home = self.device
        trainer = self._trainer
        self._map_device = trainer.strategy.root_device if trainer is not None else home
        helpers = [m for m in (self.teacher if len(self.teachers) else None, self.attributor) if m is not None]
        for network in helpers:
            network.to(self._map_device)
        try:
            teacher_maps = self._cached_or(loaders, "teacher", lambda: self.extract_maps(loaders))
            if self.map_source == "attributor":
                self.maps = self._cached_or(loaders, "attributor", lambda: self.attributor_maps(loaders, teacher_maps))
        finally:
            for network in helpers:
                network.to(home)
        if self.map_source == "teacher":
            self.maps = teacher_maps
        else:
            self.map_quality = {
                f"{split}/attributor_kl": store_kl(teacher_maps[split], self.maps[split])
                for split in teacher_maps
                if split in self.maps
            }
        for split, store in self.maps.items():
            self.map_quality[f"{split}/map_entropy"] = store_entropy(store)
        shown = ", ".join(f"{k} = {v:.4f}" for k, v in sorted(self.map_quality.items()) if not k.startswith("train"))
        rank_zero_only(print)(f"kd: attribution maps ({self.attribution}, {self.map_source}): {shown}", flush=True)

    def _cached_or(self, loaders: Mapping[str, DataLoader], kind: str, build: Any) -> dict[str, MapStore]:
        path: Path | None = None
        if self.map_cache_dir is not None:
            key, payload = self.map_key(loaders, kind)
            path = Path(self.map_cache_dir).expanduser().resolve() / f"{kind}-{self.attribution}-{key}.safetensors"
            stores = load_maps(path, key)
            if stores is not None:
                self.map_origin, self.map_path = "cache", path
                rank_zero_only(print)(f"kd: reused cached {kind} attribution maps {path}", flush=True)
                return stores
        stores = build()
        self.map_origin, self.map_path = "computed", path
        if path is not None and self.global_rank == 0:
            save_maps(path, stores, key, payload)
        return stores

    def extract_maps(self, loaders: Mapping[str, DataLoader]) -> dict[str, MapStore]:
        """The teacher's (or the baseline's) normalised maps of every example, in ``sample_index`` order."""
        teacher = self.teacher if len(self.teachers) else None
        device = self._map_device
        stores: dict[str, MapStore] = {}
        for split, loader in loaders.items():
            rows: list[tuple[int, Tensor, int, int]] = []
            for batch_number, batch in enumerate(loader):
                tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}
                options = dict(self.extraction_options)
                options["seed"] = int(options["seed"]) + 7919 * batch_number + hash_split(split)
                maps = extract_attributions(
                    teacher, tensors, self.attribution, internal_batch_size=self.internal_batch_size, **options
                ).cpu()
                s_len = tensors["attention_mask"].long().sum(-1).cpu()
                t_len = (tensors["labels"] != IGNORE_INDEX).long().sum(-1).cpu()
                for i, index in enumerate(batch["sample_index"].tolist()):
                    rows.append((index, maps[i, : t_len[i], : s_len[i]], int(s_len[i]), int(t_len[i])))
            stores[split] = _store(rows)
        return stores

    def attributor_maps(
        self, loaders: Mapping[str, DataLoader], teacher_maps: Mapping[str, MapStore]
    ) -> dict[str, MapStore]:
        """Train the Attributor on the teacher's train maps (KL per row), then predict ``Â`` for every split."""
        assert self.attributor is not None
        attributor = self.attributor
        device = self._map_device
        settings = self.attributor_settings
        generator = torch.Generator().manual_seed(int(settings["seed"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(settings["seed"]))
            for module in attributor.modules():  # re-initialise deterministically (a rebuilt run gets the same Â)
                if hasattr(module, "reset_parameters") and module is not attributor:
                    module.reset_parameters()
        attributor.requires_grad_(True)
        attributor.train()
        optimiser = torch.optim.Adam(attributor.parameters(), lr=float(settings["lr"]))
        train_set = loaders["train"].dataset
        loader = DataLoader(
            train_set,
            batch_size=int(settings["batch_size"]),
            shuffle=True,
            collate_fn=loaders["train"].collate_fn,
            generator=generator,
        )
        try:
            with torch.enable_grad():
                for _ in range(int(settings["epochs"])):
                    for batch in loader:
                        target = teacher_maps["train"].for_batch(batch, "train").to(device)
                        log_pred = self._attributor_forward(batch)
                        loss = attribution_row_kl(target, log_pred, (batch["labels"] != IGNORE_INDEX).to(device))
                        optimiser.zero_grad()
                        loss.backward()
                        optimiser.step()
        finally:
            attributor.requires_grad_(False)
            attributor.eval()
        stores: dict[str, MapStore] = {}
        with torch.no_grad():
            for split, split_loader in loaders.items():
                rows: list[tuple[int, Tensor, int, int]] = []
                for batch in split_loader:
                    pred = self._attributor_forward(batch).exp().cpu()
                    s_len = batch["attention_mask"].long().sum(-1)
                    t_len = (batch["labels"] != IGNORE_INDEX).long().sum(-1)
                    for i, index in enumerate(batch["sample_index"].tolist()):
                        rows.append((index, pred[i, : t_len[i], : s_len[i]], int(s_len[i]), int(t_len[i])))
                stores[split] = _store(rows)
        return stores

    def _attributor_forward(self, batch: Mapping[str, Any]) -> Tensor:
        assert self.attributor is not None
        device = self._map_device
        return self.attributor(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["decoder_input_ids"].to(device),
            batch["labels"].to(device),
        )

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """``Σ_{valid t} CE_ε(z_t, y_t)`` of the injected student (the teacher only provides the maps)."""
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logits = self.student_output(batch, "train").logits
        flat = upcast(logits).reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(
            flat, labels.masked_fill(~mask, 0).reshape(-1), reduction="none", label_smoothing=self.label_smoothing
        )
        total = (ce.reshape(labels.shape) * mask.to(ce.dtype)).sum()
        return {"loss": total, "ce": total.detach()}, mask.sum()

    # ------------------------------------------------------------------ injection
    def batch_maps(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        """``[B, T, S]`` maps of a batch of ``stage`` (``train``/``val``/``test``)."""
        split = STAGE_SPLIT.get(stage, stage)
        if split not in self.maps:
            raise KDConfigError(
                ATTRIBUTION_FIELD,
                f"no attribution maps for the {split!r} split (maps exist for {sorted(self.maps)})",
                "run the method through a Trainer with a TranslationDataModule so setup extracts them",
            )
        return self.maps[split].for_batch(batch, split)

    def decoder_kwargs(self, batch: Any, stage: str) -> dict[str, Any]:
        """The maps and injection settings for the student's forward and greedy decoding (train and evaluation)."""
        return {
            "cross_attention_maps": self.batch_maps(batch, stage),
            "injection": self.operator,
            "injection_layers": self.injection_layers,
            "injection_eps": self.eps,
        }

    def log_map_quality(self, split: str) -> None:
        for name, value in self.map_quality.items():
            if name.startswith(f"{split}/"):
                self.log(name, value, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log_map_quality("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log_map_quality("test")


# ---------------------------------------------------------------------------------------------- helpers
def hash_split(split: str) -> int:
    """A small stable integer per split name (seeds differ between splits)."""
    return {"train": 0, "val": 1, "test": 2}.get(split, sum(map(ord, split)))


def _store(rows: Sequence[tuple[int, Tensor, int, int]]) -> MapStore:
    n = max(index for index, *_ in rows) + 1 if rows else 0
    t_max = max((t for *_, t in rows), default=0)
    s_max = max((s for _, _, s, _ in rows), default=0)
    maps = torch.zeros(n, t_max, s_max)
    source_lengths = torch.zeros(n, dtype=torch.long)
    target_lengths = torch.zeros(n, dtype=torch.long)
    for index, map_, s, t in rows:
        maps[index, :t, :s] = map_
        source_lengths[index], target_lengths[index] = s, t
    return MapStore(maps, source_lengths, target_lengths)


def _row_mask(store: MapStore) -> Tensor:
    rows = torch.arange(store.maps.shape[1])[None, :] < store.target_lengths[:, None]
    return rows


def store_entropy(store: MapStore) -> float:
    """Mean entropy (nats) of the real rows of a split's maps."""
    p = store.maps.float()
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    mask = _row_mask(store)
    return float(entropy[mask].mean()) if bool(mask.any()) else 0.0


def store_kl(target: MapStore, pred: MapStore) -> float:
    """Mean per-row ``KL(target ‖ pred)`` over the real rows."""
    log_pred = pred.maps.float().clamp_min(1e-30).log()
    return float(attribution_row_kl(target.maps, log_pred, _row_mask(target)))


def load_maps(path: Path, key: str) -> dict[str, MapStore] | None:
    """The cached maps at ``path`` if it exists and was written for ``key``; else ``None`` (safetensors only)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception:  # an unreadable or foreign file: extract again
        return None
    stores = {}
    for split in SPLITS:
        if f"{split}.maps" in tensors:
            stores[split] = MapStore(
                tensors[f"{split}.maps"], tensors[f"{split}.source_lengths"], tensors[f"{split}.target_lengths"]
            )
    return stores or None


def save_maps(path: Path, stores: Mapping[str, MapStore], key: str, payload: Mapping[str, Any]) -> None:
    """Write the maps to ``path`` (safetensors, atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for split, store in stores.items():
        tensors[f"{split}.maps"] = store.maps.float().contiguous()
        tensors[f"{split}.source_lengths"] = store.source_lengths.long().contiguous()
        tensors[f"{split}.target_lengths"] = store.target_lengths.long().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"key": key, "payload": json.dumps(payload, sort_keys=True, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
