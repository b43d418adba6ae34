"""``kd fit`` / ``kd-fit``: LightningCLI with kd-lightning's teacher lifecycle and one-line errors.

``kd fit --config configs/cifar100_pld.yaml`` parses the config into a method (``model:``), a data module
(``data:``) and a ``lightning.Trainer`` (``trainer:``) with the stock LightningCLI semantics:
``--print_config``, dotted overrides, ``--trainer.precision``, ``--trainer.strategy ddp``. On top of it:

- a teacher without ``teacher_ckpt`` is trained first with the method's own task (``teacher_training:``)
  and cached (:mod:`kd_lightning.teachers.training`);
- ``--test_after_fit`` evaluates the best checkpoint on the validation and test splits after fitting, so
  every number of the end-of-run summary names the checkpoint it comes from;
- ``--trust_checkpoint`` is the only way to fully unpickle a checkpoint (files are read with
  ``weights_only=True`` otherwise);
- resuming (``--ckpt_path .../last.ckpt``) continues in the same log folder, with the data order of an
  uninterrupted run;
- configuration errors end as one line, ``kd: error: <field>: <problem>. <fix>`` (:func:`explain`).

The ``kd`` entry point with its extra commands is :mod:`kd_lightning.commands`; :func:`run` drives the CLI
in-process (tests, notebooks).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import pickle
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser, namespace_to_dict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# Imported so that short class names (``class_path: PLD``, ``ResNet8x4``, ``DigitsDataModule``) resolve.
import kd_lightning.callbacks
import kd_lightning.data
import kd_lightning.methods
import kd_lightning.models  # noqa: F401
from kd_lightning.callbacks.progress import EpochSummary, quiet_lightning, summaries
from kd_lightning.errors import (
    DatasetChecksumError,
    DatasetNotFoundError,
    KDConfigError,
    TeacherCheckpointError,
    TrainingDivergedError,
    last_config_error,
    one_line,
)
from kd_lightning.methods.core import DistillationModule, config_managed
from kd_lightning.models.checkpoints import TRUST_HELP, check_checkpoint_exists, read_checkpoint, trusted_checkpoints
from kd_lightning.teachers.alone import TRAINER_BUDGET_KEYS, StudentAlone
from kd_lightning.teachers.fingerprint import data_fingerprint_config, fingerprint, resolved, teacher_data
from kd_lightning.teachers.training import TeacherTraining

__all__ = ["KDCLI", "USER_ERRORS", "explain", "run"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Errors that are the user's to fix: printed as one line, exit status 2.
USER_ERRORS = (KDConfigError, DatasetNotFoundError, DatasetChecksumError, TeacherCheckpointError, TrainingDivergedError)


def _as_dict(value: Any) -> Any:
    try:
        return namespace_to_dict(value)
    except Exception:
        return value


class KDCLI(LightningCLI):
    """LightningCLI for kd-lightning methods (subclass mode for model and data).

    After ``fit``, ``results`` holds the final metrics (``val/...`` of the last epoch; with ``test_after_fit``,
    ``best/val/...`` and ``best/test/...`` of the best checkpoint, or of the last weights without one) and
    ``fit_seconds`` the wall time of ``trainer.fit`` alone (without training a missing teacher).
    """

    results: dict[str, float]
    fit_seconds: float

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.pop("parser_kwargs", {}) or {}
        parser_kwargs.setdefault("exit_on_error", False)
        for subcommand in SUBCOMMANDS:
            parser_kwargs.setdefault(subcommand, {}).setdefault("exit_on_error", False)
        with quiet_lightning():  # no "GPU available", "💡 Tip", "Seed set" lines (once per Trainer otherwise)
            super().__init__(
                DistillationModule,
                L.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                parser_kwargs=parser_kwargs,
                **kwargs,
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(TeacherTraining, "teacher_training")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, evaluate the best checkpoint (or the last weights) on the validation and test splits.",
        )
        parser.add_argument("--trust_checkpoint", type=bool, default=False, help=TRUST_HELP)
        parser.add_argument(
            "--compare_student_alone",
            type=bool,
            default=False,
            help="After fit, also train the student's network alone (the method's supervised task, same initial "
            "weights, optimizer, scheduler, Trainer budget, seed and data; best-validation checkpoint; cached under "
            "teacher_training.cache_dir) and print both results side by side (results: alone/val/..., alone/test/...).",
        )

    # ------------------------------------------------------------------ parsing and early checks
    def _subconfig(self) -> Any:
        return self.config.get(self.subcommand) if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Fail before building anything on a missing/unreadable checkpoint or a run that cannot train."""
        config = self._subconfig()
        init_args = (config.get("model") or {}).get("init_args") or {}
        paths = init_args.get("teacher_ckpt") if hasattr(init_args, "get") else None
        if isinstance(paths, str):
            check_checkpoint_exists(paths, "model.init_args.teacher_ckpt")
        elif hasattr(paths, "items"):
            for name, path in paths.items():
                if path:
                    check_checkpoint_exists(path, f"model.init_args.teacher_ckpt.{name}")
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            with trusted_checkpoints(bool(config.get("trust_checkpoint"))):
                read_checkpoint(ckpt_path, "ckpt_path")  # readable, and safe unless trusted
        trainer = config.get("trainer") or {}
        max_epochs = trainer.get("max_epochs")
        if self.subcommand == "fit":
            if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
                raise KDConfigError("trainer.max_epochs", f"must be >= 1 to train, got {max_epochs}")
            if trainer.get("max_steps") == 0:
                raise KDConfigError("trainer.max_steps", "is 0: nothing would be trained", "set it >= 1 or -1")
            if trainer.get("limit_train_batches") in (0, 0.0):
                raise KDConfigError(
                    "trainer.limit_train_batches", "is 0: nothing would be trained", "set it > 0 (1.0: every batch)"
                )
            if ckpt_path:
                self._resume_in_place(config, Path(ckpt_path))
        model_args = (config.get("model") or {}).get("init_args") or {}
        initialised = str(model_args.get("student_init") or "scratch") != "scratch"
        if self.subcommand in ("validate", "test", "predict") and not ckpt_path and not initialised:
            raise KDConfigError(
                "ckpt_path",
                f"kd {self.subcommand} evaluates trained weights, and none were given",
                "pass --ckpt_path runs/.../checkpoints/best-... .ckpt (kd fit prints it), or the start weights with "
                "--model.init_args.student_init PATH",
            )
        if config.get("optimizer") or config.get("lr_scheduler"):
            raise KDConfigError(
                "optimizer",
                "a top-level --optimizer/--lr_scheduler would silently replace the method's own",
                "set model.init_args.optimizer (and model.init_args.lr_scheduler) instead",
            )

    @staticmethod
    def _resume_in_place(config: Any, ckpt_path: Path) -> None:
        """Resuming ``<save_dir>/<name>/version_N/checkpoints/last.ckpt`` logs into ``version_N`` again."""
        logger = (config.get("trainer") or {}).get("logger")
        match = re.fullmatch(r"version_(\d+)", ckpt_path.resolve().parent.parent.name)
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if match and init_args is not None and "version" in init_args and init_args.get("version") is None:
            init_args["version"] = int(match.group(1))

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The Trainer; a setting Lightning rejects (an accelerator this machine lacks) names its ``trainer.*``."""
        try:
            return super().instantiate_trainer(**kwargs)
        except USER_ERRORS:
            raise
        except Exception as err:
            raise trainer_problem(err) or KDConfigError("trainer", one_line(str(err), 300)) from None

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand; Lightning's own argument errors at run time (a ``val_check_interval`` longer than
        the epoch) name their ``trainer.*`` field."""
        try:
            super()._run_subcommand(subcommand)
        except USER_ERRORS:
            raise
        except (ValueError, MisconfigurationException) as err:
            problem = trainer_problem(err)
            if problem is None:
                raise
            raise problem from None

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a configuration error raised in a constructor surfaces as itself."""
        last_config_error(reset=True)
        try:
            with config_managed(), trusted_checkpoints(bool(self._subconfig().get("trust_checkpoint"))):
                super().instantiate_classes()
        except USER_ERRORS:
            raise
        except Exception as err:
            cause = last_config_error(reset=True)
            if cause is not None:
                raise cause from None
            raise explain(str(err)) from None

    # ------------------------------------------------------------------ teacher lifecycle
    def before_fit(self) -> None:
        compare = self._subconfig().get("compare_student_alone") and isinstance(self.model, DistillationModule)
        self._initial_student = copy.deepcopy(self.model.student) if compare else None  # the weights it starts from
        with trusted_checkpoints(bool(self._subconfig().get("trust_checkpoint"))):
            self._prepare_teachers()
        self.fit_started = time.perf_counter()

    def _prepare_teachers(self) -> None:
        model = self.model
        config = self._subconfig()
        if not isinstance(model, DistillationModule) or model.trains_teacher or not len(model.teachers):
            return
        if config.get("ckpt_path"):
            return  # every weight comes from the resumed checkpoint
        given = model.teacher_ckpt if isinstance(model.teacher_ckpt, dict) else {}
        if isinstance(model.teacher_ckpt, str):
            return
        # A network that carries its own trained weights (``is_pretrained``: a zero-shot CLIP teacher) is not trained.
        missing = [
            name
            for name in model.teachers
            if not given.get(name) and not getattr(model.teachers[name], "is_pretrained", False)
        ]
        if not missing:
            return
        settings: TeacherTraining = self.config_init[self.subcommand]["teacher_training"]
        if not settings.enabled:
            rank_zero_only(print)(
                "kd: teacher_training.enabled is false and no teacher_ckpt is given: "
                "the teacher is used as constructed (e.g. pretrained weights)."
            )
            return
        check_before_teacher = getattr(self.datamodule, "check_before_teacher", None)
        if callable(check_before_teacher):
            check_before_teacher()
        if getattr(self.datamodule, "num_classes", None) is not None or getattr(self.datamodule, "checks_early", False):
            # Class counts, input shapes, vocabularies: checked now, not after the teacher's training.
            model.check_data(self.datamodule)
        init_args = config["model"]["init_args"]
        data_config, teacher_datamodule = teacher_data(config["data"], self.datamodule)
        training_config = {
            k: v
            for k, v in resolved(config["teacher_training"]).items()
            if k not in ("cache_dir", "wait_seconds", "enabled")
        }
        trainer_config = config["trainer"]
        for name in missing:
            field = (
                "model.init_args.teacher" if list(model.teachers) == ["teacher"] else f"model.init_args.teachers.{name}"
            )
            teacher_config = resolved(
                init_args["teacher"] if field.endswith(".teacher") else init_args["teachers"][name]
            )
            description = {
                "teacher": teacher_config,
                "task": getattr(type(model).teacher_training_module, "__name__", None),
                "data": data_config,
                "training": training_config,
            }
            key = fingerprint(description)
            path, trained_now = settings.ensure(
                type(model),
                model.teachers[name],
                teacher_datamodule,
                key,
                accelerator=trainer_config.get("accelerator") or "auto",
                precision=trainer_config.get("precision"),
                description=description,
                progress_bar=trainer_config.get("enable_progress_bar"),
                field=field,
                callbacks=[EpochSummary(prefix="teacher")] if summaries(self.trainer.callbacks) else [],
            )
            model.set_teacher_checkpoint(name, path)
            verb = "trained and cached" if trained_now else "reused cached"
            # Several processes (DDP): each says what it did, so "trained once, reused by the others" is visible.
            rank = f"[rank {self.trainer.global_rank}] " if self.trainer.world_size > 1 else ""
            print(f"kd: {rank}{verb} teacher {path}", flush=True)

    # ------------------------------------------------------------------ results
    def after_fit(self) -> None:
        trainer = self.trainer
        self.fit_seconds = time.perf_counter() - self.fit_started
        metrics = trainer.callback_metrics
        results: dict[str, Any] = {
            k: float(v) for k, v in metrics.items() if k.startswith(("val/", "train/", "rollout/")) and v.numel() == 1
        }
        results["last_epoch"] = float(trainer.current_epoch)
        if self._subconfig().get("test_after_fit"):
            best = self._best_checkpoint()
            for stage, evaluate in (("val", trainer.validate), ("test", trainer.test)):
                if stage == "test" and not _has_split(self.datamodule, "test"):
                    continue
                values = evaluate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
                results.update({f"best/{k}": float(v) for k, v in (values[0] if values else {}).items()})
                if best is None:
                    results.update(
                        {k: float(v) for k, v in (values[0] if values else {}).items() if k.startswith("test/")}
                    )
            # Keep the plain names of the test metrics too (benchmarks read them).
            results.update({k[len("best/") :]: v for k, v in list(results.items()) if k.startswith("best/test/")})
        if getattr(self, "_initial_student", None) is not None:
            results.update(self._compare_student_alone())
        self.results = results
        self._print_summary(results, self.trainer.log_dir)  # log_dir is a collective: every rank calls it

    def _compare_student_alone(self) -> dict[str, float]:
        """``alone/...`` metrics of the student's network trained alone (cached: :mod:`kd_lightning.teachers.alone`)."""
        model, trainer, config = self.model, self.trainer, self._subconfig()
        if trainer.world_size > 1 or not len(model.teachers):
            why = "runs on one device only" if trainer.world_size > 1 else "needs a distillation run (a teacher)"
            rank_zero_only(print)(f"kd: compare_student_alone skipped: it {why}.", flush=True)
            return {}
        callback = trainer.checkpoint_callback
        monitor = callback.monitor if isinstance(callback, ModelCheckpoint) else None
        mode = callback.mode if isinstance(callback, ModelCheckpoint) else "max"
        budget = {k: v for k, v in resolved(config["trainer"]).items() if k in TRAINER_BUDGET_KEYS}
        data_config = data_fingerprint_config(config["data"])
        data_config["init_args"]["meta_split"] = (resolved(config["data"]).get("init_args") or {}).get("meta_split")
        data_config["identity"] = self.datamodule.data_identity() if hasattr(self.datamodule, "data_identity") else {}
        init_args = config["model"]["init_args"]
        seed = config.get("seed_everything")
        seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        description = {
            "student": resolved(init_args["student"]),
            "task": getattr(type(model).teacher_training_module, "__name__", None),
            "data": data_config,
            "recipe": {
                "optimizer": resolved(init_args.get("optimizer")),
                "lr_scheduler": resolved(init_args.get("lr_scheduler")),
                "lr_scheduler_interval": model.lr_scheduler_interval,
                "trainer": budget,
                "monitor": monitor,
                "mode": mode,
                "seed": seed,
            },
        }
        settings: TeacherTraining = self.config_init[self.subcommand]["teacher_training"]
        metrics, path, trained_now = StudentAlone(settings.cache_dir, settings.wait_seconds).ensure(
            model,
            self._initial_student,
            self.datamodule,
            fingerprint(description),
            {**budget, "enable_progress_bar": resolved(config["trainer"]).get("enable_progress_bar")},
            seed=seed,
            monitor=monitor,
            mode=mode,
            test=_has_split(self.datamodule, "test"),
            callbacks=[EpochSummary(prefix="alone")] if summaries(trainer.callbacks) else [],
            description=description,
        )
        verb = "trained and cached" if trained_now else "reused cached"
        rank_zero_only(print)(f"kd: {verb} student alone {path}", flush=True)
        return {f"alone/{k}": v for k, v in metrics.items()}

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path
        return None

    @rank_zero_only
    def _print_summary(self, results: dict[str, Any], log_dir: str | None) -> None:
        model = self.model
        primary = _primary_metric(results)
        network = type(model.network).__name__ if isinstance(model, DistillationModule) else type(model).__name__
        role = "student" if isinstance(model, DistillationModule) and len(model.teachers) else "model"
        epochs = int(results.get("last_epoch", 0))
        lines = ["", f"kd: fit finished ({epochs} epochs, {self.fit_seconds:.1f} s)"]
        best = self._best_checkpoint()
        if any(k.startswith("best/") for k in results):
            where = f"best checkpoint (epoch {_checkpoint_epoch(best)})" if best else "last weights"
            line = f"  {role} {network}, {where}: " + _metric_line(results, "best/val/", primary, "val")
            if any(k.startswith("best/test/") for k in results):
                line += ", " + _metric_line(results, "best/test/", primary, "test")
            lines.append(line)
        lines.append(f"  {role} {network}, last epoch ({epochs - 1}): " + _metric_line(results, "val/", primary, "val"))
        if role == "student":
            prefix = "best/" if "best/val/teacher_acc" in results else ""
            names = [f"{n} {type(t).__name__}" for n, t in model.teachers.items()]
            label = f"teacher {type(model.teacher).__name__}" if len(names) == 1 else f"teachers {', '.join(names)}"
            teacher = f"  {label}: "
            teacher += _metric_line(results, f"{prefix}val/teacher_", "acc", "val")
            if f"{prefix}test/teacher_acc" in results:
                teacher += ", " + _metric_line(results, f"{prefix}test/teacher_", "acc", "test")
            ckpt = model.teacher_ckpt
            teacher += f" ({ckpt if ckpt else 'as constructed'})"
            lines.append(teacher)
        if any(k.startswith("alone/") for k in results):
            lines.append("  " + _alone_line(results, primary, network, type(model).__name__))
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and (callback.best_model_path or callback.last_model_path):
            parts = []
            if callback.best_model_path and callback.monitor is not None and callback.best_model_score is not None:
                parts.append(
                    f"best {callback.best_model_path} ({callback.monitor}={float(callback.best_model_score):.4f})"
                )
            elif callback.best_model_path:
                parts.append(f"latest {callback.best_model_path}")
            if callback.last_model_path:
                parts.append(f"last {callback.last_model_path}")
            lines.append("  checkpoints: " + ", ".join(parts))
        lines.append(f"  logs: {log_dir}")
        print("\n".join(lines), flush=True)


def _alone_line(results: dict[str, Any], primary: str, network: str, method: str) -> str:
    """``student alone SmallCNN: test acc 93.41%   distilled (VanillaKD): 95.02% (+1.61)`` (test, else val)."""
    stage = "test" if f"alone/test/{primary}" in results and f"best/test/{primary}" in results else "val"
    alone = results.get(f"alone/{stage}/{primary}")
    distilled = results.get(f"best/{stage}/{primary}", results.get(f"{stage}/{primary}"))
    scale, unit = (100.0, "%") if primary == "acc" else (1.0, "")
    text = f"student alone {network}: {stage} {primary} " + ("n/a" if alone is None else f"{scale * alone:.2f}{unit}")
    if distilled is not None:
        text += f"   distilled ({method}): {scale * distilled:.2f}{unit}"
        if alone is not None:
            text += f" ({scale * (distilled - alone):+.2f})"
    return text


def _checkpoint_epoch(path: str | None) -> str:
    """The epoch stored in a Lightning checkpoint (``?`` when it cannot be read)."""
    if not path:
        return "?"
    try:
        import torch

        return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", "?"))
    except Exception:
        return "?"


def _has_split(datamodule: Any, stage: str) -> bool:
    if datamodule is None:
        return False
    method = getattr(type(datamodule), f"{stage}_dataloader", None)
    if method is None or method is getattr(L.LightningDataModule, f"{stage}_dataloader", None):
        return False
    if getattr(datamodule, f"{stage}_set", True) is not None:
        return True
    datamodule.setup(stage)  # data modules that build their test split only for the "test" stage (COCO, Cityscapes)
    return getattr(datamodule, f"{stage}_set", None) is not None


def _primary_metric(results: dict[str, Any]) -> str:
    """The metric the summary leads with: verifier pass@1, episode success, accuracy, box mAP, mIoU, nDCG@10 or FID
    when there is one, else perplexity, else the loss."""
    for name in ("pass@1", "success", "acc", "map", "miou", "ndcg10", "fid", "ppl", "loss"):
        if any(k.endswith("/" + name) for k in results):
            return name
    return "loss"


def _metric_line(results: dict[str, Any], prefix: str, primary: str, label: str = "val") -> str:
    value = results.get(prefix + primary)
    percent = primary in ("pass@1", "success", "acc", "map", "miou", "ndcg10")
    text = f"{label} {primary} " + (_pct(value) if percent else ("n/a" if value is None else f"{value:.4f}"))
    agreement = results.get(prefix + "agreement")
    if agreement is not None and "teacher_" not in prefix:
        text += f", agreement with teacher {_pct(agreement)}"
    return text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run(args: list[str] | None = None) -> KDCLI:
    """Run the CLI in-process (used by tests and notebooks); errors propagate as exceptions."""
    return KDCLI(args=args)


# ---------------------------------------------------------------------------------------------- errors
def explain(message: str) -> KDConfigError:
    """Turn a jsonargparse/LightningCLI parse error into one ``<field>: <problem>. <fix>`` line.

    Recognises unknown options (with ``did you mean`` suggestions from the class's accepted arguments),
    unknown classes (listing what kd-lightning ships for that slot), wrong value types and unrecognised
    command-line flags; anything else is condensed to its most specific line.
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    path = _error_path(lines)
    text = "\n".join(lines)
    match = re.search(r"Option '([^']+)' is not accepted|Key \"([^\"]+)\" is not expected", text)
    if match:
        name = match.group(1) or match.group(2)
        owner = _last_class(lines)
        choices = _accepted_arguments(owner) if owner is not None else []
        hint = _did_you_mean(name, choices) or (
            f"{owner.__name__} accepts {', '.join(choices[:12])}"
            if owner is not None and choices
            else "see kd fit --help"
        )
        where = f"{path}.init_args.{name}" if path else name
        return KDConfigError(where, f"unknown option{f' of {owner.__name__}' if owner else ''}", hint)
    match = re.search(r"Expected a dot import path string: (\S+)|Import path (\S+) does not", text)
    if match:
        name = (match.group(1) or match.group(2)).strip("'\"")
        known = _known_classes(path)
        hint = _did_you_mean(name.split(".")[-1], known) or ""
        listing = _shipped(path, known) if known else "give a full import path"
        return KDConfigError(path or "class_path", f"unknown class {name!r}", f"{hint + '; ' if hint else ''}{listing}")
    match = re.search(r"unrecognized arguments: (.+)", text)
    if match:
        flag = match.group(1).split()[0].split("=")[0].lstrip("-")
        owner, _, name = flag.rpartition(".")
        hint = _did_you_mean(name, _known_options(owner))
        if not hint and not owner:  # --epochs: perhaps a Trainer option
            close = _did_you_mean(name, _known_options("trainer"))
            hint = re.sub(r"'(\w+)'", r"'trainer.\1'", close)
        return KDConfigError(flag, "unknown command-line option", hint or "run kd fit --help for the options")
    match = re.search(r"Expected a typing\.Literal\[(.+?)\]\. Got value: (.+)", text)
    if match:
        return KDConfigError(path or "value", f"must be one of {match.group(1)}, got {match.group(2).strip()!r}")
    match = re.search(r"Expected '([^']+)' to be a subclass of <class '([^']+)'>", text)
    if match:
        example = {"Optimizer": "torch.optim.SGD", "LRScheduler": "torch.optim.lr_scheduler.StepLR"}.get(match.group(2))
        return KDConfigError(
            path or "class_path",
            f"{match.group(1)} is not a subclass of {match.group(2)}",
            f"give the class_path of a subclass of {match.group(2)}" + (f", such as {example}" if example else ""),
        )
    given = re.search(r"Given value: (.+)", text)
    expected = [t for t in re.findall(r"- Expected a <class '([^']+)'>", text) if t != "NoneType"]
    literals = re.findall(r"- Expected a typing\.Literal\[(.+?)\]\n", text + "\n")
    expected += [f"one of {', '.join(literals)}"] if literals else []
    if given and expected and "Problem with given class_path" not in text:
        nullable = " or null" if "- Expected a <class 'NoneType'>" in text else ""
        return KDConfigError(path or "value", f"expected {' or '.join(expected)}{nullable}, got {given.group(1)!r}")
    match = re.search(r"Expected a (<class '([^']+)'>|[^.]+?)\. Got value: (.+)", text)
    if match:
        wanted = match.group(2) or match.group(1)
        return KDConfigError(path or "value", f"expected {wanted}, got {match.group(3)!r}")
    match = re.search(r"(?:Not a valid path|not accessible or invalid|does not exist)[^\n]*", text)
    if match:
        return KDConfigError(
            path or "config",
            one_line(match.group(0), 200),
            "check the path (a relative one starts at the working folder)",
        )
    match = re.search(r"Problems parsing config: (.+)", text, flags=re.DOTALL)
    if match:
        where = re.findall(r"line (\d+), column (\d+)", text)
        at = f" at line {where[-1][0]}, column {where[-1][1]}" if where else ""
        problem = one_line(match.group(1).splitlines()[0], 120)
        return KDConfigError(path or "config", f"is not valid YAML ({problem}{at})", "fix the YAML syntax")
    specific = [
        ln
        for ln in lines
        if not ln.startswith(
            ("Parser key", "Given value", "Subtypes", "Errors", "- Expected a <class 'NoneType'>", "Does not validate")
        )
    ]
    return KDConfigError(path or "config", one_line(specific[-1] if specific else text, 300), "see kd fit --help")


def _error_path(lines: list[str]) -> str:
    parts: list[str] = []
    for line in lines:
        match = re.match(r'(?:error: )?Parser key "([^"]+)"', line)
        if match:
            key = match.group(1)
            parts.append(key if not parts else f"init_args.{key}")
    return ".".join(parts)


def _last_class(lines: list[str]) -> type | None:
    for line in reversed(lines):
        match = re.search(r"Problem with given class_path '([^']+)'", line)
        if match:
            return _import(match.group(1))
    return None


def _import(path: str) -> type | None:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def _accepted_arguments(cls: type) -> list[str]:
    """Init arguments ``cls`` accepts, its parents' passed through ``**kwargs`` included."""
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
        names = {key.split(".")[0] for key in namespace_to_dict(parser.get_defaults())}
        return sorted(names)
    except Exception:
        names = set()
        for klass in inspect.getmro(cls):
            init = klass.__dict__.get("__init__")
            if init is not None:
                names.update(p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs"))
        return sorted(names)


def _known_options(owner: str) -> list[str]:
    """Options under ``owner`` (``""``: the top level, ``trainer``, ``teacher_training``) for suggestions."""
    if owner == "":
        return [
            "config",
            "seed_everything",
            "trainer",
            "model",
            "data",
            "teacher_training",
            "test_after_fit",
            "trust_checkpoint",
            "ckpt_path",
            "print_config",
        ]
    cls = {"trainer": L.Trainer, "teacher_training": TeacherTraining}.get(owner)
    return _accepted_arguments(cls) if cls is not None else []


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else ""


#: Classes named first when the whole list of a slot is too long for one line.
_FEATURED = {
    "model": ("VanillaKD", "DKD", "LogitStandardKD", "PLD", "FitNet", "AT", "RKD", "CRD", "EnsembleKD", "Supervised"),
    "data": ("DigitsDataModule", "CIFAR100DataModule", "ImageNetDataModule", "COCODetectionDataModule"),
    "networks": ("SmallCNN", "MLP", "ResNet8x4", "ResNet32x4", "WRN40_2", "MobileNetV2", "ShuffleNetV1"),
}
#: Longest list of names (characters) a message spells out in full.
_LISTED_CHARS = 300


def _shipped(path: str, known: list[str]) -> str:
    """What kd-lightning ships for a config slot, within one line: every name, or a few and where to list all."""
    if len(", ".join(known)) <= _LISTED_CHARS:
        return f"kd-lightning ships {', '.join(known)}"
    featured = [n for n in _FEATURED.get(path if path in ("model", "data") else "networks", ()) if n in known]
    featured = featured or known[:12]
    module = {"model": "methods", "data": "data"}.get(path, "models")
    return (
        f"kd-lightning ships {len(known)} classes here, e.g. {', '.join(featured)} "
        f"(all: python -c 'import kd_lightning.{module} as m; print(m.__all__)')"
    )


def _known_classes(path: str) -> list[str]:
    """Short names kd-lightning registers for a config slot: methods, data modules or networks."""
    import kd_lightning.data as data
    import kd_lightning.methods as methods
    import kd_lightning.models as models

    if path == "model":
        return sorted(methods.__all__)
    if path == "data":
        return sorted(n for n in data.__all__ if n.endswith("DataModule"))
    from torch import nn

    networks = [getattr(models, n, None) for n in models.__all__]
    return sorted(c.__name__ for c in networks if isinstance(c, type) and issubclass(c, nn.Module))


def trainer_problem(err: BaseException) -> KDConfigError | None:
    """A Lightning error that names a Trainer argument (```val_check_interval```) as ``trainer.<name>: ...``."""
    message = one_line(str(err), 400)
    names = set(inspect.signature(L.Trainer.__init__).parameters)
    named = [n for n in re.findall(r"`(\w+)`", message) if n in names]
    if not named and re.search(r"accelerator|gpu backend", message, flags=re.IGNORECASE):
        named = ["accelerator"]
    if not named:
        return None
    fix = "use accelerator auto or cpu" if named[0] == "accelerator" else "see kd fit --help"
    strategy = re.search(r"strategy `(\w+)` requires a GPU", message)
    if strategy:
        named[0] = "strategy"
        fix = (
            f"{strategy.group(1)} needs CUDA GPUs: use trainer.strategy ddp on CPU, or run on GPUs "
            "(configs/fragments/fsdp.yaml for FSDP)"
        )
    return KDConfigError(f"trainer.{named[0]}", message, fix)


def checkpoint_problem(err: BaseException) -> KDConfigError | None:
    """A one-line error for an unpickling failure of ``ckpt_path`` (Lightning loads it itself)."""
    if isinstance(err, pickle.UnpicklingError):
        return KDConfigError(
            "ckpt_path", one_line(str(err), 200), "pass --trust_checkpoint true only for your own files"
        )
    return None
