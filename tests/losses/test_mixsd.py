"""MixSD target construction and losses (kd_lightning.losses.mixsd), hand-checked on tiny logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.mixsd import (
    build_mixed_targets,
    expert_naive_kl,
    mixed_target_nll,
    mixture_log_probs,
    mixture_soft_kl,
    select_mixed_tokens,
)


def logits_of(*probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# ------------------------------------------------------------------------------------------ token selection
def test_mixture_argmax_is_the_argmax_of_the_weighted_probabilities() -> None:
    # row 0: expert sure of 0 (0.9), naive sure of 1 (0.7): mixture = [0.5, 0.4, 0.1] at rho 0.5 -> 0;
    # at rho 0.2: [0.24, 0.58, 0.18] -> 1. row 1: both agree on 2.
    expert = logits_of([0.9, 0.05, 0.05], [0.1, 0.1, 0.8])
    naive = logits_of([0.1, 0.7, 0.2], [0.2, 0.2, 0.6])
    tokens, from_expert = select_mixed_tokens(expert, naive, "mixture", rho=0.5)
    assert tokens.tolist() == [0, 2] and from_expert.tolist() == [True, False]
    tokens, from_expert = select_mixed_tokens(expert, naive, "mixture", rho=0.2)
    assert tokens.tolist() == [1, 2] and from_expert.tolist() == [False, False]
    expected = torch.tensor([[0.5, 0.375, 0.125], [0.15, 0.15, 0.7]], dtype=torch.float64)
    assert torch.allclose(mixture_log_probs(expert, naive, 0.5).exp(), expected)
    assert torch.allclose(mixture_log_probs(expert, naive, 1.0), F.log_softmax(expert, -1))  # ends exact
    assert torch.allclose(mixture_log_probs(expert, naive, 0.0), F.log_softmax(naive, -1))


def test_switch_takes_the_expert_token_only_where_argmaxes_disagree_and_kl_exceeds_kappa() -> None:
    expert = logits_of([0.9, 0.05, 0.05], [0.45, 0.55, 0.0 + 1e-9], [0.1, 0.1, 0.8])
    naive = logits_of([0.1, 0.7, 0.2], [0.55, 0.45, 1e-9], [0.2, 0.2, 0.6])
    kl = expert_naive_kl(expert, naive)
    by_hand = [
        0.9 * math.log(0.9 / 0.1) + 0.05 * math.log(0.05 / 0.7) + 0.05 * math.log(0.05 / 0.2),
        0.45 * math.log(0.45 / 0.55) + 0.55 * math.log(0.55 / 0.45),
        0.1 * math.log(0.1 / 0.2) * 2 + 0.8 * math.log(0.8 / 0.6),
    ]
    assert torch.allclose(kl, torch.tensor(by_hand, dtype=torch.float64), atol=1e-6)
    # row 0: disagree, KL 1.79 > 0.5 -> expert 0; row 1: disagree, KL 0.04 < 0.5 -> naive 0; row 2: agree -> 2
    tokens, from_expert = select_mixed_tokens(expert, naive, "switch", kappa=0.5)
    assert tokens.tolist() == [0, 0, 2] and from_expert.tolist() == [True, False, False]
    tokens, _ = select_mixed_tokens(expert, naive, "switch", kappa=0.01)  # row 1's KL now passes
    assert tokens.tolist() == [0, 1, 2]
    tokens, _ = select_mixed_tokens(expert, naive, "switch", kappa=5.0)  # nothing is fact-bearing: all naive
    assert tokens.tolist() == [1, 0, 2]


def test_sampled_mixture_follows_the_mixture_frequencies() -> None:
    expert = logits_of([1.0 - 2e-9, 1e-9, 1e-9]).expand(4000, 3)
    naive = logits_of([1e-9, 1.0 - 2e-9, 1e-9]).expand(4000, 3)
    gen = torch.Generator().manual_seed(0)
    tokens, _ = select_mixed_tokens(expert, naive, "mixture", rho=0.3, greedy=False, generator=gen)
    assert abs((tokens == 0).double().mean().item() - 0.3) < 0.03 and bool((tokens < 2).all())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rho": 1.5}, "rho"),
        ({"kappa": -1.0}, "kappa"),
        ({"mode": "blend"}, "target_mode"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    z = torch.zeros(1, 3)
    with pytest.raises(KDConfigError, match=field):
        select_mixed_tokens(z, z, **kwargs)


# ------------------------------------------------------------------------------------------ autoregressive build
class TableLM(torch.nn.Module):
    """A fake LM whose next-token logits depend on (last token, whether token 9 = "the fact" is in context)."""

    def __init__(self, with_fact: list[int], without_fact: list[int], prompt_width: int, vocab: int = 12) -> None:
        super().__init__()
        self.vocab, self.with_fact, self.without_fact = vocab, with_fact, without_fact
        self.prompt_width = prompt_width
        self.calls: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(ids.clone())
        out = torch.zeros(*ids.shape, self.vocab)
        for b in range(ids.shape[0]):
            fact = bool((ids[b] == 9).any())
            table = self.with_fact if fact else self.without_fact
            step = ids.shape[1] - self.prompt_width  # tokens generated so far
            token = table[min(step, len(table) - 1)]
            out[b, -1, token] = 5.0
            out[b, -1, (token + 1) % self.vocab] = 1.0
        return out


def test_build_targets_feeds_both_conditionals_the_same_prefix_and_stops_at_eos() -> None:
    eos, pad = 11, 10
    # expert says 3 4 5 eos, naive says 6 4 7 eos: switch (kappa 0) takes 3 (disagree), 4 (agree), 5, eos
    model = TableLM(with_fact=[3, 4, 5, eos], without_fact=[6, 4, 7, eos], prompt_width=3)
    expert_ids = torch.tensor([[9, 1, 2]])  # fact token 9 + question "1 2"
    naive_ids = torch.tensor([[pad, 1, 2]])
    naive_mask = torch.tensor([[False, True, True]])
    out = build_mixed_targets(
        model,
        model,
        expert_ids,
        torch.ones_like(expert_ids, dtype=torch.bool),
        naive_ids,
        naive_mask,
        max_new_tokens=8,
        mode="switch",
        kappa=0.0,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    assert out.response_ids.tolist() == [[3, 4, 5, eos]] and out.response_mask.all()
    assert out.from_expert.tolist() == [[True, False, True, False]]
    assert out.expert_logits.shape == out.naive_logits.shape == (1, 4, 12)
    # every step: one expert call (with the fact) and one naive call (without), sharing the generated prefix
    for step in range(4):
        expert_call, naive_call = model.calls[2 * step], model.calls[2 * step + 1]
        assert (expert_call[0] == 9).any() and not (naive_call[0] == 9).any()
        assert torch.equal(expert_call[0, 3:], naive_call[0, 3:]) and expert_call.shape[1] == 3 + step


def test_build_targets_pads_finished_rows_and_respects_max_new_tokens() -> None:
    eos, pad = 11, 10
    model = TableLM(with_fact=[3, eos], without_fact=[3, 4, 5, 6, 7], prompt_width=2)
    ids = torch.tensor([[9, 1], [1, 2]])  # row 0 sees the fact, row 1 does not (expert == naive prompt)
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = build_mixed_targets(
        model, model, ids, mask, ids, mask, max_new_tokens=3, rho=1.0, eos_token_id=eos, pad_token_id=pad
    )
    assert out.response_ids.tolist() == [[3, eos, pad], [3, 4, 5]]
    assert out.response_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(KDConfigError, match="max_new_tokens"):
        build_mixed_targets(model, model, ids, mask, ids, mask, max_new_tokens=0)


class EmbeddingLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(12, 12)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        assert not self.training  # built in eval mode
        return self.dropout(self.embed(ids))


def test_build_targets_runs_modules_in_eval_mode_without_gradients_and_restores_their_mode() -> None:
    net = EmbeddingLM().train()
    ids = torch.tensor([[1, 2]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = build_mixed_targets(net, net, ids, mask, ids, mask, max_new_tokens=2)
    assert net.training and not out.expert_logits.requires_grad and out.response_ids.shape == (1, 2)


# ------------------------------------------------------------------------------------------ losses
def test_soft_kl_is_zero_when_the_student_equals_the_mixture_and_matches_a_hand_value() -> None:
    expert = torch.randn(2, 3, 7, dtype=torch.float64)
    naive = torch.randn(2, 3, 7, dtype=torch.float64)
    mixture = mixture_log_probs(expert, naive, 0.3)
    assert mixture_soft_kl(mixture, expert, naive, 0.3).abs().item() < 1e-12
    student = torch.randn(2, 3, 7, dtype=torch.float64)
    m = 0.3 * expert.softmax(-1) + 0.7 * naive.softmax(-1)
    by_hand = (m * (m.log() - student.log_softmax(-1))).sum(-1)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.allclose(mixture_soft_kl(student, expert, naive, 0.3, mask, reduction="none"), by_hand * mask)
    assert torch.allclose(mixture_soft_kl(student, expert, naive, 0.3, mask, reduction="sum"), by_hand[mask].sum())
    assert torch.allclose(mixture_soft_kl(student, expert, naive, 0.3, mask, reduction="mean"), by_hand[mask].mean())


def test_soft_kl_gradient_reaches_only_the_student_and_handles_zero_mixture_mass() -> None:
    student = torch.randn(1, 2, 4, requires_grad=True)
    expert = torch.tensor([[[0.0, -math.inf, 1.0, 2.0]] * 2], requires_grad=True)
    naive = torch.tensor([[[1.0, -math.inf, 0.0, 0.0]] * 2], requires_grad=True)
    loss = mixture_soft_kl(student, expert, naive, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert expert.grad is None and naive.grad is None  # targets are detached


def test_nll_on_mixed_targets_by_hand() -> None:
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    log_p = logits.log_softmax(-1)
    by_hand = -(log_p[0, 0, 1] + log_p[0, 1, 4] + log_p[0, 2, 0] + log_p[1, 0, 2])
    assert torch.allclose(mixed_target_nll(logits, tokens, mask), by_hand)
    assert torch.allclose(mixed_target_nll(logits, tokens, mask, reduction="mean"), by_hand / 4)
