"""TeacherLogitCache: exact per-(image, view) teacher logits, lazy and full builds, refusals, DDP sharing."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from kd_lightning.callbacks import TeacherLogitCache
from kd_lightning.data import CIFAR100DataModule
from kd_lightning.data.transforms import ToFloatNormalize
from kd_lightning.data.views import (
    IDENTITY_VIEW,
    NUM_CROP_FLIP_VIEWS,
    apply_view,
    decode_view,
    encode_view,
)
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import (
    AT,
    BDKD,
    BOOT,
    CRD,
    DHO,
    DKD,
    DMAE,
    FFG2M,
    KD3,
    LELP,
    LLKD,
    OPSD,
    PLD,
    RKD,
    SKD,
    SODA,
    TAID,
    TRG,
    TSDKD,
    AdaKD,
    AlignTI,
    AttributionGuidedNMT,
    BiLD,
    ClassificationDistillation,
    CLoCKDistill,
    DBiLD,
    DecoupledKLDistill,
    DetACAMKD,
    DetCWD,
    DetectionDistillation,
    DetectionSupervised,
    DetFGD,
    DetFPNImitation,
    DetLogitKD,
    DetMGD,
    DetPKD,
    DiffusionDistillation,
    DiffusionSupervised,
    EnsembleKD,
    FitNet,
    GTSelfDistill,
    HierarchicalMirroredKD,
    KLMixingKD,
    LanguageModelDistillation,
    LMDistill,
    LMSupervised,
    LogitStandardKD,
    MaskedImageDistillation,
    MixKD,
    MixSD,
    MSTDistill,
    NodeClassificationDistillation,
    NodeSupervised,
    OnPolicyDistill,
    PolicyDistillation,
    PolicyGradient,
    PolicySupervised,
    ReasoningDistillation,
    ReasoningSupervised,
    RetrievalDistillation,
    RetrievalSupervised,
    SegACAMKD,
    SegCIRKD,
    SegCWD,
    SegmentationDistillation,
    SegmentationSupervised,
    SegPixelKD,
    SemiSupervisedKD,
    Seq2SeqDistillation,
    Seq2SeqKD,
    Seq2SeqSupervised,
    SinKD,
    SparseEnsembleKD,
    Supervised,
    SwingKD,
    SwitchKD,
    TalkingModels,
    TGeoKD,
    VanillaKD,
    VisionLanguageDistillation,
    VLMSupervised,
    VLMTokenKD,
)
from kd_lightning.teachers.logit_cache import ViewLogitStore, teacher_digest
from tests.data_generators import write_fake_cifar100
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer

N_TRAIN = 32


class TinyCifarNet(nn.Module):
    """A few hundred parameters on 3x32x32 inputs, with BatchNorm (so eval mode matters)."""

    def __init__(self, num_classes: int = 100, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class LossRecorder(Callback):
    """Training loss of every step, plus the cache's miss count at the end (to a JSON file if given)."""

    def __init__(self, out: str | None = None) -> None:
        self.losses: list[float] = []
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out is None:
            return
        cache = next((c for c in trainer.callbacks if isinstance(c, TeacherLogitCache)), None)
        payload = {
            "losses": self.losses,
            "misses": cache.misses if cache else None,
            "key": cache.key if cache else None,
        }
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(payload))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=N_TRAIN, n_test=8)
    return root


def _nets(seed: int = 0) -> tuple[TinyCifarNet, TinyCifarNet]:
    torch.manual_seed(seed)
    return TinyCifarNet(width=4), TinyCifarNet(width=8)


def _module(method: type = VanillaKD, seed: int = 0, **kwargs) -> L.LightningModule:
    student, teacher = _nets(seed)
    return method(student=student, teacher=teacher, optimizer=partial(torch.optim.SGD, lr=0.2), **kwargs)


def _data(root: Path, **kwargs) -> CIFAR100DataModule:
    return CIFAR100DataModule(root=str(root), batch_size=8, num_workers=0, **{"return_view": True, **kwargs})


def _fit(tmp_path: Path, root: Path, cache: TeacherLogitCache | None, data_kwargs=None, epochs: int = 2, **kw):
    L.seed_everything(0, verbose=False)
    module = _module(**kw)
    recorder = LossRecorder()
    callbacks = [recorder] + ([cache] if cache is not None else [])
    trainer = tiny_trainer(
        tmp_path, max_epochs=epochs, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0
    )
    trainer.fit(module, datamodule=_data(root, **(data_kwargs or {})))
    return recorder.losses, module


def _expected_rows(root: Path, teacher: nn.Module, index: np.ndarray, view: np.ndarray) -> torch.Tensor:
    """Teacher logits of (index, view) rendered by the per-sample reference path (no batched gather)."""
    dm = _data(root)
    dm.setup("fit")
    normalize = ToFloatNormalize(dm.mean, dm.std)
    images = torch.stack([normalize(apply_view(dm.train_set.images[int(i)], int(v))) for i, v in zip(index, view)])
    with torch.no_grad():
        return teacher.eval()(images)


# ----------------------------------------------------------------------------- view numbering
def test_view_ids_number_all_162_crop_flip_views_and_80_is_the_identity() -> None:
    ids = {encode_view(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)}
    assert ids == set(range(NUM_CROP_FLIP_VIEWS)) and NUM_CROP_FLIP_VIEWS == 162
    assert decode_view(encode_view(3, 7, 1)) == (3, 7, 1)
    assert IDENTITY_VIEW == 80 and decode_view(80) == (4, 4, 0)
    image = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(3, 32, 32)
    assert torch.equal(apply_view(image, IDENTITY_VIEW), image)
    shifted = apply_view(image, encode_view(0, 8, 1))  # window at the top-right of the padded image, mirrored
    assert torch.equal(shifted, torch.nn.functional.pad(image, (4, 4, 4, 4))[:, 0:32, 8:40].flip(-1))


# ----------------------------------------------------------------------------- storage
def test_store_roundtrip_rounds_to_fp16_and_reopens(tmp_path: Path) -> None:
    store = ViewLogitStore.create(tmp_path / "k", 5, 3, 4, meta={"what": "test"})
    assert store.missing() == 15
    logits = torch.tensor([[0.1, -2.0, 3.3333, 1e-4], [5.0, 6.0, 7.0, 8.0]])
    store.write(np.array([4, 0]), np.array([2, 1]), logits)
    assert store.is_filled(np.array([4, 0, 1]), np.array([2, 1, 1])).tolist() == [True, True, False]
    read = torch.from_numpy(store.read(np.array([4, 0]), np.array([2, 1])))
    assert read.dtype == torch.float16 and torch.equal(read, logits.half())
    store.flush()
    again = ViewLogitStore.create(tmp_path / "k", 5, 3, 4, meta={})  # existing folder: reused as it is
    assert again.missing() == 13 and again.meta["what"] == "test"
    with pytest.raises(ValueError, match="shape"):
        ViewLogitStore.create(tmp_path / "k", 6, 3, 4, meta={})
    with pytest.raises(IndexError, match="view 3"):
        store.check_rows(np.array([0]), np.array([3]))


def test_teacher_digest_changes_with_any_weight_or_buffer() -> None:
    net = TinyCifarNet()
    base = teacher_digest(net)
    assert teacher_digest(net) == base
    with torch.no_grad():
        net.features[1].running_mean[0] += 1e-3
    assert teacher_digest(net) != base


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize(("build", "fast"), [("lazy", False), ("full", False), ("lazy", True)])
def test_cached_loss_sequence_equals_online_within_fp16(build: str, fast: bool, tmp_path: Path, cifar_root) -> None:
    data_kwargs = {"fast": fast}
    online, _ = _fit(tmp_path / "online", cifar_root, None, data_kwargs)
    cache = TeacherLogitCache(cache_dir=str(tmp_path / "cache"), build=build, on_device=fast)
    cached, module = _fit(tmp_path / "cached", cifar_root, cache, data_kwargs)
    assert len(online) == len(cached) == 2 * N_TRAIN // 8
    # Only the fp16 rounding of the stored logits differs (it moves these losses by ~1e-6).
    np.testing.assert_allclose(cached, online, rtol=1e-4, atol=1e-5)
    assert cache.lookups == 2 * N_TRAIN
    if build == "full":
        assert cache.misses == 0
    else:
        assert 0 < cache.misses <= 2 * N_TRAIN
    # Every filled row holds the teacher's logits of that exact view (reference: per-sample path).
    store = ViewLogitStore(Path(cache.cache_dir) / cache.key, writable=False)
    index, view = np.nonzero(store.filled)
    if build == "full":
        assert len(index) == N_TRAIN * 162
        pick = np.random.default_rng(0).choice(len(index), size=64, replace=False)
        index, view = index[pick], view[pick]
    expected = _expected_rows(cifar_root, module.teacher, index, view)
    stored = torch.from_numpy(store.read(index, view)).float()
    # The cache's batched teacher forward and the per-sample reference agree in float32 up to rounding (the CPU's
    # kernels may block a batch differently), so a stored fp16 value can sit one fp16 ulp (relative 2^-10) away.
    torch.testing.assert_close(stored, expected.half().float(), rtol=2**-10, atol=1e-6)
    assert module._teacher_logit_source is None  # detached after fit


@pytest.mark.parametrize("method", [TAID, AdaKD], ids=lambda c: c.__name__)
def test_scheduled_methods_follow_the_online_losses_from_the_cache(method: type, tmp_path: Path, cifar_root) -> None:
    """TAID's t and AdaKD's ratio follow the losses, so equal sequences also mean equal schedules."""
    online, online_module = _fit(tmp_path / "online", cifar_root, None, method=method)
    cache = TeacherLogitCache(cache_dir=str(tmp_path / "cache"))
    cached, cached_module = _fit(tmp_path / "cached", cifar_root, cache, method=method)
    assert cache.lookups == 2 * N_TRAIN and cache.misses > 0
    np.testing.assert_allclose(cached, online, rtol=1e-4, atol=1e-5)
    online_state, cached_state = online_module.criterion.state_dict(), cached_module.criterion.state_dict()
    for name, value in online_state.items():
        torch.testing.assert_close(cached_state[name], value, rtol=1e-4, atol=1e-5)


def test_a_second_run_reads_the_lazy_cache_without_running_the_teacher(tmp_path: Path, cifar_root) -> None:
    first = TeacherLogitCache(cache_dir=str(tmp_path / "cache"))
    losses_1, _ = _fit(tmp_path / "a", cifar_root, first)
    second = TeacherLogitCache(cache_dir=str(tmp_path / "cache"))
    losses_2, _ = _fit(tmp_path / "b", cifar_root, second)
    assert second.key == first.key and second.misses == 0  # same seed: the same views, all stored
    assert losses_2 == losses_1  # both read the same fp16 rows: identical


def test_cache_key_follows_teacher_weights_and_teacher_precision(tmp_path: Path, cifar_root) -> None:
    keys = []
    for seed, precision in ((0, None), (1, None), (0, "bf16")):
        cache = TeacherLogitCache(cache_dir=str(tmp_path / "cache"))
        _fit(tmp_path / f"r{seed}{precision}", cifar_root, cache, epochs=1, seed=seed, teacher_precision=precision)
        keys.append(cache.key)
    assert len(set(keys)) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(keys)


# ----------------------------------------------------------------------------- which methods qualify
#: Per method: can a logit cache replace its teacher? (Read from each class; see DistillationModule.)
QUALIFIES = [VanillaKD, DKD, LogitStandardKD, PLD, BiLD, DBiLD, KLMixingKD, SinKD, SKD, AdaKD, TAID]
#: Features (AT, CRD, FitNet, RKD, TRG, DMAE), mixup (MixKD), a trained teacher (BDKD), their own
#: training_loss/step (GTSelfDistill, SwingKD, TGeoKD), and the language-model methods (token batches, no finite
#: view space). AdaKD and TAID override training_step but call the base's: they opt in.
REFUSED = [AT, CRD, FitNet, RKD, TRG, DMAE, MixKD, BDKD, GTSelfDistill, SwingKD, TGeoKD]
REFUSED += [LMDistill, OnPolicyDistill, DecoupledKLDistill, EnsembleKD]
#: The data-regime methods: two-part batches, features, their own heads.
REFUSED += [SemiSupervisedKD, DHO, LLKD, LELP, KD3, TalkingModels]
#: Co-trains its teachers in stage 1 and distils from masked experts.
REFUSED += [MSTDistill]
#: Reasoning methods: responses sampled every step (OPSD, TSD-KD, MixSD) or a text-only teacher (SODA).
REFUSED += [OPSD, TSDKD, SODA, MixSD]
#: Vision-language and translation: the teacher runs on images / through attention (token KD, a switched teacher
#: forward, hidden states and attentions, attribution maps).
REFUSED += [VLMTokenKD, SwitchKD, AlignTI, Seq2SeqKD, AttributionGuidedNMT]
#: Supervised training of one network: no teacher to replace.
NO_TEACHER = [Supervised, LMSupervised, ReasoningSupervised, DetectionSupervised, SegmentationSupervised]
NO_TEACHER += [VLMSupervised, Seq2SeqSupervised, PolicySupervised, PolicyGradient]
#: Task siblings of the core: bases, not methods.
BASES = [
    ClassificationDistillation,
    LanguageModelDistillation,
    ReasoningDistillation,
    MaskedImageDistillation,
    DetectionDistillation,
    SegmentationDistillation,
    NodeClassificationDistillation,
    RetrievalDistillation,
    DiffusionDistillation,
    VisionLanguageDistillation,
    Seq2SeqDistillation,
    PolicyDistillation,
]
#: Dense-prediction methods: their teachers give feature maps and boxes, not per-image class logits.
OTHER_TASKS = [
    DetFPNImitation,
    DetCWD,
    DetPKD,
    DetMGD,
    DetFGD,
    DetLogitKD,
    DetACAMKD,
    CLoCKDistill,
    SegPixelKD,
    SegCWD,
    SegCIRKD,
    SegACAMKD,
    # Graphs, retrieval and diffusion: no per-sample class logits of a view of the batch.
    FFG2M,
    NodeSupervised,
    SparseEnsembleKD,
    RetrievalSupervised,
    BOOT,
    DiffusionSupervised,
    # Embodied policies: batches of environment transitions, teachers that read privileged simulator state.
    HierarchicalMirroredKD,
]


def _bare(cls: type) -> L.LightningModule:
    module = cls.__new__(cls)  # decided from the class alone: no need to build each method
    L.LightningModule.__init__(module)
    student, teacher = _nets()
    module.student = student
    module.teachers = nn.ModuleDict({} if cls in NO_TEACHER else {"teacher": teacher})
    return module


def test_every_method_is_classified_for_the_cache() -> None:
    import kd_lightning.methods as methods

    distillers = {
        getattr(methods, n)
        for n in methods.__all__
        if isinstance(getattr(methods, n), type) and issubclass(getattr(methods, n), methods.DistillationModule)
    } - {methods.DistillationModule}
    classified = set(QUALIFIES) | set(REFUSED) | set(NO_TEACHER) | set(BASES) | set(OTHER_TASKS)
    assert distillers == classified, "classify new methods in QUALIFIES or REFUSED"


@pytest.mark.parametrize("cls", QUALIFIES, ids=lambda c: c.__name__)
def test_logit_only_methods_qualify(cls: type) -> None:
    TeacherLogitCache.check_module(_bare(cls))


@pytest.mark.parametrize("cls", NO_TEACHER, ids=lambda c: c.__name__)
def test_supervised_modules_are_refused_for_having_no_teacher(cls: type) -> None:
    with pytest.raises(KDConfigError, match=f"model {cls.__name__} has no teacher"):
        TeacherLogitCache.check_module(_bare(cls))


@pytest.mark.parametrize("cls", OTHER_TASKS, ids=lambda c: c.__name__)
def test_dense_methods_are_refused_as_not_classification(cls: type) -> None:
    with pytest.raises(KDConfigError, match=f"model {cls.__name__} is not one"):
        TeacherLogitCache.check_module(_bare(cls))


@pytest.mark.parametrize("cls", REFUSED, ids=lambda c: c.__name__)
def test_feature_mixup_and_teacher_training_methods_are_refused(cls: type) -> None:
    with pytest.raises(KDConfigError, match=f"model {cls.__name__} .*trainer.callbacks"):
        TeacherLogitCache.check_module(_bare(cls))


def test_refuses_a_mixup_method_naming_the_fix(tmp_path: Path, cifar_root) -> None:
    student, teacher = _nets()
    module = MixKD(student=student, teacher=teacher)
    trainer = tiny_trainer(tmp_path, callbacks=[TeacherLogitCache(cache_dir=str(tmp_path / "c"))])
    with pytest.raises(KDConfigError, match=r"MixKD overrides training_loss.*Remove TeacherLogitCache"):
        trainer.fit(module, datamodule=_data(cifar_root))


def test_refuses_data_without_numbered_views(tmp_path: Path, cifar_root) -> None:
    cache = TeacherLogitCache(cache_dir=str(tmp_path / "c"))
    with pytest.raises(KDConfigError, match="return_view=true"):
        tiny_trainer(tmp_path, callbacks=[cache]).fit(_module(), datamodule=_data(cifar_root, return_view=False))
    blobs = VanillaKD(student=TinyNet(), teacher=TinyNet())
    with pytest.raises(KDConfigError, match=r"BlobsDataModule does not.*Mixup, CutMix"):
        tiny_trainer(tmp_path, callbacks=[cache]).fit(blobs, datamodule=BlobsDataModule())


def test_refuses_a_custom_transform(tmp_path: Path, cifar_root) -> None:
    class Custom(CIFAR100DataModule):
        def train_transform(self):
            return super().train_transform()

    with pytest.raises(KDConfigError, match=r"overrides train_transform.*return_view=false"):
        Custom(root=str(cifar_root), return_view=True, num_workers=0).setup("fit")


def test_refuses_a_teacher_in_train_mode(tmp_path: Path, cifar_root) -> None:
    class TrainModeTeacher(VanillaKD):
        def on_train_epoch_start(self) -> None:
            self.teacher.train()  # e.g. a method wanting train-mode BatchNorm in its teacher

    student, teacher = _nets()
    module = TrainModeTeacher(student=student, teacher=teacher)
    trainer = tiny_trainer(tmp_path, callbacks=[TeacherLogitCache(cache_dir=str(tmp_path / "c"))], limit_val_batches=0)
    with pytest.raises(KDConfigError, match="train mode"):
        trainer.fit(module, datamodule=_data(cifar_root))


def test_refuses_batches_without_views_at_lookup(tmp_path: Path) -> None:
    cache = TeacherLogitCache(cache_dir=str(tmp_path))
    cache.store = object()  # type: ignore[assignment]
    module = _module()
    with pytest.raises(KDConfigError, match="return_view=true"):
        cache.teacher_logits(module, (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), torch.zeros(2))


# ----------------------------------------------------------------------------- DDP
@pytest.mark.ddp
@pytest.mark.slow  # ~25 s: two spawned processes
def test_two_ddp_ranks_share_one_cache_built_in_shards(tmp_path: Path, cifar_root) -> None:
    out = tmp_path / "losses"
    cache = TeacherLogitCache(cache_dir=str(tmp_path / "cache"), build="full", build_batch_size=512)
    L.seed_everything(0, verbose=False)
    module = _module()
    teacher_state = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[LossRecorder(str(out)), cache],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=_data(cifar_root))
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1  # one cache, made by rank 0, opened by rank 1
    ranks = [json.loads((tmp_path / f"losses.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["key"] == ranks[1]["key"] == folders[0].name
    assert ranks[0]["misses"] == ranks[1]["misses"] == 0  # both read rows built by either rank
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == N_TRAIN // 2 // 8
    store = ViewLogitStore(folders[0], writable=False)
    assert store.missing() == 0  # rank 0 built the even images, rank 1 the odd ones
    teacher = _nets()[1]
    teacher.load_state_dict(teacher_state)
    rows = np.random.default_rng(1).choice(N_TRAIN * 162, size=48, replace=False)
    index, view = rows // 162, rows % 162
    expected = _expected_rows(cifar_root, teacher, index, view)
    torch.testing.assert_close(
        torch.from_numpy(store.read(index, view)).float(), expected.half().float(), rtol=0, atol=1e-6
    )
