"""The fast input path: augmented batches gathered from one ``uint8`` tensor held on the device.

No DataLoader, no workers, no per-image Python: the images are padded once (``uint8``, channels-last,
on the GPU when there is one), each batch is one gather (:func:`~kd_lightning.data.views.crop_flip_batch`)
plus a normalisation on the device. An epoch's order and augmentation draws come from a CPU
generator seeded by ``(seed, epoch)`` and move to the device in one copy per epoch, so the stream of
batches is the same on every device. Under DDP the order is sharded like ``DistributedSampler``
(padded to a multiple of the world size, rank ``r`` takes every ``world``-th sample from ``r``), and
a sample's view does not depend on the world size. The augmentation distribution equals the
per-sample path's (crop offsets uniform in ``0 .. 2·padding``, flip with probability ``p_flip``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from kd_lightning.data.views import crop_flip_batch, encode_view
from kd_lightning.errors import KDConfigError

__all__ = ["DeviceImageLoader"]


class _EpochSetter:
    """What Lightning's fit loop sees as ``loader.sampler``: it calls ``set_epoch`` before each epoch."""

    def __init__(self, loader: DeviceImageLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class DeviceImageLoader:
    """An iterable of ``(x, y[, index][, view])`` batches cropped, flipped and normalised on the device.

    Args:
        padded: the padded image stack from :func:`~kd_lightning.data.views.pad_images`
            (``uint8 [N, H+2p, W+2p, C]``), on the device the batches should live on.
        targets: ``[N]`` class indices (moved to ``padded``'s device).
        pool: positions in ``padded`` this loader draws from (a subset after ``hold_out``);
            ``None`` means all. ``index`` in the batches is the position in ``padded``.
        batch_size: samples per batch (per process).
        mean, std: per-channel normalisation, applied as ``(x / 255 - mean) / std`` in float32.
        size: ``(H, W)`` of the output images.
        padding: the pad of ``padded`` (crop offsets are ``0 .. 2·padding``).
        shuffle: reshuffle every epoch (training); ``False`` keeps the pool's order.
        augment: draw a random crop and flip per sample; ``False`` returns the identity view.
        p_flip: flip probability.
        drop_last: drop the last incomplete batch.
        return_index: add each sample's position in ``padded``.
        return_view: add each sample's view id (implies ``return_index``).
        seed: base seed of the per-epoch generator.
        rank, world_size: DDP shard of this process.
    """

    def __init__(
        self,
        padded: Tensor,
        targets: Tensor,
        pool: Tensor | None,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        size: tuple[int, int],
        padding: int,
        shuffle: bool,
        augment: bool,
        p_flip: float = 0.5,
        drop_last: bool = False,
        return_index: bool = False,
        return_view: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise KDConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise KDConfigError(f"rank {rank} is outside world_size {world_size}.")
        self.padded = padded
        self.device = padded.device
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        self.pool = torch.arange(len(padded)) if pool is None else torch.as_tensor(pool, dtype=torch.long).cpu()
        self.batch_size = batch_size
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
        self.size = size
        self.padding = padding
        self.shuffle = shuffle
        self.augment = augment
        self.p_flip = p_flip
        self.drop_last = drop_last
        self.return_view = return_view
        self.return_index = return_index or return_view
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.sampler = _EpochSetter(self)
        self.batch_sampler = None  # DataLoader-like attributes that Lightning inspects
        self._epoch = 0

    # ------------------------------------------------------------------ epochs and sizes
    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order and draws for the next iteration (Lightning calls this each epoch)."""
        self._epoch = int(epoch)

    def _per_rank(self) -> int:
        n = len(self.pool)
        if not self.shuffle:  # evaluation: an exact partition, no padding
            return len(range(self.rank, n, self.world_size))
        return math.ceil(n / self.world_size)

    def __len__(self) -> int:
        m = self._per_rank()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def plan(self, epoch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This rank's ``(indices, dy, dx, flip)`` of ``epoch`` (CPU tensors), before batching."""
        n, p = len(self.pool), self.padding
        if not self.shuffle:
            order = self.pool[self.rank :: self.world_size]
            full = torch.full((len(order),), p, dtype=torch.long)
            return order, full, full.clone(), torch.zeros(len(order), dtype=torch.bool)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
        order = self.pool[torch.randperm(n, generator=generator)]
        total = math.ceil(n / self.world_size) * self.world_size
        if total > n:  # as DistributedSampler: repeat the head so every rank gets as many samples
            order = torch.cat([order, order[: total - n]])
        if self.augment:
            dy = torch.randint(0, 2 * p + 1, (total,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (total,), generator=generator)
            flip = torch.rand(total, generator=generator) < self.p_flip
        else:
            dy = torch.full((total,), p, dtype=torch.long)
            dx = dy.clone()
            flip = torch.zeros(total, dtype=torch.bool)
        shard = slice(self.rank, total, self.world_size)
        return order[shard], dy[shard], dx[shard], flip[shard]

    # ------------------------------------------------------------------ batches
    def batch(self, indices: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> tuple[Tensor, ...]:
        """The batch of the given samples and views (all on the loader's device or movable there)."""
        images = crop_flip_batch(self.padded, indices, dy, dx, flip, self.size, channels_last=True)
        x = (images.to(torch.float32) * (1 / 255) - self.mean) / self.std  # channels-last strides preserved
        idx = indices.to(self.device)
        out: list[Tensor] = [x, self.targets[idx]]
        if self.return_index:
            out.append(idx)
        if self.return_view:
            out.append(encode_view(dy.to(self.device), dx.to(self.device), flip.to(self.device), self.padding))
        return tuple(out)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch = self._epoch
        self._epoch = epoch + 1  # without set_epoch, the next iteration is the next epoch
        indices, dy, dx, flip = self.plan(epoch)
        # One host-to-device copy per epoch for the whole plan.
        plan = torch.stack([indices, dy, dx, flip.long()]).to(self.device, non_blocking=True)
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.batch(plan[0, sl], plan[1, sl], plan[2, sl], plan[3, sl].bool())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(samples={len(self.pool)}, batch_size={self.batch_size}, device={self.device}, "
            f"shuffle={self.shuffle}, augment={self.augment}, rank={self.rank}/{self.world_size})"
        )
