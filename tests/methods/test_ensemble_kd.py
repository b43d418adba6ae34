"""Several named teachers through the core: frozen, in eval mode, own checkpoints, trained-if-missing each."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.methods import EnsembleKD
from tests.helpers.cli import fit_config
from tests.helpers.tiny import BlobsDataModule, TinyNet, tiny_trainer


def _teachers() -> dict[str, TinyNet]:
    torch.manual_seed(0)
    return {"wide": TinyNet(hidden=32), "narrow": TinyNet(hidden=8)}


def test_every_teacher_frozen_in_eval_mode_and_only_the_student_learns(tmp_path: Path) -> None:
    module = EnsembleKD(student=TinyNet(), teachers=_teachers())
    before = {n: copy.deepcopy(t.state_dict()) for n, t in module.teachers.items()}
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, datamodule=BlobsDataModule())
    for name, network in module.teachers.items():
        assert not network.training and not any(p.requires_grad for p in network.parameters())
        for key, value in network.state_dict().items():
            assert torch.equal(value, before[name][key]), (name, key)
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.student.parameters()}
    assert "val/teacher_acc" in trainer.callback_metrics and "train/kd" in trainer.callback_metrics


def test_per_teacher_checkpoints_and_name_checks(tmp_path: Path) -> None:
    teachers = _teachers()
    path = tmp_path / "narrow.pt"
    trained = TinyNet(hidden=8)
    torch.save(trained.state_dict(), path)
    module = EnsembleKD(student=TinyNet(), teachers=teachers, teacher_ckpt={"narrow": str(path)})
    for key, value in trained.state_dict().items():
        assert torch.equal(module.teachers["narrow"].state_dict()[key], value)
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_ckpt: names unknown teachers \['other'\]"):
        EnsembleKD(student=TinyNet(), teachers=_teachers(), teacher_ckpt={"other": str(path)})
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_weights: names \['wide'\]"):
        EnsembleKD(student=TinyNet(), teachers=_teachers(), teacher_weights={"wide": 1.0})
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher: EnsembleKD distils from a teacher"):
        EnsembleKD(student=TinyNet(), teachers={})


def test_cli_trains_each_missing_teacher_once_and_reuses_them(in_tmp: Path) -> None:
    cache = in_tmp / "teachers"
    first = fit_config("digits_ensemble_kd.yaml", f"--teacher_training.cache_dir={cache}")
    paths = first.model.teacher_ckpt
    assert isinstance(paths, dict) and set(paths) == {"cnn", "narrow"} and paths["cnn"] != paths["narrow"]
    assert all(Path(p).is_file() for p in paths.values())
    assert len([p for p in cache.iterdir() if p.is_dir() and not p.name.endswith(".logs")]) == 2
    second = fit_config("digits_ensemble_kd.yaml", f"--teacher_training.cache_dir={cache}")
    assert second.model.teacher_ckpt == paths
    for name in paths:
        for key, value in first.model.teachers[name].state_dict().items():
            assert torch.equal(value, second.model.teachers[name].state_dict()[key]), (name, key)
