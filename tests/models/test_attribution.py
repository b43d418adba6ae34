"""Teacher attribution maps (kd_lightning.models.attribution) and the Attributor (kd_lightning.models.attributor)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("captum")

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.attribution_nmt import attribution_row_kl
from kd_lightning.models.attribution import (
    METHODS,
    check_map_shape,
    extract_attributions,
    normalise_attributions,
)
from kd_lightning.models.attributor import Attributor
from kd_lightning.models.seq2seq import TinySeq2Seq

V, B, S, T = 24, 3, 6, 5


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest and keeps the timing stable on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_teacher(seed: int = 0) -> TinySeq2Seq:
    torch.manual_seed(seed)
    return TinySeq2Seq(V, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, max_len=16, dropout=0.1)


def tiny_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Example 0 has 2 source padding columns, example 1 has 2 padded target rows."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False
    src[0, 4:] = 0
    dec = torch.randint(4, V, (B, T), generator=g)
    dec[:, 0] = 1
    labels = torch.cat([dec[:, 1:], torch.full((B, 1), 2)], 1)
    labels[1, 3:] = -100
    dec[1, 4:] = 0
    return {
        "input_ids": src,
        "attention_mask": mask,
        "decoder_input_ids": dec,
        "decoder_attention_mask": labels != -100,
        "labels": labels,
    }


@pytest.fixture(scope="module")
def teacher() -> TinySeq2Seq:
    return tiny_teacher().eval()


@pytest.mark.parametrize("method", METHODS)
def test_rows_never_use_future_target_tokens(teacher: TinySeq2Seq, method: str) -> None:
    """Row t of every method is unchanged when the target tokens after t change (teacher-forced prefix only),
    and each method does depend on the target (rows after t change) except the baselines."""
    batch = tiny_batch()
    t = 1
    changed = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(7)
    new = torch.randint(4, V, (B, T), generator=g)
    # y_j for j > t: labels[:, j] and decoder_input_ids[:, j + 1]
    changed["labels"][:, t + 1 :] = torch.where(batch["labels"][:, t + 1 :] == -100, -100, new[:, t + 1 :])
    changed["decoder_input_ids"][:, t + 2 :] = new[:, t + 2 :]
    kwargs = {"steps": 4, "shap_samples": 4}
    a = extract_attributions(teacher, batch, method, **kwargs)
    b = extract_attributions(teacher, changed, method, **kwargs)
    assert a.shape == (B, T, S)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    if method not in ("uniform", "random"):
        assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4
    assert teacher.training is False


def test_attention_is_mean_of_last_cross_attention_by_hand(teacher: TinySeq2Seq) -> None:
    batch = tiny_batch()
    a = extract_attributions(teacher, batch, "attention")
    # By hand: the last decoder layer's cross-attention, recomputed from its projections.
    with torch.no_grad():
        memory, _, _ = teacher.encode(batch["input_ids"], batch["attention_mask"])
        out = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")})
        x = out.decoder_hidden_states[-2]  # input of the last decoder layer
        layer = teacher.decoder_layers[-1]
        h = layer.self_attn_norm(x)
        attended, _ = layer.self_attn(h, h, None, causal=True)
        q_in = layer.cross_attn_norm(x + attended)
        att = layer.cross_attn
        q = att.q_proj(q_in).view(B, T, 2, 8).transpose(1, 2)
        k = att.k_proj(memory).view(B, S, 2, 8).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / 8**0.5
        scores = scores.masked_fill(~batch["attention_mask"][:, None, None, :], float("-inf"))
        expected = scores.softmax(-1).mean(1)
    real_rows = batch["labels"] != -100
    torch.testing.assert_close(a[real_rows], expected[real_rows], atol=1e-5, rtol=1e-4)
    # heads: one head only
    head0 = extract_attributions(teacher, batch, "attention", heads=[0])
    torch.testing.assert_close(head0[real_rows], scores.softmax(-1)[:, 0][real_rows], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["attention", "saliency", "integrated_gradients", "value_zeroing", "random"])
def test_rows_sum_to_one_and_padding_columns_are_zero(teacher: TinySeq2Seq, method: str) -> None:
    batch = tiny_batch()
    a = extract_attributions(teacher, batch, method, steps=4)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(B, T))
    assert a[0, :, 4:].abs().max() == 0
    # a padded target row is uniform over the real source tokens
    torch.testing.assert_close(a[1, 4], torch.full((S,), 1.0 / S))


def test_normalise_by_hand() -> None:
    raw = torch.tensor([[[1.0, -3.0, 5.0], [0.0, 0.0, 7.0]]])
    mask = torch.tensor([[True, True, False]])
    out = normalise_attributions(raw, mask)
    torch.testing.assert_close(out, torch.tensor([[[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]]]))


def test_value_zeroing_of_an_ignored_token_is_zero(teacher: TinySeq2Seq) -> None:
    """Token 2 of example 0 is hidden from the teacher (attention mask off) so its cross-attention weight is 0:
    zeroing its value cannot change the decoder output; real tokens do change it."""
    batch = tiny_batch()
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][0, 2] = False
    raw = extract_attributions(teacher, batch, "value_zeroing", normalise=False)
    assert raw[0, :, 2].abs().max() < 1e-6
    assert raw[0, :, [0, 1, 3]].min() > 1e-6
    # and the value-zeroing distances equal a direct one-token computation
    scale = torch.ones(B, S)
    scale[:, 3] = 0
    for module in teacher.attention_modules("cross"):
        module.value_scale = scale
    try:
        with torch.no_grad():
            zeroed = teacher(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    finally:
        for module in teacher.attention_modules("cross"):
            module.value_scale = None
    with torch.no_grad():
        ref = teacher(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"])
    distance = 1 - torch.cosine_similarity(zeroed.decoder_hidden_states[-1], ref.decoder_hidden_states[-1], dim=-1)
    real = batch["labels"] != -100
    torch.testing.assert_close(raw[:, :, 3][real], distance[real], atol=1e-5, rtol=1e-4)


def test_uniform_and_random_shapes_without_teacher() -> None:
    batch = tiny_batch()
    u = extract_attributions(None, batch, "uniform")
    r = extract_attributions(None, batch, "random", seed=3)
    assert u.shape == r.shape == (B, T, S)
    torch.testing.assert_close(u[2], torch.full((T, S), 1.0 / S))
    torch.testing.assert_close(r, extract_attributions(None, batch, "random", seed=3))
    assert not torch.allclose(r, extract_attributions(None, batch, "random", seed=4))


def test_bad_inputs(teacher: TinySeq2Seq) -> None:
    batch = tiny_batch()
    with pytest.raises(KDConfigError, match=r"model\.init_args\.attribution: unknown attribution method 'lime'.*"):
        extract_attributions(teacher, batch, "lime")
    with pytest.raises(KDConfigError, match=r"model\.init_args\.attribution:.*value_zeroing.*TinySeq2Seq"):
        extract_attributions(torch.nn.Linear(2, 2), batch, "value_zeroing")
    with pytest.raises(KDConfigError, match=r"model\.init_args\.attention_layer"):
        extract_attributions(teacher, batch, "attention", layer=5)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.attribution: the attribution maps have shape"):
        check_map_shape(torch.zeros(B, T + 1, S), batch)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.attribution_layer"):
        extract_attributions(teacher, batch, "layer_gradient_x_activation", attribution_layer="nope")


def test_attributor_training_reduces_kl_and_is_causal() -> None:
    # Toy: the target map is a reversal alignment; the Attributor learns it.
    torch.manual_seed(0)
    n, s = 32, 5
    src = torch.randint(4, V, (n, s))
    dec = torch.cat([torch.ones(n, 1, dtype=torch.long), src.flip(1)[:, :-1]], 1)
    labels = src.flip(1)
    a = torch.eye(s).flip(1).expand(n, s, s)
    model = Attributor(V, d_model=16, n_heads=2, max_len=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mask = torch.ones(n, s, dtype=torch.bool)
    before = attribution_row_kl(a, model(src, mask, dec, labels)).item()
    for _ in range(60):
        loss = attribution_row_kl(a, model(src, mask, dec, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before
    # causal: row 0 does not change when later target tokens change
    model.eval()
    changed = labels.clone()
    changed[:, 2:] = (changed[:, 2:] + 1) % V
    out1, out2 = model(src, mask, dec, labels), model(src, mask, dec, changed)
    torch.testing.assert_close(out1[:, :2], out2[:, :2])
