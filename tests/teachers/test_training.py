"""Train-if-missing teachers: one cache key per teacher, trained once across processes, integrity and divergence."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kd_lightning.commands import main
from kd_lightning.errors import KDConfigError, TrainingDivergedError
from kd_lightning.methods import VanillaKD
from kd_lightning.models.checkpoints import load_weights
from kd_lightning.teachers import CachedTeacher, TeacherTraining
from tests.helpers.cli import CONFIGS_DIR, REPO, TINY_DIGITS, fit
from tests.helpers.tiny import BlobsDataModule, TinyNet

QUICKSTART = str(CONFIGS_DIR / "quickstart.yaml")


def _ensure(cache: Path, **settings) -> tuple[Path, bool]:
    """Train-if-missing a TinyNet teacher on blobs (about a second)."""
    training = TeacherTraining(cache_dir=str(cache), **{"max_epochs": 1, **settings})
    return training.ensure(VanillaKD, TinyNet(), BlobsDataModule(), key="k", accelerator="cpu", progress_bar=False)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


# ------------------------------------------------------------------------------------ one key per teacher
def test_fragment_and_inline_teacher_share_one_cache_entry(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """quickstart.yaml spells the teacher inline, digits_dkd.yaml through fragments/*.yaml: same teacher, one key."""
    cache = in_tmp / "teachers"
    first = fit(["--config", QUICKSTART, *TINY_DIGITS, f"--teacher_training.cache_dir={cache}"])
    assert "kd: trained and cached teacher" in capsys.readouterr().out
    second = fit(
        ["--config", str(CONFIGS_DIR / "digits_dkd.yaml"), *TINY_DIGITS, f"--teacher_training.cache_dir={cache}"]
    )
    out = capsys.readouterr().out
    assert f"kd: reused cached teacher {first.model.teacher_ckpt}" in out, out
    assert second.model.teacher_ckpt == first.model.teacher_ckpt
    assert _entries(cache) == [
        Path(first.model.teacher_ckpt).parent.name,
        Path(first.model.teacher_ckpt).parent.name + ".logs",
    ]
    # Trained once: one log version.
    assert [p.name for p in (cache / (_entries(cache)[0] + ".logs") / "logs").iterdir()] == ["version_0"]
    # Stored as safetensors (tensors only) + a JSON sidecar with the key's ingredients and the file's SHA-256.
    weights = Path(first.model.teacher_ckpt)
    with safe_open(str(weights), framework="pt") as handle:
        assert set(handle.keys()) == set(first.model.teacher.state_dict())
    meta = json.loads((weights.parent / "teacher.json").read_text())
    assert meta["task"] == meta["task_module"] == "Supervised"
    assert meta["teacher"]["class_path"] == "kd_lightning.models.SmallCNN" and "__path__" not in meta["teacher"]
    assert CachedTeacher(weights.parent).problem() is None and len(meta["sha256"]) == 64


# ------------------------------------------------------------------------------------ once across processes
_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from kd_lightning.methods import VanillaKD
    from kd_lightning.teachers import TeacherTraining
    from tests.helpers.tiny import BlobsDataModule, TinyNet

    cache, ready, me, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    (ready / me).touch()
    while len(list(ready.iterdir())) < n:  # start together: the runs overlap
        time.sleep(0.02)
    started = time.time()
    training = TeacherTraining(max_epochs=4, cache_dir=cache)
    path, trained = training.ensure(
        VanillaKD, TinyNet(), BlobsDataModule(per_class=64), key="k", accelerator="cpu", progress_bar=False
    )
    print(json.dumps({{"path": str(path), "trained": trained, "started": started, "ended": time.time()}}))
    """
)


def test_concurrent_runs_train_the_teacher_once(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=str(REPO)))
    ready = tmp_path / "ready"
    ready.mkdir()
    cache = tmp_path / "teachers"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), str(ready), str(i), "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["trained"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]
    trainer, waiter = sorted(results, key=lambda r: not r["trained"])
    # The other run waited for the training (it did not find a half-written entry and did not train).
    assert waiter["ended"] >= trainer["ended"] - 0.5 and waiter["started"] < trainer["ended"]
    entry = CachedTeacher(Path(results[0]["path"]).parent)
    assert entry.problem() is None
    logs = entry.folder.parent / f"{entry.folder.name}.logs" / "logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]


# ------------------------------------------------------------------------------------ integrity
def _truncate(entry: CachedTeacher) -> None:
    entry.weights.write_bytes(entry.weights.read_bytes()[:-64])


def _drop_sidecar(entry: CachedTeacher) -> None:
    entry.sidecar.unlink()


def _garble_sidecar(entry: CachedTeacher) -> None:
    entry.sidecar.write_text('{"sha256": ')


def _drop_weights(entry: CachedTeacher) -> None:
    entry.weights.unlink()


def _flip_byte(entry: CachedTeacher) -> None:
    data = bytearray(entry.weights.read_bytes())
    data[-1] ^= 0xFF
    entry.weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _drop_sidecar, _garble_sidecar, _drop_weights, _flip_byte],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_cache_entry_is_retrained_with_a_warning(tmp_path: Path, damage) -> None:
    path, trained = _ensure(tmp_path)
    assert trained
    intact = load_weights(TinyNet(), path).state_dict()
    entry = CachedTeacher(path.parent)
    damage(entry)
    assert entry.problem() is not None
    with pytest.warns(UserWarning, match=rf"cached teacher in {entry.folder}.*unusable.*training it again"):
        again, trained = _ensure(tmp_path)
    assert trained and again == path and entry.problem() is None
    # Same seed, same data: the retrained teacher equals the lost one, and it loads.
    for key, value in load_weights(TinyNet(), again).state_dict().items():
        assert torch.allclose(value, intact[key]), key
    # The next run reuses it quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ensure(tmp_path) == (path, False)


def test_truncated_cached_teacher_through_the_cli(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--config",
        QUICKSTART,
        *TINY_DIGITS,
        "--teacher_training.max_steps=3",
        f"--teacher_training.cache_dir={in_tmp / 'teachers'}",
    ]
    first = fit(args)
    weights = Path(first.model.teacher_ckpt)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match=rf"cached teacher in {weights.parent}"):
        fit(args)
    assert f"kd: trained and cached teacher {weights}" in capsys.readouterr().out
    assert CachedTeacher(weights.parent).problem() is None


# ------------------------------------------------------------------------------------ divergence
def test_diverged_teacher_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError) as info:
        _ensure(tmp_path, optimizer=functools.partial(torch.optim.SGD, lr=1e30))
    message = str(info.value)
    assert message.startswith("model.init_args.teacher: the teacher's training diverged") and "\n" not in message
    assert "teacher_training.optimizer" in message
    assert _entries(tmp_path) == []  # no cache folder, no log folder
    assert not (tmp_path / "lightning_logs").exists()
    # A sane setting afterwards trains and caches it.
    assert _ensure(tmp_path)[1]


def test_diverged_teacher_through_the_cli_is_one_line(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = in_tmp / "teachers"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                QUICKSTART,
                *TINY_DIGITS,
                f"--teacher_training.cache_dir={cache}",
                "--teacher_training.optimizer.lr=1e30",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kd: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(
        "kd: error: model.init_args.teacher: the teacher's training diverged, nothing was cached"
    )
    assert not cache.exists() or _entries(cache) == []
    assert sorted(p.name for p in in_tmp.iterdir()) in ([], ["teachers"])  # no stray runs/ or lightning_logs/


# ------------------------------------------------------------------------------------ gradient clipping
def test_gradient_clipping_reaches_the_teachers_trainer(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    seen: list[object] = []
    original = L.Trainer.__init__

    def recording(self: L.Trainer, *args: object, **kwargs: object) -> None:
        seen.append(kwargs.get("gradient_clip_val"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", recording)
    _ensure(in_tmp / "teachers", gradient_clip_val=0.1)
    assert seen == [0.1]
    with pytest.raises(KDConfigError, match=r"^teacher_training.gradient_clip_val: must be > 0 or null, got 0"):
        TeacherTraining(gradient_clip_val=0.0)


def test_reset_parameters_uses_the_networks_own_initialisation() -> None:
    """A TinyGPT teacher restarts from GPT-2's N(0, 0.02), not nn.Embedding's N(0, 1) (it then never learnt
    the reasoning demo)."""
    from kd_lightning.models.lm import TinyGPT
    from kd_lightning.teachers.training import reset_parameters

    net = TinyGPT(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    reset_parameters(net, seed=3)
    assert 0.015 < float(net.token_embedding.weight.std()) < 0.025
    assert 0.015 < float(net.position_embedding.weight.std()) < 0.025
    scaled = net.blocks[0].attn.proj.weight.std()
    assert 0.006 < float(scaled) < 0.012  # 0.02 / sqrt(2 * 2 layers) = 0.01
    assert float(net.blocks[0].ln1.weight.min()) == 1.0 and float(net.blocks[0].mlp[0].bias.abs().max()) == 0.0
