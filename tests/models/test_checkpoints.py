"""Loading teacher weights through the real entry points: distillation checkpoints, published layouts, unsafe files."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.commands import main
from kd_lightning.errors import TeacherCheckpointError, UnsafeCheckpointError
from kd_lightning.methods import VanillaKD
from kd_lightning.models import CIFAR_MODELS, ResNet8, SmallCNN
from kd_lightning.models.checkpoints import load_weights, read_checkpoint, trusted_checkpoints
from tests.data_generators import write_fake_cifar100
from tests.helpers.cli import CONFIGS_DIR, TINY, TINY_DIGITS, fit
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer

QUICKSTART = str(CONFIGS_DIR / "quickstart.yaml")


def _randomised(network: nn.Module, seed: int) -> nn.Module:
    """``network`` with seeded noise on every parameter and new BatchNorm statistics (all of its state is checked)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 1000, (), generator=generator)))
            elif tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return network


def _assert_same_weights(network: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = network.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------------------------ distillation checkpoints
@pytest.fixture(scope="module")
def distillation_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A Lightning checkpoint written by a one-epoch VanillaKD fit: ``student.*`` and ``teachers.teacher.*``."""
    folder = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    student, teacher = TinyNet(), _randomised(TinyNet(), seed=1)
    module = VanillaKD(student=student, teacher=teacher)
    trainer = tiny_trainer(folder, max_steps=2)
    trainer.fit(module, datamodule=BlobsDataModule())
    path = folder / "distill.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("student.") for k in state) and any(k.startswith("teachers.teacher.") for k in state)
    student_state = {k: v.clone() for k, v in module.student.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    # The student trained away from its teacher: the two are told apart.
    assert not torch.equal(student_state["fc.weight"], teacher_state["fc.weight"])
    return path, student_state, teacher_state


def test_auto_refuses_a_distillation_checkpoint(distillation_ckpt: tuple[Path, dict, dict]) -> None:
    path, _, _ = distillation_ckpt
    with pytest.raises(TeacherCheckpointError) as info:
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.init_args.teacher_ckpt: ")
    assert "model.init_args.teacher_ckpt_key: student" in message and "teacher_ckpt_key: teacher" in message


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_explicit_key_loads_that_network(distillation_ckpt: tuple[Path, dict, dict], key: str) -> None:
    path, student_state, teacher_state = distillation_ckpt
    module = VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path), teacher_ckpt_key=key)
    _assert_same_weights(module.teacher, student_state if key == "student" else teacher_state)


@pytest.mark.parametrize("key", ["student", "teacher"])
def test_old_layout_teacher_prefix(tmp_path: Path, distillation_ckpt: tuple[Path, dict, dict], key: str) -> None:
    """Checkpoints of earlier versions stored the teacher as ``teacher.*`` (one teacher, no ModuleDict)."""
    path, student_state, teacher_state = distillation_ckpt
    state = torch.load(path, weights_only=True)["state_dict"]
    old = {k.replace("teachers.teacher.", "teacher.", 1): v for k, v in state.items()}
    assert any(k.startswith("teacher.") for k in old) and not any(k.startswith("teachers.") for k in old)
    torch.save({"state_dict": old, "epoch": 3}, tmp_path / "old.ckpt")
    with pytest.raises(TeacherCheckpointError, match="teacher_ckpt_key"):
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(tmp_path / "old.ckpt"))
    module = VanillaKD(
        student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(tmp_path / "old.ckpt"), teacher_ckpt_key=key
    )
    _assert_same_weights(module.teacher, student_state if key == "student" else teacher_state)


def test_asking_for_an_absent_role_names_the_key(tmp_path: Path) -> None:
    torch.save({"state_dict": {f"student.{k}": v for k, v in TinyNet().state_dict().items()}}, tmp_path / "s.ckpt")
    with pytest.raises(TeacherCheckpointError) as info:
        VanillaKD(
            student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(tmp_path / "s.ckpt"), teacher_ckpt_key="teacher"
        )
    assert "model.init_args.teacher_ckpt_key: teacher" in str(info.value) and "student" in str(info.value)
    # auto takes the only network there is.
    VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(tmp_path / "s.ckpt"))


def test_cli_auto_on_a_distillation_checkpoint_is_one_line(
    distillation_ckpt: tuple[Path, dict, dict], in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A quickstart-shaped distillation checkpoint (the teacher's architecture fits, both roles present).
    teacher = SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=10, dropout=0.2)
    state = {f"teachers.teacher.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"student.{k}": v for k, v in teacher.state_dict().items()})
    torch.save({"state_dict": state}, in_tmp / "distill.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *TINY_DIGITS, f"--model.init_args.teacher_ckpt={in_tmp / 'distill.ckpt'}"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: error:")]
    assert len(err) == 1 and "model.init_args.teacher_ckpt_key: student" in err[0]
    cli = fit(
        [
            "--config",
            QUICKSTART,
            *TINY_DIGITS,
            f"--model.init_args.teacher_ckpt={in_tmp / 'distill.ckpt'}",
            "--model.init_args.teacher_ckpt_key=teacher",
        ]
    )
    _assert_same_weights(cli.model.teacher, teacher.state_dict())


# ------------------------------------------------------------------------------------ published layouts
def _published(name: str, network: nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s state dict with RepDistiller/mdistiller's key names (their classifier name instead of fc)."""
    legacy = type(network).legacy_classifier_prefix
    state = network.state_dict()
    if legacy is None:
        return dict(state)
    renamed = {(legacy + k[len("fc.") :] if k.startswith("fc.") else k): v for k, v in state.items()}
    assert not any(k.startswith("fc.") for k in renamed), name
    return renamed


def _repdistiller_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """What RepDistiller's train_teacher.py / mdistiller save: ``{"epoch", "model", "accuracy", "optimizer"}``."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    torch.save(
        {"epoch": 240, "model": state, "accuracy": torch.tensor(79.42), "optimizer": optimizer.state_dict()}, path
    )
    return path


@pytest.mark.parametrize("name", sorted(CIFAR_MODELS))
def test_published_cifar_teachers_load_through_the_method(tmp_path: Path, name: str) -> None:
    cls = CIFAR_MODELS[name]
    torch.manual_seed(0)
    published = _randomised(cls(num_classes=100), seed=3)
    expected = {k: v.clone() for k, v in published.state_dict().items()}
    path = _repdistiller_file(tmp_path / "ckpt_epoch_240.pth", _published(name, published))
    del published
    module = VanillaKD(student=ResNet8(num_classes=100), teacher=cls(num_classes=100), teacher_ckpt=str(path))
    _assert_same_weights(module.teacher, expected)


@pytest.mark.parametrize("name", ["vgg8", "MobileNetV2", "ShuffleV1"])
def test_published_layout_with_dataparallel_prefix(tmp_path: Path, name: str) -> None:
    cls = CIFAR_MODELS[name]
    published = _randomised(cls(num_classes=100), seed=4)
    expected = {k: v.clone() for k, v in published.state_dict().items()}
    state = {f"module.{k}": v for k, v in _published(name, published).items()}
    torch.save({"model": state}, tmp_path / "teacher.pth")
    _assert_same_weights(load_weights(cls(num_classes=100), tmp_path / "teacher.pth"), expected)


def test_published_teacher_through_the_cli(in_tmp: Path) -> None:
    """``kd fit`` of the CIFAR-100 KD config with a ShuffleV1 teacher saved by RepDistiller (classifier ``linear``)."""
    write_fake_cifar100(in_tmp / "data", n_train=32, n_test=16)
    published = _randomised(CIFAR_MODELS["ShuffleV1"](num_classes=100), seed=5)
    expected = {k: v.clone() for k, v in published.state_dict().items()}
    path = _repdistiller_file(in_tmp / "ShuffleV1_vanilla.pth", _published("ShuffleV1", published))
    cli = fit(
        [
            "--config",
            str(CONFIGS_DIR / "cifar100_kd.yaml"),
            *TINY,
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            f"--data.init_args.root={in_tmp / 'data'}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--model.init_args.teacher=ShuffleNetV1",
            f"--model.init_args.teacher_ckpt={path}",
        ]
    )
    assert type(cli.model.teacher).__name__ == "ShuffleNetV1"
    _assert_same_weights(cli.model.teacher, expected)


# ------------------------------------------------------------------------------------ unsafe and unreadable files
class _Payload:
    """Unpickles to ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def _namespace_ckpt(path: Path, network: nn.Module) -> Path:
    torch.save({"state_dict": network.state_dict(), "args": argparse.Namespace(lr=0.1, arch="tiny")}, path)
    return path


def test_pickled_objects_need_trust(tmp_path: Path) -> None:
    source = _randomised(TinyNet(), seed=6)
    path = _namespace_ckpt(tmp_path / "ns.ckpt", source)
    with pytest.raises(UnsafeCheckpointError) as info:
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith("model.init_args.teacher_ckpt: ")
    assert "--trust_checkpoint true" in message and "argparse.Namespace" in message and "run code" in message
    # Trusted explicitly: it loads.
    assert isinstance(read_checkpoint(path, trust=True)["args"], argparse.Namespace)
    _assert_same_weights(load_weights(TinyNet(), path, trust=True), source.state_dict())
    with trusted_checkpoints():
        module = VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
    _assert_same_weights(module.teacher, source.state_dict())


def test_cli_trust_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _randomised(SmallCNN(in_channels=1, widths=[32, 64, 128], num_classes=10, dropout=0.2), seed=7)
    path = _namespace_ckpt(in_tmp / "ns.ckpt", teacher)
    args = ["--config", QUICKSTART, *TINY_DIGITS, f"--model.init_args.teacher_ckpt={path}"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd: error:")]
    assert len(err) == 1 and "--trust_checkpoint true" in err[0] and str(path) in err[0]
    cli = fit([*args, "--trust_checkpoint=true"])
    _assert_same_weights(cli.model.teacher, teacher.state_dict())


def test_trust_flag_help_names_the_risk() -> None:
    from kd_lightning.models.checkpoints import TRUST_HELP

    assert "weights_only=False" in TRUST_HELP and "runs any code" in TRUST_HELP


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_payload_is_refused_and_never_runs(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    if protocol == 4:
        torch.save({"state_dict": TinyNet().state_dict(), "x": _Payload(marker)}, path)  # zip format
    else:
        torch.save(
            {"state_dict": TinyNet().state_dict(), "x": _Payload(marker)},
            path,
            _use_new_zipfile_serialization=False,
            pickle_protocol=2,
        )
    with pytest.raises(UnsafeCheckpointError, match="--trust_checkpoint"):
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["text", "truncated", "empty", "truncated_safetensors"])
def test_unreadable_file_is_one_line(tmp_path: Path, content: str) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": TinyNet().state_dict()}, good)
    path = tmp_path / ("bad.safetensors" if content == "truncated_safetensors" else "bad.ckpt")
    if content == "text":
        path.write_text("teacher: resnet32x4\naccuracy: 79.4\n")
    elif content == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file(TinyNet().state_dict(), str(tmp_path / "full.safetensors"))
        path.write_bytes((tmp_path / "full.safetensors").read_bytes()[:-100])
    with pytest.raises(TeacherCheckpointError) as info:
        VanillaKD(student=TinyNet(), teacher=TinyNet(), teacher_ckpt=str(path))
    message = str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "\n" not in message and message.startswith("model.init_args.teacher_ckpt: ")
    assert re.search(r"is not a (readable )?checkpoint", message) and str(path) in message


def test_pretrained_folder_kwargs_prefer_safetensors_and_never_unpickle(tmp_path) -> None:
    from kd_lightning.models.checkpoints import pretrained_folder_kwargs

    assert pretrained_folder_kwargs(tmp_path) == {
        "local_files_only": True,
        "use_safetensors": False,
        "weights_only": True,
    }
    assert "weights_only" not in pretrained_folder_kwargs(tmp_path, library="diffusers")  # diffusers' own safe default
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert pretrained_folder_kwargs(tmp_path) == {"local_files_only": True, "use_safetensors": True}


def test_diffusers_reads_a_torch_weights_file_with_weights_only(tmp_path, monkeypatch) -> None:
    """The diffusers path passes no weights_only: diffusers itself must load torch files with weights_only=True."""
    diffusers = pytest.importorskip("diffusers")
    from kd_lightning.errors import KDConfigError
    from kd_lightning.models.checkpoints import pretrained_folder_kwargs

    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(tmp_path, safe_serialization=False)
    assert not any(tmp_path.glob("*.safetensors"))
    calls: list[dict] = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    diffusers.UNet2DModel.from_pretrained(str(tmp_path), **pretrained_folder_kwargs(tmp_path, library="diffusers"))
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)
    with pytest.raises(KDConfigError, match="library"):
        pretrained_folder_kwargs(tmp_path, library="timm")
