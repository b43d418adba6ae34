"""The ``kd`` and ``kd-fit`` command lines: LightningCLI with kd-lightning's teacher lifecycle.

``kd fit --config configs/cifar100_pld.yaml`` (or ``kd-fit --config ...``) parses the config into a
method (``model:``), a data module (``data:``) and a ``lightning.Trainer`` (``trainer:``), all with
the stock LightningCLI semantics: ``--print_config``, dotted overrides, ``--trainer.precision``,
``--trainer.strategy ddp``. On top of it:

- ``data.num_classes`` is linked into ``model.init_args.num_classes``;
- a distillation teacher without ``teacher_ckpt`` is trained first (``teacher_training:``) and
  cached under a fingerprint of its config, the data and the training settings;
- ``--test_after_fit true`` evaluates the best checkpoint on the test split after fitting;
- the run ends with a summary: teacher and student accuracy, checkpoints and logs.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

from jsonargparse import namespace_to_dict
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

# Imported so that short class names (``class_path: PLD``, ``ResNet8x4``, ``DigitsDataModule``) resolve.
import kd_lightning.callbacks
import kd_lightning.models  # noqa: F401
from kd_lightning.data import KDDataModule
from kd_lightning.errors import DatasetChecksumError, DatasetNotFoundError, KDConfigError, TeacherCheckpointError
from kd_lightning.methods import ClassificationModule, DistillationModule
from kd_lightning.teacher_cache import TeacherTraining, data_fingerprint_config, fingerprint
from kd_lightning.teachers import check_checkpoint_exists

SUBCOMMANDS = ("fit", "validate", "test", "predict")
USER_ERRORS = (KDConfigError, DatasetNotFoundError, DatasetChecksumError, TeacherCheckpointError)


def _as_dict(value: Any) -> Any:
    try:
        return namespace_to_dict(value)
    except Exception:
        return value


class KDCLI(LightningCLI):
    """LightningCLI for kd-lightning methods (subclass mode for model and data).

    After ``fit``, ``results`` holds the final validation metrics (and the test metrics with
    ``--test_after_fit true``) and ``fit_seconds`` the wall time of ``trainer.fit`` alone
    (without training a missing teacher).
    """

    results: dict[str, float]
    fit_seconds: float

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            ClassificationModule,
            KDDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_class_arguments(TeacherTraining, "teacher_training")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, evaluate the best checkpoint (or the last weights) on the test split.",
        )

    def before_instantiate_classes(self) -> None:
        """Fail before building anything when a named teacher checkpoint does not exist."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        init_args = (config.get("model") or {}).get("init_args") or {}
        path = init_args.get("teacher_ckpt") if hasattr(init_args, "get") else None
        if path:
            check_checkpoint_exists(path, "model.init_args.teacher_ckpt")

    # ------------------------------------------------------------------ teacher lifecycle
    def before_fit(self) -> None:
        self._prepare_teacher()
        self.fit_started = time.perf_counter()

    def _prepare_teacher(self) -> None:
        model = self.model
        config = self.config[self.subcommand]
        if not isinstance(model, DistillationModule) or model.trains_teacher:
            return
        if model.teacher_ckpt is not None or config.get("ckpt_path"):
            return  # weights come from teacher_ckpt, or from the resumed checkpoint
        settings: TeacherTraining = self.config_init[self.subcommand]["teacher_training"]
        if not settings.enabled:
            rank_zero_only(print)(
                "kd: teacher_training.enabled is false and no teacher_ckpt is given: "
                "the teacher is used as constructed (e.g. pretrained weights)."
            )
            return
        teacher_config = _as_dict(config["model"]["init_args"]["teacher"])
        data_config = data_fingerprint_config(_as_dict(config["data"]))
        training_config = {
            k: v for k, v in _as_dict(config["teacher_training"]).items() if k not in ("cache_dir", "wait_seconds")
        }
        data_config["identity"] = self.datamodule.data_identity() if hasattr(self.datamodule, "data_identity") else {}
        key = fingerprint({"teacher": teacher_config, "data": data_config, "training": training_config})
        trainer_config = config["trainer"]
        path, trained_now = settings.ensure(
            model.teacher,
            self.datamodule,
            key,
            accelerator=trainer_config.get("accelerator") or "auto",
            precision=trainer_config.get("precision"),
            description={"teacher": teacher_config, "data": data_config, "training": training_config},
            progress_bar=trainer_config.get("enable_progress_bar"),
        )
        model.load_teacher(path)
        model.teacher_ckpt = str(path)
        model.hparams["teacher_ckpt"] = str(path)
        verb = "trained and cached" if trained_now else "reused cached"
        rank_zero_only(print)(f"kd: {verb} teacher {path}")

    def after_fit(self) -> None:
        trainer = self.trainer
        self.fit_seconds = time.perf_counter() - self.fit_started
        results: dict[str, Any] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1
        }
        if self.config[self.subcommand].get("test_after_fit"):
            best = self._best_checkpoint()
            tested = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            results.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
        self.results = results
        self._print_summary(results, self.trainer.log_dir)  # log_dir is a collective: every rank calls it

    def _best_checkpoint(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path
        return None

    @rank_zero_only
    def _print_summary(self, results: dict[str, Any], log_dir: str | None) -> None:
        model = self.model
        lines = ["", "kd: fit finished"]
        if isinstance(model, DistillationModule):
            meta = TeacherTraining.read_meta(Path(model.teacher_ckpt)) if model.teacher_ckpt else {}
            teacher_line = f"  teacher {type(model.teacher).__name__}: val acc {_pct(results.get('val/teacher_acc'))}"
            if "test/teacher_acc" in results:
                teacher_line += f", test acc {_pct(results['test/teacher_acc'])}"
            if meta.get("val_acc") is not None:
                teacher_line += f" (at its own training: {_pct(meta['val_acc'])})"
            lines.append(teacher_line)
            lines.append(f"  teacher checkpoint: {model.teacher_ckpt or 'as constructed'}")
        student_line = f"  {'student' if isinstance(model, DistillationModule) else 'model'} "
        student_line += f"{type(model.network).__name__}: "
        if "val/acc" not in results and "val/loss" in results:  # e.g. MAE pre-training: no classifier to score
            student_line += f"val loss {results['val/loss']:.4f}"
        else:
            student_line += f"val acc {_pct(results.get('val/acc'))}"
        if "test/acc" in results:
            student_line += f", test acc {_pct(results['test/acc'])}"
        if "val/agreement" in results:
            student_line += f", top-1 agreement with teacher {_pct(results['val/agreement'])}"
        lines.append(student_line)
        callback = self.trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            if callback.best_model_path:
                score = f"{callback.monitor}={float(callback.best_model_score):.4f}"
                lines.append(f"  best checkpoint: {callback.best_model_path} ({score})")
            if callback.last_model_path:
                lines.append(f"  last checkpoint: {callback.last_model_path}")
        lines.append(f"  logs: {log_dir}")
        print("\n".join(lines), flush=True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run(args: list[str] | None = None) -> KDCLI:
    """Run the CLI in-process (used by tests and notebooks); errors propagate as exceptions."""
    return KDCLI(args=args)


#: Commands beyond LightningCLI's: ``kd <name> ...`` runs ``module:function(argv)``.
EXTRA_COMMANDS = {
    "generations": ("kd_lightning.generations", "main"),
    "radioml-synth": ("kd_lightning.data.radioml_synth", "main"),
    "model-stats": ("kd_lightning.model_stats", "main"),
    "lm-teacher-logits": ("kd_lightning.data.teacher_logits", "main"),
}


def main(args: list[str] | None = None) -> None:
    """Entry point of ``kd``: ``kd {fit,validate,test,predict} --config ...``, plus ``EXTRA_COMMANDS``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in EXTRA_COMMANDS:
        module_name, function = EXTRA_COMMANDS[argv[0]]
        getattr(importlib.import_module(module_name), function)(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("Extra commands: " + ", ".join(f"kd {name} --help" for name in EXTRA_COMMANDS) + "\n")
    try:
        KDCLI(args=args)
    except USER_ERRORS as err:
        print(f"kd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def fit_main() -> None:
    """Entry point of ``kd-fit``: ``kd fit`` unless another subcommand is given first."""
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.argv.insert(1, "fit")
    main()


if __name__ == "__main__":  # pragma: no cover
    main()
