"""TinySeq2Seq / inject_attention / HFSeq2SeqLM: hand-computed injection, masking, value scaling, greedy decoding."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.models.seq2seq import TinySeq2Seq, inject_attention

P = torch.tensor([[[[0.625, 0.375, 0.0], [0.25, 0.75, 0.0]]]])  # [B=1, H=1, T=2, S=3], column 2 masked
A_RAW = torch.tensor([[[2.0, 1.0, 5.0], [0.0, 3.0, 1.0]]])  # [B=1, T=2, S=3]; column 2 is padding
KEY_MASK = torch.tensor([[True, True, False]])


def _model(**kwargs) -> TinySeq2Seq:
    torch.manual_seed(0)
    args = {"vocab_size": 20, "d_model": 16, "n_heads": 2, "n_encoder_layers": 1, "n_decoder_layers": 2}
    return TinySeq2Seq(**{**args, "max_len": 16, "dropout": 0.0, **kwargs}).eval()


# ---------------------------------------------------------------------------------------------- inject_attention
def test_injection_operators_by_hand() -> None:
    # A after masking column 2 and renormalising: row 0 = [2/3, 1/3, 0], row 1 = [0, 1, 0]
    a = torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1.0, 0.0]])
    p = P[0, 0]
    expected = {
        "add": torch.stack([(p[0] + a[0]) / (p[0] + a[0]).sum(), (p[1] + a[1]) / (p[1] + a[1]).sum()]),
        "average": (p + a) / 2,
        "replace": a,
    }
    eps = 0.01
    bump = torch.tensor([eps, eps, 0.0])  # eps only on the real columns
    mult = p * a + bump
    expected["multiply"] = mult / mult.sum(-1, keepdim=True)
    # numbers spelled out: add row 0 = (0.625 + 2/3, 0.375 + 1/3, 0) / 2; multiply row 1 = (eps, 0.75 + eps, 0) / sum
    assert expected["add"][0].tolist() == pytest.approx([(0.625 + 2 / 3) / 2, (0.375 + 1 / 3) / 2, 0.0])
    assert expected["multiply"][1].tolist() == pytest.approx(
        [eps / (0.75 + 2 * eps), (0.75 + eps) / (0.75 + 2 * eps), 0]
    )
    for operator, want in expected.items():
        got = inject_attention(P, A_RAW, operator, eps=eps, key_mask=KEY_MASK)[0, 0]
        assert got[:, 2].abs().max() == 0, operator
        torch.testing.assert_close(got, want, msg=operator)
        torch.testing.assert_close(got.sum(-1), torch.ones(2), msg=operator)


def test_empty_rows_fall_back_to_p_and_heads_broadcast() -> None:
    a = A_RAW.clone()
    a[0, 1] = torch.tensor([0.0, 0.0, 4.0])  # only padding mass: empty after masking
    p = P.expand(1, 3, 2, 3)  # three heads
    for operator in ("add", "multiply", "average", "replace"):
        got = inject_attention(p, a, operator, key_mask=KEY_MASK)
        torch.testing.assert_close(got[:, :, 1], p[:, :, 1])
        assert torch.equal(got[:, 0], got[:, 2])  # one map for every head


def test_injection_rejects_bad_operator_and_shapes() -> None:
    with pytest.raises(KDConfigError, match="injection"):
        inject_attention(P, A_RAW, "concat")
    with pytest.raises(KDConfigError, match="cross_attention_maps"):
        inject_attention(P, A_RAW[:, :, :2], "add")


# ---------------------------------------------------------------------------------------------- TinySeq2Seq
def test_shapes_and_attention_outputs() -> None:
    model = _model()
    src, tgt = torch.randint(4, 20, (3, 7)), torch.randint(4, 20, (3, 5))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(src, mask, tgt, output_attentions=True)
    assert out.logits.shape == (3, 5, 20)
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (3, 2, 5, 7)
    assert out.cross_attentions[0][1, :, :, 4:].abs().max() == 0  # padding keys get no weight
    assert len(out.encoder_hidden_states) == 2 and out.encoder_last_hidden_state.shape == (3, 7, 16)
    assert model(src, mask, tgt).cross_attentions == ()


def test_decoder_is_causal() -> None:
    model = _model()
    src, tgt = torch.randint(4, 20, (2, 6)), torch.randint(4, 20, (2, 5))
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] + 1 - 4) % 16 + 4
    a = model(src, None, tgt).logits
    b = model(src, None, changed).logits
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_source_padding_does_not_matter() -> None:
    model = _model()
    src, tgt = torch.randint(4, 20, (1, 5)), torch.randint(4, 20, (1, 4))
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(model(src, None, tgt).logits, model(padded, mask, tgt).logits)


def test_value_scale_zero_removes_a_source_token_from_the_cross_attention_output() -> None:
    model = _model()
    attn = model.attention_modules("cross")[0]
    query, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    _, weights = attn(query, memory)
    scale = torch.ones(2, 6)
    scale[:, 2] = 0.0
    attn.value_scale = scale
    out, weights_scaled = attn(query, memory)
    attn.value_scale = None
    torch.testing.assert_close(weights_scaled, weights)  # the weights are unchanged
    v = attn._heads(attn.v_proj(memory))  # [B, H, S, dh]
    keep = [0, 1, 3, 4, 5]
    context = weights[..., keep] @ v[:, :, keep]  # Σ_{j≠2} P_j V_j
    want = attn.out_proj(context.transpose(1, 2).reshape(2, 4, 16))
    torch.testing.assert_close(out, want)

    # and token 2's value vector no longer matters: replacing it changes the output only without the scale
    def noisy_value(module, args, output):
        output = output.clone()
        output[:, 2] = torch.randn_like(output[:, 2]) * 10
        return output

    hook = attn.v_proj.register_forward_hook(noisy_value)
    try:
        changed, _ = attn(query, memory)
        attn.value_scale = scale
        unchanged, _ = attn(query, memory)
    finally:
        hook.remove()
        attn.value_scale = None
    torch.testing.assert_close(unchanged, out)
    assert not torch.allclose(changed, out)


def test_injection_in_forward_uses_the_map_rows_and_only_the_chosen_layers() -> None:
    model = _model()
    src, tgt = torch.randint(4, 20, (2, 5)), torch.randint(4, 20, (2, 4))
    maps = torch.rand(2, 3, 5)  # 3 rows for 4 target positions: row 3 is not injected
    plain = model(src, None, tgt, output_attentions=True)
    out = model(
        src, None, tgt, cross_attention_maps=maps, injection="replace", injection_layers=[1], output_attentions=True
    )
    torch.testing.assert_close(out.cross_attentions[0], plain.cross_attentions[0])  # layer 0 untouched
    torch.testing.assert_close(
        out.cross_attentions[1][:, :, :3], (maps / maps.sum(-1, keepdim=True))[:, None].expand(2, 2, 3, 5)
    )
    # row 3 (beyond the map) keeps the model's own weights: layer 1's queries come from the untouched layer 0
    torch.testing.assert_close(out.cross_attentions[1][:, :, 3], plain.cross_attentions[1][:, :, 3])
    assert not torch.allclose(out.logits, plain.logits)
    with pytest.raises(KDConfigError, match="cross_attention_maps"):
        model(src, None, tgt, injection="add")
    with pytest.raises(KDConfigError, match="injection_layers"):
        model(src, None, tgt, cross_attention_maps=maps, injection="add", injection_layers=[5])


@pytest.mark.parametrize("injection", [None, "multiply"])
def test_greedy_generate_is_argmax_of_the_teacher_forced_forward(injection) -> None:
    model = _model(eos_token_id=2)
    src = torch.randint(4, 20, (3, 6))
    mask = torch.ones_like(src, dtype=torch.bool)
    mask[2, 4:] = False
    maps = torch.rand(3, 8, 6) if injection else None
    generated = model.generate(src, mask, max_new_tokens=8, cross_attention_maps=maps, injection=injection)
    assert generated.shape[0] == 3 and generated.shape[1] <= 8
    decoder_in = torch.cat([torch.full((3, 1), model.bos_token_id), generated[:, :-1]], 1)
    logits = model(src, mask, decoder_in, cross_attention_maps=maps, injection=injection).logits
    argmax = logits.argmax(-1)
    for row in range(3):
        tokens = generated[row].tolist()
        n = tokens.index(2) + 1 if 2 in tokens else len(tokens)  # up to the first EOS
        assert argmax[row, :n].tolist() == tokens[:n]
        assert all(t == model.pad_token_id for t in tokens[n:])


def test_tied_embeddings_and_bad_arguments() -> None:
    model = _model()
    assert model.lm_head.weight is model.source_embedding.weight is model.target_embedding.weight
    model.init_weights()  # re-initialising keeps the table an embedding (std d^-1/2), not a Xavier matrix
    assert model.lm_head.weight.std().item() == pytest.approx(16**-0.5, rel=0.2)
    with pytest.raises(KDConfigError, match="n_heads"):
        TinySeq2Seq(vocab_size=20, d_model=10, n_heads=3)
    with pytest.raises(KDConfigError, match="positions"):
        TinySeq2Seq(vocab_size=20, d_model=16, n_heads=2, positions="rotary")
    with pytest.raises(KDConfigError, match="max_len"):
        _model()(torch.randint(4, 20, (1, 17)), None, torch.randint(4, 20, (1, 2)))


# ---------------------------------------------------------------------------------------------- HFSeq2SeqLM
@pytest.mark.parametrize("model_type", ["marian", "bart"])
def test_hf_seq2seq_forward_attentions_and_refused_injection(model_type) -> None:
    pytest.importorskip("transformers")
    from kd_lightning.models.seq2seq import HFSeq2SeqLM

    config = {
        "model_type": model_type,
        "vocab_size": 20,
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    model = HFSeq2SeqLM(config=config).eval()
    src, tgt = torch.randint(4, 20, (2, 6)), torch.randint(4, 20, (2, 4))
    out = model(src, torch.ones_like(src), tgt, output_attentions=True)
    assert out.logits.shape == (2, 4, 20) and out.cross_attentions[0].shape == (2, 2, 4, 6)
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(2, 2, 4))
    assert model.vocab_size == 20 and model.bos_token_id == 1
    generated = model.generate(src, torch.ones_like(src), max_new_tokens=5)
    assert generated.shape[0] == 2 and generated.shape[1] <= 5
    with pytest.raises(KDConfigError, match="injection"):
        model(src, None, tgt, cross_attention_maps=torch.rand(2, 4, 6), injection="add")
    with pytest.raises(KDConfigError, match="exactly one"):
        HFSeq2SeqLM()


def test_add_and_average_coincide_when_both_maps_are_row_distributions() -> None:
    # The spec's add = rownorm(P + A) and average = (P + A) / 2 are the same operator once A is row-normalised (as
    # inject_attention does): every row of P + A sums to 2. The translation grid measured identical BLEU for both.
    P = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    A = torch.rand(2, 4, 5)
    assert torch.allclose(inject_attention(P, A, "add"), inject_attention(P, A, "average"), atol=1e-6)
    assert not torch.allclose(inject_attention(P, A, "add"), inject_attention(P, A, "multiply"), atol=1e-3)
