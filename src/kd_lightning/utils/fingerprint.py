"""Stable content hashes shared by every cache: JSON payloads, tensors and whole modules.

A cache is valid only for the exact weights and data it was written for; these digests are its keys
(teacher checkpoints in :mod:`kd_lightning.teachers.training`, per-view teacher logits in
:mod:`kd_lightning.teachers.logit_cache`, stored top-k LM logits in :mod:`kd_lightning.data.teacher_logits`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DATA_KEYS_NOT_IN_FINGERPRINT", "json_digest", "module_digest", "update_with_tensor"]

#: Data-module arguments that do not change which samples or transforms a teacher sees.
DATA_KEYS_NOT_IN_FINGERPRINT = frozenset(
    {
        "root",
        "download",
        "num_workers",
        "pin_memory",
        "eval_batch_size",
        "checksum",
        "return_index",
        "meta_split",  # the teacher trains on the whole training set (see KDDataModule.full_training_set)
        "meta_batch_size",
        # embodied rollouts: a teacher trains by plain DAgger from the expert (EnvRolloutDataModule.full_training_set)
        "expert_advice",
        "mirror_every",
        "mirror_horizon",
        "vectorization",
        "eval_episodes",
    }
)


def json_digest(payload: Mapping[str, Any], length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``payload`` as JSON (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def update_with_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``tensor`` into a ``hashlib`` object."""
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def module_digest(module: nn.Module, length: int = 16) -> str:
    """Hex digest of a module's class and every parameter and buffer (names, dtypes, shapes, values)."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    for name, tensor in module.state_dict().items():
        update_with_tensor(digest, name, tensor)
    return digest.hexdigest()[:length]
