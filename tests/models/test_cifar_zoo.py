"""The CIFAR zoo: exact RepDistiller parameter counts, shapes, feature stages and checkpoint-key compatibility."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import kd_lightning.models as M
from kd_lightning.models import CIFAR_MODELS, FeatureTaps
from kd_lightning.models.cifar import CifarModel

# trainable parameters (incl. BN affine) with num_classes=100; the first block is the published table of
# RepDistiller / mdistiller, the second follows the same definitions
PARAM_COUNTS = {
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252,
    # same definitions, pinned here
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet44": 667_188,
    "wrn_16_1": 180_916,
    "vgg11": 9_277_284,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
}

EXPECTED_KEYS = {
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "ResNet50",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "vgg8",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "MobileNetV2",
    "ShuffleV1",
    "ShuffleV2",
}


@functools.cache
def built(name: str) -> CifarModel:
    torch.manual_seed(0)
    return CIFAR_MODELS[name](num_classes=100).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_registry_keys_and_exports() -> None:
    assert set(CIFAR_MODELS) == EXPECTED_KEYS
    assert set(PARAM_COUNTS) == EXPECTED_KEYS
    assert CIFAR_MODELS["MobileNetV2"] is M.MobileNetV2
    assert CIFAR_MODELS["ShuffleV1"] is M.ShuffleNetV1
    assert CIFAR_MODELS["ShuffleV2"] is M.ShuffleNetV2
    assert CIFAR_MODELS["ResNet50"] is M.CIFARResNet50
    assert CIFAR_MODELS["resnet32x4"] is M.ResNet32x4
    for cls in CIFAR_MODELS.values():
        assert isinstance(cls, type) and issubclass(cls, CifarModel)
        assert cls.__name__ in M.__all__
        assert cls.__doc__ and cls.__init__.__annotations__["num_classes"] in (int, "int")


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_count(name: str) -> None:
    assert n_params(built(name)) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_forward_shape_and_stages(name: str) -> None:
    model = built(name)
    assert isinstance(model.fc, nn.Linear)
    assert model.classifier_in_features == model.fc.in_features == model.feature_dims[-1]
    assert len(model.feature_stages) == len(model.preact_stages) == len(model.feature_dims)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        taps = FeatureTaps(model, [*model.feature_stages, *model.preact_stages])
        logits, feats = taps(x)
        taps.remove()
    assert plain.shape == (2, 100)
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    assert list(feats) == list(dict.fromkeys([*model.feature_stages, *model.preact_stages]))
    for stage, pre, dim in zip(model.feature_stages, model.preact_stages, model.feature_dims):
        assert feats[stage].shape[:2] == (2, dim), stage
        assert feats[pre].shape == feats[stage].shape, pre
    assert feats[model.feature_stages[-1]].shape == (2, model.classifier_in_features)
    # all stage features but the pooled vector are feature maps with shrinking (or equal) resolution
    sizes = [feats[s].shape[-1] for s in model.feature_stages[:-1]]
    assert all(f.dim() == 4 for f in (feats[s] for s in model.feature_stages[:-1]))
    assert sizes == sorted(sizes, reverse=True)
    assert model.stage_channels() == dict(zip(model.feature_stages, model.feature_dims))


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_no_inplace_ops_and_bn_before_relu(name: str) -> None:
    model = built(name)
    # nothing runs in place, so tapped tensors are never overwritten later in the forward
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    if name.startswith("Shuffle"):
        with pytest.raises(NotImplementedError):
            model.get_bn_before_relu()
    else:
        bns = model.get_bn_before_relu()
        assert bns and all(isinstance(b, nn.BatchNorm2d) for b in bns)


@pytest.mark.parametrize(
    ("name", "legacy"),
    [("vgg8", "classifier."), ("MobileNetV2", "classifier.0."), ("ShuffleV1", "linear."), ("resnet8", None)],
)
def test_loads_repdistiller_classifier_names(name: str, legacy: str | None) -> None:
    model = built(name)
    sd = model.state_dict()
    if legacy is not None:
        sd = {(legacy + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}
        assert not any(k.startswith("fc.") for k in sd)
    fresh = CIFAR_MODELS[name](num_classes=100).eval()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_num_classes_and_generic_classes() -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert M.ResNet8(num_classes=10).eval()(x).shape == (2, 10)
        bottleneck = M.ResNet(depth=11, widths=(16, 16, 32, 64), num_classes=5, block="bottleneck").eval()
        assert bottleneck(x).shape == (2, 5)
        assert bottleneck.feature_dims == (16, 64, 128, 256, 256)
        assert M.WideResNet(depth=10, widen_factor=1, num_classes=3).eval()(x).shape == (2, 3)
        assert M.ShuffleNetV2(num_classes=4, net_size=0.5).eval()(x).shape == (2, 4)
        vgg = M.VGG(cfg=[[8], [8], [16], [16], [16]], batch_norm=False, num_classes=6).eval()
        assert vgg(x).shape == (2, 6)
        assert vgg.bn_before_relu == ("block1.0", "block2.0", "block3.0", "block4.0")
        # 64x64 inputs use the 4th max-pool, as in RepDistiller
        _, feats = FeatureTaps(vgg, ["relu3", "relu4"])(torch.randn(1, 3, 64, 64))
        assert feats["relu3"].shape[-1] == 8 and feats["relu4"].shape[-1] == 4
    for bad in (
        lambda: M.ResNet(depth=21),
        lambda: M.ResNet(depth=20, widths=(16, 32, 64)),
        lambda: M.ResNet(depth=20, block="dense"),
        lambda: M.WideResNet(depth=20),
        lambda: M.ShuffleNetV2(net_size=0.7),
        lambda: M.VGG(cfg=[[8]] * 4),
        lambda: M.CIFARResNet(block="basic", num_blocks=(2, 2, 2)),
    ):
        with pytest.raises(ValueError):
            bad()


def test_train_step_backward() -> None:
    model = M.ResNet8(num_classes=10).train()
    taps = FeatureTaps(model, ["layer3", "layer3.0.relu2:input"])
    logits, feats = taps(torch.randn(4, 3, 32, 32))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4)) + feats["layer3.0.relu2:input"].pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    taps.remove()


def test_cli_instantiation() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(nn.Module, "model")
    cfg = parser.parse_args(["--model.class_path=kd_lightning.models.ResNet32x4", "--model.init_args.num_classes=10"])
    model = parser.instantiate_classes(cfg).model
    assert isinstance(model, M.ResNet32x4) and model.fc.out_features == 10
