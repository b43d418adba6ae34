"""BOOT (methods/boot.py) on the diffusion task (methods/tasks/diffusion.py) with noise-only data (data/noise.py)."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

pytest.importorskip("diffusers")

from kd_lightning.data import DigitsDataModule, NoiseDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import BOOT, DiffusionSupervised
from kd_lightning.methods.tasks.classification import Supervised
from kd_lightning.methods.tasks.diffusion import DiffusionTeacherTraining
from kd_lightning.models import DiffusionUNet, SmallCNN
from tests.helpers.cli import fit_config

UNET = {"sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4, "num_classes": 10}


def unet(**overrides) -> DiffusionUNet:
    return DiffusionUNet(**{**UNET, "prediction_type": "v_prediction", **overrides})


def noise_data(**kwargs) -> NoiseDataModule:
    args = {"train_size": 16, "val_size": 20, "test_size": 20, "batch_size": 8, **kwargs}
    return NoiseDataModule(source=DigitsDataModule(batch_size=64), **args)


def boot(**kwargs) -> BOOT:
    torch.manual_seed(0)
    args = {
        "student": unet(),
        "teachers": {"diffusion": unet(), "classifier": SmallCNN(widths=[8, 16])},
        "num_steps": 8,
        "optimizer": functools.partial(torch.optim.Adam, lr=1e-3),
        **kwargs,
    }
    return BOOT(**args)


def trainer(**kwargs) -> L.Trainer:
    args = {
        "max_steps": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        **kwargs,
    }
    return L.Trainer(**args)


def test_noise_datamodule_yields_only_noise() -> None:
    dm = noise_data(batch_size=10)
    dm.setup("fit")
    real_images = dm.source.train_set.images.flatten(1)  # type: ignore[union-attr]
    real = torch.cat([real_images, dm.source.val_set.images.flatten(1), dm.source.test_set.images.flatten(1)])  # type: ignore[union-attr]
    batches = [*dm.train_dataloader(), *dm.val_dataloader(), *dm.test_dataloader()]
    for batch in batches:
        assert isinstance(batch, (tuple, list)) and len(batch) == 2
        eps, labels = batch
        assert eps.shape[1:] == (1, 8, 8) and labels.dtype == torch.long
        assert ((labels >= 0) & (labels < 10)).all()
        # No real digit in any batch: every noise sample is far from every real image.
        assert torch.cdist(eps.flatten(1), real).min() > 1.0
    noise = torch.cat([b[0] for b in batches]).flatten()
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1  # N(0, 1)
    # Validation noise is fixed, training noise is new every epoch.
    assert torch.equal(next(iter(dm.val_dataloader()))[0], next(iter(dm.val_dataloader()))[0])
    assert not torch.equal(next(iter(dm.train_dataloader()))[0], next(iter(dm.train_dataloader()))[0])
    # The teacher's data is the source (the kd CLI follows teacher_data_key), the student's loaders are noise.
    assert dm.teacher_data_key == "source" and dm.noise_only
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)


def test_student_starts_from_teacher_and_teacher_stays_frozen(tmp_path) -> None:
    model = boot()
    teacher = model.diffusion_teacher
    for (name, p), q in zip(teacher.state_dict().items(), model.student.state_dict().values()):
        assert torch.equal(p, q), name
    # After the teacher's checkpoint is set (what kd fit does once it trained it), the student is re-initialised.
    other = unet()
    torch.nn.init.normal_(next(other.parameters()))
    torch.save(other.state_dict(), tmp_path / "teacher.pt")
    model.set_teacher_checkpoint("diffusion", tmp_path / "teacher.pt")
    assert torch.equal(next(model.student.parameters()), next(other.parameters()))
    before = {k: v.clone() for k, v in model.teachers.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    trainer().fit(model, datamodule=noise_data())
    assert all(torch.equal(before[k], v) for k, v in model.teachers.state_dict().items())
    assert all(not t.training for t in model.teachers.values())
    assert all(not p.requires_grad for p in model.teachers.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in model.student.state_dict().items())
    assert model.clip_range is not None  # the source's pixel range


def test_one_step_generation_and_teacher_sampler() -> None:
    model = boot().eval()
    dm = noise_data()
    model.check_data(dm)
    eps, labels = next(iter(dm.val_dataloader())) if dm.setup("fit") is None else (None, None)
    calls = []
    hook = model.student.register_forward_hook(lambda m, i, o: calls.append(1))
    images = model.generate(eps, labels)
    hook.remove()
    assert images.shape == eps.shape and len(calls) == 1  # one network call
    lo, hi = model.clip_range
    assert images.min() >= lo and images.max() <= hi
    model.sampler = "teacher"
    model.teacher_steps = 3
    assert torch.allclose(model.generate(eps, labels), model.teacher_sample(eps, labels, 3))


def test_boot_loss_decreases_and_metrics_are_logged() -> None:
    model = boot(teachers={"diffusion": unet(), "classifier": SmallCNN(widths=[8, 16])}, kid_subset_size=8)
    run = trainer(max_steps=4, limit_val_batches=2)
    run.fit(model, datamodule=noise_data())
    metrics = run.callback_metrics
    for key in ("val/fid", "val/kid", "val/acc", "val/ms_per_image", "val/loss", "val/bootstrap", "val/boundary"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["val/fid"]) > 0 and 0 <= float(metrics["val/acc"]) <= 1


def test_ema_is_what_samples() -> None:
    model = boot(ema_decay=0.5)
    trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=noise_data())
    assert model.sampling_network() is model.ema
    assert any(not torch.equal(a, b) for a, b in zip(model.ema.parameters(), model.student.parameters()))


def test_teacher_training_module_picks_the_objective() -> None:
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    assert isinstance(DiffusionTeacherTraining(model=unet(), optimizer=adam), DiffusionSupervised)
    assert isinstance(DiffusionTeacherTraining(model=SmallCNN(widths=[8, 16]), optimizer=adam), Supervised)
    module = DiffusionSupervised(model=unet(), optimizer=adam, ema_decay=None)
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    before = next(module.student.parameters()).clone()
    trainer(max_steps=2, limit_val_batches=1).fit(module, datamodule=dm)
    assert not torch.equal(before, next(module.student.parameters()))
    with pytest.raises(KDConfigError, match="label_smoothing"):
        DiffusionSupervised(model=unet(), label_smoothing=0.1)


def test_bad_inputs() -> None:
    with pytest.raises(KDConfigError) as err:
        boot(teachers={"diffusion": unet(prediction_type="flow_prediction")})
    message = str(err.value)
    assert message.startswith("model.init_args.teachers.diffusion.init_args.prediction_type: 'flow_prediction'")
    assert "DDPMScheduler" in message and "v_prediction" in message and "\n" not in message
    with pytest.raises(KDConfigError, match=r"model\.init_args\.guidance"):
        boot(student=unet(num_classes=None), teachers={"diffusion": unet(num_classes=None)}, guidance=1.0)
    with pytest.raises(KDConfigError, match=r"model\.init_args\.solver"):
        boot(solver="rk4")
    with pytest.raises(KDConfigError, match=r"model\.init_args\.student"):
        boot(student=unet(block_out_channels=[16, 32]))
    with pytest.raises(KDConfigError, match="NoiseDataModule"):  # real images never reach the student
        boot().check_data(DigitsDataModule())


def test_cli_fit_end_to_end() -> None:
    cli = fit_config(
        "digits_boot.yaml",
        "--data.init_args.batch_size=16",
        "--data.init_args.val_size=64",
        "--model.init_args.kid_subset_size=16",
        "--teacher_training.max_steps=3",
    )
    results = cli.results
    for key in ("val/fid", "val/kid", "val/acc", "val/ms_per_image", "val/loss"):
        assert key in results, key
    model = cli.model
    assert isinstance(model, BOOT)
    assert set(model.teacher_ckpt) == {"diffusion", "classifier"}  # both trained once and cached
    assert all(not t.training for t in model.teachers.values())
