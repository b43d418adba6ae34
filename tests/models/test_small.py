"""MLP and SmallCNN: digits (1x8x8) and CIFAR-shaped (3x32x32) inputs, stages, CLI construction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.models import MLP, FeatureTaps, SmallCNN


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mlp_digits_and_flattening() -> None:
    model = MLP().eval()
    assert n_params(model) == (64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    with torch.no_grad():
        out_img = model(torch.ones(5, 1, 8, 8))
        out_vec = model(torch.ones(5, 64))
    assert out_img.shape == (5, 10)
    torch.testing.assert_close(out_img, out_vec)
    assert isinstance(model.fc, nn.Linear) and model.classifier_in_features == 256
    assert model.feature_stages == ("blocks.0", "blocks.1")
    _, feats = FeatureTaps(model, model.feature_stages)(torch.randn(3, 1, 8, 8))
    assert [f.shape for f in feats.values()] == [(3, 256), (3, 256)]


def test_mlp_cifar_shapes_options_and_errors() -> None:
    model = MLP(in_features=3072, hidden=[128], num_classes=100, dropout=0.5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    linear = MLP(hidden=())
    assert n_params(linear) == 64 * 10 + 10 and linear.feature_stages == ("flatten",)
    assert linear(torch.randn(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"in_features=64.*3072"):
        MLP()(torch.randn(2, 3, 32, 32))
    # dropout is active in train mode only
    model.train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_smallcnn_digits() -> None:
    model = SmallCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (4, 10)
        _, feats = FeatureTaps(model, model.feature_stages)(x)
    assert model.feature_stages == ("blocks.0", "blocks.1", "flatten")
    assert feats["blocks.0"].shape == (4, 32, 8, 8)  # before its max-pool
    assert feats["blocks.1"].shape == (4, 64, 4, 4)  # last block: no max-pool
    assert feats["flatten"].shape == (4, 64) == (4, model.classifier_in_features)
    assert model.feature_dims == (32, 64, 64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1


def test_smallcnn_cifar_and_backward() -> None:
    model = SmallCNN(in_channels=3, widths=[16, 32, 64], num_classes=100, dropout=0.1)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError):
        SmallCNN(widths=[])


def test_cli_instantiation_with_lists() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "model")
    cfg = parser.parse_args(["--model.class_path=kd_lightning.models.MLP", "--model.init_args.hidden=[32, 16]"])
    mlp = parser.instantiate_classes(cfg).model
    assert isinstance(mlp, MLP) and mlp.feature_dims == (32, 16)
    cfg = parser.parse_args(["--model.class_path=kd_lightning.models.SmallCNN", "--model.init_args.widths=[8, 8, 8]"])
    cnn = parser.instantiate_classes(cfg).model
    assert isinstance(cnn, SmallCNN) and cnn.feature_dims == (8, 8, 8, 8)
