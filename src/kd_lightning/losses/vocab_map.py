"""Vocabulary mapping between two tokenizers by identical token strings (pure torch).

For a teacher and a student whose tokenizers differ, token-level distillation compares the distributions
over the tokens both vocabularies contain. :func:`build_vocab_map` matches token strings and returns, for
each student id, the teacher id of the same string (``-1``: none); :func:`project_teacher_logits` then
re-indexes teacher logits ``[..., V_T]`` onto the student's vocabulary ``[..., V_S]``: the teacher
distribution becomes ``p̃_T(s) = p_T(m(s)) / Σ_{s' mapped} p_T(m(s'))`` over the mapped student ids
(teacher tokens with no student counterpart are dropped and the rest renormalised by the softmax) and
``0`` on unmapped student ids (their logit is :data:`EXCLUDED_LOGIT`, a large finite negative number, so
that ``0·log 0`` terms of the divergences stay finite; ``-inf`` would give NaN). Optionally
:func:`restrict_logits` does the same to the student (its distribution renormalised over the mapped
ids: needed by reverse-KL-type objectives, whose ``KL(p_S ‖ p̃_T)`` is unbounded when the student puts
mass where ``p̃_T`` is 0).

**What is matched** (:func:`normalize_token`): each token string is turned into the bytes it stands for
under its tokenizer's scheme, and tokens are matched on those bytes:

- ``"byte_level"`` (GPT-2/Llama-3/Qwen BPE): each character is mapped back through GPT-2's
  bytes-to-unicode table (``Ġ`` → space, ``Ċ`` → newline, ...);
- ``"metaspace"`` (SentencePiece/Llama-2/Mistral/T5): ``▁`` → space and byte-fallback tokens
  ``<0xNN>`` → the byte ``NN``;
- ``"plain"`` (anything else, e.g. WordLevel/WordPiece): the UTF-8 bytes of the string as it is
  (WordPiece ``##`` continuations are *not* normalised).

Special tokens are never normalised: they match only an identical special token string on the other
side, and the roles ``bos``/``eos``/``pad``/``unk`` are matched to each other whatever their strings
(``</s>`` ↔ ``<|endoftext|>``). When several teacher tokens stand for the same bytes, the lowest id wins.
Identical strings do not make identical segmentations: the teacher scores the student's segmentation of
the text, which may not be the one its own tokenizer would produce (an approximation; ULD/GOLD-style
cross-tokenizer alignment is the exact alternative).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from kd_lightning.errors import KDConfigError

__all__ = [
    "EXCLUDED_LOGIT",
    "SPACE_SCHEMES",
    "VocabMap",
    "build_vocab_map",
    "map_input_ids",
    "normalize_token",
    "project_teacher_logits",
    "restrict_logits",
]

#: Logit given to excluded (unmapped) vocabulary entries: its probability underflows to exactly 0 in float32
#: (and bf16/fp16), yet it stays finite after division by any temperature >= 1e-30, so ``p·(log p − log q)``
#: is 0, not NaN. Representable in float16.
EXCLUDED_LOGIT = -1.0e4

SPACE_SCHEMES = ("byte_level", "metaspace", "plain")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` table, inverted (printable character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def normalize_token(token: str, scheme: str = "plain") -> bytes:
    """The bytes a (non-special) token string stands for under ``scheme`` (see the module docstring)."""
    if scheme == "byte_level":
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode("utf-8")  # an added token written in plain text
    if scheme == "metaspace":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("▁", " ").encode("utf-8")
    if scheme == "plain":
        return token.encode("utf-8")
    raise KDConfigError("scheme", f"must be one of {', '.join(SPACE_SCHEMES)}, got {scheme!r}")


@dataclass
class VocabMap:
    """Student id -> teacher id of the same token (``-1``: unmapped); see :func:`build_vocab_map`.

    Attributes:
        student_to_teacher: LongTensor ``[V_S]``.
        student_size: the student tokenizer's number of ids (coverage denominator).
        teacher_size: the teacher tokenizer's number of ids.
        unmapped_examples: a few student token strings without a teacher counterpart (for messages).
    """

    student_to_teacher: Tensor
    student_size: int
    teacher_size: int
    unmapped_examples: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> Tensor:
        """Boolean ``[V_S]``: student ids with a teacher counterpart."""
        return self.student_to_teacher >= 0

    @property
    def num_mapped(self) -> int:
        return int(self.mapped[: self.student_size].sum())

    @property
    def student_coverage(self) -> float:
        """Fraction of the student tokenizer's ids that have a teacher counterpart."""
        return self.num_mapped / max(self.student_size, 1)

    @property
    def teacher_coverage(self) -> float:
        """Fraction of the teacher tokenizer's ids that some student id maps to."""
        used = self.student_to_teacher[self.mapped]
        return int(torch.unique(used).numel()) / max(self.teacher_size, 1)


def build_vocab_map(
    student_vocab: Mapping[str, int],
    teacher_vocab: Mapping[str, int],
    student_scheme: str = "plain",
    teacher_scheme: str = "plain",
    student_special: Mapping[str, int] | None = None,
    teacher_special: Mapping[str, int] | None = None,
    student_roles: Mapping[str, int | None] | None = None,
    teacher_roles: Mapping[str, int | None] | None = None,
    num_student_rows: int | None = None,
    max_examples: int = 5,
) -> VocabMap:
    """Match student and teacher token strings (``{token: id}`` vocabularies) into a :class:`VocabMap`.

    Args:
        student_vocab, teacher_vocab: ``{token string: id}`` (a tokenizer's ``get_vocab()``).
        student_scheme, teacher_scheme: how each side writes spaces and bytes (:data:`SPACE_SCHEMES`).
        student_special, teacher_special: ``{token string: id}`` of special tokens (matched by exact string only).
        student_roles, teacher_roles: ids of ``bos``/``eos``/``pad``/``unk`` (``None`` if absent), matched by role.
        num_student_rows: length of the map (the student model's output rows, padding rows included: unmapped);
            default ``max(student id) + 1``.
        max_examples: unmapped student token strings to keep for messages.
    """
    for scheme in (student_scheme, teacher_scheme):
        if scheme not in SPACE_SCHEMES:
            raise KDConfigError("scheme", f"must be one of {', '.join(SPACE_SCHEMES)}, got {scheme!r}")
    student_special = dict(student_special or {})
    teacher_special = dict(teacher_special or {})
    special_ids_t = set(teacher_special.values())
    teacher_by_bytes: dict[bytes, int] = {}
    for token, tid in teacher_vocab.items():
        if tid in special_ids_t:
            continue
        key = normalize_token(token, teacher_scheme)
        if key not in teacher_by_bytes or tid < teacher_by_bytes[key]:
            teacher_by_bytes[key] = tid
    student_size = max(student_vocab.values(), default=-1) + 1
    rows = student_size if num_student_rows is None else int(num_student_rows)
    if rows < student_size:
        raise KDConfigError("num_student_rows", f"is {rows} but the student tokenizer has ids up to {student_size - 1}")
    index = torch.full((rows,), -1, dtype=torch.long)
    special_ids_s = set(student_special.values())
    for token, sid in student_vocab.items():
        if sid in special_ids_s:
            continue
        tid = teacher_by_bytes.get(normalize_token(token, student_scheme))
        if tid is not None:
            index[sid] = tid
    for token, sid in student_special.items():
        if token in teacher_special:
            index[sid] = teacher_special[token]
    for role in SPECIAL_ROLES:
        sid = (student_roles or {}).get(role)
        tid = (teacher_roles or {}).get(role)
        if sid is not None and tid is not None and 0 <= sid < rows:
            index[sid] = tid
    examples = [t for t, i in sorted(student_vocab.items(), key=lambda kv: kv[1]) if index[i] < 0][:max_examples]
    teacher_size = max(teacher_vocab.values(), default=-1) + 1
    return VocabMap(index, student_size=student_size, teacher_size=teacher_size, unmapped_examples=examples)


def project_teacher_logits(
    teacher_logits: Tensor, student_to_teacher: Tensor, fill: float = EXCLUDED_LOGIT, check: bool = True
) -> Tensor:
    """Teacher logits ``[..., V_T]`` re-indexed onto the student vocabulary: ``[..., V_S]``.

    Entry ``s`` is ``teacher_logits[..., student_to_teacher[s]]``, or ``fill`` where the map is ``-1``
    (probability 0 after the softmax). Differentiable in ``teacher_logits`` (a gather). ``check``: verify that
    the map's ids fit the teacher logits (a host sync; turn off in hot loops once checked).
    """
    if student_to_teacher.dim() != 1:
        raise KDConfigError("student_to_teacher", f"must be 1-D [V_S], got shape {tuple(student_to_teacher.shape)}")
    index = student_to_teacher.to(teacher_logits.device)
    if check and index.numel() and int(index.max()) >= teacher_logits.shape[-1]:
        raise KDConfigError(
            "student_to_teacher",
            f"maps to teacher id {int(index.max())} but the teacher logits have {teacher_logits.shape[-1]} entries",
        )
    gathered = teacher_logits.index_select(-1, index.clamp_min(0))
    return gathered.masked_fill(index < 0, fill)


def restrict_logits(logits: Tensor, mapped: Tensor, fill: float = EXCLUDED_LOGIT) -> Tensor:
    """``logits`` with the entries outside ``mapped`` (boolean ``[V]``) set to ``fill``: the softmax renormalised
    over ``mapped``; no gradient reaches the filled entries."""
    if mapped.shape != logits.shape[-1:]:
        raise KDConfigError("mapped", f"must have shape [{logits.shape[-1]}], got {tuple(mapped.shape)}")
    return logits.masked_fill(~mapped.to(logits.device), fill)


def map_input_ids(input_ids: Tensor, student_to_teacher: Tensor, unmapped_id: int) -> Tensor:
    """Student token ids -> the teacher's ids of the same tokens; ids without a counterpart become ``unmapped_id``
    (the teacher's unknown token, for instance)."""
    index = student_to_teacher.to(input_ids.device)
    mapped = index[input_ids.long().clamp(0, index.numel() - 1)]
    return torch.where(mapped >= 0, mapped, torch.full_like(mapped, unmapped_id)).to(input_ids.dtype)
