"""Save and restore every global random generator (Python, NumPy, torch CPU and CUDA) around a side job.

Training a teacher or a student-alone baseline inside ``kd fit`` draws random numbers; restoring the states
afterwards makes the distillation run identical whether that side job ran or came from a cache.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_random_state", "restore_random_state"]


def capture_random_state() -> tuple[Any, ...]:
    """The states of Python's, NumPy's and torch's global generators (CUDA ones too when CUDA is available)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore_random_state(state: tuple[Any, ...]) -> None:
    """Put back the generators captured by :func:`capture_random_state`."""
    python, numpy_state, cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
