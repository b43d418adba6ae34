"""The data regimes: labeled + unlabeled split, transfer set, few-class view, the digits web set."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader

from kd_lightning.data import (
    LABELED,
    UNLABELED,
    ClassGroupsDataModule,
    DigitsDataModule,
    DigitsWebDataModule,
    SemiSupervisedDataModule,
    TransferSetDataModule,
)
from kd_lightning.data.base import targets_of
from kd_lightning.data.digits_web import WEB_KINDS, render_web
from kd_lightning.data.semi_supervised import UnlabeledView, labeled_split
from kd_lightning.errors import KDConfigError
from kd_lightning.teachers.fingerprint import teacher_data


def _semi(**kwargs) -> SemiSupervisedDataModule:
    dm = SemiSupervisedDataModule(source=DigitsDataModule(), **kwargs)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------ labeled + unlabeled
def test_labeled_split_is_stratified_seeded_and_disjoint() -> None:
    targets = torch.arange(10).repeat_interleave(20)
    labeled, unlabeled = labeled_split(targets, 0.1, None, seed=3)
    assert torch.bincount(targets[labeled]).tolist() == [2] * 10
    assert set(labeled.tolist()).isdisjoint(unlabeled.tolist()) and len(labeled) + len(unlabeled) == 200
    assert torch.equal(labeled, labeled_split(targets, 0.1, None, seed=3)[0])
    assert not torch.equal(labeled, labeled_split(targets, 0.1, None, seed=4)[0])
    per_class, _ = labeled_split(targets, None, 5, seed=0)
    assert torch.bincount(targets[per_class]).tolist() == [5] * 10


def test_fraction_too_small_for_one_label_per_class_is_an_error() -> None:
    with pytest.raises(KDConfigError, match=r"labeled_fraction.*less than one label"):
        labeled_split(torch.arange(3).repeat_interleave(10), 0.01, None, seed=0)
    with pytest.raises(KDConfigError, match=r"labels_per_class.*no unlabeled item"):
        labeled_split(torch.arange(3).repeat_interleave(10), None, 10, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_labeled_fraction_outside_the_open_unit_interval_is_refused(fraction: float) -> None:
    with pytest.raises(KDConfigError, match=r"labeled_fraction: must be in \(0, 1\)"):
        SemiSupervisedDataModule(source=DigitsDataModule(), labeled_fraction=fraction)


def test_source_must_be_a_classification_data_module() -> None:
    with pytest.raises(KDConfigError, match="source"):
        SemiSupervisedDataModule(source=object())  # type: ignore[arg-type]


def test_epoch_follows_the_unlabeled_pool_and_the_labeled_stream_is_oversampled() -> None:
    dm = _semi(labeled_fraction=0.05, batch_size=8, unlabeled_batch_size=32)
    n_pool = len(dm.unlabeled_set)
    n_labeled = len(dm.labeled_set)
    assert n_labeled + n_pool == len(dm.source.train_set)
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    batches = [item[0] for item in loader]  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
    assert len(batches) == math.ceil(n_pool / 32)
    seen_pool = torch.cat([b[UNLABELED][1] for b in batches])
    assert sorted(seen_pool.tolist()) == list(range(n_pool))  # one pass over the pool
    labeled_count = sum(len(b[LABELED][1]) for b in batches)
    assert labeled_count == len(batches) * 8 > n_labeled  # over-sampled, every step has a full labeled batch


def test_unlabeled_part_carries_no_labels() -> None:
    dm = _semi(labeled_fraction=0.1)
    batch = next(iter(dm.train_dataloader()))[0]
    x_u, index = batch[UNLABELED]
    assert x_u.shape[1:] == (1, 8, 8) and index.dtype == torch.long
    assert len(batch[UNLABELED]) == 2  # inputs and pool positions only
    assert not hasattr(dm.unlabeled_set, "targets")
    with pytest.raises(AttributeError):
        _ = dm.unlabeled_set.targets  # type: ignore[attr-defined]
    # The pool positions say nothing about the label: a re-labelled source serves identical unlabeled items.
    view = UnlabeledView(dm.source.train_set, [0, 1, 2])
    assert view[1][1] == 1 and torch.equal(view[1][0], dm.source.train_set[1][0])


def test_validation_and_test_are_the_sources() -> None:
    dm = _semi()
    assert dm.val_set is dm.source.val_set and dm.test_set is dm.source.test_set
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)


def test_teacher_training_sees_plain_labeled_batches() -> None:
    dm = _semi(labeled_fraction=0.1, teacher_sees="labeled")
    with dm.full_training_set():
        x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 8, 8) and y.dtype == torch.long
    assert dm.teacher_data_key is None and _semi().teacher_data_key == "source"


def test_teacher_fingerprint_of_a_wrapped_run_is_the_sources() -> None:
    source_config = {"class_path": "kd_lightning.data.DigitsDataModule", "init_args": {"batch_size": 64}}
    wrapped = {
        "class_path": "kd_lightning.data.SemiSupervisedDataModule",
        "init_args": {"source": source_config, "labeled_fraction": 0.05, "teacher_sees": "source"},
    }
    dm = SemiSupervisedDataModule(source=DigitsDataModule(), labeled_fraction=0.05)
    part, teacher_dm = teacher_data(wrapped, dm)
    plain, plain_dm = teacher_data(source_config, DigitsDataModule())
    assert part == plain and teacher_dm is dm.source and isinstance(plain_dm, DigitsDataModule)
    labeled_only = SemiSupervisedDataModule(source=DigitsDataModule(), labeled_fraction=0.05, teacher_sees="labeled")
    part, teacher_dm = teacher_data(
        wrapped | {"init_args": {**wrapped["init_args"], "teacher_sees": "labeled"}}, labeled_only
    )
    assert teacher_dm is labeled_only and part != plain


# ------------------------------------------------------------------ few-class view
def test_class_groups_relabel_every_split() -> None:
    dm = ClassGroupsDataModule(source=DigitsDataModule(), class_groups=[[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.classes == ["g0", "g1"]
    source_targets = targets_of(dm.source.train_set)
    assert torch.equal(targets_of(dm.train_set), source_targets % 2)
    _x, y = next(iter(dm.val_dataloader()))
    assert set(y.tolist()) <= {0, 1}
    assert torch.equal(targets_of(dm.test_set), targets_of(dm.source.test_set) % 2)


@pytest.mark.parametrize(
    ("groups", "problem"),
    [
        ([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], "needs at least two groups"),
        ([[0, 1, 2, 3, 4], [5, 6, 7, 8]], r"classes \[9\] are in no group"),
        ([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]], "class 4 is in groups 0 and 1"),
        ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]], "class 10 is not a class id"),
    ],
)
def test_bad_class_groups(groups: list[list[int]], problem: str) -> None:
    with pytest.raises(KDConfigError, match=f"class_groups: {problem}"):
        ClassGroupsDataModule(source=DigitsDataModule(), class_groups=groups)


# ------------------------------------------------------------------ transfer set and the web set
def test_render_web_is_deterministic_and_mixes_the_kinds() -> None:
    images = torch.rand(50, 1, 8, 8)
    targets = torch.arange(50) % 10
    a, kinds = render_web(images, targets, 120, {k: 1.0 for k in WEB_KINDS}, torch.Generator().manual_seed(0))
    b, _ = render_web(images, targets, 120, {k: 1.0 for k in WEB_KINDS}, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (120, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.bincount(kinds, minlength=len(WEB_KINDS)).tolist() == [20] * len(WEB_KINDS)
    inverted = a[kinds == WEB_KINDS.index("inverted")]
    assert inverted.mean() > 0.5  # white background
    _only, only_kinds = render_web(images, targets, 10, {"clutter": 1.0}, torch.Generator().manual_seed(0))
    assert (only_kinds == WEB_KINDS.index("clutter")).all()
    with pytest.raises(KDConfigError, match="mix: unknown kinds"):
        render_web(images, targets, 10, {"cartoon": 1.0}, torch.Generator())


def test_web_set_comes_from_the_digits_training_split_only() -> None:
    web = DigitsWebDataModule(num_images=60, mix={"rotated": 1.0})
    web.setup("fit")
    digits = DigitsDataModule()
    digits.setup("fit")
    # Every rotated web image is a pose of one training image (never of a validation or test image).
    train = (digits.train_set.images * digits.std + digits.mean).round(decimals=4)
    held = torch.cat([digits.val_set.images, digits.test_set.images]) * digits.std + digits.mean
    web_images = web.train_set.images * digits.std + digits.mean

    def poses(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)] + [x.flip(-1)]

    for image in web_images[:10]:
        candidates = [p for q in poses(image) for p in [q]]
        in_train = any(((train - c.round(decimals=4)).abs().amax(dim=(1, 2, 3)) < 1e-3).any() for c in candidates)
        in_held = any(((held - c).abs().amax(dim=(1, 2, 3)) < 1e-3).any() for c in candidates)
        assert in_train and not in_held


def test_transfer_set_serves_inputs_only_and_evaluates_on_the_source() -> None:
    dm = TransferSetDataModule(source=DigitsDataModule(), transfer=DigitsWebDataModule(num_images=100), batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {UNLABELED} and batch[UNLABELED][0].shape == (16, 1, 8, 8)
    assert dm.val_set is dm.source.val_set and dm.num_classes == 10
    assert dm.teacher_data_key == "source" and dm.regime == "unlabeled"
    with dm.full_training_set():
        _x, y = next(iter(dm.train_dataloader()))
    assert y.dtype == torch.long  # a teacher trained through the wrapper sees the source


def test_transfer_set_of_another_input_shape_is_refused() -> None:
    with pytest.raises(KDConfigError, match=r"transfer: DigitsDataModule serves inputs of shape \(3, 32, 32\)"):
        TransferSetDataModule(source=DigitsDataModule(), transfer=DigitsDataModule(as_cifar=True))
