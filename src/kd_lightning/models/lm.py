"""Causal language models for distillation: a small GPT in plain torch and a Hugging Face wrapper.

Both share one interface (what the LM methods, the chunked loss and the offline teacher logits use):

- ``forward(input_ids, attention_mask=None) -> logits [B, T, V]``;
- ``hidden_states(input_ids, attention_mask=None) -> [B, T, H]``: the final hidden states, after the
  final norm, so that ``lm_head(hidden_states(x)) == forward(x)``;
- ``lm_head``: an ``nn.Linear`` with weight ``[V, H]``; ``vocab_size`` = ``V`` (output rows, padding
  rows included);
- ``generate(input_ids, attention_mask=None, max_new_tokens, temperature, top_k, eos_token_id)``:
  sampled continuations (prompt + new tokens), for on-policy distillation.

``attention_mask`` is boolean/0-1 ``[B, T]``, true at real tokens. Training batches are right-padded;
prompts for :meth:`generate` may be left-padded (positions count real tokens only).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError

__all__ = [
    "HFCausalLM",
    "TinyGPT",
    "TokenizerIdentity",
    "completion_mask",
    "load_hf_tokenizer",
    "sample_next_token",
    "tokenizer_identity",
    "tokenizer_vocabulary",
]


def sample_next_token(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """One token per row of ``[B, V]`` logits: greedy at ``temperature=0``, else sampled from
    ``softmax(logits/temperature)`` restricted to the ``top_k`` largest logits (all when ``None`` or 0)."""
    if temperature < 0:
        raise KDConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def completion_mask(sequences: Tensor, prompt_length: int, eos_token_id: int | None = None) -> Tensor:
    """Boolean ``[B, T]`` mask of generated tokens: after the prompt, up to and including the first EOS.

    ``sequences`` is what ``generate`` returns (prompt of ``prompt_length`` columns + continuation); tokens
    after a row's first EOS are padding.
    """
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    mask[:, prompt_length:] = True
    if eos_token_id is not None:
        generated = sequences[:, prompt_length:]
        is_eos = (generated == eos_token_id).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
        mask[:, prompt_length:] &= ~after_eos
    return mask


def _as_bool_mask(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise KDConfigError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}."
        )
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ LoRA
class _LoRAMixin:
    """LoRA helpers shared by :class:`TinyGPT` and :class:`HFCausalLM` (see :mod:`kd_lightning.models.lora`)."""

    _adapter_names: list[str]

    def _init_lora(self, lora: dict[str, Any] | None, adapters_only_checkpoint: bool, target: nn.Module) -> None:
        self._adapter_names = []
        self.adapters_only_checkpoint = adapters_only_checkpoint
        if lora is None:
            if adapters_only_checkpoint:
                raise KDConfigError("adapters_only_checkpoint", "is true but the model has no lora", "set lora: {...}")
            return
        from kd_lightning.models.lora import add_lora

        names = add_lora(target, lora, "lora")
        from kd_lightning.models.lora import has_lora

        if has_lora(self.lm_head):  # type: ignore[attr-defined]
            raise KDConfigError(
                "lora.target_modules",
                "targets the LM head, which the chunked loss and the vocabulary checks read as a plain Linear",
                "adapt the attention/MLP projections instead",
            )
        prefix = next(n for n, m in self.named_modules() if m is target)  # type: ignore[attr-defined]
        self._adapter_names = [f"{prefix}.{n}" if prefix else n for n in names]
        if adapters_only_checkpoint:
            from kd_lightning.models.lora import adapters_only_state_dict

            adapters_only_state_dict(self, self._adapter_names)  # type: ignore[arg-type]

    @property
    def has_adapters(self) -> bool:
        """Whether the model was built with LoRA adapters."""
        return bool(self._adapter_names)

    @property
    def adapter_names(self) -> list[str]:
        """Names (``named_parameters``) of the adapter weights: the only trainable ones."""
        return list(self._adapter_names)

    @contextmanager
    def adapters_disabled(self) -> Iterator[Any]:
        """Inside the block the model computes its base model (adapters off): e.g. OPSD's fixed teacher ``p_0``."""
        from kd_lightning.models.lora import adapters_disabled

        with adapters_disabled(self):  # type: ignore[arg-type]
            yield self

    def save_adapters(self, folder: str | Path) -> Path:
        """Write peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)."""
        from kd_lightning.models.lora import save_adapters

        return save_adapters(self._lora_target(), folder, getattr(self, "path_or_name", None))

    def load_adapters(self, folder: str | Path) -> None:
        """Load adapter weights written by :meth:`save_adapters` (or peft's ``save_pretrained``)."""
        from kd_lightning.models.lora import load_adapters

        load_adapters(self._lora_target(), folder)

    def _lora_target(self) -> nn.Module:
        return self  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ TinyGPT
class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        cache: dict[str, Tensor] | None = None,
        weights_out: list[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """SDPA attention; with ``weights_out`` (a list) the softmax weights ``[B, heads, T, keys]`` are computed
        explicitly (same result) and appended to it."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache = {"k": k, "v": v}
        dropout = self.dropout if self.training else 0.0
        if weights_out is not None:
            y = self._explicit(q, k, v, attn_mask, dropout, weights_out)
        elif attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.proj(y)), cache

    @staticmethod
    def _explicit(
        q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float, weights_out: list[Tensor]
    ) -> Tensor:
        """``softmax(q kᵀ/√d + mask) v`` with the weights kept (what SDPA computes, without the fused kernel)."""
        t, keys = q.shape[2], k.shape[2]
        if attn_mask is None:
            attn_mask = torch.ones(t, keys, dtype=torch.bool, device=q.device).tril(keys - t)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        weights = F.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)
        weights_out.append(weights)
        return F.dropout(weights, dropout) @ v


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        cache: dict[str, Tensor] | None = None,
        weights_out: list[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        attended, cache = self.attn(self.ln1(x), attn_mask, cache, weights_out)
        x = x + attended
        return x + self.mlp(self.ln2(x)), cache


class TinyGPT(_LoRAMixin, nn.Module, metaclass=ConfigFieldPrefix):
    """A small GPT-2-style decoder in plain torch (pre-norm blocks, learned positions, SDPA attention).

    For offline use, tests and the CPU demo. The default ``vocab_size`` (264) is the byte-level
    tokenizer's (:class:`~kd_lightning.data.text.ByteTokenizer`: 256 bytes + pad/bos/eos, rounded up to a
    multiple of 8).

    Args:
        vocab_size: output rows ``V`` (and embedding rows).
        d_model: hidden size ``H``.
        n_layers: transformer blocks.
        n_heads: attention heads (``d_model`` must divide evenly).
        max_seq_len: longest sequence (learned position table).
        dropout: dropout on embeddings, attention weights, and residual branches.
        tie_embeddings: the LM head shares the token embedding's weight (GPT-2).
        mlp_ratio: MLP width as a multiple of ``d_model``.
        lora: LoRA adapters through peft (:func:`~kd_lightning.models.lora.add_lora`), e.g. ``{"r": 8, "alpha": 16,
            "target_modules": ["qkv", "proj"]}``; only the adapters are then trainable.
        adapters_only_checkpoint: ``state_dict()`` holds only the adapter weights (loading restores them onto
            the current base weights).

    Initialisation follows GPT-2: normal(0, 0.02), residual projections scaled by ``1/√(2·n_layers)``.

    Example:
        >>> model = TinyGPT(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
        >>> model(torch.randint(0, 264, (2, 10))).shape
        torch.Size([2, 10, 264])
    """

    def __init__(
        self,
        vocab_size: int = 264,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        max_seq_len: int = 256,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        mlp_ratio: int = 4,
        lora: dict[str, Any] | None = None,
        adapters_only_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            if value < 1:
                raise KDConfigError(f"TinyGPT: {name} must be >= 1, got {value}.")
        if n_heads < 1 or d_model % n_heads:
            raise KDConfigError(f"TinyGPT: n_heads ({n_heads}) must divide d_model ({d_model}).")
        if max_seq_len < 1 or mlp_ratio < 1:
            raise KDConfigError(f"TinyGPT: max_seq_len and mlp_ratio must be >= 1, got {max_seq_len}, {mlp_ratio}.")
        if not 0.0 <= dropout < 1.0:
            raise KDConfigError(f"TinyGPT: dropout must be in [0, 1), got {dropout}.")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_seq_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.tie_embeddings = tie_embeddings
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.init_weights()
        self._init_lora(lora, adapters_only_checkpoint, self)

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by
        1/√(2·n_layers). Also what ``kd fit`` re-initialises a cached teacher with. LoRA adapters are left alone."""
        for name, module in self.named_modules():
            if "lora_" not in name:
                self._init_weights(module)
        for name, param in self.named_parameters():
            if name.endswith(
                ("attn.proj.weight", "attn.proj.base_layer.weight", "mlp.2.weight", "mlp.2.base_layer.weight")
            ):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * len(self.blocks)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ------------------------------------------------------------------ forward
    def _positions_and_mask(
        self, input_ids: Tensor, attention_mask: Tensor | None, past_length: int = 0, past_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Position ids ``[B, T]`` and the SDPA boolean mask ``[B, 1, T, past + T]`` (``None``: plain causal)."""
        b, t = input_ids.shape
        device = input_ids.device
        full = None if attention_mask is None else attention_mask
        if past_mask is not None:
            full = torch.cat([past_mask, torch.ones_like(input_ids, dtype=torch.bool) if full is None else full], 1)
        if full is None or bool(full.all()):
            positions = torch.arange(past_length, past_length + t, device=device).expand(b, t)
            if past_length == 0:
                return positions, None
            # cached decoding: every key so far is visible, causality holds because queries are the newest
            return positions, torch.ones(b, 1, t, past_length + t, dtype=torch.bool, device=device).tril(past_length)
        positions = (full.long().cumsum(-1) - 1).clamp_min(0)[:, past_length:]
        keys = past_length + t
        causal = torch.ones(t, keys, dtype=torch.bool, device=device).tril(past_length)
        allowed = causal & full[:, None, :]  # [B, T, keys]
        # A query at a padding position would see no key at all (NaN softmax): let it see itself.
        allowed = allowed | torch.eye(t, keys, dtype=torch.bool, device=device).roll(past_length, dims=1)
        return positions, allowed.unsqueeze(1)

    def _run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        caches: list[dict[str, Tensor]] | None = None,
        past_mask: Tensor | None = None,
    ) -> Tensor:
        if input_ids.dim() != 2:
            raise KDConfigError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}.")
        past_length = 0 if not caches or "k" not in caches[0] else caches[0]["k"].shape[2]
        if past_length + input_ids.shape[1] > self.max_seq_len:
            raise KDConfigError(
                f"sequence of {past_length + input_ids.shape[1]} tokens is longer than TinyGPT's max_seq_len "
                f"({self.max_seq_len}): shorten the data's block_size / the generation, or build the model with a "
                "larger max_seq_len."
            )
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                raise KDConfigError(
                    f"token ids must be in [0, {self.vocab_size}), got [{low}, {high}]: the tokenizer's vocabulary "
                    "is larger than the model's vocab_size."
                )
        mask = _as_bool_mask(attention_mask, input_ids)
        positions, attn_mask = self._positions_and_mask(input_ids, mask, past_length, past_mask)
        x = self.dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        for i, block in enumerate(self.blocks):
            x, cache = block(x, attn_mask, None if caches is None else caches[i])
            if caches is not None and cache is not None:
                caches[i] = cache
        return self.ln_f(x)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states ``[B, T, H]`` (after the final LayerNorm, before ``lm_head``)."""
        return self._run(input_ids, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]``."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    # ------------------------------------------------------------------ embeddings API (vision-language models)
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings ``[B, T, H]`` of ``input_ids`` (no positions: :meth:`forward_embeds` adds them)."""
        return self.token_embedding(input_ids)

    def forward_embeds(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(logits [B, T, V], hidden_states, attentions)`` of a sequence given as embeddings ``[B, T, H]``.

        Positions are counted over the real tokens of ``attention_mask`` (as in :meth:`forward`), so
        ``forward_embeds(embed(x), m)[0] == forward(x, m)``. ``hidden_states`` (with ``output_hidden_states``):
        the embedding output and every block's output, the last one after the final LayerNorm (what
        ``lm_head`` reads; Hugging Face's convention), each ``[B, T, H]``. ``attentions`` (with
        ``output_attentions``): every block's softmax weights ``[B, heads, T, T]``, computed explicitly (SDPA
        otherwise). Empty tuples when not requested.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.d_model:
            raise KDConfigError(
                f"inputs_embeds must be [batch, tokens, {self.d_model}], got {tuple(inputs_embeds.shape)}."
            )
        b, t, _ = inputs_embeds.shape
        if t > self.max_seq_len:
            raise KDConfigError(
                f"sequence of {t} tokens is longer than TinyGPT's max_seq_len ({self.max_seq_len}): build the model "
                "with a larger max_seq_len."
            )
        shape_probe = inputs_embeds.new_empty(b, t, dtype=torch.long)
        mask = _as_bool_mask(attention_mask, shape_probe)
        positions, attn_mask = self._positions_and_mask(shape_probe, mask)
        x = self.dropout(inputs_embeds + self.position_embedding(positions))
        hidden: list[Tensor] = [x]
        weights: list[Tensor] | None = [] if output_attentions else None
        for block in self.blocks:
            x, _ = block(x, attn_mask, None, weights)
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x
        return (
            self.lm_head(x),
            tuple(hidden) if output_hidden_states else (),
            tuple(weights) if weights is not None else (),
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample up to ``max_new_tokens`` tokens after each prompt (key/value cache, no gradient).

        Returns ``[B, T + n]`` ids: the prompts (left padding kept) followed by the new tokens; after a row
        has produced ``eos_token_id`` it is filled with ``pad_token_id`` (default: the EOS id), and
        generation stops early once every row has. ``temperature=0`` is greedy. Dropout follows the
        module's mode (call ``eval()`` for deterministic sampling probabilities). Use
        :func:`completion_mask` for the mask of the generated tokens.
        """
        if max_new_tokens < 0:
            raise KDConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if input_ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise KDConfigError(
                f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds TinyGPT's "
                f"max_seq_len ({self.max_seq_len})."
            )
        mask = _as_bool_mask(attention_mask, input_ids)
        if mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        caches: list[dict[str, Tensor]] = [{} for _ in self.blocks]
        hidden = self._run(input_ids, mask, caches)
        sequences = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = sample_next_token(self.lm_head(hidden[:, -1]), temperature, top_k, generator)
            if eos_token_id is not None:
                if pad is not None:
                    token = torch.where(finished, torch.full_like(token, pad), token)
                finished = finished | (token == eos_token_id)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
            step_mask = torch.ones_like(token[:, None], dtype=torch.bool)
            hidden = self._run(token[:, None], step_mask, caches, past_mask=mask)
            mask = torch.cat([mask, step_mask], dim=1)
        return sequences


# -------------------------------------------------------------------------------------------- tokenizers
def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HFCausalLM needs Hugging Face transformers: pip install 'kd-lightning[transformers]' "
            "(or pip install transformers)."
        ) from err
    return transformers


def load_hf_tokenizer(
    name_or_path: str, field: str = "tokenizer", local_files_only: bool = True, trust_remote_code: bool = False
) -> Any:
    """A Hugging Face tokenizer from a local folder (or, with ``local_files_only=False``, a hub name)."""
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if (local_files_only or looks_local) and not local.is_dir():
        raise KDConfigError(
            field,
            f"no tokenizer folder at {local.resolve()}",
            "give the folder that holds tokenizer.json / tokenizer_config.json (e.g. the model's checkpoint folder)",
        )
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(local) if local.is_dir() else name_or_path,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:160]
        raise KDConfigError(field, f"cannot load tokenizer {name_or_path!r} ({type(err).__name__}: {detail})") from None


def _space_scheme(tokenizer: Any) -> str:
    """How the tokenizer writes spaces/bytes in its token strings: ``byte_level``, ``metaspace`` or ``plain``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # pragma: no cover - exotic backends
            spec = {}
        text = json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
        if '"ByteLevel"' in text:
            return "byte_level"
        if '"Metaspace"' in text or '"\\u2581"' in text or '"▁"' in text:
            return "metaspace"
        return "plain"
    vocab = tokenizer.get_vocab()
    return "metaspace" if any(t.startswith("▁") for t in list(vocab)[:5000]) else "plain"


_ROLES = ("bos", "eos", "pad", "unk")


def tokenizer_vocabulary(tokenizer: Any) -> dict[str, Any]:
    """What vocabulary mapping needs from a Hugging Face tokenizer: ``{"vocab": {token: id}, "scheme": ...,
    "special": {token: id}, "roles": {"bos"|"eos"|"pad"|"unk": id or None}, "size": len(tokenizer)}``."""
    vocab = dict(tokenizer.get_vocab())
    special = {t: vocab[t] for t in getattr(tokenizer, "all_special_tokens", []) if t in vocab}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special.update({str(tok): int(i) for i, tok in added.items() if getattr(tok, "special", False)})
    roles = {role: getattr(tokenizer, f"{role}_token_id", None) for role in _ROLES}
    scheme = _space_scheme(tokenizer)
    return {"vocab": vocab, "scheme": scheme, "special": special, "roles": roles, "size": len(tokenizer)}


@dataclass(frozen=True)
class TokenizerIdentity:
    """What identifies a tokenizer for distillation: ``fingerprint`` (16 hex digits of the SHA-256 of the sorted
    ``(token, id)`` vocabulary plus the special tokens and their roles: equal fingerprints = the same ids for the
    same strings), ``size``, whether it has a chat template (and the template's own fingerprint), and ``name``.
    Merge rules and normalisers are not part of the fingerprint."""

    name: str
    fingerprint: str
    size: int
    has_chat_template: bool
    chat_template_fingerprint: str | None = None

    def describe(self) -> str:
        return f"{self.name} ({self.size} tokens, fingerprint {self.fingerprint})"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def tokenizer_identity(tokenizer: Any, name: str | None = None) -> TokenizerIdentity:
    """The :class:`TokenizerIdentity` of a Hugging Face tokenizer."""
    info = tokenizer_vocabulary(tokenizer)
    payload = {
        "vocab": sorted(info["vocab"].items(), key=lambda kv: (kv[1], kv[0])),
        "special": sorted(info["special"].items(), key=lambda kv: (kv[1], kv[0])),
        "roles": info["roles"],
    }
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerIdentity(
        name=name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        fingerprint=_digest(payload),
        size=int(info["size"]),
        has_chat_template=bool(template),
        chat_template_fingerprint=_digest(template) if template else None,
    )


# -------------------------------------------------------------------------------------------- HFCausalLM
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class HFCausalLM(_LoRAMixin, nn.Module, metaclass=ConfigFieldPrefix):
    """A Hugging Face causal LM (``AutoModelForCausalLM``) behind the kd-lightning LM interface.

    Give exactly one of ``path_or_name`` (a local checkpoint folder, or a hub name — downloaded by
    transformers unless ``local_files_only``) and ``config`` (a dict with ``model_type`` and the
    architecture's fields: a randomly initialised model, nothing downloaded). Needs the ``transformers``
    extra (LoRA: the ``llm`` extra).

    Args:
        path_or_name: checkpoint folder or hub name for ``from_pretrained``.
        config: ``AutoConfig.for_model(**config)`` fields, e.g. ``{"model_type": "llama", "vocab_size": 264,
            "hidden_size": 64, ...}``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the weights; ``None`` keeps the
            checkpoint's / transformers' default.
        local_files_only: never contact the hub.
        trust_remote_code: passed to transformers (custom architectures).
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``; ``None`` lets transformers choose.
        gradient_checkpointing: enable transformers' activation checkpointing.
        tokenizer: the model's tokenizer (a local folder, often ``path_or_name`` itself), recorded on the model
            (:attr:`tokenizer`, :attr:`tokenizer_identity`) so that the LM methods can compare the teacher's and
            the student's tokenizers and chat templates at setup.
        lora: LoRA adapters through peft (:func:`~kd_lightning.models.lora.add_lora`), e.g. ``{"r": 8,
            "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}``: only the adapters are
            trainable; :meth:`adapters_disabled` runs the base model; :meth:`save_adapters` writes peft's folder.
        adapters_only_checkpoint: ``state_dict()`` (what Lightning checkpoints hold) has only the adapter weights;
            loading such a state dict (strict too) restores them onto the base weights this model was built with
            (so build the base from a checkpoint folder, or the same seed and config).

    **Padding.** With an ``attention_mask`` the position ids are ``cumsum(mask) − 1`` (clamped at 0) whenever
    the architecture's forward takes ``position_ids``: a left-padded row gives the logits of the unpadded row on
    its real tokens (architectures that count positions from the first column, such as GPT-2, otherwise
    do not).

    ``hidden_states`` runs the base model (``model.base_model``, final norm included) without the LM head;
    architectures that post-process logits (soft-capping, logit scales) do not satisfy
    ``lm_head(hidden_states(x)) == forward(x)`` and cannot use the chunked loss.
    """

    def __init__(
        self,
        path_or_name: str | None = None,
        config: dict[str, Any] | None = None,
        dtype: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        tokenizer: str | None = None,
        lora: dict[str, Any] | None = None,
        adapters_only_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if (path_or_name is None) == (config is None):
            raise KDConfigError(
                "HFCausalLM needs exactly one of path_or_name (a checkpoint) and config (an architecture dict), "
                f"got path_or_name={path_or_name!r} and config={'given' if config is not None else None}."
            )
        if dtype is not None and dtype not in _DTYPES:
            raise KDConfigError(f"HFCausalLM: dtype must be one of {sorted(_DTYPES)} or null, got {dtype!r}.")
        transformers = _import_transformers()
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if dtype is not None:
            kwargs["dtype"] = _DTYPES[dtype]
        if config is not None:
            config = dict(config)
            if "model_type" not in config:
                raise KDConfigError("HFCausalLM: config needs a 'model_type' (e.g. 'llama', 'gpt2').")
            hf_config = transformers.AutoConfig.for_model(**config)
            self.model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path_or_name, local_files_only=local_files_only, **kwargs
            )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise KDConfigError(
                f"HFCausalLM: {type(self.model).__name__}'s output embedding is {type(head).__name__}, not nn.Linear."
            )
        self.path_or_name = path_or_name
        self.tokenizer_path = tokenizer
        self.tokenizer: Any = None
        self._tokenizer_identity: TokenizerIdentity | None = None
        if tokenizer is not None:
            self.tokenizer = load_hf_tokenizer(tokenizer, "tokenizer", local_files_only=local_files_only)
            self._tokenizer_identity = tokenizer_identity(self.tokenizer, name=tokenizer)
            if len(self.tokenizer) > self.vocab_size:
                raise KDConfigError(
                    "tokenizer",
                    f"{tokenizer} has {len(self.tokenizer)} tokens but the model predicts {self.vocab_size}",
                    "give the model's own tokenizer",
                )
        self._takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters
        self._base_takes_position_ids = "position_ids" in inspect.signature(self.model.base_model.forward).parameters
        if adapters_only_checkpoint and config is not None and lora is not None:
            warnings.warn(
                "HFCausalLM(adapters_only_checkpoint=True) with a config-built (randomly initialised) base: "
                "checkpoints restore only the adapters, so the base weights must come back from the same seed or "
                "student_init.",
                stacklevel=2,
            )
        self._init_lora(lora, adapters_only_checkpoint, self.model)

    def _lora_target(self) -> nn.Module:
        return self.model

    @property
    def lm_head(self) -> nn.Linear:
        """The output projection (weight ``[V, H]``)."""
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        """Output rows of the LM head (padding rows included)."""
        return int(self.lm_head.weight.shape[0])

    @property
    def config(self) -> Any:
        """The transformers config."""
        return self.model.config

    @property
    def tokenizer_identity(self) -> TokenizerIdentity | None:
        """The recorded tokenizer's :class:`TokenizerIdentity` (``None`` without ``tokenizer``)."""
        return self._tokenizer_identity

    @staticmethod
    def _inputs(attention_mask: Tensor | None, with_positions: bool) -> dict[str, Tensor]:
        if attention_mask is None:
            return {}
        mask = attention_mask.long()
        inputs = {"attention_mask": mask}
        if with_positions:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        return inputs

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]`` (position ids counted over real tokens: see the class docstring)."""
        inputs = self._inputs(attention_mask, self._takes_position_ids)
        return self.model(input_ids=input_ids, use_cache=False, **inputs).logits

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings ``[B, T, H]`` (the model's input embedding table; positions are added inside)."""
        return self.model.get_input_embeddings()(input_ids)

    @contextmanager
    def _eager_attention(self) -> Iterator[None]:
        """Within the block attention runs in transformers' ``eager`` implementation (which returns weights)."""
        config = self.model.config
        current = getattr(config, "_attn_implementation", None)
        setter = getattr(self.model, "set_attn_implementation", None)
        if current in (None, "eager") or not callable(setter):
            yield
            return
        setter("eager")
        try:
            yield
        finally:
            setter(current)

    def forward_embeds(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(logits [B, T, V], hidden_states, attentions)`` of a sequence given as embeddings ``[B, T, H]``
        (transformers' ``inputs_embeds``; position ids from the mask as in :meth:`forward`). Attention weights
        ``[B, heads, T, T]`` come from the ``eager`` implementation, switched on for that call only. Empty tuples
        when not requested."""
        inputs = self._inputs(attention_mask, self._takes_position_ids)
        context = self._eager_attention() if output_attentions else contextlib.nullcontext()
        with context:
            out = self.model(
                inputs_embeds=inputs_embeds,
                use_cache=False,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                **inputs,
            )
        hidden = tuple(out.hidden_states or ()) if output_hidden_states else ()
        attentions = tuple(out.attentions or ()) if output_attentions else ()
        return out.logits, hidden, attentions

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states ``[B, T, H]`` of the base model (no LM head, no logits computed)."""
        inputs = self._inputs(attention_mask, self._base_takes_position_ids)
        return self.model.base_model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sampled continuations through ``model.generate`` (``temperature=0``: greedy); prompts may be
        left-padded. Returns prompt + new tokens; after EOS, rows hold ``pad_token_id`` (default the EOS).
        ``generator`` is not supported by transformers (seed with ``torch.manual_seed``)."""
        if generator is not None:
            raise KDConfigError("HFCausalLM.generate does not take a torch.Generator; seed with torch.manual_seed.")
        if temperature < 0:
            raise KDConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        pad = eos_token_id if pad_token_id is None else pad_token_id
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": temperature > 0,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad if pad is not None else 0,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=int(top_k or 0), top_p=1.0)
        mask = None if attention_mask is None else attention_mask.long()
        return self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
