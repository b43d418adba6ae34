"""EpochSummary (line format, rank zero only, one line per epoch), quiet_lightning, ExpectedWarnings."""

from __future__ import annotations

import io
import logging
import re
import warnings
from types import SimpleNamespace

import torch

from kd_lightning.callbacks import EpochSummary
from kd_lightning.callbacks.progress import format_epoch_line, quiet_lightning
from kd_lightning.methods import VanillaKD
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def test_line_format() -> None:
    line = format_epoch_line(3, 30, {"loss": 0.41249, "val acc": 0.91234, "agreement": 0.9012}, 1.234)
    assert line == "epoch  3/30  loss 0.412  val acc 91.2%  agreement 90.1%  (1.2 s)"
    assert (
        format_epoch_line(12, 30, {"loss": 2.0}, 0.05, prefix="teacher") == "teacher epoch 12/30  loss 2.000  (0.1 s)"
    )
    # Perplexity (language models) and, without accuracy or perplexity, the validation loss; no /N without a length.
    assert format_epoch_line(1, None, {"val ppl": 12.345}, 2.0) == "epoch 1  val ppl 12.35  (2.0 s)"
    assert format_epoch_line(1, -1, {"val loss": 0.5}, 2.0) == "epoch 1  val loss 0.500  (2.0 s)"


def _fake_trainer(rank_zero: bool) -> SimpleNamespace:
    return SimpleNamespace(
        is_global_zero=rank_zero,
        sanity_checking=False,
        current_epoch=4,
        max_epochs=10,
        callback_metrics={
            "train/loss_epoch": torch.tensor(0.25),
            "train/loss_step": torch.tensor(9.0),
            "val/acc": torch.tensor(0.5),
            "val/agreement": torch.tensor(0.75),
        },
    )


def test_prints_on_rank_zero_only() -> None:
    for rank_zero, expected in ((True, 1), (False, 0)):
        stream = io.StringIO()
        callback = EpochSummary(stream=stream)
        trainer = _fake_trainer(rank_zero)
        callback.on_train_epoch_start(trainer, None)
        callback.on_validation_end(trainer, None)
        callback.on_train_epoch_end(trainer, None)
        lines = stream.getvalue().splitlines()
        assert len(lines) == expected
        if expected:
            assert re.fullmatch(r"epoch  5/10  loss 0\.250  val acc 50\.0%  agreement 75\.0%  \(\d+\.\d s\)", lines[0])


def test_no_validation_metrics_on_epochs_without_validation() -> None:
    stream = io.StringIO()
    callback = EpochSummary(stream=stream)
    trainer = _fake_trainer(True)
    callback.on_train_epoch_start(trainer, None)
    callback.on_train_epoch_end(trainer, None)  # no on_validation_end this epoch: the val metrics are stale
    assert "val acc" not in stream.getvalue() and "loss 0.250" in stream.getvalue()


def test_one_line_per_epoch_in_a_fit(tmp_path) -> None:
    stream = io.StringIO()
    data = BlobsDataModule(num_classes=4)
    teacher = TinyNet(num_classes=4)
    model = VanillaKD(student=TinyNet(num_classes=4, hidden=8), teacher=teacher, top_k=2)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[EpochSummary(prefix="kd", stream=stream)])
    trainer.fit(model, datamodule=data)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("kd: VanillaKD: student TinyNet (") and "teacher TinyNet (" in lines[0]
    assert lines[0].endswith("; 2 epochs x 4 steps on cpu")
    for epoch, line in enumerate(lines[1:], start=1):
        assert re.fullmatch(
            rf"kd epoch {epoch}/2  loss \d+\.\d{{3}}  val acc \d+\.\d%  agreement \d+\.\d%  \(\d+\.\d s\)", line
        )
    # The printed values are the epoch's logged metrics.
    assert f"val acc {100 * float(trainer.callback_metrics['val/acc']):.1f}%" in lines[-1]


def test_quiet_lightning_is_scoped() -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = logger.level
    with quiet_lightning():
        assert logger.level == logging.WARNING
    assert logger.level == before


def test_expected_warnings_muted_only_for_frozen_teachers(tmp_path) -> None:
    """The eval-mode warning is muted when the modules in eval mode are exactly the frozen teacher's."""

    def caught(model) -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=BlobsDataModule())
        return [str(w.message) for w in seen if "eval mode" in str(w.message)]

    assert caught(VanillaKD(student=TinyNet(), teacher=TinyNet())) == []

    class HalfFrozen(TinyNet):
        """Keeps its BatchNorm in eval mode: the user's business, so still reported."""

        def train(self, mode: bool = True) -> HalfFrozen:
            super().train(mode)
            self.body[2].eval()
            return self

    assert len(caught(VanillaKD(student=HalfFrozen(), teacher=TinyNet()))) == 1
    before = list(warnings.filters)
    tiny_trainer(tmp_path, max_steps=1).fit(
        VanillaKD(student=TinyNet(), teacher=TinyNet()), datamodule=BlobsDataModule()
    )
    assert warnings.filters == before  # scoped: the filters are gone after the fit
