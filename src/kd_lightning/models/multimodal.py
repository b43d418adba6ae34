"""Networks for paired multimodal data (batches ``{"m1": x1, "m2": x2, "y": y}``), in plain torch.

- :class:`ModalityNet` lets any network read named modalities out of a paired batch: the unimodal student
  (``ModalityNet(SmallCNN, ["m1"])``), a cross-modal teacher (``ModalityNet(SignalNet, ["m2"])``) and a
  multimodal teacher (``ModalityNet(LateFusionNet, ["m1", "m2"])``) all take the same inputs, so every
  classification method runs on paired data unchanged.
- :class:`LateFusionNet`: one encoder per modality, features concatenated, an MLP head (``fc1``, ``fc2``, ``fc``):
  the multimodal teacher. Its fusion layers are small named submodules (maskable by MST-Distill).
- :class:`SignalNet`: a small 1-D conv net for a signal modality ``[B, C, L]`` (conv blocks, global average
  pool, ``fc1``, ``fc2``, ``fc``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = ["LateFusionNet", "MissingModalityError", "ModalityNet", "SignalNet"]


class MissingModalityError(KDConfigError):
    """A :class:`ModalityNet` reads a modality its input does not have (field ``modalities``)."""


class ModalityNet(nn.Module):
    """Wraps a network so that it reads named modalities from a dict: ``net(*[x[m] for m in modalities])``.

    Args:
        net: the network; called with one positional tensor per entry of ``modalities``, in that order.
        modalities: the keys of the input dict the network reads (``["m1"]``, ``["m1", "m2"]``).

    The input is a dict of modality tensors (a paired batch with its ``"y"`` is accepted: other keys are ignored).
    A missing modality raises :class:`~kd_lightning.errors.KDConfigError` naming ``modalities`` and the keys the
    input has. Module paths inside the wrapper start with ``net.`` (``net.fc1``).
    """

    def __init__(self, net: nn.Module, modalities: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise KDConfigError("net", f"must be a torch.nn.Module, got {type(net).__name__}", "give a network")
        if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) for m in modalities):
            raise KDConfigError("modalities", f"must be a non-empty list of names, got {modalities!r}", "e.g. [m1]")
        if len(set(modalities)) != len(modalities):
            raise KDConfigError("modalities", f"names a modality twice: {list(modalities)}")
        self.net = net
        self.modalities = tuple(modalities)

    def forward(self, inputs: Mapping[str, Tensor]) -> Any:
        if not isinstance(inputs, Mapping):
            raise MissingModalityError(
                "modalities",
                f"ModalityNet({type(self.net).__name__}) reads {list(self.modalities)} from a dict of modalities "
                f"but got a {type(inputs).__name__}",
                "use a paired data module (batches {modality: tensor, ..., 'y': labels})",
            )
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            have = [k for k in inputs if k != "y"]
            raise MissingModalityError(
                "modalities",
                f"ModalityNet({type(self.net).__name__}) reads modality {missing[0]!r} but the batch has {have}",
                f"set modalities to names the data serves (one of {have}) or serve {missing[0]!r}",
            )
        return self.net(*[inputs[m] for m in self.modalities])

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}"


class LateFusionNet(nn.Module):
    """Late fusion: one encoder per input, features concatenated, then ``fc1 -> ReLU -> fc2 -> ReLU -> fc``.

    ``h = concat(enc_1(x_1), ..., enc_n(x_n))`` (the ``concat`` identity module outputs it), logits =
    ``fc(relu(fc2(relu(fc1(h)))))``. The encoders are any networks that output ``[B, encoder_dim]`` features, e.g.
    ``SmallCNN(num_classes=64)`` (its last linear layer then is a projection to 64 features).

    Args:
        encoders: ``{modality: encoder}``, in the order of the positional inputs of ``forward`` (the order of
            :class:`ModalityNet`'s ``modalities``).
        encoder_dim: the width of each encoder's output (one number for all, or one per encoder).
        hidden: widths of ``fc1`` and ``fc2`` (two numbers).
        num_classes: output logits.
        dropout: dropout after each hidden ReLU.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        encoder_dim: int | Sequence[int] = 64,
        hidden: Sequence[int] = (64, 32),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not encoders:
            raise KDConfigError("encoders", "needs at least one encoder", "give {modality: network}")
        dims = [int(encoder_dim)] * len(encoders) if isinstance(encoder_dim, int) else [int(d) for d in encoder_dim]
        if len(dims) != len(encoders) or any(d < 1 for d in dims):
            raise KDConfigError(
                "encoder_dim", f"must be one width >= 1 or one per encoder ({len(encoders)}), got {encoder_dim!r}"
            )
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) != 2 or any(h < 1 for h in hidden):
            raise KDConfigError("hidden", f"must be two widths >= 1 (fc1, fc2), got {list(hidden)}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.encoder_dims = tuple(dims)
        self.concat = nn.Identity()
        self.fc1 = nn.Linear(sum(dims), hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc = nn.Linear(hidden[1], num_classes)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) != len(self.encoders):
            raise KDConfigError(
                "encoders",
                f"LateFusionNet has {len(self.encoders)} encoders {list(self.encoders)} but got {len(inputs)} inputs",
                "give one encoder per modality of the ModalityNet wrapping it",
            )
        feats = []
        for (name, encoder), dim, x in zip(self.encoders.items(), self.encoder_dims, inputs, strict=True):
            f = encoder(x).flatten(1)
            if f.shape[1] != dim:
                raise KDConfigError(
                    "encoder_dim",
                    f"encoder {name!r} ({type(encoder).__name__}) outputs {f.shape[1]} features, not {dim}",
                    f"set encoder_dim to {f.shape[1]} or change the encoder",
                )
            feats.append(f)
        h = self.concat(torch.cat(feats, dim=1))
        h = self.dropout(self.act(self.fc1(h)))
        h = self.dropout(self.act(self.fc2(h)))
        return self.fc(h)


class SignalNet(nn.Module):
    """A small 1-D CNN for signals ``[B, C, L]``: ``(conv1d k5 - BN - ReLU - maxpool 2)`` blocks, global average
    pool, then ``fc1 -> ReLU -> fc2 -> ReLU -> fc``.

    Args:
        in_channels: channels of the signal.
        widths: output channels of the conv blocks.
        hidden: widths of ``fc1`` and ``fc2``.
        num_classes: output logits (or a feature width when used as an encoder).
        dropout: dropout after each hidden ReLU.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32),
        hidden: Sequence[int] = (32, 32),
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        hidden = tuple(int(h) for h in hidden)
        if not widths or any(w < 1 for w in widths):
            raise KDConfigError("widths", f"must be a non-empty list of widths >= 1, got {list(widths)}")
        if len(hidden) != 2 or any(h < 1 for h in hidden):
            raise KDConfigError("hidden", f"must be two widths >= 1 (fc1, fc2), got {list(hidden)}")
        blocks, c = [], in_channels
        for w in widths:
            blocks.append(
                nn.Sequential(nn.Conv1d(c, w, kernel_size=5, padding=2, bias=False), nn.BatchNorm1d(w), nn.ReLU())
            )
            c = w
        self.in_channels = in_channels
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool1d(2, ceil_mode=True)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Linear(c, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc = nn.Linear(hidden[1], num_classes)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise KDConfigError(
                "in_channels",
                f"SignalNet(in_channels={self.in_channels}) got input of shape {tuple(x.shape)}",
                "give signals [B, in_channels, L]",
            )
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = self.pool(x)
        h = self.avgpool(x).flatten(1)
        h = self.dropout(self.act(self.fc1(h)))
        h = self.dropout(self.act(self.fc2(h)))
        return self.fc(h)
