"""OPSD token losses: β-JSD against closed-form KLs, masking, teacher top-k restriction, sampled-token gradient."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.opsd import OPSDLoss, opsd_jsd, opsd_sampled_token, restrict_to_teacher_top_k


# ------------------------------------------------------------------------------ plain-Python references
def softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def reference_jsd(s: list[float], t: list[float], beta: float, temperature: float = 1.0) -> float:
    """β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M), M = β·p_T + (1 − β)·p_S; forward / reverse KL at β = 0 / 1."""
    p_s, p_t = softmax(s, temperature), softmax(t, temperature)
    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


S, T = [1.0, 2.0, 0.5], [0.2, 1.0, -0.5]  # student and teacher logits over a 3-token vocabulary
S2, T2 = [0.0, -1.0, 3.0], [2.0, 0.0, 0.0]


def rows(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------ JSD
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.25])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_jsd_matches_closed_form(beta: float, temperature: float) -> None:
    got = opsd_jsd(rows(S, S2), rows(T, T2), beta=beta, temperature=temperature, reduction="none")
    want = [reference_jsd(S, T, beta, temperature), reference_jsd(S2, T2, beta, temperature)]
    assert got.tolist() == pytest.approx(want, rel=1e-10)


def test_jsd_ends_are_forward_and_reverse_kl_and_mixture_orientation() -> None:
    p_s, p_t = softmax(S), softmax(T)
    assert opsd_jsd(rows(S), rows(T), beta=0.0).item() == pytest.approx(kl(p_t, p_s), rel=1e-10)
    assert opsd_jsd(rows(S), rows(T), beta=1.0).item() == pytest.approx(kl(p_s, p_t), rel=1e-10)
    # β weighs the teacher in M: swapping the roles at β is the loss at 1 − β
    assert opsd_jsd(rows(S), rows(T), beta=0.2).item() == pytest.approx(
        opsd_jsd(rows(T), rows(S), beta=0.8).item(), rel=1e-10
    )
    assert opsd_jsd(rows(S), rows(T), beta=0.2).item() != pytest.approx(opsd_jsd(rows(S), rows(T), beta=0.8).item())
    # un-normalised: the symmetric JSD is at most log 2
    big = opsd_jsd(rows([50.0, 0.0, 0.0]), rows([0.0, 50.0, 0.0]), beta=0.5).item()
    assert big == pytest.approx(math.log(2), rel=1e-6)


def test_jsd_zero_when_student_equals_teacher() -> None:
    z = torch.randn(2, 3, 7, dtype=torch.float64)
    for beta in (0.0, 0.5, 1.0):
        assert opsd_jsd(z, z.clone(), beta=beta).abs().item() < 1e-12


def test_masking_ignores_prompt_and_pad_tokens() -> None:
    student = rows(S, S2, [9.0, -9.0, 0.0], [100.0, 0.0, 0.0]).reshape(2, 2, 3)
    teacher = rows(T, [-3.0, 4.0, 1.0], T2, [0.0, 0.0, 100.0]).reshape(2, 2, 3)
    mask = torch.tensor([[True, False], [True, False]])  # tokens (0, 1) and (1, 1) are prompt/padding
    want = [reference_jsd(S, T, 0.5), reference_jsd([9.0, -9.0, 0.0], T2, 0.5)]
    assert opsd_jsd(student, teacher, mask=mask, reduction="sum").item() == pytest.approx(sum(want), rel=1e-10)
    assert opsd_jsd(student, teacher, mask=mask, reduction="mean").item() == pytest.approx(sum(want) / 2, rel=1e-10)
    per_token = opsd_jsd(student, teacher, mask=mask, reduction="none")
    assert per_token[~mask].abs().max().item() == 0.0
    # the masked-out tokens get no gradient
    student.requires_grad_(True)
    opsd_jsd(student, teacher, mask=mask, reduction="sum").backward()
    assert student.grad[~mask].abs().max().item() == 0.0
    assert student.grad[mask].abs().max().item() > 0.0


def test_top_k_restricts_to_the_teachers_entries_and_renormalises() -> None:
    s, t = [0.3, 2.0, -1.0, 1.0], [1.5, -2.0, 0.7, 3.0]  # teacher's top-2: entries 3 and 0
    got = opsd_jsd(rows(s), rows(t), beta=0.5, temperature=1.1, top_k=2).item()
    want = reference_jsd([s[3], s[0]], [t[3], t[0]], 0.5, 1.1)  # renormalised over {3, 0} (order irrelevant)
    assert got == pytest.approx(want, rel=1e-10)
    full = reference_jsd(s, t, 0.5, 1.1)
    assert got != pytest.approx(full)
    # the student's own large logit (entry 1) is outside the teacher's top-2: it does not count
    s_changed = [0.3, -5.0, -1.0, 1.0]
    assert opsd_jsd(rows(s_changed), rows(t), beta=0.5, temperature=1.1, top_k=2).item() == pytest.approx(got)
    assert opsd_jsd(rows(s), rows(t), beta=0.5, top_k=10).item() == pytest.approx(reference_jsd(s, t, 0.5), rel=1e-10)
    s_k, t_k = restrict_to_teacher_top_k(rows(s), rows(t), 2)
    assert t_k.tolist() == [[3.0, 1.5]] and s_k.tolist() == [[1.0, 0.3]]


def test_teacher_gets_no_gradient() -> None:
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    opsd_jsd(s, t, beta=0.5).backward()
    assert t.grad is None and s.grad is not None


# ------------------------------------------------------------------------------ sampled token
def test_sampled_token_value_and_gradient() -> None:
    tau = 1.1
    student = rows(S, S2).requires_grad_(True)
    teacher = rows(T, T2)
    tokens = torch.tensor([1, 2])
    loss, advantage = opsd_sampled_token(student, teacher, tokens, temperature=tau, reduction="sum")
    p_s = [softmax(S, tau), softmax(S2, tau)]
    p_t = [softmax(T, tau), softmax(T2, tau)]
    adv = [math.log(p_t[0][1]) - math.log(p_s[0][1]), math.log(p_t[1][2]) - math.log(p_s[1][2])]
    assert advantage.item() == pytest.approx(sum(adv), rel=1e-10)
    assert loss.item() == pytest.approx(-(adv[0] * math.log(p_s[0][1]) + adv[1] * math.log(p_s[1][2])), rel=1e-10)
    loss.backward()
    # gradient = −A·∇log p_S(r): ∂log softmax(z/τ)_y/∂z = (onehot(y) − p_S)/τ
    for row in range(2):
        onehot = [1.0 if v == tokens[row].item() else 0.0 for v in range(3)]
        want = [-adv[row] * (o - p) / tau for o, p in zip(onehot, p_s[row])]
        assert student.grad[row].tolist() == pytest.approx(want, rel=1e-9)


def test_sampled_token_masking_and_mean() -> None:
    student = torch.randn(2, 3, 6, dtype=torch.float64)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64)
    tokens = torch.tensor([[1, 2, 999], [0, 999, 999]])  # 999: padding id outside the vocabulary, masked
    mask = tokens != 999
    total, _ = opsd_sampled_token(student, teacher, tokens, mask=mask, reduction="sum")
    mean, _ = opsd_sampled_token(student, teacher, tokens, mask=mask, reduction="mean")
    parts = [
        opsd_sampled_token(student[b, i], teacher[b, i], tokens[b, i], reduction="sum")[0].item()
        for b, i in ((0, 0), (0, 1), (1, 0))
    ]
    assert total.item() == pytest.approx(sum(parts), rel=1e-10)
    assert mean.item() == pytest.approx(sum(parts) / 3, rel=1e-10)


# ------------------------------------------------------------------------------ module and arguments
def test_loss_module_terms() -> None:
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    tokens = torch.randint(0, 9, (2, 4))
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    out = OPSDLoss(beta=0.5, temperature=1.1, reduction="sum")(s, t, tokens, mask)
    assert sorted(out) == ["jsd", "loss"]
    assert out["loss"].item() == pytest.approx(
        opsd_jsd(s, t, mask=mask, beta=0.5, temperature=1.1, reduction="sum").item()
    )
    out = OPSDLoss(loss_type="sampled_token", temperature=1.1)(s, t, tokens, mask)
    assert sorted(out) == ["loss", "sampled_token"]
    assert out["loss"].item() == pytest.approx(opsd_sampled_token(s, t, tokens, mask=mask, temperature=1.1)[0].item())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": 1.5}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"temperature": 0.0}, "loss_temperature"),
        ({"top_k": 0}, "top_k_loss"),
        ({"loss_type": "kl"}, "loss_type"),
        ({"loss_type": "sampled_token", "top_k": 5}, "top_k_loss"),
        ({"reduction": "none"}, "reduction"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=field):
        OPSDLoss(**kwargs)
