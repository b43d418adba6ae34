"""Classification task sibling: :class:`ClassificationDistillation` and :class:`Supervised`.

Adds to the core what classifiers need: batches ``(inputs, class indices, *extras)``, the class count
(``num_classes``, linked from the data module) checked against every network by one probe forward at
``setup``, top-1/top-k accuracy synced across DDP ranks, the teacher's accuracy and student–teacher
fidelity (top-1 agreement, KL(p_T ‖ p_S)) on evaluation data, and the exact teacher-logit cache hook
(:class:`~kd_lightning.callbacks.TeacherLogitCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.data.paired import TARGET_KEY
from kd_lightning.data.semi_supervised import LABELED, UNLABELED
from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.methods.core import DistillationModule, SingleNetwork, class_count, describe, first_tensor
from kd_lightning.models.multimodal import MissingModalityError

__all__ = ["ClassificationDistillation", "Supervised", "check_class_targets", "regime_parts"]


def check_class_targets(target: Tensor, num_classes: int | None, where: str = "data", check_range: bool = True) -> None:
    """Targets must be integer class indices (not one-hot or probabilities) in ``[0, num_classes)``.

    The dtype check is free; the range check reads the targets back to the host (a device sync), so the methods
    run it on the first training batch only (``check_range``).

    Raises:
        KDConfigError: naming the dtype/shape seen and the fix.
    """
    if target.is_floating_point() or target.dtype == torch.bool:
        shape = tuple(target.shape)
        raise KDConfigError(
            where,
            f"the batches' targets must be integer class indices, got {target.dtype} of shape {shape}",
            "give labels as int64 class ids (for one-hot targets use target.argmax(-1))",
        )
    if check_range and num_classes is not None and target.numel():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise KDConfigError(
                where,
                f"the batches' targets hold class ids in [{low}, {high}] but there are {num_classes} classes",
                "check num_classes and the data's labels",
            )


REGIME_WORDS = {
    "supervised": "labeled",
    "semi_supervised": "labeled + unlabeled",
    "unlabeled": "unlabeled (inputs-only)",
}


def regime_parts(batch: Any) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """``(labeled (x, y) or None, unlabeled (x, pool_index) or None)`` of a training batch of any regime.

    A plain ``(x, y, ...)`` batch is all labeled; the data-regime wrappers serve ``{"labeled": (x, y),
    "unlabeled": (x, pool_index)}`` (:mod:`kd_lightning.data.semi_supervised`), either part possibly absent.
    """
    if isinstance(batch, Mapping) and (LABELED in batch or UNLABELED in batch):
        labeled, unlabeled = batch.get(LABELED), batch.get(UNLABELED)
        return (
            None if labeled is None else (labeled[0], labeled[1]),
            None if unlabeled is None else (unlabeled[0], unlabeled[1]),
        )
    return ClassificationDistillation.unpack(batch), None


class ClassificationDistillation(DistillationModule):
    """Classification: a student classifier learns from frozen teacher classifier(s).

    Args:
        student: the classifier to train (its ``forward`` returns logits).
        teacher: the classifier to learn from (or ``teachers={name: network}`` for several).
        num_classes: classes of the task; ``None`` takes the data module's ``num_classes``.
        top_k: the second accuracy reported (``val/acc_top5`` for the default 5).
        fidelity: also measure the teacher's accuracy, top-1 agreement and KL(p_T ‖ p_S) on the
            validation and test data (one teacher forward per evaluation batch).
        **kwargs: the core's arguments (:class:`~kd_lightning.methods.core.DistillationModule`): ``teachers``,
            ``teacher_ckpt``, ``teacher_ckpt_key``, ``optimizer``, ``lr_scheduler``, speed switches.

    Subclasses set ``self.criterion`` (called as ``criterion(student_logits, teacher_logits, target)`` and
    returning named terms) or override :meth:`distillation_loss`; methods that need more than logits override
    :meth:`training_loss`. The default :meth:`training_loss` takes the teacher's logits from
    :meth:`teacher_logits`, which reads an attached exact logit cache instead of running the teacher
    (:attr:`uses_teacher_logits_only`).
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # Supervised, set below
    #: Whether training needs nothing from the teacher but its logits of the batch's inputs (then a teacher-logit
    #: cache can replace it). ``None`` decides from the class: ``True`` when it keeps the base's ``training_loss``,
    #: ``training_step`` and ``teacher_forward`` and does not train its teacher.
    uses_teacher_logits_only: ClassVar[bool | None] = None
    #: The data regimes this method trains on (a data module's ``regime``): ``"supervised"`` (labeled batches),
    #: ``"semi_supervised"`` (labeled + unlabeled parts) and/or ``"unlabeled"`` (a transfer set, inputs only).
    data_regimes: ClassVar[frozenset[str]] = frozenset({"supervised"})

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        top_k: int = 5,
        fidelity: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if top_k < 1:
            raise KDConfigError("top_k", f"must be >= 1, got {top_k}")
        self.num_classes = num_classes
        self.top_k = top_k
        self.fidelity = fidelity and bool(len(self.teachers))
        self.metrics = nn.ModuleDict()
        self._teacher_logit_source: Callable[[Any, Any, Tensor], Tensor] | None = None
        self._targets_checked = False

    # ------------------------------------------------------------------ batches and checks
    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor]:
        """Inputs and targets of a batch ``(x, y, *extras)`` or ``{"input": x, "target": y}``; of a data-regime
        batch, its labeled part; of a paired multimodal batch ``{modality: x, ..., "y": y}``, the dict of modalities
        and ``y``."""
        if isinstance(batch, Mapping):
            if LABELED in batch or UNLABELED in batch:
                if batch.get(LABELED) is None:
                    raise KDConfigError("data", "the training batches have no labeled part", "use labeled data")
                return batch[LABELED][0], batch[LABELED][1]
            if TARGET_KEY in batch:  # paired multimodal data (kd_lightning.data.paired)
                return {k: v for k, v in batch.items() if k != TARGET_KEY}, batch[TARGET_KEY]
            return batch["input"], batch["target"]
        return batch[0], batch[1]

    def inputs_of(self, batch: Any) -> Any:
        labeled, unlabeled = regime_parts(batch)
        return (labeled or unlabeled)[0]  # type: ignore[index]

    def batch_size_of(self, batch: Any) -> int:
        labeled, unlabeled = regime_parts(batch)
        sizes = [first_tensor(part[0]) for part in (labeled, unlabeled) if part is not None]
        return sum(int(x.shape[0]) for x in sizes if x is not None and x.dim())

    def check_regime(self, datamodule: Any) -> None:
        """The data module's ``regime`` must be one of :attr:`data_regimes`.

        Raises:
            KDConfigError: naming the data module, what it serves and what to use instead.
        """
        regime = getattr(datamodule, "regime", "supervised")
        if regime in self.data_regimes:
            return
        name, data_name = type(self).__name__, type(datamodule).__name__
        wants = " or ".join(REGIME_WORDS[r] for r in sorted(self.data_regimes))
        if regime == "supervised":
            fix = (
                "wrap it: data.class_path SemiSupervisedDataModule (or TransferSetDataModule) with "
                "data.init_args.source set to this data module"
            )
        elif regime == "semi_supervised":
            fix = "use a method for it (SemiSupervisedKD, DHO, LLKD), Supervised for the labels alone, or the source"
        else:
            fix = "use a method that distils without labels (SemiSupervisedKD, LLKD, KD3)"
        raise KDConfigError(
            "data", f"{data_name} serves {REGIME_WORDS[regime]} batches but {name} trains on {wants} data", fix
        )

    def check_targets(self, target: Tensor) -> None:
        """:func:`check_class_targets` with the range check on the first training batch of each fit only."""
        check_class_targets(target, self.num_classes, check_range=not self._targets_checked)
        self._targets_checked = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._targets_checked = False

    def networks_to_check(self) -> dict[str, nn.Module]:
        """Networks whose output class count must equal ``num_classes``, by config field."""
        return {"student": self.student, **self.teacher_fields()}

    def check_data(self, datamodule: Any) -> None:
        if datamodule is not None:
            task = getattr(datamodule, "task", "classification")
            if task != "classification":
                raise KDConfigError(
                    "data",
                    f"{type(datamodule).__name__} serves a {task!r} task but {type(self).__name__} classifies",
                    f"use a classification data module, or a method for the {task!r} task",
                )
            self.check_regime(datamodule)
        data_name = type(datamodule).__name__ if datamodule is not None else "the data"
        self.num_classes = class_count(type(self).__name__, self.num_classes, datamodule)
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is not None:  # {modality: shape} for paired multimodal data
            shape = dict(input_shape) if isinstance(input_shape, Mapping) else tuple(input_shape)
            self.check_networks(shape, data_name)
        if not self.metrics:
            self.build_metrics()

    def check_networks(
        self, input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]], data_name: str = "the data"
    ) -> None:
        """Run each network once on zeros of ``input_shape`` (a dict of zeros for ``{modality: shape}``) and
        check its class count.

        Raises:
            KDConfigError: naming the config field, the network class and the fix (a modality the data does not
                serve names the network's ``modalities``: ``model.init_args.student.init_args.modalities``).
        """
        for field, module in self.networks_to_check().items():
            param = next(iter(module.parameters()), None)  # the network's own device (setup runs before the move)
            device = param.device if param is not None else self.device
            if isinstance(input_shape, Mapping):
                probe: Any = {name: torch.zeros(2, *shape, device=device) for name, shape in input_shape.items()}
                shown = {name: tuple(x.shape) for name, x in probe.items()}
            else:
                probe = torch.zeros(2, *input_shape, device=device)
                shown = tuple(probe.shape)
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    out = module(probe)
            except MissingModalityError as err:  # a ModalityNet reads a modality the data does not serve
                raise err.with_field("modalities", f"model.init_args.{field}.init_args.modalities") from None
            except Exception as err:
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"{describe(module)} fails on an input of shape {shown} from {data_name} "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                    "does its input size/channels match the data?",
                ) from None
            finally:
                module.train(was_training)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[-1] != self.num_classes:
                got = out.shape[-1] if isinstance(out, Tensor) and out.dim() >= 2 else "no"
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"{describe(module)} outputs {got} classes but {data_name} has {self.num_classes}",
                    f"build it with num_classes={self.num_classes}",
                )

    # ------------------------------------------------------------------ metrics
    def build_metrics(self) -> None:
        """Accuracy (and fidelity) metrics, once the class count is known."""
        n, k = int(self.num_classes), min(self.top_k, int(self.num_classes))
        # Training accuracy skips torchmetrics' input validation (a torch.unique per step waits for the GPU).
        self.metrics["train_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro", validate_args=False)
        for stage in ("val", "test"):
            self.metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
            self.metrics[f"{stage}_acc_top{self.top_k}"] = MulticlassAccuracy(num_classes=n, top_k=k, average="micro")
            if self.fidelity:
                self.metrics[f"{stage}_teacher_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
                self.metrics[f"{stage}_agreement"] = MeanMetric()
                self.metrics[f"{stage}_kl_to_teacher"] = MeanMetric()

    def update_train_metrics(self, batch: Any, logits: Tensor | None, *targets: Tensor) -> None:
        if logits is None:
            return
        y = targets[0] if targets else self.unpack(batch)[1]
        self.metrics["train_acc"].update(logits.detach().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ teacher-logit cache
    def teacher_logits_only(self) -> bool:
        """Whether a teacher-logit cache may replace the teacher in training (see :attr:`uses_teacher_logits_only`)."""
        if self.trains_teacher or len(self.teachers) != 1:
            return False
        if self.uses_teacher_logits_only is not None:
            return bool(self.uses_teacher_logits_only)
        cls = type(self)
        return all(
            getattr(cls, name) is getattr(ClassificationDistillation, name)
            for name in ("training_loss", "training_step", "teacher_forward")
        )

    def attach_teacher_logit_source(self, source: Callable[[Any, Any, Tensor], Tensor] | None) -> None:
        """Let ``source(module, batch, x)`` provide the training teacher logits (``None`` detaches it).

        Raises:
            KDConfigError: if this method cannot take its teacher logits from a cache.
        """
        if source is not None and not self.teacher_logits_only():
            raise KDConfigError(
                "trainer.callbacks",
                f"{type(self).__name__} needs more than the teacher's logits in training (or trains its teacher)",
                "a teacher-logit cache cannot replace its teacher: remove TeacherLogitCache",
            )
        self._teacher_logit_source = source

    # ------------------------------------------------------------------ forward passes and loss
    def teacher_forward(self, x: Tensor) -> Tensor:
        """Teacher logits for ``x`` without autograd (frozen teachers), in ``teacher_precision``."""
        return self.run_teacher(x)

    def teacher_logits(self, batch: Any, x: Tensor) -> Tensor:
        """Teacher logits of the batch's inputs ``x``: an attached logit cache's, else :meth:`teacher_forward`'s."""
        source = self._teacher_logit_source
        if source is not None:
            return source(self, batch, x)
        return self.teacher_forward(x)

    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        """``(terms, student_logits)``: a logit method's loss (teacher first: its activations are freed earlier)."""
        x, y = self.unpack(batch)
        self.check_targets(y)
        teacher_logits = self.teacher_logits(batch, x)
        student_logits = self.student(x)
        return self.distillation_loss(student_logits, teacher_logits, y), student_logits

    def distillation_loss(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The method's named terms: by default ``self.criterion(student_logits, teacher_logits, target)``."""
        criterion = getattr(self, "criterion", None)
        if criterion is None:
            raise NotImplementedError(
                f"{type(self).__name__} sets no criterion and does not override distillation_loss."
            )
        return criterion(student_logits, teacher_logits, target)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        x, y = self.unpack(batch)
        logits = self(x)
        flat, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        batch_size = flat_y.shape[0]
        loss = F.cross_entropy(flat.float(), flat_y)
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)
        for name in (f"{stage}_acc", f"{stage}_acc_top{self.top_k}"):
            self.metrics[name].update(flat, flat_y)
            self.log(name.replace("_", "/", 1), self.metrics[name], batch_size=batch_size, prog_bar=True)
        self.eval_extra(x, y, logits, stage)

    def eval_extra(self, x: Tensor, y: Tensor, logits: Tensor, stage: str) -> None:
        """Run the teacher once on the evaluation batch and hand both logits to :meth:`eval_with_teacher`."""
        if not len(self.teachers):
            return
        overridden = type(self).eval_with_teacher is not ClassificationDistillation.eval_with_teacher
        if not (self.fidelity or overridden):
            return  # nothing to measure: skip the teacher forward
        with torch.no_grad():
            teacher_logits = self.run_teacher(x)
        self.eval_with_teacher(y, logits, teacher_logits, stage)

    def eval_with_teacher(self, y: Tensor, logits: Tensor, teacher_logits: Tensor, stage: str) -> None:
        """Evaluation metrics that need the teacher (fidelity here); extend it and call ``super()``."""
        if not self.fidelity:
            return
        s = logits.reshape(-1, logits.shape[-1]).float()
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        flat_y = y.reshape(-1)
        kl = forward_kl(s, t, reduction="none")
        agree = (s.argmax(-1) == t.argmax(-1)).float()
        updates = {"teacher_acc": (t, flat_y), "agreement": (agree,), "kl_to_teacher": (kl,)}
        for name, args in updates.items():
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(*args)
            self.log(f"{stage}/{name}", metric, batch_size=flat_y.shape[0])

    def export_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}


class Supervised(SingleNetwork, ClassificationDistillation):
    """Cross-entropy training of one network, with optional label smoothing: teachers and student-alone baselines.

    ``L = CE(z, y)`` with targets ``(1 − ε)·onehot(y) + ε/C`` when ``label_smoothing = ε > 0``.
    ``kd fit`` trains missing classification teachers with it.

    Args:
        model: the network to train (``forward`` returns logits).
        label_smoothing: ε in [0, 1).
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes``, ``top_k`` and the speed switches of
            :class:`ClassificationDistillation`.
    """

    #: On labeled + unlabeled data it trains on the labeled part only (the "labels alone" baseline).
    data_regimes: ClassVar[frozenset[str]] = frozenset({"supervised", "semi_supervised"})

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)

    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        x, y = self.unpack(batch)
        self.check_targets(y)
        logits = self.student(x)
        ce = label_cross_entropy(logits, y, self.label_smoothing)
        return {"loss": ce, "ce": ce}, logits


ClassificationDistillation.teacher_training_module = Supervised
