"""Reading checkpoints safely and loading their weights into a plain ``nn.Module`` (pure torch).

Accepted files: a Lightning checkpoint (``{"state_dict": ...}``) of any kd-lightning module, a checkpoint
dict with a ``"model"``/``"state_dict"``/``"model_state_dict"`` entry (RepDistiller and mdistiller teachers
use ``"model"``), a file written by ``export_student``, a bare state dict, or a ``.safetensors`` file (the
teachers kd-lightning caches). The key prefix (``model.``, ``student.``, ``module.`` from DDP,
``_orig_mod.`` from ``torch.compile``, ...) is found by matching the keys against the module, after the
published classifier names of the CIFAR zoo (``classifier``/``linear``) are mapped to ``fc``.

Safety: files are read with ``torch.load(weights_only=True)``, which restores tensors and plain containers
and nothing that could run code. A file that needs full unpickling is refused with
:class:`~kd_lightning.errors.UnsafeCheckpointError` unless the caller trusts it explicitly
(``trust=True``, or :func:`trusted_checkpoints`; ``kd fit --trust_checkpoint true`` on the command line).
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError, TeacherCheckpointError, UnsafeCheckpointError, one_line

__all__ = [
    "CheckpointKey",
    "check_checkpoint_exists",
    "load_weights",
    "match_state_dict",
    "pretrained_folder_kwargs",
    "read_checkpoint",
    "state_dict_of",
    "trusted_checkpoints",
]

CheckpointKey = Literal["auto", "teacher", "student"]

#: Prefixes a module's keys may carry in a checkpoint, tried in order.
_PREFIXES = ("", "model.", "student.", "module.", "net.", "network.", "teacher.", "teachers.teacher.")
#: What a distillation checkpoint stores for each network it holds.
_ROLE_PREFIXES: dict[str, tuple[str, ...]] = {"student": ("student.",), "teacher": ("teachers.", "teacher.")}

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("kd_trust_checkpoints", default=False)

TRUST_HELP = (
    "Also load checkpoints that need full unpickling (torch.load(weights_only=False)). Unpickling runs any "
    "code the file carries: enable this only for files you created yourself or fully trust."
)


@contextlib.contextmanager
def trusted_checkpoints(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`read_checkpoint` may fully unpickle files (they can run code: trusted files only)."""
    token = _TRUSTED.set(enabled)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def check_checkpoint_exists(path: str | Path, field: str = "teacher_ckpt") -> None:
    """Raise :class:`TeacherCheckpointError` naming ``field`` when ``path`` is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        if "teacher_ckpt" in field:
            fix = f"set {field} to null to let `kd fit` train the teacher first and cache it"
        else:
            fix = "kd fit prints the paths of the checkpoints it writes (runs/.../checkpoints/last.ckpt)"
        raise TeacherCheckpointError(
            f"{field}: no file at {path.resolve()}. Give the path of a trained checkpoint, or {fix}."
        )


def read_checkpoint(path: str | Path, field: str = "checkpoint", trust: bool | None = None) -> Any:
    """Read a checkpoint on the CPU with ``torch.load(weights_only=True)`` (``.safetensors``: safetensors).

    Args:
        path: the file.
        field: the config field that named it (for messages).
        trust: allow full unpickling for a file that needs it (it can run code); ``None`` follows
            :func:`trusted_checkpoints`.

    Raises:
        UnsafeCheckpointError: the file holds Python objects beyond tensors and containers, and it is not trusted.
        TeacherCheckpointError: the file is not a checkpoint (truncated, text, another format).
    """
    path = Path(path).expanduser()
    check_checkpoint_exists(path, field)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, field)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _not_a_checkpoint(path, field, err) from None
        if trust if trust is not None else _TRUSTED.get():
            return torch.load(path, map_location="cpu", weights_only=False)
        detail = _unsupported_global(str(err))
        raise UnsafeCheckpointError(
            f"{field}: {path} holds Python objects{detail} that only full unpickling would restore, and unpickling "
            "can run code hidden in the file. If you created or fully trust it, pass --trust_checkpoint true "
            "(Python: trust=True); otherwise re-save only its tensors: torch.save(state_dict, 'weights.pt')."
        ) from None
    except (
        RuntimeError,
        EOFError,
        IndexError,
        KeyError,
        ValueError,
        OSError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
    ) as err:  # a text file, a truncated file, another format
        raise _not_a_checkpoint(path, field, err) from None


def _read_safetensors(path: Path, field: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise _not_a_checkpoint(path, field, err) from None


def _unsupported_global(message: str) -> str:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            name = message.split(marker, 1)[1].split()[0].rstrip(".,")
            return f" ({name})"
    match = re.search(r"Unsupported operand (\d+)", message)
    if match:  # e.g. a legacy (non-zip) file pickled with protocol >= 4: the safe loader cannot even tell
        return f" (or uses pickle opcode {match.group(1)}, which torch's weights-only loader cannot read)"
    return ""


def _not_a_checkpoint(path: Path, field: str, err: BaseException) -> TeacherCheckpointError:
    size = path.stat().st_size if path.exists() else 0
    return TeacherCheckpointError(
        f"{field}: {path} is not a checkpoint ({size} bytes that torch.load cannot read: {type(err).__name__}: "
        f"{one_line(str(err), 120)}). It may be truncated or another format: point {field} at a file written by "
        "torch.save or Lightning, or set it to null to train the teacher."
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value)


def state_dict_of(checkpoint: Any) -> Mapping[str, Tensor]:
    """The state dict inside ``checkpoint`` (a Lightning checkpoint, ``{"model": ...}``, an export, a state dict)."""
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = checkpoint.get(key)
            if _is_state_dict(inner):
                return inner
            if isinstance(inner, nn.Module):
                return inner.state_dict()
        if checkpoint and all(isinstance(v, Tensor) for v in checkpoint.values()):
            return checkpoint
    raise TeacherCheckpointError(
        "the checkpoint holds no state dict: expected a Lightning checkpoint, a dict with a "
        "'state_dict' or 'model' entry, or a plain state dict."
    )


def select_role(state_dict: Mapping[str, Tensor], key: CheckpointKey, field: str = "teacher_ckpt") -> dict[str, Tensor]:
    """The entries of one network of a distillation checkpoint (``teachers.*``/``teacher.*`` or ``student.*``).

    ``key="auto"`` keeps ``state_dict`` as it is when it holds at most one of the two roles and refuses a
    checkpoint that holds both (loading either silently would be a guess).

    Raises:
        TeacherCheckpointError: ``auto`` on a checkpoint with both roles, or the asked role is absent.
    """
    present = {role: any(k.startswith(prefixes) for k in state_dict) for role, prefixes in _ROLE_PREFIXES.items()}
    if key == "auto":
        if present["student"] and present["teacher"]:
            raise TeacherCheckpointError(
                f"{field}: the checkpoint is a distillation run holding both a student (student.*) and a teacher "
                f"(teacher.*): say which to load with {field}_key: student (the distilled network) or "
                f"{field}_key: teacher."
            )
        return dict(state_dict)
    if not present[key]:
        found = [role for role, there in present.items() if there] or ["no student.* or teacher.* keys"]
        raise TeacherCheckpointError(
            f"{field}_key: {key} asked for the {key}'s weights but the checkpoint holds {', '.join(found)}. "
            f"Use {field}_key: auto for a checkpoint of one network."
        )
    if key == "student":
        return {k: v for k, v in state_dict.items() if k.startswith("student.")}
    teacher_keys = {k: v for k, v in state_dict.items() if k.startswith("teacher.")}
    if teacher_keys:
        return teacher_keys
    names = sorted({k.split(".")[1] for k in state_dict if k.startswith("teachers.")})
    if len(names) > 1:
        raise TeacherCheckpointError(
            f"{field}_key: teacher is ambiguous: the checkpoint holds the teachers {names}. Give each teacher its "
            "own checkpoint (teacher_ckpt: {name: path}) or export the one you want with export_student."
        )
    prefix = f"teachers.{names[0]}."
    return {"teacher." + k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _legacy_renames(module: nn.Module, keys: set[str]) -> dict[str, str]:
    """Old key -> new key for submodules whose published checkpoints name a layer differently.

    A submodule declares it with ``legacy_classifier_prefix`` (the CIFAR zoo: ``classifier.``, ``linear.``,
    ``classifier.0.`` of RepDistiller/mdistiller are ``fc.`` here).
    """
    renames: dict[str, str] = {}
    for name, sub in module.named_modules():
        legacy = getattr(sub, "legacy_classifier_prefix", None)
        if not legacy:
            continue
        base = f"{name}." if name else ""
        old, new = base + legacy, base + "fc."
        for key in keys:
            if key.startswith(old) and (new + key[len(old) :]) not in keys:
                renames[key] = new + key[len(old) :]
    return renames


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
        renames = _legacy_renames(module, set(stripped))
        stripped = {renames.get(k, k): v for k, v in stripped.items()}
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


def load_weights(
    module: nn.Module,
    path: str | Path,
    field: str = "teacher_ckpt",
    key: CheckpointKey = "auto",
    trust: bool | None = None,
) -> nn.Module:
    """Load the weights stored at ``path`` into ``module`` (in place) and return it.

    Args:
        module: the network to fill.
        path: checkpoint file (see the module docstring for the accepted layouts).
        field: the configuration field that named ``path``, used in error messages.
        key: which network of a distillation checkpoint to load (:func:`select_role`).
        trust: see :func:`read_checkpoint`.

    Raises:
        TeacherCheckpointError: the file is missing, unreadable, holds no state dict, or does not fit.
    """
    path = Path(path).expanduser()
    try:
        state = select_role(state_dict_of(read_checkpoint(path, field, trust)), key, field)
        state = match_state_dict(module, state)
        module.load_state_dict(state)
    except UnsafeCheckpointError:
        raise
    except TeacherCheckpointError as err:
        message = str(err)
        raise TeacherCheckpointError(message if message.startswith(field) else f"{field}: {path}: {message}") from None
    except RuntimeError as err:  # size mismatch, e.g. a 10-class checkpoint for a 100-class model
        lines = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:4])
        raise TeacherCheckpointError(
            f"{field}: {path} does not fit {type(module).__name__}: {detail}. Are num_classes and "
            "the architecture's arguments the ones the checkpoint was trained with?"
        ) from None
    return module


def pretrained_folder_kwargs(
    folder: str | Path, library: Literal["transformers", "diffusers"] = "transformers"
) -> dict[str, Any]:
    """``from_pretrained`` arguments that read a local Hugging Face (transformers/diffusers) folder safely.

    safetensors weights when the folder has any; otherwise torch files, always with ``torch.load(weights_only=True)``:
    transformers is told so (its ``weights_only`` argument); diffusers does not take that argument and loads torch
    files with ``weights_only=True`` itself (``diffusers.models.model_loading_utils.load_state_dict``, checked for
    0.42). Never downloads (``local_files_only``).
    """
    if library not in ("transformers", "diffusers"):
        raise KDConfigError("library", f"must be 'transformers' or 'diffusers', got {library!r}")
    if any(Path(folder).glob("*.safetensors")):
        return {"local_files_only": True, "use_safetensors": True}
    safe_torch_load = {"weights_only": True} if library == "transformers" else {}
    return {"local_files_only": True, "use_safetensors": False, **safe_torch_load}
