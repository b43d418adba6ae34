"""DigitVQADataModule: generated digit-row images, questions with answers checkable by construction."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data.digits import load_sklearn_digits
from kd_lightning.data.vqa import QUESTION_TYPES, DigitVQADataModule, verify_exact
from kd_lightning.errors import KDConfigError

IGNORE = -100


def small(**kwargs: object) -> DigitVQADataModule:
    args = {"num_train": 64, "num_val": 16, "num_test": 16, "batch_size": 8, "eval_batch_size": 8, **kwargs}
    return DigitVQADataModule(**args)  # type: ignore[arg-type]


def expected_answer(family: str, question: str, digits: list[int]) -> str:
    """The answer computed independently of the generator, from the question text and the cell labels."""
    if family == "count":
        return str(len(digits))
    if family == "caption":
        return " ".join(map(str, digits))
    asked = int(question.rstrip("?").split()[-1])
    if family == "exists":
        return "yes" if asked in digits else "no"
    assert digits.count(asked) == 1  # left_of asks about a digit that occurs once
    return str(digits[digits.index(asked) - 1])


def test_answers_images_and_held_out_digits_are_right_by_construction() -> None:
    dm = small()
    dm.setup()
    images, targets = load_sklearn_digits()
    cells = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        for problem, item in zip(dm.problems[split], dataset.items):
            present = [i for i in problem.image_ids if i >= 0]
            assert [int(targets[i]) for i in present] == [d for d in problem.digits if d is not None]
            labels = [int(targets[i]) for i in present]
            assert problem.answer == expected_answer(problem.family, problem.question, labels)
            # training images use 4/5 of the sklearn digits, evaluation images only the held-out fifth
            assert all((i % 5 == 4) == (split != "train") for i in present)
            image = item["image"]
            assert image.shape == (1, 16, 64)
            for j, index in enumerate(problem.image_ids):
                cell = image[0, :, 16 * j : 16 * (j + 1)]
                assert torch.equal(cell, cells[index, 0]) if index >= 0 else float(cell.abs().max()) == 0.0


def test_batches_mark_answers_questions_and_left_padded_prompts() -> None:
    dm = small()
    dm.setup()
    tok = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (8, 3, 16, 64)
    assert abs(dm.mean) > 0 and torch.equal(batch["images"][:, 0], batch["images"][:, 2])  # grey repeated
    for i, (answer, problem) in enumerate(zip(batch["answers"], dm.problems["val"][:8])):
        labels = batch["labels"][i]
        answer_ids = labels[labels != IGNORE].tolist()
        assert answer_ids == [*tok.encode(" " + answer), tok.eos_token_id]
        real = batch["input_ids"][i][batch["attention_mask"][i]]
        assert tok.decode(real.tolist()) == f"Q: {problem.question}\nA: {answer}"
        question = batch["input_ids"][i][batch["instruction_mask"][i]]
        assert tok.decode(question.tolist()) == problem.question
        prompt = batch["prompt_ids"][i]
        mask = batch["prompt_mask"][i]
        assert bool(mask[-1]) and tok.decode(prompt[mask].tolist()) == f"Q: {problem.question}\nA:"
        assert bool((mask.long().diff() >= 0).all())  # left padding: the mask only switches on
    assert batch["family"] == [p.family for p in dm.problems["val"][:8]]
    assert dm.longest_response_tokens() == max(
        len(tok.encode(" " + p.answer)) + 1 for problems in dm.problems.values() for p in problems
    )
    train = next(iter(dm.train_dataloader()))
    assert int(train["num_items_in_batch"]) == int((train["labels"][:, 1:] != IGNORE).sum())


def test_deterministic_per_seed_and_splits_disjoint() -> None:
    a, b, c = small(), small(), small(split_seed=1)
    assert a.problems == b.problems
    assert a.problems["train"] != c.problems["train"]
    keys = {split: {(p.image_ids, p.question) for p in a.problems[split]} for split in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert a.data_identity() == b.data_identity() != c.data_identity()


def test_question_types_are_selectable_and_balanced() -> None:
    dm = small(question_types=["exists", "left_of"], min_digits=2)
    families = [p.family for p in dm.problems["train"]]
    assert set(families) == {"exists", "left_of"} and families.count("exists") == families.count("left_of")
    exists = [p.answer for p in dm.problems["train"] if p.family == "exists"]
    assert set(exists) == {"yes", "no"}
    assert {p.family for p in small().problems["test"]} == set(QUESTION_TYPES)


def test_verifier_is_exact_match_up_to_case_and_spaces() -> None:
    assert verify_exact(" 3 7  1.", "3 7 1") and verify_exact("Yes", "yes")
    assert not verify_exact("3 7", "3 7 1") and not verify_exact("no", "yes") and not verify_exact("31", "3 1")
    dm = small()
    assert dm.verifier(" yes", "yes") and not dm.verifier("4", "3")


def test_bad_arguments_name_their_field() -> None:
    with pytest.raises(KDConfigError, match=r"data\.init_args\.question_types"):
        DigitVQADataModule(question_types=["color"])
    with pytest.raises(KDConfigError, match=r"data\.init_args\.empty_prob"):
        DigitVQADataModule(empty_prob=1.0)
    with pytest.raises(KDConfigError, match=r"data\.init_args\.min_digits"):
        DigitVQADataModule(question_types=["left_of"])
    with pytest.raises(KDConfigError, match=r"data\.init_args\.prompt_template"):
        DigitVQADataModule(prompt_template="Q:")
