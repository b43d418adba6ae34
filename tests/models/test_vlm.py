"""VisionLanguageModel, its encoders, and the LMs' embeddings API (``embed`` + ``forward_embeds``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.lm import TinyGPT
from kd_lightning.models.vlm import DigitPatchEncoder, VisionLanguageModel, VLMOutput

PAD = 256


def tiny_lm(seed: int = 0, **kwargs: int) -> TinyGPT:
    torch.manual_seed(seed)
    args = {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, **kwargs}
    return TinyGPT(**args).eval()


def tiny_vlm(seed: int = 0, **kwargs: object) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = DigitPatchEncoder(channels=(4, 8), patch_size=(4, 4), image_size=(16, 64))
    return VisionLanguageModel(vision, tiny_lm(seed), **kwargs).eval()  # type: ignore[arg-type]


class ConstantTokens(nn.Module):
    """A vision 'encoder' that ignores the image: always the given tokens [N, C]."""

    def __init__(self, tokens: Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens.clone())
        self.out_dim = tokens.shape[-1]
        self.num_tokens = tokens.shape[0]

    def forward(self, images: Tensor) -> Tensor:
        return self.tokens.expand(images.shape[0], -1, -1)


def images(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 16, 64, generator=torch.Generator().manual_seed(1))


def left_pad(ids: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    padded = torch.cat([torch.full((ids.shape[0], pad), PAD), ids], 1)
    mask = torch.cat([torch.zeros(ids.shape[0], pad, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1)
    return padded, mask


# ---------------------------------------------------------------------------------------------- LM embeddings API
def test_tinygpt_forward_embeds_equals_forward_given_its_embeddings() -> None:
    lm = tiny_lm()
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 5:] = False  # right padding
    reference = lm(ids, mask)
    for hidden, attentions in ((False, False), (True, True)):
        logits, states, weights = lm.forward_embeds(lm.embed(ids), mask, hidden, attentions)
        assert torch.allclose(logits[mask], reference[mask], atol=1e-5)
        assert len(states) == (3 if hidden else 0) and len(weights) == (2 if attentions else 0)
    assert torch.allclose(lm.forward_embeds(lm.embed(ids))[0], lm(ids), atol=1e-5)
    assert torch.equal(lm.embed(ids), lm.token_embedding.weight[ids])
    # the last hidden state is what lm_head reads (after the final LayerNorm)
    logits, states, _ = lm.forward_embeds(lm.embed(ids), mask, output_hidden_states=True)
    assert torch.allclose(lm.lm_head(states[-1]), logits, atol=1e-6)


def test_tinygpt_explicit_attention_weights_are_causal_softmax_rows() -> None:
    lm = tiny_lm()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        _, _, weights = lm.forward_embeds(lm.embed(ids), mask, output_attentions=True)
    for w in weights:
        assert w.shape == (2, 2, 6, 6)
        assert torch.allclose(w.sum(-1), torch.ones(2, 2, 6), atol=1e-5)
        assert float(w.triu(1).abs().max()) == 0.0  # no key after the query
        assert float(w[1, :, 2:, :2].abs().max()) == 0.0  # real queries never read the padding


def test_hf_causal_lm_forward_embeds_matches_forward_and_restores_attention() -> None:
    pytest.importorskip("transformers")
    from kd_lightning.models.lm import HFCausalLM
    from tests.helpers.tiny_hf import TINY_LLAMA

    torch.manual_seed(0)
    lm = HFCausalLM(config=TINY_LLAMA, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    logits, states, weights = lm.forward_embeds(lm.embed(ids), mask, True, True)
    assert torch.allclose(logits[mask], lm(ids, mask)[mask], atol=1e-5)
    assert len(states) == 2 and states[0].shape == (2, 6, 16)
    assert len(weights) == 1 and weights[0].shape == (2, 2, 6, 6)
    assert torch.allclose(weights[0][1].sum(-1), torch.ones(2, 6), atol=1e-5)
    assert lm.model.config._attn_implementation == "sdpa"  # eager only for that call


# ---------------------------------------------------------------------------------------------- the VLM
def test_shapes_and_attributes() -> None:
    vlm = tiny_vlm()
    ids = torch.randint(0, 256, (2, 5))
    assert vlm.num_image_tokens == 4 and vlm.hidden_size == 16 and vlm.vision_dim == 8 and vlm.vocab_size == 264
    assert vlm.tokenizer_identity is None
    assert vlm.encode_images(images()).shape == (2, 4, 8)
    assert vlm.visual_tokens(images()).shape == (2, 4, 16)
    assert vlm(ids, images=images()).shape == (2, 5, 264)
    linear = tiny_vlm(projector="linear")
    assert isinstance(linear.projector, nn.Linear)
    pooled = tiny_vlm(num_image_tokens=2)
    assert pooled.visual_tokens(images()).shape == (2, 2, 16)


def test_text_logits_equal_the_lm_run_by_hand_on_visual_then_text_embeddings() -> None:
    lm = tiny_lm()
    visual_ids = torch.tensor([5, 17, 200])
    # the image path yields exactly the embeddings of three tokens (identity projector): the VLM must then be the LM
    # reading [those tokens; text] with the first three columns dropped
    vlm = VisionLanguageModel(ConstantTokens(lm.embed(visual_ids).detach()), lm, projector="linear").eval()
    with torch.no_grad():
        vlm.projector.weight.copy_(torch.eye(16))
        vlm.projector.bias.zero_()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    full_ids = torch.cat([visual_ids.expand(2, -1), ids], 1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.bool), mask], 1)
    by_hand = lm(full_ids, full_mask)[:, 3:]
    got = vlm(ids, mask, images=images())
    assert torch.allclose(got[mask], by_hand[mask], atol=1e-5)
    # visual_embeds (already projected) takes the same path
    assert torch.allclose(vlm(ids, mask, visual_embeds=lm.embed(visual_ids).expand(2, -1, -1))[mask], got[mask])


def test_left_padding_does_not_change_the_answer_logits_or_greedy_answers() -> None:
    vlm = tiny_vlm()
    prompt = torch.randint(0, 256, (1, 5))
    image = images(1)
    plain = vlm(prompt, images=image)[:, -1]
    for pad in (1, 4):
        ids, mask = left_pad(prompt, pad)
        assert torch.allclose(vlm(ids, mask, images=image)[:, -1], plain, atol=1e-5)
    # a batch of a short (left-padded) and a long prompt gives each row its own greedy answer
    other = torch.randint(0, 256, (1, 8))
    ids = torch.cat([left_pad(prompt, 3)[0], other])
    mask = torch.cat([left_pad(prompt, 3)[1], torch.ones_like(other, dtype=torch.bool)])
    both = vlm.generate(ids, mask, images=images(2), max_new_tokens=4, temperature=0)
    alone = vlm.generate(prompt, images=image, max_new_tokens=4, temperature=0)
    assert torch.equal(both[0, 8:], alone[0, 5:])


def test_generate_is_greedy_argmax_and_pads_after_eos() -> None:
    vlm = tiny_vlm()
    prompt = torch.randint(0, 256, (2, 4))
    image = images()
    out = vlm.generate(prompt, images=image, max_new_tokens=3, temperature=0)
    assert out.shape == (2, 7) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out[:, 4], vlm(prompt, images=image)[:, -1].argmax(-1))
    assert torch.equal(out[:, 5], vlm(out[:, :5], images=image)[:, -1].argmax(-1))
    first = int(out[0, 4])  # make the first generated token of row 0 the EOS: the rest of row 0 is padding
    stopped = vlm.generate(prompt, images=image, max_new_tokens=3, temperature=0, eos_token_id=first, pad_token_id=PAD)
    assert stopped[0, 4] == first and bool((stopped[0, 5:] == PAD).all())


def test_forward_detailed_hidden_states_and_attentions() -> None:
    vlm = tiny_vlm()
    ids = torch.randint(0, 256, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        out = vlm.forward_detailed(ids, mask, images=images(), output_hidden_states=True, output_attentions=True)
    assert isinstance(out, VLMOutput) and out.num_image_tokens == 4
    assert torch.allclose(out.logits[mask], vlm(ids, mask, images=images())[mask], atol=1e-6)
    assert out.visual_tokens.shape == (2, 4, 16)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 9, 16) for h in out.hidden_states)
    assert len(out.attentions) == 2
    for w in out.attentions:
        assert w.shape == (2, 2, 9, 9)
        assert torch.allclose(w.sum(-1), torch.ones(2, 2, 9), atol=1e-5)
        assert float(w[0, :, 6:, 4:6].abs().max()) == 0.0  # the text never reads its left padding
        assert float(w[0, :, 6:, :4].sum()) > 0  # ... but always the image tokens
    plain = vlm.forward_detailed(ids, mask, images=images())
    assert plain.hidden_states == () and plain.attentions == ()


def test_bad_inputs_are_one_line_errors() -> None:
    vlm = tiny_vlm()
    ids = torch.randint(0, 256, (1, 3))
    with pytest.raises(KDConfigError, match="exactly one of images and visual_embeds"):
        vlm(ids)
    with pytest.raises(KDConfigError, match="exactly one of images and visual_embeds"):
        vlm(ids, images=images(1), visual_embeds=torch.zeros(1, 4, 16))
    with pytest.raises(KDConfigError, match="visual_embeds must be"):
        vlm(ids, visual_embeds=torch.zeros(1, 4, 7))
    with pytest.raises(KDConfigError, match=r"VisionLanguageModel\.language"):
        VisionLanguageModel(DigitPatchEncoder(), nn.Linear(2, 2))
    with pytest.raises(KDConfigError, match=r"VisionLanguageModel\.projector"):
        VisionLanguageModel(DigitPatchEncoder(), tiny_lm(), projector="conv")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match=r"DigitPatchEncoder\.patch_size"):
        DigitPatchEncoder(patch_size=(3, 3))


def test_timm_encoder_tokens() -> None:
    pytest.importorskip("timm")
    from kd_lightning.models.vlm import TimmVisionEncoder

    encoder = TimmVisionEncoder("resnet10t", image_size=(32, 64))
    vlm = VisionLanguageModel(encoder, tiny_lm(), num_image_tokens=2).eval()
    assert encoder.num_tokens == 2 and vlm.vision_dim == encoder.out_dim
    assert vlm(torch.randint(0, 256, (2, 3)), images=torch.randn(2, 3, 32, 64)).shape == (2, 3, 264)


def test_pretrained_cell_encoder_reads_held_out_digits_and_survives_teacher_reinitialisation() -> None:
    from kd_lightning.models.vlm import digit_cell_rows
    from kd_lightning.teachers.training import reset_parameters

    encoder = DigitPatchEncoder(channels=(8, 16), pretrain_steps=60, pretrain_batch_size=32, output="probabilities")
    assert encoder.is_pretrained and encoder.out_dim == 11
    # The pretraining saw only the training digits (index % 5 != 4); score it on rows of those same digits, and
    # check determinism: the same arguments give the same weights whatever the global seed.
    images, labels = digit_cell_rows(64, 4, 16, 0.25, torch.Generator().manual_seed(123))
    images = ((images - images.mean()) / images.std()).repeat(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (encoder(images).argmax(1).flatten(1) == labels).float().mean()
    assert accuracy > 0.5  # 11 classes: chance is ~0.25 (empty cells); 60 steps already read most digits
    torch.manual_seed(7)
    again = DigitPatchEncoder(channels=(8, 16), pretrain_steps=60, pretrain_batch_size=32, output="probabilities")
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    # kd fit re-initialises a teacher before training it: the pretrained tower must keep its weights, the LM not.
    vlm = VisionLanguageModel(encoder, TinyGPT(d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    reset_parameters(vlm, seed=3)
    after = vlm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vision."))
    assert not torch.equal(before["language.token_embedding.weight"], after["language.token_embedding.weight"])
    frozen = DigitPatchEncoder(channels=(8, 16), pretrain_steps=60, pretrain_batch_size=32, freeze=True)
    assert not any(p.requires_grad for p in frozen.parameters())
