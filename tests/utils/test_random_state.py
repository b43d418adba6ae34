"""capture_random_state / restore_random_state: every global generator comes back."""

from __future__ import annotations

import random

import numpy as np
import torch

from kd_lightning.utils.random_state import capture_random_state, restore_random_state


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_restored_generators_repeat_their_draws() -> None:
    saved = capture_random_state()
    first = _draws()
    assert _draws() != first  # the generators moved on
    restore_random_state(saved)
    assert _draws() == first
