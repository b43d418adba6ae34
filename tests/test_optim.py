"""Learning-rate schedules of kd_lightning.optim."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.optim import WarmupMultiStepLR


def rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_warmup_multistep_follows_mmdet_linear_warmup_and_steps() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[6, 8], warmup_steps=4, warmup_ratio=0.001)
    got = rates(scheduler, 10)
    expected = [0.01 * (0.001 + 0.999 * t / 4) for t in range(4)] + [0.01] * 2 + [0.001] * 2 + [0.0001] * 2
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"milestones": [5, 2]}, "milestones"), ({"milestones": [2], "warmup_ratio": 0.0}, "warmup_steps")],
)
def test_warmup_multistep_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(KDConfigError, match=f"^{field}: "):
        WarmupMultiStepLR(optimizer, **kwargs)
