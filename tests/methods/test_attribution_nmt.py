"""AttributionGuidedNMT (kd_lightning.methods.attribution_nmt): injection, map caching, the Attributor, the CLI."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("captum")
pytest.importorskip("sacrebleu")

from kd_lightning.data.translation import TranslationDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods.attribution_nmt import AttributionGuidedNMT
from kd_lightning.models.seq2seq import TinySeq2Seq
from kd_lightning.utils.fingerprint import module_digest

V = 20


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest and keeps the timing stable on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- toy injection
def reorder_toy(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Dictionary translation with reversal: target_t = f(source_{L-1-t}); the true alignment is the anti-diagonal
    (and EOS -> EOS)."""
    src = torch.randint(4, V, (n, length), generator=generator)
    tgt = 4 + (src.flip(1) - 4) * 3 % (V - 4)
    inp = torch.cat([src, torch.full((n, 1), 2)], 1)
    dec = torch.cat([torch.ones(n, 1, dtype=torch.long), tgt], 1)
    lab = torch.cat([tgt, torch.full((n, 1), 2)], 1)
    align = torch.zeros(n, length + 1, length + 1)
    align[:, torch.arange(length), length - 1 - torch.arange(length)] = 1
    align[:, length, length] = 1
    return inp, dec, lab, align


def train_toy(inject: bool, steps: int = 20, length: int = 5) -> float:
    torch.manual_seed(0)
    model = TinySeq2Seq(V, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, max_len=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inp, dec, lab, align = reorder_toy(32, length, g)
        kw = {"cross_attention_maps": align, "injection": "replace"} if inject else {}
        logits = model(inp, torch.ones_like(inp, dtype=torch.bool), dec, **kw).logits
        loss = F.cross_entropy(logits.flatten(0, 1), lab.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    inp, dec, lab, align = reorder_toy(200, length, torch.Generator().manual_seed(99))
    kw = {"cross_attention_maps": align, "injection": "replace"} if inject else {}
    with torch.no_grad():
        logits = model(inp, torch.ones_like(inp, dtype=torch.bool), dec, **kw).logits
    return float((logits.argmax(-1) == lab).float().mean())


def test_true_alignment_under_replace_learns_reordering_faster() -> None:
    plain, injected = train_toy(False), train_toy(True)
    assert injected > 0.95
    assert injected > plain + 0.3


# ---------------------------------------------------------------------------------------------- maps and caching
def tiny_data() -> TranslationDataModule:
    dm = TranslationDataModule(num_train=24, num_val=8, num_test=8, max_vocab=64, batch_size=8, max_length=24)
    dm.setup("fit")
    return dm


def tiny_seq2seq(seed: int, d_model: int = 16) -> TinySeq2Seq:
    torch.manual_seed(seed)
    return TinySeq2Seq(64, d_model=d_model, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, max_len=32)


def method(teacher: TinySeq2Seq | None = None, **kwargs) -> AttributionGuidedNMT:
    kwargs.setdefault("map_cache_dir", None)
    return AttributionGuidedNMT(student=tiny_seq2seq(1), teacher=teacher or tiny_seq2seq(0, 32), **kwargs)


def test_maps_are_cached_as_safetensors_and_reused_without_teacher_forward(tmp_path) -> None:
    dm = tiny_data()
    first = method(attribution="saliency", map_cache_dir=str(tmp_path))
    first.prepare_maps(dm)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and first.map_origin == "computed"
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    second = method(attribution="saliency", map_cache_dir=str(tmp_path))
    second.teacher.load_state_dict(first.teacher.state_dict())
    calls = []
    second.teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    second.prepare_maps(dm)
    assert second.map_origin == "cache" and not calls
    for split in ("train", "val", "test"):
        torch.testing.assert_close(second.maps[split].maps, first.maps[split].maps)
    # another method or another teacher: a new cache entry
    third = method(attribution="attention", map_cache_dir=str(tmp_path))
    third.teacher.load_state_dict(first.teacher.state_dict())
    third.prepare_maps(dm)
    assert third.map_origin == "computed" and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_decoder_kwargs_give_batch_maps_and_check_shapes() -> None:
    dm = tiny_data()
    module = method(attribution="uniform", operator="multiply", eps=1e-3)
    module.prepare_maps(dm)
    batch = next(iter(dm.val_dataloader()))
    kwargs = module.decoder_kwargs(batch, "val")
    maps = kwargs["cross_attention_maps"]
    assert kwargs["injection"] == "multiply" and kwargs["injection_eps"] == 1e-3
    assert maps.shape == (batch["input_ids"].shape[0], batch["decoder_input_ids"].shape[1], batch["input_ids"].shape[1])
    real_rows = batch["labels"] != -100
    torch.testing.assert_close(maps.sum(-1)[real_rows], torch.ones(int(real_rows.sum())))
    assert maps[~batch["attention_mask"][:, None, :].expand_as(maps)].abs().max() == 0
    # the student runs with them (teacher forcing and greedy decoding)
    out = module.student(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], **kwargs)
    assert out.logits.shape[:2] == batch["decoder_input_ids"].shape
    # a batch whose lengths differ from the maps: one-line error naming the field
    bad = dict(batch)
    bad["attention_mask"] = batch["attention_mask"].clone()
    bad["attention_mask"][0, 0] = False
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.attribution: the map of val sample"):
        module.decoder_kwargs(bad, "val")


def test_attributor_is_trained_on_teacher_maps_and_reports_kl() -> None:
    dm = tiny_data()
    module = method(attribution="attention", map_source="attributor", attributor_epochs=0)
    module.prepare_maps(dm)
    untrained = module.map_quality["val/attributor_kl"]
    trained = method(attribution="attention", map_source="attributor", attributor_epochs=15, attributor_lr=1e-2)
    trained.teacher.load_state_dict(module.teacher.state_dict())
    trained.prepare_maps(dm)
    assert trained.map_quality["train/attributor_kl"] < untrained
    assert "val/map_entropy" in trained.map_quality
    assert not any(p.requires_grad for p in trained.attributor.parameters())
    assert all(p is not q for p in trained.trainable_parameters() for q in trained.attributor.parameters())


def test_bad_arguments_name_the_field() -> None:
    cases = {
        "attribution": ({"attribution": "lime"}, r"model\.init_args\.attribution: unknown attribution method 'lime'"),
        "operator": ({"operator": "max"}, r"model\.init_args\.operator: must be one of"),
        "map_source": ({"map_source": "oracle"}, r"model\.init_args\.map_source"),
        "eps": ({"eps": -1.0}, r"model\.init_args\.eps: must be >= 0"),
        "ig_steps": ({"ig_steps": 0}, r"model\.init_args\.ig_steps"),
        "baseline_attributor": (
            {"attribution": "uniform", "map_source": "attributor"},
            r"model\.init_args\.map_source: 'attributor' learns",
        ),
    }
    for kwargs, pattern in cases.values():
        with pytest.raises(KDConfigError, match=pattern):
            method(**kwargs)
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.attribution: 'value_zeroing' needs a TinySeq2Seq"):
        AttributionGuidedNMT(student=tiny_seq2seq(1), teacher=torch.nn.Linear(2, 2), attribution="value_zeroing")
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.student: Linear cannot take injected attention"):
        AttributionGuidedNMT(student=torch.nn.Linear(2, 2), teacher=tiny_seq2seq(0))
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.teacher: "):
        AttributionGuidedNMT(student=tiny_seq2seq(1), attribution="attention", map_cache_dir=None)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_fit_translation_attribution_kd(tmp_path) -> None:
    from tests.helpers.cli import TINY_TRANSLATION, fit_config

    cli = fit_config(
        "translation_attribution_kd.yaml",
        *TINY_TRANSLATION,
        "--model.init_args.attribution=value_zeroing",
        "--model.init_args.operator=multiply",
        f"--model.init_args.map_cache_dir={tmp_path}",
    )
    model = cli.model
    assert isinstance(model, AttributionGuidedNMT)
    assert model.teacher.training is False
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # the teacher is the one the maps were extracted from (never updated by training)
    assert module_digest(model.teacher) == model.map_teacher_digest
    assert "val/map_entropy" in cli.trainer.callback_metrics and "val/bleu" in cli.trainer.callback_metrics
    assert len(list(tmp_path.glob("teacher-value_zeroing-*.safetensors"))) == 1
