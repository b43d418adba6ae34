"""LELP: the S·C student check, the statistics pass (order, grouping, augmentation off), its cache and the fit."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch

from kd_lightning.data.base import TensorImageDataset
from kd_lightning.data.transforms import RandomTranslate
from kd_lightning.errors import KDConfigError
from kd_lightning.losses.lelp import aggregate_subclasses, class_subspaces, lelp_kl, subclass_log_targets
from kd_lightning.methods import LELP
from kd_lightning.methods.lelp import augmentation_off
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer

S, C = 3, 2


def make_teacher(seed: int = 0, num_classes: int = C) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes=num_classes, hidden=12)


def trained_teacher(data: BlobsDataModule, steps: int = 60) -> TinyNet:
    """A teacher fitted to the blobs (so that its predictions cover every class)."""
    teacher = make_teacher()
    data.setup("fit")
    x, y = data.train_set.tensors[:2]
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher.eval()


def make(teacher: TinyNet | None = None, **kwargs) -> LELP:
    torch.manual_seed(1)
    defaults = dict(
        student=TinyNet(num_classes=S * C),
        teacher=teacher if teacher is not None else make_teacher(),
        num_subclasses=S,
        stats_cache_dir=None,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    return LELP(**{**defaults, **kwargs})


def blobs(**kwargs) -> BlobsDataModule:
    return BlobsDataModule(**{"num_classes": C, "per_class": 24, "batch_size": 16, **kwargs})


def fit(module: LELP, tmp_path: Path, data: BlobsDataModule | None = None, **trainer_kwargs) -> BlobsDataModule:
    data = data or blobs()
    tiny_trainer(tmp_path, num_sanity_val_steps=0, **trainer_kwargs).fit(module, datamodule=data)
    return data


def embeddings_of(teacher: TinyNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits and the input of its fc, by hand (no taps)."""
    with torch.no_grad():
        hidden = teacher.body(x)
        return teacher.fc(hidden), hidden


# ---------------------------------------------------------------------- arguments and networks
def test_student_must_output_s_times_c_logits() -> None:
    module = make(student=TinyNet(num_classes=C))  # a plain C-way student
    with pytest.raises(KDConfigError, match=r"model\.init_args\.student") as info:
        module.check_data(blobs())
    message = str(info.value)
    assert "S·C = 3·2 = 6" in message and "num_classes: 6" in message
    make().check_data(blobs())  # the S·C student and the C-way teacher pass


def test_teacher_must_output_c_logits() -> None:
    with pytest.raises(KDConfigError, match=r"model\.init_args\.teacher"):
        make(teacher=TinyNet(num_classes=S * C, hidden=12)).check_data(blobs())


def test_too_many_subclasses_for_the_embedding() -> None:
    make(num_subclasses=10, student=TinyNet(num_classes=20))  # 12 − rank W (2) = 10 directions in the null space
    with pytest.raises(KDConfigError, match=r"model.init_args.num_subclasses: S = 11 .*d − rank W = 12 − 2"):
        make(num_subclasses=11, student=TinyNet(num_classes=22))
    make(num_subclasses=12, null_space=False, student=TinyNet(num_classes=24))
    with pytest.raises(KDConfigError, match=r"model.init_args.num_subclasses: S = 13 .*d = 12"):
        make(num_subclasses=13, null_space=False, student=TinyNet(num_classes=26))


def test_too_many_subclasses_for_the_class_sizes(tmp_path: Path) -> None:
    module = make(num_subclasses=4, student=TinyNet(num_classes=8))
    with pytest.raises(KDConfigError, match=r"model.init_args.num_subclasses: S = 4 needs .* class \d has 4"):
        fit(module, tmp_path, blobs(per_class=4))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"compose": "sum"}, "compose"),
        ({"normalize": "l2"}, "normalize"),
        ({"group_by": "cluster"}, "group_by"),
        ({"beta": 0.0}, "beta"),
        ({"temperature": -1.0}, "temperature"),
        ({"ce_weight": -0.5}, "ce_weight"),
        ({"num_subclasses": 0}, "num_subclasses"),
        ({"teacher_classifier": "body.2"}, "teacher_classifier"),  # a BatchNorm, not a Linear
        ({"teacher_classifier": "head"}, "teacher_classifier"),
        ({"teacher_embedding": "nope:input"}, "teacher_embedding"),
        ({"stats_batch_size": 0}, "stats_batch_size"),
    ],
)
def test_bad_arguments_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"model\.init_args\.{field}"):
        make(**kwargs)


def test_many_classes_warn_that_lelp_is_a_few_class_method() -> None:
    module = make(student=TinyNet(num_classes=3 * S), teacher=make_teacher(num_classes=3), max_classes_warning=2)
    with pytest.warns(UserWarning, match="few-class method"):
        module.check_data(blobs(num_classes=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make().check_data(blobs())  # 2 classes: no warning


# ---------------------------------------------------------------------- statistics
@pytest.mark.parametrize("group_by", ["label", "teacher"])
def test_statistics_are_the_pca_of_the_training_embeddings(tmp_path: Path, group_by: str) -> None:
    data = blobs(return_index=True, noise=2.0)  # (x, y, index) batches; overlapping blobs: some teacher errors
    teacher = trained_teacher(data)
    module = make(teacher=copy.deepcopy(teacher), group_by=group_by, stats_seed=5)
    fit(module, tmp_path, data, max_steps=1)
    x, y, _ = data.train_set.tensors
    logits, hidden = embeddings_of(teacher, x)
    groups = y if group_by == "label" else logits.argmax(-1)
    assert int(groups.bincount(minlength=C).min()) > S
    expected = class_subspaces(
        hidden, groups, C, S, null_space=teacher.fc.weight, generator=torch.Generator().manual_seed(5)
    )
    assert module.stats_origin == "computed"
    assert torch.allclose(module.lelp_means, expected.means, atol=1e-5)
    assert torch.allclose(module.lelp_directions, expected.directions, atol=1e-4)
    assert torch.allclose(module.lelp_scale, expected.scale, atol=1e-4)
    assert torch.allclose(module.lelp_projector, expected.projector, atol=1e-6)


def test_statistics_pass_switches_augmentation_off_and_restores_it() -> None:
    augment = RandomTranslate(padding=1)
    dataset = TensorImageDataset(torch.randn(4, 1, 4, 4), torch.zeros(4), transform=augment)
    with augmentation_off(dataset) as kept:
        assert dataset.transform is None and kept == []
        assert torch.equal(dataset[0][0], dataset.images[0])
    assert dataset.transform is augment

    class WithEvalTransform:
        def eval_transform(self):
            return torch.neg

    normalise = torch.nn.Identity()  # neither augmentation-only nor replaceable without an eval transform
    dataset.transform = normalise
    with augmentation_off(dataset, WithEvalTransform()):
        assert torch.equal(dataset[1][0], -dataset.images[1])
    with pytest.warns(UserWarning, match="could not switch off"), augmentation_off(dataset) as kept:
        assert dataset.transform is normalise and len(kept) == 1
    assert dataset.transform is normalise


def test_statistics_are_cached_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "stats"
    teacher = make_teacher()
    first = make(teacher=copy.deepcopy(teacher), stats_cache_dir=str(cache))
    fit(first, tmp_path, max_steps=1)
    files = list(cache.glob("lelp_*.safetensors"))
    assert first.stats_origin == "computed" and len(files) == 1 and first.stats_path == files[0]

    second = make(teacher=copy.deepcopy(teacher), stats_cache_dir=str(cache))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the statistics were recomputed")

    monkeypatch.setattr(second, "compute_statistics", must_not_run)
    fit(second, tmp_path, max_steps=1)
    assert second.stats_origin == "cache" and second.stats_path == files[0]
    for name in ("lelp_means", "lelp_directions", "lelp_scale", "lelp_projector"):
        assert torch.equal(getattr(second, name), getattr(first, name)), name
    monkeypatch.undo()

    other_teacher = make(teacher=make_teacher(seed=7), stats_cache_dir=str(cache))  # other weights: other key
    fit(other_teacher, tmp_path, max_steps=1)
    other_seed = make(teacher=copy.deepcopy(teacher), stats_cache_dir=str(cache), stats_seed=1)
    fit(other_seed, tmp_path, max_steps=1)
    assert other_teacher.stats_origin == other_seed.stats_origin == "computed"
    assert len(list(cache.glob("lelp_*.safetensors"))) == 3


def test_checkpoint_restores_the_statistics_without_recomputing(tmp_path: Path) -> None:
    module = make()
    fit(module, tmp_path, max_steps=1)
    path = tmp_path / "lelp.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    fresh = make()
    assert not bool(fresh.lelp_ready) and fresh.lelp_means.numel() == 0
    checkpoint = torch.load(path, weights_only=True)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert bool(fresh.lelp_ready) and fresh.stats_origin == "checkpoint"
    for name in ("lelp_means", "lelp_directions", "lelp_scale", "lelp_projector"):
        assert torch.equal(getattr(fresh, name), getattr(module, name)), name
    x = torch.randn(5, 1, 4, 4)
    fresh.eval(), module.eval()
    assert torch.allclose(fresh(x), module(x))


# ---------------------------------------------------------------------- training
def test_training_step_loss_and_prediction(tmp_path: Path) -> None:
    module = make(temperature=2.0, ce_weight=0.25, kd_weight=0.5, beta=0.5)
    data = fit(module, tmp_path, max_steps=1)
    module.eval()
    x, y = (t[:8] for t in data.train_set.tensors)
    terms, class_log_probs, targets = module.training_loss((x, y))
    logits = module.student(x)
    teacher_logits, hidden = embeddings_of(module.teacher, x)
    target = subclass_log_targets(hidden, teacher_logits, module.statistics(), 0.5, "product", 2.0)
    assert torch.allclose(terms["kd"], 0.5 * lelp_kl(logits, target, 2.0), atol=1e-6)
    ce = torch.nn.functional.nll_loss(aggregate_subclasses(logits, C, S), y)
    assert torch.allclose(terms["ce"], 0.25 * ce, atol=1e-6)
    assert torch.equal(targets, y) and class_log_probs.shape == (8, C)
    prediction = module(x)  # what validation and test score: class log-probabilities
    assert prediction.shape == (8, C) and torch.allclose(prediction.exp().sum(-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(prediction, class_log_probs, atol=1e-6)
    assert module.export_metadata()["num_subclasses"] == S


def test_gradients_reach_the_student_only_and_the_teacher_stays_frozen(tmp_path: Path) -> None:
    teacher = make_teacher()
    before = copy.deepcopy(teacher.state_dict())
    module = make(teacher=teacher)
    data = fit(module, tmp_path, max_steps=3)
    assert not module.teacher.training
    assert all(not p.requires_grad for p in module.teacher.parameters())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included: eval mode throughout
    module.train()
    assert not module.teacher.training
    x, y = data.train_set.tensors
    terms, *_ = module.training_loss((x[:8], y[:8]))
    terms["loss"].backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_kd_term_is_zero_when_the_student_reproduces_the_target(tmp_path: Path) -> None:
    module = make()
    data = fit(module, tmp_path, max_steps=1)
    x, y = (t[:8] for t in data.train_set.tensors)
    teacher_logits, hidden = embeddings_of(module.teacher, x)
    target = subclass_log_targets(hidden, teacher_logits, module.statistics())
    assert float(module.criterion(target, target, y)["kd"]) < 1e-6


def test_plain_tensor_batches_without_a_datamodule_need_the_statistics() -> None:
    module = make()
    with pytest.raises(RuntimeError, match="not computed yet"):
        module.training_loss((torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])))


# ---------------------------------------------------------------------- CLI
def test_cli_fit_of_the_digits_config(in_tmp: Path) -> None:
    cli = fit_config("digits_lelp.yaml")
    model = cli.model
    assert isinstance(model, LELP) and model.num_subclasses == 4 and model.classes == 2
    assert model.stats_origin == "computed"
    assert model.lelp_directions.shape == (2, 128, 4)  # C, d (fc input of SmallCNN 32-64-128), S
    assert model.stats_path is not None and model.stats_path.is_file()
    assert model.stats_path.parent == in_tmp / "runs" / "lelp_stats"
    results = cli.results
    for name in ("train/loss", "train/kd", "val/acc", "val/teacher_acc"):
        assert name in results, name
    assert "train/ce" not in results  # α = 0
    assert 0.0 <= results["val/acc"] <= 1.0
    assert not model.teacher.training and all(not p.requires_grad for p in model.teacher.parameters())
    again = fit_config("digits_lelp.yaml")  # same (shared, cached) teacher: the statistics come from the cache
    assert again.model.stats_origin == "cache" and again.model.stats_path == model.stats_path
    assert torch.equal(again.model.lelp_directions.cpu(), model.lelp_directions.cpu())
