"""DPO loss: hand-computed values, properties, options, and parity with TRL's DPOTrainer when installed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.dpo import dpo_loss, response_token_logps


def reference_dpo(pc, pr, rc, rr, beta, lc=None, lr=None, norm=False, lam=0.0):
    """Independent formula: log(1 + exp(−β·((pc−rc) − (pr−rr)))) + λ·(−pc/lc), per pair."""
    if norm:
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    z = beta * ((pc - rc) - (pr - rr))
    loss = torch.log1p(torch.exp(-z))
    if lam:
        raw_pc = pc * lc if norm else pc
        loss = loss + lam * (-raw_pc / lc)
    return loss


def test_hand_computed_value() -> None:
    # π_c − ref_c = −1 − (−2) = 1; π_r − ref_r = −3 − (−1) = −2; β = 0.5 → z = 0.5·3 = 1.5
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.5)
    assert out["dpo"].item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["dpo"].item())
    assert out["chosen_reward"].item() == pytest.approx(0.5)
    assert out["rejected_reward"].item() == pytest.approx(-1.0)
    assert out["margin"].item() == pytest.approx(1.5)
    assert "nll" not in out


def test_matches_reference_formula_on_random_logps() -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-(torch.rand(16, generator=g) * 30) for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert torch.allclose(out["loss"], reference_dpo(pc, pr, rc, rr, 0.2), atol=1e-6)
    mean = dpo_loss(pc, pr, rc, rr, beta=0.2, reduction="mean")["loss"]
    total = dpo_loss(pc, pr, rc, rr, beta=0.2, reduction="sum")["loss"]
    assert mean.item() == pytest.approx(out["loss"].mean().item(), abs=1e-6)
    assert total.item() == pytest.approx(out["loss"].sum().item(), abs=1e-5)


def test_log2_when_policy_equals_reference() -> None:
    g = torch.Generator().manual_seed(1)
    pc, pr = -torch.rand(5, generator=g) * 10, -torch.rand(5, generator=g) * 10
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert torch.allclose(out["loss"], torch.full((5,), math.log(2.0)), atol=1e-6)
    assert torch.all(out["margin"] == 0)


def test_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc = torch.tensor([-4.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -6.0], requires_grad=True)
    rc, rr = torch.tensor([-4.5, -2.0]), torch.tensor([-3.0, -5.0])
    dpo_loss(pc, pr, rc, rr, beta=0.1, reduction="sum")["loss"].backward()
    assert torch.all(pc.grad < 0)  # descent increases log π(y⁺)
    assert torch.all(pr.grad > 0)  # descent decreases log π(y⁻)
    # d/dπ_c softplus(−β·Δ) = −β·σ(−β·Δ)
    delta = (pc - rc) - (pr - rr)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-0.1 * delta.detach()), atol=1e-6)
    assert torch.allclose(pr.grad, 0.1 * torch.sigmoid(-0.1 * delta.detach()), atol=1e-6)


def test_reference_gets_no_gradient() -> None:
    rc = torch.tensor([-1.0], requires_grad=True)
    rr = torch.tensor([-2.0], requires_grad=True)
    pc = torch.tensor([-1.5], requires_grad=True)
    dpo_loss(pc, torch.tensor([-2.5]), rc, rr)["loss"].sum().backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None


def test_length_normalisation_hand_checked() -> None:
    # chosen: π −6 over 3 tokens → −2, ref −9/3 = −3 → ratio 1; rejected: π −4/2 = −2, ref −2/2 = −1 → ratio −1
    out = dpo_loss(
        torch.tensor([-6.0]),
        torch.tensor([-4.0]),
        torch.tensor([-9.0]),
        torch.tensor([-2.0]),
        beta=1.0,
        chosen_lengths=torch.tensor([3]),
        rejected_lengths=torch.tensor([2]),
        length_normalize=True,
    )
    assert out["margin"].item() == pytest.approx(2.0)
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)
    # without normalisation the same numbers give margin (−6+9) − (−4+2) = 5
    plain = dpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-2.0]), beta=1.0)
    assert plain["margin"].item() == pytest.approx(5.0)


def test_nll_regulariser() -> None:
    pc, pr = torch.tensor([-6.0, -1.0]), torch.tensor([-3.0, -3.0])
    out = dpo_loss(pc, pr, pc, pr, beta=0.1, chosen_lengths=torch.tensor([3, 4]), nll_weight=0.5)
    assert torch.allclose(out["nll"], torch.tensor([0.5 * 2.0, 0.5 * 0.25]))
    assert torch.allclose(out["loss"], math.log(2.0) + out["nll"])
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (-(torch.rand(6, generator=g) * 20) for _ in range(4))
    lc, lr = torch.randint(1, 9, (6,), generator=g), torch.randint(1, 9, (6,), generator=g)
    for norm in (False, True):
        got = dpo_loss(a, b, c, d, 0.3, lc, lr, length_normalize=norm, nll_weight=0.7)["loss"]
        assert torch.allclose(got, reference_dpo(a, b, c, d, 0.3, lc.float(), lr.float(), norm, 0.7), atol=1e-6)


def test_large_margins_are_finite() -> None:
    out = dpo_loss(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(out["loss"]).all()
    assert out["loss"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert out["loss"][1].item() == pytest.approx(1e4, rel=1e-6)


def test_response_token_logps() -> None:
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    tokens = torch.tensor([[1, 0]])
    got = response_token_logps(logits, tokens, torch.tensor([[True, False]]))
    assert got[0, 0].item() == pytest.approx(math.log(0.5))
    assert got[0, 1].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"reduction": "avg"}, "reduction"),
        ({"length_normalize": True}, "chosen_lengths"),
        ({"nll_weight": 0.1}, "chosen_lengths"),
        ({"length_normalize": True, "chosen_lengths": torch.ones(2)}, "rejected_lengths"),
    ],
)
def test_bad_arguments(kwargs, field) -> None:
    x = torch.zeros(2)
    with pytest.raises(KDConfigError, match=field):
        dpo_loss(x, x, x, x, **kwargs)


def test_shape_mismatch() -> None:
    with pytest.raises(KDConfigError, match="ref_chosen_logps"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2))


# ---------------------------------------------------------------------------------------------- TRL parity
def _trl_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_types, loss_weights):
    """TRL DPOTrainer._compute_loss on given per-token log-probs (stub trainer/model; precomputed reference)."""
    trl = pytest.importorskip("trl")
    compute = getattr(trl.DPOTrainer, "_compute_loss", None)
    if compute is None:
        pytest.skip(f"trl {trl.__version__} has no DPOTrainer._compute_loss")
    rows, length = completion_mask.shape
    shift_mask = completion_mask[:, 1:].float()

    def model(**kwargs):
        zeros = torch.zeros(rows, length - 1)
        return SimpleNamespace(
            log_probs=per_token_logps * shift_mask,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros(rows, length - 1, dtype=torch.bool),
        )

    model.training = True
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    from collections import defaultdict

    stub = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, length, dtype=torch.long),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return compute(stub, model, inputs, return_outputs=False), stub._metrics["train"]


def _random_pairs(pairs: int, length: int, equal_lengths: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * pairs, length - 1, generator=g) * 3
    prompt = 2
    if equal_lengths:
        lens = torch.full((2 * pairs,), length - prompt - 1)
    else:
        lens = torch.randint(1, length - prompt, (2 * pairs,), generator=g)
    pos = torch.arange(length)
    completion = (pos >= prompt) & (pos < prompt + lens.unsqueeze(1))
    logps = (per_token * completion[:, 1:]).sum(1)
    ref = -torch.rand(2 * pairs, generator=g) * 3 * lens
    return per_token, completion, logps, ref, completion.sum(1)


@pytest.mark.parametrize("norm", [False, True])
def test_matches_trl_dpo_trainer(norm: bool) -> None:
    per_token, completion, logps, ref, lens = _random_pairs(4, 9, equal_lengths=False, seed=5)
    ref_c, ref_r = ref.chunk(2)
    loss_type = "sigmoid_norm" if norm else "sigmoid"
    trl_loss, metrics = _trl_loss(per_token, completion, ref_c, ref_r, 0.25, [loss_type], [1.0])
    pc, pr = logps.chunk(2)
    lc, lr = lens.chunk(2)
    ours = dpo_loss(pc, pr, ref_c, ref_r, beta=0.25, chosen_lengths=lc, rejected_lengths=lr, length_normalize=norm)
    assert ours["loss"].mean().item() == pytest.approx(float(trl_loss), abs=1e-6)
    if not norm:  # TRL's logged rewards are the un-normalised β·log-ratios
        assert ours["chosen_reward"].mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
        assert ours["margin"].mean().item() == pytest.approx(metrics["rewards/margins"][-1], abs=1e-5)


def test_nll_matches_trl_sft_term_for_equal_lengths() -> None:
    per_token, completion, logps, ref, lens = _random_pairs(3, 8, equal_lengths=True, seed=7)
    ref_c, ref_r = ref.chunk(2)
    trl_loss, _ = _trl_loss(per_token, completion, ref_c, ref_r, 0.1, ["sigmoid", "sft"], [1.0, 0.4])
    pc, pr = logps.chunk(2)
    ours = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1, chosen_lengths=lens.chunk(2)[0], nll_weight=0.4)
    assert ours["loss"].mean().item() == pytest.approx(float(trl_loss), abs=1e-6)


def test_softplus_form_equals_logsigmoid() -> None:
    z = torch.linspace(-20, 20, 41)
    pc = z.clone()
    out = dpo_loss(pc, torch.zeros(41), torch.zeros(41), torch.zeros(41), beta=1.0)
    assert torch.allclose(out["loss"], -F.logsigmoid(z), atol=1e-6)
