"""Bad inputs a new user would try, each run through the real ``kd`` entry point (in-process).

Every case must end as exactly one line ``kd: error: <field>: <problem>. <fix>`` on stderr with exit status 2,
no traceback. The same case list writes ``docs/bad_inputs.md`` (``python -m tests.cli.test_bad_inputs --write``);
a test checks that every message there is the one the CLI prints today, so the table cannot drift.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kd_lightning.commands import main
from tests.helpers.cli import CONFIGS_DIR, REPO, TINY_DIGITS
from tests.helpers.retrieval_data import write_beir

DOC = REPO / "docs" / "bad_inputs.md"
MARKER = "pwned-marker.txt"


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: short name (pytest id).
        did: what the user did, in words (first column of the table).
        argv: the ``kd`` arguments; ``{configs}`` is the repo's configs folder, ``{tmp}`` the working folder.
        field: what the message starts with after ``kd: error: `` (the config field).
        words: words the message must contain (a suggestion, the list of choices, the fix).
        tiny: a ``kd fit`` case: append the tiny-run flags and the shared teacher cache.
        files: ``{name: writer}``: files written into the working folder first (``writer(path)``).
        no_network: CIFAR downloads fail as without network.
        seconds: the case must fail within this many seconds (fail-fast checks).
        after: a check of the working folder once the case has run (``after(tmp)`` asserts).
    """

    id: str
    did: str
    argv: tuple[str, ...]
    field: str
    words: tuple[str, ...] = ()
    tiny: bool = True
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    no_network: bool = False
    seconds: float | None = None
    after: Callable[[Path], None] | None = None


#: The digits Vanilla KD recipe (offline data, a teacher trained if missing): the base of most ``kd fit`` cases.
QS = ("fit", "--config", "{configs}/digits_kd.yaml")


def _config(name: str) -> tuple[str, ...]:
    return ("fit", "--config", "{configs}/" + name)


# ---------------------------------------------------------------------------------------------- file writers
def _write_text(path: Path) -> None:
    path.write_text("these are my notes, not weights\n")


def _write_truncated(path: Path) -> None:
    import io

    from kd_lightning.models import SmallCNN

    buffer = io.BytesIO()
    torch.save(SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=10).state_dict(), buffer)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])


def _write_pickle_payload(path: Path) -> None:
    # torch.save pickles the object: a full (unsafe) torch.load writes MARKER into the working folder.
    import builtins

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str, ...]]:
            return (builtins.exec, (f"open({MARKER!r}, 'w').write('x')",))

    torch.save({"state_dict": {}, "payload": Evil()}, path)


def _no_marker(tmp: Path) -> None:
    assert not (tmp / MARKER).exists(), "the checkpoint's payload ran"


def _no_cache_entry(tmp: Path) -> None:
    entries = list((tmp / "teachers").glob("*")) if (tmp / "teachers").is_dir() else []
    assert not [e for e in entries if e.is_dir()], f"a failed teacher training left {entries}"


def _write_other_network(path: Path) -> None:
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)


def _write_config_typo(path: Path) -> None:
    path.write_text("model:\n  init_args:\n    temprature: 2.0\n")


def _write_not_yaml(path: Path) -> None:
    path.write_text("model: [unclosed\n  init_args: {\n")


def _write_scenes(path: Path) -> None:
    from kd_lightning.data.digit_scenes import make_scenes

    make_scenes(path, seed=0, train=4, val=2)


def _write_scenes_without_gtfine(path: Path) -> None:
    import shutil

    _write_scenes(path)
    shutil.rmtree(path / "cityscapes" / "gtFine")


def _write_scenes_with_bad_label(path: Path) -> None:
    import numpy as np
    from PIL import Image

    _write_scenes(path)
    label = sorted((path / "cityscapes" / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))[0]
    Image.fromarray(np.full((96, 96), 40, dtype=np.uint8)).save(label)


def _write_scenes_with_broken_image(path: Path) -> None:
    _write_scenes(path)
    sorted((path / "coco" / "train").glob("*.png"))[0].write_bytes(b"not a png")


#: The digit-scenes detection and segmentation recipes (tiny generated scenes are written into the working folder).
DET = ("fit", "--config", "{configs}/digitscenes_det_cwd.yaml", "--data.init_args.root={tmp}/scenes/coco")
SEG = ("fit", "--config", "{configs}/digitscenes_seg_student.yaml", "--data.init_args.root={tmp}/scenes/cityscapes")
ACAM = ("fit", "--config", "{configs}/digitscenes_det_acam_kd.yaml", "--data.init_args.root={tmp}/scenes/coco")
DETR = ("fit", "--config", "{configs}/digitscenes_detr_clockdistill.yaml", "--data.init_args.root={tmp}/scenes/coco")
#: The semi-supervised digits recipe.
SEMI = ("fit", "--config", "{configs}/digits_semi_kd.yaml")


def _reasoning_without_answers(path: Path) -> None:
    path.write_text('{"prompt": "Reverse abc.", "solution": "c b a"}\n')


def _hf_pair_config(tokenizer_b: dict[str, str | None]) -> Callable[[Path], None]:
    """A config distilling between two tiny HF llamas whose tokenizers differ as ``tokenizer_b`` says."""

    def write(path: Path) -> None:
        from tests.helpers.tiny_hf import TINY_LLAMA, WORDS, make_tokenizer

        root = path.parent
        make_tokenizer(root / "tok_student")
        make_tokenizer(
            root / "tok_teacher", words=tokenizer_b.get("words") or WORDS, chat_template=tokenizer_b.get("chat")
        )
        (root / "text").mkdir(exist_ok=True)
        for name in "abcd":
            (root / "text" / f"{name}.txt").write_text(" ".join(WORDS * 20))
        lm = "{{class_path: HFCausalLM, init_args: {{config: {config}, tokenizer: {tok}}}}}"
        path.write_text(
            "model:\n  class_path: LMDistill\n  init_args:\n"
            f"    student: {lm.format(config=dict(TINY_LLAMA), tok=root / 'tok_student')}\n"
            f"    teacher: {lm.format(config=dict(TINY_LLAMA), tok=root / 'tok_teacher')}\n"
            "teacher_training: {enabled: false}\n"
            "data:\n  class_path: TextDataModule\n"
            f"  init_args: {{source: files, paths: [{root / 'text'}], tokenizer: {root / 'tok_student'}, "
            "block_size: 16, batch_size: 2, num_workers: 0}\n"
        )

    return write


def _vlm_pair_config(path: Path) -> None:
    """A config distilling between two VLMs whose (tiny HF) language models have different tokenizers."""
    from tests.helpers.tiny_hf import TINY_LLAMA, make_tokenizer

    root = path.parent
    make_tokenizer(root / "tok_student")
    make_tokenizer(root / "tok_teacher", words=["the", "cat", "woke"])
    vision = "{class_path: DigitPatchEncoder, init_args: {channels: [4, 8]}}"
    lm = "{{class_path: HFCausalLM, init_args: {{config: {config}, tokenizer: {tok}}}}}"
    vlm = "{{class_path: VisionLanguageModel, init_args: {{vision: {vision}, language: {lm}}}}}"
    student = vlm.format(vision=vision, lm=lm.format(config=dict(TINY_LLAMA), tok=root / "tok_student"))
    teacher = vlm.format(vision=vision, lm=lm.format(config=dict(TINY_LLAMA), tok=root / "tok_teacher"))
    path.write_text(
        f"model:\n  class_path: VLMTokenKD\n  init_args:\n    student: {student}\n    teacher: {teacher}\n"
        "teacher_training: {enabled: false}\n"
        "data:\n  class_path: DigitVQADataModule\n"
        f"  init_args: {{tokenizer: {root / 'tok_student'}, num_train: 8, num_val: 4, num_test: 4, num_workers: 0}}\n"
    )


def _beir_with_unknown_id(folder: Path) -> None:
    """A tiny BEIR folder whose dev qrels name a document the corpus lacks."""
    write_beir(folder, extra_dev_lines=["q24\td99\t1"])


def _idf_of_another_tokenizer(path: Path) -> None:
    path.write_text('{"[CLS]": 0.0, "zebrafish": 7.1, "##ology": 3.2, "the": 0.4}')


#: The VQA configs pretrain their vision towers at construction; cases that fail at setup skip it.
_NO_VISION_PRETRAINING = (
    "--model.init_args.student.init_args.vision.init_args.pretrain_steps=0",
    "--model.init_args.teacher.init_args.vision.init_args.pretrain_steps=0",
)

# ---------------------------------------------------------------------------------------------- the cases
CASES: list[Case] = [
    # --- names: typos, unknown classes and options
    Case(
        "typo-key",
        "mistyped an init argument on the command line",
        (*QS, "--model.init_args.temprature=2"),
        "model.init_args.temprature:",
        ("did you mean 'temperature'?",),
    ),
    Case(
        "typo-key-in-yaml",
        "mistyped an init argument in their own config file (`model: {init_args: {temprature: 2.0}}`)",
        (*QS, "--config", "{tmp}/mine.yaml"),
        "model.init_args.temprature:",
        ("did you mean 'temperature'?",),
        files={"mine.yaml": _write_config_typo},
    ),
    Case(
        "typo-trainer-key",
        "mistyped a Trainer option",
        (*QS, "--trainer.max_epocs=3"),
        "trainer.max_epocs:",
        ("did you mean 'max_epochs'",),
    ),
    Case(
        "unknown-method",
        "mistyped the method's class name",
        (*QS, "--model=VanilaKD"),
        "model: unknown class 'VanilaKD'",
        ("did you mean 'VanillaKD'?", "DKD", "FitNet"),
    ),
    Case(
        "unknown-network",
        "named a network that does not exist",
        (*QS, "--model.init_args.student=NotAModel"),
        "model.init_args.student: unknown class 'NotAModel'",
        ("SmallCNN",),
    ),
    Case(
        "unknown-data",
        "mistyped the data module's class name",
        (*QS, "--data=DigitDataModule"),
        "data: unknown class 'DigitDataModule'",
        ("did you mean 'DigitsDataModule'",),
    ),
    Case(
        "typo-network-key",
        "mistyped an init argument of the student network",
        (*QS, "--model.init_args.student.init_args.widht=[8,16]"),
        "model.init_args.student.init_args.widht:",
        ("did you mean 'widths'?",),
    ),
    Case(
        "unknown-flag",
        "passed a flag kd does not have",
        (*QS, "--epochs=3"),
        "epochs:",
        ("unknown",),
    ),
    Case(
        "unknown-command",
        "mistyped the subcommand",
        ("fitt", "--config", "{configs}/digits_kd.yaml"),
        "command: unknown command 'fitt'",
        ("did you mean 'fit'?", "radioml-synth"),
        tiny=False,
    ),
    Case(
        "missing-config",
        "gave a config file that does not exist",
        ("fit", "--config", "{tmp}/no_such.yaml"),
        "config:",
        ("no_such.yaml",),
        tiny=False,
    ),
    Case(
        "config-not-yaml",
        "gave a config file that is not valid YAML (a bracket left open)",
        ("fit", "--config", "{tmp}/broken.yaml"),
        "config:",
        ("broken.yaml",),
        tiny=False,
        files={"broken.yaml": _write_not_yaml},
    ),
    # --- types and ranges
    Case(
        "temperature-type",
        "gave a word where a number belongs",
        (*QS, "--model.init_args.temperature=hot"),
        "model.init_args.temperature:",
        ("float", "hot"),
    ),
    Case(
        "max-epochs-type",
        "gave a word as the epoch count",
        (*QS, "--trainer.max_epochs=many"),
        "trainer.max_epochs:",
        ("many",),
    ),
    Case(
        "temperature-zero",
        "set the temperature to 0",
        (*QS, "--model.init_args.temperature=0"),
        "model.init_args.temperature:",
        ("> 0",),
    ),
    Case(
        "temperature-negative",
        "set a negative temperature",
        (*QS, "--model.init_args.temperature=-4"),
        "model.init_args.temperature:",
        ("> 0", "-4"),
    ),
    Case(
        "ce-weight-negative",
        "set a negative loss weight (ce_weight)",
        (*QS, "--model.init_args.ce_weight=-0.1"),
        "model.init_args.ce_weight:",
        (">= 0",),
    ),
    Case(
        "kd-weight-negative",
        "set a negative loss weight (kd_weight)",
        (*QS, "--model.init_args.kd_weight=-1"),
        "model.init_args.kd_weight:",
        (">= 0",),
    ),
    Case(
        "dkd-beta-negative",
        "set DKD's beta negative",
        (*_config("digits_dkd.yaml"), "--model.init_args.beta=-8"),
        "model.init_args.beta:",
        (">= 0",),
    ),
    Case(
        "seed-type",
        "gave a word as the seed",
        (*QS, "--seed_everything=lucky"),
        "seed_everything:",
        ("lucky",),
    ),
    Case(
        "num-workers-negative",
        "set a negative number of loader workers",
        (*QS, "--data.init_args.num_workers=-1"),
        "data.init_args.num_workers:",
        (">= 0",),
    ),
    Case(
        "accelerator",
        "asked for an accelerator this machine does not have",
        (*QS, "--trainer.accelerator=mps"),
        "trainer.accelerator:",
        ("MPS", "auto or cpu"),
    ),
    Case(
        "precision",
        "asked for a precision Lightning does not know",
        (*QS, "--trainer.precision=13"),
        "trainer.precision:",
        ("13",),
    ),
    Case(
        "ckpt-key",
        "gave teacher_ckpt_key a value it does not take",
        (*QS, "--model.init_args.teacher_ckpt_key=best"),
        "model.init_args.teacher_ckpt_key:",
        ("auto", "student", "teacher"),
    ),
    Case(
        "optimizer-not-optimizer",
        "gave a network class as the optimizer",
        (*QS, "--model.init_args.optimizer=torch.nn.Linear"),
        "model.init_args.optimizer",
        ("Linear",),
    ),
    Case(
        "max-epochs-zero",
        "asked for 0 epochs",
        (*QS, "--trainer.max_epochs=0"),
        "trainer.max_epochs:",
        (">= 1",),
    ),
    Case(
        "max-steps-zero",
        "asked for 0 steps",
        (*QS, "--trainer.max_steps=0"),
        "trainer.max_steps:",
        ("0",),
    ),
    Case(
        "no-train-batches",
        "set limit_train_batches to 0 (nothing would train)",
        (*QS, "--trainer.limit_train_batches=0"),
        "trainer.limit_train_batches:",
        ("nothing",),
    ),
    Case(
        "val-check-interval",
        "asked to validate every 50 batches in an epoch of 2",
        (*QS, "--trainer.val_check_interval=50", "--teacher_training.enabled=false"),
        "trainer.val_check_interval:",
        ("50",),
    ),
    Case(
        "batch-size-zero",
        "set the batch size to 0",
        (*QS, "--data.init_args.batch_size=0"),
        "data.init_args.batch_size:",
        (">= 1",),
    ),
    Case(
        "eval-batch-size-negative",
        "set a negative evaluation batch size",
        (*QS, "--data.init_args.eval_batch_size=-2"),
        "data.init_args.eval_batch_size:",
        (">= 1",),
    ),
    Case(
        "val-fraction-zero",
        "set val_fraction to 0",
        (*QS, "--data.init_args.val_fraction=0"),
        "data.init_args.val_fraction:",
        ("(0, 1)",),
    ),
    Case(
        "fractions-sum",
        "asked for more than the whole set in validation + test",
        (*QS, "--data.init_args.val_fraction=0.6", "--data.init_args.test_fraction=0.5"),
        "data.init_args.val_fraction:",
        ("sum",),
    ),
    Case(
        "meta-split",
        "set meta_split above 1",
        (*QS, "--data.init_args.meta_split=1.5"),
        "data.init_args.meta_split:",
        ("[0, 1)",),
    ),
    Case(
        "label-smoothing",
        "set label_smoothing to 1.5",
        (*_config("digits_student.yaml"), "--model.init_args.label_smoothing=1.5"),
        "model.init_args.label_smoothing:",
        ("[0, 1)",),
    ),
    Case(
        "teacher-label-smoothing",
        "set the teacher's label_smoothing negative",
        (*QS, "--teacher_training.label_smoothing=-0.1"),
        "teacher_training.label_smoothing:",
        ("[0, 1)",),
    ),
    Case(
        "lr-negative",
        "set a negative learning rate",
        (*QS, "--model.init_args.optimizer.init_args.lr=-0.003"),
        "model.init_args.optimizer.init_args.lr:",
        ("Invalid learning rate: -0.003",),
    ),
    Case(
        "scheduler-interval",
        "set lr_scheduler_interval to an unknown value",
        (*QS, "--model.init_args.lr_scheduler_interval=batch"),
        "model.init_args.lr_scheduler_interval:",
        ("epoch", "step"),
    ),
    Case(
        "top-level-optimizer",
        "gave a top-level --optimizer (it would replace the method's own)",
        (*QS, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.1"),
        "optimizer:",
        ("model.init_args.optimizer",),
    ),
    # --- networks against data
    Case(
        "student-classes",
        "built the student for 7 classes on 10-class data",
        (*QS, "--model.init_args.student.init_args.num_classes=7"),
        "model.init_args.student:",
        ("7 classes", "10"),
    ),
    Case(
        "teacher-classes",
        "built the teacher for 100 classes on 10-class data",
        (*QS, "--model.init_args.teacher.init_args.num_classes=100"),
        "model.init_args.teacher:",
        ("100 classes", "10"),
    ),
    Case(
        "input-channels",
        "built the student for 3-channel images on 1-channel digits",
        (*QS, "--model.init_args.student.init_args.in_channels=3"),
        "model.init_args.student:",
        ("channels",),
    ),
    Case(
        "fitnet-tap",
        "named a FitNet layer the student does not have",
        (*_config("digits_fitnet.yaml"), "--model.init_args.student_layers=[blocks.7]"),
        "model.init_args.student_layers:",
        ("blocks.7", "blocks.0"),
    ),
    Case(
        "dkd-one-hot",
        "ran DKD on data with one-hot targets",
        (
            *_config("digits_dkd.yaml"),
            "--data=tests.helpers.bad_data.OneHotDigitsDataModule",
            "--teacher_training.enabled=false",
        ),
        "data:",
        ("class indices", "argmax"),
    ),
    Case(
        "vocab-mismatch",
        "built the LM student with another vocabulary than the data's",
        (
            *_config("lm_stdlib_fkl.yaml"),
            "--model.init_args.teacher_ckpt=null",
            "--teacher_training.enabled=false",
            "--model.init_args.student.init_args.vocab_size=200",
            "--data.init_args.max_bytes=20000",
            "--trainer.val_check_interval=1",
        ),
        "model.init_args.student:",
        ("200", "264"),
    ),
    Case(
        "nan-inputs",
        "trained on data that contains NaN",
        (*_config("digits_student.yaml"), "--data=tests.helpers.bad_data.NaNDigitsDataModule"),
        "train/loss: non-finite at step 0",
        ("batch 0", "inputs", "NaN"),
    ),
    # --- checkpoints
    Case(
        "teacher-ckpt-missing",
        "gave a teacher checkpoint that does not exist",
        (*QS, "--model.init_args.teacher_ckpt=runs/teacher.ckpt"),
        "model.init_args.teacher_ckpt:",
        ("runs/teacher.ckpt",),
    ),
    Case(
        "teacher-ckpt-text",
        "gave a text file as the teacher checkpoint",
        (*QS, "--model.init_args.teacher_ckpt={tmp}/notes.ckpt"),
        "model.init_args.teacher_ckpt:",
        ("not a checkpoint",),
        files={"notes.ckpt": _write_text},
    ),
    Case(
        "teacher-ckpt-truncated",
        "gave a truncated file as the teacher checkpoint",
        (*QS, "--model.init_args.teacher_ckpt={tmp}/cut.ckpt"),
        "model.init_args.teacher_ckpt:",
        ("not a checkpoint",),
        files={"cut.ckpt": _write_truncated},
    ),
    Case(
        "teacher-ckpt-pickle",
        "gave a checkpoint that would run code when unpickled",
        (*QS, "--model.init_args.teacher_ckpt={tmp}/evil.ckpt"),
        "model.init_args.teacher_ckpt:",
        ("--trust_checkpoint",),
        files={"evil.ckpt": _write_pickle_payload},
        after=_no_marker,
    ),
    Case(
        "teacher-ckpt-other-network",
        "gave the checkpoint of another network as the teacher's",
        (*QS, "--model.init_args.teacher_ckpt={tmp}/linear.pt"),
        "model.init_args.teacher_ckpt:",
        ("SmallCNN",),
        files={"linear.pt": _write_other_network},
    ),
    Case(
        "resume-missing",
        "resumed from a checkpoint that does not exist",
        (*QS, "--ckpt_path=runs/last.ckpt"),
        "ckpt_path:",
        ("runs/last.ckpt",),
    ),
    Case(
        "test-no-ckpt",
        "ran kd test without a checkpoint",
        ("test", "--config", "{configs}/digits_kd.yaml"),
        "ckpt_path:",
        ("kd test", "--ckpt_path"),
        tiny=False,
    ),
    Case(
        "validate-no-ckpt",
        "ran kd validate without a checkpoint",
        ("validate", "--config", "{configs}/digits_kd.yaml"),
        "ckpt_path:",
        ("kd validate", "--ckpt_path"),
        tiny=False,
    ),
    # --- data on disk
    Case(
        "cifar-missing",
        "ran a CIFAR-10 run without the data",
        (*QS, "--data=CIFAR10DataModule", "--data.init_args.root={tmp}/data", "--teacher_training.enabled=false"),
        "data.init_args.root:",
        ("<tmp>/data", "data_batch_1", "--data.init_args.download true"),
    ),
    Case(
        "cifar-no-network",
        "asked for a CIFAR-10 download without network",
        (
            *QS,
            "--data=CIFAR10DataModule",
            "--data.init_args.root={tmp}/data",
            "--data.init_args.download=true",
            "--teacher_training.enabled=false",
        ),
        "data.init_args.download:",
        ("data_batch_1", "cifar-10-python.tar.gz", "<tmp>/data", "machine with internet"),
        no_network=True,
    ),
    Case(
        "tokenizer-path",
        "gave a local tokenizer folder that does not exist",
        (*_config("lm_stdlib_student.yaml"), "--data.init_args.tokenizer=./tokenizers/mine"),
        "data.init_args.tokenizer: no tokenizer folder at <tmp>/tokenizers/mine",
        ("tokenizer.json",),
        seconds=5.0,
    ),
    Case(
        "tokenizer-offline",
        "named a Hugging Face tokenizer that is not in the local cache, with local_files_only",
        (
            *_config("lm_stdlib_student.yaml"),
            "--data.init_args.tokenizer=nobody/no-such-tokenizer",
            "--data.init_args.local_files_only=true",
        ),
        "data.init_args.tokenizer:",
        ("nobody/no-such-tokenizer", "local_files_only"),
        seconds=10.0,
    ),
    # --- the teacher's own training
    Case(
        "teacher-lr-negative",
        "set a negative learning rate for the teacher's training",
        (*QS, "--teacher_training.optimizer.init_args.lr=-0.003", "--teacher_training.cache_dir={tmp}/teachers"),
        "teacher_training.optimizer.init_args.lr:",
        ("Invalid learning rate: -0.003",),
    ),
    Case(
        "teacher-nan",
        "let kd fit train the teacher on data that contains NaN",
        (*QS, "--data=tests.helpers.bad_data.NaNDigitsDataModule", "--teacher_training.cache_dir={tmp}/teachers"),
        "model.init_args.teacher:",
        ("NaN", "teacher_training"),
        after=_no_cache_entry,
    ),
    Case(
        "teacher-max-epochs-zero",
        "asked for a teacher trained for 0 epochs",
        (*QS, "--teacher_training.max_epochs=0"),
        "teacher_training.max_epochs:",
        (">= 1",),
    ),
    # --- the extra commands
    Case(
        "synth-frames-zero",
        "asked radioml-synth for 0 frames",
        ("radioml-synth", "--out", "{tmp}/synth", "--frames", "0"),
        "--frames:",
        (">= 1",),
        tiny=False,
    ),
    Case(
        "synth-no-out",
        "ran radioml-synth without --out",
        ("radioml-synth", "--frames", "8"),
        "--out:",
        ("required",),
        tiny=False,
    ),
    Case(
        "synth-format",
        "asked radioml-synth for an unknown format",
        ("radioml-synth", "--out", "{tmp}/synth", "--format", "2020"),
        "--format:",
        ("2016.10a",),
        tiny=False,
    ),
    Case(
        "model-stats-unknown",
        "asked model-stats for a network that does not exist",
        ("model-stats", "--model", "NotANet", "--input-shape", "3", "32", "32"),
        "--model:",
        ("NotANet",),
        tiny=False,
    ),
    Case(
        "generations-zero",
        "asked for 0 generations",
        ("generations", "--config", "{configs}/digits_self_distill.yaml", "--generations", "0", "--alpha", "1"),
        "--generations:",
        (">= 1",),
        tiny=False,
    ),
    # --- dense prediction: COCO and Cityscapes layouts (digit scenes)
    Case(
        "coco-missing",
        "pointed a detection config at a folder without COCO annotations",
        (*DET[:3], "--data.init_args.root={tmp}/nowhere"),
        "data.init_args.root:",
        ("instances_val.json", "make-scenes"),
    ),
    Case(
        "coco-class-count",
        "built the student detector for 5 classes on a 10-category COCO set",
        (*DET, "--model.init_args.student.init_args.num_classes=5"),
        "model.init_args.student.init_args.num_classes:",
        ("10",),
        files={"scenes": _write_scenes},
    ),
    Case(
        "coco-broken-image",
        "trained on a COCO folder with an image that does not decode",
        (*DET, "--teacher_training.enabled=false"),
        "data.init_args.root:",
        ("000000000001.png", "skip_bad_images"),
        files={"scenes": _write_scenes_with_broken_image},
    ),
    Case(
        "cityscapes-no-gtfine",
        "pointed a segmentation config at a Cityscapes folder without gtFine/",
        SEG,
        "data.init_args.root:",
        ("gtFine",),
        files={"scenes": _write_scenes_without_gtfine},
    ),
    Case(
        "cityscapes-bad-label",
        "trained on a Cityscapes label image holding labelId 40 (outside the official table)",
        SEG,
        "data.init_args.root:",
        ("40", "labelIds"),
        files={"scenes": _write_scenes_with_bad_label},
    ),
    Case(
        "acam-fpn-levels",
        "distilled an FCOS student (P3-P7) from a Faster R-CNN teacher (P2-P6) with ACAM-KD",
        (
            *ACAM,
            '--model.init_args.teacher={"class_path": "FasterRCNNDetector", "init_args": {"num_classes": 10, '
            '"backbone": "tiny", "min_size": 96, "max_size": 96}}',
        ),
        "model.init_args.teacher",
        ("FPN level", "distill_levels"),
    ),
    Case(
        "detr-query-parametrisation",
        "paired a DETR student with anchor queries and a DETR teacher with point queries for CLoCKDistill",
        (*DETR, "--model.init_args.teacher.init_args.query_type=point"),
        "model.init_args.teacher.init_args.query_type:",
        ("'point'", "'anchor'"),
    ),
    Case(
        "detr-memory-levels",
        "gave the DETR teacher a memory of other backbone levels than the student's (C4+C5 vs C3+C4)",
        (*DETR, "--model.init_args.teacher.init_args.feature_levels=[1,2]"),
        "model.init_args.teacher.init_args.feature_levels:",
        ("one to one",),
    ),
    Case(
        "detection-on-classification-data",
        "gave a detection method a classification data module",
        (*DET[:3], "--data={configs}/fragments/digits_data.yaml", "--teacher_training.enabled=false"),
        "data:",
        ("detection",),
    ),
    # --- data regimes: labeled + unlabeled, transfer sets, few classes
    Case(
        "labeled-fraction-range",
        "asked for 100 % labels in a semi-supervised split",
        (*SEMI, "--data.init_args.labeled_fraction=1.0"),
        "data.init_args.labeled_fraction:",
        ("(0, 1)",),
    ),
    Case(
        "labeled-fraction-too-small",
        "asked for 0.2 % labels on digits (less than one label per class)",
        (*SEMI, "--data.init_args.labeled_fraction=0.002"),
        "data.init_args.labeled_fraction:",
        ("less than one label", "at least 1/"),
        seconds=30.0,  # before any teacher is trained
    ),
    Case(
        "plain-method-on-unlabeled-data",
        "ran VanillaKD on a labeled + unlabeled split (it would ignore the unlabeled pool)",
        (
            *SEMI,
            "--model=VanillaKD",
            "--model.init_args.student={configs}/fragments/digits_student.yaml",
            "--model.init_args.teacher={configs}/fragments/digits_teacher.yaml",
        ),
        "data:",
        ("SemiSupervisedKD", "Supervised"),
    ),
    Case(
        "transfer-set-shape",
        "distilled an 8x8 digits teacher on a transfer set rendered at 3x32x32",
        (
            *SEMI,
            "--data=TransferSetDataModule",
            "--data.init_args.source={configs}/fragments/digits_data.yaml",
            '--data.init_args.transfer={"class_path": "DigitsDataModule", "init_args": {"as_cifar": true}}',
        ),
        "data.init_args.transfer:",
        ("(3, 32, 32)", "(1, 8, 8)"),
    ),
    Case(
        "semi-method-on-labeled-data",
        "ran DHO on plain labeled digits (no unlabeled pool to distil on)",
        ("fit", "--config", "{configs}/digits_dho.yaml", "--data={configs}/fragments/digits_data.yaml"),
        "data:",
        ("wrap it", "SemiSupervisedDataModule"),
    ),
    Case(
        "lelp-too-many-subclasses",
        "asked LELP for more pseudo-subclasses per class than the teacher's embedding has directions",
        ("fit", "--config", "{configs}/digits_lelp.yaml", "--model.init_args.num_subclasses=200"),
        "model.init_args.num_subclasses:",
        ("200",),
    ),
    Case(
        "clip-checkpoint-missing",
        "used the CLIP zero-shot teacher config without the local CLIP folder",
        ("fit", "--config", "{configs}/digits_semi_kd_clip.yaml"),
        "checkpoint:",
        ("huggingface-cli download",),
    ),
    Case(
        "class-groups-incomplete",
        "left digit 9 out of the few-class groups",
        (
            *QS,
            "--data=ClassGroupsDataModule",
            "--data.init_args.source={configs}/fragments/digits_data.yaml",
            "--data.init_args.class_groups=[[0,1,2,3,4],[5,6,7,8]]",
        ),
        "data.init_args.class_groups:",
        ("[9]",),
    ),
    # --- other domains: paired modalities, graphs, retrieval, diffusion, student search
    Case(
        "paired-missing-modality",
        "served only the signal (m2) of the audio-visual digits to an image (m1) student",
        ("fit", "--config", "{configs}/digits_av_student.yaml", "--data.init_args.modalities=[m2]"),
        "model.init_args.model.init_args.modalities:",
        ("'m1'", "['m2']"),
    ),
    Case(
        "mst-unknown-layer",
        "named an MST expert layer the teacher does not have",
        ("fit", "--config", "{configs}/digits_av_mst.yaml", "--model.init_args.mask_layers.multimodal=[net.fc3]"),
        "model.init_args.mask_layers:",
        ("net.fc3", "net.fc2"),
    ),
    Case(
        "graph-files-missing",
        "pointed the Cora config at a folder without the Planetoid files",
        ("fit", "--config", "{configs}/cora_ff_g2m.yaml", "--data.init_args.root={tmp}/empty"),
        "data.init_args.root:",
        ("ind.cora.x", "download"),
    ),
    Case(
        "graph-mlp-input-width",
        "built the graph student MLP for 32 input features (the digits graph has 64)",
        ("fit", "--config", "{configs}/digits_graph_ff_g2m.yaml", "--model.init_args.student.init_args.in_channels=32"),
        "model.init_args.student:",
        ("in_channels: 64",),
    ),
    Case(
        "retrieval-qrels-unknown-doc",
        "gave retrieval qrels naming a document id the corpus does not have",
        (
            "fit",
            "--config",
            "{configs}/stdlib_retrieval_ensemble_kd.yaml",
            "--data.init_args.source=beir",
            "--data.init_args.path={tmp}/beir",
        ),
        "data.init_args.path:",
        ("d99", "unknown_ids=skip"),
        files={"beir": _beir_with_unknown_id},
    ),
    Case(
        "retrieval-idf-other-tokenizer",
        "gave the sparse student an IDF table made with another tokenizer",
        (
            "fit",
            "--config",
            "{configs}/stdlib_retrieval_ensemble_kd.yaml",
            "--data.init_args.source=beir",
            "--data.init_args.path={tmp}/beir",
            "--model.init_args.idf_path={tmp}/idf.json",
        ),
        "model.init_args.idf_path:",
        ("zebrafish", "leave idf_path empty"),
        files={"beir": write_beir, "idf.json": _idf_of_another_tokenizer},
    ),
    Case(
        "diffusion-prediction-type",
        "gave the diffusion teacher a prediction type its scheduler does not support",
        (
            "fit",
            "--config",
            "{configs}/digits_boot.yaml",
            "--model.init_args.teachers.diffusion.init_args.prediction_type=flow_prediction",
        ),
        "model.init_args.teachers.diffusion.init_args.prediction_type:",
        ("epsilon", "v_prediction"),
    ),
    Case(
        "reasoning-jsonl-no-answer",
        "gave reasoning records (JSONL) without an answer field",
        (
            "fit",
            "--config",
            "{configs}/reasoning_student.yaml",
            "--data.init_args.source=jsonl",
            "--data.init_args.train_path={tmp}/train.jsonl",
        ),
        "data.init_args.answer_field:",
        ("train.jsonl:1", "format: gsm8k"),
        files={"train.jsonl": _reasoning_without_answers},
    ),
    Case(
        "reasoning-verifier-raises",
        "named a verifier that raises on the responses (json.loads takes one argument)",
        ("fit", "--config", "{configs}/reasoning_student.yaml", "--data.init_args.verifier=json.loads"),
        "data.init_args.verifier:",
        ("TypeError", "return True or False"),
    ),
    Case(
        "opsd-zero-new-tokens",
        "asked OPSD for rollouts of 0 tokens",
        ("fit", "--config", "{configs}/reasoning_opsd.yaml", "--model.init_args.max_new_tokens=0"),
        "model.init_args.max_new_tokens:",
        (">= 1",),
    ),
    Case(
        "lora-unknown-target-modules",
        "put LoRA adapters on modules the student does not have",
        (
            "fit",
            "--config",
            "{configs}/reasoning_opsd.yaml",
            "--model.init_args.student.init_args.lora={r: 4, alpha: 8, target_modules: [query]}",
        ),
        "lora.target_modules:",
        ("qkv", "proj"),
    ),
    Case(
        "lm-tokenizers-differ",
        "distilled between Hugging Face LMs with different tokenizers and no vocabulary mapping",
        ("fit", "--config", "{tmp}/hf_pair.yaml"),
        "model.init_args.student/teacher:",
        ("tokenizers differ", "vocab_mapping: exact_tokens"),
        files={"hf_pair.yaml": _hf_pair_config({"words": ["the", "cat", "woke"]})},
    ),
    Case(
        "lm-chat-template-one-side",
        "distilled between Hugging Face LMs whose tokenizers differ only by a chat template",
        ("fit", "--config", "{tmp}/hf_pair.yaml"),
        "model.init_args.student/teacher:",
        ("chat template missing on one side", "check_chat_template"),
        files={"hf_pair.yaml": _hf_pair_config({"chat": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})},
    ),
    # --- vision-language and translation (issue 19)
    Case(
        "vlm-tokenizers-differ",
        "distilled between VLMs whose language models use different tokenizers",
        ("fit", "--config", "{tmp}/vlm_pair.yaml"),
        "model.init_args.teacher:",
        ("differs from the student's", "same token"),
        files={"vlm_pair.yaml": _vlm_pair_config},
    ),
    Case(
        "vlm-image-token-counts-differ",
        "gave the teacher VLM 2 visual tokens per image and the student 4",
        (
            "fit",
            "--config",
            "{configs}/vqa_token_kd.yaml",
            "--model.init_args.teacher.init_args.num_image_tokens=2",
            *_NO_VISION_PRETRAINING,
        ),
        "model.init_args.teacher:",
        ("2 visual tokens", "same num_image_tokens"),
    ),
    Case(
        "vlm-teacher-not-a-vlm",
        "gave a VLM method a text-only teacher",
        (
            "fit",
            "--config",
            "{configs}/vqa_token_kd.yaml",
            "--model.init_args.teacher={configs}/fragments/reasoning_teacher_tinygpt.yaml",
            "--model.init_args.student.init_args.vision.init_args.pretrain_steps=0",
        ),
        "model.init_args.teacher:",
        ("not a vision-language model", "VisionLanguageModel"),
    ),
    Case(
        "switch-kd-dims-without-adapter",
        "turned off Switch-KD's adapter although the student's and teacher's widths differ",
        (
            "fit",
            "--config",
            "{configs}/vqa_switch_kd.yaml",
            "--model.init_args.align_projector=none",
            *_NO_VISION_PRETRAINING,
        ),
        "model.init_args.align_projector:",
        ("48", "96", "linear"),
    ),
    Case(
        "attribution-method-unknown",
        "asked for an attribution method the library does not have (LIME)",
        ("fit", "--config", "{configs}/translation_attribution_kd.yaml", "--model.init_args.attribution=lime"),
        "model.init_args.attribution:",
        ("attention", "value_zeroing", "integrated_gradients"),
    ),
    Case(
        "translation-parallel-text-missing",
        "pointed the parallel-text reader at a folder without the files",
        (
            "fit",
            "--config",
            "{configs}/translation_student.yaml",
            "--data.init_args.format=parallel_text",
            "--data.init_args.root={tmp}/nodata",
        ),
        "data.init_args.root:",
        ("train.src", "one sentence per line"),
    ),
    Case(
        "embodied-env-not-installed",
        "asked for an environment id the installed simulators do not provide",
        (
            "fit",
            "--config",
            "{configs}/babyai_dagger.yaml",
            "--data.init_args.env=MiniHack-Room-5x5-v0",
        ),
        "data.init_args.env:",
        ("not an installed embodied environment", "pip install 'kd-lightning[embodied]'"),
        tiny=False,
    ),
    Case(
        "embodied-teacher-needs-privileged-state",
        "gave a privileged teacher to data that do not expose the simulator state",
        ("fit", "--config", "{configs}/babyai_steve2.yaml", "--data.init_args.expose_privileged=false"),
        "model.init_args.teacher:",
        ("privileged simulator state", "expose_privileged: true"),
        tiny=False,
        seconds=30.0,  # refused before the missing teacher is trained (data.checks_early)
    ),
    Case(
        "embodied-student-observation-mismatch",
        "built the student for another observation shape than the environment's",
        (
            "fit",
            "--config",
            "{configs}/babyai_dagger.yaml",
            "--model.init_args.model.init_args.input_shape=[56, 56, 3]",
        ),
        "model.init_args.model.init_args.input_shape:",
        ("[56, 56, 3]", "set input_shape: [7, 7, 3]"),
        tiny=False,
    ),
    Case(
        "search-no-candidate-under-budget",
        "asked the student search for a budget no candidate fits",
        ("search-student", "--config", "{configs}/search/digits_diswot.yaml", "--budget.max_params=50"),
        "budget.max_params:",
        ("94",),
        tiny=False,
    ),
]

#: Flags added to every ``tiny`` case (left out of the table).
TINY_FLAGS = (*TINY_DIGITS, "--data.init_args.num_workers=0")


# ---------------------------------------------------------------------------------------------- running a case
@dataclass
class Outcome:
    code: object
    stderr: str
    seconds: float
    message: str


def _render(case: Case) -> str:
    """The command as the table shows it (tiny-run flags left out)."""
    parts = ["kd", *(a.replace("{configs}", "configs").replace("{tmp}/", "") for a in case.argv)]
    return " ".join(parts)


def normalise(text: str, tmp: Path) -> str:
    """Machine-specific paths replaced: the working folder by ``<tmp>``, the repository by ``<repo>``."""
    for path in sorted({str(tmp), os.path.realpath(tmp)}, key=len, reverse=True):
        text = text.replace(path, "<tmp>")
    return text.replace(str(REPO), "<repo>")


def run_case(case: Case, tmp: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: Callable[[], str]) -> Outcome:
    """Run ``case`` in ``tmp`` (the working folder); ``capsys()`` returns stderr captured so far."""
    monkeypatch.chdir(tmp)
    for name, writer in case.files.items():
        writer(tmp / name)
    if case.no_network:

        def offline(*args: object, **kwargs: object) -> None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        monkeypatch.setattr(urllib.request, "urlopen", offline)
    argv = [a.replace("{configs}", str(CONFIGS_DIR)).replace("{tmp}", str(tmp)) for a in case.argv]
    if case.tiny:  # after the config, before the case's own flags (which must win)
        argv[3:3] = [*TINY_FLAGS, f"--teacher_training.cache_dir={cache}"]
    started = time.perf_counter()
    code: object = None
    try:
        main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    except Exception:  # not turned into one line: recorded as the failure it is
        code = "uncaught"
        print(traceback.format_exc(), file=sys.stderr)
    seconds = time.perf_counter() - started
    if case.after is not None:
        case.after(tmp)
    stderr = capsys()
    lines = [line for line in stderr.splitlines() if line.strip()]
    message = normalise(lines[-1], tmp) if lines else ""
    return Outcome(code, stderr, seconds, message)


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One teacher cache for every case: a case that gets as far as training the digits teacher trains it once."""
    return tmp_path_factory.mktemp("bad-input-teachers")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(
    case: Case,
    in_tmp: Path,
    teacher_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcome = run_case(case, in_tmp, teacher_cache, monkeypatch, lambda: capsys.readouterr().err)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.code == 2, outcome.stderr
    assert "Traceback" not in outcome.stderr
    errors = [line for line in lines if line.startswith("kd: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], outcome.stderr
    assert [line for line in lines if "error" in line.lower()] == errors, outcome.stderr
    message = outcome.message
    assert not message.endswith("..."), f"cut at the CLI's length limit: {message}"
    assert message.startswith("kd: error: " + case.field), message
    for word in case.words:
        assert word in message, (word, message)
    if case.seconds is not None:
        assert outcome.seconds < case.seconds, outcome.seconds
    assert message in _documented(), (
        "docs/bad_inputs.md is out of date: run python -m tests.cli.test_bad_inputs --write"
    )


def _documented() -> str:
    return DOC.read_text().replace("\\|", "|") if DOC.is_file() else ""


def test_optimizer_given_as_an_instance_is_refused() -> None:
    """In Python, ``optimizer=torch.optim.SGD(params, lr=...)`` (an instance) instead of a callable."""
    from kd_lightning.errors import KDConfigError
    from kd_lightning.methods import VanillaKD
    from tests.helpers.tiny import TinyNet

    student = TinyNet()
    with pytest.raises(KDConfigError) as info:
        VanillaKD(student=student, teacher=TinyNet(), optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    message = str(info.value)
    assert message.startswith("model.init_args.optimizer: is a built SGD; it must be a callable that builds one.")
    assert "functools.partial(torch.optim.SGD" in message and "\n" not in message


def test_the_pickle_payload_is_real(in_tmp: Path) -> None:
    """Fully unpickled, the crafted checkpoint does run its code (so the refusal above is what saves the user)."""
    _write_pickle_payload(in_tmp / "evil.ckpt")
    torch.load(in_tmp / "evil.ckpt", weights_only=False)
    assert (in_tmp / MARKER).exists()


def test_every_case_is_in_the_table() -> None:
    """The table lists every case once, in order (its messages are checked by the parametrised test)."""
    rows = [line for line in _documented().splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert [row.split(" | ")[1] for row in rows] == [c.did for c in CASES]


# ---------------------------------------------------------------------------------------------- the table
def _code(text: str) -> str:
    """``text`` as a Markdown code span (double backticks when it holds one)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def write_table(path: Path = DOC) -> list[tuple[Case, Outcome]]:
    """Run every case and write the Markdown table of messages to ``path``."""
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as cache_dir, pytest.MonkeyPatch.context() as outer:
        outer.setattr(sys, "argv", ["kd"])
        for case in CASES:
            with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as monkeypatch:
                import io

                buffer = io.StringIO()
                monkeypatch.setattr(sys, "stderr", buffer)
                outcome = run_case(case, Path(tmp), Path(cache_dir), monkeypatch, buffer.getvalue)
                results.append((case, outcome))
    rows = [
        "# Bad inputs and what `kd` says",
        "",
        "Each row is a mistake a new user could make, run through the real `kd` command by",
        "`tests/cli/test_bad_inputs.py` (which also checks that this table matches what `kd` prints today;",
        "regenerate it with `python -m tests.cli.test_bad_inputs --write`). Every one ends as a single line",
        "`kd: error: <field>: <problem>. <fix>` and exit status 2. The `kd fit` cases also carry tiny-run flags",
        "(`--trainer.max_epochs=1 ...`), left out here; `<tmp>` is the working folder.",
        "",
        "| # | What the user did | Command | Message |",
        "|---|---|---|---|",
    ]
    for number, (case, outcome) in enumerate(results, 1):
        cells = [str(number), case.did, _code(_render(case)), _code(outcome.message)]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(REPO)}")
    options = parser.parse_args()
    outcomes = write_table(DOC if options.write else Path(os.devnull))
    for case, outcome in outcomes:
        print(f"CASE {case.id:28s} exit {outcome.code} {outcome.seconds:5.1f}s  {outcome.message}")
