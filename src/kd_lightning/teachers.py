"""Loading weights from checkpoints into a plain ``nn.Module`` (teachers, students, generations).

Accepted files: a Lightning checkpoint (``{"state_dict": ...}``) of any kd-lightning module, a
checkpoint dict with a ``"model"``/``"state_dict"``/``"model_state_dict"`` entry (RepDistiller and
mdistiller teachers use ``"model"``), a file written by ``export_student`` or a bare state dict.
The key prefix (``model.``, ``student.``, ``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``, ...) is found by matching the keys against the module.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import TeacherCheckpointError

_PREFIXES = ("", "model.", "student.", "module.", "net.", "network.", "teacher.")


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` on CPU, with ``weights_only=True`` first and full unpickling only as a fallback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        # Older Lightning checkpoints pickle hyperparameter objects; the file is the user's own.
        return torch.load(path, map_location="cpu", weights_only=False)


def state_dict_of(checkpoint: Any) -> Mapping[str, Tensor]:
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if all(isinstance(v, Tensor) for v in checkpoint.values()):
            return checkpoint
    raise TeacherCheckpointError(
        "the checkpoint holds no state dict: expected a Lightning checkpoint, a dict with a "
        "'state_dict' or 'model' entry, or a plain state dict."
    )


def match_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return the entries of ``state_dict`` that belong to ``module``, with their prefix removed.

    Raises:
        TeacherCheckpointError: when no prefix gives exactly the module's keys; the message shows
            the closest candidate's missing and unexpected keys.
    """
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    wanted = set(module.state_dict().keys())
    best: tuple[int, str, set[str], set[str]] | None = None
    for prefix in _PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if set(stripped) == wanted:
            return stripped
        missing, unexpected = wanted - set(stripped), set(stripped) - wanted
        score = len(wanted & set(stripped))
        if best is None or score > best[0]:
            best = (score, prefix, missing, unexpected)
    assert best is not None
    _, prefix, missing, unexpected = best
    raise TeacherCheckpointError(
        f"keys do not match {type(module).__name__} (closest prefix {prefix!r}): "
        f"missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, "
        f"unexpected {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}. "
        "Check that the checkpoint was trained with the same architecture and arguments."
    )


def check_checkpoint_exists(path: str | Path, field: str = "teacher_ckpt") -> None:
    """Raise :class:`TeacherCheckpointError` naming ``field`` when ``path`` is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TeacherCheckpointError(
            f"{field}: no file at {path.resolve()}. Give the path of a trained checkpoint, or set {field} "
            "to null to let `kd fit` train the teacher first and cache it."
        )


def load_weights(module: nn.Module, path: str | Path, field: str = "teacher_ckpt") -> nn.Module:
    """Load the weights stored at ``path`` into ``module`` (in place) and return it.

    Args:
        module: the network to fill.
        path: checkpoint file (see the module docstring for the accepted layouts).
        field: the configuration field that named ``path``, used in error messages.

    Raises:
        TeacherCheckpointError: the file is missing, holds no state dict, or does not fit.
    """
    path = Path(path).expanduser()
    check_checkpoint_exists(path, field)
    try:
        state = match_state_dict(module, state_dict_of(read_checkpoint(path)))
        module.load_state_dict(state)
    except TeacherCheckpointError as err:
        raise TeacherCheckpointError(f"{field}={path}: {err}") from None
    except RuntimeError as err:  # size mismatch, e.g. a 10-class checkpoint for a 100-class model
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise TeacherCheckpointError(
            f"{field}={path} does not fit {type(module).__name__}: {detail}. Are num_classes and "
            "the architecture's arguments the ones the checkpoint was trained with?"
        ) from None
    return module
