"""A frozen CLIP model as a zero-shot image classifier: a teacher that needs no training.

``logits = s · normalise(f_img(x)) @ W``, where ``W[:, c]`` is class ``c``'s text embedding: the average of the
normalised text embeddings of every prompt template filled with the class name, normalised again (CLIP's
prompt ensembling, Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021), and ``s`` the logit scale (CLIP's learned value is 100). This is the teacher of DHO (Kang et al.,
"Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language Models via Dual-Head
Optimization", 2025) and of other CLIP-to-student distillation settings.

Two backends, both optional (the package imports without them):

- ``"transformers"``: a local folder written by ``CLIPModel.save_pretrained`` with its tokenizer and image
  processor files (``huggingface-cli download openai/clip-vit-base-patch32 --local-dir <folder>``); needs the
  ``transformers`` extra.
- ``"open_clip"``: a local open_clip checkpoint file (``.safetensors`` or a torch file holding tensors only) and
  its architecture's ``model_name`` (``"ViT-B-32"``); needs ``pip install open_clip_torch``.

Nothing is ever downloaded (``local_files_only=True``); weights are read with safetensors or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError
from kd_lightning.models.checkpoints import pretrained_folder_kwargs

__all__ = ["CLIPZeroShotClassifier"]

_HF_FIX = (
    "download a CLIP checkpoint elsewhere and copy it here, e.g. "
    "huggingface-cli download openai/clip-vit-base-patch32 --local-dir {path}"
)
_OPEN_CLIP_FIX = (
    "download an open_clip checkpoint elsewhere and copy it here, e.g. huggingface-cli download "
    "laion/CLIP-ViT-B-32-laion2B-s34B-b79K open_clip_model.safetensors --local-dir {folder} "
    "(with model_name ViT-B-32)"
)


class _HFImageTower(nn.Module):
    """The image side of a transformers ``CLIPModel``: ``visual_projection(vision_model(x).pooler_output)``."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.visual_projection(pooled)


def _features(out: Any) -> Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4.x, an output object in 5.x)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _channel_values(name: str, value: float | Sequence[float], allowed: tuple[int, ...]) -> Tensor:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in allowed:
        raise KDConfigError(
            name, f"needs {' or '.join(map(str, allowed))} values (one per channel), got {len(values)}", "e.g. 0.5"
        )
    if not all(math.isfinite(v) for v in values):
        raise KDConfigError(name, f"must be finite, got {values}", "give the data module's statistics")
    return torch.tensor(values, dtype=torch.float32)


class CLIPZeroShotClassifier(nn.Module, metaclass=ConfigFieldPrefix):
    """A frozen CLIP model classifying images zero-shot from class names: ``forward(x) -> logits [B, C]``.

    ``logits = s · normalise(f_img(pre(x))) @ W`` with ``W = [w_1 .. w_C]``,
    ``w_c = normalise(mean_t normalise(f_txt(template_t.format(class_c))))``. ``W`` is computed once here and
    kept as the buffer ``text_classifier`` ``[D, C]``; the text tower is then dropped (only the image tower is
    kept). Every parameter is frozen (``requires_grad=False``) and the module starts in eval mode;
    ``is_pretrained = True`` tells ``kd fit`` not to train it as a missing teacher. ``forward`` does not disable
    autograd: gradients can flow to the input (the caller decides, e.g. ``torch.no_grad`` for a teacher).

    ``pre(x)``: the data module gives normalised tensors ``[B, 1 or 3, H, W]``; they are mapped back to
    ``[0, 1]`` with ``input_mean``/``input_std``, one channel is replicated to three, the shorter side is
    resized to the model's image size (``interpolation``, antialiased) and the centre cropped (CLIP's
    preprocessing), values are clamped to ``[0, 1]`` (as the 8-bit images CLIP's processor sees), and normalised
    with the CLIP processor's mean and std.

    Args:
        checkpoint: ``"transformers"``: a local folder holding a ``CLIPModel`` (``config.json``, weights) with its
            tokenizer and image processor files. ``"open_clip"``: a local checkpoint file.
        class_names: one name per class, in the order of the data's labels.
        prompt_templates: prompts with one ``{}`` for the class name; their normalised text embeddings are
            averaged per class (CLIP's prompt ensembling).
        backend: ``"transformers"`` or ``"open_clip"``.
        model_name: the open_clip architecture (``"ViT-B-32"``, ``"ViT-L-14"``); only with ``backend="open_clip"``.
        input_mean: the data module's normalisation mean (a scalar or one value per input channel).
        input_std: the data module's normalisation std (same form).
        logit_scale: ``s``; ``None`` uses the model's learned scale (``exp(logit_scale)``, 100 for OpenAI's CLIP).
        image_mean: override the CLIP processor's per-channel mean (three values); ``None`` reads it from the
            checkpoint's processor.
        image_std: the same for the std.
        interpolation: resizing mode, ``"bicubic"`` (CLIP's processor) or ``"bilinear"``.
        text_batch_size: prompts encoded per batch at construction.
        text_device: device the prompts are encoded on at construction (``"cuda"`` for thousands of prompts); the
            module itself is returned on the CPU.
    """

    #: No prefix: the field is the constructor's argument (``checkpoint``); the metaclass only hands the error to the
    #: CLI, which prints it as one line instead of jsonargparse's report.
    config_prefix: ClassVar[str] = ""
    #: Carries its own trained weights: ``kd fit`` does not train it as a missing teacher.
    is_pretrained: ClassVar[bool] = True

    def __init__(
        self,
        checkpoint: str,
        class_names: Sequence[str],
        prompt_templates: Sequence[str] = ("a photo of a {}.",),
        backend: Literal["transformers", "open_clip"] = "transformers",
        model_name: str | None = None,
        input_mean: float | Sequence[float] = 0.0,
        input_std: float | Sequence[float] = 1.0,
        logit_scale: float | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        text_batch_size: int = 256,
        text_device: str = "cpu",
    ) -> None:
        super().__init__()
        self._check_arguments(
            class_names, prompt_templates, backend, model_name, logit_scale, text_batch_size, text_device
        )
        if interpolation not in ("bicubic", "bilinear"):
            raise KDConfigError("interpolation", f"must be 'bicubic' or 'bilinear', got {interpolation!r}", "")
        self.checkpoint = str(checkpoint)
        self.class_names = [str(c) for c in class_names]
        self.prompt_templates = [str(t) for t in prompt_templates]
        self.backend = backend
        self.model_name = model_name
        self.interpolation = interpolation
        mean = _channel_values("input_mean", input_mean, (1, 3))
        std = _channel_values("input_std", input_std, (1, 3))
        if (std <= 0).any():
            raise KDConfigError("input_std", f"must be > 0, got {std.tolist()}", "give the data module's std")
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)

        prompts = [template.format(name) for name in self.class_names for template in self.prompt_templates]
        if backend == "transformers":
            image_tower, encode_text, learned_scale, size, clip_mean, clip_std = _load_transformers(
                Path(checkpoint).expanduser(), image_mean is None or image_std is None
            )
        else:
            image_tower, encode_text, learned_scale, size, clip_mean, clip_std = _load_open_clip(
                Path(checkpoint).expanduser(), str(model_name)
            )
        clip_mean = _channel_values("image_mean", clip_mean if image_mean is None else image_mean, (3,))
        clip_std = _channel_values("image_std", clip_std if image_std is None else image_std, (3,))
        if (clip_std <= 0).any():
            raise KDConfigError("image_std", f"must be > 0, got {clip_std.tolist()}", "give CLIP's std")
        self.register_buffer("image_mean", clip_mean, persistent=False)
        self.register_buffer("image_std", clip_std, persistent=False)
        self.image_size: tuple[int, int] = size
        self.scale = float(learned_scale if logit_scale is None else logit_scale)

        text = _encode_prompts(encode_text, prompts, text_batch_size, text_device)  # [C*T, D], normalised
        per_class = text.view(len(self.class_names), len(self.prompt_templates), -1).mean(dim=1)
        self.register_buffer("text_classifier", F.normalize(per_class, dim=-1).t().contiguous())  # [D, C]
        self.image_encoder = image_tower
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _check_arguments(
        class_names: Sequence[str],
        prompt_templates: Sequence[str],
        backend: str,
        model_name: str | None,
        logit_scale: float | None,
        text_batch_size: int,
        text_device: str,
    ) -> None:
        if isinstance(class_names, str) or not class_names:
            raise KDConfigError("class_names", "must be a non-empty list of names", "e.g. [cat, dog]")
        if isinstance(prompt_templates, str) or not prompt_templates:
            raise KDConfigError("prompt_templates", "must be a non-empty list of prompts", "e.g. ['a photo of a {}.']")
        for template in prompt_templates:
            if str(template).count("{}") != 1:
                raise KDConfigError(
                    "prompt_templates", f"each needs exactly one {{}} for the class name, got {template!r}", ""
                )
        if backend not in ("transformers", "open_clip"):
            raise KDConfigError("backend", f"must be 'transformers' or 'open_clip', got {backend!r}", "")
        if backend == "open_clip" and not model_name:
            raise KDConfigError("model_name", "backend open_clip needs the architecture's name", "e.g. ViT-B-32")
        if backend == "transformers" and model_name:
            raise KDConfigError(
                "model_name", "is only for backend open_clip", "leave it out (the folder's config says)"
            )
        if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
            raise KDConfigError("logit_scale", f"must be > 0, got {logit_scale}", "CLIP uses 100, or null")
        if text_batch_size < 1:
            raise KDConfigError("text_batch_size", f"must be >= 1, got {text_batch_size}", "")
        try:
            torch.device(text_device)
        except RuntimeError:
            raise KDConfigError("text_device", f"is not a device: {text_device!r}", "e.g. cpu or cuda") from None

    @property
    def num_classes(self) -> int:
        """Number of classes (columns of the logits)."""
        return int(self.text_classifier.shape[1])

    def preprocess(self, x: Tensor) -> Tensor:
        """Normalised data ``[B, 1 or 3, H, W]`` -> CLIP pixel values ``[B, 3, S, S]``."""
        if x.ndim != 4:
            raise KDConfigError("input", f"CLIPZeroShotClassifier takes images [B, C, H, W], got {tuple(x.shape)}", "")
        channels = x.shape[1]
        for name in ("input_mean", "input_std"):
            if getattr(self, name).numel() not in (1, channels):
                raise KDConfigError(
                    name, f"has {getattr(self, name).numel()} values for {channels}-channel images", "give 1 or C"
                )
        if channels not in (1, 3):
            raise KDConfigError("input", f"CLIP takes 1- or 3-channel images, got {channels} channels", "")
        x = x.float() * self.input_std.view(1, -1, 1, 1) + self.input_mean.view(1, -1, 1, 1)
        x = x.expand(-1, 3, -1, -1) if channels == 1 else x
        height, width = x.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            ratio = max(target_h / height, target_w / width)  # the shorter side reaches the target
            size = (max(target_h, round(height * ratio)), max(target_w, round(width * ratio)))
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
            top, left = (size[0] - target_h) // 2, (size[1] - target_w) // 2
            x = x[..., top : top + target_h, left : left + target_w]
        x = x.clamp(0.0, 1.0)
        return (x - self.image_mean.view(1, 3, 1, 1)) / self.image_std.view(1, 3, 1, 1)

    def image_features(self, x: Tensor) -> Tensor:
        """Normalised image embeddings ``[B, D]`` of normalised data ``x``."""
        return F.normalize(self.image_encoder(self.preprocess(x)).float(), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Zero-shot logits ``[B, C] = scale · normalise(f_img(x)) @ text_classifier``."""
        return self.scale * self.image_features(x) @ self.text_classifier

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, checkpoint={self.checkpoint!r}, classes={self.num_classes}, "
            f"templates={len(self.prompt_templates)}, scale={self.scale:g}, image_size={self.image_size}"
        )


# ------------------------------------------------------------------------------------------------ loading
@torch.no_grad()
def _encode_prompts(encode_text: Any, prompts: list[str], batch_size: int, device: str) -> Tensor:
    """Normalised text embeddings ``[N, D]`` of ``prompts`` (CPU, float32)."""
    chunks = [
        F.normalize(encode_text(prompts[i : i + batch_size], torch.device(device)).float(), dim=-1).cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(chunks)


def _missing(path: Path, fix: str) -> KDConfigError:
    return KDConfigError("checkpoint", f"{path.resolve()} does not exist (nothing is downloaded)", fix)


def _load_transformers(path: Path, need_processor: bool) -> tuple[nn.Module, Any, float, tuple[int, int], Any, Any]:
    try:
        import transformers
    except ImportError:
        raise KDConfigError(
            "backend",
            "'transformers' needs Hugging Face transformers, which is not installed",
            'pip install "kd-lightning[transformers]"',
        ) from None
    if not path.is_dir():
        if path.is_file():
            raise KDConfigError(
                "checkpoint",
                f"{path.resolve()} is a file; backend transformers takes the folder of a saved CLIPModel",
                "give that folder, or set backend: open_clip and model_name for an open_clip file",
            )
        raise _missing(path, _HF_FIX.format(path=path))
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise KDConfigError(
            "checkpoint",
            f"{path.resolve()} holds no transformers model config (config.json): {type(err).__name__}",
            "give the folder written by CLIPModel.save_pretrained or huggingface-cli download",
        ) from None
    if getattr(config, "model_type", None) != "clip":
        raise KDConfigError(
            "checkpoint",
            f"{path.resolve()} holds a {getattr(config, 'model_type', '?')!r} model, not a CLIP model ('clip')",
            "give the folder of a CLIPModel, e.g. openai/clip-vit-base-patch32",
        )
    kwargs: dict[str, Any] = {"dtype": torch.float32, **pretrained_folder_kwargs(path)}
    try:
        model = transformers.CLIPModel.from_pretrained(str(path), **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise KDConfigError(
            "checkpoint",
            f"cannot load the CLIP model and tokenizer from {path.resolve()}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}",
            "copy the whole checkpoint folder (weights, tokenizer and processor files)",
        ) from None
    clip_mean = clip_std = None
    if need_processor:
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            clip_mean, clip_std = list(processor.image_mean), list(processor.image_std)
        except (OSError, ValueError, AttributeError, TypeError) as err:
            raise KDConfigError(
                "checkpoint",
                f"{path.resolve()} has no usable image processor (preprocessor_config.json): {type(err).__name__}",
                "copy the processor files of the checkpoint too, or give image_mean and image_std",
            ) from None
    max_length = int(model.config.text_config.max_position_embeddings)
    model.eval()

    def encode_text(prompts: list[str], device: torch.device) -> Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        model.to(device)
        out = model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        return _features(out)

    try:
        scale = float(model.logit_scale.detach().exp())
        size = int(model.config.vision_config.image_size)
        tower = _HFImageTower(model.vision_model, model.visual_projection)
        return tower, _ReturnsToCPU(encode_text, model), scale, (size, size), clip_mean, clip_std
    except AttributeError as err:  # pragma: no cover - a CLIPModel always has these
        raise KDConfigError("checkpoint", f"{path.resolve()} is not a complete CLIP model: {err}", "") from None


class _ReturnsToCPU:
    """``encode_text`` that moves the model back to the CPU when the prompts are encoded (see ``_encode_prompts``)."""

    def __init__(self, encode: Any, model: nn.Module) -> None:
        self.encode, self.model = encode, model

    def __call__(self, prompts: list[str], device: torch.device) -> Tensor:
        try:
            return self.encode(prompts, device)
        finally:
            if device.type != "cpu":
                self.model.to("cpu")


def _load_open_clip(path: Path, model_name: str) -> tuple[nn.Module, Any, float, tuple[int, int], Any, Any]:
    try:
        import open_clip
    except ImportError:
        raise KDConfigError(
            "backend", "'open_clip' needs open_clip, which is not installed", "pip install open_clip_torch"
        ) from None
    if not path.is_file():
        raise _missing(path, _OPEN_CLIP_FIX.format(folder=path.parent))
    if model_name not in open_clip.list_models():
        raise KDConfigError(
            "model_name",
            f"{model_name!r} is not an open_clip architecture",
            "see open_clip.list_models(), e.g. ViT-B-32",
        )
    try:
        model = open_clip.create_model(model_name, pretrained=None, device="cpu", precision="fp32")
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as err:
        raise KDConfigError(
            "model_name", f"cannot build open_clip {model_name!r} offline: {type(err).__name__}: {err}", ""
        ) from None
    try:
        # open_clip reads .safetensors with safetensors, anything else with torch.load(weights_only=True).
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as err:  # a torch file with pickled objects, another format, another architecture
        raise KDConfigError(
            "checkpoint",
            f"{path.resolve()} is not a safely loadable open_clip {model_name} checkpoint: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}",
            "give a .safetensors (or tensors-only torch) checkpoint of that architecture",
        ) from None
    model.eval()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def encode_text(prompts: list[str], device: torch.device) -> Tensor:
        model.to(device)
        return model.encode_text(tokenizer(prompts).to(device))

    scale = float(model.logit_scale.detach().exp())
    return model.visual, _ReturnsToCPU(encode_text, model), scale, size, cfg.get("mean"), cfg.get("std")
