"""Token objectives by name (LMDistill's ``objective``): one ``token_sum`` interface, the builder's checks."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.adakd import AdaKDLoss
from kd_lightning.losses.bild import BiLDLoss, DBiLDLoss, logit_difference_kl
from kd_lightning.losses.lm import TOKEN_OBJECTIVES, generalized_jsd
from kd_lightning.losses.lm_objectives import LM_OBJECTIVES, TokenDivergence, build_token_objective
from kd_lightning.losses.taid import TAIDLoss, taid_loss


def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    return torch.randn(2, 3, 11), torch.randn(2, 3, 11), mask


@pytest.mark.parametrize("name", LM_OBJECTIVES)
def test_every_objective_sums_over_the_masked_tokens_only(name: str) -> None:
    s, t, mask = logits()
    objective = build_token_objective(name)
    total = objective.token_sum(s, t, mask)
    changed = s.clone()
    changed[~mask] = torch.randn_like(changed[~mask])  # tokens outside the mask do not count
    assert total.shape == () and torch.isfinite(total)
    torch.testing.assert_close(objective.token_sum(changed, t, mask), total)


def test_divergence_is_the_registry_function_with_reduction_sum() -> None:
    s, t, mask = logits()
    objective = build_token_objective("jsd", {"beta": 0.3}, temperature=2.0)
    assert isinstance(objective, TokenDivergence)
    expected = generalized_jsd(s, t, beta=0.3, temperature=2.0, mask=mask, reduction="mean") * mask.sum()
    torch.testing.assert_close(objective.token_sum(s, t, mask), expected)


def test_loss_objectives_are_the_losses_and_sum_their_terms() -> None:
    s, t, mask = logits()
    assert type(build_token_objective("taid")) is TAIDLoss and type(build_token_objective("adakd")) is AdaKDLoss
    assert type(build_token_objective("dbild", {"k_max": 8})) is DBiLDLoss
    bild = build_token_objective("bild", {"top_k": 4, "kd_weight": 2.0})
    assert type(bild) is BiLDLoss
    ld = [logit_difference_kl(s, t, 4, 3.0, leader, 0.0, mask, reduction="sum") for leader in ("teacher", "student")]
    torch.testing.assert_close(bild.token_sum(s, t, mask), 2.0 * ld[0] + 2.0 * ld[1])
    taid = build_token_objective("taid", {"t_start": 0.3})
    total = taid.token_sum(s, t, mask)
    torch.testing.assert_close(total, taid_loss(s, t, 0.3, mask, reduction="sum"))
    assert taid._pending_count == 1 and torch.allclose(taid._pending_total, total.double() / 3)  # the token mean


def test_adakd_sum_is_the_selected_mean_times_the_valid_tokens() -> None:
    s, t, mask = logits()
    adakd = build_token_objective("adakd", {"latf": False, "idts": False}).eval()
    mean = adakd(s, t, mask=mask)["adakd"]
    torch.testing.assert_close(adakd.token_sum(s, t, mask), mean * 3)
    assert adakd.last_selected_fraction == 1.0


def test_builder_names_the_argument() -> None:
    assert set(TOKEN_OBJECTIVES) < set(LM_OBJECTIVES)
    with pytest.raises(KDConfigError, match=r"^objective: must be one of .*'taid'.*got 'kl'"):
        build_token_objective("kl")
    with pytest.raises(KDConfigError, match=r"^objective_args: kd_ratio is replaced by kd_weight and ce_weight"):
        build_token_objective("adakd", {"kd_ratio": 0.5})
    with pytest.raises(KDConfigError, match=r"^objective_args: temperature is set here\. set temperature instead"):
        build_token_objective("forward_kl", {"temperature": 2.0})
    with pytest.raises(KDConfigError, match=r"^temperature: applies to the divergences, not 'bild'"):
        build_token_objective("bild", temperature=2.0)
    with pytest.raises(KDConfigError, match=r"^temperature: must be a finite number > 0"):
        build_token_objective("forward_kl", temperature=0.0)
    with pytest.raises(KDConfigError, match=r"^objective_args: for 'taid': .*alpha must be >= 0"):
        build_token_objective("taid", {"alpha": -1.0})
    with pytest.raises(KDConfigError, match=r"^objective_args: for 'jsd': .*takes .*'beta'"):
        build_token_objective("jsd", {"alpha": 0.1})
