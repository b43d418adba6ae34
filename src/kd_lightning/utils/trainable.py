"""Which parameters of a network were meant to stay fixed, kept across the core's teacher freezing.

The core freezes a teacher with ``requires_grad_(False)``; a network built with some parameters already frozen
(torchvision's ``trainable_backbone_layers``, a frozen stem) would lose that information. :func:`freeze` records
the names of the parameters that were frozen before, and :func:`trainable_copy` — used when ``kd fit`` trains a
missing teacher or the student alone — unfreezes a copy except those.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["FROZEN_ATTRIBUTE", "freeze", "trainable_copy"]

#: The attribute holding the names of the parameters that were frozen before :func:`freeze`.
FROZEN_ATTRIBUTE = "_kd_frozen_by_design"


def freeze(network: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` on ``network``, remembering which parameters were already frozen (once)."""
    if not hasattr(network, FROZEN_ATTRIBUTE):
        frozen = [name for name, p in network.named_parameters() if not p.requires_grad]
        object.__setattr__(network, FROZEN_ATTRIBUTE, frozen)
    return network.requires_grad_(False)


def trainable_copy(network: nn.Module) -> nn.Module:
    """A deep copy in train mode to train from scratch or on: a network frozen by :func:`freeze` gets every parameter
    trainable again except those that were frozen before; any other network keeps its parameters' flags."""
    twin = copy.deepcopy(network).train()
    if not hasattr(network, FROZEN_ATTRIBUTE):
        return twin
    twin.requires_grad_(True)
    keep = set(getattr(network, FROZEN_ATTRIBUTE))
    for name, p in twin.named_parameters():
        if name in keep:
            p.requires_grad_(False)
    return twin
