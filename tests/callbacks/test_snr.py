"""SNREvaluation: accuracy per SNR and confusion per band by hand on a tiny batch; CSV/PNG; DDP sums."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kd_lightning.callbacks.snr import SNREvaluation, confusion_by_snr, summarize_by_snr
from kd_lightning.data.base import KDDataModule
from kd_lightning.methods import Supervised
from kd_lightning.methods.skd import SKD
from tests.helpers.tiny import tiny_trainer

# Eight frames, three classes, three SNRs. Student and teacher predictions are read off the frames.
SNR = [-10, -10, -10, 0, 0, 12, 12, 12]
Y = [0, 1, 2, 0, 1, 0, 1, 2]
STUDENT = [0, 0, 2, 0, 1, 0, 1, 2]  # right: 2/3 at -10 dB, 2/2 at 0 dB, 3/3 at 12 dB
TEACHER = [1, 1, 1, 0, 0, 0, 1, 1]  # right: 1/3, 1/2, 2/3


class ReadOff(nn.Module):
    """Logits = 5 · one-hot of the class written in row ``row`` of the frame, plus a bias."""

    def __init__(self, row: int, num_classes: int = 3) -> None:
        super().__init__()
        self.row, self.num_classes = row, num_classes
        self.bias = nn.Parameter(torch.zeros(num_classes))  # something to train; tiny steps keep the argmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x[:, self.row, 0].long(), self.num_classes).float() * 5 + self.bias


class FixedFrames(KDDataModule):
    """The eight frames above as ``(x [B, 2, 4], y, snr)`` batches of 3 in every split."""

    num_classes = 3
    input_shape = (2, 4)
    classes = ("A", "B", "C")

    def __init__(self) -> None:
        super().__init__(batch_size=3, num_workers=0)

    def setup(self, stage: str) -> None:
        x = torch.zeros(8, 2, 4)
        x[:, 0, 0], x[:, 1, 0] = torch.tensor(STUDENT).float(), torch.tensor(TEACHER).float()
        data = TensorDataset(x, torch.tensor(Y), torch.tensor(SNR))
        self.train_set = self.val_set = self.test_set = data


def test_confusion_and_summary_by_hand() -> None:
    confusion = confusion_by_snr(torch.tensor(STUDENT), torch.tensor(Y), torch.tensor(SNR), 3)
    assert sorted(confusion) == [-10, 0, 12]
    assert confusion[-10].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert confusion[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    summary = summarize_by_snr(confusion, band_edges=(-4, 10), band_names=("low", "mid", "high"))
    assert summary.snrs == [-10, 0, 12] and summary.frames == [3, 2, 3]
    assert summary.accuracy == pytest.approx([2 / 3, 1.0, 1.0])
    assert summary.overall == pytest.approx(7 / 8)
    assert summary.bands == {"low": (-math.inf, -4), "mid": (-4, 10), "high": (10, math.inf)}
    assert summary.band_confusion["low"].tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert summary.band_accuracy == pytest.approx({"low": 2 / 3, "mid": 1.0, "high": 1.0})
    # Two bands split at 0 dB: [-10] and [0, 12].
    two = summarize_by_snr(confusion, band_edges=(0,), band_names=("neg", "pos"))
    assert two.band_confusion["pos"].sum() == 5 and two.band_accuracy["pos"] == 1.0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_distillation_run_logs_student_and_teacher_per_snr_and_writes_files(tmp_path: Path, precision: str) -> None:
    callback = SNREvaluation(stages=("val", "test"))
    module = SKD(ReadOff(0), ReadOff(1), num_classes=3)
    trainer = tiny_trainer(tmp_path, callbacks=[callback], precision=precision)
    trainer.test(module, datamodule=FixedFrames(), verbose=False)
    metrics = trainer.callback_metrics
    for snr, student, teacher in [(-10, 2 / 3, 1 / 3), (0, 1.0, 1 / 2), (12, 1.0, 2 / 3)]:
        assert metrics[f"test/acc_snr_{snr}"].item() == pytest.approx(student)
        assert metrics[f"test/teacher_acc_snr_{snr}"].item() == pytest.approx(teacher)
    assert metrics["test/acc_band_low"].item() == pytest.approx(2 / 3)
    assert metrics["test/teacher_acc_band_high"].item() == pytest.approx(2 / 3)
    assert metrics["test/acc"].item() == pytest.approx(7 / 8)  # the base's metric agrees

    rows = list(csv.reader((tmp_path / "snr_test_accuracy.csv").open()))
    assert rows[0] == ["snr", "frames", "student_acc", "teacher_acc"]
    assert rows[1][:2] == ["-10", "3"] and float(rows[1][2]) == pytest.approx(2 / 3)
    assert rows[4][:2] == ["all", "8"] and float(rows[4][2]) == pytest.approx(7 / 8)
    assert float(rows[4][3]) == pytest.approx(4 / 8)
    assert rows[5][0] == "band:low[-inf,-4)"
    confusion = list(csv.DictReader((tmp_path / "snr_test_confusion.csv").open()))
    low_student = {
        (r["true"], r["pred"]): int(r["count"]) for r in confusion if r["network"] == "student" and r["band"] == "low"
    }
    assert low_student[("B", "A")] == 1 and low_student[("A", "A")] == 1 and low_student[("C", "C")] == 1
    assert sum(low_student.values()) == 3
    png = tmp_path / "snr_test_accuracy.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert callback.results["test"]["teacher"].overall == pytest.approx(4 / 8)


def test_validation_stage_and_sanity_check_skipped(tmp_path: Path) -> None:
    callback = SNREvaluation(stages=("val",), include_teacher=False, plot=False)
    module = Supervised(ReadOff(0), num_classes=3, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    trainer = tiny_trainer(tmp_path, callbacks=[callback], num_sanity_val_steps=2, limit_train_batches=1)
    trainer.fit(module, datamodule=FixedFrames())
    assert trainer.callback_metrics["val/acc_snr_-10"].item() == pytest.approx(2 / 3)
    assert "test" not in callback.results and set(callback.results["val"]) == {"student"}
    assert (tmp_path / "snr_val_accuracy.csv").is_file() and not (tmp_path / "snr_val_accuracy.png").exists()
    # One validation epoch counted, not the sanity check on top of it.
    assert callback.results["val"]["student"].frames == [3, 2, 3]


def test_without_matplotlib_writes_the_csv_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    trainer = tiny_trainer(tmp_path, callbacks=[SNREvaluation()])
    with pytest.warns(UserWarning, match=r"kd-lightning\[plot\]"):
        trainer.test(Supervised(ReadOff(0), num_classes=3), datamodule=FixedFrames(), verbose=False)
    assert (tmp_path / "snr_test_accuracy.csv").is_file()
    assert not (tmp_path / "snr_test_accuracy.png").exists()


def test_batches_without_snr_warn_once() -> None:
    class NoSNR(FixedFrames):
        def setup(self, stage: str) -> None:
            super().setup(stage)
            x, y, _ = self.test_set.tensors
            self.test_set = TensorDataset(x, y)

    trainer = tiny_trainer(Path("."), callbacks=[SNREvaluation(dirpath="unused")], default_root_dir=None)
    with pytest.warns(UserWarning, match="carry no SNR"):
        trainer.test(Supervised(ReadOff(0), num_classes=3), datamodule=NoSNR(), verbose=False)
    assert not Path("unused").exists()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="band_names"):
        SNREvaluation(band_edges=(0.0,), band_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="ascending"):
        SNREvaluation(band_edges=(10.0, -4.0))
    with pytest.raises(ValueError, match="stages"):
        SNREvaluation(stages=("train",))


# ----------------------------------------------------------------------------------------------- DDP
class _FakeStrategy:
    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        assert reduce_op == "sum"
        torch.distributed.all_reduce(tensor)
        return tensor


class _FakeTrainer:
    world_size = 2
    strategy = _FakeStrategy()


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # Rank 0 sees SNRs -10 and 0; rank 1 sees 0 and 12 (the union must be aligned before summing).
    half = slice(0, 4) if rank == 0 else slice(3, 8)
    local = confusion_by_snr(torch.tensor(STUDENT[half]), torch.tensor(Y[half]), torch.tensor(SNR[half]), 3)
    synced = SNREvaluation._sync(_FakeTrainer(), torch.device("cpu"), local)
    torch.save({s: m for s, m in synced.items()}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow  # two spawned processes: ~30 s under CPU contention
def test_counts_are_summed_over_ranks_with_different_snrs(tmp_path: Path) -> None:
    out = str(tmp_path / "synced")
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    # Frame 3 (0 dB) is on both ranks, as a DistributedSampler's padding would duplicate it.
    expected = confusion_by_snr(torch.tensor([*STUDENT, 0]), torch.tensor([*Y, 0]), torch.tensor([*SNR, 0]), 3)
    for rank in range(2):
        synced = torch.load(f"{out}.{rank}")
        assert sorted(synced) == [-10, 0, 12]
        for snr, matrix in expected.items():
            assert torch.equal(synced[snr], matrix), (rank, snr)
