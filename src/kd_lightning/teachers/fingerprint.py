"""Cache keys of trained teachers: the resolved teacher config, the data and the training settings.

The key is computed from *resolved* configs — class paths in full, every init argument with its default,
jsonargparse's bookkeeping (``__path__`` of a fragment file) removed — so the same teacher reached through
two config files (a fragment or inline) gets one key and is trained once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kd_lightning.utils.fingerprint import DATA_KEYS_NOT_IN_FINGERPRINT, json_digest

__all__ = ["DATA_KEYS_NOT_IN_FINGERPRINT", "data_fingerprint_config", "fingerprint", "resolved", "teacher_data"]

#: Version of the key layout; bump it when what a key covers changes.
FINGERPRINT_VERSION = 2


def resolved(config: Any) -> Any:
    """``config`` as plain JSON-able data without jsonargparse's bookkeeping keys (``__path__``, ...)."""
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    if isinstance(config, Mapping):
        return {str(k): resolved(v) for k, v in config.items() if not str(k).startswith("__")}
    if isinstance(config, (list, tuple)):
        return [resolved(v) for v in config]
    if config is None or isinstance(config, (bool, int, float, str)):
        return config
    return str(config)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-able mapping (keys sorted, bookkeeping keys dropped)."""
    return json_digest({"v": FINGERPRINT_VERSION, **resolved(payload)})


def data_fingerprint_config(data_config: Any) -> dict[str, Any]:
    """The part of a data config that decides what a teacher is trained on."""
    data_config = resolved(data_config)
    init_args = dict(data_config.get("init_args") or {})
    return {
        "class_path": data_config.get("class_path"),
        "init_args": {k: v for k, v in init_args.items() if k not in DATA_KEYS_NOT_IN_FINGERPRINT},
    }


def teacher_data(data_config: Any, datamodule: Any) -> tuple[dict[str, Any], Any]:
    """``(fingerprint part, data module)`` of the data a teacher trained for a run learns from.

    A wrapping data module names, by ``teacher_data_key``, the init argument whose data its teachers train on
    (a semi-supervised split's ``source``, a transfer set's ``source``); this follows those links, so the
    teacher of a wrapped run is the teacher of its source (one cache entry, trained once).
    """
    config = resolved(data_config)
    while datamodule is not None and (key := getattr(datamodule, "teacher_data_key", None)):
        config = (config.get("init_args") or {})[key]
        datamodule = getattr(datamodule, key)
    part = data_fingerprint_config(config)
    part["identity"] = datamodule.data_identity() if hasattr(datamodule, "data_identity") else {}
    return part, datamodule
