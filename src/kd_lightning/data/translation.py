"""Translation data: a generated language pair with reordering and agreement, or plain parallel text files.

**Generated pair** (``format="generated"``; offline, deterministic from ``split_seed``). The source is English-like
(SVO, adjectives before the noun, no gender); the target is an invented language in which word order changes and
words agree, so a translator must align and carry information across positions::

    source                                           target
    S   -> NP_subj VP                                S   -> NP_subj NP_obj V          (SOV)
    VP  -> V NP_obj [PP]                             the PP goes after the object NP:  NP_subj NP_obj PP V
    NP  -> Det Adj* N [PP | RC]                      NP  -> Det N Adj* [PP | RC]      (adjectives after the noun)
    PP  -> P NP                                      PP  -> NP P                      (postpositions)
    RC  -> "that" V NP                               RC  -> "ke" NP V                 (relative clause, SOV inside)

- Determiners: ``the`` (singular and plural), ``a`` (singular), ``some`` (plural); in the target they agree with
  the noun's gender (every noun has a fixed masculine or feminine gender, invisible in the source) and number:
  ``the`` -> ``lo / la / los / las``, ``a`` -> ``un / una``, ``some`` -> ``unos / unas`` (masc. sg., fem. sg., masc.
  pl., fem. pl.).
- Nouns: plural ``-s`` in the source; target stems take ``-en`` in the plural.
- Adjectives: invariable in the source; the target stem takes ``-o / -a / -os / -as`` (gender x number of the noun).
- Verbs: source 3rd person ``-s`` only with a singular subject; the target verb agrees with its subject's gender and
  number: ``-ek / -ak / -eko / -ako``. In a relative clause the subject is the head noun (``the dog that sees a
  cat`` -> ``lo kanu ke una gata videk``: ``videk`` agrees with the masculine singular ``kanu``).
- Each noun phrase gets up to ``max_adjectives`` adjectives (each with probability ``adjective_prob``), a PP with
  probability ``pp_prob`` or a relative clause with probability ``relative_prob`` (not inside a PP or a relative
  clause); the sentence may end with a PP (``pp_prob``). Plural nouns with probability ``plural_prob``.

Example: ``the big dog sees some red apples near the river`` -> ``lo kanu grando unos pomen rojos lo rivo apud
videk``. Train / validation / test sentences are distinct (drawn without replacement across the splits).

**Parallel text** (``format="parallel_text"``): ``<root>/<split>.<src_lang>`` and ``<root>/<split>.<tgt_lang>``
for ``split`` in ``train``, ``val``, ``test``: UTF-8, one sentence per line, line ``i`` of one file translating line
``i`` of the other.

**Tokenizer.** :class:`WordTokenizer`: whitespace words (punctuation split off with ``split_punctuation``), one
vocabulary shared by source and target, built from the training text (most frequent first, ties alphabetical),
ids ``0..3`` = ``<pad> <bos> <eos> <unk>``. ``vocab_size`` is ``max_vocab`` (the model's output size, fixed in the
config before the data is read; ids not given to a word are never produced by the data): words beyond it map to
``<unk>``. Saved with the run (``tokenizer.json`` in the log folder) by the seq2seq task.

**Batches** (dicts)::

    input_ids, attention_mask                  [B, S] source + EOS, right-padded (mask true at real tokens)
    decoder_input_ids, decoder_attention_mask  [B, T] BOS + target, right-padded
    labels                                     [B, T] target + EOS, -100 at padding (position t predicts labels[t])
    references, sources                        list[str]: the target / source sentences, words joined by spaces
    sample_index                               [B] position of the pair in its split
    num_items_in_batch                         [] training batches: valid label tokens of the accumulation group
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.text import TokenBatchLoader, TokenLoaders
from kd_lightning.errors import KDConfigError
from kd_lightning.models.lm import TokenizerIdentity

__all__ = [
    "SPECIAL_TOKENS",
    "Seq2SeqBatchLoader",
    "TranslationDataModule",
    "TranslationPair",
    "WordTokenizer",
    "collate_translation",
    "generate_pairs",
    "read_parallel_text",
]

IGNORE_INDEX = -100
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TranslationPair:
    """One sentence pair (words separated by single spaces)."""

    source: str
    target: str


# ---------------------------------------------------------------------------------------------- grammar
#: source noun -> (target stem, gender "m"/"f")
NOUNS: dict[str, tuple[str, str]] = {
    "dog": ("kanu", "m"),
    "cat": ("gata", "f"),
    "house": ("domo", "f"),
    "tree": ("arbo", "m"),
    "bird": ("avi", "m"),
    "car": ("auto", "m"),
    "book": ("libro", "m"),
    "river": ("rivo", "m"),
    "child": ("pueri", "m"),
    "woman": ("femi", "f"),
    "king": ("reko", "m"),
    "apple": ("pomi", "f"),
    "table": ("mensa", "f"),
    "garden": ("horto", "m"),
    "city": ("urbe", "f"),
    "flower": ("flora", "f"),
}
#: source adjective -> target stem
ADJECTIVES: dict[str, str] = {
    "big": "grand",
    "small": "piccol",
    "red": "roj",
    "green": "verd",
    "old": "vetr",
    "young": "juven",
    "happy": "felic",
    "tall": "alt",
    "dark": "oscur",
    "quick": "rapid",
}
#: source verb (base form) -> target stem
VERBS: dict[str, str] = {
    "see": "vid",
    "like": "am",
    "find": "trov",
    "follow": "sekv",
    "carry": "port",
    "watch": "observ",
    "build": "konstru",
    "help": "jut",
}
#: source preposition -> target postposition
PREPOSITIONS: dict[str, str] = {"near": "apud", "under": "sub", "behind": "post", "with": "kun"}
ARTICLES = {  # source determiner -> {(gender, plural): target}
    "the": {("m", False): "lo", ("f", False): "la", ("m", True): "los", ("f", True): "las"},
    "a": {("m", False): "un", ("f", False): "una"},
    "some": {("m", True): "unos", ("f", True): "unas"},
}
ADJ_ENDINGS = {("m", False): "o", ("f", False): "a", ("m", True): "os", ("f", True): "as"}
VERB_ENDINGS = {("m", False): "ek", ("f", False): "ak", ("m", True): "eko", ("f", True): "ako"}


@dataclass
class _Phrase:
    source: list[str]
    target: list[str]
    gender: str
    plural: bool


def _source_noun(noun: str, plural: bool) -> str:
    if not plural:
        return noun
    irregular = {"child": "children", "woman": "women", "city": "cities"}
    return irregular.get(noun, noun + "s")


def _source_verb(verb: str, plural: bool) -> str:
    if plural:
        return verb
    return {"carry": "carries", "watch": "watches"}.get(verb, verb + "s")


def _target_verb(verb: str, gender: str, plural: bool) -> str:
    return VERBS[verb] + VERB_ENDINGS[(gender, plural)]


class _Grammar:
    def __init__(
        self,
        rng: random.Random,
        adjective_prob: float,
        max_adjectives: int,
        pp_prob: float,
        relative_prob: float,
        plural_prob: float,
    ) -> None:
        self.rng = rng
        self.adjective_prob, self.max_adjectives = adjective_prob, max_adjectives
        self.pp_prob, self.relative_prob, self.plural_prob = pp_prob, relative_prob, plural_prob
        self.nouns, self.adjectives = sorted(NOUNS), sorted(ADJECTIVES)
        self.verbs, self.prepositions = sorted(VERBS), sorted(PREPOSITIONS)

    def noun_phrase(self, embed: bool) -> _Phrase:
        rng = self.rng
        noun = rng.choice(self.nouns)
        stem, gender = NOUNS[noun]
        plural = rng.random() < self.plural_prob
        det = rng.choice(["the", "some"] if plural else ["the", "a"])
        adjectives: list[str] = []
        while len(adjectives) < self.max_adjectives and rng.random() < self.adjective_prob:
            choice = rng.choice([a for a in self.adjectives if a not in adjectives])
            adjectives.append(choice)
        source = [det, *adjectives, _source_noun(noun, plural)]
        target = [ARTICLES[det][(gender, plural)], stem + ("en" if plural else "")]
        target += [ADJECTIVES[a] + ADJ_ENDINGS[(gender, plural)] for a in adjectives]
        if embed:
            roll = rng.random()
            if roll < self.pp_prob:
                pp = self.prepositional_phrase()
                source, target = source + pp.source, target + pp.target
            elif roll < self.pp_prob + self.relative_prob:
                verb = rng.choice(self.verbs)
                obj = self.noun_phrase(embed=False)
                source = [*source, "that", _source_verb(verb, plural), *obj.source]
                target = [*target, "ke", *obj.target, _target_verb(verb, gender, plural)]
        return _Phrase(source, target, gender, plural)

    def prepositional_phrase(self) -> _Phrase:
        prep = self.rng.choice(self.prepositions)
        np = self.noun_phrase(embed=False)
        return _Phrase([prep, *np.source], [*np.target, PREPOSITIONS[prep]], np.gender, np.plural)

    def sentence(self) -> TranslationPair:
        subject = self.noun_phrase(embed=True)
        verb = self.rng.choice(self.verbs)
        obj = self.noun_phrase(embed=True)
        source = [*subject.source, _source_verb(verb, subject.plural), *obj.source]
        target = [*subject.target, *obj.target]
        if self.rng.random() < self.pp_prob:
            pp = self.prepositional_phrase()
            source += pp.source
            target += pp.target
        target.append(_target_verb(verb, subject.gender, subject.plural))
        return TranslationPair(" ".join(source), " ".join(target))


def generate_pairs(
    counts: Sequence[int],
    seed: int = 0,
    adjective_prob: float = 0.4,
    max_adjectives: int = 2,
    pp_prob: float = 0.2,
    relative_prob: float = 0.15,
    plural_prob: float = 0.4,
    max_misses: int = 20000,
) -> list[list[TranslationPair]]:
    """Distinct generated pairs for each split size of ``counts`` (no source sentence twice in all splits).

    Deterministic in all arguments. Raises :class:`KDConfigError` when the grammar (its probabilities) cannot
    produce that many distinct sentences: ``max_misses`` draws in a row gave only sentences already drawn.
    """
    grammar = _Grammar(random.Random(seed), adjective_prob, max_adjectives, pp_prob, relative_prob, plural_prob)
    total = sum(counts)
    seen: set[str] = set()
    pairs: list[TranslationPair] = []
    misses = 0
    while len(pairs) < total:
        pair = grammar.sentence()
        if pair.source in seen:
            misses += 1
            if misses > max_misses:
                raise KDConfigError(
                    "data.init_args.num_train",
                    f"the grammar produced only {len(pairs)} distinct sentences ({max_misses} repeats in a row), "
                    f"{total} wanted (num_train + num_val + num_test)",
                    "ask for fewer sentences or raise adjective_prob / pp_prob / relative_prob",
                )
            continue
        misses = 0
        seen.add(pair.source)
        pairs.append(pair)
    out, start = [], 0
    for n in counts:
        out.append(pairs[start : start + n])
        start += n
    return out


# ---------------------------------------------------------------------------------------------- parallel text
def read_parallel_text(root: str | Path, split: str, src_lang: str, tgt_lang: str) -> list[TranslationPair]:
    """Pairs of ``<root>/<split>.<src_lang>`` and ``<root>/<split>.<tgt_lang>`` (blank pairs skipped, words
    re-joined by single spaces).

    Raises:
        KDConfigError: a file is missing, or the two files have different line counts (naming both counts).
    """
    folder = Path(root).expanduser()
    paths = [folder / f"{split}.{src_lang}", folder / f"{split}.{tgt_lang}"]
    for path in paths:
        if not path.is_file():
            raise KDConfigError(
                "data.init_args.root",
                f"no file {path.resolve()} (parallel_text reads <root>/<split>.<src_lang> and <split>.<tgt_lang> "
                "for train, val and test)",
                f"write one sentence per line into {path.name}, or set data.init_args.format: generated",
            )
    lines = []
    for path in paths:
        try:
            lines.append(path.read_text(encoding="utf-8").splitlines())
        except UnicodeDecodeError as err:
            raise KDConfigError(
                "data.init_args.root", f"{path.resolve()} is not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
    if len(lines[0]) != len(lines[1]):
        raise KDConfigError(
            "data.init_args.root",
            f"{paths[0].resolve()} has {len(lines[0])} lines but {paths[1].name} has {len(lines[1])}",
            "line i of one file must translate line i of the other",
        )
    pairs = []
    for src, tgt in zip(*lines, strict=True):
        src, tgt = " ".join(src.split()), " ".join(tgt.split())
        if src and tgt:
            pairs.append(TranslationPair(src, tgt))
    if not pairs:
        raise KDConfigError("data.init_args.root", f"{paths[0].resolve()} holds no non-blank sentence pair")
    return pairs


# ---------------------------------------------------------------------------------------------- tokenizer
_PUNCTUATION = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)


class WordTokenizer:
    """Word-level tokenizer with one vocabulary for source and target (see the module docstring).

    Args:
        words: the vocabulary's words in id order (after the four specials).
        vocab_size: ids in all (``>= 4 + len(words)``); ids beyond the words are never produced.
        split_punctuation: split punctuation off words (``"dog."`` -> ``dog .``).
    """

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], vocab_size: int | None = None, split_punctuation: bool = True) -> None:
        self.words = list(words)
        self.vocab_size = int(vocab_size if vocab_size is not None else len(SPECIAL_TOKENS) + len(self.words))
        if self.vocab_size < len(SPECIAL_TOKENS) + len(self.words):
            raise KDConfigError("vocab_size", f"{self.vocab_size} ids cannot hold {len(self.words)} words + 4 specials")
        self.split_punctuation = split_punctuation
        self.id_to_token = [*SPECIAL_TOKENS, *self.words]
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}

    @classmethod
    def build(cls, texts: Sequence[str], max_vocab: int | None = None, split_punctuation: bool = True) -> WordTokenizer:
        """The vocabulary of ``texts`` (most frequent first, ties alphabetical), cut to ``max_vocab`` ids."""
        counts = Counter(w for text in texts for w in cls._split(text, split_punctuation))
        ordered = sorted((w for w in counts if w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
        if max_vocab is not None:
            ordered = ordered[: max(0, max_vocab - len(SPECIAL_TOKENS))]
        return cls(ordered, max_vocab, split_punctuation)

    @staticmethod
    def _split(text: str, split_punctuation: bool) -> list[str]:
        return _PUNCTUATION.findall(text) if split_punctuation else text.split()

    def tokenize(self, text: str) -> list[str]:
        """The words of ``text``."""
        return self._split(text, self.split_punctuation)

    def normalise(self, text: str) -> str:
        """``text`` as the words joined by single spaces (what references and decoded hypotheses look like)."""
        return " ".join(self.tokenize(text))

    def encode(self, text: str) -> list[int]:
        """Word ids (unknown words -> ``<unk>``); no BOS/EOS."""
        return [self.token_to_id.get(w, self.unk_token_id) for w in self.tokenize(text)]

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Words of ``ids`` joined by spaces, stopping at the first EOS; padding and BOS dropped (``<unk>`` is kept
        unless ``skip_special_tokens``)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i in (self.pad_token_id, self.bos_token_id) or not 0 <= i < len(self.id_to_token):
                continue
            if skip_special_tokens and i == self.unk_token_id:
                continue
            words.append(self.id_to_token[i])
        return " ".join(words)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def identity(self) -> TokenizerIdentity:
        """Fingerprint of the vocabulary (ids of every word and special, and the size)."""
        payload = json.dumps([self.id_to_token, self.vocab_size, self.split_punctuation], ensure_ascii=False)
        digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
        return TokenizerIdentity("word", digest, self.vocab_size, has_chat_template=False)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"words": self.words, "vocab_size": self.vocab_size, "split_punctuation": self.split_punctuation}
        path.write_text(json.dumps(data, ensure_ascii=False, indent=0), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["words"], data["vocab_size"], data.get("split_punctuation", True))


# ---------------------------------------------------------------------------------------------- batches
def _pad(rows: Sequence[list[int]], value: int) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def collate_translation(items: Sequence[dict[str, Any]], pad_token_id: int, bos: int, eos: int) -> dict[str, Any]:
    """Batch of encoded pairs (see the module docstring)."""
    sources = [item["source_ids"] + [eos] for item in items]
    targets = [item["target_ids"] for item in items]
    input_ids = _pad(sources, pad_token_id)
    decoder_input_ids = _pad([[bos, *t] for t in targets], pad_token_id)
    labels = _pad([[*t, eos] for t in targets], IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": _pad([[1] * len(s) for s in sources], 0).bool(),
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": labels != IGNORE_INDEX,
        "labels": labels,
        "references": [item["reference"] for item in items],
        "sources": [item["source"] for item in items],
        "sample_index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


class Seq2SeqBatchLoader(TokenBatchLoader):
    """:class:`~kd_lightning.data.text.TokenBatchLoader` counting ``labels != -100`` (no next-token shift: the
    seq2seq labels are aligned with the decoder positions) into ``num_items_in_batch``."""

    @staticmethod
    def count_tokens(labels: Tensor) -> int:
        return int((labels != IGNORE_INDEX).sum())


class EncodedPairs(Dataset):
    """Encoded pairs: ``{"source_ids", "target_ids", "source", "reference", "index"}`` items."""

    def __init__(self, pairs: Sequence[TranslationPair], items: Sequence[dict[str, Any]]) -> None:
        self.pairs = list(pairs)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


# ---------------------------------------------------------------------------------------------- data module
class TranslationDataModule(TokenLoaders, KDDataModule):
    """Sentence pairs for translation distillation (see the module docstring for the grammar and the batches).

    Args:
        format: ``"generated"`` (the invented language pair) or ``"parallel_text"`` (files under ``root``).
        num_train, num_val, num_test: generated sentences per split (all distinct).
        adjective_prob, max_adjectives, pp_prob, relative_prob, plural_prob: the generated grammar's choices.
        src_lang, tgt_lang: file suffixes of ``parallel_text`` (``train.de`` / ``train.en``).
        max_vocab: the tokenizer's ``vocab_size`` (= the models' ``vocab_size``): the most frequent training words
            get ids, the others become ``<unk>``.
        max_length: longest source or target in words (+ EOS); longer pairs are dropped with a warning.
        split_punctuation: split punctuation off words.
        **kwargs: :class:`~kd_lightning.data.base.KDDataModule` (``batch_size``, ``split_seed``, ``root``, ...).
    """

    task = "translation"
    batch_loader = Seq2SeqBatchLoader

    def __init__(
        self,
        format: Literal["generated", "parallel_text"] = "generated",
        num_train: int = 4000,
        num_val: int = 200,
        num_test: int = 500,
        adjective_prob: float = 0.4,
        max_adjectives: int = 2,
        pp_prob: float = 0.2,
        relative_prob: float = 0.15,
        plural_prob: float = 0.4,
        src_lang: str = "src",
        tgt_lang: str = "tgt",
        max_vocab: int = 256,
        max_length: int = 64,
        split_punctuation: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("num_workers", 0)
        super().__init__(**kwargs)
        checks = {
            "format": (format in ("generated", "parallel_text"), "'generated' or 'parallel_text'"),
            "num_train": (num_train >= 1, ">= 1"),
            "num_val": (num_val >= 1, ">= 1"),
            "num_test": (num_test >= 1, ">= 1"),
            "adjective_prob": (0.0 <= adjective_prob < 1.0, "in [0, 1)"),
            "max_adjectives": (0 <= max_adjectives <= len(ADJECTIVES), f"in [0, {len(ADJECTIVES)}]"),
            "pp_prob": (0.0 <= pp_prob <= 1.0, "in [0, 1]"),
            "relative_prob": (0.0 <= relative_prob <= 1.0 - pp_prob, "in [0, 1 - pp_prob]"),
            "plural_prob": (0.0 <= plural_prob <= 1.0, "in [0, 1]"),
            "max_vocab": (max_vocab >= len(SPECIAL_TOKENS) + 1, f">= {len(SPECIAL_TOKENS) + 1}"),
            "max_length": (max_length >= 2, ">= 2"),
            "src_lang": (bool(src_lang) and src_lang != tgt_lang, "non-empty and different from tgt_lang"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(name, f"must be {allowed}, got {locals()[name]!r}")
        self.format = format
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.grammar = {
            "adjective_prob": adjective_prob,
            "max_adjectives": max_adjectives,
            "pp_prob": pp_prob,
            "relative_prob": relative_prob,
            "plural_prob": plural_prob,
        }
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.max_vocab = max_vocab
        self.max_length = max_length
        self.split_punctuation = split_punctuation
        #: Micro-batches per optimizer step, for ``num_items_in_batch`` (set by the seq2seq task at setup).
        self.accumulate_grad_batches: int | None = None
        self.input_shape = (max_length,)

    # ------------------------------------------------------------------ pairs and tokenizer
    @cached_property
    def pairs(self) -> dict[str, list[TranslationPair]]:
        """Sentence pairs of ``train``, ``val`` and ``test``."""
        if self.format == "generated":
            train, val, test = generate_pairs(
                (self.num_train, self.num_val, self.num_test), self.split_seed, **self.grammar
            )
            return {"train": train, "val": val, "test": test}
        return {split: read_parallel_text(self.root, split, self.src_lang, self.tgt_lang) for split in SPLITS}

    @cached_property
    def tokenizer(self) -> WordTokenizer:
        """The shared word tokenizer, built from the training pairs (both sides)."""
        texts = [t for p in self.pairs["train"] for t in (p.source, p.target)]
        return WordTokenizer.build(texts, self.max_vocab, self.split_punctuation)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def data_identity(self) -> dict[str, Any]:
        """Digest of every pair and the tokenizer's fingerprint (what the teacher cache must tell apart)."""
        digest = hashlib.sha256()
        for split, pairs in self.pairs.items():
            for p in pairs:
                digest.update(f"{split}\t{p.source}\t{p.target}\n".encode())
        return {"pairs": digest.hexdigest(), "tokenizer": self.tokenizer.identity.fingerprint}

    def _encoded(self, split: str) -> EncodedPairs:
        tok = self.tokenizer
        pairs, items, dropped = [], [], 0
        for pair in self.pairs[split]:
            source_ids, target_ids = tok.encode(pair.source), tok.encode(pair.target)
            if max(len(source_ids), len(target_ids)) + 1 > self.max_length:
                dropped += 1
                continue
            items.append(
                {
                    "source_ids": source_ids,
                    "target_ids": target_ids,
                    "source": tok.normalise(pair.source),
                    "reference": tok.normalise(pair.target),
                    "index": len(items),
                }
            )
            pairs.append(pair)
        if not items:
            raise KDConfigError(
                "data.init_args.max_length", f"every {split} pair is longer than {self.max_length} words", "raise it"
            )
        if dropped:
            warnings.warn(
                f"{dropped} {split} pairs longer than max_length={self.max_length} words were dropped.", stacklevel=2
            )
        return EncodedPairs(pairs, items)

    def longest_target_tokens(self) -> int:
        """Tokens of the longest reference target + EOS over every split (sets the data up)."""
        self.setup()
        return max(len(i["target_ids"]) + 1 for s in (self.train_set, self.val_set, self.test_set) for i in s.items)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._encoded("train")
            self.val_set = self._encoded("val")
            self.test_set = self._encoded("test")

    # ------------------------------------------------------------------ loaders
    def _collate(self) -> partial:
        tok = self.tokenizer
        return partial(collate_translation, pad_token_id=tok.pad_token_id, bos=tok.bos_token_id, eos=tok.eos_token_id)
