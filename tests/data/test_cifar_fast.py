"""The fast CIFAR input path (``fast=True``) and the numbered views (``return_view=True``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.data import CIFAR100DataModule
from kd_lightning.data.fast import DeviceImageLoader
from kd_lightning.data.transforms import ToFloatNormalize
from kd_lightning.data.views import IDENTITY_VIEW, apply_view, decode_view, encode_view
from kd_lightning.methods import VanillaKD
from tests.callbacks.test_logit_cache import TinyCifarNet
from tests.data_generators import write_fake_cifar100
from tests.helpers.tiny import tiny_trainer

N_TRAIN = 40


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cifar")
    return root, write_fake_cifar100(root, n_train=N_TRAIN, n_test=12)


def _dm(root: Path, **kwargs) -> CIFAR100DataModule:
    dm = CIFAR100DataModule(root=str(root), batch_size=8, num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


def _reference(dm: CIFAR100DataModule, images: torch.Tensor, index, view) -> torch.Tensor:
    """The per-sample slow path: translate + flip of one image, then ToFloatNormalize."""
    normalize = ToFloatNormalize(dm.mean, dm.std)
    return torch.stack([normalize(apply_view(images[int(i)], int(v))) for i, v in zip(index, view)])


def test_fast_batch_equals_the_slow_path_for_the_same_offsets_and_flips(fake) -> None:
    root, data = fake
    dm = _dm(root, fast=True, return_view=True)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceImageLoader)
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, N_TRAIN, (16,), generator=g)
    dy = torch.tensor([0, 8, 0, 8, 4, 4, *torch.randint(0, 9, (10,), generator=g).tolist()])
    dx = torch.tensor([0, 0, 8, 8, 4, 4, *torch.randint(0, 9, (10,), generator=g).tolist()])
    flip = torch.tensor([0, 1, 0, 1, 0, 1, *torch.randint(0, 2, (10,), generator=g).tolist()]).bool()
    x, y, idx, view = loader.batch(index, dy, dx, flip)
    expected = _reference(dm, data.train_images, index, encode_view(dy, dx, flip))
    assert torch.equal(x, expected)  # bit for bit: same integer pixels, same float ops
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, data.train_targets[index]) and torch.equal(idx, index)
    assert torch.equal(view, encode_view(dy, dx, flip.long()))


def test_an_epoch_of_fast_batches_matches_its_view_ids_and_covers_the_set_once(fake) -> None:
    root, data = fake
    dm = _dm(root, fast=True, return_view=True)
    batches = list(dm.train_dataloader())
    assert len(batches) == N_TRAIN // 8
    index = torch.cat([b[2] for b in batches])
    assert sorted(index.tolist()) == list(range(N_TRAIN))  # a permutation: no sample twice
    for x, y, i, v in batches:
        assert torch.equal(x, _reference(dm, data.train_images, i, v))
        assert torch.equal(y, data.train_targets[i])


def test_epochs_reshuffle_reproducibly_and_follow_set_epoch(fake) -> None:
    root, _ = fake
    L.seed_everything(3, verbose=False)
    loader = _dm(root, fast=True, return_view=True).train_dataloader()
    first = [b[2] for b in loader]
    second = [b[2] for b in loader]  # no set_epoch: the next epoch
    assert not torch.equal(torch.cat(first), torch.cat(second))
    loader.sampler.set_epoch(0)  # what Lightning's fit loop calls
    assert all(torch.equal(a, b[2]) for a, b in zip(first, loader))
    L.seed_everything(3, verbose=False)
    again = _dm(root, fast=True, return_view=True).train_dataloader()
    assert all(torch.equal(a, b[2]) for a, b in zip(first, again))


def test_view_distribution_is_uniform_over_the_162_crop_flip_views(fake) -> None:
    root, _ = fake
    loader = _dm(root, fast=True, return_view=True).train_dataloader()
    counts = torch.zeros(162)
    epochs = 150
    for epoch in range(epochs):
        _, dy, dx, flip = loader.plan(epoch)
        counts += torch.bincount(encode_view(dy, dx, flip), minlength=162).float()
    expected = epochs * N_TRAIN / 162
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 230  # 161 degrees of freedom: p ≈ 0.0003 for 230; a biased draw (e.g. 0..7) is far above
    # The per-sample path draws the same distribution (uniform offsets 0..8, fair flip).
    dm = _dm(root, return_view=True)
    torch.manual_seed(0)
    slow = torch.tensor([dm.view_transform().draw() for _ in range(6000)])
    dy, dx, flip = decode_view(slow)
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9)) and 0.45 < flip.float().mean() < 0.55


def test_ddp_shards_are_disjoint_padded_like_distributed_sampler_and_keep_each_samples_view(fake) -> None:
    root, _ = fake
    dm = _dm(root, fast=True, return_view=True)
    source = dm.train_set
    padded = dm.padded_images(source.images, torch.device("cpu"))

    def loader(rank: int, world: int, pool=None) -> DeviceImageLoader:
        return DeviceImageLoader(
            padded, source.targets, pool, 8, dm.mean, dm.std, (32, 32), 4, shuffle=True, augment=True,
            return_view=True, seed=5, rank=rank, world_size=world,
        )  # fmt: skip

    pool = torch.arange(N_TRAIN - 1)  # 39 samples over 2 ranks: one repeated, as DistributedSampler pads
    plans = [loader(r, 2, pool).plan(0) for r in (0, 1)]
    assert len(plans[0][0]) == len(plans[1][0]) == 20
    together = torch.cat([plans[0][0], plans[1][0]])
    assert set(together.tolist()) == set(range(N_TRAIN - 1)) and len(together) == 40
    single = loader(0, 1).plan(0)
    two = [loader(r, 2).plan(0) for r in (0, 1)]
    view_of = {int(i): int(v) for i, v in zip(single[0], encode_view(*single[1:]))}
    for order, dy, dx, flip in two:  # the world size does not change which view a sample gets
        assert all(view_of[int(i)] == int(v) for i, v in zip(order, encode_view(dy, dx, flip)))


def test_no_augmentation_gives_the_identity_view_and_eval_images(fake) -> None:
    root, data = fake
    dm = _dm(root, fast=True, return_view=True, augment=False)
    x, _, i, v = next(iter(dm.train_dataloader()))
    assert set(v.tolist()) == {IDENTITY_VIEW}
    assert torch.equal(x, dm.eval_transform()(data.train_images[i]))
    assert dm.teacher_view_space().views.tolist() == [IDENTITY_VIEW]


def test_fast_validation_and_test_batches_are_the_normalised_images_in_order(fake) -> None:
    root, data = fake
    dm = _dm(root, fast=True)
    xs, ys = zip(*dm.val_dataloader())
    assert torch.equal(torch.cat(ys), data.test_targets)
    assert torch.equal(torch.cat(xs), dm.eval_transform()(data.test_images))
    assert len(list(dm.test_dataloader())) == 2


def test_return_view_keeps_the_images_of_the_plain_path_for_the_same_seed(fake) -> None:
    root, _ = fake
    torch.manual_seed(0)
    x_plain, y_plain = next(iter(_dm(root).train_dataloader()))
    torch.manual_seed(0)
    x_view, y_view, _, view = next(iter(_dm(root, return_view=True).train_dataloader()))
    assert torch.equal(x_plain, x_view) and torch.equal(y_plain, y_view)
    assert view.dtype == torch.long and ((view >= 0) & (view < 162)).all()


def test_fast_path_respects_hold_out(fake) -> None:
    root, _ = fake
    dm = _dm(root, fast=True, return_index=True)
    held = dm.hold_out(0.25)
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert set(seen.tolist()) == set(range(N_TRAIN)) - set(held.indices)


class _OrderSpy(Callback):
    def __init__(self) -> None:
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        assert batch[0].is_contiguous(memory_format=torch.channels_last)
        self.epochs[-1].extend(batch[2].tolist())


def test_a_fit_on_the_fast_path_reshuffles_every_epoch(fake, tmp_path: Path) -> None:
    root, _ = fake
    L.seed_everything(0, verbose=False)
    module = VanillaKD(TinyCifarNet(), TinyCifarNet(), optimizer=partial(torch.optim.SGD, lr=0.1))
    spy = _OrderSpy()
    dm = CIFAR100DataModule(root=str(root), batch_size=8, fast=True, return_view=True)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[spy], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert len(spy.epochs) == 2 and spy.epochs[0] != spy.epochs[1]
    assert sorted(spy.epochs[0]) == sorted(spy.epochs[1]) == list(range(N_TRAIN))
    assert "val/acc" in trainer.callback_metrics
