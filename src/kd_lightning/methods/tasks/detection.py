"""Detection task sibling: :class:`DetectionDistillation` and :class:`DetectionSupervised`.

Adds to the core what torchvision detectors (RetinaNet, FCOS, Faster R-CNN with an FPN) need: batches
``(images, targets)`` (a list of ``[3, H, W]`` images in [0, 1], a list of target dicts, see
:mod:`kd_lightning.data.coco`), the class-count and transform checks at ``setup``, the student's own detection
losses as named terms, the teacher's FPN features on *the student's* transformed batch, and COCO mAP computed
once per epoch over the whole split (torchmetrics, synced across DDP ranks).

Training step (one batch):

1. the student's ``transform`` resizes, normalises and pads the images once (``ImageList``) and maps the boxes
   into the resized frame;
2. the student's backbone + FPN give ``{level: [N, C_S, H_l, W_l]}``; its head and losses follow torchvision
   (``classification``/``bbox_regression``[/``bbox_ctrness``] or ``loss_objectness``/``loss_rpn_box_reg``/
   ``loss_classifier``/``loss_box_reg``), each weighted by ``task_weight``;
3. the teacher's backbone + FPN run under ``no_grad`` on the same ``ImageList.tensors`` (so level ``l`` of both
   networks covers the same pixels), and its head only when the method sets ``needs_teacher_head = True``
   (mmrazor's ``FpnTeacherDistill`` also runs only the teacher's backbone and neck);
4. the method's :meth:`DetectionDistillation.distill_terms` returns its (weighted) terms, summed with the task
   terms by :func:`~kd_lightning.losses.terms.weighted_terms`.

A method's trainable parts (adapters...) are built by :meth:`DetectionDistillation.build_parts` from the FPN
channels recorded by one probe forward at ``setup`` (so the optimiser sees them); the channels travel in
checkpoints, so ``load_from_checkpoint`` rebuilds the parts before loading their weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import check_weights, weighted_terms
from kd_lightning.methods.core import AUTOCAST_DTYPES, DistillationModule, SingleNetwork, describe, first_tensor
from kd_lightning.metrics.detection import MAP_KEYS, detection_map, map_predictions, map_targets
from kd_lightning.models.detection import (
    detection_losses,
    detector_family,
    fpn_levels,
    head_outputs,
    num_outputs,
    probe_size,
)

__all__ = ["DetectionContext", "DetectionDistillation", "DetectionSupervised", "split_detection_batch"]

_CHECKPOINT_KEY = "kd_detection_channels"
#: Transform settings that must agree between student and teacher (the teacher sees the student's batch).
_TRANSFORM_FIELDS = ("image_mean", "image_std", "min_size", "max_size", "size_divisible", "fixed_size")
_COLLATE_FIX = (
    "use the detection collate (kd_lightning.data.coco.detection_collate, or collate_fn=lambda b: tuple(zip(*b))) "
    "so that batches are (list of [3, H, W] images, list of target dicts)"
)


@dataclass
class DetectionContext:
    """What a detection method's :meth:`~DetectionDistillation.distill_terms` receives besides the FPN features.

    Attributes:
        images: the student's transformed batch (``images.tensors`` ``[N, 3, H, W]`` normalised and padded,
            ``images.image_sizes`` the resized, un-padded ``(h, w)`` of each image); the teacher saw the same tensor.
        targets: the training targets in the resized frame (``boxes`` xyxy pixels of ``images.tensors``,
            ``labels`` 1..K; crowd boxes removed unless ``drop_crowd=False``).
        student_head: RetinaNet/FCOS head outputs of the student (``cls_logits [N, ΣHWA, K+1]``,
            ``bbox_regression [N, ΣHWA, 4]``, FCOS ``bbox_ctrness``); ``None`` for Faster R-CNN.
        teacher_head: the teacher's head outputs on its own features when ``needs_teacher_head``, else ``None``.
        anchors: the student's anchors per image (``[ΣHWA, 4]``; RetinaNet/FCOS), else ``None``.
        levels: the distilled FPN levels, in order.
    """

    images: ImageList
    targets: list[dict[str, Tensor]]
    student_head: dict[str, Tensor] | None
    teacher_head: dict[str, Tensor] | None
    anchors: list[Tensor] | None
    levels: list[str]


def split_detection_batch(batch: Any) -> tuple[list[Tensor], list[dict[str, Tensor]] | None]:
    """``(images, targets)`` of a detection batch; a stacked ``[N, 3, H, W]`` tensor is split into a list.

    Raises:
        KDConfigError: the batch is not ``(list of [3, H, W] images, list of target dicts)``.
    """
    images: Any = batch
    targets: Any = None
    if isinstance(batch, Mapping):
        images, targets = batch.get("images", batch.get("input")), batch.get("targets", batch.get("target"))
    elif isinstance(batch, (tuple, list)) and batch and not (isinstance(batch[0], Tensor) and batch[0].dim() == 3):
        images, targets = batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images.unbind(0))
    if (
        not isinstance(images, (list, tuple))
        or not images
        or not all(isinstance(x, Tensor) and x.dim() == 3 for x in images)
    ):
        raise KDConfigError(
            "data", f"a detection batch must start with a list of [3, H, W] images, got {_kind(images)}", _COLLATE_FIX
        )
    if targets is not None:
        if (
            not isinstance(targets, (list, tuple))
            or len(targets) != len(images)
            or not all(isinstance(t, Mapping) and "boxes" in t and "labels" in t for t in targets)
        ):
            raise KDConfigError(
                "data",
                f"detection targets must be a list of {len(images)} dicts with 'boxes' and 'labels', "
                f"got {_kind(targets)}",
                _COLLATE_FIX,
            )
        targets = list(targets)
    return list(images), targets


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        inner = type(value[0]).__name__ if value else "nothing"
        if value and isinstance(value[0], Tensor):
            inner = f"tensors of shape {tuple(value[0].shape)}"
        return f"a {type(value).__name__} of {len(value)} {inner}"
    return type(value).__name__


class DetectionDistillation(DistillationModule):
    """Detection: a torchvision detector student learns from frozen teacher detector(s) on FPN features.

    Args:
        student: the detector to train (:class:`~kd_lightning.models.detection.RetinaNetDetector`,
            ``FCOSDetector``, ``FasterRCNNDetector`` or a plain torchvision one).
        teacher: the detector to learn from; its transform must equal the student's (same mean/std/sizes).
        task_weight: weight of each of the student's own detection losses.
        distill_levels: FPN levels to distil (keys of ``backbone(x)``, e.g. ``['0', '1', '2', 'p6']`` = P3..P6
            of RetinaNet/FCOS); ``None``: all of the student's levels. Each must be a level of every network.
        map_backend: COCO evaluation backend of the mAP metric (``"auto"``: faster_coco_eval if installed).
        class_metrics: also log per-class AP (``val/map_class_<name>``).
        drop_crowd: remove ``iscrowd`` boxes from the training targets (torchvision's COCO references do; they
            still count as crowd regions in the mAP).
        **kwargs: the core's arguments (optimiser, scheduler, ``teacher_ckpt``, speed switches...).

    Logged: ``train/loss`` and every term; ``val/map``, ``val/map_50``, ``val/map_75``, ``val/map_small``,
    ``val/map_medium``, ``val/map_large`` (``test/...`` likewise), computed once per epoch over the split.

    A method implements :meth:`distill_terms` and, when it has trainable parts, :meth:`build_parts`; it sets
    ``needs_teacher_head = True`` when it needs the teacher's head outputs.
    """

    #: The method needs the teacher's head outputs (``context.teacher_head``); otherwise only the teacher's
    #: backbone + FPN run.
    needs_teacher_head: ClassVar[bool] = False
    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # DetectionSupervised, set below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        task_weight: float = 1.0,
        distill_levels: Sequence[str] | None = None,
        map_backend: Literal["auto", "faster_coco_eval", "pycocotools"] = "auto",
        class_metrics: bool = False,
        drop_crowd: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        check_weights(task_weight=task_weight)
        if len(self.teachers) > 1:
            raise KDConfigError(
                "teachers", f"detection methods distil from one teacher, got {len(self.teachers)}", "give teacher: ..."
            )
        for field, network in self.networks_to_check().items():
            try:
                detector_family(network)
            except KDConfigError as err:
                raise KDConfigError(field, err.problem, err.fix) from None
        self.task_weight = task_weight
        self.class_metrics = class_metrics
        self.drop_crowd = drop_crowd
        self.levels = self._resolve_levels(distill_levels)
        self.metrics = nn.ModuleDict(
            {f"{stage}_map": detection_map(map_backend, class_metrics=class_metrics) for stage in ("val", "test")}
        )
        self.num_classes: int | None = num_outputs(student) - 1
        self.class_names: list[str] | None = None
        self.feature_channels: dict[str, Any] | None = None
        self._transforms_checked = False
        self._labels_checked = False

    # ------------------------------------------------------------------ networks and levels
    @property
    def distills(self) -> bool:
        """Whether a teacher is distilled from (``False`` for :class:`DetectionSupervised`)."""
        return bool(len(self.teachers))

    def networks_to_check(self) -> dict[str, nn.Module]:
        """The networks by config field: ``{"student": ..., "teacher": ...}``."""
        return {"student": self.student, **self.teacher_fields()}

    def _resolve_levels(self, wanted: Sequence[str] | None) -> list[str]:
        student_levels = fpn_levels(self.student)
        if isinstance(wanted, str):
            wanted = [wanted]
        levels = list(self.default_distill_levels(student_levels) if wanted is None else wanted)
        if not levels:
            raise KDConfigError(
                "distill_levels", "is empty", f"list FPN levels, e.g. {student_levels}, or null for all"
            )
        for field, network in self.networks_to_check().items():
            available = student_levels if network is self.student else fpn_levels(network)
            unknown = [level for level in levels if level not in available]
            if unknown and wanted is None:
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"the student's FPN levels {unknown} {'is' if len(unknown) == 1 else 'are'} not an FPN level "
                    f"of the {field} {describe(network)} (its levels: {available})",
                    "give both detectors the same FPN levels and strides (same family), or set "
                    "model.init_args.distill_levels to levels that every network has",
                )
            if unknown:
                raise KDConfigError(
                    "distill_levels",
                    f"{unknown} {'is' if len(unknown) == 1 else 'are'} not an FPN level of the {field} "
                    f"{describe(network)} (its levels: {available})",
                    "set model.init_args.distill_levels to levels that every network has",
                )
        return levels

    def default_distill_levels(self, student_levels: list[str]) -> list[str]:
        """The levels distilled when ``distill_levels`` is not given: all of them (methods may narrow it)."""
        return list(student_levels)

    # ------------------------------------------------------------------ batches
    def inputs_of(self, batch: Any) -> list[Tensor]:
        """The list of images of a batch (a stacked ``[N, 3, H, W]`` tensor is split)."""
        return split_detection_batch(batch)[0]

    def batch_size_of(self, batch: Any) -> int:
        return len(self.inputs_of(batch))

    def unpack(self, batch: Any) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """``(images, targets)``; the labels are checked on the first training batch of each fit.

        Raises:
            KDConfigError: not a detection batch, no targets, or labels outside ``1..K``.
        """
        images, targets = split_detection_batch(batch)
        if targets is None:
            raise KDConfigError("data", "detection batches need targets: got images only", _COLLATE_FIX)
        if not self._labels_checked and self.num_classes is not None:
            labels = torch.cat([t["labels"].reshape(-1) for t in targets])
            if labels.is_floating_point() or (
                labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes)
            ):
                seen = f"[{int(labels.min())}, {int(labels.max())}]" if labels.numel() else "none"
                raise KDConfigError(
                    "data",
                    f"detection labels must be integers in 1..{self.num_classes} (0 = background), got {seen} "
                    f"({labels.dtype})",
                    "shift contiguous category indices by one (torchvision's convention)",
                )
            self._labels_checked = True
        return images, targets

    def training_targets(self, targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """``{boxes, labels}`` per image (crowd boxes removed when ``drop_crowd``).

        Raises:
            KDConfigError: a box has non-positive width or height.
        """
        out = []
        for target in targets:
            boxes, labels = target["boxes"].reshape(-1, 4).float(), target["labels"].reshape(-1).long()
            crowd = target.get("iscrowd")
            if self.drop_crowd and crowd is not None and crowd.numel():
                keep = crowd.reshape(-1) == 0
                boxes, labels = boxes[keep], labels[keep]
            out.append({"boxes": boxes, "labels": labels})
        if any(t["boxes"].numel() for t in out):
            boxes = torch.cat([t["boxes"] for t in out])
            if bool((boxes[:, 2:] <= boxes[:, :2]).any()):
                bad = boxes[(boxes[:, 2:] <= boxes[:, :2]).any(1)][0].tolist()
                raise KDConfigError(
                    "data",
                    f"a training box has non-positive width or height: {bad} (xyxy)",
                    "boxes must be [x1, y1, x2, y2] pixels with x2 > x1 and y2 > y1 (convert COCO xywh)",
                )
        return out

    # ------------------------------------------------------------------ setup checks and parts
    def check_data(self, datamodule: Any) -> None:
        if datamodule is not None:
            task = getattr(datamodule, "task", "detection")
            if task != "detection":
                raise KDConfigError(
                    "data", f"{type(datamodule).__name__} serves a {task!r} task", "use a detection data module"
                )
            classes = getattr(datamodule, "num_classes", None)
            if classes is not None:
                self.check_class_count(int(classes), type(datamodule).__name__)
                self.num_classes = int(classes)
            names = getattr(datamodule, "class_names", None)
            self.class_names = list(names) if names is not None else None
        self.prepare()

    def check_class_count(self, classes: int, data_name: str = "the data") -> None:
        """Every network must have ``classes + 1`` outputs (K foreground + background).

        Raises:
            KDConfigError: naming ``model.init_args.<field>.init_args.num_classes`` and the data's value.
        """
        for field, network in self.networks_to_check().items():
            outputs = num_outputs(network)
            if outputs != classes + 1:
                raise KDConfigError(
                    f"model.init_args.{field}.init_args.num_classes",
                    f"is {outputs - 1} ({outputs} outputs with background) but {data_name} has {classes} classes",
                    f"set it to {classes} (foreground categories; the detector adds the background)",
                )

    def prepare(self) -> None:
        """Check the teachers' transforms against the student's and build the method's parts (once)."""
        if not self._transforms_checked:
            self.check_transforms()
            self._transforms_checked = True
        if self.distills and self.feature_channels is None:
            self._build(self.probe_channels())

    def check_transforms(self) -> None:
        """Teachers see the student's transformed batch: their normalisation and resize must be the student's.

        Raises:
            KDConfigError: naming the teacher's differing field (``model.init_args.teacher.init_args.min_size``).
        """
        mine = self.student.transform
        for field, network in self.teacher_fields().items():
            theirs = network.transform
            for name in _TRANSFORM_FIELDS:
                a, b = getattr(mine, name, None), getattr(theirs, name, None)
                if _plain(a) != _plain(b):
                    raise KDConfigError(
                        f"model.init_args.{field}.init_args.{name}",
                        f"is {_plain(b)} but the student's is {_plain(a)}",
                        "the teacher runs on the student's resized, normalised batch: give both the same "
                        "image_mean, image_std, min_size, max_size and size_divisible",
                    )

    def probe_channels(self) -> dict[str, Any]:
        """FPN channels of both networks from one forward on zeros of the student's ``min_size`` (square).

        Raises:
            KDConfigError: a distilled level has a different spatial size in the teacher (different strides), or
                (``needs_teacher_head``) the heads' anchors or outputs differ.
        """
        size = probe_size(self.student)
        param = next(iter(self.student.parameters()))
        # two images: FCOS's GroupNorm needs more than one value per group on a 1x1 P7 map
        x = torch.zeros(2, 3, size, size, device=param.device, dtype=param.dtype)
        with _eval_mode(self.student, *self.teachers.values()), torch.no_grad():
            student_feats = self.student.backbone(x)
            shapes: dict[str, Any] = {
                "levels": list(self.levels),
                "student": {level: int(student_feats[level].shape[1]) for level in self.levels},
                "probe_size": size,
            }
            for field, network in self.teacher_fields().items():
                teacher_feats = network.backbone(x)
                for level in self.levels:
                    s_hw, t_hw = tuple(student_feats[level].shape[2:]), tuple(teacher_feats[level].shape[2:])
                    if s_hw != t_hw:
                        raise KDConfigError(
                            f"model.init_args.{field}",
                            f"FPN level {level!r} is {t_hw} for a {size}x{size} input but the student's is {s_hw}",
                            "student and teacher need the same stride at every distilled level (distill_levels)",
                        )
                shapes[field] = {level: int(teacher_feats[level].shape[1]) for level in self.levels}
                if self.needs_teacher_head:
                    self._check_heads(field, network, ImageList(x, [(size, size)] * 2), student_feats, teacher_feats)
        shapes["teacher"] = shapes[next(iter(self.teacher_fields()))]
        return shapes

    def _check_heads(
        self,
        field: str,
        teacher: nn.Module,
        images: ImageList,
        student_feats: dict[str, Tensor],
        teacher_feats: dict[str, Tensor],
    ) -> None:
        """Student and teacher heads must predict on the same anchors (same families, anchors and classes)."""
        s_family, t_family = detector_family(self.student), detector_family(teacher)
        if s_family != t_family:
            raise KDConfigError(
                f"model.init_args.{field}",
                f"is a {t_family} detector but the student is a {s_family} one; {type(self).__name__} compares "
                "their heads anchor by anchor",
                "give both the same detector family",
            )
        s_out, t_out = head_outputs(self.student, student_feats), head_outputs(teacher, teacher_feats)
        s_shape, t_shape = tuple(s_out["cls_logits"].shape[1:]), tuple(t_out["cls_logits"].shape[1:])
        s_anchors = self.student.anchor_generator(images, list(student_feats.values()))[0]
        t_anchors = teacher.anchor_generator(images, list(teacher_feats.values()))[0]
        if s_shape != t_shape or s_anchors.shape != t_anchors.shape or not torch.equal(s_anchors, t_anchors):
            raise KDConfigError(
                f"model.init_args.{field}.init_args.anchor_sizes",
                f"the teacher's head predicts {t_shape} (anchors x classes) on {tuple(t_anchors.shape)} anchors, "
                f"the student's {s_shape} on {tuple(s_anchors.shape)}",
                "give both the same anchor_sizes, aspect_ratios, FPN levels and num_classes",
            )

    def _build(self, shapes: dict[str, Any]) -> None:
        self.feature_channels = shapes
        self.build_parts(dict(shapes["student"]), dict(shapes["teacher"]))
        self.to(self.device)  # parts built after the Trainer moved the module join it there

    def build_parts(self, student_channels: dict[str, int], teacher_channels: dict[str, int]) -> None:
        """Create the method's trainable parts from ``{level: channels}`` of both networks (default: none)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.feature_channels

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get(_CHECKPOINT_KEY)
        if self.feature_channels is None and shapes is not None:
            self._build(shapes)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._labels_checked = False

    # ------------------------------------------------------------------ training
    def teacher_call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` (a part of a frozen teacher) under ``no_grad`` and ``teacher_precision``'s autocast;
        floating tensors (also inside a dict) come back in float32."""
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        with torch.no_grad():
            if dtype is None:
                return function(*args)
            first = first_tensor(args)
            device = first.device.type if first is not None else "cpu"
            with torch.autocast(device_type=device, dtype=dtype):
                out = function(*args)
        if isinstance(out, Mapping):
            return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        images, targets = self.unpack(batch)
        self.prepare()  # no-op after setup; builds the parts when used without a Trainer
        targets = self.training_targets(targets)
        image_list, resized_targets = self.student.transform(images, targets)
        student_feats = self.student.backbone(image_list.tensors)
        losses, student_head, anchors = detection_losses(self.student, image_list, student_feats, resized_targets)
        terms: dict[str, Tensor] = dict(losses)
        weights = dict.fromkeys(losses, self.task_weight)
        if self.distills:
            teacher = self.teacher
            teacher_feats = self.teacher_call(teacher.backbone, image_list.tensors)
            teacher_head = (
                self.teacher_call(teacher.head, list(teacher_feats.values())) if self.needs_teacher_head else None
            )
            context = DetectionContext(
                images=image_list,
                targets=resized_targets,
                student_head=student_head,
                teacher_head=teacher_head,
                anchors=anchors,
                levels=list(self.levels),
            )
            distilled = self.distill_terms(
                {level: student_feats[level] for level in self.levels},
                {level: teacher_feats[level] for level in self.levels},
                context,
            )
            clash = sorted(set(distilled) & (set(terms) | {"loss"}))
            if clash:
                raise KDConfigError(
                    type(self).__name__, f"its distillation terms {clash} reuse the detector's loss names"
                )
            terms.update(distilled)
        return weighted_terms(terms, weights)

    def distill_terms(
        self, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor], context: DetectionContext
    ) -> dict[str, Tensor]:
        """The method's terms, already weighted: ``{name: weight·term}``.

        Args:
            student_feats: ``{level: [N, C_S, H_l, W_l]}`` of the distilled levels (with gradients).
            teacher_feats: ``{level: [N, C_T, H_l, W_l]}`` on the same input (no gradients).
            context: the transformed batch, resized targets, head outputs (:class:`DetectionContext`).
        """
        raise NotImplementedError(f"{type(self).__name__} implements no distill_terms")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        images, targets = self.unpack(batch)
        detections = self.student(images)
        self.metrics[f"{stage}_map"].update(map_predictions(detections), map_targets(targets))

    def on_validation_epoch_end(self) -> None:
        self.log_map("val")

    def on_test_epoch_end(self) -> None:
        self.log_map("test")

    def log_map(self, stage: str) -> None:
        """Compute the stage's mAP once over everything seen this epoch (all ranks), log it and reset."""
        metric = self.metrics[f"{stage}_map"]
        if not metric.update_called:
            return
        result = metric.compute()
        values = {f"{stage}/{key}": result[key].float() for key in MAP_KEYS}
        if self.class_metrics:
            classes = result["classes"].reshape(-1).tolist()
            per_class = result["map_per_class"].reshape(-1)
            for label, value in zip(classes, per_class):
                name = self._class_name(int(label))
                values[f"{stage}/map_class_{name}"] = value.float()
        main = values.pop(f"{stage}/map")
        # the values are equal on every rank (torchmetrics synced the states): sync_dist's mean changes nothing
        self.log(f"{stage}/map", main, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        metric.reset()

    def _class_name(self, label: int) -> str:
        if self.class_names is not None and 1 <= label <= len(self.class_names):
            return "".join(c if c.isalnum() else "_" for c in str(self.class_names[label - 1]))
        return str(label)

    def export_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "task": "detection", "fpn_levels": fpn_levels(self.student)}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


class _eval_mode:
    """Put networks in eval mode for a block and restore each module's own mode afterwards."""

    def __init__(self, *networks: nn.Module) -> None:
        self.modes = [(m, m.training) for network in networks for m in network.modules()]

    def __enter__(self) -> None:
        for module, _ in self.modes:
            module.training = False

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


class DetectionSupervised(SingleNetwork, DetectionDistillation):
    """The detector's own losses only (no teacher): trains detection teachers and the student-alone baseline.

    Args:
        model: the detector to train.
        label_smoothing: accepted for the teacher trainer's interface; must be 0 (torchvision's detection losses
            have no label smoothing).
        **kwargs: ``task_weight``, ``map_backend``, ``class_metrics``, ``drop_crowd`` and the core's arguments.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        if label_smoothing:
            raise KDConfigError(
                "label_smoothing", f"is {label_smoothing} but detection losses take no label smoothing", "set it to 0"
            )


DetectionDistillation.teacher_training_module = DetectionSupervised
