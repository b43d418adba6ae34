"""Chunked fused LM-head + distillation loss: equal to the naive path in values and gradients, for every objective.

The naive path is ``token_objective(name)(x Wᵀ, teacher logits, mask=...)`` of :mod:`kd_lightning.losses.lm`
differentiated by autograd; the chunked path computes the same loss chunk by chunk with analytic gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.chunked import CHUNK_OBJECTIVES, chunked_distillation_loss
from kd_lightning.losses.lm import TOKEN_OBJECTIVES, token_cross_entropy, token_objective

#: Every objective with a few hyperparameters, the ends of the ranges included.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1e-4}),
    ("jsd", {"beta": 0.3, "normalized": False}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.7}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.7}),
    ("tv", {}),
    ("mixed_kl", {"reverse_weight": 0.25}),
    ("mixed_kl", {"reverse_weight": 1.0}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]

N, H, HT, V = 29, 6, 5, 13


def make(
    dtype: torch.dtype, seed: int = 0, lead: tuple[int, ...] = (N,), scale: float = 2.0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": (scale * torch.randn(*lead, H, generator=gen)).to(dtype),
        "w": torch.randn(V, H, generator=gen).to(dtype),
        "xt": (scale * torch.randn(*lead, HT, generator=gen)).to(dtype),
        "wt": torch.randn(V, HT, generator=gen).to(dtype),
        "mask": torch.rand(*lead, generator=gen) > 0.3,
        "labels": torch.randint(0, V, lead, generator=gen),
    }


def naive(data, name, kwargs, temperature, teacher_logits=None, reduction="mean"):
    x = data["x"].detach().requires_grad_(True)
    w = data["w"].detach().requires_grad_(True)
    t = data["xt"] @ data["wt"].t() if teacher_logits is None else teacher_logits
    loss = token_objective(name, **kwargs)(
        x @ w.t(), t, mask=data["mask"], temperature=temperature, reduction=reduction
    )
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), gx, gw


def chunked(data, name, kwargs, temperature, chunk_size, teacher="hidden", reduction="mean", **extra):
    x = data["x"].detach().requires_grad_(True)
    w = data["w"].detach().requires_grad_(True)
    if teacher == "hidden":
        t = {"teacher_hidden": data["xt"], "teacher_lm_head_weight": data["wt"]}
    else:
        t = {"teacher_logits": data["xt"] @ data["wt"].t()}
    loss = chunked_distillation_loss(
        x,
        w,
        mask=data["mask"],
        objective=name,
        temperature=temperature,
        chunk_size=chunk_size,
        reduction=reduction,
        **t,
        **kwargs,
        **extra,
    )
    gx, gw = torch.autograd.grad(loss, (x, w))
    return loss.detach(), gx, gw


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------ equality with naive
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 64])
def test_float64_values_and_gradients_equal_naive(name, kwargs, chunk_size) -> None:
    data = make(torch.float64)
    ref = naive(data, name, kwargs, 1.7)
    got = chunked(data, name, kwargs, 1.7, chunk_size, teacher="hidden" if chunk_size % 2 else "logits")
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-12, abs=1e-14)
    assert rel(got[1], ref[1]) < 1e-10
    assert rel(got[2], ref[2]) < 1e-10


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_float32_values_and_gradients_equal_naive(name, kwargs) -> None:
    data64 = make(torch.float64, seed=1)
    data32 = {k: (v.float() if v.is_floating_point() else v) for k, v in data64.items()}
    exact = naive(data64, name, kwargs, 1.0)
    ref = naive(data32, name, kwargs, 1.0)
    got = chunked(data32, name, kwargs, 1.0, chunk_size=5)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-5, abs=1e-6)
    assert rel(got[1], ref[1].double()) < 1e-5
    assert rel(got[2], ref[2].double()) < 1e-5
    # and as close to the float64 truth as the naive float32 path is (within a small factor)
    for i in (1, 2):
        assert rel(got[i].double(), exact[i]) < max(4 * rel(ref[i].double(), exact[i]), 1e-6)


def test_three_dimensional_inputs_and_temperature() -> None:
    data = make(torch.float64, seed=2, lead=(3, 7))
    ref = naive(data, "jsd", {"beta": 0.4}, 2.5)
    got = chunked(data, "jsd", {"beta": 0.4}, 2.5, chunk_size=4)
    assert got[1].shape == (3, 7, H)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-12)
    assert rel(got[1], ref[1]) < 1e-10 and rel(got[2], ref[2]) < 1e-10


def test_reduction_sum_is_mean_times_valid_tokens() -> None:
    data = make(torch.float64, seed=3)
    mean = chunked(data, "reverse_kl", {}, 1.0, chunk_size=6)
    total = chunked(data, "reverse_kl", {}, 1.0, chunk_size=6, reduction="sum")
    ref_total = naive(data, "reverse_kl", {}, 1.0, reduction="sum")
    n = int(data["mask"].sum())
    assert total[0].item() == pytest.approx(n * mean[0].item(), rel=1e-12)
    assert total[0].item() == pytest.approx(ref_total[0].item(), rel=1e-12)
    assert rel(total[2], n * mean[2]) < 1e-12 and rel(total[1], ref_total[1]) < 1e-10


def test_cross_entropy_in_the_same_pass() -> None:
    data = make(torch.float64, seed=4)
    labels = data["labels"].clone()
    labels[:3] = -100  # ignored inside the mask too
    x = data["x"].detach().requires_grad_(True)
    w = data["w"].detach().requires_grad_(True)
    logits = x @ w.t()
    t = data["xt"] @ data["wt"].t()
    n = data["mask"].sum()
    kd = token_objective("forward_kl")(logits, t, mask=data["mask"], temperature=3.0, reduction="sum")
    ce = token_cross_entropy(logits, labels, mask=data["mask"], reduction="sum")
    expected = (0.7 * kd + 0.4 * ce) / n
    ref = torch.autograd.grad(expected, (x, w))
    x2 = data["x"].detach().requires_grad_(True)
    w2 = data["w"].detach().requires_grad_(True)
    loss, parts = chunked_distillation_loss(
        x2,
        w2,
        t,
        mask=data["mask"],
        temperature=3.0,
        chunk_size=5,
        kd_weight=0.7,
        labels=labels,
        ce_weight=0.4,
        return_parts=True,
    )
    got = torch.autograd.grad(loss, (x2, w2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert parts["kd"].item() == pytest.approx((kd / n).item(), rel=1e-12)
    assert parts["ce"].item() == pytest.approx((ce / n).item(), rel=1e-12)
    assert rel(got[0], ref[0]) < 1e-10 and rel(got[1], ref[1]) < 1e-10


def test_mask_defaults_to_labels_and_no_ce_without_weight() -> None:
    data = make(torch.float64, seed=5)
    labels = torch.where(data["mask"], data["labels"], torch.full_like(data["labels"], -100))
    t = data["xt"] @ data["wt"].t()
    with_mask = chunked_distillation_loss(data["x"], data["w"], t, mask=data["mask"], chunk_size=8)
    from_labels, parts = chunked_distillation_loss(
        data["x"], data["w"], t, labels=labels, chunk_size=8, return_parts=True
    )
    assert from_labels.item() == pytest.approx(with_mask.item(), rel=1e-14)
    assert set(parts) == {"kd"}  # nothing mixed in by default


def test_hand_computed_two_token_forward_kl() -> None:
    # One hidden unit and W = I-like rows: the student logits are [x, 0], the teacher's [1, 0].
    x = torch.tensor([[2.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)

    def kl(tz: float, sz: float) -> float:
        p = [math.exp(tz) / (math.exp(tz) + 1), 1 / (math.exp(tz) + 1)]
        q = [math.exp(sz) / (math.exp(sz) + 1), 1 / (math.exp(sz) + 1)]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    loss = chunked_distillation_loss(x, w, t, chunk_size=1)
    assert loss.item() == pytest.approx((kl(1, 2) + kl(1, -1)) / 2, rel=1e-12)
    (gx,) = torch.autograd.grad(loss, x)
    # d KL / d s_0 = q_0 − p_0 (through the one hidden unit, weight 1), halved by the mean.
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert gx[:, 0].tolist() == pytest.approx([(sig(2) - sig(1)) / 2, (sig(-1) - sig(1)) / 2], rel=1e-12)


# --------------------------------------------------------------------------------------- gradients' reach
def test_gradients_reach_the_student_only_and_respect_requires_grad() -> None:
    data = make(torch.float64, seed=6)
    x = data["x"].clone().requires_grad_(True)
    w = data["w"].clone()  # frozen head
    xt = data["xt"].clone().requires_grad_(True)
    wt = data["wt"].clone().requires_grad_(True)
    loss = chunked_distillation_loss(x, w, teacher_hidden=xt, teacher_lm_head_weight=wt, mask=data["mask"])
    loss.backward()
    assert x.grad is not None and w.grad is None and xt.grad is None and wt.grad is None
    assert (x.grad[~data["mask"]] == 0).all()
    ref = naive(data, "forward_kl", {}, 1.0)
    assert rel(x.grad, ref[1]) < 1e-10


def test_incoming_gradient_scales_and_no_grad_gives_value_only() -> None:
    data = make(torch.float64, seed=7)
    x = data["x"].clone().requires_grad_(True)
    w = data["w"].clone().requires_grad_(True)
    t = data["xt"] @ data["wt"].t()
    loss = chunked_distillation_loss(x, w, t, mask=data["mask"], objective="tv")
    (3.0 * loss).backward()
    ref = naive(data, "tv", {}, 1.0)
    assert rel(x.grad, 3 * ref[1]) < 1e-10 and rel(w.grad, 3 * ref[2]) < 1e-10
    with torch.no_grad():
        value = chunked_distillation_loss(x, w, t, mask=data["mask"], objective="tv")
    assert not value.requires_grad and value.item() == pytest.approx(loss.item(), rel=1e-14)


def test_all_tokens_masked_gives_zero_loss_and_zero_gradients() -> None:
    data = make(torch.float64, seed=8)
    x = data["x"].clone().requires_grad_(True)
    w = data["w"].clone().requires_grad_(True)
    loss = chunked_distillation_loss(x, w, data["xt"] @ data["wt"].t(), mask=torch.zeros(N, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all() and (w.grad == 0).all()


def test_bfloat16_inputs_compute_in_float32() -> None:
    data = make(torch.float32, seed=9)
    x = data["x"].to(torch.bfloat16).requires_grad_(True)
    w = data["w"].to(torch.bfloat16).requires_grad_(True)
    t = (data["xt"] @ data["wt"].t()).to(torch.bfloat16)
    loss = chunked_distillation_loss(x, w, t, mask=data["mask"], chunk_size=4)
    loss.backward()
    ref = token_objective("forward_kl")(x.float() @ w.float().t(), t.float(), mask=data["mask"])
    assert loss.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert loss.float().item() == pytest.approx(ref.item(), rel=1e-2)


class MaxNumel(TorchDispatchMode):
    """The largest tensor any ATen operation creates (forward and backward; views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, leaf.numel())
        return out


def test_the_token_by_vocabulary_logits_never_exist() -> None:
    n, h, v, chunk = 96, 4, 50, 8
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    xt, wt = torch.randn(n, h), torch.randn(v, h)
    for name, kwargs in CASES:
        with MaxNumel() as mode:
            loss = chunked_distillation_loss(
                x, w, teacher_hidden=xt, teacher_lm_head_weight=wt, objective=name, chunk_size=chunk, **kwargs
            )
            loss.backward()
        assert mode.largest <= chunk * v, (name, mode.largest)
    with MaxNumel() as mode:
        token_objective("forward_kl")(x @ w.t(), xt @ wt.t()).backward()
    assert mode.largest >= n * v  # the naive path does build them


# ------------------------------------------------------------------------------------------------ checks
def test_registry_matches_the_token_objectives() -> None:
    assert set(CHUNK_OBJECTIVES) == set(TOKEN_OBJECTIVES)
    for name, spec in CHUNK_OBJECTIVES.items():
        token_objective(name, **spec.params)  # same hyperparameter names


def test_bad_arguments_are_named() -> None:
    data = make(torch.float32)
    t = data["xt"] @ data["wt"].t()
    with pytest.raises(KDConfigError, match="unknown token objective 'kl'"):
        chunked_distillation_loss(data["x"], data["w"], t, objective="kl")
    with pytest.raises(KDConfigError, match="takes \\['beta', 'normalized'\\]"):
        chunked_distillation_loss(data["x"], data["w"], t, objective="jsd", alpha=0.1)
    with pytest.raises(KDConfigError, match="alpha must be in \\[0, 1\\)"):
        chunked_distillation_loss(data["x"], data["w"], t, objective="skew_kl", alpha=1.0)
    with pytest.raises(ValueError, match="student's LM head has 13 rows and the teacher's vocabulary 14"):
        chunked_distillation_loss(data["x"], data["w"], torch.randn(N, V + 1))
    with pytest.raises(ValueError, match="temperature: must be a finite number > 0"):
        chunked_distillation_loss(data["x"], data["w"], t, temperature=0.0)
    with pytest.raises(ValueError, match="ce_weight > 0 needs labels"):
        chunked_distillation_loss(data["x"], data["w"], t, ce_weight=0.5)
    with pytest.raises(ValueError, match="either teacher_logits or teacher_hidden"):
        chunked_distillation_loss(data["x"], data["w"], t, teacher_hidden=data["xt"], teacher_lm_head_weight=data["wt"])
    with pytest.raises(ValueError, match="teacher is missing"):
        chunked_distillation_loss(data["x"], data["w"])
    with pytest.raises(ValueError, match="mask must have the token shape"):
        chunked_distillation_loss(data["x"], data["w"], t, mask=data["mask"][:-1])
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_distillation_loss(data["x"], data["w"], t, chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        chunked_distillation_loss(data["x"], data["w"], t, reduction="none")


def test_sliced_teacher_logits_are_read_chunk_by_chunk_without_a_copy() -> None:
    # logits[:, :-1, :V] (the shifted teacher of an LM step) cannot be viewed as [N, V]: rows are gathered per chunk.
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 5, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    full = torch.randn(3, 6, V + 2, generator=gen, dtype=torch.float64)
    teacher = full[:, :-1, :V]
    mask = torch.rand(3, 5, generator=gen) > 0.2
    ref = token_objective("reverse_kl")(x @ w.t(), teacher, mask=mask)
    with MaxNumel() as mode:
        loss = chunked_distillation_loss(x, w, teacher, mask=mask, objective="reverse_kl", chunk_size=2)
    assert mode.largest <= max(2 * V, 15 * H) < 15 * V  # chunk logits or the [N, H] hidden-state gradient
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    g1, g2 = torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref, (x, w))
    assert rel(g1[0], g2[0]) < 1e-10 and rel(g1[1], g2[1]) < 1e-10
