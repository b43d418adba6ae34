"""LELP: few-class distillation on pseudo-subclasses from the teacher's embedding (Loo et al., arXiv 2409.20449)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.lelp import (
    COMPOSE_MODES,
    NORMALIZE_MODES,
    ClassMoments,
    LELPLoss,
    SubclassStats,
    aggregate_subclasses,
    subclass_log_targets,
)
from kd_lightning.methods.core import describe
from kd_lightning.methods.tasks.classification import ClassificationDistillation
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.utils.fingerprint import DATA_KEYS_NOT_IN_FINGERPRINT, json_digest, module_digest

__all__ = ["LELP", "STATS_VERSION", "augmentation_off"]

#: Version of the cached statistics' layout and key; bump it when either changes.
STATS_VERSION = 1
#: The statistics buffers (name -> what it holds); saved in checkpoints and in the safetensors cache.
_STATS_BUFFERS = ("lelp_means", "lelp_directions", "lelp_scale", "lelp_projector")
#: Data-module attributes that do not change which training samples the statistics see.
_DATA_KEYS_NOT_IN_KEY = DATA_KEYS_NOT_IN_FINGERPRINT | {
    "batch_size",
    "unlabeled_batch_size",
    "drop_last",
    "trainer",
    "prepare_data_per_node",
    "allow_zero_length_dataloader_with_multiple_devices",
}
_GROUP_BY = ("label", "teacher")


class LELP(ClassificationDistillation):
    """LELP (Loo, Iliopoulos, Hu, Vee 2024): distil a few-class teacher through S·C pseudo-subclasses.

    Once per run, at fit start, the teacher's embedding ``h_T`` (``teacher_embedding``, by default the input of
    its classifier) of every training sample — in order, without augmentation — gives, per class c, the mean
    ``μ_c`` and the top-S principal directions ``V_c`` of the embeddings projected onto the null space of the
    teacher's classifier ``W`` (``P = I − Wᵀ(WWᵀ)⁺W``), randomly rotated. In training the teacher's target is
    ``p_T(c, s | x) = p_T(c | x)·softmax_s(r_{c,·}(x)/β)`` with ``r_{c,s} = ⟨v_{c,s}, P h_T(x) − μ_c⟩/σ_{c,s}``
    (:mod:`kd_lightning.losses.lelp`) and the loss ``w_KD·τ²·KL(p_T ‖ p_S) + w_CE·CE(log Σ_s p_S(·, s), y)`` over
    the student's ``S·C`` outputs (class-major: output ``c·S + s``). Prediction (validation, test, :meth:`forward`)
    is the aggregated class log-probability ``log Σ_s p_S(c, s)``.

    The student must be built with ``num_classes = S·C`` (the teacher with C). The statistics are buffers (in
    checkpoints) and, with ``stats_cache_dir``, cached as safetensors keyed by the teacher's weights, the data and
    the settings below, so a second run with the same teacher reuses them.

    RECONSTRUCTION: no official code and the paper body was not readable; the algorithm's structure is from
    reviews (per-class PCA, null-space projection, random rotation, S·C pseudo-subclasses, α = 0). Reconstructed
    and kept as arguments: how class and subclass parts compose (``compose``), the scaling of the projections
    (``normalize``, β applied after it), grouping by label or teacher prediction (``group_by``), the KD temperature
    (τ on the class part and the student), and the defaults S = 4, β = 1 (the paper's grid values are unverified).

    Args:
        student: network with ``S·C`` outputs.
        teacher: classifier with C outputs and a linear classifier ``teacher_classifier``.
        num_subclasses: S, pseudo-subclasses per class.
        beta: β, temperature of the within-class softmax over the (scaled) projections.
        null_space: project the embeddings onto the null space of the teacher's classifier before the PCA.
        rotate: rotate each class's S directions by a random orthogonal matrix (seed ``stats_seed``).
        compose: ``"product"`` (``p_T(c)·softmax_s``, class marginals kept) or ``"logits"`` (one softmax over
            ``z_c/τ + r_{c,s}/β``; its class marginals are tilted by ``logsumexp_s r_{c,s}/β``).
        normalize: scaling of the projections: ``"class"`` (unit variance on average per class), ``"direction"``
            (unit variance per direction) or ``"none"``.
        temperature: τ, KD temperature of the teacher's class part and of the student's softmax (loss × τ²).
        ce_weight: w_CE, cross-entropy on the aggregated class log-probabilities (the paper's α; 0 there).
        kd_weight: w_KD, the subclass KL.
        teacher_embedding: module path of the teacher's embedding (``"fc:input"``: the classifier's input).
        teacher_classifier: module path of the teacher's ``nn.Linear`` classifier (W for the null space).
        group_by: group training embeddings by their ``"label"`` or by the ``"teacher"``'s prediction.
        stats_seed: seed of the random rotations.
        stats_cache_dir: folder of the cached statistics; ``None``: no disk cache (computed every run).
        stats_batch_size: batch size of the statistics pass over the training set.
        stats_num_workers: loader workers of that pass.
        max_classes_warning: warn when the task has more classes (LELP is a few-class method).
        **kwargs: the arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    #: Training needs the teacher's embeddings, not only its logits.
    uses_teacher_logits_only: ClassVar[bool | None] = False

    lelp_means: Tensor
    lelp_directions: Tensor
    lelp_scale: Tensor
    lelp_projector: Tensor
    lelp_ready: Tensor

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        num_subclasses: int = 4,
        beta: float = 1.0,
        null_space: bool = True,
        rotate: bool = True,
        compose: str = "product",
        normalize: str = "class",
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        teacher_embedding: str = "fc:input",
        teacher_classifier: str = "fc",
        group_by: str = "label",
        stats_seed: int = 0,
        stats_cache_dir: str | None = "runs/lelp_stats",
        stats_batch_size: int = 256,
        stats_num_workers: int = 0,
        max_classes_warning: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if isinstance(num_subclasses, bool) or not isinstance(num_subclasses, int) or num_subclasses < 1:
            raise KDConfigError("num_subclasses", f"must be an integer >= 1, got {num_subclasses!r}", "e.g. 4")
        check_temperature(beta, "beta")
        if compose not in COMPOSE_MODES:
            raise KDConfigError("compose", f"must be one of {list(COMPOSE_MODES)}, got {compose!r}")
        if normalize not in NORMALIZE_MODES:
            raise KDConfigError("normalize", f"must be one of {list(NORMALIZE_MODES)}, got {normalize!r}")
        if group_by not in _GROUP_BY:
            raise KDConfigError("group_by", f"must be one of {list(_GROUP_BY)}, got {group_by!r}")
        for name, value, low in (
            ("stats_batch_size", stats_batch_size, 1),
            ("stats_num_workers", stats_num_workers, 0),
            ("max_classes_warning", max_classes_warning, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KDConfigError(name, f"must be an integer >= {low}, got {value!r}")
        self.criterion = LELPLoss(1, num_subclasses, temperature, ce_weight, kd_weight)  # C set at setup
        self.num_subclasses = num_subclasses
        self.beta = beta
        self.null_space = null_space
        self.rotate = rotate
        self.compose = compose
        self.normalize = normalize
        self.temperature = temperature
        self.teacher_embedding = teacher_embedding
        self.teacher_classifier = teacher_classifier
        self.group_by = group_by
        self.stats_seed = stats_seed
        self.stats_cache_dir = stats_cache_dir
        self.stats_batch_size = stats_batch_size
        self.stats_num_workers = stats_num_workers
        self.max_classes_warning = max_classes_warning
        reads_classifier = null_space or teacher_embedding == f"{teacher_classifier}:input"
        classifier = self.classifier() if reads_classifier else None
        try:
            self.teacher_taps = FeatureTaps(self.teacher, [teacher_embedding], detach=True, transient=True)
        except (KeyError, ValueError) as err:
            fix = "name a module of the teacher, e.g. 'fc:input'"
            raise KDConfigError("teacher_embedding", str(err), fix) from None
        if classifier is not None and teacher_embedding == f"{teacher_classifier}:input":
            dim = classifier.in_features
            rank = int(torch.linalg.matrix_rank(classifier.weight.detach().double())) if null_space else 0
            if num_subclasses > dim - rank:
                where = f"d − rank W = {dim} − {rank}" if null_space else f"d = {dim}"
                raise KDConfigError(
                    "num_subclasses",
                    f"S = {num_subclasses} is larger than the dimension available for the subclass directions "
                    f"({where}, the teacher's embedding {teacher_embedding!r})",
                    f"use num_subclasses <= {max(dim - rank, 1)}",
                )
        for name in _STATS_BUFFERS:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("lelp_ready", torch.tensor(False))
        self.register_load_state_dict_pre_hook(_resize_statistics)
        #: Where the statistics of this fit came from: ``"computed"``, ``"cache"``, ``"checkpoint"`` or ``None``.
        self.stats_origin: str | None = None
        self.stats_path: Path | None = None
        #: Training samples of the last statistics pass.
        self.stats_samples = 0

    # ------------------------------------------------------------------ networks and checks
    def classifier(self) -> nn.Linear:
        """The teacher's linear classifier (``teacher_classifier``).

        Raises:
            KDConfigError: the path names no module of the teacher or no ``nn.Linear``.
        """
        try:
            module = self.teacher.get_submodule(self.teacher_classifier)
        except AttributeError:
            raise KDConfigError(
                "model.init_args.teacher_classifier",
                f"{describe(self.teacher)} has no submodule {self.teacher_classifier!r}",
                "name the teacher's last nn.Linear (e.g. 'fc' or 'head')",
            ) from None
        if not isinstance(module, nn.Linear):
            raise KDConfigError(
                "model.init_args.teacher_classifier",
                f"{self.teacher_classifier!r} is a {type(module).__name__}, not an nn.Linear",
                "name the teacher's last nn.Linear (its weight W gives the null space)",
            )
        return module

    @property
    def classes(self) -> int:
        """C: ``num_classes`` (from the data at setup), else the class count of loaded statistics."""
        if self.num_classes is not None:
            return int(self.num_classes)
        if self.lelp_means.dim() == 2:
            return int(self.lelp_means.shape[0])
        raise RuntimeError("LELP: the class count is unknown before setup (pass num_classes or fit/load first)")

    @property
    def num_outputs(self) -> int:
        """S·C, the student's output count."""
        return self.num_subclasses * self.classes

    def networks_to_check(self) -> dict[str, nn.Module]:
        """The teacher(s) must output C logits; the student (S·C) is checked in :meth:`check_networks`."""
        return dict(self.teacher_fields())

    def check_networks(self, input_shape: tuple[int, ...], data_name: str = "the data") -> None:
        super().check_networks(input_shape, data_name)
        param = next(iter(self.student.parameters()), None)
        probe = torch.zeros(2, *input_shape, device=param.device if param is not None else self.device)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                out = self.student(probe)
        except Exception as err:
            raise KDConfigError(
                "model.init_args.student",
                f"{describe(self.student)} fails on an input of shape {tuple(probe.shape)} from {data_name} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                "does its input size/channels match the data?",
            ) from None
        finally:
            self.student.train(was_training)
        if isinstance(out, (tuple, list)):
            out = out[0]
        s, c = self.num_subclasses, self.classes
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[-1] != s * c:
            got = out.shape[-1] if isinstance(out, Tensor) and out.dim() >= 2 else "no"
            raise KDConfigError(
                "model.init_args.student",
                f"{describe(self.student)} outputs {got} logits but LELP needs num_subclasses·classes = "
                f"S·C = {s}·{c} = {s * c} (one per pseudo-subclass)",
                f"build the student with num_classes: {s * c} (S*C)",
            )

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        self.criterion.num_classes = self.classes
        if self.classes > self.max_classes_warning:
            rank_zero_warn(
                f"LELP is a few-class method (the paper targets 2-5 classes; its gain over KD vanishes as the class "
                f"count grows) and this task has {self.num_classes} classes (> max_classes_warning = "
                f"{self.max_classes_warning}). The student needs {self.num_outputs} outputs."
            )

    # ------------------------------------------------------------------ teacher outputs
    def teacher_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(teacher logits [B, C], teacher embedding [B, d])`` without autograd."""
        with self.teacher_taps:
            logits = self.run_teacher(x)
            features = self.teacher_taps.features
        self.teacher_taps.clear()
        if self.teacher_embedding not in features:
            raise RuntimeError(
                f"LELP: the teacher's module {self.teacher_embedding!r} was not called in its forward "
                "(teacher_embedding must name a module on the path to the logits)"
            )
        embedding = features[self.teacher_embedding]
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return logits, embedding.reshape(embedding.shape[0], -1)

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> SubclassStats:
        """The buffers as :class:`~kd_lightning.losses.lelp.SubclassStats`.

        Raises:
            RuntimeError: they were not computed yet (a fit computes them at its start).
        """
        if not bool(self.lelp_ready):
            raise RuntimeError(
                "LELP: the subclass statistics are not computed yet; they are computed at the start of "
                "trainer.fit (or call prepare_statistics(datamodule))"
            )
        return SubclassStats(
            means=self.lelp_means,
            directions=self.lelp_directions,
            scale=self.lelp_scale,
            projector=self.lelp_projector if self.lelp_projector.numel() else None,
        )

    def set_statistics(self, stats: SubclassStats) -> None:
        """Store ``stats`` in the buffers (on this module's device)."""
        device = self.lelp_ready.device
        self.lelp_means = stats.means.to(device=device, dtype=torch.float32).contiguous()
        self.lelp_directions = stats.directions.to(device=device, dtype=torch.float32).contiguous()
        self.lelp_scale = stats.scale.to(device=device, dtype=torch.float32).contiguous()
        projector = stats.projector if stats.projector is not None else torch.zeros(0)
        self.lelp_projector = projector.to(device=device, dtype=torch.float32).contiguous()
        self.lelp_ready.fill_(True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if bool(checkpoint.get("state_dict", {}).get("lelp_ready", False)):
            self.stats_origin = "checkpoint"

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not bool(self.lelp_ready):
            self.prepare_statistics(self.trainer.datamodule)

    def stats_key(self, datamodule: Any) -> tuple[str, dict[str, Any]]:
        """``(digest, payload)``: what the cached statistics depend on (teacher weights, data, settings)."""
        payload = {
            "version": STATS_VERSION,
            "teacher": module_digest(self.teacher),
            "teacher_embedding": self.teacher_embedding,
            "teacher_classifier": self.teacher_classifier,
            "data": data_description(datamodule),
            "num_classes": self.classes,
            "num_subclasses": self.num_subclasses,
            "null_space": self.null_space,
            "rotate": self.rotate,
            "normalize": self.normalize,
            "group_by": self.group_by,
            "stats_seed": self.stats_seed,
        }
        return json_digest(payload), payload

    def prepare_statistics(self, datamodule: Any) -> None:
        """Load the statistics from the cache or compute them from ``datamodule.train_set`` (and cache them).

        Raises:
            KDConfigError: no training set, or S too large for the embedding or a class's sample count.
        """
        if datamodule is None or getattr(datamodule, "train_set", None) is None:
            raise KDConfigError(
                "data",
                "LELP computes its subclass statistics from the data module's train_set, which is not set up",
                "use a kd-lightning data module (its setup('fit') builds train_set)",
            )
        if self.num_classes is None:
            self.check_data(datamodule)
        path: Path | None = None
        if self.stats_cache_dir is not None:
            key, payload = self.stats_key(datamodule)
            path = Path(self.stats_cache_dir).expanduser().resolve() / f"lelp_{key}.safetensors"
            stats = load_statistics(path, key)
            if stats is not None:
                self.set_statistics(stats)
                self.stats_origin, self.stats_path = "cache", path
                rank_zero_only(print)(f"kd: LELP reused cached subclass statistics {path}", flush=True)
                return
        stats = self.compute_statistics(datamodule)
        self.set_statistics(stats)
        self.stats_origin, self.stats_path = "computed", path
        if path is not None and self.global_rank == 0:
            save_statistics(path, self.statistics(), key, payload)
        where = f" and cached them at {path}" if path is not None else ""
        rank_zero_only(print)(
            f"kd: LELP computed its subclass statistics (C = {self.classes}, S = {self.num_subclasses}, "
            f"d = {int(self.lelp_means.shape[1])}) from {self.stats_samples} training samples{where}",
            flush=True,
        )

    @torch.no_grad()
    def compute_statistics(self, datamodule: Any) -> SubclassStats:
        """One ordered pass of the teacher over the training set (augmentation off), then the per-class PCA."""
        dataset = datamodule.train_set
        collate = getattr(datamodule, "collate_fn", None)
        loader = DataLoader(
            dataset,
            batch_size=self.stats_batch_size,
            shuffle=False,
            num_workers=self.stats_num_workers,
            **({"collate_fn": collate} if collate is not None else {}),
        )
        num_classes = self.classes
        moments: ClassMoments | None = None
        device = self.lelp_ready.device
        with augmentation_off(dataset, datamodule):
            for batch in loader:
                x, y = self.unpack(batch)
                logits, embedding = self.teacher_outputs(x.to(device))
                groups = y if self.group_by == "label" else logits.argmax(-1)
                if moments is None:
                    moments = ClassMoments(num_classes, embedding.shape[1])
                moments.update(embedding, groups)
        if moments is None:
            raise KDConfigError("data", "the training set is empty", "LELP needs training samples")
        self.stats_samples = int(moments.counts.sum())
        weight = self.classifier().weight.detach() if self.null_space else None
        generator = torch.Generator().manual_seed(self.stats_seed)
        try:
            return moments.subspaces(self.num_subclasses, weight, self.rotate, generator, self.normalize)  # type: ignore[arg-type]
        except KDConfigError as err:  # name the config fields (num_subclasses, teacher_classifier)
            raise err.with_prefix("model.init_args.") from None

    # ------------------------------------------------------------------ training and prediction
    def forward(self, x: Tensor) -> Tensor:
        """Class log-probabilities ``log Σ_s p_S(c, s | x)`` (``[B, C]``): what validation and test score."""
        return aggregate_subclasses(self.student(x), self.classes, self.num_subclasses)

    def subclass_targets(self, embedding: Tensor, teacher_logits: Tensor) -> Tensor:
        """``log p_T(c, s | x)`` (``[B, S·C]``) from the teacher's embedding and logits and the statistics."""
        stats = self.statistics()
        return subclass_log_targets(embedding, teacher_logits, stats, self.beta, self.compose, self.temperature)  # type: ignore[arg-type]

    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        x, y = self.unpack(batch)
        self.check_targets(y)
        teacher_logits, embedding = self.teacher_outputs(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the projections in float32 under AMP
            targets = self.subclass_targets(embedding, teacher_logits)
        student_logits = self.student(x)
        self.criterion.num_classes = self.classes
        terms = self.criterion(student_logits, targets, y)
        class_log_probs = aggregate_subclasses(student_logits.detach(), self.classes, self.num_subclasses)
        return terms, class_log_probs, y

    def export_metadata(self) -> dict[str, Any]:
        return {
            **super().export_metadata(),
            "num_subclasses": self.num_subclasses,
            "subclass_layout": "class-major: output c*S + s; class log-prob = logsumexp over its S outputs",
        }


# ---------------------------------------------------------------------- helpers
def _resize_statistics(module: LELP, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Before ``load_state_dict``: give the (possibly empty) statistics buffers the stored shapes."""
    for name in _STATS_BUFFERS:
        stored = state_dict.get(prefix + name)
        if isinstance(stored, Tensor) and stored.shape != getattr(module, name).shape:
            setattr(module, name, torch.zeros_like(stored, device=module.lelp_ready.device))


def data_description(datamodule: Any) -> dict[str, Any]:
    """What identifies the training data of a data module: class, ``data_identity()``, plain settings, size."""
    if datamodule is None:
        return {}
    cls = type(datamodule)
    description: dict[str, Any] = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "identity": datamodule.data_identity() if hasattr(datamodule, "data_identity") else {},
        "settings": {},
    }
    for name, value in sorted(vars(datamodule).items()):
        if name.startswith("_") or name in _DATA_KEYS_NOT_IN_KEY:
            continue
        if hasattr(value, "data_identity") or hasattr(value, "train_set"):
            description["settings"][name] = data_description(value)  # a wrapped source
        elif _plain(value):
            description["settings"][name] = value
    train_set = getattr(datamodule, "train_set", None)
    if train_set is not None:
        with contextlib.suppress(TypeError):
            description["train_size"] = len(train_set)
    return description


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def load_statistics(path: Path, key: str) -> SubclassStats | None:
    """The cached statistics at ``path`` if it exists and was written for ``key``; else ``None``."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception:  # an unreadable or foreign file: recompute
        return None
    if any(name not in tensors for name in _STATS_BUFFERS):
        return None
    projector = tensors["lelp_projector"]
    return SubclassStats(
        means=tensors["lelp_means"],
        directions=tensors["lelp_directions"],
        scale=tensors["lelp_scale"],
        projector=projector if projector.numel() else None,
    )


def save_statistics(path: Path, stats: SubclassStats, key: str, payload: dict[str, Any]) -> None:
    """Write ``stats`` to ``path`` (safetensors, atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    projector = stats.projector if stats.projector is not None else torch.zeros(0)
    tensors = {
        "lelp_means": stats.means,
        "lelp_directions": stats.directions,
        "lelp_scale": stats.scale,
        "lelp_projector": projector,
    }
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"key": key, "payload": json.dumps(payload, sort_keys=True, default=str)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dataset_chain(dataset: Dataset) -> Iterator[Any]:
    seen: set[int] = set()
    current: Any = dataset
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "dataset", None)


def _data_chain(datamodule: Any) -> Iterator[Any]:
    current = datamodule
    while current is not None:
        yield current
        current = getattr(current, "source", None)


def _augmentation_only(transform: Any) -> bool:
    """Whether ``transform`` only augments (kd-lightning's random shift/flip, or a ``Compose`` of them)."""
    from kd_lightning.data.transforms import Compose, RandomHorizontalFlip, RandomTranslate

    if isinstance(transform, (RandomTranslate, RandomHorizontalFlip)):
        return True
    return isinstance(transform, Compose) and all(_augmentation_only(t) for t in transform.transforms)


@contextlib.contextmanager
def augmentation_off(dataset: Dataset, datamodule: Any = None) -> Iterator[list[str]]:
    """Within the block the training ``dataset`` serves un-augmented samples, as far as can be told.

    Along the dataset chain (``.dataset`` of wrappers and subsets): numbered crop/flip views are disabled
    (``view_transform.enabled = False``); a ``transform`` is replaced by the data module's ``eval_transform()``
    when it (or a wrapped ``source``) has one, and dropped when it only augments (digits' random shift). What
    cannot be switched off is left as is and named in the yielded list (and a warning). Restored on exit.
    """
    eval_transform = next(
        (dm.eval_transform for dm in _data_chain(datamodule) if callable(getattr(dm, "eval_transform", None))), None
    )
    restore: list[tuple[Any, str, Any]] = []
    kept: list[str] = []
    try:
        for item in _dataset_chain(dataset):
            view = getattr(item, "view_transform", None)
            if view is not None and hasattr(view, "enabled"):
                restore.append((view, "enabled", view.enabled))
                view.enabled = False
            transform = getattr(item, "transform", None)
            if transform is None:
                continue
            if eval_transform is not None:
                restore.append((item, "transform", transform))
                item.transform = eval_transform()
            elif _augmentation_only(transform):
                restore.append((item, "transform", transform))
                item.transform = None
            else:
                kept.append(repr(transform))
        if kept:
            rank_zero_warn(
                f"LELP: could not switch off the training transform(s) {kept} for the statistics pass; the "
                "subclass directions are computed on transformed training samples."
            )
        yield kept
    finally:
        for owner, name, value in reversed(restore):
            setattr(owner, name, value)
