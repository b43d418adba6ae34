"""FactInjectionDataModule: deterministic world, disjoint pools, stages, prompts, verifier, teacher data."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.facts import FactInjectionDataModule, make_fact_world, verify_fact_answer
from kd_lightning.errors import KDConfigError

SMALL = {
    "num_old": 30,
    "num_inject": 5,
    "num_context_train": 10,
    "num_context_eval": 4,
    "num_retained_val": 6,
    "num_retained": 8,
    "batch_size": 4,
}


def module(**kwargs) -> FactInjectionDataModule:
    dm = FactInjectionDataModule(**{**SMALL, **kwargs})
    dm.setup("fit")
    return dm


def cities(problems) -> set[str]:
    return {p.city for p in problems}


def all_rows(loader) -> list[dict]:
    return list(iter(loader))


def test_the_world_is_deterministic_per_seed_with_disjoint_city_pools() -> None:
    a, b = make_fact_world(6, 30, 5, 10, 4, seed=3), make_fact_world(6, 30, 5, 10, 4, seed=3)
    assert a == b and a != make_fact_world(6, 30, 5, 10, 4, seed=4)
    pools = [a.old, a.injected, a.context_train, a.context_val, a.context_test]
    names = [city for pool in pools for city, _ in pool]
    assert [len(p) for p in pools] == [30, 5, 10, 4, 4] and len(set(names)) == len(names)
    assert {country for pool in pools for _, country in pool} <= set(a.countries) and len(a.countries) == 6
    assert not set(names) & set(a.countries)


def test_injected_facts_never_appear_in_pretraining_and_retained_facts_come_from_it() -> None:
    pre, inj = module(stage="pretrain"), module(stage="inject")
    new = cities(inj.problems["train"])
    assert new == {c for c, _ in inj.world.injected}
    for split in ("train", "val", "test"):
        assert not new & cities(pre.problems[split])
    decoded = " ".join(
        pre.tokenizer.decode(item["prompt"] + item["response"]) for item in pre.sets["pretrain"]["train"]
    )
    assert not any(city in decoded for city in new)  # not even inside another row's text
    old = cities(p for p in pre.problems["train"] if p.family == "closed_book")
    retained = {split: cities(p for p in inj.problems[split] if p.family == "retained") for split in ("val", "test")}
    assert retained["val"] <= old and retained["test"] <= old and not retained["val"] & retained["test"]
    assert (len(retained["val"]), len(retained["test"])) == (6, 8)
    assert {p.family for p in inj.problems["val"]} == {"injected", "retained"}
    assert cities(p for p in inj.problems["test"] if p.family == "injected") == new  # memorisation = train facts
    context_only = cities(p for p in pre.problems["val"] if p.family == "in_context")
    assert not context_only & cities(pre.problems["train"])  # in-context evaluation: cities never seen


def test_pretrain_stage_mixes_closed_book_and_in_context_rows() -> None:
    dm = module(stage="pretrain", in_context_fraction=0.5)
    families = [p.family for p in dm.problems["train"]]
    assert families.count("closed_book") == 30 and families.count("in_context") == 15 + 10
    for item, problem in zip(dm.sets["pretrain"]["train"].items, dm.problems["train"]):
        text = dm.tokenizer.decode(item["prompt"])
        assert (problem.fact in text) == problem.fact_in_prompt and problem.problem in text


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_world() -> None:
    first = all_rows(module().val_dataloader())
    second = all_rows(module().val_dataloader())
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) and a["answers"] == b["answers"] for a, b in zip(first, second)
    )
    assert module(split_seed=1).world != module().world


def test_privileged_prompt_is_the_fact_followed_by_the_unchanged_question_tokens() -> None:
    dm = module()
    batch = next(iter(dm.train_dataloader()))
    for b, problem_index in enumerate(batch["sample_index"].tolist()):
        problem = dm.problems["train"][problem_index]
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b]].tolist()
        privileged = batch["privileged_ids"][b][batch["privileged_mask"][b]].tolist()
        assert privileged[0] == prompt[0] == dm.tokenizer.bos_token_id
        assert privileged[-(len(prompt) - 1) :] == prompt[1:]  # the question's tokens, not shifted by the fact
        assert dm.tokenizer.decode(privileged[1 : len(privileged) - len(prompt) + 1]) == problem.fact + "\n"
        assert problem.fact not in dm.tokenizer.decode(batch["input_ids"][b])  # SFT rows: question -> answer
        assert dm.tokenizer.decode(batch["input_ids"][b][batch["labels"][b] != -100]) == " " + problem.answer


def test_train_repeats_keep_the_facts_sample_index_and_the_batch_contract() -> None:
    dm = module(train_repeats=3)
    assert len(dm.train_set) == 15
    indices = sorted(i for batch in all_rows(dm.train_dataloader()) for i in batch["sample_index"].tolist())
    assert indices == sorted(list(range(5)) * 3)
    batch = next(iter(dm.val_dataloader()))
    assert {"input_ids", "labels", "prompt_ids", "privileged_ids", "answers", "family", "sample_index"} <= set(batch)


def test_full_training_set_serves_the_pretrain_stage() -> None:
    dm = module(stage="inject")
    new = cities(dm.problems["train"])
    with dm.full_training_set():
        rows = all_rows(dm.train_dataloader())
        families = {f for batch in rows for f in batch["family"]}
        assert families == {"closed_book", "in_context"} and {p.family for p in dm.problems["val"]} == {
            "closed_book",
            "in_context",
        }
        text = " ".join(dm.tokenizer.decode(row) for batch in rows for row in batch["input_ids"])
        assert not any(city in text for city in new)
    assert {f for batch in all_rows(dm.train_dataloader()) for f in batch["family"]} == {"injected"}


def test_verifier_is_an_exact_match_of_the_answer() -> None:
    assert verify_fact_answer(" Velonia", "Velonia") and verify_fact_answer("velonia.\nQ: more", "Velonia")
    assert not verify_fact_answer(" Velonias", "Velonia") and not verify_fact_answer("", "Velonia")
    assert not verify_fact_answer("Staar Velonia", "Velonia")
    dm = module()
    assert dm.verifier(" " + dm.problems["train"][0].answer, dm.problems["train"][0].answer)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"stage": "finetune"}, "stage"),
        ({"num_inject": 0}, "num_inject"),
        ({"num_retained": 31}, "num_retained"),
        ({"in_context_fraction": 1.5}, "in_context_fraction"),
        ({"fact_template": "{city} is nice."}, "fact_template"),
        ({"train_repeats": 0}, "train_repeats"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"data\.init_args\.{field}"):
        FactInjectionDataModule(**{**SMALL, **kwargs})
