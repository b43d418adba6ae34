"""Throughput of a KD training step (resnet32x4 -> resnet8x4): plain PyTorch vs Lightning vs cache vs torchdistill.

Configurations, all on the same data and the same loss (0.1·CE + 0.9·τ²·KL, τ = 4, SGD):

* ``plain``: a hand-written PyTorch loop (teacher eval + no_grad first, then student forward/backward, SGD step).
* ``lightning``: ``VanillaKD`` under ``lightning.Trainer`` as users run it (CSV logger, the per-step loss
  logging, the train-accuracy metric, the samples/s callback; no validation).
* ``cached``: the same with ``TeacherLogitCache(build="lazy")`` on a cache whose every row is filled
  (placeholder logits: a lookup costs the same whatever the values), i.e. its steady state.
* ``torchdistill``: torchdistill's ``KDLoss`` inside its ``DistillationBox`` (``forward_process`` +
  ``post_forward_process`` and the ``loss.item()`` of its example training loop), when installed.
* ``student_only`` (optional): the plain loop without a teacher (the ceiling a cache approaches).

**Step mode** (default) measures samples/s over ``--steps`` steps after ``--warmup`` steps, for each batch
size, the configurations alternating in rotated order over ``--rounds`` rounds so that machine noise hits
all alike; every configuration reads the same batches from the fast CIFAR input path (random
CIFAR-shaped images), so only the step differs. **Epoch mode** (``--mode epoch``) times whole epochs
(default 50,000 images, batch 128): plain, lightning and cached on the fast input path, and torchdistill
with its standard DataLoader (torchvision CIFAR-100 dataset, PIL transforms, ``--workers`` workers); the
first epoch of each is a warm-up.

    python benchmarks/throughput.py                                   # CPU, batches 64 and 128
    python benchmarks/throughput.py --device cuda --precision bf16 --channels-last
    python benchmarks/throughput.py --device cuda --mode epoch --precision bf16 --channels-last

Prints a table of medians and ratios to ``plain`` and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ALL_CONFIGS = ("plain", "lightning", "cached", "torchdistill", "student_only")
DEFAULT_CONFIGS = ("plain", "lightning", "cached", "torchdistill")
TEMPERATURE, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


# ----------------------------------------------------------------------------- setup helpers
def write_random_cifar100(root: Path, n_train: int, seed: int = 0) -> Path:
    """Random CIFAR-shaped images in the CIFAR-100 python layout (no download)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", 100)):
        entry = {  # str keys, as the official (Python 2) pickles read with encoding="latin1"
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "fine_labels": rng.integers(0, 100, size=n).tolist(),
            "coarse_labels": [0] * n,
            "filenames": ["x.png"] * n,
            "batch_label": name,
        }
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, f)
    return root


def build_nets(teacher: str, student: str, seed: int) -> tuple[nn.Module, nn.Module]:
    from kd_lightning import models

    torch.manual_seed(seed)
    return getattr(models, teacher)(num_classes=100), getattr(models, student)(num_classes=100)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(
        F.log_softmax(s / TEMPERATURE, 1), F.log_softmax(t / TEMPERATURE, 1), reduction="batchmean", log_target=True
    )
    return CE_WEIGHT * ce + KD_WEIGHT * TEMPERATURE**2 * kl


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Bench:
    """Shared state of one benchmark run: data, networks, settings."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.workdir = workdir
        self.teacher, self.student = build_nets(args.teacher, args.student, args.seed)
        self.teacher_state = {k: v.clone() for k, v in self.teacher.state_dict().items()}
        self.student_state = {k: v.clone() for k, v in self.student.state_dict().items()}

    def datamodule(self, batch_size: int, fast: bool = True) -> Any:
        from kd_lightning.data import CIFAR100DataModule

        dm = CIFAR100DataModule(
            root=str(self.workdir / "data"),
            batch_size=batch_size,
            num_workers=0,
            drop_last=True,
            return_view=True,
            fast=fast,
        )
        dm.setup("fit")
        return dm

    def loader(self, dm: Any) -> Any:
        """The fast-path training loader of ``dm`` on the benchmark's device (for the loops outside Lightning)."""
        from kd_lightning.data.fast import DeviceImageLoader

        source = dm.train_set
        return DeviceImageLoader(
            dm.padded_images(source.images, self.device),
            source.targets,
            None,
            batch_size=dm.batch_size,
            mean=dm.mean,
            std=dm.std,
            size=(32, 32),
            padding=4,
            shuffle=True,
            augment=True,
            drop_last=True,
            return_view=True,
            seed=self.args.seed,
        )

    def fresh_nets(self) -> tuple[nn.Module, nn.Module]:
        """The same initial teacher/student for every configuration, on the device."""
        teacher, student = build_nets(self.args.teacher, self.args.student, self.args.seed)
        teacher.load_state_dict(self.teacher_state)
        student.load_state_dict(self.student_state)
        teacher, student = teacher.to(self.device), student.to(self.device)
        if self.args.channels_last:
            teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        teacher.eval().requires_grad_(False)
        student.train()
        return teacher, student


# ----------------------------------------------------------------------------- loops
def timed_loop(
    batches: Iterator[Any], step: Callable[[Any], None], warmup: int, steps: int, device: torch.device
) -> float:
    """Seconds for ``steps`` fetch+step iterations after ``warmup`` ones."""
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step(next(batches))
    sync(device)
    return time.perf_counter() - start


def plain_step_fn(bench: Bench, use_teacher: bool = True) -> Callable[[Any], None]:
    teacher, student = bench.fresh_nets()
    if bench.args.compile:
        teacher, student = torch.compile(teacher), torch.compile(student)
    optimizer = torch.optim.SGD(student.parameters(), **SGD)
    device, precision = bench.device, bench.args.precision

    def step(batch: Any) -> None:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, precision):
            if use_teacher:  # teacher first, as torchdistill and VanillaKD do (lower peak memory)
                with torch.no_grad():
                    t = teacher(x)
                loss = kd_loss(student(x), t, y)
            else:
                loss = F.cross_entropy(student(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def torchdistill_box(bench: Bench, dataset: Any = None, batch_size: int = 128) -> Any:
    from torch.utils.data import RandomSampler
    from torchdistill.core.distillation import DistillationBox

    teacher, student = bench.fresh_nets()
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": TEMPERATURE,
        "alpha": CE_WEIGHT,
        "reduction": "batchmean",
    }
    config: dict[str, Any] = {
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": dict(SGD)},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}},
        },
        "num_epochs": 1,
    }
    if dataset is not None:
        config["train_data_loader"] = {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
            "kwargs": {
                "batch_size": batch_size,
                "num_workers": bench.args.workers,
                "pin_memory": bench.device.type == "cuda",
                "drop_last": True,
            },
        }
    box = DistillationBox(
        teacher, student, {"train": dataset} if dataset is not None else {}, config, bench.device, None, False, 1.0
    )
    box.pre_epoch_process(epoch=0)  # student.train(); the teacher stays in eval mode (set above)
    return box


def torchdistill_step_fn(bench: Bench, box: Any = None) -> Callable[[Any], None]:
    box = box or torchdistill_box(bench)
    device, precision = bench.device, bench.args.precision

    def step(batch: Any) -> None:  # as torchdistill's image_classification.py train_one_epoch
        sample_batch, targets = batch[0].to(device), batch[1].to(device)
        with autocast(device, precision):
            loss = box.forward_process(sample_batch, targets, {})
        box.post_forward_process(loss=loss)
        loss.item()  # its metric_logger.update(loss=loss.item(), ...)

    return step


def lightning_module(bench: Bench) -> Any:
    from kd_lightning.methods import VanillaKD

    teacher, student = bench.fresh_nets()
    return VanillaKD(
        student=student,
        teacher=teacher,
        temperature=TEMPERATURE,
        ce_weight=CE_WEIGHT,
        kd_weight=KD_WEIGHT,
        optimizer=partial(torch.optim.SGD, **SGD),
        compile_student=bench.args.compile,
        compile_teacher=bench.args.compile,
        channels_last=bench.args.channels_last,
        fidelity=False,
    )


def prefilled_cache(cache_dir: Path) -> Any:
    from kd_lightning.callbacks import TeacherLogitCache

    class PrefilledCache(TeacherLogitCache):
        """Every row marked filled (zeros as placeholder logits): the steady state of a lazy cache."""

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_fit_start(trainer, pl_module)
            if self._missing_rows and self.store is not None:
                self.store.filled[:] = 1
                self.store.flush()
                super().on_fit_start(trainer, pl_module)

    return PrefilledCache(cache_dir=str(cache_dir), build="lazy")


def lightning_trainer(bench: Bench, callbacks: list[Any], max_steps: int = -1, max_epochs: int | None = None) -> Any:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator=bench.device.type,
        devices=1,
        precision="bf16-mixed" if bench.args.precision == "bf16" else "32-true",
        max_steps=max_steps,
        max_epochs=max_epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(bench.workdir / "logs"), name="lightning"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class StepTimer:
    """Lightning callback: seconds from the start of batch ``warmup`` to the end of batch ``warmup + steps - 1``."""

    def __new__(cls, warmup: int, steps: int, device: torch.device) -> Any:
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def __init__(self) -> None:
                self.start = 0.0
                self.elapsed: float | None = None
                self.epoch_start = 0.0
                self.epochs: list[float] = []

            def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
                if trainer.global_step == warmup:
                    sync(device)
                    self.start = time.perf_counter()

            def on_train_batch_end(
                self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
            ) -> None:
                if trainer.global_step == warmup + steps:
                    sync(device)
                    self.elapsed = time.perf_counter() - self.start

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                sync(device)
                self.epoch_start = time.perf_counter()

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                sync(device)
                self.epochs.append(time.perf_counter() - self.epoch_start)

        return _Timer()


# ----------------------------------------------------------------------------- step mode
def measure_step(bench: Bench, config: str, batch_size: int, state: dict[str, Any]) -> float:
    """Samples/s of one steady-state measurement of ``config``."""
    args, device = bench.args, bench.device
    warmup, steps = args.warmup, args.steps
    dm = state.setdefault(("dm", batch_size), bench.datamodule(batch_size))
    if config in ("plain", "student_only", "torchdistill"):
        key = (config, batch_size)
        if key not in state:
            if config == "torchdistill":
                state[key] = torchdistill_step_fn(bench)
            else:
                state[key] = plain_step_fn(bench, use_teacher=config == "plain")
        seconds = timed_loop(iter(bench.loader(dm)), state[key], warmup, steps, device)
    else:
        key = (config, batch_size)
        if key not in state:
            state[key] = lightning_module(bench)
        timer = StepTimer(warmup, steps, device)
        callbacks = [timer]
        if config == "cached":
            callbacks.append(prefilled_cache(bench.workdir / "cache"))
        trainer = lightning_trainer(bench, callbacks, max_steps=warmup + steps)
        trainer.fit(state[key], datamodule=dm)
        if timer.elapsed is None:
            raise RuntimeError(f"{config}: the run ended before {warmup + steps} steps (too few images?).")
        seconds = timer.elapsed
        if config == "cached":
            cache = callbacks[1]
            if cache.misses:
                raise RuntimeError(f"cached: {cache.misses} misses in the steady state")
    return steps * batch_size / seconds


# ----------------------------------------------------------------------------- epoch mode
def measure_epochs(bench: Bench, config: str, batch_size: int) -> list[float]:
    """Seconds of each timed epoch (after one warm-up epoch) of ``config``."""
    args, device = bench.args, bench.device
    epochs = 1 + args.epochs
    times: list[float] = []
    if config in ("plain", "student_only"):
        dm = bench.datamodule(batch_size)
        step = plain_step_fn(bench, use_teacher=config == "plain")
        loader = bench.loader(dm)
        for _ in range(epochs):
            sync(device)
            start = time.perf_counter()
            for batch in loader:
                step(batch)
            sync(device)
            times.append(time.perf_counter() - start)
    elif config == "torchdistill":
        import torchvision
        from torchvision import transforms as T

        class CIFAR100Files(torchvision.datasets.CIFAR100):
            """torchvision's CIFAR-100 reader without its md5 checks (the files hold random images)."""

            def _check_integrity(self) -> bool:
                return True

            def _load_meta(self) -> None:
                with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                    self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
                self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

        transform = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        )
        dataset = CIFAR100Files(str(bench.workdir / "data"), train=True, transform=transform, download=False)
        box = torchdistill_box(bench, dataset, batch_size)
        step = torchdistill_step_fn(bench, box)
        for epoch in range(epochs):
            box.pre_epoch_process(epoch=epoch)
            sync(device)
            start = time.perf_counter()
            for sample_batch, targets, _supp in box.train_data_loader:
                step((sample_batch, targets))
            sync(device)
            times.append(time.perf_counter() - start)
    else:
        dm = bench.datamodule(batch_size)
        module = lightning_module(bench)
        timer = StepTimer(-1, 0, device)
        callbacks = [timer]
        if config == "cached":
            callbacks.append(prefilled_cache(bench.workdir / "cache"))
        trainer = lightning_trainer(bench, callbacks, max_epochs=epochs)
        trainer.fit(module, datamodule=dm)
        times = timer.epochs
    return times[1:]


# ----------------------------------------------------------------------------- reporting
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import torchdistill

        info["torchdistill"] = torchdistill.__version__
    except ImportError:
        pass
    return info


def torchdistill_available() -> str | None:
    """``None`` when torchdistill's DistillationBox imports, else why not."""
    try:
        from torchdistill.core.distillation import DistillationBox  # noqa: F401
        from torchdistill.losses.mid_level import KDLoss  # noqa: F401
    except Exception as err:  # not installed, or incompatible with this torch
        return f"{type(err).__name__}: {err}"
    return None


def ratios(medians: dict[str, float]) -> dict[str, float]:
    pairs = [
        ("lightning", "plain"),
        ("cached", "plain"),
        ("torchdistill", "plain"),
        ("student_only", "plain"),
        ("lightning", "torchdistill"),
        ("cached", "lightning"),
        ("cached", "torchdistill"),
    ]
    return {f"{a}/{b}": medians[a] / medians[b] for a, b in pairs if medians.get(a) and medians.get(b)}


def print_table(results: dict[str, Any], mode: str) -> None:
    unit = "samples/s" if mode == "step" else "epoch s"
    for batch, per_config in results.items():
        base = per_config.get("plain", {}).get("median")
        print(f"\nbatch {batch}   ({unit}, median over rounds)")
        print(f"  {'config':<14}{'median':>12}{'x plain':>10}   all")
        for config, entry in per_config.items():
            median = entry["median"]
            rel = ""
            if base:
                rel = f"{(median / base if mode == 'step' else base / median):.3f}"
            values = ", ".join(f"{v:.2f}" for v in entry["values"])
            print(f"  {config:<14}{median:>12.2f}{rel:>10}   [{values}]")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (random CIFAR-shaped data either way)")
    parser.add_argument("--mode", choices=("step", "epoch"), default="step")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {ALL_CONFIGS}")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="step: 64 128; epoch: 128")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per configuration, in rotated order")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    parser.add_argument("--epochs", type=int, default=1, help="epoch mode: timed epochs after one warm-up epoch")
    parser.add_argument("--images", type=int, default=None, help="training images (epoch mode default: 50000)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="channels-last networks (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    parser.add_argument("--workers", type=int, default=8, help="epoch mode: torchdistill DataLoader workers")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--teacher", default="ResNet32x4")
    parser.add_argument("--student", default="ResNet8x4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="throughput.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {ALL_CONFIGS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    batch_sizes = args.batch_sizes or ([64, 128] if args.mode == "step" else [128])
    skipped: dict[str, str] = {}
    if "torchdistill" in configs and (reason := torchdistill_available()) is not None:
        skipped["torchdistill"] = reason
        configs.remove("torchdistill")
        print(f"skipping torchdistill: {reason}", file=sys.stderr)

    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torchdistill").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available|LeafSpec).*")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kd-throughput-") as tmp:
        workdir = Path(tmp)
        if args.mode == "step":
            images = args.images or (args.warmup + args.steps + 1) * max(batch_sizes)
        else:
            images = args.images or 50_000
        write_random_cifar100(workdir / "data", images, args.seed)
        bench = Bench(args, workdir)
        state: dict[Any, Any] = {}
        for batch_size in batch_sizes:
            values: dict[str, list[float]] = {c: [] for c in configs}
            for r in range(args.rounds):
                order = configs[r % len(configs) :] + configs[: r % len(configs)]
                for config in order:
                    try:
                        if args.mode == "step":
                            values[config].append(measure_step(bench, config, batch_size, state))
                        else:
                            values[config].extend(measure_epochs(bench, config, batch_size))
                    except Exception as err:  # record and go on: one broken configuration must not hide the rest
                        if config == "torchdistill":
                            skipped[config] = f"{type(err).__name__}: {err}"
                            traceback.print_exc()
                            configs = [c for c in configs if c != config]
                            values.pop(config, None)
                        else:
                            raise
                    print(f"batch {batch_size} round {r} {config}: {values.get(config, ['skipped'])[-1:]}", flush=True)
            results[str(batch_size)] = {
                c: {"values": v, "median": statistics.median(v)} for c, v in values.items() if v
            }
    for per_config in results.values():
        medians = {c: e["median"] for c, e in per_config.items()}
        if args.mode == "epoch":  # ratios of speeds = inverse ratios of epoch times
            medians = {c: 1.0 / m for c, m in medians.items()}
        per_config["ratios"] = ratios(medians)  # type: ignore[assignment]
    report = {
        "mode": args.mode,
        "unit": "samples/s" if args.mode == "step" else "seconds per epoch",
        "machine": machine_info(bench.device),
        "settings": {**vars(args), "images": images, "batch_sizes": batch_sizes},
        "results": {b: {c: e for c, e in pc.items() if c != "ratios"} for b, pc in results.items()},
        "ratios": {b: pc["ratios"] for b, pc in results.items()},
        "skipped": skipped,
        "notes": [
            "All configurations read the same random CIFAR-shaped batches (fast CIFAR input path) except torchdistill "
            "in epoch mode, which uses its standard DataLoader (torchvision CIFAR-100, PIL transforms).",
            "cached: every cache row marked filled with placeholder (zero) logits, so every lookup is a hit: the "
            "steady state of build='lazy' (or of build='full'); lookups cost the same for any values.",
            "torchdistill: teacher in eval mode (set by us; DistillationBox leaves it as given), loss.item() per step "
            "as in its example loop; --precision bf16 wraps its forward_process in torch.autocast.",
        ],
    }
    print_table({b: {c: e for c, e in pc.items() if c != "ratios"} for b, pc in results.items()}, args.mode)
    for batch, r in report["ratios"].items():
        print(f"\nratios (speed) at batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    if skipped:
        print(f"\nskipped: {skipped}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
