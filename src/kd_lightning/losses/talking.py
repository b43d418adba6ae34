"""Talking Models' message coders and loss terms, in plain torch.

Zhao, Liu, Gui, An, Hong, Chi, "Talking Models: Distill Pre-trained Knowledge to Downstream Models via
Interactive Communication", arXiv 2310.03188. VERIFIED from the abstract: teacher and student each train an
encoder from their hidden states to messages in one shared message space and a decoder from messages back to
their own hidden space; the student asks (sends its messages), the teacher interprets them and answers.
RECONSTRUCTION (the paper body was not available): the coder architecture, the use of mean squared errors,
the loss list below and every weight. Used by :class:`~kd_lightning.methods.TalkingModels`.

Notation: ``h`` a hidden state (any shape ``[B, *shape]``, flattened to ``[B, d]`` by the coders), ``m`` a
message ``[B, m]``, ``sg`` stop-gradient.

- autoencoding (self-consistency): ``L_ae = mean((Dec(Enc(h)) − h)²)`` per model;
- teacher → student translation: ``L_t2s = mean((Dec_S(Enc_T(h_T)) − sg(h_S))²)``;
- task losses on decoded states: ``CE(y, S_{>l}(ĥ_S))`` (plain cross-entropy);
- interactive round: ``L_int = CE(y, z) + τ²·KL(softmax(z_T/τ) ‖ softmax(z/τ))`` (:func:`interactive_terms`);
- optional anti-collapse regulariser on messages: ``mean_j relu(γ − sqrt(Var_batch(m_j) + ε))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, label_cross_entropy, upcast
from kd_lightning.losses.logit import kd_kl_div

__all__ = [
    "MessageCoder",
    "MessageDecoder",
    "MessageEncoder",
    "autoencoding_loss",
    "interactive_terms",
    "message_mse",
    "message_variance_loss",
    "translation_loss",
]


def _check_dim(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise KDConfigError(name, f"must be an integer >= 1, got {value!r}")


class MessageEncoder(nn.Module):
    """Hidden state → message: ``LN(W_2·GELU(W_1·flat(h)))``, ``d → hidden → m`` (hidden = 2m by default).

    Args:
        in_dim: ``d``, the flattened size of one hidden state.
        message_dim: ``m``.
        hidden_dim: width of the hidden layer (``None``: ``2·m``).
        norm: LayerNorm on the message (against collapse of the message scale).
    """

    def __init__(self, in_dim: int, message_dim: int, hidden_dim: int | None = None, norm: bool = True) -> None:
        super().__init__()
        hidden_dim = 2 * message_dim if hidden_dim is None else hidden_dim
        for name, value in (("in_dim", in_dim), ("message_dim", message_dim), ("hidden_dim", hidden_dim)):
            _check_dim(name, value)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, message_dim))
        self.norm = nn.LayerNorm(message_dim) if norm else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(self.net(h.flatten(1)))


class MessageDecoder(nn.Module):
    """Message → hidden state: ``W_2·GELU(W_1·m)``, ``m → hidden → d`` (hidden = 2m by default), flat ``[B, d]``."""

    def __init__(self, message_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = 2 * message_dim if hidden_dim is None else hidden_dim
        for name, value in (("message_dim", message_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            _check_dim(name, value)
        self.net = nn.Sequential(nn.Linear(message_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, m: Tensor) -> Tensor:
        return self.net(m)


class MessageCoder(nn.Module):
    """One model's encoder and decoder for hidden states of shape ``[B, *shape]``.

    ``encode(h)`` flattens ``h`` and maps it to ``[B, m]``; ``decode(m)`` maps back and reshapes to
    ``[B, *shape]``, so a decoded state can be fed to the rest of the network (``run_with_substitute``).

    Args:
        shape: the hidden state's shape without the batch dimension (``[128]``, ``[64, 4, 4]``).
        message_dim: ``m``.
        hidden_dim: the MLPs' hidden width (``None``: ``2·m``).
        norm: LayerNorm on messages.
        encoder, decoder: replace the default MLPs (any modules ``[B, d] → [B, m]`` and ``[B, m] → [B, d]``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        message_dim: int = 128,
        hidden_dim: int | None = None,
        norm: bool = True,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        self.encoder = encoder if encoder is not None else MessageEncoder(self.dim, message_dim, hidden_dim, norm)
        self.decoder = decoder if decoder is not None else MessageDecoder(message_dim, self.dim, hidden_dim)

    def encode(self, h: Tensor) -> Tensor:
        """``[B, *shape]`` → message ``[B, m]``."""
        return self.encoder(h.flatten(1))

    def decode(self, m: Tensor) -> Tensor:
        """Message ``[B, m]`` → hidden state ``[B, *shape]``."""
        return self.decoder(m).reshape(m.shape[0], *self.shape)

    def forward(self, h: Tensor) -> Tensor:
        """``Dec(Enc(h))``: the round trip through the message space."""
        return self.decode(self.encode(h))


def message_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``mean((pred − target)²)`` over every element (batch and features), in at least float32.

    Raises:
        KDConfigError: the shapes differ.
    """
    if pred.shape != target.shape:
        raise KDConfigError(
            f"message_mse: the decoded hidden state {tuple(pred.shape)} and its target {tuple(target.shape)} "
            "must have the same shape"
        )
    return F.mse_loss(upcast(pred), upcast(target))


def autoencoding_loss(coder: MessageCoder, h: Tensor, detach_input: bool = True) -> Tensor:
    """Self-consistency ``L_ae = mean((Dec(Enc(h)) − h)²)``.

    Args:
        coder: the model's :class:`MessageCoder`.
        h: hidden states ``[B, *shape]``.
        detach_input: train the coder only (no gradient into ``h``; then the network cannot lower the term
            by making its own states easier to autoencode).
    """
    if detach_input:
        h = h.detach()
    return message_mse(coder(h), h)


def translation_loss(decoded: Tensor, h_student: Tensor, detach_student: bool = True) -> Tensor:
    """Teacher → student translation ``L_t2s = mean((Dec_S(Enc_T(h_T)) − sg(h_S))²)`` (``decoded`` = ĥ_S).

    ``detach_student=False`` also pulls the student's own state toward the translation (a FitNet-like variant).
    """
    return message_mse(decoded, h_student.detach() if detach_student else h_student)


def interactive_terms(
    logits: Tensor, target: Tensor | None, teacher_logits: Tensor | None, temperature: float = 2.0
) -> dict[str, Tensor]:
    """The interactive round's terms on ``z = S_{>l}(Dec_S(r_T))``: ``{"int_ce": CE(y, z),
    "int_kd": τ²·KL(softmax(z_T/τ) ‖ softmax(z/τ))}`` (batch-mean KL; the teacher's logits are detached).

    A term is left out when its input is ``None`` (no labels, or no teacher prediction wanted).
    """
    check_temperature(temperature)
    terms: dict[str, Tensor] = {}
    if target is not None:
        terms["int_ce"] = label_cross_entropy(logits, target)
    if teacher_logits is not None:
        terms["int_kd"] = kd_kl_div(upcast(logits), upcast(teacher_logits), temperature)
    return terms


def message_variance_loss(messages: Tensor, target_std: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Anti-collapse hinge on the per-dimension batch standard deviation of messages ``[B, m]``:
    ``mean_j relu(γ − sqrt(Var_b(m_bj) + ε))`` (VICReg's variance term, Bardes et al. 2022). Zero when every
    message dimension varies with std ≥ γ across the batch; needs ``B ≥ 2``.
    """
    if messages.dim() != 2 or messages.shape[0] < 2:
        raise KDConfigError(
            f"message_variance_loss needs messages [B >= 2, m], got {tuple(messages.shape)}: "
            "use batches of at least 2 samples"
        )
    std = torch.sqrt(upcast(messages).var(dim=0) + eps)
    return F.relu(target_std - std).mean()
