"""HierarchicalPolicy: one head per level, top-down conditioning, FiLM on the mission, the view it reads."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.models.policy import HierarchicalPolicy

HIERARCHY = {"manager": {"verb": 4, "color": 7}, "conductor": {"subgoal": 6}, "actor": {"action": 7}}


def observation(batch: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "image": torch.randint(0, 3, (batch, 7, 7, 3), dtype=torch.uint8),
        "mission": torch.tensor([[2, 3, 4, 0, 0]] * batch),
        "privileged": torch.randint(0, 3, (batch, 5, 5, 3), dtype=torch.uint8),
        "privileged_vector": torch.rand(batch, 4),
    }


def test_outputs_every_factor_and_names_the_action() -> None:
    net = HierarchicalPolicy(HIERARCHY, vocab_size=10, width=8, hidden=16)
    out = net(observation())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "manager/verb": (3, 4), "manager/color": (3, 7), "conductor/subgoal": (3, 6), "actor/action": (3, 7)
    }  # fmt: skip
    assert net.action_key == "actor/action" and net.input_key == "image"


def test_actor_is_conditioned_on_the_levels_above_only_when_asked() -> None:
    obs = observation()
    for conditioned in (True, False):
        torch.manual_seed(1)
        net = HierarchicalPolicy(HIERARCHY, vocab_size=10, width=8, hidden=16, condition_on_parents=conditioned)
        before = net(obs)["actor/action"].detach().clone()
        with torch.no_grad():
            net.heads["manager"].bias.add_(torch.randn_like(net.heads["manager"].bias) * 5)
        changed = not torch.allclose(net(obs)["actor/action"], before)
        assert changed is conditioned


def test_mission_modulates_the_features_and_padding_is_ignored() -> None:
    torch.manual_seed(2)
    net = HierarchicalPolicy(HIERARCHY, vocab_size=10, width=8, hidden=16)
    obs = observation(1)
    other = {**obs, "mission": torch.tensor([[5, 6, 7, 0, 0]])}
    longer_padding = {**obs, "mission": torch.tensor([[2, 3, 4, 0, 0, 0, 0]])}
    out, out_other, out_pad = net(obs), net(other), net(longer_padding)
    assert not torch.allclose(out["actor/action"], out_other["actor/action"])
    assert torch.allclose(out["actor/action"], out_pad["actor/action"], atol=1e-6)


def test_privileged_network_reads_the_grid_and_vector_only() -> None:
    net = HierarchicalPolicy(
        HIERARCHY, observation="privileged", input_shape=(5, 5, 3), input_categories=(11, 6, 4), vector_size=4,
        vocab_size=10, width=8, hidden=16,
    )  # fmt: skip
    obs = observation()
    reference = net(obs)["actor/action"]
    assert torch.equal(net({**obs, "image": torch.zeros_like(obs["image"])})["actor/action"], reference)
    changed = net({**obs, "privileged_vector": obs["privileged_vector"] + 1})["actor/action"]
    assert not torch.allclose(changed, reference)


def test_pixels_go_through_the_strided_encoder() -> None:
    net = HierarchicalPolicy({"actor": {"action": 17}}, input_shape=(64, 64, 3), input_categories=None, width=8)
    out = net({"image": torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8), "mission": torch.zeros(2, 4)})
    assert out["actor/action"].shape == (2, 17)


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(KDConfigError, match="hierarchy: needs at least one level"):
        HierarchicalPolicy({})
    with pytest.raises(KDConfigError, match="observation: must be 'image' or 'privileged'"):
        HierarchicalPolicy(HIERARCHY, observation="semantic")  # type: ignore[arg-type]
    with pytest.raises(KDConfigError, match="input_categories: has 2 entries for 3 channels"):
        HierarchicalPolicy(HIERARCHY, input_categories=(11, 6))
