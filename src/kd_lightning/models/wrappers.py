"""Thin wrappers that make timm and torchvision models usable as ``class_path`` models in LightningCLI.

Both build the model in ``__init__`` (nothing is downloaded unless weights are asked for), keep it as
``self.model`` and return its logits from ``forward``. timm and torchvision are imported lazily, so the
package imports without timm.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

__all__ = ["TimmModel", "TorchvisionModel"]


def _close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def _unknown(kind: str, name: str, candidates: list[str], listing: str) -> ValueError:
    close = _close_matches(name, candidates)
    hint = f"close matches: {', '.join(close)}" if close else "no close match"
    return ValueError(f"Unknown {kind} model {name!r} ({hint}); see {listing} for all {len(candidates)} names")


class TimmModel(nn.Module):
    """Any ``timm`` model (Wightman, "PyTorch Image Models", 2019) built with ``timm.create_model``.

    Args:
        model_name: a timm architecture, optionally with a pretrained tag (``"resnet18.a1_in1k"``), or an
            ``"hf-hub:..."`` name.
        num_classes: number of output logits (the classifier is re-created when it differs from the
            pretrained one).
        pretrained: load timm's pretrained weights (downloads them unless cached).
        checkpoint_path: a local checkpoint to load after creation.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``, ``in_chans``, ``img_size``).
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int = 1000,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError(f'TimmModel({model_name!r}) needs timm: pip install "kd-lightning[timm]"') from err
        is_hub = model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
        if not is_hub and not timm.is_model(model_name.split(".", 1)[0]):
            raise _unknown("timm", model_name, timm.list_models(), "timm.list_models()")
        self.model_name = model_name
        if checkpoint_path:
            kwargs["checkpoint_path"] = checkpoint_path
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.classifier_in_features: int | None = getattr(self.model, "num_features", None)

    def get_classifier(self) -> nn.Module:
        """The wrapped model's classifier head (``timm`` API)."""
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class TorchvisionModel(nn.Module):
    """Any ``torchvision.models`` model, built with ``torchvision.models.get_model`` (Marcel & Rodriguez,
    "Torchvision: the machine-vision package of Torch", ACM MM 2010).

    Args:
        model_name: a name from ``torchvision.models.list_models()`` (``"resnet18"``, ``"vit_b_16"``, ...).
        num_classes: number of output logits; with ``weights`` it must match the weights' classes.
        weights: weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...); ``None`` (the default) downloads
            nothing and initialises randomly.
        **kwargs: passed to the model builder (e.g. ``dropout``, ``aux_logits``).

    For models that return auxiliary outputs in training mode (Inception v3, GoogLeNet), ``forward``
    returns only the main logits.
    """

    def __init__(self, model_name: str, num_classes: int = 1000, weights: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        import torchvision

        available = torchvision.models.list_models()
        if model_name.lower() not in available:
            raise _unknown("torchvision", model_name, available, "torchvision.models.list_models()")
        self.model_name = model_name
        self.model = torchvision.models.get_model(
            model_name.lower(), weights=weights, num_classes=num_classes, **kwargs
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)  # InceptionOutputs / GoogLeNetOutputs in training mode
        if isinstance(logits, torch.Tensor):
            return logits
        return out
