"""The Attributor of attribution-guided NMT distillation (Nourbakhsh et al., arXiv 2603.11342).

Verified (abstract): "an Attributor transformer that, given a source-target pair, learns to reconstruct the
teacher's attribution map"; the better it reconstructs, the more useful injecting the maps is. RECONSTRUCTION
(architecture and objective not given): a small encoder-decoder transformer. The encoder reads the source; the
decoder reads the teacher-forced target (the decoder input ``BOS + y_<t`` at row ``t`` plus, by default, the
reference token ``y_t`` that row ``t`` explains), causally by default (row ``t`` never sees a later target
token), cross-attends to the source, and a final scaled dot-product scoring layer over the source tokens gives
``log Â[b, t, :]`` (a log-softmax over the real source tokens). It is trained with the per-row KL
(:func:`kd_lightning.losses.attribution_nmt.attribution_row_kl`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = ["Attributor"]

IGNORE_INDEX = -100


class Attributor(nn.Module):
    """``f(src, tgt) -> log Â [B, T, S]``: row distributions over the source tokens.

    Args:
        vocab_size: shared source/target vocabulary.
        d_model: hidden size. n_heads: attention heads. n_layers: encoder and decoder layers each.
        max_len: longest sequence (learned positions).
        dropout: dropout in the transformer layers.
        causal: row ``t`` sees only target positions ``<= t`` (the teacher's maps never depend on later tokens).
        use_labels: add the embedding of the reference token ``labels[t]`` (the token row ``t`` explains) to the
            decoder input at ``t``.
        pad_token_id: padding id of the vocabulary.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 32,
        n_heads: int = 2,
        n_layers: int = 1,
        max_len: int = 128,
        dropout: float = 0.0,
        causal: bool = True,
        use_labels: bool = True,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise KDConfigError("attributor_heads", f"must divide attributor_dim ({d_model}), got {n_heads}")
        if n_layers < 1:
            raise KDConfigError("attributor_layers", f"must be >= 1, got {n_layers}")
        self.causal = causal
        self.use_labels = use_labels
        self.pad_token_id = pad_token_id
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.label_embedding = nn.Embedding(vocab_size, d_model) if use_labels else None
        self.source_positions = nn.Embedding(max_len, d_model)
        self.target_positions = nn.Embedding(max_len, d_model)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout, batch_first=True, norm_first=True),
            n_layers,
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, n_heads, 4 * d_model, dropout, batch_first=True, norm_first=True),
            n_layers,
        )
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.scale = 1.0 / math.sqrt(d_model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        decoder_input_ids: Tensor,
        labels: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """``log Â`` ``[B, T, S]``: log-softmax over the real source tokens (padding columns ``-inf``)."""
        s, t = input_ids.shape[1], decoder_input_ids.shape[1]
        if max(s, t) > self.max_len:
            raise KDConfigError("attributor_max_len", f"a sequence has {max(s, t)} tokens", "raise it")
        source_mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        src = self.embedding(input_ids) + self.source_positions.weight[:s][None]
        memory = self.encoder(src, src_key_padding_mask=~source_mask)
        tgt = self.embedding(decoder_input_ids) + self.target_positions.weight[:t][None]
        if self.label_embedding is not None and labels is not None:
            tokens = labels.masked_fill(labels == IGNORE_INDEX, self.pad_token_id)
            tgt = tgt + self.label_embedding(tokens)
        causal_mask = (
            torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu(1) if self.causal else None
        )  # True = not allowed
        hidden = self.decoder(
            tgt,
            memory,
            tgt_mask=causal_mask,
            memory_key_padding_mask=~source_mask,
            tgt_is_causal=False,
        )
        scores = (self.query(hidden) @ self.key(memory).transpose(1, 2)) * self.scale  # [B, T, S]
        scores = scores.masked_fill(~source_mask[:, None, :], float("-inf"))
        return scores.log_softmax(-1)
