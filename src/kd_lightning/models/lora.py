"""LoRA adapters through ``peft`` for any ``nn.Module`` (Hugging Face causal LMs and :class:`TinyGPT` alike).

:func:`add_lora` injects LoRA layers in place (``peft.inject_adapter_in_model``: the module keeps its class
and its state-dict keys gain ``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default``) and freezes every
other parameter. With rank ``r``, scale ``α/r`` and input dropout ``p``, an adapted linear layer computes
``y = W x + (α/r)·B A dropout(x)``, ``B`` initialised to 0 (Hu et al. 2021, "LoRA"), so the adapted model
starts equal to the base model. Also here: switching adapters off (:func:`adapters_disabled`: the base
model, e.g. OPSD's fixed teacher), the adapter weights in peft's file layout (:func:`adapter_state_dict`,
:func:`save_adapters`, :func:`load_adapters`: a folder that ``peft.PeftModel.from_pretrained`` reads) and
adapters-only state dicts (:func:`adapters_only_state_dict`).

``peft`` is imported lazily: ``pip install 'kd-lightning[llm]'``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.errors import KDConfigError

__all__ = [
    "ADAPTER_NAME",
    "LORA_KEYS",
    "adapter_state_dict",
    "adapters_disabled",
    "adapters_only_state_dict",
    "add_lora",
    "has_lora",
    "linear_module_names",
    "load_adapters",
    "save_adapters",
]

ADAPTER_NAME = "default"
#: Keys of the ``lora`` dict and the ``peft.LoraConfig`` field each one sets.
LORA_KEYS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "bias": "bias",
    "use_rslora": "use_rslora",
    "init_lora_weights": "init_lora_weights",
}
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


def _import_peft(field: str = "lora") -> Any:
    try:
        import peft
    except ImportError as err:
        raise KDConfigError(
            field, "LoRA adapters need the peft library, which is not installed", "pip install 'kd-lightning[llm]'"
        ) from err
    return peft


def _adaptable_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:  # GPT-2's projections are transformers' Conv1D (peft adapts them too)
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return tuple(types)


def linear_module_names(module: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` (and transformers ``Conv1D``) modules of ``module``: what LoRA can target."""
    types = _adaptable_types()
    return [name for name, m in module.named_modules() if isinstance(m, types) and name]


def _short_names(names: list[str], limit: int = 12) -> str:
    # The module's own name, with its parent's when it is a position in a Sequential ("mlp.0", not "0").
    parts = [n.split(".") for n in names]
    leaves = list(dict.fromkeys(".".join(p[-2:]) if p[-1].isdigit() and len(p) > 1 else p[-1] for p in parts))
    shown = ", ".join(leaves[:limit])
    return shown + (f", ... ({len(leaves)} names)" if len(leaves) > limit else "")


def _check_targets(module: nn.Module, targets: Any, field: str) -> None:
    names = linear_module_names(module)
    available = f"the Linear modules are {_short_names(names)}" if names else "the model has no Linear module"
    if isinstance(targets, str):
        if targets == "all-linear":
            return
        found = [n for n in names if re.fullmatch(targets, n)]
        if not found:
            raise KDConfigError(field, f"the pattern {targets!r} matches no Linear module", available)
        return
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise KDConfigError(field, f"must be a list of module names or a regex string, got {targets!r}", available)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise KDConfigError(field, f"{missing} match no Linear module of {type(module).__name__}", available)


def add_lora(module: nn.Module, spec: Mapping[str, Any], field: str = "lora") -> list[str]:
    """Inject LoRA adapters into ``module`` (in place) and freeze everything else; return the adapter parameter names.

    Args:
        module: the network (its class and forward are unchanged).
        spec: ``{"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}``; also ``bias``
            (``"none"``), ``use_rslora``, ``init_lora_weights``. ``target_modules``: module names (a module
            matches when its full name equals or ends with ``.<name>``), one regex string, or ``"all-linear"``.
        field: the config field named in errors (e.g. ``model.init_args.student.init_args.lora``).

    Raises:
        KDConfigError: unknown keys, bad values, target modules that do not exist (naming the Linear modules there
            are), or peft missing.
    """
    if not isinstance(spec, Mapping):
        example = "{r: 8, alpha: 16, target_modules: [q_proj]}"
        raise KDConfigError(field, f"must be a dict such as {example}, got {spec!r}")
    unknown = sorted(set(spec) - set(LORA_KEYS))
    if unknown:
        raise KDConfigError(f"{field}.{unknown[0]}", "unknown LoRA option", f"the options are {', '.join(LORA_KEYS)}")
    if "target_modules" not in spec:
        raise KDConfigError(
            f"{field}.target_modules",
            "is missing",
            f"name the Linear modules to adapt: {_short_names(linear_module_names(module))} (or all-linear)",
        )
    r, alpha, dropout = spec.get("r", 8), spec.get("alpha", 2 * spec.get("r", 8)), spec.get("dropout", 0.0)
    if not isinstance(r, int) or r < 1:
        raise KDConfigError(f"{field}.r", f"must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise KDConfigError(f"{field}.alpha", f"must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise KDConfigError(f"{field}.dropout", f"must be in [0, 1), got {dropout!r}")
    _check_targets(module, spec["target_modules"], f"{field}.target_modules")
    if has_lora(module):
        raise KDConfigError(field, f"{type(module).__name__} already has LoRA adapters")
    peft = _import_peft(field)
    targets = spec["target_modules"]
    kwargs = {LORA_KEYS[k]: v for k, v in spec.items()}
    kwargs.update(r=r, lora_alpha=alpha, lora_dropout=float(dropout))
    kwargs["target_modules"] = list(targets) if isinstance(targets, (list, tuple)) else targets
    try:
        config = peft.LoraConfig(**kwargs)
        peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    except (ValueError, TypeError) as err:
        raise KDConfigError(field, f"peft refused the LoRA options ({' '.join(str(err).split())[:200]})") from None
    names = [n for n, _ in module.named_parameters() if ".lora_" in n]
    adapter = set(names)
    for name, param in module.named_parameters():
        param.requires_grad_(name in adapter)
    return names


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` holds peft adapter layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _tuner_layers(module: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` as its base model inside the block (every adapter off), e.g. a fixed teacher ``p_0``.

    ``requires_grad`` of the adapter weights is restored on exit (peft's switch changes it).
    """
    layers = _tuner_layers(module) if has_lora(module) else []
    if not layers:
        raise KDConfigError(
            "lora", f"{type(module).__name__} has no LoRA adapters to disable", "build the model with lora: {...}"
        )
    flags = {id(p): p.requires_grad for p in module.parameters()}
    before = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield module
    finally:
        for layer, was_disabled in zip(layers, before, strict=True):
            layer.enable_adapters(not was_disabled)
        for p in module.parameters():
            p.requires_grad_(flags[id(p)])


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's saved layout (``base_model.model.<module path>.lora_A.weight``)."""
    peft = _import_peft()
    state = peft.get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {"base_model.model." + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapters(module: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write peft's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for ``module``.

    ``peft.PeftModel.from_pretrained(base, folder)`` (and :func:`load_adapters`) read it back.
    """
    from safetensors.torch import save_file

    if not has_lora(module):
        raise KDConfigError("lora", f"{type(module).__name__} has no LoRA adapters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = module.peft_config[ADAPTER_NAME]  # set by inject_adapter_in_model
    config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(folder))
    save_file(adapter_state_dict(module), str(folder / _ADAPTER_WEIGHTS))
    return folder


def load_adapters(module: nn.Module, folder: str | Path, field: str = "adapters") -> None:
    """Load adapter weights written by :func:`save_adapters` (or peft's ``save_pretrained``) into ``module``."""
    from safetensors.torch import load_file

    peft = _import_peft(field)
    folder = Path(folder)
    weights = folder / _ADAPTER_WEIGHTS
    if not weights.is_file():
        raise KDConfigError(field, f"no {_ADAPTER_WEIGHTS} in {folder}", "give a folder written by save_adapters")
    if not has_lora(module):
        raise KDConfigError(
            field, f"{type(module).__name__} has no LoRA adapters", "build it with the same lora: {...}"
        )
    saved = json.loads((folder / _ADAPTER_CONFIG).read_text()) if (folder / _ADAPTER_CONFIG).is_file() else {}
    ours = module.peft_config[ADAPTER_NAME]
    if saved and int(saved.get("r", ours.r)) != int(ours.r):
        raise KDConfigError(field, f"the adapters in {folder} have r={saved['r']}, the model r={ours.r}")
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    result = peft.set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise KDConfigError(field, f"{len(unexpected)} saved adapter weights fit no adapter (first: {unexpected[0]})")


def adapters_only_state_dict(module: nn.Module, adapter_names: list[str]) -> None:
    """Make ``module.state_dict()`` hold only ``adapter_names`` and let ``load_state_dict`` (strict too) restore
    them onto the current base weights; a full state dict still loads everything.

    Implemented with a state-dict post-hook (drops the other keys) and load hooks (the base weights missing from
    the loaded dict are not reported as missing), so it works inside a LightningModule's checkpoint.
    """
    keep = set(adapter_names)

    def drop_base(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if key[len(prefix) :] not in keep:
                del state_dict[key]

    def remember_prefix(mod: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        mod._kd_load_prefixes = [*getattr(mod, "_kd_load_prefixes", []), prefix]

    def forgive_base(mod: nn.Module, incompatible: Any) -> None:
        prefixes = getattr(mod, "_kd_load_prefixes", [])
        if not prefixes:
            return
        prefix = prefixes.pop()
        named = list(mod.named_parameters(remove_duplicate=False)) + list(mod.named_buffers(remove_duplicate=False))
        base = {prefix + name for name, _ in named if name not in keep}
        missing = incompatible.missing_keys
        missing[:] = [k for k in missing if k not in base]

    module.register_state_dict_post_hook(drop_base)
    module.register_load_state_dict_pre_hook(remember_prefix)
    module.register_load_state_dict_post_hook(forgive_base)
