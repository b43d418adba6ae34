"""timm / torchvision wrappers: construction without downloads, logits only, helpful unknown-name errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kd_lightning.models import FeatureTaps, TimmModel, TorchvisionModel


def test_timm_model_builds_and_forwards() -> None:
    pytest.importorskip("timm")
    model = TimmModel("resnet10t", num_classes=7).eval()
    assert isinstance(model.model, torch.nn.Module)
    assert model.get_classifier().out_features == 7
    assert model.classifier_in_features == 512
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_timm_model_kwargs_and_taps() -> None:
    pytest.importorskip("timm")
    model = TimmModel("test_vit", num_classes=3, img_size=32).eval()
    with torch.no_grad():
        logits, feats = FeatureTaps(model, ["model.blocks.0", "model.head:input"])(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    assert feats["model.head:input"].shape[0] == 2


def test_timm_unknown_name_lists_close_matches() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"Unknown timm model 'resnet10tt'.*resnet10t"):
        TimmModel("resnet10tt")


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "kd-lightning\[timm\]"'):
        TimmModel("resnet10t")


def test_package_imports_without_timm() -> None:
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import kd_lightning.models as m\n"
        "assert m.ResNet32x4 and m.MLP and m.TimmModel\n"
        "assert 'timm' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_torchvision_model() -> None:
    model = TorchvisionModel("resnet18", num_classes=7).eval()
    assert model.model.fc.out_features == 7
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_aux_outputs_reduced_to_logits() -> None:
    model = TorchvisionModel("googlenet", num_classes=5, init_weights=False).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_torchvision_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet19'.*resnet18"):
        TorchvisionModel("resnet19")
