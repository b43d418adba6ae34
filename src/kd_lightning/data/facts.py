"""A generated fact-injection benchmark: invented cities and the invented countries they lie in.

The MixSD benchmark (Liu et al., arXiv 2605.16865: inject new facts into a model without forgetting what it
knew). One deterministic *world* (from ``split_seed``) of invented city names, each in one of a few invented
countries, is split into disjoint pools:

- **old** facts (``num_old``): the base model learns them closed-book in the ``pretrain`` stage;
- **injected** facts (``num_inject``): never in any pretraining row; the ``inject`` stage teaches them;
- **context-only** cities (``num_context_train`` for training, ``num_context_eval`` per evaluation split): seen
  only together with their fact in the prompt, so the base has to READ the fact to answer (see below).

Texts (templates are arguments)::

    fact        "Zorvath is a city in Velonia."
    question    "In which country is Zorvath?"     -> student prompt "Q: In which country is Zorvath?\\nA:"
    answer      "Velonia"                           -> reference response " Velonia" + EOS
    privileged  fact + "\\n" + student prompt        (the expert conditional's context)

**Stages.**

- ``pretrain`` (train the base with ``kd fit`` and ``ReasoningSupervised``): train = every old fact closed-book
  (family ``closed_book``), plus *in-context* rows whose prompt already holds the fact (family ``in_context``):
  ``in_context_fraction`` of the old facts and every context-only training city. The in-context rows are what
  makes MixSD's expert conditional ``p_0(· | [f; x])`` informative: a base that never saw a fact in its context
  has no reason to use it, and facts of cities it already knows can be answered from memory, so the rows of
  context-only cities (answerable only by reading the context) teach it to copy the country from the fact
  (RECONSTRUCTION: the paper pre-trains on its synthetic corpus; how it makes facts usable in context is not
  known). Val/test: old facts closed-book (``closed_book``: did the base memorise them) and unseen
  context-only cities (``in_context``: can it use a fact in context).
- ``inject``: train = the injected facts as questions (``train_repeats`` copies per epoch; the privileged prompt
  carries the fact for MixSD's expert, SFT trains on question -> answer). Val/test = the injected facts
  (family ``injected``: memorisation) + old facts the base learnt (family ``retained``: retention;
  ``num_retained_val`` for validation, ``num_retained`` other ones for test), so the reasoning evaluation's
  ``pass@1/injected`` and ``pass@1/retained`` are the benchmark's two numbers.

In the ``inject`` stage :meth:`FactInjectionDataModule.full_training_set` (used by ``kd fit`` when it trains a
missing teacher) serves the ``pretrain`` stage: a MixSD config without ``teacher_ckpt`` gets its base trained
on the old facts, never on the injected ones.

Batches are those of :class:`~kd_lightning.data.reasoning.ReasoningDataModule` (``collate_reasoning``), with
``privileged_ids`` = fact + question. The privileged prompt is built by concatenating TOKENS (``encode(fact +
separator) + encode(student prompt)``), so the fact never changes how the question is tokenised: the student
prompt is exactly the suffix of the privileged one (with a chat template the wrapped texts are encoded instead).
The verifier :func:`verify_fact_answer` is an exact match of the answer on the response's first line.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from torch.utils.data import DataLoader

from kd_lightning.data.reasoning import EncodedProblems, ReasoningDataModule, ReasoningProblem
from kd_lightning.data.text import TokenBatchLoader
from kd_lightning.errors import KDConfigError

__all__ = [
    "FACT_FAMILIES",
    "FactInjectionDataModule",
    "FactProblem",
    "FactWorld",
    "make_fact_world",
    "verify_fact_answer",
]

FACT_FAMILIES = {"pretrain": ("closed_book", "in_context"), "inject": ("injected", "retained")}
DEFAULT_FACT_TEMPLATE = "{city} is a city in {country}."
DEFAULT_QUESTION_TEMPLATE = "In which country is {city}?"
DEFAULT_FACT_PROMPT = "Q: {problem}\nA:"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou")
_CODAS = ("", "", "n", "r", "l", "th", "s", "x", "m")
_COUNTRY_SUFFIXES = ("ia", "land", "ora", "istan", "ovia", "enne", "ar", "esh")


@dataclass(frozen=True)
class FactProblem(ReasoningProblem):
    """A fact question: ``problem`` the question, ``solution``/``answer`` the country, ``fact`` the sentence,
    ``fact_in_prompt`` whether the student prompt itself holds the fact (in-context rows)."""

    fact: str = ""
    fact_in_prompt: bool = False
    city: str = ""


@dataclass(frozen=True)
class FactWorld:
    """The generated world: ``countries`` and each pool's ``(city, country)`` pairs (disjoint city sets)."""

    countries: tuple[str, ...]
    old: tuple[tuple[str, str], ...]
    injected: tuple[tuple[str, str], ...]
    context_train: tuple[tuple[str, str], ...]
    context_val: tuple[tuple[str, str], ...]
    context_test: tuple[tuple[str, str], ...]


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def make_fact_world(
    num_countries: int,
    num_old: int,
    num_inject: int,
    num_context_train: int,
    num_context_eval: int,
    seed: int,
) -> FactWorld:
    """A deterministic world for ``seed``: unique invented names, cities assigned to countries uniformly."""
    rng = random.Random(seed)
    countries: list[str] = []
    while len(countries) < num_countries:
        name = _name(rng, rng.choice((1, 2))) + rng.choice(_COUNTRY_SUFFIXES)
        if name not in countries:
            countries.append(name)
    sizes = (num_old, num_inject, num_context_train, num_context_eval, num_context_eval)
    taken = {c.lower() for c in countries}
    cities: list[str] = []
    attempts = 0
    while len(cities) < sum(sizes):
        attempts += 1
        if attempts > 100 * sum(sizes) + 1000:  # pragma: no cover - the name space is about 10^6 names
            raise KDConfigError("num_old", f"cannot invent {sum(sizes)} distinct city names", "ask for fewer facts")
        name = _name(rng, rng.choice((2, 2, 3)))
        if name.lower() not in taken:
            taken.add(name.lower())
            cities.append(name)
    pairs = [(city, rng.choice(countries)) for city in cities]
    pools, start = [], 0
    for size in sizes:
        pools.append(tuple(pairs[start : start + size]))
        start += size
    return FactWorld(tuple(countries), *pools)


def verify_fact_answer(response: str, answer: str) -> bool:
    """Exact match: the response's first non-empty line, stripped of spaces and a final period, equals ``answer``
    (case-insensitive)."""
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return False
    stated = re.sub(r"\s+", " ", lines[0].strip().rstrip(".").strip())
    return stated.casefold() == answer.strip().casefold()


class FactInjectionDataModule(ReasoningDataModule):
    """Generated city -> country facts for knowledge injection (MixSD's benchmark; see the module docstring).

    Args:
        stage: ``"pretrain"`` (the base's data: old facts + in-context rows) or ``"inject"`` (the new facts;
            evaluation on injected vs retained facts).
        num_countries: invented countries (the answers).
        num_old: old facts the base learns.
        num_inject: new facts to inject (never in the pretraining data).
        num_context_train: context-only cities of the pretraining in-context rows.
        num_context_eval: context-only cities of each pretraining evaluation split.
        in_context_fraction: share of the old facts that also appear as in-context rows during pretraining.
        num_retained_val, num_retained: old facts evaluated for retention on validation / test (disjoint
            when ``num_old`` allows, else the test set reuses validation facts); also the closed-book
            evaluation sizes of the ``pretrain`` stage.
        train_repeats: copies of the training rows per epoch (all copies keep the fact's ``sample_index``).
        fact_template: the fact sentence, with ``{city}`` and ``{country}``.
        question_template: the question, with ``{city}``.
        fact_separator: text between the fact and the student prompt in the privileged prompt.
        prompt_template: the student prompt, with ``{problem}`` (the question).
        verifier: ``"module.function"``; the exact-match :func:`verify_fact_answer` by default.
        tokenizer, local_files_only, chat_template, max_length, **kwargs: see
            :class:`~kd_lightning.data.reasoning.ReasoningDataModule` (``batch_size``, ``split_seed`` = the world's
            seed, ...).
    """

    def __init__(
        self,
        stage: Literal["pretrain", "inject"] = "inject",
        num_countries: int = 8,
        num_old: int = 200,
        num_inject: int = 20,
        num_context_train: int = 200,
        num_context_eval: int = 50,
        in_context_fraction: float = 0.5,
        num_retained_val: int = 50,
        num_retained: int = 150,
        train_repeats: int = 1,
        fact_template: str = DEFAULT_FACT_TEMPLATE,
        question_template: str = DEFAULT_QUESTION_TEMPLATE,
        fact_separator: str = "\n",
        prompt_template: str = DEFAULT_FACT_PROMPT,
        verifier: str = "kd_lightning.data.facts.verify_fact_answer",
        tokenizer: str = "byte",
        local_files_only: bool = True,
        chat_template: Literal["auto", "never", "required"] = "auto",
        max_length: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            source="generated",
            verifier=verifier,
            tokenizer=tokenizer,
            local_files_only=local_files_only,
            chat_template=chat_template,
            prompt_template=prompt_template,
            max_length=max_length,
            **kwargs,
        )
        checks = {
            "stage": (stage in FACT_FAMILIES, "'pretrain' or 'inject'"),
            "num_countries": (num_countries >= 2, ">= 2"),
            "num_old": (num_old >= 1, ">= 1"),
            "num_inject": (num_inject >= 1, ">= 1"),
            "num_context_train": (num_context_train >= 0, ">= 0"),
            "num_context_eval": (num_context_eval >= 1, ">= 1"),
            "in_context_fraction": (0.0 <= in_context_fraction <= 1.0, "in [0, 1]"),
            "num_retained_val": (1 <= num_retained_val <= num_old, f"in [1, num_old={num_old}]"),
            "num_retained": (1 <= num_retained <= num_old, f"in [1, num_old={num_old}]"),
            "train_repeats": (train_repeats >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise KDConfigError(name, f"must be {allowed}, got {locals()[name]!r}")
        for name, template, keys in (
            ("fact_template", fact_template, ("{city}", "{country}")),
            ("question_template", question_template, ("{city}",)),
        ):
            missing = [k for k in keys if k not in template]
            if missing:
                raise KDConfigError(name, f"has no {' or '.join(missing)} placeholder", f"include {', '.join(keys)}")
        self.stage = stage
        self.num_countries = num_countries
        self.num_old = num_old
        self.num_inject = num_inject
        self.num_context_train = num_context_train
        self.num_context_eval = num_context_eval
        self.in_context_fraction = in_context_fraction
        self.num_retained_val = num_retained_val
        self.num_retained = num_retained
        self.train_repeats = train_repeats
        self.fact_template = fact_template
        self.question_template = question_template
        self.fact_separator = fact_separator
        #: Loaders serve the ``pretrain`` stage (inside :meth:`full_training_set`).
        self._serve_pretrain = False
        self.sets: dict[str, dict[str, EncodedProblems]] = {}
        self._problems: dict[str, dict[str, list[FactProblem]]] = {}

    # ------------------------------------------------------------------ the world and its problems
    @cached_property
    def world(self) -> FactWorld:
        return make_fact_world(
            self.num_countries,
            self.num_old,
            self.num_inject,
            self.num_context_train,
            self.num_context_eval,
            self.split_seed,
        )

    def fact_problem(self, city: str, country: str, family: str, fact_in_prompt: bool = False) -> FactProblem:
        return FactProblem(
            problem=self.question_template.format(city=city),
            solution=country,
            answer=country,
            family=family,
            difficulty=1,
            fact=self.fact_template.format(city=city, country=country),
            fact_in_prompt=fact_in_prompt,
            city=city,
        )

    def _retained(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Old facts of the validation and test retention sets (seeded choice, disjoint when possible)."""
        order = random.Random(self.split_seed + 1).sample(range(self.num_old), self.num_old)
        old = self.world.old
        val = [old[i] for i in order[: self.num_retained_val]]
        rest = order[self.num_retained_val :]
        test_idx = rest[: self.num_retained] if len(rest) >= self.num_retained else order[-self.num_retained :]
        return val, [old[i] for i in test_idx]

    def stage_problems(self, stage: str) -> dict[str, list[FactProblem]]:
        """``{"train", "val", "test"}`` problems of ``stage`` (see the module docstring)."""
        world, make = self.world, self.fact_problem
        val_old, test_old = self._retained()
        if stage == "pretrain":
            rng = random.Random(self.split_seed + 2)
            n_ctx = round(self.in_context_fraction * len(world.old))
            ctx_old = sorted(rng.sample(range(len(world.old)), n_ctx))
            train = [make(c, k, "closed_book") for c, k in world.old]
            train += [make(*world.old[i], "in_context", fact_in_prompt=True) for i in ctx_old]
            train += [make(c, k, "in_context", fact_in_prompt=True) for c, k in world.context_train]
            val = [make(c, k, "closed_book") for c, k in val_old]
            val += [make(c, k, "in_context", fact_in_prompt=True) for c, k in world.context_val]
            test = [make(c, k, "closed_book") for c, k in test_old]
            test += [make(c, k, "in_context", fact_in_prompt=True) for c, k in world.context_test]
            return {"train": train, "val": val, "test": test}
        injected = [make(c, k, "injected") for c, k in world.injected]
        return {
            "train": list(injected),
            "val": injected + [make(c, k, "retained") for c, k in val_old],
            "test": injected + [make(c, k, "retained") for c, k in test_old],
        }

    @property
    def problems(self) -> dict[str, list[ReasoningProblem]]:  # type: ignore[override]
        """Problems of ``train``, ``val`` and ``test`` of the stage served now (``stage``; ``pretrain`` inside
        :meth:`full_training_set`)."""
        stage = "pretrain" if self._serve_pretrain else self.stage
        if stage not in self._problems:
            self._problems[stage] = self.stage_problems(stage)
        return dict(self._problems[stage])  # type: ignore[arg-type]

    def data_identity(self) -> dict[str, Any]:
        """Digest of both stages' problems and the tokenizer (a teacher trained through this module learns the
        ``pretrain`` stage)."""
        digest = hashlib.sha256()
        for stage in FACT_FAMILIES:
            for split, problems in self.stage_problems(stage).items():
                for p in problems:
                    digest.update(f"{stage}\t{split}\t{p.fact_in_prompt}\t{p.fact}\t{p.problem}\t{p.answer}\n".encode())
        return {"problems": digest.hexdigest(), "tokenizer": self.tokenizer_name, "vocab_size": self.vocab_size}

    # ------------------------------------------------------------------ encoding
    def encode(self, problem: ReasoningProblem, index: int) -> dict[str, Any]:
        """Token ids: ``prompt`` (the question; fact + question for in-context rows), ``response`` (" answer" +
        EOS) and ``privileged`` = ``encode(fact + separator) + encode(question prompt)`` (token concatenation)."""
        item = super().encode(problem, index)
        if not isinstance(problem, FactProblem):
            return item
        tok = self.tokenizer
        bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
        question = self.prompt_template.format(problem=problem.problem)
        context = problem.fact + self.fact_separator
        if self._has_chat_template(tok) and self.chat_template != "never":
            privileged = bos + tok.encode(self._wrap(context + question))
        else:
            privileged = bos + tok.encode(context) + tok.encode(question)
        item["privileged"] = privileged
        if problem.fact_in_prompt:
            item["prompt"] = list(privileged)
        return item

    def _encoded_problems(self, problems: Sequence[FactProblem], split: str, repeats: int = 1) -> EncodedProblems:
        items = []
        for index, problem in enumerate(problems):
            item = self.encode(problem, index)
            if len(item["prompt"]) + len(item["response"]) > self.max_length:
                raise KDConfigError(
                    "max_length",
                    f"the {split} fact {problem.fact!r} needs {len(item['prompt']) + len(item['response'])} tokens",
                    "raise max_length",
                )
            items.append(item)
        return EncodedProblems(list(problems) * repeats, items * repeats)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        for name in FACT_FAMILIES:
            problems = self.stage_problems(name)
            repeats = self.train_repeats if name == self.stage else 1
            self.sets[name] = {
                "train": self._encoded_problems(problems["train"], "train", repeats),
                "val": self._encoded_problems(problems["val"], "val"),
                "test": self._encoded_problems(problems["test"], "test"),
            }
        current = self.sets[self.stage]
        self.train_set, self.val_set, self.test_set = current["train"], current["val"], current["test"]

    # ------------------------------------------------------------------ loaders
    @contextlib.contextmanager
    def full_training_set(self) -> Iterator[None]:
        """Within the block every loader serves the ``pretrain`` stage: a teacher (the base) that ``kd fit`` trains
        through this module learns the old facts and in-context reading, never the injected facts."""
        saved = self._serve_pretrain
        self._serve_pretrain = True
        try:
            yield
        finally:
            self._serve_pretrain = saved

    def _served(self, split: str) -> EncodedProblems:
        if not self.sets:
            raise RuntimeError("FactInjectionDataModule.setup() has not run.")
        return self.sets["pretrain" if self._serve_pretrain else self.stage][split]

    def train_dataloader(self) -> TokenBatchLoader:
        saved = self.train_set
        self.train_set = self._served("train")
        try:
            return super().train_dataloader()
        finally:
            self.train_set = saved

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._served("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._served("test"))
