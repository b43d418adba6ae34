"""RadioML networks: shapes for L = 128 and 1024, pinned parameter counts, PSCA branches, feature stages."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.models.radioml import KDCNN, PSCA, ClST, ClSTLike, CTPBlock, KDMobileNet
from kd_lightning.models.taps import FeatureTaps


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: Parameter counts of the defaults (11 classes; the counts do not depend on the frame length).
PINNED = {ClST: 570_483, KDCNN: 22_987, KDMobileNet: 35_131}


@pytest.mark.parametrize("cls", [ClST, KDCNN, KDMobileNet], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("length", "classes"), [(128, 11), (1024, 24)])
def test_output_shape_and_pinned_parameter_count(cls: type, length: int, classes: int) -> None:
    torch.manual_seed(0)
    model = cls(num_classes=classes, input_length=length).eval()
    out = model(torch.randn(3, 2, length))
    assert out.shape == (3, classes) and torch.isfinite(out).all()
    count = n_params(model)
    head_delta = (classes - 11) * (model.classifier_in_features + 1)
    print(f"{cls.__name__} L={length} K={classes}: {count:,} parameters")
    assert count == PINNED[cls] + head_delta


def test_clst_default_strides_follow_the_frame_length() -> None:
    assert ClST(input_length=128).strides == (2, 2, 2)
    assert ClST(input_length=1024).strides == (4, 2, 2)
    assert ClST(input_length=1024, strides=(2, 2, 2)).strides == (2, 2, 2)
    assert ClSTLike is ClST


@pytest.mark.parametrize(("length", "tokens"), [(128, (64, 32, 16)), (1024, (256, 128, 64))])
def test_clst_feature_stages_are_channel_first_with_the_stated_lengths(length: int, tokens: tuple) -> None:
    model = ClST(input_length=length, embed_dims=(8, 16, 32), num_heads=(1, 2, 4)).eval()
    assert model.stage_channels() == {"stages.0": 8, "stages.1": 16, "stages.2": 32}
    _, feats = FeatureTaps(model, list(model.feature_stages))(torch.randn(2, 2, length))
    assert [tuple(f.shape) for f in feats.values()] == [(2, c, n) for c, n in zip((8, 16, 32), tokens)]


@pytest.mark.parametrize("cls", [KDCNN, KDMobileNet], ids=lambda c: c.__name__)
def test_student_feature_stages_resolve(cls: type) -> None:
    model = cls().eval()
    _, feats = FeatureTaps(model, list(model.feature_stages))(torch.randn(2, 2, 128))
    assert [f.shape[1] for f in feats.values()] == list(model.feature_dims)


def test_kdcnn_time_axis_halves_per_block() -> None:
    _, feats = FeatureTaps(KDCNN().eval(), ["blocks.0", "blocks.3"])(torch.randn(1, 2, 128))
    assert feats["blocks.0"].shape == (1, 32, 64) and feats["blocks.3"].shape == (1, 64, 8)


# ----------------------------------------------------------------------------------------------- PSCA
def test_psca_branches_parameter_sets_and_outputs() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 16, 8)
    branches = {b: PSCA(8, num_heads=2, channel_branch=b).eval() for b in ("se", "xcit", "none")}
    assert branches["none"].channel is None
    assert type(branches["se"].channel).__name__ == "_SqueezeExcitation"
    assert type(branches["xcit"].channel).__name__ == "_CrossCovarianceAttention"
    # Same spatial weights: the outputs differ exactly by the channel branch.
    for b in ("se", "xcit"):
        branches[b].load_state_dict(branches["none"].state_dict(), strict=False)
        expected = branches["none"](h) + branches[b].channel(h)
        assert torch.allclose(branches[b](h), expected, atol=1e-6)
        assert branches[b](h).shape == h.shape


def test_se_branch_is_a_sigmoid_gate_of_the_token_mean() -> None:
    torch.manual_seed(0)
    se = PSCA(8, channel_branch="se", se_reduction=4).channel
    h = torch.randn(2, 5, 8)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(h.mean(1)))))
    assert torch.allclose(se(h), h * gate[:, None, :])
    assert se.fc1.out_features == 2


def test_spatial_attention_matches_a_plain_softmax_attention() -> None:
    torch.manual_seed(0)
    psca = PSCA(8, num_heads=2, channel_branch="none", kv_stride=2).eval()
    h = torch.randn(1, 6, 8)
    q, k, v = psca.q(h), psca.k(h), psca.v(h)
    assert k.shape == (1, 3, 8)  # squeezed keys/values: ceil(6 / 2) tokens
    heads = []
    for i in range(2):
        sl = slice(4 * i, 4 * i + 4)
        weights = torch.softmax(q[0, :, sl] @ k[0, :, sl].T / 2.0, dim=-1)
        heads.append(weights @ v[0, :, sl])
    assert torch.allclose(psca(h)[0], torch.cat(heads, dim=-1), atol=1e-6)


def test_ctp_block_keeps_shape_and_gradients_flow() -> None:
    block = CTPBlock(16, num_heads=4, channel_branch="xcit")
    x = torch.randn(2, 10, 16, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        ClST(embed_dims=(8, 16, 30), num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="strides needs one value per stage"):
        ClST(strides=(2, 2))
    with pytest.raises(ValueError, match="channel_branch"):
        ClST(channel_branch="both")
    with pytest.raises(ValueError, match=r"\[B, 2, L\]"):
        ClST()(torch.randn(2, 3, 128))
    with pytest.raises(ValueError, match="too short"):
        KDCNN(input_length=8)
    with pytest.raises(ValueError, match="strides"):
        KDMobileNet(channels=(8, 16), strides=(1,))
