"""Encoder-decoder (sequence-to-sequence) models for translation distillation.

Two models share one interface (what :class:`~kd_lightning.methods.tasks.seq2seq.Seq2SeqDistillation` uses):

- ``forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None, cross_attention_maps=None,
  injection=None, injection_layers="all", output_attentions=False) -> Seq2SeqOutput``: teacher-forced logits
  ``[B, T, V]`` (position ``t`` predicts target token ``t`` from ``decoder_input_ids[:, :t+1]`` = BOS + prefix);
- ``generate(input_ids, attention_mask, max_new_tokens, ...) -> [B, n]``: greedy translations (new tokens only,
  no BOS; after a row's EOS the row holds ``pad_token_id``);
- ``vocab_size`` (output rows, shared source/target vocabulary), ``pad_token_id``, ``bos_token_id``,
  ``eos_token_id``.

:class:`TinySeq2Seq` is a pre-norm transformer encoder-decoder in plain torch with explicit attention weights, so
that attention maps can be read (``output_attentions``), injected (:func:`inject_attention`: attention-guided
attribution KD, Nourbakhsh et al., arXiv 2603.11342) and value vectors scaled from outside (``value_scale`` on
every attention module: value zeroing, Mohebbi et al. 2023). :class:`HFSeq2SeqLM` wraps Hugging Face
Marian/BART models (no injection).

``attention_mask`` / ``decoder_attention_mask`` are boolean/0-1, true at real tokens; batches are right-padded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigFieldPrefix, KDConfigError

__all__ = [
    "INJECTION_OPERATORS",
    "HFSeq2SeqLM",
    "Seq2SeqAttention",
    "Seq2SeqOutput",
    "TinySeq2Seq",
    "inject_attention",
    "sinusoidal_positions",
]

#: The composition operators of :func:`inject_attention`.
INJECTION_OPERATORS = ("add", "multiply", "average", "replace")


@dataclass
class Seq2SeqOutput:
    """What the seq2seq models return.

    Attributes:
        logits: ``[B, T, V]`` next-token logits at the decoder positions.
        cross_attentions: one ``[B, H, T, S]`` tensor per decoder layer: the cross-attention weights actually
            applied to the values (after injection, before dropout); empty unless ``output_attentions``.
        encoder_hidden_states: the embedding output and each encoder layer's output, each ``[B, S, d]`` (the last
            one before the final norm; see ``encoder_last_hidden_state``).
        decoder_hidden_states: the same for the decoder, each ``[B, T, d]``.
        encoder_last_hidden_state: ``[B, S, d]`` the encoder output the decoder attends to (final norm applied).
        encoder_attentions: one ``[B, H, S, S]`` per encoder layer (``output_attentions`` only).
        decoder_attentions: one ``[B, H, T, T]`` (decoder self-attention) per decoder layer (``output_attentions``).
    """

    logits: Tensor
    cross_attentions: tuple[Tensor, ...] = ()
    encoder_hidden_states: tuple[Tensor, ...] = ()
    decoder_hidden_states: tuple[Tensor, ...] = ()
    encoder_last_hidden_state: Tensor | None = None
    encoder_attentions: tuple[Tensor, ...] = ()
    decoder_attentions: tuple[Tensor, ...] = ()


# ------------------------------------------------------------------------------------------- injection
def _rownorm(x: Tensor) -> Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def inject_attention(P: Tensor, A: Tensor, operator: str, eps: float = 1e-6, key_mask: Tensor | None = None) -> Tensor:
    """Compose attention weights ``P`` with an external map ``A`` (attention-guided KD, arXiv 2603.11342 §2).

    ``P`` is ``[B, H, T, S]`` (softmax rows), ``A`` is ``[B, T, S]`` (broadcast over heads) or ``[B, H, T, S]``,
    non-negative. First the padding columns of ``A`` (``key_mask`` ``[B, S]`` false) are zeroed and each row of
    ``A`` is renormalised to sum 1; then, per operator::

        add:       rownorm(P + A)
        multiply:  rownorm(P * A + eps)      (eps only on real columns)
        average:   (P + A) / 2
        replace:   A

    With both ``P`` and ``A`` row distributions, ``add`` and ``average`` are the SAME operator (each row of
    ``P + A`` sums to 2): the spec's definitions (a RECONSTRUCTION; the paper's are not public) do not separate them.
    Rows of ``A`` that are all zero (after masking) are "no map": the output row is ``P`` unchanged. Pure function,
    differentiable in ``P`` (and ``A``).

    Raises:
        KDConfigError: unknown ``operator``, negative ``eps`` or shapes that do not broadcast.
    """
    if operator not in INJECTION_OPERATORS:
        raise KDConfigError("injection", f"must be one of {list(INJECTION_OPERATORS)}, got {operator!r}")
    if eps < 0:
        raise KDConfigError("injection_eps", f"must be >= 0, got {eps}")
    if A.dim() == 3:
        A = A.unsqueeze(1)
    if A.dim() != 4 or A.shape[-2:] != P.shape[-2:] or A.shape[0] not in (1, P.shape[0]):
        raise KDConfigError(
            "cross_attention_maps",
            f"map of shape {tuple(A.shape)} does not fit attention weights {tuple(P.shape)} ([B, H, T, S])",
            "give [B, T_tgt, T_src] maps over the batch's source and target tokens",
        )
    A = A.to(P.dtype)
    real = None
    if key_mask is not None:
        real = key_mask.to(device=P.device, dtype=torch.bool)[:, None, None, :]
        A = A.masked_fill(~real, 0.0)
    row_sum = A.sum(-1, keepdim=True)
    empty = row_sum <= 0
    A = A / row_sum.clamp_min(torch.finfo(A.dtype).tiny)
    if operator == "add":
        out = _rownorm(P + A)
    elif operator == "multiply":
        bump = torch.full_like(P, eps) if real is None else real.to(P.dtype) * eps
        out = _rownorm(P * A + bump)
    elif operator == "average":
        out = (P + A) / 2
    else:
        out = A.expand_as(P)
    return torch.where(empty, P, out)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Vaswani et al.'s fixed position table ``[length, dim]``: ``sin(p/10000^(2i/d))`` on even channels and
    ``cos`` on odd ones."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return table.float()


# ------------------------------------------------------------------------------------------- modules
class Seq2SeqAttention(nn.Module):
    """Multi-head attention with explicit weights ``softmax(QKᵀ/√d_h)``.

    Attributes:
        value_scale: ``None`` (default) or a ``[B, S_kv]`` tensor multiplying each key position's value vector
            before the weighted sum (the weights are unchanged): set it from outside to zero a token's value
            (value zeroing). Reset it to ``None`` afterwards.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.value_scale: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key_value: Tensor,
        key_mask: Tensor | None = None,
        causal: bool = False,
        attention_map: Tensor | None = None,
        injection: str | None = None,
        eps: float = 1e-6,
    ) -> tuple[Tensor, Tensor]:
        """``(output [B, T, d], weights [B, H, T, S])``; ``weights`` are those applied to the values."""
        b, t, d = query.shape
        s = key_value.shape[1]
        q, k, v = (
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key_value)),
            self._heads(self.v_proj(key_value)),
        )
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        allowed = None
        if key_mask is not None:
            allowed = key_mask.to(dtype=torch.bool, device=scores.device)[:, None, None, :]
        if causal:
            tri = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril()
            allowed = tri[None, None] if allowed is None else allowed & tri
        if allowed is not None:
            # finfo.min, not -inf: a row with no allowed key gives uniform weights instead of NaN
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1)
        if attention_map is not None and injection is not None:
            weights = inject_attention(weights, attention_map, injection, eps, key_mask)
        if self.value_scale is not None:
            scale = self.value_scale.to(device=v.device, dtype=v.dtype)
            if scale.dim() != 2 or scale.shape[-1] != s or scale.shape[0] not in (1, b):
                raise KDConfigError(
                    "value_scale", f"must be [B, S_kv] = [{b}, {s}], got {tuple(scale.shape)}", "set one scale per key"
                )
            v = v * scale[:, None, :, None]
        out = self.attn_dropout(weights) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d)), weights


class _FeedForward(nn.Sequential):
    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_model))


class _EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = Seq2SeqAttention(d_model, n_heads, dropout)
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = _FeedForward(d_model, ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.self_attn_norm(x)
        attended, weights = self.self_attn(h, h, mask)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.ff_norm(x))), weights


class _DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = Seq2SeqAttention(d_model, n_heads, dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = Seq2SeqAttention(d_model, n_heads, dropout)
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = _FeedForward(d_model, ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor | None,
        memory_mask: Tensor | None,
        attention_map: Tensor | None,
        injection: str | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        h = self.self_attn_norm(x)
        attended, self_weights = self.self_attn(h, h, self_mask, causal=True)
        x = x + self.dropout(attended)
        attended, cross_weights = self.cross_attn(
            self.cross_attn_norm(x), memory, memory_mask, attention_map=attention_map, injection=injection, eps=eps
        )
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.ff_norm(x))), self_weights, cross_weights


def _bool_mask(mask: Tensor | None, ids: Tensor, name: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != ids.shape:
        raise KDConfigError(name, f"must have the shape of its ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return mask.to(device=ids.device, dtype=torch.bool)


def _injection_layer_set(injection_layers: str | Sequence[int], n_layers: int) -> set[int]:
    if isinstance(injection_layers, str):
        if injection_layers == "all":
            return set(range(n_layers))
        if injection_layers == "last":
            return {n_layers - 1}
        raise KDConfigError(
            "injection_layers", f"must be 'all', 'last' or a list of layer indices, got {injection_layers!r}"
        )
    layers = {int(i) % n_layers if -n_layers <= int(i) < n_layers else -1 for i in injection_layers}
    if -1 in layers:
        raise KDConfigError(
            "injection_layers", f"indices must be in [-{n_layers}, {n_layers - 1}], got {list(injection_layers)}"
        )
    return layers


def _fit_map_rows(maps: Tensor, t: int) -> Tensor:
    """Cut or zero-pad the target rows of ``[B, T_map, S]`` maps to ``t`` (zero rows = no injection)."""
    if maps.shape[1] >= t:
        return maps[:, :t]
    pad = maps.new_zeros(maps.shape[0], t - maps.shape[1], *maps.shape[2:])
    return torch.cat([maps, pad], dim=1)


def _finish_generation(tokens: Tensor, eos_token_id: int | None, pad_token_id: int) -> Tensor:
    """Replace everything after each row's first EOS with padding."""
    if eos_token_id is None or tokens.numel() == 0:
        return tokens
    is_eos = (tokens == eos_token_id).long()
    after = (is_eos.cumsum(-1) - is_eos) > 0
    return tokens.masked_fill(after, pad_token_id)


# ------------------------------------------------------------------------------------------- TinySeq2Seq
class TinySeq2Seq(nn.Module, metaclass=ConfigFieldPrefix):
    """A small pre-norm transformer encoder-decoder in plain torch with explicit attention weights.

    Source and target share one vocabulary (the translation data's word tokenizer); embeddings are scaled by
    ``√d_model`` and summed with fixed sinusoidal (default) or learned positions. Every attention module is a
    :class:`Seq2SeqAttention` (``value_scale`` settable from outside). Cross-attention weights can be composed with
    external maps (:func:`inject_attention`) in the chosen decoder layers, at training and at decoding time.

    Args:
        vocab_size: shared vocabulary size ``V`` (= the data's ``tokenizer.vocab_size``).
        d_model: hidden size.
        n_heads: attention heads (must divide ``d_model``).
        n_encoder_layers: encoder layers.
        n_decoder_layers: decoder layers.
        max_len: longest source or target sequence (position table size).
        dropout: dropout on embeddings, attention weights, residual branches.
        ff_ratio: feed-forward width as a multiple of ``d_model``.
        positions: ``"sinusoidal"`` (fixed) or ``"learned"``.
        tie_embeddings: one embedding table for source, target and the output projection.
        pad_token_id, bos_token_id, eos_token_id: the tokenizer's special ids (defaults: the word tokenizer's).
        injection_eps: ``eps`` of the ``multiply`` operator (:func:`inject_attention`).

    Example:
        >>> model = TinySeq2Seq(vocab_size=50, d_model=16, n_heads=2, n_encoder_layers=1, n_decoder_layers=1)
        >>> src, tgt = torch.randint(4, 50, (2, 7)), torch.randint(4, 50, (2, 5))
        >>> model(src, torch.ones_like(src), tgt).logits.shape
        torch.Size([2, 5, 50])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_encoder_layers: int = 3,
        n_decoder_layers: int = 3,
        max_len: int = 128,
        dropout: float = 0.1,
        ff_ratio: int = 4,
        positions: str = "sinusoidal",
        tie_embeddings: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        injection_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("n_encoder_layers", n_encoder_layers),
            ("n_decoder_layers", n_decoder_layers),
            ("max_len", max_len),
            ("ff_ratio", ff_ratio),
        ):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        if n_heads < 1 or d_model % n_heads:
            raise KDConfigError("n_heads", f"must divide d_model ({d_model}), got {n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise KDConfigError("dropout", f"must be in [0, 1), got {dropout}")
        if positions not in ("sinusoidal", "learned"):
            raise KDConfigError("positions", f"must be 'sinusoidal' or 'learned', got {positions!r}")
        if injection_eps < 0:
            raise KDConfigError("injection_eps", f"must be >= 0, got {injection_eps}")
        for name, value in (
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
        ):
            if not 0 <= value < vocab_size:
                raise KDConfigError(name, f"must be in [0, vocab_size={vocab_size}), got {value}")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.max_len = max_len
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.injection_eps = injection_eps
        self.tie_embeddings = tie_embeddings
        self.tokenizer_identity = None
        self.source_embedding = nn.Embedding(vocab_size, d_model)
        self.target_embedding = self.source_embedding if tie_embeddings else nn.Embedding(vocab_size, d_model)
        self.positions = positions
        if positions == "learned":
            self.position_embedding: nn.Embedding | None = nn.Embedding(max_len, d_model)
        else:
            self.position_embedding = None
            self.register_buffer("position_table", sinusoidal_positions(max_len, d_model), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        ff = ff_ratio * d_model
        self.encoder_layers = nn.ModuleList(
            _EncoderLayer(d_model, n_heads, ff, dropout) for _ in range(n_encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(d_model)
        self.decoder_layers = nn.ModuleList(
            _DecoderLayer(d_model, n_heads, ff, dropout) for _ in range(n_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.source_embedding.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform linear weights, zero biases, N(0, d^-1/2) embeddings (what ``kd fit`` re-initialises a
        cached teacher with)."""
        for module in self.modules():
            if module is self.lm_head and self.tie_embeddings:
                continue  # shares the embedding table
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.d_model**-0.5)

    # ------------------------------------------------------------------ pieces
    def attention_modules(self, kind: str = "cross") -> list[Seq2SeqAttention]:
        """The attention modules of one kind: ``"cross"`` (decoder cross-attention, one per decoder layer),
        ``"decoder_self"`` or ``"encoder_self"``."""
        if kind == "cross":
            return [layer.cross_attn for layer in self.decoder_layers]
        if kind == "decoder_self":
            return [layer.self_attn for layer in self.decoder_layers]
        if kind == "encoder_self":
            return [layer.self_attn for layer in self.encoder_layers]
        raise KDConfigError("kind", f"must be 'cross', 'decoder_self' or 'encoder_self', got {kind!r}")

    def _add_positions(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n > self.max_len:
            raise KDConfigError("max_len", f"a sequence has {n} tokens but max_len is {self.max_len}", "raise max_len")
        if self.position_embedding is not None:
            pos = self.position_embedding.weight[:n]
        else:
            pos = self.position_table[:n].to(x.dtype)
        return self.embed_dropout(x + pos[None])

    def embed_source(self, input_ids: Tensor) -> Tensor:
        """Scaled source token embeddings ``[B, S, d]`` (no positions): what ``inputs_embeds`` replaces (e.g. to
        interpolate embeddings for integrated gradients)."""
        return self.source_embedding(input_ids) * math.sqrt(self.d_model)

    def encode(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(encoder output [B, S, d] after the final norm, hidden states, attentions)``."""
        if inputs_embeds is None:
            if input_ids is None or input_ids.dim() != 2:
                raise KDConfigError("input_ids", "must be [batch, source tokens]")
            inputs_embeds = self.embed_source(input_ids)
        x = self._add_positions(inputs_embeds)
        hidden, attentions = [x], []
        for layer in self.encoder_layers:
            x, weights = layer(x, attention_mask)
            hidden.append(x)
            if output_attentions:
                attentions.append(weights)
        return self.encoder_norm(x), tuple(hidden), tuple(attentions)

    def decode(
        self,
        memory: Tensor,
        memory_mask: Tensor | None,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
        cross_attention_maps: Tensor | None = None,
        injection: str | None = None,
        injection_layers: str | Sequence[int] = "all",
        output_attentions: bool = False,
        injection_eps: float | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(logits, hidden states, self-attentions, cross-attentions)`` of the decoder over ``memory``."""
        if decoder_input_ids.dim() != 2:
            raise KDConfigError(
                "decoder_input_ids", f"must be [batch, target tokens], got {tuple(decoder_input_ids.shape)}"
            )
        t = decoder_input_ids.shape[1]
        maps, layers = None, set()
        if injection is not None:
            if injection not in INJECTION_OPERATORS:
                raise KDConfigError(
                    "injection", f"must be one of {list(INJECTION_OPERATORS)} or null, got {injection!r}"
                )
            if cross_attention_maps is None:
                raise KDConfigError(
                    "cross_attention_maps", f"injection={injection!r} needs maps", "pass [B, T, S] maps"
                )
            if cross_attention_maps.dim() != 3 or cross_attention_maps.shape[-1] != memory.shape[1]:
                raise KDConfigError(
                    "cross_attention_maps",
                    f"must be [B, T_tgt, S={memory.shape[1]}], got {tuple(cross_attention_maps.shape)}",
                    "give one row per target position over the batch's source tokens",
                )
            maps = _fit_map_rows(cross_attention_maps.to(memory.device), t)
            layers = _injection_layer_set(injection_layers, len(self.decoder_layers))
        eps = self.injection_eps if injection_eps is None else injection_eps
        x = self._add_positions(self.target_embedding(decoder_input_ids) * math.sqrt(self.d_model))
        hidden, self_attn, cross_attn = [x], [], []
        for index, layer in enumerate(self.decoder_layers):
            use = index in layers
            x, self_weights, cross_weights = layer(
                x, memory, decoder_attention_mask, memory_mask, maps if use else None, injection if use else None, eps
            )
            hidden.append(x)
            if output_attentions:
                self_attn.append(self_weights)
                cross_attn.append(cross_weights)
        return self.lm_head(self.decoder_norm(x)), tuple(hidden), tuple(self_attn), tuple(cross_attn)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
        cross_attention_maps: Tensor | None = None,
        injection: str | None = None,
        injection_layers: str | Sequence[int] = "all",
        output_attentions: bool = False,
        inputs_embeds: Tensor | None = None,
        injection_eps: float | None = None,
    ) -> Seq2SeqOutput:
        """Teacher-forced logits (see the module docstring).

        Args:
            input_ids, attention_mask: source ``[B, S]`` (``input_ids`` may be ``None`` with ``inputs_embeds``).
            decoder_input_ids, decoder_attention_mask: ``[B, T]`` BOS + target prefix.
            cross_attention_maps: ``[B, T_map, S]`` non-negative maps (row ``t`` for target position ``t``; rows
                beyond ``T_map`` and all-zero rows: no injection).
            injection: ``None`` (no injection) or an operator of :func:`inject_attention`.
            injection_layers: ``"all"``, ``"last"`` or decoder layer indices.
            output_attentions: fill ``cross_attentions``/``encoder_attentions``/``decoder_attentions``.
            inputs_embeds: ``[B, S, d]`` replaces ``embed_source(input_ids)``.
            injection_eps: overrides the model's ``injection_eps``.
        """
        if input_ids is None and inputs_embeds is None:
            raise KDConfigError("input_ids", "is None and no inputs_embeds were given", "pass the source ids")
        shape_ref = input_ids if input_ids is not None else inputs_embeds[..., 0]  # type: ignore[index]
        src_mask = _bool_mask(attention_mask, shape_ref, "attention_mask")
        tgt_mask = _bool_mask(decoder_attention_mask, decoder_input_ids, "decoder_attention_mask")
        memory, enc_hidden, enc_attn = self.encode(input_ids, src_mask, inputs_embeds, output_attentions)
        logits, dec_hidden, dec_attn, cross_attn = self.decode(
            memory,
            src_mask,
            decoder_input_ids,
            tgt_mask,
            cross_attention_maps,
            injection,
            injection_layers,
            output_attentions,
            injection_eps,
        )
        return Seq2SeqOutput(
            logits=logits,
            cross_attentions=cross_attn,
            encoder_hidden_states=enc_hidden,
            decoder_hidden_states=dec_hidden,
            encoder_last_hidden_state=memory,
            encoder_attentions=enc_attn,
            decoder_attentions=dec_attn,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 64,
        cross_attention_maps: Tensor | None = None,
        injection: str | None = None,
        injection_layers: str | Sequence[int] = "all",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        injection_eps: float | None = None,
    ) -> Tensor:
        """Greedy translations ``[B, n ≤ max_new_tokens]`` (new tokens, no BOS; after a row's EOS: padding).

        Decoding step ``t`` re-runs the decoder on BOS + the ``t`` tokens so far (no cache: exact agreement with
        the teacher-forced forward) and, with ``injection``, uses rows ``0..t`` of ``cross_attention_maps`` (row
        ``t`` for the token chosen at step ``t``; no injection beyond the map's rows).
        """
        if max_new_tokens < 1:
            raise KDConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        bos = self.bos_token_id if bos_token_id is None else bos_token_id
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        src_mask = _bool_mask(attention_mask, input_ids, "attention_mask")
        memory, _, _ = self.encode(input_ids, src_mask)
        b = input_ids.shape[0]
        steps = min(max_new_tokens, self.max_len - 1)
        sequence = torch.full((b, 1), bos, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(steps):
            logits, _, _, _ = self.decode(
                memory,
                src_mask,
                sequence,
                None,
                cross_attention_maps,
                injection,
                injection_layers,
                injection_eps=injection_eps,
            )
            next_token = logits[:, -1].argmax(-1)
            next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
            done |= next_token == eos
            if bool(done.all()):
                break
        return _finish_generation(sequence[:, 1:], eos, pad)


# ------------------------------------------------------------------------------------------- HFSeq2SeqLM
def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "HFSeq2SeqLM needs Hugging Face transformers: pip install 'kd-lightning[transformers]' "
            "(or pip install transformers)."
        ) from err
    return transformers


_HF_CLASSES = {
    "marian": "MarianMTModel",
    "bart": "BartForConditionalGeneration",
    "mbart": "MBartForConditionalGeneration",
}


class HFSeq2SeqLM(nn.Module, metaclass=ConfigFieldPrefix):
    """A Hugging Face encoder-decoder (Marian-MT, BART, mBART) behind the seq2seq interface (no injection).

    Give exactly one of ``path_or_name`` (a local checkpoint folder; hub names are downloaded by transformers
    unless ``local_files_only``) and ``config`` (a dict with ``model_type`` ``"marian"``/``"bart"``/``"mbart"``
    and the architecture's fields: randomly initialised, nothing downloaded). Needs the ``transformers`` extra.
    For a ``config`` the special ids default to the word tokenizer's (``pad_token_id``, ``bos_token_id``,
    ``eos_token_id`` arguments; ``decoder_start_token_id`` = BOS, which is what the translation batches start the
    decoder with).

    ``output_attentions=True`` switches the model to eager attention (softmax weights are not returned by the
    fused kernels). ``cross_attention_maps``/``injection`` are refused (one-line error).
    """

    def __init__(
        self,
        path_or_name: str | None = None,
        config: dict[str, Any] | None = None,
        local_files_only: bool = True,
        attn_implementation: str | None = "eager",
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
    ) -> None:
        super().__init__()
        if (path_or_name is None) == (config is None):
            raise KDConfigError(
                "path_or_name",
                f"HFSeq2SeqLM needs exactly one of path_or_name and config, got path_or_name={path_or_name!r} and "
                f"config={'given' if config is not None else None}",
                "give a checkpoint folder or an architecture dict",
            )
        transformers = _import_transformers()
        kwargs: dict[str, Any] = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if config is not None:
            config = dict(config)
            model_type = config.get("model_type")
            if model_type not in _HF_CLASSES:
                raise KDConfigError(
                    "config.model_type", f"must be one of {sorted(_HF_CLASSES)}, got {model_type!r}", "e.g. marian"
                )
            for key, value in (
                ("pad_token_id", pad_token_id),
                ("bos_token_id", bos_token_id),
                ("eos_token_id", eos_token_id),
                ("decoder_start_token_id", bos_token_id),
                ("forced_eos_token_id", None),
            ):
                config.setdefault(key, value)
            hf_config = transformers.AutoConfig.for_model(**config)
            self.model = getattr(transformers, _HF_CLASSES[model_type])(hf_config)
            if attn_implementation is not None and hasattr(self.model, "set_attn_implementation"):
                self.model.set_attn_implementation(attn_implementation)
        else:
            folder = Path(str(path_or_name)).expanduser()
            if local_files_only and not folder.is_dir():
                raise KDConfigError(
                    "path_or_name",
                    f"no checkpoint folder at {folder.resolve()}",
                    "give a folder holding config.json and the weights (or set local_files_only: false for a hub name)",
                )
            self.model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
                str(folder) if folder.is_dir() else path_or_name, local_files_only=local_files_only, **kwargs
            )
        self.path_or_name = path_or_name
        self.tokenizer_identity = None
        cfg = self.model.config
        self.pad_token_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else pad_token_id)
        self.bos_token_id = int(cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else bos_token_id)
        self.eos_token_id = int(cfg.eos_token_id if cfg.eos_token_id is not None else eos_token_id)

    @property
    def vocab_size(self) -> int:
        """Output rows of the LM head."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def config(self) -> Any:
        """The transformers config."""
        return self.model.config

    def _refuse_injection(self, cross_attention_maps: Tensor | None, injection: str | None) -> None:
        if cross_attention_maps is not None or injection is not None:
            raise KDConfigError(
                "injection",
                "HFSeq2SeqLM does not support attention injection (cross_attention_maps/injection)",
                "use TinySeq2Seq for an injected student",
            )

    def _eager(self) -> None:
        if getattr(self.model.config, "_attn_implementation", "eager") != "eager":
            self.model.set_attn_implementation("eager")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor | None = None,
        cross_attention_maps: Tensor | None = None,
        injection: str | None = None,
        injection_layers: str | Sequence[int] = "all",
        output_attentions: bool = False,
    ) -> Seq2SeqOutput:
        """Teacher-forced logits; ``output_attentions`` gives eager softmax weights (see the class docstring)."""
        self._refuse_injection(cross_attention_maps, injection)
        if output_attentions:
            self._eager()
        out = self.model(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=None if decoder_attention_mask is None else decoder_attention_mask.long(),
            output_attentions=output_attentions,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return Seq2SeqOutput(
            logits=out.logits,
            cross_attentions=tuple(out.cross_attentions or ()) if output_attentions else (),
            encoder_hidden_states=tuple(out.encoder_hidden_states or ()),
            decoder_hidden_states=tuple(out.decoder_hidden_states or ()),
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_attentions=tuple(out.encoder_attentions or ()) if output_attentions else (),
            decoder_attentions=tuple(out.decoder_attentions or ()) if output_attentions else (),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 64,
        cross_attention_maps: Tensor | None = None,
        injection: str | None = None,
        injection_layers: str | Sequence[int] = "all",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Greedy translations ``[B, n]`` through ``model.generate`` (new tokens only, padding after EOS)."""
        self._refuse_injection(cross_attention_maps, injection)
        bos = self.bos_token_id if bos_token_id is None else bos_token_id
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
            decoder_start_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        return _finish_generation(out[:, 1:], eos, pad)
