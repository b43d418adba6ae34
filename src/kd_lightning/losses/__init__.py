"""Distillation losses in plain torch: usable without Lightning or kd-lightning's Trainer.

Example:
    >>> import torch
    >>> from kd_lightning.losses import KDLoss
    >>> out = KDLoss(temperature=4.0)(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)))
    >>> sorted(out)
    ['ce', 'kd', 'loss']
"""

from kd_lightning.losses.logit import (
    DKDLoss,
    KDLoss,
    LogitStandardKDLoss,
    PLDLoss,
    dkd_terms,
    kd_kl_div,
    pld_loss,
    standardize_logits,
)

__all__ = [
    "DKDLoss",
    "KDLoss",
    "LogitStandardKDLoss",
    "PLDLoss",
    "dkd_terms",
    "kd_kl_div",
    "pld_loss",
    "standardize_logits",
]
