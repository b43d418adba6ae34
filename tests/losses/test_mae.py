"""MAE pieces of DMAE: masking, patchify, the masked reconstruction loss, the normalised L1, sin-cos embeddings."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kd_lightning.losses._common import gather_tokens
from kd_lightning.losses.mae import (
    DMAELoss,
    masked_reconstruction_loss,
    normalized_l1_loss,
    patchify,
    random_masking,
    unpatchify,
)
from kd_lightning.models.mae_decoder import MAEDecoder
from kd_lightning.models.positional import sincos_pos_embed_2d


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize(
    ("num_patches", "ratio", "kept"), [(16, 0.75, 4), (196, 0.75, 49), (10, 0.75, 2), (16, 0.0, 16)]
)
def test_random_masking_keeps_int_l_times_one_minus_r(num_patches: int, ratio: float, kept: int) -> None:
    ids_keep, ids_restore, mask = random_masking(3, num_patches, ratio)
    assert ids_keep.shape == (3, kept) and ids_restore.shape == (3, num_patches) and mask.shape == (3, num_patches)
    assert torch.equal(mask.sum(1), torch.full((3,), float(num_patches - kept)))
    for b in range(3):
        assert len(set(ids_keep[b].tolist())) == kept  # distinct patches
        assert mask[b, ids_keep[b]].eq(0).all()  # the visible ones are exactly the unmasked ones


def test_ids_restore_undoes_the_shuffle() -> None:
    ids_keep, ids_restore, mask = random_masking(2, 16, 0.75)
    tokens = torch.arange(16.0).repeat(2, 1).unsqueeze(-1)  # token l carries value l
    visible = gather_tokens(tokens, ids_keep)
    removed_ids = torch.stack([torch.nonzero(m).squeeze(1) for m in mask])  # any order of the removed ones...
    shuffle = torch.argsort(ids_restore, dim=1)  # ...but ids_restore defines the order: [kept, removed]
    assert torch.equal(shuffle[:, :4], ids_keep)
    assert torch.equal(shuffle[:, 4:].sort(1).values, removed_ids)
    removed = gather_tokens(tokens, shuffle[:, 4:])
    restored = torch.gather(torch.cat([visible, removed], 1), 1, ids_restore.unsqueeze(-1))
    assert torch.equal(restored, tokens)


def test_masking_is_reproducible_with_a_generator_and_random_without() -> None:
    a = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    assert not all(torch.equal(random_masking(4, 16, 0.75).ids_keep, a.ids_keep) for _ in range(3))


def test_masking_bad_ratio() -> None:
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        random_masking(1, 16, 1.0)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        random_masking(1, 4, 0.9)


# ---------------------------------------------------------------------------------------------- patchify
def test_patchify_order_by_hand() -> None:
    c, h, w, p = 2, 2, 4, 2
    images = torch.arange(c * h * w, dtype=torch.float32).reshape(1, c, h, w)
    expected = []
    for col in range(w // p):  # one row of two patches
        expected.append([images[0, ch, i, col * p + j].item() for i in range(p) for j in range(p) for ch in range(c)])
    assert patchify(images, p).tolist() == [expected]


def test_patchify_unpatchify_round_trip_and_rectangles() -> None:
    images = torch.randn(3, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (3, 16, 8 * 8 * 3)
    assert torch.equal(unpatchify(patches, 8, 4), images)
    rect = torch.randn(2, 1, 8, 12)
    assert torch.equal(unpatchify(patchify(rect, (4, 3)), (4, 3), (2, 4)), rect)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patchify(images, 5)


# ---------------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_loss_by_hand_on_two_patches() -> None:
    pred = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    target = [[0.0, 2.0, 5.0], [9.0, 9.0, 9.0]]
    mask = [[1.0, 0.0]]  # only patch 0 was removed: patch 1 (visible, huge error) does not count
    expected = ((1 - 0) ** 2 + (2 - 2) ** 2 + (3 - 5) ** 2) / 3
    got = masked_reconstruction_loss(torch.tensor([pred]), torch.tensor([target]), torch.tensor(mask))
    assert got.item() == pytest.approx(expected)


def test_reconstruction_loss_averages_over_removed_patches_not_samples() -> None:
    pred = torch.zeros(2, 2, 1)
    target = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # three removed patches
    assert masked_reconstruction_loss(pred, target, mask).item() == pytest.approx((1 + 4 + 16) / 3)


def test_reconstruction_loss_norm_pix_by_hand() -> None:
    target = [2.0, 4.0, 9.0]
    mean, var = statistics.fmean(target), statistics.variance(target)  # unbiased, as MAE's torch.var
    normed = [(t - mean) / math.sqrt(var + 1e-6) for t in target]
    pred = [0.5, -0.5, 1.0]
    expected = sum((p - n) ** 2 for p, n in zip(pred, normed)) / 3
    got = masked_reconstruction_loss(torch.tensor([[pred]]), torch.tensor([[target]]), torch.ones(1, 1), norm_pix=True)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must both be"):
        masked_reconstruction_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 2\)"):
        masked_reconstruction_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(2, 1))
    with pytest.raises(ValueError, match="removes no patch"):
        masked_reconstruction_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))


# ---------------------------------------------------------------------------------------------- feature loss
def test_normalized_l1_by_hand() -> None:
    student = torch.tensor([[3.0, 4.0]])  # -> (0.6, 0.8)
    teacher = torch.tensor([[2.0, 0.0]])  # -> (1, 0)
    assert normalized_l1_loss(student, teacher).item() == pytest.approx((0.4 + 0.8) / 2)


def test_normalized_l1_is_zero_for_equal_features_and_scale_invariant() -> None:
    teacher = torch.randn(2, 5, 8)
    assert normalized_l1_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert normalized_l1_loss(3.0 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert normalized_l1_loss(-teacher, teacher).item() > 0


def test_normalized_l1_gradient_reaches_the_student_only() -> None:
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    normalized_l1_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_normalized_l1_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="project the student's to the teacher's width"):
        normalized_l1_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


# ---------------------------------------------------------------------------------------------- sin-cos
def test_sincos_2d_by_hand() -> None:
    dim = 8  # per axis: 4 channels = sin/cos at omegas 1 and 1/100
    omegas = [1.0, 1.0 / 10000 ** (1 / 2)]
    emb = sincos_pos_embed_2d(dim, (2, 3), num_prefix_tokens=1)
    assert emb.shape == (1 + 6, dim)
    assert emb[0].abs().sum() == 0  # the CLS token gets zeros
    for row in range(2):
        for col in range(3):
            axis = lambda pos: [math.sin(pos * o) for o in omegas] + [math.cos(pos * o) for o in omegas]  # noqa: E731
            expected = axis(col) + axis(row)  # first half: column, second half: row (MAE's grid order)
            assert emb[1 + row * 3 + col].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(6, 2)


# ---------------------------------------------------------------------------------------------- DMAELoss, decoder
def test_dmae_loss_parts_and_weight() -> None:
    pred, target, mask = torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.tensor([[1.0, 0.0]])
    s, t = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[2.0, 0.0]]])
    parts = DMAELoss(distill_weight=0.5)(pred, target, mask, [s, s], [t, s])
    assert parts["rec"].item() == pytest.approx(1.0)
    assert parts["distill_0"].item() == pytest.approx(0.6) and parts["distill_1"].item() == pytest.approx(0.0)
    assert parts["distill"].item() == pytest.approx(0.5 * 0.6)
    assert parts["loss"].item() == pytest.approx(1.0 + 0.3)
    assert set(DMAELoss()(pred, target, mask, [s], [t])) == {"loss", "rec", "distill"}
    with pytest.raises(ValueError, match="distill_weight: must be a finite number >= 0"):
        DMAELoss(distill_weight=-1.0)


def test_decoder_shapes_fixed_position_embedding_and_unshuffle() -> None:
    torch.manual_seed(0)
    decoder = MAEDecoder(encoder_dim=12, grid_size=4, patch_dim=48, dim=16, depth=1, num_heads=4).eval()
    assert not decoder.pos_embed.requires_grad and "pos_embed" not in decoder.state_dict()
    assert torch.equal(decoder.pos_embed[0], sincos_pos_embed_2d(16, 4, 1))
    _, ids_restore, _ = random_masking(2, 16, 0.75)
    latent = torch.randn(2, 1 + 4, 12)
    pred = decoder(latent, ids_restore)
    assert pred.shape == (2, 16, 48)
    # Swapping the order of the visible tokens together with ids_restore changes nothing: tokens land by index.
    order = torch.tensor([1, 0, 3, 2])
    shuffle = torch.argsort(ids_restore, 1)
    new_shuffle = torch.cat([shuffle[:, :4][:, order], shuffle[:, 4:]], 1)
    swapped = torch.cat([latent[:, :1], latent[:, 1:][:, order]], 1)
    assert torch.allclose(decoder(swapped, torch.argsort(new_shuffle, 1)), pred, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of its number of heads"):
        MAEDecoder(encoder_dim=12, grid_size=4, patch_dim=48, dim=12, depth=1, num_heads=5)
