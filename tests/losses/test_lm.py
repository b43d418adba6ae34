"""Token-level LM objectives: hand-computed values, limits, masks, reductions and global token normalisation."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses import lm
from kd_lightning.losses.bild import dynamic_logit_difference_kl
from kd_lightning.losses.lm import (
    TOKEN_OBJECTIVES,
    align_vocab,
    check_vocab_sizes,
    count_valid_tokens,
    forward_kl,
    generalized_jsd,
    mixed_kl,
    normalize_token_sum,
    reverse_kl,
    shift_for_next_token,
    skew_kl,
    skew_reverse_kl,
    token_cross_entropy,
    token_objective,
    total_variation,
)
from kd_lightning.losses.taid import taid_loss


# ------------------------------------------------------------------------------ plain-Python references
def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def mix(a: list[float], b: list[float], weight_b: float) -> list[float]:
    return [(1 - weight_b) * ai + weight_b * bi for ai, bi in zip(a, b)]


S, T = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]  # student and teacher logits over a 3-token vocabulary
S2, T2 = [0.0, -1.0, 3.0], [2.0, 0.0, 0.0]


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def value(fn, s: list[float], t: list[float], **kwargs) -> float:
    return fn(tensors(s), tensors(t), **kwargs).item()


# ------------------------------------------------------------------------------------------ shifting
def test_shift_for_next_token_pairs_position_t_with_label_t_plus_1() -> None:
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    labels = torch.tensor([[-100, 5, 6, 7], [1, 2, -100, -100]])
    shifted, targets, mask = shift_for_next_token(logits, labels)
    assert torch.equal(shifted, logits[:, :3])
    assert targets.tolist() == [[5, 6, 7], [2, -100, -100]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert count_valid_tokens(labels).item() == 4
    with pytest.raises(ValueError, match=r"logits \[B, T, V\] and labels \[B, T\]"):
        shift_for_next_token(logits, labels[:, :3])


# ---------------------------------------------------------------------------------- hand-computed values
def test_forward_and_reverse_kl_hand_computed() -> None:
    p, q = softmax(T), softmax(S)
    assert value(forward_kl, S, T) == pytest.approx(kl(p, q), rel=1e-12)
    assert value(reverse_kl, S, T) == pytest.approx(kl(q, p), rel=1e-12)
    tau = 2.0
    assert value(forward_kl, S, T, temperature=tau) == pytest.approx(kl(softmax(T, tau), softmax(S, tau)), rel=1e-12)


def test_generalized_jsd_hand_computed_both_scalings() -> None:
    p, q = softmax(T), softmax(S)
    for beta in (0.1, 0.5, 0.9):
        m = mix(q, p, beta)  # β·p + (1 − β)·q
        jsd = beta * kl(p, m) + (1 - beta) * kl(q, m)
        assert value(generalized_jsd, S, T, beta=beta, normalized=False) == pytest.approx(jsd, rel=1e-12)
        assert value(generalized_jsd, S, T, beta=beta) == pytest.approx(jsd / (beta * (1 - beta)), rel=1e-12)
    # β = 1/2 is the symmetric Jensen-Shannon divergence, bounded by log 2
    half = value(generalized_jsd, S, T, beta=0.5, normalized=False)
    assert half == pytest.approx(value(generalized_jsd, T, S, beta=0.5, normalized=False), rel=1e-12)
    assert 0 < half < math.log(2)
    # the ends are forward and reverse KL in both scalings (TRL's convention)
    for normalized in (True, False):
        assert value(generalized_jsd, S, T, beta=0.0, normalized=normalized) == pytest.approx(kl(p, q), rel=1e-12)
        assert value(generalized_jsd, S, T, beta=1.0, normalized=normalized) == pytest.approx(kl(q, p), rel=1e-12)


def test_skew_kls_hand_computed_and_alpha_zero_limits() -> None:
    p, q = softmax(T), softmax(S)
    for alpha in (0.1, 0.5):
        assert value(skew_kl, S, T, alpha=alpha) == pytest.approx(kl(p, mix(q, p, alpha)), rel=1e-12)
        assert value(skew_reverse_kl, S, T, alpha=alpha) == pytest.approx(kl(q, mix(p, q, alpha)), rel=1e-12)
    assert value(skew_kl, S, T, alpha=0.0) == pytest.approx(kl(p, q), rel=1e-12)
    assert value(skew_reverse_kl, S, T, alpha=0.0) == pytest.approx(kl(q, p), rel=1e-12)
    # skewing bounds the divergence: KL(p ‖ αp + (1 − α)q) ≤ −log α
    assert value(skew_kl, [20.0, 0.0, 0.0], [0.0, 20.0, 0.0], alpha=0.1) < -math.log(0.1)


def test_total_variation_and_mixed_kl_hand_computed() -> None:
    p, q = softmax(T), softmax(S)
    assert value(total_variation, S, T) == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(p, q)), rel=1e-12)
    for lam in (0.0, 0.25, 1.0):
        want = lam * kl(q, p) + (1 - lam) * kl(p, q)
        assert value(mixed_kl, S, T, reverse_weight=lam) == pytest.approx(want, rel=1e-12)


def test_token_cross_entropy_hand_computed_with_ignore_index() -> None:
    logits = tensors(S, S2)
    targets = torch.tensor([1, -100])
    assert token_cross_entropy(logits, targets).item() == pytest.approx(-math.log(softmax(S)[1]), rel=1e-12)
    both = token_cross_entropy(logits, torch.tensor([1, 2]), reduction="sum").item()
    assert both == pytest.approx(-math.log(softmax(S)[1]) - math.log(softmax(S2)[2]), rel=1e-12)
    masked = token_cross_entropy(logits, torch.tensor([1, 2]), mask=torch.tensor([False, True])).item()
    assert masked == pytest.approx(-math.log(softmax(S2)[2]), rel=1e-12)


def test_every_objective_is_zero_at_a_match_and_positive_otherwise() -> None:
    z, other = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    for name in TOKEN_OBJECTIVES:
        fn = token_objective(name)
        assert fn(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6), name
        assert fn(z, other).item() > 1e-4, name


# ------------------------------------------------------------------------------------------- JSD limits
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-6)])
def test_generalized_jsd_is_continuous_at_both_ends(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 6, 11, dtype=dtype)
    t = 3 * torch.randn(4, 6, 11, dtype=dtype)  # peaked teacher: slow convergence, a demanding case
    fkl, rkl = forward_kl(s, t).item(), reverse_kl(s, t).item()
    gaps_zero, gaps_one = [], []
    for eps in (1e-2, 1e-4, 1e-6, 1e-9, 1e-12):
        gaps_zero.append(abs(generalized_jsd(s, t, beta=eps).item() / fkl - 1))
        gaps_one.append(abs(generalized_jsd(s, t, beta=1 - eps).item() / rkl - 1))
    assert gaps_zero[-1] < tol and gaps_one[-1] < tol  # β = 1e-12 and 1 − 1e-12: the KLs themselves
    if dtype == torch.float64:  # the gap shrinks with β (or 1 − β) all the way: no cancellation floor
        assert gaps_zero == sorted(gaps_zero, reverse=True) and gaps_one == sorted(gaps_one, reverse=True)
        assert gaps_zero[-1] < 1e-10
    # the textbook mixture formula, divided by β(1 − β), drifts away from the limit (rounding / β)
    beta = 1e-12
    log_q, log_p = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    log_m = torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    naive = (beta * (log_p.exp() * (log_p - log_m)) + (1 - beta) * (log_q.exp() * (log_q - log_m))).sum(-1)
    assert abs(naive.mean().item() / (beta * (1 - beta)) / fkl - 1) > 100 * gaps_zero[-1]


def test_generalized_jsd_gradient_is_continuous_and_matches_autograd_of_the_definition() -> None:
    torch.manual_seed(1)
    t = torch.randn(5, 9, dtype=torch.float64)
    base = torch.randn(5, 9, dtype=torch.float64)

    def grad(fn) -> torch.Tensor:
        s = base.clone().requires_grad_(True)
        fn(s).backward()
        return s.grad

    g_fkl = grad(lambda s: forward_kl(s, t))
    g_rkl = grad(lambda s: reverse_kl(s, t))
    assert torch.allclose(grad(lambda s: generalized_jsd(s, t, beta=1e-9)), g_fkl, atol=1e-8)
    assert torch.allclose(grad(lambda s: generalized_jsd(s, t, beta=1 - 1e-9)), g_rkl, atol=1e-7)

    def definition(s: torch.Tensor, beta: float) -> torch.Tensor:  # independent formulation (probabilities)
        p, q = F.softmax(t, -1), F.softmax(s, -1)
        m = beta * p + (1 - beta) * q
        per_token = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
        return per_token.mean() / (beta * (1 - beta))

    assert torch.allclose(grad(lambda s: generalized_jsd(s, t, beta=0.3)), grad(lambda s: definition(s, 0.3)))


def test_skew_kl_has_the_official_cross_entropy_gradient() -> None:
    """DistiLLM's ``skewed_forward_kl`` is −Σ p·log(αp + (1 − α)q): our KL form differs by H(p) only."""
    torch.manual_seed(2)
    t = torch.randn(4, 7, dtype=torch.float64)
    s1 = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    skew_kl(s1, t, alpha=0.1).backward()
    p = F.softmax(t, -1)
    official = -(p * torch.log(0.1 * p + 0.9 * F.softmax(s2, -1))).sum(-1).mean()
    official.backward()
    assert torch.allclose(s1.grad, s2.grad)
    entropy = -(p * p.log()).sum(-1).mean()
    assert skew_kl(s1, t, alpha=0.1).item() == pytest.approx((official - entropy).item(), rel=1e-12)


def test_extreme_logits_give_finite_values_and_gradients() -> None:
    s = torch.tensor([[100.0, -100.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-100.0, 100.0, 0.0], [80.0, -80.0, 0.0]])
    for name in TOKEN_OBJECTIVES:
        s.grad = None
        out = token_objective(name)(s, t)
        out.backward()
        assert torch.isfinite(out), name
        assert torch.isfinite(s.grad).all(), name


# ------------------------------------------------------------------------------------ masks, reductions
@pytest.mark.parametrize("name", sorted(TOKEN_OBJECTIVES))
def test_masks_and_reductions(name: str) -> None:
    torch.manual_seed(3)
    s = torch.randn(2, 4, 6, requires_grad=True)
    t = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    fn = token_objective(name)
    per_token = fn(s, t, reduction="none")
    assert per_token.shape == (2, 4)
    masked = fn(s, t, mask=mask, reduction="none")
    assert torch.equal(masked[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(masked[mask], per_token[mask])
    total = fn(s, t, mask=mask, reduction="sum")
    assert total.item() == pytest.approx(per_token[mask].sum().item(), rel=1e-6)
    assert fn(s, t, mask=mask).item() == pytest.approx(total.item() / 4, rel=1e-6)
    assert fn(s, t, mask=torch.zeros_like(mask)).item() == 0.0  # no valid token: 0, not NaN
    total.backward()
    assert s.grad[~mask].abs().max() == 0  # masked tokens get no gradient
    assert s.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="reduction"):
        fn(s, t, reduction="batchmean")


@pytest.mark.parametrize("name", sorted(TOKEN_OBJECTIVES))
def test_gradients_reach_the_student_only(name: str) -> None:
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    token_objective(name)(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_taid_and_dbild_functional_forms_accept_sum() -> None:
    torch.manual_seed(4)
    s, t = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    mask = torch.rand(2, 5) > 0.3
    n = int(mask.sum())
    for fn in (
        lambda r: taid_loss(s, t, 0.4, mask, reduction=r),
        lambda r: dynamic_logit_difference_kl(s, t, mask=mask, reduction=r),
    ):
        assert fn("sum").item() == pytest.approx(n * fn("mean").item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_token_objective_validation() -> None:
    assert set(TOKEN_OBJECTIVES) == {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv", "mixed_kl"}
    s, t = tensors(S), tensors(T)
    assert token_objective("jsd", beta=0.2)(s, t).item() == pytest.approx(generalized_jsd(s, t, beta=0.2).item())
    assert token_objective("mixed_kl", reverse_weight=0.5, temperature=2.0)(s, t).item() == pytest.approx(
        mixed_kl(s, t, reverse_weight=0.5, temperature=2.0).item()
    )
    with pytest.raises(KDConfigError, match="unknown token objective 'kl'"):
        token_objective("kl")
    with pytest.raises(KDConfigError, match="not \\['beta'\\]"):
        token_objective("forward_kl", beta=0.5)
    with pytest.raises(KDConfigError, match=r"beta must be in \[0, 1\], got 1.5"):
        token_objective("jsd", beta=1.5)
    with pytest.raises(KDConfigError, match="alpha"):
        token_objective("skew_kl", alpha=1.0)
    with pytest.raises(KDConfigError, match="temperature"):
        token_objective("tv", temperature=0.0)


def test_shape_mismatch_points_to_align_vocab() -> None:
    with pytest.raises(ValueError, match="align_vocab"):
        forward_kl(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="token shapes differ"):
        generalized_jsd(torch.randn(2, 5), torch.randn(3, 5))


# ---------------------------------------------------------------------------------------- vocabulary
def test_align_vocab_slices_padding_rows_with_one_warning() -> None:
    lm._WARNED_SIZES.clear()
    s, t = torch.randn(2, 3, 32000), torch.randn(2, 3, 32064)
    with pytest.warns(UserWarning, match="student vocabulary 32000, teacher vocabulary 32064"):
        s2, t2 = align_vocab(s, t)
    assert s2.shape == t2.shape == (2, 3, 32000)
    assert torch.equal(t2, t[..., :32000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        align_vocab(s, t)
        same = align_vocab(s, s)
    assert same[0] is s


def test_align_vocab_errors_for_different_tokenizers() -> None:
    s, t = torch.randn(2, 264), torch.randn(2, 50257)
    with pytest.raises(KDConfigError, match="student vocabulary 264, teacher vocabulary 50257"):
        align_vocab(s, t)  # too far apart to be padding
    with pytest.raises(KDConfigError, match="different tokenizers"):
        align_vocab(torch.randn(2, 32000), torch.randn(2, 32064), tokenizer_ids_match=False)
    with pytest.raises(KDConfigError, match=r"'gpt2'.*'llama'"):
        check_vocab_sizes(50257, 32000, tokenizer_ids_match=False, student_tokenizer="gpt2", teacher_tokenizer="llama")
    with pytest.raises(KDConfigError, match="tokenizer has 32010 tokens"):
        check_vocab_sizes(32000, 32064, tokenizer_size=32010)
    lm._WARNED_SIZES.clear()
    with pytest.warns(UserWarning):
        assert check_vocab_sizes(264, 50257, tokenizer_ids_match=True) == 264  # declared same ids: sliced


# ------------------------------------------------------------------------- global token normalisation
def _micro_batches(seed: int, valid_per_micro: list[int], vocab: int = 6, tokens: int = 5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n_valid in valid_per_micro:
        x = torch.randn(2, tokens, 4, generator=g, dtype=torch.float64)
        t = torch.randn(2, tokens, vocab, generator=g, dtype=torch.float64)
        mask = torch.zeros(2 * tokens, dtype=torch.bool)
        mask[torch.randperm(2 * tokens, generator=g)[:n_valid]] = True
        out.append((x, t, mask.reshape(2, tokens)))
    return out


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_accumulated_gradient_equals_the_full_batch_mean_over_valid_tokens(name: str) -> None:
    """Simulates Lightning: each micro-batch's return is divided by k and gradients are summed."""
    fn = token_objective(name)
    torch.manual_seed(5)
    head = torch.nn.Linear(4, 6, dtype=torch.float64)
    for valid, k in (([9, 2, 6], 3), ([7, 3], 3)):  # the second is an epoch's last, incomplete group
        micros = _micro_batches(6, valid)
        n_total = sum(int(m.sum()) for _, _, m in micros)
        head.zero_grad()
        for x, t, mask in micros:
            loss = normalize_token_sum(fn(head(x), t, mask=mask, reduction="sum"), n_total, k)
            (loss / k).backward()  # what Lightning's closure does
        accumulated = head.weight.grad.clone()

        head.zero_grad()
        x = torch.cat([m[0] for m in micros])
        t = torch.cat([m[1] for m in micros])
        mask = torch.cat([m[2] for m in micros])
        fn(head(x), t, mask=mask).backward()  # mean over all valid tokens of the group
        assert torch.allclose(accumulated, head.weight.grad, rtol=1e-10, atol=1e-12)

        head.zero_grad()
        for x, t, mask in micros:  # per-micro-batch means: the bug this normalisation fixes
            (fn(head(x), t, mask=mask) / k).backward()
        assert not torch.allclose(head.weight.grad, accumulated, rtol=1e-3)


def test_normalize_token_sum_scales_and_handles_empty_groups() -> None:
    loss = torch.tensor(6.0, requires_grad=True)
    assert normalize_token_sum(loss, torch.tensor(12), accumulate_grad_batches=2, world_size=3).item() == 3.0
    empty = normalize_token_sum(loss, 0)
    assert empty.item() == 6.0 and torch.isfinite(empty)  # a group without tokens has a zero sum anyway
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        normalize_token_sum(loss, 3, accumulate_grad_batches=0)


def _ddp_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(7)  # same initial weights on both ranks
        head = torch.nn.Linear(4, 6, dtype=torch.float64)
        micros = _micro_batches(10 + rank, [[8, 1], [3, 10]][rank])  # ranks hold different token counts
        n_local = sum(int(m.sum()) for _, _, m in micros)
        for x, t, mask in micros:
            loss = normalize_token_sum(forward_kl(head(x), t, mask=mask, reduction="sum"), n_local, 2)
            (loss / 2).backward()
        grad = head.weight.grad.clone()
        torch.distributed.all_reduce(grad)  # DDP: average over ranks
        results[rank] = (grad / world_size).tolist()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_token_counts_are_all_reduced_over_two_gloo_ranks(tmp_path: Path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(7)
    head = torch.nn.Linear(4, 6, dtype=torch.float64)
    micros = _micro_batches(10, [8, 1]) + _micro_batches(11, [3, 10])
    x, t, mask = (torch.cat([m[i] for m in micros]) for i in range(3))
    forward_kl(head(x), t, mask=mask).backward()  # one process, mean over the 22 tokens of both ranks
    assert torch.allclose(torch.tensor(results[0], dtype=torch.float64), head.weight.grad, rtol=1e-10)
    assert results[0] == results[1]
