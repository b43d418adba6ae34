"""``kd diagnose-opd`` (kd_lightning.commands.diagnose_opd): success estimation from batched continuations against
the analytic digit-parity toy, the parameter-space cosine, checkpoint loading, an end-to-end run on a tiny TinyGPT
and reasoning data (three output files, deterministic), and bad inputs as one line."""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from kd_lightning.commands import COMMANDS
from kd_lightning.commands import main as kd_main
from kd_lightning.commands.diagnose_opd import (
    _parameter_cosines,
    build_parser,
    estimate_success,
    load_networks,
)
from kd_lightning.metrics.opd_alignment import node_alignments

EOS = 10  # the toy's vocabulary: digits 0..9 and EOS


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is 10x faster than two under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_sum_even(response: str, answer: str) -> bool:
    """A verifier that an untrained byte-level model passes about half the time (so P_succ varies)."""
    return sum(response.encode()) % 2 == 0


class UnigramLM(nn.Module):
    """Every position draws from one fixed distribution over digits (never EOS): the parity toy's student."""

    def __init__(self, digit_logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.cat([digit_logits, torch.tensor([-1e9])]))
        self.calls: list[int] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.logits.expand(*input_ids.shape, -1)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, **kwargs) -> Tensor:
        self.calls.append(input_ids.shape[0])
        probs = torch.softmax(self.logits / temperature, -1).expand(input_ids.shape[0], -1)
        new = torch.multinomial(probs, max_new_tokens, replacement=True)
        return torch.cat([input_ids, new], dim=1)


def _parity_success(odd_probs: list[float], parity_so_far: int) -> float:
    prod = math.prod(1.0 - 2.0 * o for o in odd_probs)
    return 0.5 * (1.0 + prod) if parity_so_far == 0 else 0.5 * (1.0 - prod)


def test_success_estimates_match_the_analytic_parity_toy_in_one_generate_call() -> None:
    torch.manual_seed(0)
    model = UnigramLM(torch.tensor([0.0, 1.5, 0.2, -0.5, 0.1, 0.9, -1.0, 0.3, 0.0, 0.6]))
    odd = float(torch.softmax(model.logits.detach(), -1)[1:EOS:2].sum())
    prefix_digits = [3]  # odd so far

    def verify(tokens: list[int]) -> bool:
        digits = [t for t in tokens if t != EOS]
        return sum(digits) % 2 == 0

    candidates = torch.tensor([0, 1, 2, EOS])
    m = 2000
    p_succ, rows = estimate_success(
        model, torch.tensor([7, *prefix_digits]), prefix_digits, candidates, m, 2, verify, eos_token_id=EOS
    )
    assert model.calls == [3 * m] and rows == 3 * m  # one call, M x (|K| - the EOS candidate) rows
    for j, k in enumerate([0, 1, 2]):
        assert float(p_succ[j]) == pytest.approx(_parity_success([odd, odd], (3 + k) % 2), abs=0.04)
    assert float(p_succ[3]) == 0.0  # EOS ends the response "3": verified once, odd
    # no budget left: every candidate completes the response as it is
    last, rows = estimate_success(model, torch.tensor([7, 3]), [3], torch.tensor([1, 2]), 5, 0, verify)
    assert last.tolist() == [1.0, 0.0] and rows == 0


def test_parameter_space_cosine_equals_the_logit_cosine_for_the_output_layer() -> None:
    """For logits = W h + b, J^T g = (g h^T, g): <J^T g1, J^T g2> = <g1, g2>(|h|^2 + 1), the same cosine."""
    torch.manual_seed(0)
    head = nn.Linear(5, 12)
    h = torch.randn(1, 5)
    graph_logits = head(h)
    candidates = torch.tensor([3, 0, 7])
    params = list(head.named_parameters())
    for space in ("vocab", "candidates"):
        result = node_alignments(
            graph_logits[0].detach(), {"t": torch.randn(12)}, candidates, torch.tensor([0.9, 0.1, 0.4]), space=space
        )
        pulled = _parameter_cosines(graph_logits, 0, result, candidates, params)
        for key, cosine in result["cosine"].items():
            assert pulled[key] == pytest.approx(cosine, abs=1e-6)


# ---------------------------------------------------------------------------------------------- the command
def _config(tmp_path: Path, model: str = "OnPolicyDistill", **method: object) -> Path:
    tiny = {"class_path": "TinyGPT", "init_args": {"vocab_size": 264, "d_model": 16, "n_layers": 1, "n_heads": 2}}
    init_args: dict = {"student": tiny, "teacher": tiny} if model == "OnPolicyDistill" else {"model": tiny}
    init_args |= method
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1},
        "teacher_training": {"enabled": False},
        "data": {
            "class_path": "ReasoningDataModule",
            "init_args": {
                "families": ["modular"],
                "num_train": 4,
                "num_val": 2,
                "num_test": 4,
                "train_difficulties": [1],
                "eval_difficulties": [1],
                "eval_batch_size": 2,
                "verifier": "tests.commands.test_diagnose_opd.byte_sum_even",
            },
        },
        "model": {"class_path": model, "init_args": init_args},
    }
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TINY_RUN = ["--questions", "3", "--max_new_tokens", "6", "--every", "3", "--top_entropy", "1"]
TINY_RUN += ["--candidates", "3", "--continuations", "3"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_end_to_end_writes_csv_summary_and_plot_deterministically(tmp_path: Path) -> None:
    assert "diagnose-opd" in COMMANDS
    config = _config(tmp_path, sampling_temperature=0.9, top_k=50)  # the rollouts use the method's sampling
    args = ["diagnose-opd", "--config", str(config), *TINY_RUN, "--parameter_space", "blocks.0"]
    kd_main([*args, "--output", str(tmp_path / "a")])
    out = tmp_path / "a"
    rows = _rows(out / "alignment.csv")
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert counts["questions"] == 3 and summary["questions"] == 3
    assert len(rows) == counts["nodes"] * 2 * 2 > 0  # nodes x {teacher, self_privileged} x {forward, reverse}
    assert {(r["configuration"], r["divergence"]) for r in rows} == {
        (c, d) for c in ("teacher", "self_privileged") for d in ("forward_kl", "reverse_kl")
    }
    for row in rows:
        assert int(row["num_candidates"]) in (3, 4) and 0 <= int(row["position"]) < int(row["response_length"]) <= 6
        spread = float(row["p_succ_spread"])
        assert 0.0 <= spread <= 1.0
        assert (row["skipped"] == "equal_success") == (spread == 0.0)
        if row["cosine"]:
            assert -1.0 <= float(row["cosine"]) <= 1.0 and -1.0 <= float(row["cosine_params"]) <= 1.0
    defined = [r for r in rows if r["cosine"]]
    assert defined, "the byte-parity verifier should leave some nodes with unequal success"
    skipped_nodes = len({(r["question"], r["position"]) for r in rows if r["skipped"] == "equal_success"})
    assert counts["skipped_equal_success"] == skipped_nodes
    accuracy = len({r["question"] for r in rows if r["rollout_correct"] == "1"}) / 3
    assert summary["rollout_accuracy"] == pytest.approx(accuracy)
    groups = summary["by_correctness"]["teacher/forward_kl"]
    assert set(groups) == {"correct", "incorrect", "all"}
    assert groups["all"]["n_nodes"] == len([r for r in defined if r["configuration"] == "teacher"]) // 2
    assert set(summary["by_position"]["self_privileged/reverse_kl"]) <= {"0-33%", "33-67%", "67-100%"}
    assert summary["settings"]["temperature"] == 0.9 and summary["settings"]["top_k"] == 50
    assert summary["settings"]["candidates"] == 3 and summary["settings"]["max_new_tokens"] == 6
    assert "AS CONSTRUCTED" in " ".join(summary["source"]["weights"])
    pytest.importorskip("matplotlib")
    assert (out / "alignment.png").stat().st_size > 0
    # seeded: a second run gives the same rows
    kd_main([*args, "--output", str(tmp_path / "b"), "--no_plot"])
    assert _rows(tmp_path / "b" / "alignment.csv") == rows
    assert not (tmp_path / "b" / "alignment.png").exists()


def test_checkpoint_weights_reach_student_and_teacher(tmp_path: Path) -> None:
    config = _config(tmp_path)
    args = build_parser().parse_args(["--config", str(config)])
    _, student, teacher, _, _ = load_networks(args, [], needs_teacher=True)
    state = {f"student.{k}": v + 1.0 for k, v in student.state_dict().items()}
    state |= {f"teacher.{k}": v - 1.0 for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "run.ckpt")
    args = build_parser().parse_args(["--config", str(config), "--ckpt", str(tmp_path / "run.ckpt")])
    _, loaded_student, loaded_teacher, _, description = load_networks(args, [], needs_teacher=True)
    for name, value in loaded_student.state_dict().items():
        assert torch.equal(value, state[f"student.{name}"])
    for name, value in loaded_teacher.state_dict().items():
        assert torch.equal(value, state[f"teacher.{name}"])
    ckpt = tmp_path / "run.ckpt"
    assert description["weights"] == [f"teacher: teacher.* of {ckpt}", f"student: student.* of {ckpt}"]


@pytest.mark.parametrize(
    ("extra", "model", "expected"),
    [
        (["--configurations", "oracle"], "OnPolicyDistill", "kd: error: --configurations: unknown ['oracle']"),
        (["--continuations", "0"], "OnPolicyDistill", "kd: error: --continuations: must be >= 1, got 0"),
        (["--every", "0", "--top_entropy", "0"], "OnPolicyDistill", "kd: error: --every: and --top_entropy are both 0"),
        (["--configurations", "teacher"], "ReasoningSupervised", "kd: error: --configurations: ReasoningSupervised"),
        (["--max_new_tokens", "400"], "OnPolicyDistill", "kd: error: --max_new_tokens: a student prompt + response"),
    ],
)
def test_bad_inputs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], model: str, expected: str
) -> None:
    config = _config(tmp_path, model)
    with pytest.raises(SystemExit) as exit_info:
        kd_main(["diagnose-opd", "--config", str(config), "--output", str(tmp_path / "out"), *TINY_RUN, *extra])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: error:")]
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "out" / "summary.json").exists()


def test_self_privileged_only_runs_on_a_single_network_config(tmp_path: Path) -> None:
    """The SFT student alone (no teacher slot): OPSD's self-teacher context still applies."""
    config = _config(tmp_path, "ReasoningSupervised")
    kd_main(
        [
            *("diagnose-opd", "--config", str(config), *TINY_RUN, "--configurations", "self_privileged"),
            *("--divergences", "reverse_kl", "--questions", "1", "--no_plot", "--output", str(tmp_path / "o")),
        ]
    )
    rows = _rows(tmp_path / "o" / "alignment.csv")
    settings = json.loads((tmp_path / "o" / "summary.json").read_text())["settings"]
    assert settings["temperature"] == 1.0 and settings["top_k"] is None  # no sampling settings in an SFT config
    assert rows and {(r["configuration"], r["divergence"]) for r in rows} == {("self_privileged", "reverse_kl")}


def test_parser_defaults_follow_the_spec() -> None:
    args = build_parser().parse_args(["--config", "x.yaml"])
    assert isinstance(args, argparse.Namespace)
    assert (args.candidates, args.continuations, args.every, args.top_entropy) == (8, 8, 16, 32)
    assert args.configurations == ["teacher", "self_privileged"]
    assert args.divergences == ["forward_kl", "reverse_kl"] and args.space == "vocab"
