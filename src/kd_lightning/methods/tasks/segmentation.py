"""Semantic-segmentation task sibling: :class:`SegmentationDistillation` and :class:`SegmentationSupervised`.

Batches are ``(images, masks)``: images ``[B, 3, H, W]`` float (normalised by the data module), masks
``[B, H, W]`` int64 trainIds ``0..C-1`` with ``ignore_index`` (255) for unlabelled pixels. Networks return
torchvision's dict ``{"out": logits at the input size, "aux": ...}`` (a bare tensor also works).

What the task adds to the core:

- training: ``CE(out, masks)`` (ignore 255) ``+ aux_weight · CE(aux, masks)`` when the student has an auxiliary
  head (CIRKD: 0.4); the student and (under ``no_grad``) the teacher run with feature taps on the maps the method
  asks for, by role (``"logits"``, ``"head_feature"``, ``"backbone"``: resolved through the model's ``tap_names``)
  or by explicit module paths (``student_maps``/``teacher_maps``); the method's :meth:`distill_terms` gets them
  at the *native* output stride (never the upsampled ``out``: dense-baselines spec, section 0);
- the method's trainable parts (adapters) are built from the map shapes of one probe forward at ``setup`` (on
  zeros of the data's ``input_shape``, so the optimiser sees them) and rebuilt by ``load_from_checkpoint``;
- evaluation: ``"whole"`` image or ``"slide"`` windows (overlaps averaged by count, as mmseg), logits upsampled to
  the label size (``align_corners``), :class:`~kd_lightning.metrics.segmentation.MeanIoU` per stage synced across
  ranks: ``val/miou``, ``val/pixel_acc``, ``val/iou/<class>`` once per epoch, ``val/loss``, and the teacher's
  ``val/teacher_miou`` / ``val/teacher_pixel_acc`` (measured once per fit, on the first validation);
- checks at ``setup``: class counts of student, teacher and data; native maps of equal spatial size; labels in
  range (first batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import weighted_terms
from kd_lightning.methods.core import DistillationModule, SingleNetwork, class_count, describe
from kd_lightning.metrics.segmentation import MeanIoU
from kd_lightning.models.taps import FeatureTaps, UnknownModuleError

__all__ = ["SegmentationDistillation", "SegmentationSupervised", "check_segmentation_batch", "main_output"]

_CHECKPOINT_KEY = "kd_segmentation_shapes"


def main_output(output: Any) -> Tensor:
    """The logits of a segmenter's output: ``output["out"]`` (torchvision), ``output[0]`` or the tensor itself."""
    if isinstance(output, Mapping):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def check_segmentation_batch(
    images: Tensor, masks: Tensor, num_classes: int | None, ignore_index: int, check_range: bool = True
) -> None:
    """Images ``[B, C, H, W]`` float; masks ``[B, H, W]`` integer trainIds in ``[0, num_classes)`` or ``ignore_index``.

    The range check reads the masks back to the host (a device sync): run it on the first batch only.

    Raises:
        KDConfigError: ``data``: naming what was found and the fix.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise KDConfigError("data", f"segmentation batches must start with float images [B, 3, H, W], got {got}")
    if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.is_floating_point() or masks.dtype == torch.bool:
        got = f"{masks.dtype} of shape {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
        raise KDConfigError(
            "data",
            f"segmentation masks must be int64 trainIds [B, H, W], got {got}",
            f"give (images, masks) batches with ignore label {ignore_index}",
        )
    if masks.shape[0] != images.shape[0]:
        raise KDConfigError("data", f"{images.shape[0]} images but {masks.shape[0]} masks in a batch")
    if check_range and num_classes is not None and masks.numel():
        valid = masks[masks != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            low, high = int(valid.min()), int(valid.max())
            raise KDConfigError(
                "data",
                f"the masks hold labels in [{low}, {high}] besides the ignore label {ignore_index}, but there are "
                f"{num_classes} classes",
                f"map the labels to trainIds 0..{num_classes - 1} and everything else to {ignore_index} "
                "(CIRKD's ignore label is -1)",
            )


class SegmentationDistillation(DistillationModule):
    """Semantic segmentation: a student segmenter learns from frozen teacher segmenter(s).

    Args:
        student: the segmenter to train (e.g. :class:`~kd_lightning.models.segmentation.DeepLabV3Segmenter`).
        teacher: the segmenter to learn from.
        num_classes: classes; ``None`` takes the data module's ``num_classes``.
        ignore_index: label of unlabelled pixels (255 for Cityscapes trainIds).
        aux_weight: weight of the auxiliary head's CE when the student returns ``"aux"`` (CIRKD: 0.4; 0 skips it).
        student_maps: ``{role: module path}`` overriding the student's ``tap_names`` for the roles the method uses
            (``"logits"`` also sets the map evaluation upsamples); ``"path:input"`` taps a module's input.
        teacher_maps: the same for the teacher.
        eval_mode: ``"whole"`` image, or ``"slide"`` windows (mmseg's ``slide_inference``).
        window: ``(h, w)`` of the sliding windows (required for ``"slide"``).
        stride: ``(h, w)`` step between windows; ``None``: ``window`` (no overlap except the last row/column,
            shifted to end at the border). Overlapping logits are averaged by count.
        align_corners: of the bilinear upsampling of the native logits to the label size in evaluation. ``False``
            as torchvision's own ``forward``; CIRKD's evaluation (spec section 7a) uses ``True``.
        teacher_metrics: also measure the teacher's mIoU and pixel accuracy (once per fit on validation data,
            on every test run).
        class_names: names for ``<stage>/iou/<name>``; ``None`` takes the data module's ``class_names``, else the
            class indices.
        input_shape: ``(3, H, W)`` to probe the map shapes and build the method's parts at construction; ``None``
            waits for the data module's ``input_shape`` at ``setup``.
        probe_max_size: the probe forward at ``setup`` uses at most this height and width (a smaller zero batch:
            only channels and relative sizes are read).
        **kwargs: the core's arguments (:class:`~kd_lightning.methods.core.DistillationModule`): ``teacher_ckpt``,
            ``optimizer``, ``lr_scheduler``, speed switches.

    A method lists the roles it reads in :meth:`map_roles` (set what it reads *before* ``super().__init__``),
    builds trainable parts in :meth:`build_parts` and returns its named, already weighted terms from
    :meth:`distill_terms`; the task adds ``ce`` and ``aux`` and sums them all with ``weighted_terms``.
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # SegmentationSupervised, set below

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        ignore_index: int = 255,
        aux_weight: float = 0.4,
        student_maps: dict[str, str] | None = None,
        teacher_maps: dict[str, str] | None = None,
        eval_mode: Literal["whole", "slide"] = "whole",
        window: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        align_corners: bool = False,
        teacher_metrics: bool = True,
        class_names: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        probe_max_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if len(self.teachers) > 1:
            raise KDConfigError(
                "teachers", f"{type(self).__name__} distils from one teacher, got {len(self.teachers)}", "give teacher"
            )
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if not aux_weight >= 0:
            raise KDConfigError("aux_weight", f"must be >= 0, got {aux_weight}")
        if eval_mode not in ("whole", "slide"):
            raise KDConfigError("eval_mode", f"must be 'whole' or 'slide', got {eval_mode!r}")
        if eval_mode == "slide" and window is None:
            raise KDConfigError("window", "eval_mode 'slide' needs the window size", "e.g. window: [512, 1024]")
        for field, value in (("window", window), ("stride", stride)):
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise KDConfigError(field, f"must be two positive sizes (h, w), got {value}")
        if probe_max_size < 8:
            raise KDConfigError("probe_max_size", f"must be >= 8, got {probe_max_size}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.eval_mode = eval_mode
        self.window = tuple(window) if window is not None else None
        self.stride = tuple(stride) if stride is not None else self.window
        self.align_corners = align_corners
        self.teacher_metrics = teacher_metrics and bool(len(self.teachers))
        self.class_names = list(class_names) if class_names is not None else None
        self.probe_max_size = probe_max_size
        roles = tuple(self.map_roles())
        self.student_paths = self._resolve_maps(self.student, "student_maps", student_maps, roles)
        detach = not self.trains_teacher
        self.student_taps = self._taps(self.student, self.student_paths, "student_maps", detach=False)
        self.teacher_paths: dict[str, str] = {}
        self.teacher_taps: FeatureTaps | None = None
        if len(self.teachers):
            self.teacher_paths = self._resolve_maps(self.teacher, "teacher_maps", teacher_maps, roles)
            self.teacher_taps = self._taps(self.teacher, self.teacher_paths, "teacher_maps", detach=detach)
        elif teacher_maps:
            raise KDConfigError("teacher_maps", f"{type(self).__name__} has no teacher to tap")
        # Evaluation upsamples the native logits itself (align_corners): a "logits" tap per network that has one.
        self._eval_taps: dict[str, FeatureTaps] = {}
        networks = {"student": (self.student, student_maps)}
        if len(self.teachers):
            networks["teacher"] = (self.teacher, teacher_maps)
        for key, (network, overrides) in networks.items():
            path = self._logits_path(network, overrides)
            if path is not None:
                self._eval_taps[key] = self._taps(network, {"logits": path}, f"{key}_maps", detach=True)
        self.map_shapes: dict[str, Any] | None = None
        self.metrics = nn.ModuleDict()
        self._checked: set[str] = set()
        self._teacher_scores: dict[str, dict[str, Tensor]] = {}
        if input_shape is not None:
            self.build_from_input(tuple(input_shape))

    # ------------------------------------------------------------------ maps and taps
    def map_roles(self) -> tuple[str, ...]:
        """The roles of the native maps :meth:`distill_terms` reads (``"logits"``, ``"head_feature"``, ...)."""
        return ()

    def _resolve_maps(
        self, network: nn.Module, field: str, overrides: Mapping[str, str] | None, roles: Sequence[str]
    ) -> dict[str, str]:
        """``{role: module path}`` for ``roles``: ``overrides`` first, then the network's ``tap_names``."""
        overrides = dict(overrides or {})
        known = set(roles) | {"logits"}
        unused = sorted(set(overrides) - known)
        if unused:
            raise KDConfigError(
                f"model.init_args.{field}",
                f"names roles {unused} that {type(self).__name__} does not read",
                f"it reads {sorted(known)}",
            )
        tap_names = dict(getattr(network, "tap_names", None) or {})
        paths: dict[str, str] = {}
        for role in roles:
            path = overrides.get(role, tap_names.get(role))
            if path is None:
                listed = f"its tap_names are {sorted(tap_names)}" if tap_names else "it lists no tap_names"
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"{type(self).__name__} reads the {role!r} map but {describe(network)} has none ({listed})",
                    f"give {field}: {{{role}: <module path>}} (kd_lightning.models.module_names(model) lists them)",
                )
            paths[role] = path
        return paths

    @staticmethod
    def _logits_path(network: nn.Module, overrides: Mapping[str, str] | None) -> str | None:
        overrides = dict(overrides or {})
        return overrides.get("logits", (getattr(network, "tap_names", None) or {}).get("logits"))

    @staticmethod
    def _taps(network: nn.Module, paths: Mapping[str, str], field: str, detach: bool) -> FeatureTaps:
        try:
            return FeatureTaps(network, list(paths.values()), detach=detach, transient=True)
        except (UnknownModuleError, ValueError) as err:
            raise KDConfigError(f"model.init_args.{field}", " ".join(str(err).split())) from None

    # ------------------------------------------------------------------ probe and parts
    def build_parts(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Create the method's trainable parts (adapters) from the native map shapes ``[C, h, w]`` by role."""

    def probe(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """One forward of each network on zeros: output classes and the ``[C, h, w]`` of every tapped map."""
        c, h, w = input_shape
        shape = (1, c, min(h, self.probe_max_size), min(w, self.probe_max_size))
        found: dict[str, Any] = {"input_shape": list(input_shape), "probe_shape": list(shape[1:])}
        fields = self.networks_to_check()
        for key, (field, network) in zip(("student", "teacher"), fields.items()):
            paths = self.student_paths if key == "student" else self.teacher_paths
            taps = self.student_taps if key == "student" else self.teacher_taps
            param = next(iter(network.parameters()), None)
            probe = torch.zeros(*shape, device=param.device if param is not None else self.device)
            was_training = network.training
            network.eval()
            try:
                with torch.no_grad():
                    out, feats = taps(probe) if taps is not None else (network(probe), {})
            except (KDConfigError, RuntimeError, ValueError, TypeError) as err:
                raise KDConfigError(
                    f"model.init_args.{field}",
                    f"{describe(network)} fails on an input of shape {tuple(shape)} "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                    "does its input size/channels match the data?",
                ) from None
            finally:
                network.train(was_training)
            logits = main_output(out)
            found[f"{key}_classes"] = int(logits.shape[1]) if isinstance(logits, Tensor) and logits.dim() == 4 else None
            found[key] = {role: list(feats[path].shape[1:]) for role, path in paths.items()}
        return found

    def networks_to_check(self) -> dict[str, nn.Module]:
        """The networks by config field: ``{"student": ..., "teacher": ...}``."""
        return {"student": self.student, **({"teacher": self.teacher} if len(self.teachers) else {})}

    def build_from_input(self, input_shape: tuple[int, ...]) -> None:
        """Probe for ``input_shape``, check class counts and map sizes, build the method's parts (once)."""
        if len(input_shape) != 3:
            raise KDConfigError("input_shape", f"must be (channels, height, width), got {tuple(input_shape)}")
        if self.map_shapes is not None:
            return
        shapes = self.probe(tuple(input_shape))
        self.check_probe(shapes)
        self._build(shapes)

    def check_probe(self, shapes: Mapping[str, Any]) -> None:
        """Class counts equal ``num_classes``; student and teacher maps of each role have the same spatial size.

        Raises:
            KDConfigError: naming the network's field and both values.
        """
        for key, field in zip(("student", "teacher"), self.networks_to_check()):
            classes = shapes.get(f"{key}_classes")
            if classes is not None:
                self.check_classes(classes, field)
        if "teacher" not in shapes or not self.teacher_paths:
            return
        h, w = shapes["probe_shape"][1:]
        for role, s_shape in shapes["student"].items():
            t_shape = shapes["teacher"][role]
            for key, shape in (("student", s_shape), ("teacher", t_shape)):
                if len(shape) != 3:
                    raise KDConfigError(
                        f"model.init_args.{key}_maps",
                        f"the {role!r} map is [N, {', '.join(map(str, shape))}], not [N, C, H, W]",
                        "tap a convolutional map (a module whose output is [N, C, H, W])",
                    )
            if s_shape[1:] != t_shape[1:]:
                raise KDConfigError(
                    "model.init_args.student",
                    f"its {role} map ({self.student_paths[role]!r}) is {s_shape[1]}x{s_shape[2]} but the teacher's "
                    f"({self.teacher_paths[role]!r}) is {t_shape[1]}x{t_shape[2]} on a {h}x{w} input",
                    "give both networks the same output stride (e.g. output_stride: 8)",
                )

    def _build(self, shapes: dict[str, Any]) -> None:
        self.map_shapes = shapes
        student = {role: torch.Size(s) for role, s in shapes["student"].items()}
        teacher = {role: torch.Size(s) for role, s in shapes.get("teacher", {}).items()}
        self.build_parts(student, teacher)
        self.to(self.device)  # parts built after the Trainer moved the module join it there

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.map_shapes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get(_CHECKPOINT_KEY)
        if self.map_shapes is None and shapes is not None:
            self._build(shapes)

    # ------------------------------------------------------------------ data checks
    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor]:
        """Images and masks of a batch ``(images, masks, *extras)`` or ``{"input": images, "target": masks}``."""
        images, masks = (batch["input"], batch["target"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
        if isinstance(masks, Tensor) and masks.dtype in (torch.uint8, torch.int16, torch.int32):
            masks = masks.long()
        return images, masks

    def check_data(self, datamodule: Any) -> None:
        data_name = type(datamodule).__name__ if datamodule is not None else "the data"
        task = getattr(datamodule, "task", "segmentation")
        if task != "segmentation":
            raise KDConfigError("data", f"{data_name} serves a {task!r} task", "use a segmentation data module")
        self.num_classes = class_count(type(self).__name__, self.num_classes, datamodule)
        data_ignore = getattr(datamodule, "ignore_index", None)
        if data_ignore is not None and data_ignore != self.ignore_index:
            raise KDConfigError(
                "model.init_args.ignore_index",
                f"is {self.ignore_index} but {data_name} marks unlabelled pixels with {data_ignore}",
                f"set ignore_index to {data_ignore}",
            )
        if self.class_names is None and getattr(datamodule, "class_names", None) is not None:
            self.class_names = list(datamodule.class_names)
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise KDConfigError(
                "model.init_args.class_names",
                f"lists {len(self.class_names)} names for {self.num_classes} classes",
                "give one name per class",
            )
        input_shape = getattr(datamodule, "input_shape", None)
        if self.map_shapes is not None:
            self.check_probe(self.map_shapes)
        elif input_shape is not None:
            self.build_from_input(tuple(input_shape))
        elif type(self).build_parts is not SegmentationDistillation.build_parts:
            raise KDConfigError(
                "model.init_args.input_shape",
                f"{type(self).__name__} builds parts from the map shapes and {data_name} gives no input_shape",
                "set input_shape (e.g. [3, 512, 1024]) or use a data module with an input_shape attribute",
            )
        if not self.metrics:
            self.build_metrics()

    def check_batch(self, images: Tensor, masks: Tensor, stage: str) -> None:
        """:func:`check_segmentation_batch`, with the (syncing) range check on the first batch of each stage."""
        check_segmentation_batch(images, masks, self.num_classes, self.ignore_index, stage not in self._checked)
        self._checked.add(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._checked.clear()
        self._teacher_scores.pop("val", None)

    def check_classes(self, output: Tensor | int, field: str) -> None:
        """A network's class count (``output``: its logits or the count) equals ``num_classes``.

        Raises:
            KDConfigError: one line naming ``model.init_args.<field>``, the network and both counts.
        """
        classes = output if isinstance(output, int) else int(output.shape[1])
        if self.num_classes is not None and classes != self.num_classes:
            network = self.networks_to_check()[field]
            raise KDConfigError(
                f"model.init_args.{field}",
                f"{describe(network)} outputs {classes} classes but num_classes (the data's) is {self.num_classes}",
                f"build it with num_classes={self.num_classes}",
            )

    # ------------------------------------------------------------------ metrics
    def build_metrics(self) -> None:
        """A :class:`MeanIoU` per evaluation stage (and for the teacher), once the class count is known."""
        n = int(self.num_classes)
        for stage in ("val", "test"):
            self.metrics[stage] = MeanIoU(n, ignore_index=self.ignore_index, validate_args=False)
            if self.teacher_metrics:
                self.metrics[f"{stage}_teacher"] = MeanIoU(n, ignore_index=self.ignore_index, validate_args=False)

    # ------------------------------------------------------------------ training
    def upsample(self, logits: Tensor, size: Sequence[int]) -> Tensor:
        """Bilinear resize of ``logits`` to ``size`` (no-op when equal), with ``align_corners``."""
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=self.align_corners)

    def task_terms(self, output: Any, masks: Tensor, label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """``{"ce": CE(out, masks)}`` plus ``{"aux": CE(aux, masks)}`` (unweighted) when the output has ``"aux"``."""
        logits = main_output(output)
        terms = {
            "ce": F.cross_entropy(
                self.upsample(logits, masks.shape[-2:]).float(),
                masks,
                ignore_index=self.ignore_index,
                label_smoothing=label_smoothing,
            )
        }
        if isinstance(output, Mapping) and output.get("aux") is not None and self.aux_weight > 0:
            terms["aux"] = F.cross_entropy(
                self.upsample(output["aux"], masks.shape[-2:]).float(),
                masks,
                ignore_index=self.ignore_index,
                label_smoothing=label_smoothing,
            )
        return terms

    def check_map_sizes(self, student_maps: Mapping[str, Tensor], teacher_maps: Mapping[str, Tensor]) -> None:
        """Student and teacher maps of each role have the same spatial size.

        Raises:
            KDConfigError: one line naming both sizes; give both networks the same output stride.
        """
        for role, s in student_maps.items():
            t = teacher_maps[role]
            if s.shape[-2:] != t.shape[-2:]:
                raise KDConfigError(
                    "model.init_args.student",
                    f"its {role} map ({self.student_paths[role]!r}) is {tuple(s.shape[-2:])} but the teacher's "
                    f"({self.teacher_paths[role]!r}) is {tuple(t.shape[-2:])}",
                    "give both networks the same output stride (e.g. output_stride: 8)",
                )

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        x, masks = self.unpack(batch)
        self.check_batch(x, masks, "train")
        first = "train_classes" not in self._checked
        output, feats = self.student_taps(x)
        if first:
            self.check_classes(main_output(output), next(iter(self.networks_to_check())))
        terms = self.task_terms(output, masks)
        if len(self.teachers) and self.student_paths:
            assert self.teacher_taps is not None
            with self.teacher_taps:
                teacher_output = self.run_teacher(x)
            teacher_feats = self.teacher_taps.features
            self.teacher_taps.clear()
            if first:
                self.check_classes(main_output(teacher_output), "teacher")
            student_maps = {role: feats[path] for role, path in self.student_paths.items()}
            teacher_maps = {role: teacher_feats[path] for role, path in self.teacher_paths.items()}
            self.check_map_sizes(student_maps, teacher_maps)
            terms.update(self.distill_terms(student_maps, teacher_maps, masks, batch))
        self._checked.add("train_classes")
        return weighted_terms(terms, {"aux": self.aux_weight})

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        """The method's named terms, each already multiplied by its weight.

        Args:
            student_maps: ``{role: [B, C_S, h, w]}`` native-stride maps of the student (with autograd).
            teacher_maps: ``{role: [B, C_T, h, w]}`` of the teacher (detached), same spatial size.
            masks: ``[B, H, W]`` labels at full resolution (``ignore_index`` for unlabelled pixels).
            batch: the whole batch.
        """
        raise NotImplementedError(f"{type(self).__name__} implements no distill_terms")

    # ------------------------------------------------------------------ evaluation
    def _logits_at(self, network: nn.Module, key: str, x: Tensor, size: Sequence[int]) -> Tensor:
        """Native-stride logits of ``network`` for ``x`` (via the ``logits`` tap), upsampled to ``size``."""
        taps = self._eval_taps.get(key)
        run = self.run_teacher if key == "teacher" else network
        if taps is None:
            return self.upsample(main_output(run(x)).float(), size)
        with taps:
            output = run(x)
        feats = taps.features
        taps.clear()
        native = feats.get(taps.names[0])
        return self.upsample((native if native is not None else main_output(output)).float(), size)

    def predict_logits(self, x: Tensor, size: Sequence[int] | None = None, key: str = "student") -> Tensor:
        """Logits ``[B, C, *size]`` of the student (``key="teacher"``: the teacher) on images ``x``.

        ``"whole"``: one forward. ``"slide"``: windows of ``window`` every ``stride`` (the last ones shifted to end
        at the border), each window's logits upsampled to the window, summed and divided by how many windows cover
        each pixel (mmseg's ``slide_inference``), then resized to ``size`` (default: the image size).
        """
        network = self.student if key == "student" else self.teacher
        size = tuple(size) if size is not None else tuple(x.shape[-2:])
        if self.eval_mode == "whole":
            return self._logits_at(network, key, x, size)
        assert self.window is not None and self.stride is not None
        (height, width), (win_h, win_w), (step_h, step_w) = x.shape[-2:], self.window, self.stride
        rows = max(height - win_h + step_h - 1, 0) // step_h + 1
        cols = max(width - win_w + step_w - 1, 0) // step_w + 1
        summed: Tensor | None = None
        count = x.new_zeros(1, 1, height, width)
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * step_h + win_h, height), min(c * step_w + win_w, width)
                y1, x1 = max(y2 - win_h, 0), max(x2 - win_w, 0)
                crop = x[:, :, y1:y2, x1:x2]
                logits = self._logits_at(network, key, crop, crop.shape[-2:])
                if summed is None:
                    summed = logits.new_zeros(x.shape[0], logits.shape[1], height, width)
                summed[:, :, y1:y2, x1:x2] += logits
                count[:, :, y1:y2, x1:x2] += 1
        assert summed is not None
        return self.upsample(summed / count, size)

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        x, masks = self.unpack(batch)
        self.check_batch(x, masks, stage)
        logits = self.predict_logits(x, masks.shape[-2:])
        self.check_classes(logits, next(iter(self.networks_to_check())))
        loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        self.log(f"{stage}/loss", loss, batch_size=x.shape[0], sync_dist=True)
        self.metrics[stage].update(logits.argmax(1), masks)
        if self._measures_teacher(stage):
            with torch.no_grad():
                teacher_logits = self.predict_logits(x, masks.shape[-2:], key="teacher")
            self.metrics[f"{stage}_teacher"].update(teacher_logits.argmax(1), masks)

    def _measures_teacher(self, stage: str) -> bool:
        """Whether this evaluation runs the teacher: always in tests and lone validations; in a fit, on the first
        validation after the sanity check only (the frozen teacher's score does not change)."""
        if not self.teacher_metrics:
            return False
        if self._trainer is None:
            return True
        if self.trainer.sanity_checking:
            return False
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        return stage != "val" or not fitting or "val" not in self._teacher_scores

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.log_scores("test")

    def log_scores(self, stage: str) -> None:
        """Log ``<stage>/miou``, ``/pixel_acc``, ``/iou/<class>`` (present classes) and the teacher's: once an epoch."""
        metric = self.metrics[stage] if stage in self.metrics else None  # noqa: SIM401 (ModuleDict has no get)
        if metric is None or not metric.update_called:
            return
        scores = metric.compute_per_class()
        metric.reset()
        self.log(f"{stage}/miou", scores["miou"], prog_bar=True, sync_dist=True)
        self.log(f"{stage}/pixel_acc", scores["pixel_acc"], sync_dist=True)
        names = self.class_names or [str(i) for i in range(len(scores["iou"]))]
        for name, iou in zip(names, scores["iou"]):
            if not torch.isnan(iou):
                self.log(f"{stage}/iou/{str(name).replace(' ', '_')}", iou, sync_dist=True)
        key = f"{stage}_teacher"
        teacher_metric = self.metrics[key] if key in self.metrics else None  # noqa: SIM401
        if teacher_metric is not None and teacher_metric.update_called:
            self._teacher_scores[stage] = teacher_metric.compute_per_class()
            teacher_metric.reset()
        if stage in self._teacher_scores:
            teacher = self._teacher_scores[stage]
            self.log(f"{stage}/teacher_miou", teacher["miou"], sync_dist=True)
            self.log(f"{stage}/teacher_pixel_acc", teacher["pixel_acc"], sync_dist=True)

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "class_names": self.class_names,
            "task": "segmentation",
        }


class SegmentationSupervised(SingleNetwork, SegmentationDistillation):
    """Per-pixel cross-entropy training of one segmenter: teachers and student-alone baselines.

    ``L = CE(out, masks) + aux_weight · CE(aux, masks)`` (ignore 255; optional label smoothing ε).
    ``kd fit`` trains missing segmentation teachers with it.

    Args:
        model: the segmenter to train.
        label_smoothing: ε in [0, 1).
        **kwargs: ``num_classes``, ``ignore_index``, ``aux_weight``, evaluation options of
            :class:`SegmentationDistillation`, ``optimizer``, ``lr_scheduler`` and the speed switches.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        x, masks = self.unpack(batch)
        self.check_batch(x, masks, "train")
        output = self.student(x)
        if "train_classes" not in self._checked:
            self.check_classes(main_output(output), "model")
            self._checked.add("train_classes")
        return weighted_terms(self.task_terms(output, masks, self.label_smoothing), {"aux": self.aux_weight})


SegmentationDistillation.teacher_training_module = SegmentationSupervised
