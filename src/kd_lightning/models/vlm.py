"""Vision-language models (LLaVA-style): an image encoder, a projector and a causal LM that reads the projected
visual tokens before the text.

:class:`VisionLanguageModel` wraps ``vision`` (images ``[B, 3, H, W]`` -> tokens ``[B, N, C]`` or a map
``[B, C, h, w]``), a projector (``"linear"`` or ``"mlp"``: ``C -> d``) and ``language``
(:class:`~kd_lightning.models.lm.TinyGPT` or :class:`~kd_lightning.models.lm.HFCausalLM`, through their embeddings
API ``embed`` /
``forward_embeds``). The ``N_v`` projected visual tokens are PREPENDED to the text embeddings; the LM sees
``[visual; text]`` with the visual tokens always attended and positions counted over the real tokens (left-padded
prompts give the logits of the unpadded ones). ``forward`` returns the logits of the TEXT positions only (the
column of the last visual token is dropped), so the LM tasks' next-token plumbing works unchanged.

Vision encoders: :class:`DigitPatchEncoder` (a small CNN, one token per 16 x 16 cell by default) and
:class:`TimmVisionEncoder` (any timm backbone's features as tokens; extra ``timm``, ``pretrained=False`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError
from kd_lightning.models.lm import _as_bool_mask, sample_next_token

__all__ = ["DigitPatchEncoder", "TimmVisionEncoder", "VLMOutput", "VisionLanguageModel", "is_vision_language_model"]


def is_vision_language_model(module: Any) -> bool:
    """Whether ``module`` has the VLM interface (``visual_tokens``, ``num_image_tokens``, ``forward_detailed``)."""
    return all(hasattr(module, name) for name in ("visual_tokens", "num_image_tokens", "forward_detailed"))


@dataclass
class VLMOutput:
    """What :meth:`VisionLanguageModel.forward_detailed` returns.

    ``logits [B, T, V]`` at the text positions; ``visual_tokens [B, N_v, d]`` (projected); ``hidden_states``: the
    embedding output and every layer's output (the last after the final norm), each ``[B, N_v + T, d]`` (empty
    unless requested); ``attentions``: every layer's softmax weights ``[B, heads, N_v + T, N_v + T]`` (empty unless
    requested); ``num_image_tokens`` = ``N_v`` (the text starts at that column of the full sequence).
    """

    logits: Tensor
    visual_tokens: Tensor
    hidden_states: tuple[Tensor, ...] = field(default_factory=tuple)
    attentions: tuple[Tensor, ...] = field(default_factory=tuple)
    num_image_tokens: int = 0


# ------------------------------------------------------------------------------------------------ encoders
def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise KDConfigError(name, f"must be a positive int or two of them, got {value!r}")
    return pair  # type: ignore[return-value]


#: Cell classes of :class:`DigitPatchEncoder`'s pretraining: the ten digits and "empty".
CELL_CLASSES = 11
#: Pretrained encoder weights by construction arguments (the pretraining is deterministic given them).
_PRETRAINED: dict[tuple[Any, ...], dict[str, Tensor]] = {}
#: Every HELD_OUT_EVERY-th sklearn digit is held out of the pretraining (the VQA data's evaluation digits).
HELD_OUT_EVERY = 5


def digit_cell_rows(
    num_rows: int, cells: int, cell: int, empty_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Rows of ``cells`` cells of ``cell`` pixels from scikit-learn's training digits (index % 5 != 4): images
    ``[num_rows, 1, cell, cells · cell]`` in [0, 1] and cell labels ``[num_rows, cells]`` (10 = empty)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    keep = torch.arange(len(images)) % HELD_OUT_EVERY != HELD_OUT_EVERY - 1
    images = F.interpolate(images[keep], size=(cell, cell), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    targets = torch.as_tensor(digits.target, dtype=torch.long)[keep]
    picks = torch.randint(len(images), (num_rows, cells), generator=generator)
    empty = torch.rand(num_rows, cells, generator=generator) < empty_prob
    labels = torch.where(empty, torch.full_like(picks, CELL_CLASSES - 1), targets[picks])
    tiles = images[picks] * (~empty).float()[..., None, None, None]  # [rows, cells, 1, cell, cell]
    return torch.cat(tiles.unbind(1), dim=-1), labels


class DigitPatchEncoder(nn.Module, metaclass=ConfigFieldPrefix):
    """A small CNN image encoder whose output map cells are the visual tokens, optionally pretrained.

    Stages of ``conv3x3 -> ReLU -> maxpool 2`` (``channels``), then a patch convolution (kernel = stride =
    ``patch_size``) and ReLU: a ``16 x 64`` image (a row of four 16 x 16 cells) with two stages and ``patch_size
    (4, 4)`` gives a ``1 x 4`` map, one token per cell. ``forward(images [B, in_channels, H, W]) -> [B, C, h, w]``.

    **Pretraining** (the analogue of a VLM's pretrained vision tower, e.g. CLIP in LLaVA): with ``pretrain_steps >
    0`` the encoder is trained at construction, before any VQA step, as a per-cell classifier (ten digits + empty;
    a 1 x 1 convolution head on its tokens, cross-entropy, AdamW) on rows of scikit-learn's TRAINING digits (index
    % 5 != 4, the digits :class:`~kd_lightning.data.vqa.DigitVQADataModule` trains on), normalised with their own
    mean/std; initialisation and data come from ``pretrain_seed`` (not the global seed), so the result is a pure
    function of the arguments, computed once per process and reused (like loading a released checkpoint).
    Measured on the development machine: trained end to end
    from scratch, tiny VLMs stay at the VQA prior (count right, other questions at chance) for tens of epochs;
    with this pretrained, frozen encoder they learn every question type within ten. ``output: probabilities``
    makes the tokens the head's 11 cell-class probabilities (C = 11), ``freeze`` stops training it afterwards.

    Args:
        channels: output channels of the conv stages (each halves the resolution).
        patch_size: kernel and stride of the final patch convolution (on the map after the stages).
        out_dim: C, channels of the feature tokens (``None``: the last stage's).
        in_channels: image channels.
        image_size: ``(H, W)`` of the images, for :attr:`num_tokens` (``h · w``).
        pretrain_steps: optimiser steps of the cell-classification pretraining (0: random initialisation).
        pretrain_lr, pretrain_batch_size, pretrain_empty_prob, pretrain_seed: its AdamW learning rate, rows per
            step, share of empty cells and random seed.
        output: ``"features"`` (C = ``out_dim``) or ``"probabilities"`` (the cell head's softmax, C = 11).
        freeze: no gradient to the encoder (and its head) after construction.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        patch_size: int | Sequence[int] = (4, 4),
        out_dim: int | None = None,
        in_channels: int = 3,
        image_size: int | Sequence[int] = (16, 64),
        pretrain_steps: int = 0,
        pretrain_lr: float = 3e-3,
        pretrain_batch_size: int = 32,
        pretrain_empty_prob: float = 0.25,
        pretrain_seed: int = 0,
        output: Literal["features", "probabilities"] = "features",
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if not channels or min(channels) < 1:
            raise KDConfigError("DigitPatchEncoder.channels", f"must be positive channel counts, got {list(channels)}")
        if in_channels < 1 or (out_dim is not None and out_dim < 1):
            raise KDConfigError(
                "DigitPatchEncoder.out_dim", f"in_channels and out_dim must be >= 1, got {in_channels}, {out_dim}"
            )
        if output not in ("features", "probabilities"):
            raise KDConfigError("DigitPatchEncoder.output", f"must be 'features' or 'probabilities', got {output!r}")
        if pretrain_steps < 0 or pretrain_batch_size < 1 or pretrain_lr <= 0 or not 0 <= pretrain_empty_prob < 1:
            raise KDConfigError(
                "DigitPatchEncoder.pretrain_steps",
                "need pretrain_steps >= 0, pretrain_batch_size >= 1, pretrain_lr > 0 and pretrain_empty_prob in "
                f"[0, 1), got {pretrain_steps}, {pretrain_batch_size}, {pretrain_lr}, {pretrain_empty_prob}",
            )
        self.patch_size = _pair(patch_size, "DigitPatchEncoder.patch_size")
        self.image_size = _pair(image_size, "DigitPatchEncoder.image_size")
        scale = 2 ** len(channels)
        h, w = self.image_size[0] // scale, self.image_size[1] // scale
        if h % self.patch_size[0] or w % self.patch_size[1] or h < 1 or w < 1:
            raise KDConfigError(
                "DigitPatchEncoder.patch_size",
                f"{list(self.patch_size)} does not tile the {h} x {w} map that {len(channels)} stages make of a "
                f"{self.image_size[0]} x {self.image_size[1]} image",
                "choose a patch size dividing the map (or fewer stages)",
            )
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.stages = nn.Sequential(*layers)
        self.feature_dim = int(out_dim or previous)
        self.patch = nn.Conv2d(previous, self.feature_dim, self.patch_size, stride=self.patch_size)
        self.grid = (h // self.patch_size[0], w // self.patch_size[1])
        self.output = output
        self.out_dim = CELL_CLASSES if output == "probabilities" else self.feature_dim
        #: ``kd fit``'s teacher re-initialisation (``reset_parameters`` in kd_lightning.teachers) keeps these weights.
        self.is_pretrained = pretrain_steps > 0
        needs_head = pretrain_steps > 0 or output == "probabilities"
        self.cell_head = nn.Conv2d(self.feature_dim, CELL_CLASSES, 1) if needs_head else None
        if pretrain_steps:
            settings = (pretrain_steps, pretrain_lr, pretrain_batch_size, pretrain_empty_prob, pretrain_seed)
            key = (tuple(channels), self.patch_size, self.feature_dim, in_channels, self.image_size, *settings)
            if key not in _PRETRAINED:  # a pure function of the arguments: computed once per process
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(pretrain_seed)
                    for module in self.modules():
                        if isinstance(module, nn.Conv2d):
                            module.reset_parameters()
                    self.pretrain(*settings)
                _PRETRAINED[key] = {name: value.detach().clone() for name, value in self.state_dict().items()}
            self.load_state_dict(_PRETRAINED[key])
        if freeze:
            self.requires_grad_(False)

    @property
    def num_tokens(self) -> int:
        """Tokens per image of :attr:`image_size`: ``h · w`` of the output map."""
        return self.grid[0] * self.grid[1]

    def features(self, images: Tensor) -> Tensor:
        """The feature map ``[B, feature_dim, h, w]``."""
        return F.relu(self.patch(self.stages(images)))

    def forward(self, images: Tensor) -> Tensor:
        out = self.features(images)
        if self.output == "probabilities":
            return F.softmax(self.cell_head(out), dim=1)
        return out

    def pretrain(self, steps: int, lr: float, batch_size: int, empty_prob: float, seed: int) -> float:
        """Per-cell digit/empty classification (see the class docstring); returns the last step's loss."""
        cell, cells = self.image_size[0], self.grid[1]
        if self.grid[0] != 1 or self.image_size[1] != cells * cell:
            raise KDConfigError(
                "DigitPatchEncoder.pretrain_steps",
                f"pretraining reads rows of square cells with one token each, but a {self.image_size[0]} x "
                f"{self.image_size[1]} image gives a {self.grid[0]} x {self.grid[1]} map",
                "use image_size (cell, cells * cell) with a patch size that gives one token per cell",
            )
        generator = torch.Generator().manual_seed(seed)
        images, labels = digit_cell_rows(steps * batch_size, cells, cell, empty_prob, generator)
        images = ((images - images.mean()) / images.std().clamp_min(1e-6)).repeat(1, self.stages[0].in_channels, 1, 1)
        optimizer = torch.optim.AdamW(self.parameters(), lr=lr)
        loss = torch.zeros(())
        with torch.enable_grad():
            for step in range(steps):
                rows = slice(step * batch_size, (step + 1) * batch_size)
                logits = self.cell_head(self.features(images[rows])).flatten(2)  # [b, 11, cells]
                loss = F.cross_entropy(logits, labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for param in self.parameters():
            param.grad = None
        return float(loss.detach())


class TimmVisionEncoder(nn.Module, metaclass=ConfigFieldPrefix):
    """A timm backbone's ``forward_features`` as visual tokens (needs the ``timm`` extra).

    A ViT-like model gives tokens ``[B, N, C]`` (its prefix tokens dropped with ``drop_prefix_tokens``), a CNN a map
    ``[B, C, h, w]``. ``out_dim`` and ``num_tokens`` come from one probe forward on ``image_size`` zeros.

    Args:
        model_name: a timm architecture name.
        pretrained: load timm's pretrained weights (downloads them unless cached): ``False`` by default.
        image_size: ``(H, W)`` of the images.
        in_channels: image channels.
        drop_prefix_tokens: drop the class/register tokens of token outputs.
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size`` for a ViT on small images).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        image_size: int | Sequence[int] = (16, 64),
        in_channels: int = 3,
        drop_prefix_tokens: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f'TimmVisionEncoder({model_name!r}) needs timm: pip install "kd-lightning[timm]"'
            ) from err
        if not timm.is_model(model_name.split(".", 1)[0]):
            raise KDConfigError(
                "TimmVisionEncoder.model_name", f"{model_name!r} is not a timm model", "see timm.list_models()"
            )
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, in_chans=in_channels, **kwargs)
        self.image_size = _pair(image_size, "TimmVisionEncoder.image_size")
        self.drop_prefix_tokens = drop_prefix_tokens
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            probe = self(torch.zeros(1, in_channels, *self.image_size))
        self.model.train(was_training)
        self.out_dim = int(probe.shape[1] if probe.dim() == 4 else probe.shape[-1])
        self.num_tokens = int(probe.shape[2] * probe.shape[3] if probe.dim() == 4 else probe.shape[1])

    def forward(self, images: Tensor) -> Tensor:
        out = self.model.forward_features(images)
        if out.dim() == 3 and self.drop_prefix_tokens and self.num_prefix_tokens:
            out = out[:, self.num_prefix_tokens :]
        return out


# ------------------------------------------------------------------------------------------------ the VLM
def _language_width(language: nn.Module) -> int:
    width = getattr(language, "d_model", None)
    if width is None and callable(getattr(getattr(language, "model", None), "get_input_embeddings", None)):
        width = language.model.get_input_embeddings().embedding_dim
    if width is None:
        raise KDConfigError(
            "VisionLanguageModel.language",
            f"{type(language).__name__} has no d_model or input embeddings",
            "use TinyGPT or HFCausalLM",
        )
    return int(width)


class VisionLanguageModel(nn.Module, metaclass=ConfigFieldPrefix):
    """Image encoder -> projector -> causal LM, the projected visual tokens prepended to the text (LLaVA-style).

    ``forward(input_ids, attention_mask=None, images=None, visual_embeds=None) -> logits [B, T, V]`` at the text
    positions (exactly one of ``images`` and ``visual_embeds``, the latter already projected ``[B, N_v, d]``: e.g.
    a student's visual tokens fed to a teacher's LM). The full sequence is ``[visual tokens; text]`` with the
    visual tokens always attended and the text's positions counted over its real tokens, so right-padded
    training rows and left-padded prompts both work.

    Args:
        vision: image encoder: ``images -> [B, N, C]`` tokens or ``[B, C, h, w]`` map (flattened row by row).
            Its ``out_dim`` (or ``num_features``) gives C, its ``num_tokens`` the token count.
        language: the causal LM (:class:`~kd_lightning.models.lm.TinyGPT` or :class:`~kd_lightning.models.lm.
            HFCausalLM`): ``embed`` and ``forward_embeds``.
        projector: ``"linear"`` (``C -> d``) or ``"mlp"`` (``C -> h -> d``, GELU; LLaVA-1.5's).
        num_image_tokens: N_v; ``None``: the encoder's ``num_tokens``. When it differs from the encoder's count
            the map is pooled adaptively (2-D when N_v is a multiple of the map's rows, else over the flattened
            tokens).
        projector_hidden: h of the MLP projector (``None``: d).
        vision_dim: C when the encoder does not say it (``out_dim`` / ``num_features``).

    Attributes: ``num_image_tokens``, ``hidden_size`` (d), ``vision_dim`` (C), ``vocab_size``,
    ``tokenizer_identity`` (the LM's, may be ``None``), ``projector``.
    """

    def __init__(
        self,
        vision: nn.Module,
        language: nn.Module,
        projector: Literal["linear", "mlp"] = "mlp",
        num_image_tokens: int | None = None,
        projector_hidden: int | None = None,
        vision_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, part in (("vision", vision), ("language", language)):
            if not isinstance(part, nn.Module):
                raise KDConfigError(
                    f"VisionLanguageModel.{name}", f"must be a torch.nn.Module, got {type(part).__name__}"
                )
        if not (callable(getattr(language, "embed", None)) and callable(getattr(language, "forward_embeds", None))):
            raise KDConfigError(
                "VisionLanguageModel.language",
                f"{type(language).__name__} has no embed/forward_embeds (the embeddings API)",
                "use TinyGPT or HFCausalLM",
            )
        if projector not in ("linear", "mlp"):
            raise KDConfigError("VisionLanguageModel.projector", f"must be 'linear' or 'mlp', got {projector!r}")
        dim = vision_dim or getattr(vision, "out_dim", None) or getattr(vision, "num_features", None)
        if dim is None:
            raise KDConfigError(
                "VisionLanguageModel.vision_dim",
                f"{type(vision).__name__} does not say its feature width",
                "give vision_dim",
            )
        count = num_image_tokens if num_image_tokens is not None else getattr(vision, "num_tokens", None)
        if count is None or int(count) < 1:
            raise KDConfigError(
                "VisionLanguageModel.num_image_tokens",
                f"is {count!r} and {type(vision).__name__} has no num_tokens",
                "give num_image_tokens >= 1",
            )
        if projector_hidden is not None and projector_hidden < 1:
            raise KDConfigError("VisionLanguageModel.projector_hidden", f"must be >= 1, got {projector_hidden}")
        self.vision = vision
        self.language = language
        self.vision_dim = int(dim)
        self.hidden_size = _language_width(language)
        self.num_image_tokens = int(count)
        self.projector_kind = projector
        if projector == "linear":
            self.projector: nn.Module = nn.Linear(self.vision_dim, self.hidden_size)
        else:
            hidden = projector_hidden or self.hidden_size
            self.projector = nn.Sequential(
                nn.Linear(self.vision_dim, hidden), nn.GELU(), nn.Linear(hidden, self.hidden_size)
            )

    # ------------------------------------------------------------------ attributes
    @property
    def vocab_size(self) -> int:
        return int(self.language.vocab_size)

    @property
    def tokenizer_identity(self) -> Any:
        """The LM's :class:`~kd_lightning.models.lm.TokenizerIdentity` (``None`` when it records none)."""
        return getattr(self.language, "tokenizer_identity", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.language, "tokenizer", None)

    @property
    def lm_head(self) -> nn.Module:
        return self.language.lm_head

    # ------------------------------------------------------------------ visual path
    def encode_images(self, images: Tensor) -> Tensor:
        """Encoder tokens ``[B, N_v, C]`` (flattened map, pooled to ``num_image_tokens`` when they differ)."""
        if images.dim() != 4:
            raise KDConfigError(f"images must be [batch, channels, height, width], got {tuple(images.shape)}.")
        out = self.vision(images)
        n = self.num_image_tokens
        if out.dim() == 4:
            rows, cols = out.shape[2:]
            if rows * cols != n:
                if n % rows == 0:
                    out = F.adaptive_avg_pool2d(out, (rows, n // rows))
                else:
                    out = F.adaptive_avg_pool1d(out.flatten(2), n)
            return out.flatten(2).transpose(1, 2)
        if out.dim() != 3:
            raise KDConfigError(
                f"the vision encoder returned {tuple(out.shape)}: it must give tokens [B, N, C] or a map [B, C, h, w]."
            )
        if out.shape[1] != n:
            out = F.adaptive_avg_pool1d(out.transpose(1, 2), n).transpose(1, 2)
        return out

    def visual_tokens(self, images: Tensor) -> Tensor:
        """Projected visual tokens ``[B, N_v, d]`` (encoder + projector)."""
        return self.projector(self.encode_images(images))

    def _visual(self, images: Tensor | None, visual_embeds: Tensor | None) -> Tensor:
        if (images is None) == (visual_embeds is None):
            raise KDConfigError(
                "VisionLanguageModel needs exactly one of images and visual_embeds, got "
                f"{'both' if images is not None else 'neither'}: pass the batch's images."
            )
        if visual_embeds is not None:
            if visual_embeds.dim() != 3 or visual_embeds.shape[-1] != self.hidden_size:
                raise KDConfigError(
                    f"visual_embeds must be [batch, tokens, {self.hidden_size}] (the LM's width), got "
                    f"{tuple(visual_embeds.shape)}."
                )
            return visual_embeds
        return self.visual_tokens(images)  # type: ignore[arg-type]

    def build_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, visual: Tensor) -> tuple[Tensor, Tensor]:
        """``(embeddings [B, N_v + T, d], mask [B, N_v + T])`` of ``[visual; text]`` (visual tokens always real)."""
        if input_ids.dim() != 2:
            raise KDConfigError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}.")
        if visual.shape[0] != input_ids.shape[0]:
            raise KDConfigError(f"{visual.shape[0]} images for {input_ids.shape[0]} texts: give one image per text.")
        mask = _as_bool_mask(attention_mask, input_ids)
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        text = self.language.embed(input_ids)
        embeds = torch.cat([visual.to(text.dtype), text], dim=1)
        full = torch.cat([torch.ones(visual.shape[:2], dtype=torch.bool, device=mask.device), mask], dim=1)
        return embeds, full

    # ------------------------------------------------------------------ forward
    def forward_detailed(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        images: Tensor | None = None,
        visual_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> VLMOutput:
        """Logits of the text positions, the visual tokens, and on request every layer's hidden states and
        attention weights over the full ``[visual; text]`` sequence (see :class:`VLMOutput`)."""
        visual = self._visual(images, visual_embeds)
        embeds, mask = self.build_inputs(input_ids, attention_mask, visual)
        logits, hidden, attentions = self.language.forward_embeds(
            embeds, mask, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        n = visual.shape[1]
        return VLMOutput(logits[:, n:], visual, tuple(hidden), tuple(attentions), n)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        images: Tensor | None = None,
        visual_embeds: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits ``[B, T, V]`` at the text positions (see the class docstring)."""
        return self.forward_detailed(input_ids, attention_mask, images, visual_embeds).logits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        images: Tensor | None = None,
        visual_embeds: Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Up to ``max_new_tokens`` tokens after each (left-padded) prompt, reading its image: ``[B, P + n]`` ids
        (prompt, then new tokens; after a row's EOS ``pad_token_id``, default the EOS), like
        :meth:`~kd_lightning.models.lm.TinyGPT.generate` (``temperature=0``: greedy). The visual tokens are computed
        once; each step runs the whole sequence again (no key/value cache: VQA answers are a few tokens)."""
        if max_new_tokens < 0:
            raise KDConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        visual = self._visual(images, visual_embeds)
        mask = _as_bool_mask(attention_mask, input_ids)
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        sequences = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.forward(sequences, mask, visual_embeds=visual)[:, -1]
            token = sample_next_token(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                if pad is not None:
                    token = torch.where(finished, torch.full_like(token, pad), token)
                finished = finished | (token == eos_token_id)
            sequences = torch.cat([sequences, token[:, None].to(sequences.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None], dtype=torch.bool)], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return sequences
