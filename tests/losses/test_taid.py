"""TAID loss and schedule: hand-computed values, the paper's properties, DDP-averaged updates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.losses.taid import TAIDLoss, pending_over_ranks, taid_interpolated_logits, taid_loss


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def cross_entropy(p: list[float], logits: list[float]) -> float:
    q = softmax(logits)
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def entropy(p: list[float]) -> float:
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


S = [1.0, 2.0, 0.5]
T = [0.2, 1.0, -0.5]


def tensors(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def target(s: list[float], t: list[float], coef: float) -> list[float]:
    return softmax([(1 - coef) * a + coef * b for a, b in zip(s, t)])


# ------------------------------------------------------------------------------------------- loss
def test_interpolated_target_and_cross_entropy_hand_computed() -> None:
    p_t = target(S, T, 0.4)
    got_logits = taid_interpolated_logits(tensors(S), tensors(T), 0.4)
    assert got_logits[0].tolist() == pytest.approx([0.6 * a + 0.4 * b for a, b in zip(S, T)])
    assert taid_loss(tensors(S), tensors(T), 0.4).item() == pytest.approx(cross_entropy(p_t, S), rel=1e-9)
    kl = taid_loss(tensors(S), tensors(T), 0.4, objective="forward_kl").item()
    assert kl == pytest.approx(cross_entropy(p_t, S) - entropy(p_t), rel=1e-9)


def test_endpoints_t0_is_the_student_and_t1_the_teacher() -> None:
    s, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    assert taid_loss(s, t, 0.0, objective="forward_kl").item() == pytest.approx(0.0, abs=1e-12)
    teacher_ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert taid_loss(s, t, 1.0).item() == pytest.approx(teacher_ce.item(), rel=1e-9)


def test_target_is_detached_gradient_is_student_softmax_minus_target() -> None:
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    taid_loss(s, t, 0.3).backward()
    p_t = torch.softmax(0.7 * s.detach() + 0.3 * t.detach(), -1)
    expected = (torch.softmax(s.detach(), -1) - p_t) / 3  # sg(z_S) in the target: no gradient through it
    assert torch.allclose(s.grad, expected, atol=1e-12)
    assert t.grad is None


def test_zero_gradient_at_t0() -> None:
    s = torch.randn(2, 4, requires_grad=True)
    taid_loss(s, torch.randn(2, 4), 0.0).backward()
    assert s.grad.abs().max().item() < 1e-6


def test_token_batch_with_mask_averages_valid_tokens_only() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    per_item = taid_loss(s, t, 0.5, reduction="none")
    assert per_item.shape == (2, 3)
    got = taid_loss(s, t, 0.5, mask=mask)
    assert got.item() == pytest.approx(per_item[mask].mean().item(), rel=1e-9)
    s2 = s.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])  # masked tokens do not count
    assert taid_loss(s2, t, 0.5, mask=mask).item() == pytest.approx(got.item(), rel=1e-9)


def test_minus_inf_student_logits_are_left_out_of_the_sum() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5, float("-inf")]], dtype=torch.float64)
    t = torch.tensor([[0.2, 1.0, -0.5, 3.0]], dtype=torch.float64)
    got = taid_loss(s, t, 0.4).item()
    assert math.isfinite(got)
    assert got == pytest.approx(cross_entropy(target(S, T, 0.4), S), rel=1e-9)


def test_module_parts_and_ce_weight() -> None:
    criterion = TAIDLoss(t_start=0.4, distil_ratio=0.9)
    out = criterion(tensors(S), tensors(T), torch.tensor([1]))
    assert out["taid"].item() == pytest.approx(0.9 * cross_entropy(target(S, T, 0.4), S), rel=1e-6)
    assert out["ce"].item() == pytest.approx(0.1 * -math.log(softmax(S)[1]), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["taid"].item() + out["ce"].item(), rel=1e-9)
    assert set(TAIDLoss()(tensors(S), tensors(T))) == {"loss", "taid"}  # official default: no labels


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="t_start and t_end"):
        TAIDLoss(t_start=0.8, t_end=0.5)
    with pytest.raises(ValueError, match="beta"):
        TAIDLoss(beta=1.0)
    with pytest.raises(ValueError, match="distil_ratio"):
        TAIDLoss(distil_ratio=1.5)
    with pytest.raises(ValueError, match="pass target"):
        TAIDLoss(distil_ratio=0.5)(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="do not match"):
        TAIDLoss()(torch.randn(2, 3), torch.randn(2, 4))


# --------------------------------------------------------------------------------------- schedule
def test_first_update_only_records_the_loss_then_hand_computed_step() -> None:
    criterion = TAIDLoss(t_start=0.4, alpha=0.1, beta=0.9)
    criterion.update_t(2.0, progress=0.0)
    assert criterion.t.item() == pytest.approx(0.4)
    assert criterion.momentum.item() == 0.0 and criterion.prev_loss.item() == pytest.approx(2.0)
    criterion.update_t(1.5, progress=0.01)
    delta = (2.0 - 1.5) / 2.0
    momentum = 0.1 * delta
    t_adaptive = 0.4 + 0.1 * (1 / (1 + math.exp(-momentum))) * 0.6
    assert criterion.momentum.item() == pytest.approx(momentum, rel=1e-6)
    assert criterion.t.item() == pytest.approx(max(0.4 + 0.6 * 0.01, t_adaptive), rel=1e-6)
    assert criterion.prev_loss.item() == pytest.approx(1.5)


def test_linear_schedule_wins_when_adaptive_step_is_smaller() -> None:
    criterion = TAIDLoss(t_start=0.2, alpha=1e-6)
    criterion.update_t(1.0, 0.0)
    criterion.update_t(0.9, 0.5)
    assert criterion.t.item() == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-6)


@pytest.mark.parametrize("disable_adaptive", [False, True])
def test_t_is_monotone_never_below_linear_and_capped_on_any_loss_sequence(disable_adaptive: bool) -> None:
    criterion = TAIDLoss(t_start=0.4, t_end=0.95, alpha=0.05, beta=0.9, disable_adaptive=disable_adaptive)
    losses = [3.0, 2.5, 2.0, 2.2, 3.5, 5.0, 4.0, 1.0, 1.0, 0.5, 0.6, 2.0, 8.0, 0.1] * 3  # rises included
    steps = len(losses)
    previous = criterion.t.item()
    for step, loss in enumerate(losses):
        progress = step / steps
        criterion.update_t(loss, progress)
        t = criterion.t.item()
        assert t >= previous - 1e-7, f"t decreased at step {step}"
        assert t <= 0.95 + 1e-7
        if step > 0:
            t_lin = 0.4 + (0.95 - 0.4) * progress
            assert t >= t_lin - 1e-6
            if disable_adaptive:
                assert t == pytest.approx(t_lin, abs=1e-6)
        previous = t
    criterion.update_t(1.0, 1.0)
    assert criterion.t.item() == pytest.approx(0.95)


def test_rising_loss_still_moves_t_up_but_less_than_falling_loss() -> None:
    def after(losses: list[float]) -> float:
        criterion = TAIDLoss(t_start=0.4, alpha=0.1, beta=0.5)
        for loss in losses:
            criterion.update_t(loss, 0.0)
        return criterion.t.item()

    falling, rising = after([4.0, 3.0, 2.0, 1.0]), after([1.0, 2.0, 3.0, 4.0])
    assert 0.4 < rising < falling


def test_update_schedule_averages_the_recorded_micro_batches_and_ignores_eval() -> None:
    criterion = TAIDLoss(t_start=0.4)
    batches = [(torch.randn(4, 5), torch.randn(4, 5)) for _ in range(3)]
    values = [criterion(s, t)["taid"].item() for s, t in batches[:2]]
    criterion.eval()
    criterion(*batches[2])
    criterion.train()
    assert criterion.update_schedule(progress=0.0)
    assert criterion.prev_loss.item() == pytest.approx(sum(values) / 2, rel=1e-6)
    assert criterion.num_updates.item() == 1
    assert not criterion.update_schedule(progress=0.1)  # nothing recorded since: no step
    assert criterion.num_updates.item() == 1


def test_schedule_state_is_in_the_state_dict() -> None:
    state = TAIDLoss().state_dict()
    assert set(state) == {"t", "prev_loss", "momentum", "num_updates"}
    criterion = TAIDLoss(t_start=0.4, alpha=0.2)
    for loss in (2.0, 1.0, 0.5):
        criterion.update_t(loss, 0.1)
    restored = TAIDLoss(t_start=0.4, alpha=0.2)
    restored.load_state_dict(criterion.state_dict())
    assert restored.t.item() == criterion.t.item() > 0.4
    assert restored.momentum.item() == criterion.momentum.item() != 0.0


# ------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # rank 0 recorded nothing, rank 1 two values summing to 6: every rank must still join the all_reduce
        total, count = pending_over_ranks(torch.tensor(6.0) if rank else None, 2 if rank else 0, torch.device("cpu"))
        taid = TAIDLoss(t_start=0.4, alpha=0.5)
        adakd = AdaKDLoss(warmup_fraction=0.0, ema_decay=0.0, loss_tolerance=0.0, ratio_step=0.5)
        # Rank-dependent losses: rank 0 records 1.0 then 4.0, rank 1 records 3.0 then 0.0 (means 2.0, 2.0).
        for taid_value, losses in (((1.0, 3.0), (1.0, 3.0)), ((4.0, 0.0), (4.0, 0.0))):
            taid.record(torch.tensor(taid_value[rank]))
            taid.update_schedule(0.5)
            adakd.record(torch.tensor(losses[rank]))
            adakd.update_schedule(0.5)
        results[rank] = (
            total.item(),
            count.item(),
            taid.prev_loss.item(),
            taid.t.item(),
            adakd.ema.item(),
            adakd.ratio.item(),
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_schedules_step_from_the_loss_averaged_over_two_gloo_ranks(tmp_path: Path) -> None:
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == results[1]  # both ranks hold the same state
    total, count, taid_prev, taid_t, adakd_ema, adakd_ratio = results[0]
    assert (total, count) == (6.0, 2.0)
    assert taid_prev == pytest.approx(2.0)  # (4 + 0) / 2, not a rank's own value
    assert taid_t == pytest.approx(0.4 + 0.6 * 0.5)  # δ = 0: linear schedule is larger than the adaptive step
    assert adakd_ema == pytest.approx(2.0)
    assert adakd_ratio == pytest.approx(1.0)  # same mean twice: no trend, r unchanged
