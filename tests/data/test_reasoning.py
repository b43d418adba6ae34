"""ReasoningDataModule: generated problems, verifier, JSONL readers, the batch contract."""

from __future__ import annotations

import json
import re

import pytest

from kd_lightning.data.reasoning import (
    ReasoningDataModule,
    checked_verifier,
    final_answer,
    generate_problems,
    read_reasoning_jsonl,
    verify_final_answer,
)
from kd_lightning.errors import DatasetNotFoundError, KDConfigError


def _evaluate(problem: str) -> int:
    """An independent answer: the statement as a Python expression (``mod`` -> ``%``), digits and operators only."""
    expression = problem.removeprefix("Compute ").rstrip(".").replace("mod", "%")
    assert re.fullmatch(r"[\d+\-*%() ]+", expression), expression
    return eval(expression)


def test_generated_problems_are_correct_deterministic_and_disjoint() -> None:
    a = generate_problems((60, 20, 20), ("arith", "modular", "symbolic"), ((1, 2), (3,), (1, 2, 3)), seed=3)
    b = generate_problems((60, 20, 20), ("arith", "modular", "symbolic"), ((1, 2), (3,), (1, 2, 3)), seed=3)
    assert a == b
    statements = [p.problem for split in a for p in split]
    assert len(statements) == len(set(statements)) == 100
    assert {p.difficulty for p in a[0]} <= {1, 2} and {p.difficulty for p in a[1]} == {3}
    for p in (p for split in a for p in split):
        assert verify_final_answer(p.solution, p.answer), p
        if p.family in ("arith", "modular"):
            assert int(p.answer) == _evaluate(p.problem), p
        else:
            letters = p.problem.split()[-1].rstrip(".")
            expected = letters[::-1] if p.problem.startswith("Reverse") else "".join(sorted(letters))
            assert p.answer == expected and len(letters) == p.difficulty + 2


def test_too_many_problems_is_an_error() -> None:
    with pytest.raises(KDConfigError, match="num_train"):
        generate_problems((5000,), ("modular",), ((1,),), seed=0)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("3+4=7. Answer: 7", "7", True),
        ("Answer: 7.0.", "7", True),
        ("so #### 1,234", "1234", True),
        ("the result is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
        ("Answer: 5 then Answer: 8", "8", True),
        ("Answer: 8 and more", "8", False),
        ("Answer:  DCBA ", "dcba", True),
        ("no final answer 7", "7", False),
        ("Answer: 6", "7", False),
    ],
)
def test_verifier_cases(response: str, answer: str, expected: bool) -> None:
    assert verify_final_answer(response, answer) is expected


def test_final_answer_prefers_boxed_and_balances_braces() -> None:
    assert final_answer("x \\boxed{a{b}c} y") == "a{b}c"
    assert final_answer("nothing") is None


def test_a_verifier_that_raises_or_returns_garbage_is_one_line() -> None:
    def broken(response: str, answer: str) -> bool:
        raise ZeroDivisionError("boom")

    with pytest.raises(KDConfigError) as err:
        checked_verifier(broken, "mod.broken")("Answer: 1", "1")
    message = str(err.value)
    assert "\n" not in message and "data.init_args.verifier" in message and "ZeroDivisionError" in message
    with pytest.raises(KDConfigError, match="returned str"):
        checked_verifier(lambda r, a: "yes", "mod.f")("Answer: 1", "1")
    with pytest.raises(KDConfigError, match="cannot import"):
        ReasoningDataModule(verifier="no_such_module.verify")


def _write(path, records) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_jsonl_formats(tmp_path) -> None:
    _write(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    _write(
        tmp_path / "math.jsonl", [{"problem": "half?", "solution": "It is $\\boxed{\\frac12}$.", "level": "Level 3"}]
    )
    _write(tmp_path / "gen.jsonl", [{"prompt": "p", "solution": "s", "answer": "9"}])
    (gsm,) = read_reasoning_jsonl(tmp_path / "gsm.jsonl", "gsm8k")
    assert (gsm.problem, gsm.answer) == ("2+2?", "4") and gsm.solution.endswith("Answer: 4")
    (math,) = read_reasoning_jsonl(tmp_path / "math.jsonl", "math")
    assert math.answer == "\\frac12" and math.difficulty == 3 and verify_final_answer(math.solution, math.answer)
    (gen,) = read_reasoning_jsonl(tmp_path / "gen.jsonl", "generic")
    assert gen.solution == "s\nAnswer: 9" and verify_final_answer(gen.solution, "9")


def test_jsonl_without_answer_field_names_the_field(tmp_path) -> None:
    _write(tmp_path / "bad.jsonl", [{"prompt": "p", "solution": "s"}])
    with pytest.raises(KDConfigError) as err:
        read_reasoning_jsonl(tmp_path / "bad.jsonl", "generic")
    assert "data.init_args.answer_field" in str(err.value) and "bad.jsonl:1" in str(err.value)
    _write(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(KDConfigError, match="answer_field"):
        read_reasoning_jsonl(tmp_path / "gsm.jsonl", "gsm8k")


def test_missing_jsonl_file_says_where(tmp_path) -> None:
    dm = ReasoningDataModule(source="jsonl", train_path="train.jsonl", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"train\.jsonl"):
        dm.setup()


def test_jsonl_data_module_holds_out_validation(tmp_path) -> None:
    _write(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "solution": "s", "answer": str(i)} for i in range(20)])
    dm = ReasoningDataModule(source="jsonl", train_path=str(tmp_path / "t.jsonl"), val_fraction=0.25, batch_size=4)
    dm.setup()
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    assert not {p.problem for p in dm.problems["train"]} & {p.problem for p in dm.problems["val"]}


def test_batch_contract() -> None:
    dm = ReasoningDataModule(num_train=24, num_val=4, num_test=4, batch_size=6, privileged_fraction=0.5)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert int(batch["num_items_in_batch"]) > 0
    for row in range(6):
        index = int(batch["sample_index"][row])
        problem = dm.train_set.problems[index]
        item = dm.train_set[index]
        prompt = tok.decode(batch["prompt_ids"][row][batch["prompt_mask"][row]])
        assert prompt == dm.format_prompt(problem.problem)
        assert not batch["prompt_mask"][row][0] or batch["prompt_mask"][row].all()  # left padding
        privileged = tok.decode(batch["privileged_ids"][row][batch["privileged_mask"][row]])
        assert problem.solution in privileged and problem.problem in privileged
        for prefix, used in (
            ("", item["prompt"]),
            ("sft_", item["privileged"] if item["sft_privileged"] else item["prompt"]),
        ):
            labels = batch[f"{prefix}labels"][row]
            assert tok.decode(labels[labels >= 0]) == " " + problem.solution  # EOS dropped by decode
            assert int(labels[labels >= 0][-1]) == tok.eos_token_id
            start = len(used)
            assert (labels[:start] == -100).all() and labels[start] >= 0
            assert batch[f"{prefix}input_ids"][row, :start].tolist() == used
        assert int(batch["prompt_lengths"][row]) == len(item["prompt"]) and batch["answers"][row] == problem.answer
    rows = [dm.train_set[i]["sft_privileged"] for i in range(len(dm.train_set))]
    assert 0 < sum(rows) < len(rows)
    assert not any(dm.val_set[i]["sft_privileged"] for i in range(len(dm.val_set)))


def test_bad_arguments_name_their_field() -> None:
    with pytest.raises(KDConfigError, match="families"):
        ReasoningDataModule(families=["calculus"])
    with pytest.raises(KDConfigError, match="privileged_template"):
        ReasoningDataModule(privileged_template="{problem} only")
    with pytest.raises(KDConfigError, match="train_path"):
        ReasoningDataModule(source="jsonl")
    with pytest.raises(KDConfigError, match="chat_template"):
        _ = ReasoningDataModule(chat_template="required").tokenizer
