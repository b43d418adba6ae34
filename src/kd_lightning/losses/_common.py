"""Helpers shared by the losses: input checks with clear messages, and the float32 upcast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import KDConfigError


def check_logits(student_logits: Tensor, teacher_logits: Tensor | None, target: Tensor | None = None) -> None:
    """Check that logits are ``[..., C]`` with equal shapes and that ``target`` indexes classes.

    Raises:
        KDConfigError: naming the tensors, their shapes and the usual cause.
    """
    if student_logits.dim() < 2:
        raise KDConfigError(f"student_logits must have shape [batch, num_classes], got {tuple(student_logits.shape)}.")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        s_classes, t_classes = student_logits.shape[-1], teacher_logits.shape[-1]
        hint = (
            f"the student predicts {s_classes} classes and the teacher {t_classes}: both must be built "
            "with the dataset's num_classes"
            if s_classes != t_classes
            else "the batch shapes differ"
        )
        raise KDConfigError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} do not match: {hint}."
        )
    if target is not None:
        if target.shape != student_logits.shape[:-1]:
            raise KDConfigError(
                f"target must have shape {tuple(student_logits.shape[:-1])} (class indices), got {tuple(target.shape)}."
            )
        if target.is_floating_point() or target.dtype == torch.bool:
            raise KDConfigError(
                "target",
                f"must hold integer class indices, got {target.dtype} of shape {tuple(target.shape)}",
                "give int64 class ids (for one-hot or soft targets use target.argmax(-1))",
            )


def check_temperature(temperature: float, name: str = "temperature") -> None:
    """Raise :class:`~kd_lightning.errors.KDConfigError` naming ``name`` unless ``temperature`` is finite and > 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise KDConfigError(name, f"must be a finite number > 0, got {temperature!r}", "temperatures divide logits")


def upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 to float32: softmax, logs and KL are computed in at least single precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def label_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``[..., C]`` logits against ``[...]`` labels, in at least float32."""
    return F.cross_entropy(
        upcast(logits.reshape(-1, logits.shape[-1])), target.reshape(-1), label_smoothing=label_smoothing
    )


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """``tokens[b, indices[b]]`` for every sample: ``[B, N, D]`` and ``[B, k]`` to ``[B, k, D]``."""
    if tokens.dim() != 3 or indices.dim() != 2 or indices.shape[0] != tokens.shape[0]:
        raise KDConfigError(
            f"gather_tokens needs tokens [B, N, D] and indices [B, k], got {tuple(tokens.shape)} and "
            f"{tuple(indices.shape)}."
        )
    return tokens.gather(1, indices.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
