"""TensorMemoryTracker counts what a step allocates: new storages, not views or in-place results."""

from __future__ import annotations

import torch

from kd_lightning.utils.memory import TensorMemoryTracker


def test_the_tracker_counts_new_storages_and_their_release() -> None:
    x = torch.zeros(256, 1024)  # 1 MiB, made before: not counted
    with TensorMemoryTracker() as tracker:
        y = x * 2  # 1 MiB
        view = y[:128]  # a view: nothing new
        y.add_(1)  # in place: nothing new
        z = torch.ones(512, 1024)  # 2 MiB
        assert tracker.live == 3 * 2**20 and tracker.peak == 3 * 2**20
        del z
        assert tracker.live == 2**20
        tracker.reset_peak()
        w = torch.empty(128, 1024)  # 0.5 MiB
        assert tracker.peak == 2**20 + 2**19
    assert view.shape == (128, 1024) and w.numel() == 128 * 1024
