"""The seq2seq task sibling and Seq2SeqKD: corpus BLEU/chrF metric, setup checks, frozen teacher, CLI fit."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from kd_lightning.data.translation import TranslationDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import Seq2SeqKD, Seq2SeqSupervised
from kd_lightning.methods.tasks.seq2seq import SacreBLEUMetric
from kd_lightning.models.seq2seq import TinySeq2Seq

sacrebleu = pytest.importorskip("sacrebleu")

HYPS = ["the cat sat on the mat", "a dog runs", "lo kanu videk la gata", "un libro"]
REFS = ["the cat sat on a mat", "the dog runs fast", "lo kanu videk la gata", "una mensa"]


def _net(vocab: int = 64, d: int = 16, layers: int = 1, seed: int = 0, **kwargs) -> TinySeq2Seq:
    torch.manual_seed(seed)
    return TinySeq2Seq(vocab, d, 2, layers, layers, max_len=32, dropout=0.0, **kwargs)


def _data(**kwargs) -> TranslationDataModule:
    args = {"num_train": 32, "num_val": 8, "num_test": 8, "batch_size": 8, "max_vocab": 200, "max_length": 32}
    return TranslationDataModule(**{**args, **kwargs})


def _trainer(**kwargs) -> L.Trainer:
    args = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**args, **kwargs})


@pytest.mark.parametrize("kind", ["bleu", "chrf"])
def test_metric_equals_sacrebleu_corpus_score(kind) -> None:
    metric = SacreBLEUMetric(kind)
    metric.update(HYPS[:1], REFS[:1])  # in pieces, as batches (or ranks) would
    metric.update(HYPS[1:], REFS[1:])
    scorer = sacrebleu.corpus_bleu if kind == "bleu" else sacrebleu.corpus_chrf
    want = scorer(HYPS, [REFS]).score
    assert metric.compute().item() == pytest.approx(want, abs=1e-6)
    assert 0 < want < 100


def test_word_level_kd_loss_by_hand() -> None:
    from kd_lightning.losses.seq2seq_kd import WordLevelKDLoss

    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, T=2, V=2]
    t = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
    y = torch.tensor([[0, 1]])
    mask = torch.tensor([[True, False]])  # only the first token counts
    tau = 2.0
    loss = WordLevelKDLoss(temperature=tau, ce_weight=0.3, kd_weight=0.7)(s, t, y, mask)
    e = torch.e
    ce = -torch.log(torch.tensor(e / (e + 1)))  # softmax([1, 0])[0]
    q = torch.tensor([e**0.5, 1.0]) / (e**0.5 + 1)  # student at tau: softmax([0.5, 0])
    p = torch.tensor([1.0, e**0.5]) / (e**0.5 + 1)  # teacher at tau: softmax([0, 0.5])
    kl = (p * (p / q).log()).sum()
    assert loss["ce"].item() == pytest.approx(0.3 * ce.item(), rel=1e-5)
    assert loss["kd"].item() == pytest.approx(0.7 * tau**2 * kl.item(), rel=1e-5)
    assert loss["loss"].item() == pytest.approx(loss["ce"].item() + loss["kd"].item(), rel=1e-6)
    same = WordLevelKDLoss(kd_weight=1.0, ce_weight=0.0)(s, s.clone(), y, torch.ones_like(mask))
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-6) and "ce" not in same


def test_kd_gradients_reach_the_student_only_and_the_teacher_stays_frozen() -> None:
    dm = _data()
    teacher = _net(200, seed=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = Seq2SeqKD(
        _net(200), teacher, optimizer=functools.partial(torch.optim.AdamW, lr=0.01), val_decode_every_n_epochs=1
    )
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {"train/loss", "train/ce", "train/kd", "val/loss", "val/acc", "val/bleu", "val/chrf"} <= set(
        trainer.callback_metrics
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module.student.zero_grad()
    terms, count = module.token_loss_sums(batch)
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    assert int(count) == int((batch["labels"] != -100).sum())


def test_decoder_kwargs_reach_training_and_decoding() -> None:
    seen: list[tuple[str, str]] = []

    class Injected(Seq2SeqSupervised):
        def decoder_kwargs(self, batch, stage):
            seen.append((stage, "call"))
            s = batch["input_ids"].shape[1]
            maps = torch.zeros(batch["input_ids"].shape[0], 40, s)
            maps[..., 0] = 1.0  # attend to the first source word only
            return {"cross_attention_maps": maps, "injection": "replace"}

    dm = _data()
    module = Injected(_net(200), optimizer=functools.partial(torch.optim.AdamW, lr=0.01), eval_max_new_tokens=5)
    _trainer().fit(module, datamodule=dm)
    stages = {stage for stage, _ in seen}
    assert stages == {"train", "val"}  # the forward of both, and val's greedy decoding
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    out = module.student_output(batch, "val", output_attentions=True)
    first = out.cross_attentions[0][..., 0]
    torch.testing.assert_close(first, torch.ones_like(first))


def test_setup_checks_are_one_line_errors() -> None:
    dm = _data()
    module = Seq2SeqKD(_net(128), _net(200), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    with pytest.raises(KDConfigError) as err:
        _trainer().fit(module, datamodule=dm)
    message = str(err.value)
    assert "model.init_args.student.init_args.vocab_size" in message and "128" in message and "200" in message
    assert "\n" not in message
    module = Seq2SeqKD(_net(200, eos_token_id=5), _net(200), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    with pytest.raises(KDConfigError, match=r"student.init_args.eos_token_id: is 5 but the tokenizer .* uses 2"):
        _trainer().fit(module, datamodule=dm)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.temperature"):
        Seq2SeqKD(_net(), _net(), temperature=0.0)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.kd_weight"):
        Seq2SeqKD(_net(), _net(), kd_weight=-1.0)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.label_smoothing"):
        Seq2SeqSupervised(_net(), label_smoothing=1.0)


def test_cli_fit_of_the_kd_config_logs_bleu_and_chrf(in_tmp) -> None:
    from tests.helpers.cli import TINY_TRANSLATION, fit_config

    cli = fit_config("translation_seq2seq_kd.yaml", *TINY_TRANSLATION)
    metrics = cli.trainer.callback_metrics
    assert {"val/bleu", "val/chrf", "val/acc", "train/kd"} <= set(metrics)
    assert 0.0 <= float(metrics["val/bleu"]) <= 100.0 and 0.0 <= float(metrics["val/chrf"]) <= 100.0
    assert isinstance(cli.model, Seq2SeqKD) and not cli.model.teacher.training
    assert (in_tmp / "runs").exists()
