"""Small models for the offline digits dataset (8x8 grayscale, 10 classes), quick experiments and tests."""

from __future__ import annotations

from math import prod

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

__all__ = ["MLP", "SmallCNN"]


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, ``(Linear-ReLU-Dropout) x len(hidden)``, then ``fc``.

    A plain feed-forward classifier (Rumelhart et al., 1986); the usual small student in the
    distillation literature (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015).
    Any input is flattened from dimension 1, so ``[N, 1, 8, 8]`` digits and ``[N, 64]`` both work;
    CIFAR images need ``in_features=3072``.

    Args:
        in_features: number of input features after flattening (64 for 8x8 digits).
        hidden: widths of the hidden layers; empty for a linear (softmax-regression) model.
        num_classes: number of output logits.
        dropout: dropout probability after every hidden ReLU.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] | list[int] = (256, 256),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.flatten = nn.Flatten(1)
        blocks = []
        width = in_features
        for h in hidden:
            blocks.append(nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)))
            width = h
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(width, num_classes)
        self.classifier_in_features = width
        #: stage features: the output of every hidden block (the flattened input without hidden layers)
        self.feature_stages: tuple[str, ...] = tuple(f"blocks.{i}" for i in range(len(blocks))) or ("flatten",)
        self.feature_dims: tuple[int, ...] = tuple(hidden) or (in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or prod(x.shape[1:]) != self.in_features:
            raise KDConfigError(
                f"MLP(in_features={self.in_features}) got input of shape {tuple(x.shape)} "
                f"({prod(x.shape[1:]) if x.dim() >= 2 else 'no'} features per sample); "
                "set in_features to the product of the non-batch dimensions (64 for 8x8 digits, 3072 for CIFAR)"
            )
        out = self.flatten(x)
        for block in self.blocks:
            out = block(out)
        return self.fc(out)


class SmallCNN(nn.Module):
    """Small VGG-style CNN: ``(conv3x3-BN-ReLU)`` blocks, 2x2 max-pool between blocks, global average
    pool, dropout and ``fc``.

    A compact version of the plain conv-BN-ReLU stack of Simonyan & Zisserman (ICLR 2015) with
    BatchNorm (Ioffe & Szegedy, ICML 2015), meant for 8x8 digits (``in_channels=1``) and, with
    ``in_channels=3``, 32x32 CIFAR images.

    Args:
        in_channels: input channels (1 for digits, 3 for RGB).
        widths: output channels of each conv block; every block but the last is followed by a max-pool.
        num_classes: number of output logits.
        dropout: dropout probability before ``fc``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: tuple[int, ...] | list[int] = (32, 64),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths:
            raise KDConfigError("SmallCNN needs at least one conv block: widths must not be empty")
        self.in_channels = in_channels
        blocks = []
        c = in_channels
        for w in widths:
            blocks.append(
                nn.Sequential(nn.Conv2d(c, w, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
            )
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleList(nn.MaxPool2d(2) for _ in widths[:-1])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        self.classifier_in_features = c
        #: stage features: every conv block's output (before its max-pool) and the pooled vector
        self.feature_stages: tuple[str, ...] = (*(f"blocks.{i}" for i in range(len(widths))), "flatten")
        self.feature_dims: tuple[int, ...] = (*widths, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.pools):
                x = self.pools[i](x)
        return self.fc(self.dropout(self.flatten(self.avgpool(x))))
