"""The task-neutral distillation core: :class:`DistillationModule`.

It owns what every method needs whatever the task: the student (the trained network), zero, one or several
named teachers (loaded from their checkpoints, frozen with ``requires_grad_(False)``, kept in eval mode for
the whole run, run under ``torch.no_grad()`` and optionally autocast), the optimiser and scheduler (from
LightningCLI callables), logging of named loss terms, the scheduled-loss protocol
(:mod:`kd_lightning.losses.schedule`), a stop on non-finite losses, throughput, the precision/compile/
channels-last switches and :meth:`~DistillationModule.export_student`.

It knows nothing about classes, tokens or boxes. Task siblings subclass it (:mod:`kd_lightning.methods.tasks`):
classification (top-1/top-5, class-count checks, fidelity), language modelling (token masks, perplexity,
vocabulary checks) and masked-image modelling. A sibling implements four hooks:

- :meth:`~DistillationModule.training_loss` — ``batch -> {"loss": total, **named terms}`` (optionally
  followed by what the task's training metrics need, passed to :meth:`~DistillationModule.update_train_metrics`);
- :meth:`~DistillationModule.evaluate` — one validation/test batch;
- :meth:`~DistillationModule.check_data` — checks against the data module at ``setup``;
- :meth:`~DistillationModule.inputs_of` — the network inputs of a batch (``predict``, throughput, NaN checks).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError, TeacherCheckpointError, TrainingDivergedError
from kd_lightning.losses.schedule import Progress, ScheduledLoss
from kd_lightning.models.checkpoints import CheckpointKey, check_checkpoint_exists, load_weights
from kd_lightning.utils.trainable import freeze

__all__ = [
    "DistillationModule",
    "ExpectedWarnings",
    "RandomStateCheckpoint",
    "SingleNetwork",
    "config_managed",
    "describe",
    "first_tensor",
    "probe_optimizer",
]

#: ``teacher_precision`` -> autocast dtype (``None``: no autocast).
AUTOCAST_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Name of the teacher given as ``teacher=`` (a single teacher).
DEFAULT_TEACHER = "teacher"


#: Set while the kd CLI instantiates classes: init arguments arrive as their config and are stored as such.
_CONFIG_MANAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("kd_config_managed", default=False)


@contextlib.contextmanager
def config_managed() -> Iterator[None]:
    """Within the block, modules store their object arguments' configs as hyperparameters (used by the CLI,
    whose LightningCLI parser hands ``save_hyperparameters`` the config instead of the live objects)."""
    token = _CONFIG_MANAGED.set(True)
    try:
        yield
    finally:
        _CONFIG_MANAGED.reset(token)


def describe(module: nn.Module | None) -> str:
    """The class name of a module (``"None"`` for no module), for messages."""
    return type(module).__name__ if module is not None else "None"


def class_count(
    method: str, num_classes: int | None, datamodule: Any, fix: str = "use a data module with a num_classes attribute"
) -> int:
    """The class count of a run: the method's ``num_classes`` if given, else the data module's; they must agree.

    Raises:
        KDConfigError: on ``model.init_args.num_classes`` when the two differ or neither is known.
    """
    data_name = type(datamodule).__name__ if datamodule is not None else "the data"
    data_classes = getattr(datamodule, "num_classes", None)
    if num_classes is not None and data_classes is not None and data_classes != num_classes:
        raise KDConfigError(
            "model.init_args.num_classes",
            f"is {num_classes} but {data_name} has {data_classes} classes",
            f"set num_classes to {data_classes} (or leave it empty to take the data's)",
        )
    resolved = num_classes if num_classes is not None else data_classes
    if resolved is None:
        raise KDConfigError(
            "model.init_args.num_classes", f"{method} does not know the class count", f"pass num_classes or {fix}"
        )
    return int(resolved)


def first_tensor(value: Any) -> Tensor | None:
    """The first tensor in a batch (a tensor, a tuple/list, or a dict), ``None`` if there is none."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class RandomStateCheckpoint(Callback):
    """Stores the global random states in checkpoints and restores them when training resumes from one.

    Torch (CPU and CUDA), numpy and Python ``random`` states are saved with every checkpoint and put back when
    ``trainer.fit(ckpt_path=...)`` restores it, before the first resumed epoch builds its data iterator: the
    data order, augmentations and dropout of a run resumed at an epoch boundary equal an uninterrupted run's
    (sanity checking runs under Lightning's ``isolate_rng``). Every :class:`DistillationModule` adds it.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": str(kind),
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        numpy_state = state_dict.get("numpy")
        if numpy_state is not None:
            np.random.set_state(
                (
                    numpy_state["kind"],
                    numpy_state["keys"].numpy().astype(np.uint32),
                    numpy_state["pos"],
                    numpy_state["has_gauss"],
                    numpy_state["gauss"],
                )
            )
        if state_dict.get("python") is not None:
            version, internal, gauss = state_dict["python"]
            random.setstate((version, tuple(internal), gauss))
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ExpectedWarnings(Callback):
    """Mutes, for one ``trainer.fit/validate/test`` call (``setup`` to ``teardown``), Lightning warnings that are
    expected here and that a user cannot act on; every other warning is left alone. Every
    :class:`DistillationModule` adds it.

    - ``Found N module(s) in eval mode at the start of training`` when the N modules are exactly the frozen
      teachers' (kept in eval mode on purpose); a student with modules in eval mode still warns.
    - ``The '...' does not have many workers`` for data modules whose data sit in memory (``num_workers``
      is 0 and is their default, e.g. the digits, text and RadioML modules).
    - torch's ``isinstance(treespec, LeafSpec)`` deprecation, raised inside Lightning's data loading.
    """

    def __init__(self) -> None:
        self._context: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        self._context = warnings.catch_warnings()
        self._context.__enter__()
        teachers = getattr(pl_module, "teachers", None)
        if teachers is not None and len(teachers) and not getattr(pl_module, "trains_teacher", False):
            frozen = len({id(m) for network in teachers.values() for m in network.modules()})
            warnings.filterwarnings(
                "ignore", rf"Found {frozen} module\(s\) in eval mode at the start of training", PossibleUserWarning
            )
        if _in_memory_data(trainer.datamodule):
            warnings.filterwarnings("ignore", r"The '\w+' does not have many workers", PossibleUserWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")


def _in_memory_data(datamodule: Any) -> bool:
    """Whether a data module runs without worker processes by design: ``num_workers`` is 0, its default."""
    if getattr(datamodule, "num_workers", None) != 0:
        return False
    try:
        default = inspect.signature(type(datamodule).__init__).parameters["num_workers"].default
    except (KeyError, TypeError, ValueError):
        return False
    return default == 0


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: give a 4-D first input the channels-last memory format."""
    if args and isinstance(args[0], Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def _is_config(value: Any) -> bool:
    """Whether an init argument is plain configuration (what LightningCLI records) rather than a live object."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, Mapping):
        return all(_is_config(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_is_config(v) for v in value)
    return False


class DistillationModule(L.LightningModule, metaclass=ConfigFieldPrefix):
    """Task-neutral base of every method: a student learns from zero or more frozen teachers.

    Args:
        student: the network to train.
        teacher: one teacher (stored under the name ``"teacher"``).
        teachers: several named teachers, ``{name: network}`` (multi-teacher methods); not with ``teacher``.
        teacher_ckpt: weights for the teacher: a path (one teacher) or ``{name: path}``. Accepted files:
            a Lightning checkpoint, ``{"model"|"state_dict": ...}`` (RepDistiller/mdistiller), an
            ``export_student`` file, a plain state dict or ``.safetensors``. ``None``: the teacher is used as
            given, and ``kd fit`` trains a missing teacher first and caches it. Read with
            ``torch.load(weights_only=True)`` only (``kd fit --trust_checkpoint`` for files you trust).
        teacher_ckpt_key: which network of a *distillation* checkpoint (holding ``teacher.*`` and
            ``student.*``) to load: ``"auto"`` refuses such a checkpoint as ambiguous, ``"student"`` loads the
            distilled student as the teacher, ``"teacher"`` its teacher.
        optimizer: called with the trainable parameters (``torch.optim.SGD`` with its arguments in the config;
            in Python a callable such as ``functools.partial(torch.optim.SGD, lr=0.1)``, not an instance).
        lr_scheduler: called with the optimiser; ``None`` keeps the learning rate constant.
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        compile_student: ``torch.compile`` the student in place once the run is set up (keys unchanged).
        compile_teacher: the same for the teachers.
        compile_options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ``dynamic``...).
        teacher_precision: run the frozen teachers under ``torch.autocast`` in ``"bf16"`` or ``"fp16"``
            (float32 outputs); ``None``: the module's precision.
        channels_last: channels-last memory format for the networks and their 4-D inputs.
        check_finite_every: check every n-th training loss for NaN/inf and stop with the step, the term and
            the batch (one host sync per check; ``0`` disables the check).
        student_init: where the student's weights start: ``"scratch"`` (as constructed), ``"teacher"`` (a copy
            of the single teacher's weights, loaded or trained by ``kd fit``, at setup: the
            self-distillation methods keep the frozen initial policy in the teacher slot; the architectures must
            match), ``"teacher:<name>"`` (a copy of the named teacher: e.g. a fine-tuned base model kept beside
            the real teacher, which ``kd fit`` trains and caches like any teacher), or a checkpoint path (any
            layout ``teacher_ckpt`` accepts, read with ``weights_only=True``). Resuming from a checkpoint restores
            the trained student on top of it.

    Only the student and the method's own trainable parts are optimised. A method that trains its teacher
    sets ``trains_teacher = True``; a task's supervised module sets ``requires_teacher = takes_teacher = False``.
    """

    #: Prefix of the config fields named in constructor errors (see :class:`~kd_lightning.errors.ConfigFieldPrefix`).
    config_prefix: ClassVar[str] = "model.init_args."
    #: The method updates its teacher (online KD); otherwise teachers are frozen and in eval mode.
    trains_teacher: ClassVar[bool] = False
    #: The method needs at least one teacher.
    requires_teacher: ClassVar[bool] = True
    #: The method accepts teachers at all (``False`` for supervised training of one network).
    takes_teacher: ClassVar[bool] = True
    #: The module ``kd fit`` trains a missing teacher with (the task's supervised module), called as
    #: ``teacher_training_module(model=network, optimizer=..., lr_scheduler=..., **task_arguments)``.
    teacher_training_module: ClassVar[Callable[..., DistillationModule] | None] = None
    #: Arguments holding objects (networks, callables): not stored as hyperparameters outside the CLI.
    object_arguments: ClassVar[tuple[str, ...]] = (
        "model",
        "student",
        "teacher",
        "teachers",
        "optimizer",
        "lr_scheduler",
    )

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        teachers: dict[str, nn.Module] | None = None,
        teacher_ckpt: str | dict[str, str] | None = None,
        teacher_ckpt_key: CheckpointKey = "auto",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        compile_student: bool = False,
        compile_teacher: bool = False,
        compile_options: dict[str, Any] | None = None,
        teacher_precision: Literal["bf16", "fp16"] | None = None,
        channels_last: bool = False,
        check_finite_every: int = 1,
        student_init: str = "scratch",
    ) -> None:
        super().__init__()
        self._save_config()
        _check_callable("optimizer", optimizer, Optimizer, "torch.optim.SGD")
        probe_optimizer("model.init_args.optimizer", optimizer)
        if lr_scheduler is not None:
            _check_callable(
                "lr_scheduler", lr_scheduler, torch.optim.lr_scheduler.LRScheduler, "torch.optim.lr_scheduler.StepLR"
            )
        if lr_scheduler_interval not in ("epoch", "step"):
            raise KDConfigError("lr_scheduler_interval", f"must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        if teacher_precision not in AUTOCAST_DTYPES:
            raise KDConfigError("teacher_precision", f"must be 'bf16', 'fp16' or null, got {teacher_precision!r}")
        if check_finite_every < 0:
            raise KDConfigError("check_finite_every", f"must be >= 0, got {check_finite_every}")
        if not isinstance(student, nn.Module):
            raise KDConfigError(
                "student", f"must be a torch.nn.Module, got {type(student).__name__}", "give a network class_path"
            )
        self.student = student
        self.teachers = nn.ModuleDict(self._named_teachers(teacher, teachers))
        self.teacher_ckpt = teacher_ckpt
        self.teacher_ckpt_key = teacher_ckpt_key
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.compile_student = compile_student
        self.compile_teacher = compile_teacher
        self.compile_options = dict(compile_options or {})
        self.teacher_precision = teacher_precision
        self.channels_last = channels_last
        self.check_finite_every = check_finite_every
        if student_init == "teacher" and len(self.teachers) != 1:
            raise KDConfigError(
                "student_init",
                f"'teacher' copies the single teacher's weights, but there are {len(self.teachers)} teachers",
                "name one with 'teacher:<name>', or give a checkpoint path",
            )
        if student_init.startswith("teacher:") and student_init.partition(":")[2] not in self.teachers:
            raise KDConfigError(
                "student_init",
                f"names the teacher {student_init.partition(':')[2]!r}, which is not one of {sorted(self.teachers)}",
                "use 'teacher:<name>' with a name under model.init_args.teachers",
            )
        if student_init not in ("scratch", "teacher") and not student_init.startswith("teacher:"):
            check_checkpoint_exists(student_init, "model.init_args.student_init")
        self.student_init = student_init
        self._student_initialised = False
        self._channels_last_hooks: list[Any] = []
        self._total_steps: float | None = None
        self._epoch_started = 0.0
        self._epoch_samples = 0
        for name, path in self._checkpoints(teacher_ckpt).items():
            self.load_teacher(path, name)
        if not self.trains_teacher:
            for network in self.teachers.values():
                freeze(network)  # requires_grad_(False), remembering what was frozen by design
                network.eval()

    # ------------------------------------------------------------------ construction helpers
    def _save_config(self) -> None:
        """Record the init arguments as hyperparameters (``load_from_checkpoint`` rebuilds from them).

        Under the kd CLI the networks and callables arrive as their config (class_path + init_args) and are
        stored; in plain Python they are live objects and are left out (pass them again to
        ``load_from_checkpoint``), so checkpoints hold no pickled objects.
        """
        self.save_hyperparameters(ignore=[] if _CONFIG_MANAGED.get() else list(self.object_arguments))

    def _named_teachers(
        self, teacher: nn.Module | None, teachers: Mapping[str, nn.Module] | None
    ) -> dict[str, nn.Module]:
        if teacher is not None and teachers:
            raise KDConfigError("teachers", "give either teacher or teachers, not both")
        named: dict[str, nn.Module] = dict(teachers or {})
        if teacher is not None:
            named = {DEFAULT_TEACHER: teacher}
        for name, network in named.items():
            if not isinstance(network, nn.Module):
                field = "teacher" if teacher is not None else f"teachers.{name}"
                raise KDConfigError(field, f"must be a torch.nn.Module, got {type(network).__name__}")
            if not name.isidentifier():
                raise KDConfigError(f"teachers.{name}", "a teacher's name must be a Python identifier")
        if self.requires_teacher and not named:
            raise KDConfigError(
                "teacher", f"{type(self).__name__} distils from a teacher and none was given", "set teacher: ..."
            )
        if not self.takes_teacher and named:
            raise KDConfigError("teacher", f"{type(self).__name__} trains one network and takes no teacher")
        return named

    def _checkpoints(self, teacher_ckpt: str | Mapping[str, str] | None) -> dict[str, str]:
        if teacher_ckpt is None:
            return {}
        if isinstance(teacher_ckpt, (str, Path)):
            if len(self.teachers) != 1:
                raise KDConfigError(
                    "teacher_ckpt",
                    f"one path for {len(self.teachers)} teachers {list(self.teachers)}",
                    "give {name: path} per teacher",
                )
            return {next(iter(self.teachers)): str(teacher_ckpt)}
        unknown = sorted(set(teacher_ckpt) - set(self.teachers))
        if unknown:
            raise KDConfigError(
                "teacher_ckpt", f"names unknown teachers {unknown}", f"the teachers are {sorted(self.teachers)}"
            )
        return {name: str(path) for name, path in teacher_ckpt.items() if path is not None}

    # ------------------------------------------------------------------ networks
    @property
    def teacher(self) -> nn.Module:
        """The teacher (the first one of a named collection)."""
        if not len(self.teachers):
            raise AttributeError(f"{type(self).__name__} has no teacher")
        return next(iter(self.teachers.values()))

    @property
    def network(self) -> nn.Module:
        """The trained network (the student)."""
        return self.student

    def teacher_fields(self) -> dict[str, nn.Module]:
        """The teachers by config field: ``{"teacher": net}`` for one teacher, ``{"teachers.<name>": net}`` else."""
        if list(self.teachers) == [DEFAULT_TEACHER]:
            return {"teacher": self.teacher}
        return {f"teachers.{name}": network for name, network in self.teachers.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward."""
        return self.student(*args, **kwargs)

    def load_teacher(self, path: str | Path, name: str = DEFAULT_TEACHER) -> None:
        """Load teacher ``name``'s weights from ``path`` (:func:`~kd_lightning.models.checkpoints.load_weights`)."""
        field = "model.init_args.teacher_ckpt" + ("" if len(self.teachers) == 1 else f".{name}")
        check_checkpoint_exists(path, field)
        load_weights(self.teachers[name], path, field=field, key=self.teacher_ckpt_key)

    def set_teacher_checkpoint(self, name: str, path: str | Path) -> None:
        """Load teacher ``name`` from ``path`` and record the path (``teacher_ckpt``, hyperparameters)."""
        self.load_teacher(path, name)
        paths = self._checkpoints(self.teacher_ckpt) if self.teacher_ckpt is not None else {}
        paths[name] = str(path)
        self.teacher_ckpt = paths[name] if list(self.teachers) == [DEFAULT_TEACHER] else paths
        self.hparams["teacher_ckpt"] = self.teacher_ckpt

    def train(self, mode: bool = True) -> DistillationModule:
        """Set training mode for everything but frozen teachers, which stay in eval mode."""
        super().train(mode)
        if not self.trains_teacher:
            for network in self.teachers.values():
                network.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: those that require a gradient, the teachers' excluded."""
        teacher_ids = {id(p) for p in self.teachers.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher_ids]

    def run_teacher(self, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        """A teacher's forward without autograd (frozen teachers), under ``teacher_precision``'s autocast."""
        network = self.teachers[name] if name is not None else self.teacher
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        grad = torch.enable_grad() if self.trains_teacher else torch.no_grad()
        with grad:
            if dtype is None:
                return network(*args, **kwargs)
            device = first_tensor(args) if args else first_tensor(kwargs)
            with torch.autocast(device_type=device.device.type if device is not None else "cpu", dtype=dtype):
                out = network(*args, **kwargs)
            return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out

    # ------------------------------------------------------------------ task hooks
    def inputs_of(self, batch: Any) -> Any:
        """The network inputs of a batch; by default the first element of ``(inputs, ...)`` or ``batch["input"]``."""
        if isinstance(batch, Mapping):
            return batch["input"]
        if isinstance(batch, (tuple, list)):
            return batch[0]
        return batch

    def training_loss(self, batch: Any) -> dict[str, Tensor] | tuple[Any, ...]:
        """``{"loss": total, **named terms}`` for a training batch, optionally followed by metric inputs."""
        raise NotImplementedError(f"{type(self).__name__} implements no training_loss")

    def update_train_metrics(self, batch: Any, *outputs: Any) -> None:
        """Task hook: training metrics from what :meth:`training_loss` returned after the terms."""

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        """Task hook: metrics of one validation (``stage="val"``) or test batch."""
        raise NotImplementedError(f"{type(self).__name__} implements no evaluate")

    def check_data(self, datamodule: Any) -> None:
        """Task hook: check the networks against the data module at ``setup`` (class counts, vocabularies)."""

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # Once per module (a later test of it keeps the trained student), at any stage (`kd test` without a
        # checkpoint evaluates the initial student).
        if not getattr(self, "_student_initialised", False):
            self.initialise_student()
            self._student_initialised = True
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.check_data(datamodule)  # on the plain (uncompiled) networks
        self.apply_speed_switches()

    def initialise_student(self) -> None:
        """Apply ``student_init`` (at the module's first ``setup``, before Lightning restores a resumed run's or
        ``ckpt_path``'s weights, which then win; later stages of the same module, e.g. the test after a fit, keep
        the trained student)."""
        field = "model.init_args.student_init"
        if self.student_init == "scratch":
            return
        if self.student_init != "teacher" and not self.student_init.startswith("teacher:"):
            try:  # a one-network checkpoint as it is; from a distillation checkpoint, its student
                load_weights(self.student, self.student_init, field=field, key="auto")
            except TeacherCheckpointError as err:
                if "both a student" not in str(err):
                    raise
                load_weights(self.student, self.student_init, field=field, key="student")
            return
        name = self.student_init.partition(":")[2]
        source = (self.teachers[name] if name else self.teacher).state_dict()
        # A LoRA student (peft) holds the base weights under ``.base_layer`` and adds ``lora_*`` adapters, which
        # keep their initialisation (B = 0: the adapted student starts as the teacher).
        renamed = {k.replace(".base_layer", ""): k for k in self.student.state_dict() if "lora_" not in k}
        target = {k: self.student.state_dict()[v] for k, v in renamed.items()}
        mismatch = sorted(
            set(source) ^ set(target) | {k for k in source.keys() & target.keys() if source[k].shape != target[k].shape}
        )
        if mismatch:
            raise KDConfigError(
                field,
                f"'teacher' needs the student to have the teacher's architecture, but {len(mismatch)} weights differ "
                f"(first: {mismatch[0]})",
                "build the student like the teacher, or give a student checkpoint path",
            )
        self.student.load_state_dict({renamed[k]: v for k, v in source.items()}, strict=False)

    def apply_speed_switches(self) -> None:
        """Channels-last and ``torch.compile`` (in place), once."""
        networks = [("student", self.student)] + [(f"teachers.{n}", t) for n, t in self.teachers.items()]
        if self.channels_last and not self._channels_last_hooks:
            for _, network in networks:
                network.to(memory_format=torch.channels_last)
                self._channels_last_hooks.append(network.register_forward_pre_hook(_channels_last_input))
        for field, network in networks:
            wanted = self.compile_student if field == "student" else self.compile_teacher
            if wanted and getattr(network, "_compiled_call_impl", None) is None:
                network.compile(**self.compile_options)

    # ------------------------------------------------------------------ progress and schedules
    def on_fit_start(self) -> None:
        self._total_steps = None  # recomputed for this fit by training_progress()

    def training_progress(self) -> float:
        """Fraction of training done: ``global_step / trainer.estimated_stepping_batches``, in [0, 1].

        Raises:
            KDConfigError: when the run has no finite number of optimizer steps.
        """
        fraction = self._fraction()
        if fraction is None:
            raise KDConfigError(
                "trainer.max_epochs",
                f"{type(self).__name__} schedules over the whole run and needs its number of optimizer steps",
                "set trainer.max_epochs or trainer.max_steps",
            )
        return fraction

    def _fraction(self) -> float | None:
        if self._total_steps is None:
            total = float(self.trainer.estimated_stepping_batches)
            self._total_steps = total if math.isfinite(total) and total > 0 else -1.0
        if self._total_steps <= 0:
            return None
        return min(self.global_step / self._total_steps, 1.0)

    def scheduled_losses(self) -> list[ScheduledLoss]:
        """Every submodule that follows the scheduled-loss protocol."""
        return [m for m in self.modules() if isinstance(m, ScheduledLoss)]

    def progress(self) -> Progress:
        """Where training is (for :class:`~kd_lightning.losses.schedule.ScheduledLoss`)."""
        needs_length = any(loss.needs_run_length for loss in self.scheduled_losses())
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        fraction = self._fraction() if self._trainer is not None and needs_length else None
        return Progress(
            epoch=self.current_epoch,
            step=self.global_step,
            fraction=fraction,
            max_epochs=max_epochs if max_epochs is not None and max_epochs > 0 else None,
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        scheduled = self.scheduled_losses()
        if scheduled:
            progress = self.progress()
            for loss in scheduled:
                loss.set_progress(progress)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        scheduled = self.scheduled_losses()
        if scheduled:
            progress = self.progress()
            for loss in scheduled:
                loss.step_schedule(progress)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self.training_loss(batch)
        terms, extras = (output, ()) if isinstance(output, Mapping) else (output[0], tuple(output[1:]))
        self.check_finite(terms, batch, batch_idx)
        self.log_terms("train", terms, batch_size=self.batch_size_of(batch))
        for loss in self.scheduled_losses():
            for name, value in loss.schedule_stats().items():
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        if extras:
            self.update_train_metrics(batch, *extras)
        return terms["loss"]

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a batch (the leading size of its inputs)."""
        inputs = first_tensor(self.inputs_of(batch))
        return int(inputs.shape[0]) if inputs is not None and inputs.dim() else 1

    def log_terms(self, stage: str, terms: Mapping[str, Tensor], batch_size: int) -> None:
        """Log every named term as ``<stage>/<name>`` (``loss`` on the progress bar)."""
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value.detach() if isinstance(value, Tensor) else value,
                on_step=stage == "train",
                on_epoch=True,
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=stage != "train",
            )

    def check_finite(self, terms: Mapping[str, Tensor], batch: Any, batch_idx: int) -> None:
        """Stop with a clear message when the loss is NaN/inf (every ``check_finite_every`` steps).

        Raises:
            TrainingDivergedError: naming the step, epoch, batch, the non-finite terms and NaN inputs.
        """
        every = self.check_finite_every
        if not every or self.global_step % every:
            return
        loss = terms["loss"]
        if bool(torch.isfinite(loss.detach()).all()):
            return
        bad = [
            f"{name} = {float(v.detach().float().sum())}"
            for name, v in terms.items()
            if isinstance(v, Tensor) and not bool(torch.isfinite(v.detach()).all())
        ]
        inputs = first_tensor(self.inputs_of(batch))
        if inputs is not None and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            cause = "the inputs of this batch contain NaN/inf: clean the data (the loader yields non-finite values)"
        else:
            cause = (
                "the inputs are finite: lower the learning rate, add gradient clipping (--trainer.gradient_clip_val 1) "
                "or use full precision"
            )
        raise TrainingDivergedError(
            f"train/loss: non-finite at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): "
            f"{', '.join(bad)}. {cause}."
        )

    # ------------------------------------------------------------------ evaluation and prediction
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self(self.inputs_of(batch))

    # ------------------------------------------------------------------ throughput
    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        self._epoch_samples = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_samples += self.batch_size_of(batch)

    def on_train_epoch_end(self) -> None:
        """Log ``train/samples_per_sec``: samples of all ranks / wall time of the epoch (loading included)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._epoch_started
        if elapsed > 0 and self._epoch_samples:
            rate = self._epoch_samples * self.trainer.world_size / elapsed
            self.log("train/samples_per_sec", rate, on_step=False, on_epoch=True, sync_dist=True)

    def configure_callbacks(self) -> list[Callback]:
        """Exact resume: the random states travel with every checkpoint (:class:`RandomStateCheckpoint`); expected
        Lightning warnings are muted (:class:`ExpectedWarnings`)."""
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        wanted: list[Callback] = [RandomStateCheckpoint(), ExpectedWarnings()]
        return [c for c in wanted if not any(isinstance(have, type(c)) for have in callbacks)]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        return self.build_optimizers(self.trainable_parameters())

    def build_optimizers(self, params: Any) -> Any:
        """The optimiser (and scheduler config) for ``params`` (a list of parameters or of parameter groups)."""
        optimizer = self.make_optimizer(params)
        scheduler = self.make_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def make_optimizer(self, params: Any, factory: Any = None, field: str = "model.init_args.optimizer") -> Optimizer:
        """``factory(params)`` (default: the ``optimizer`` argument), with errors naming ``field``."""
        if not params:
            raise KDConfigError(
                "model.init_args.student",
                f"{type(self).__name__} has no trainable parameters",
                "is every parameter frozen (requires_grad False)?",
            )
        try:
            optimizer = (factory or self.optimizer_factory)(params)
        except (ValueError, TypeError) as err:
            raise KDConfigError(field, " ".join(str(err).split()), "check the optimizer's init_args") from None
        if not isinstance(optimizer, Optimizer):
            raise KDConfigError(
                field,
                f"built a {type(optimizer).__name__}, not a torch.optim.Optimizer",
                "give an optimizer class_path",
            )
        return optimizer

    def make_scheduler(
        self, optimizer: Optimizer, factory: Any = None, field: str = "model.init_args.lr_scheduler"
    ) -> Any:
        """``factory(optimizer)`` (default: the ``lr_scheduler`` argument; ``None`` without one)."""
        factory = factory or self.lr_scheduler_factory
        if factory is None:
            return None
        try:
            return factory(optimizer)
        except (ValueError, TypeError) as err:
            raise KDConfigError(field, " ".join(str(err).split()), "check the scheduler's init_args") from None

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> dict[str, Any]:
        """Extra entries of the exported file (task siblings add theirs, e.g. ``num_classes``)."""
        return {}

    def export_student(self, path: str | Path) -> Path:
        """Write the student alone: ``{"state_dict", "architecture", "class_name", ...}`` via ``torch.save``.

        Loadable without kd-lightning: ``torch.load(path, weights_only=True)["state_dict"]``.
        ``architecture`` is the network's config as JSON (class path and arguments) when known.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arch = self.hparams.get("student", self.hparams.get("model"))
        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "architecture": json.dumps(arch if _is_config(arch) else str(arch), default=str),
            "class_name": type(self.student).__name__,
            **self.export_metadata(),
        }
        torch.save(payload, path)
        return path


class SingleNetwork:
    """Mixin of the tasks' supervised modules: one network (``model``, stored as ``student``) trained on the task's
    own loss, no teacher. Each task's module keeps its own ``__init__(model, label_smoothing, **kwargs)`` (explicit
    signatures for LightningCLI) and calls :meth:`set_label_smoothing`."""

    requires_teacher: ClassVar[bool] = False
    takes_teacher: ClassVar[bool] = False
    student: nn.Module

    @property
    def model(self) -> nn.Module:
        """The trained network (stored as ``student``)."""
        return self.student

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.student}

    def set_label_smoothing(self, label_smoothing: float) -> None:
        """Check ``label_smoothing`` (ε in [0, 1)) and store it.

        Raises:
            KDConfigError: outside [0, 1).
        """
        if not 0.0 <= label_smoothing < 1.0:
            raise KDConfigError("label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing


def probe_optimizer(field: str, factory: Any) -> None:
    """Build the optimizer once on a dummy parameter, so that a setting torch rejects (a negative lr, betas out
    of range) fails at construction, not after a teacher's training; other failures are left to the real build.

    Raises:
        KDConfigError: naming ``field`` and torch's complaint (``Invalid learning rate: -0.1``).
    """
    try:
        factory([nn.Parameter(torch.zeros(1))])
    except ValueError as err:
        message = " ".join(str(err).split())
        if message.startswith("Invalid"):  # torch.optim's own argument checks: "Invalid learning rate: -0.1"
            names = {"learning rate": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "beta": "betas"}
            name = next((arg for words, arg in names.items() if words in message), None)
            where = f"{field}.init_args.{name}" if name else field
            raise KDConfigError(where, message, "check the optimizer's init_args") from None
    except Exception:  # e.g. an optimizer that needs real parameters: checked when training starts
        pass


def _check_callable(field: str, value: Any, instance_type: type, example: str) -> None:
    if isinstance(value, instance_type):
        raise KDConfigError(
            field,
            f"is a built {type(value).__name__}; it must be a callable that builds one",
            f"in a config give class_path + init_args; in Python e.g. functools.partial({example}, ...)",
        )
    if not callable(value):
        raise KDConfigError(field, f"must be a callable, got {type(value).__name__}")
