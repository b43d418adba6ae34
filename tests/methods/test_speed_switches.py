"""DistillationModule speed switches: compile_student/compile_teacher, teacher_precision, channels_last."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.errors import KDConfigError
from kd_lightning.methods import VanillaKD
from tests.callbacks.test_logit_cache import TinyCifarNet, _fit, _module
from tests.data_generators import write_fake_cifar100


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, n_train=32, n_test=8)
    return root


@pytest.fixture(scope="module")
def baseline(cifar_root, tmp_path_factory) -> list[float]:
    """Loss sequence of the plain run (fp32 teacher, contiguous layout, eager)."""
    return _fit(tmp_path_factory.mktemp("base"), cifar_root, None, {"return_view": False})[0]


def _losses(tmp_path: Path, root: Path, **switches) -> tuple[list[float], VanillaKD]:
    return _fit(tmp_path, root, None, {"return_view": False}, **switches)


@pytest.mark.parametrize(("precision", "tol"), [("bf16", 3e-2), ("fp16", 3e-3)])
def test_teacher_precision_runs_the_teacher_under_autocast_with_float32_logits(
    precision: str, tol: float, tmp_path: Path, cifar_root, baseline
) -> None:
    module = _module(teacher_precision=precision)
    seen: list[bool] = []
    module.teacher.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    x = torch.randn(4, 3, 32, 32)
    logits = module.teacher_forward(x)
    assert logits.dtype == torch.float32 and seen == [True]
    with torch.no_grad():
        reference = module.teacher(x)  # plain call, outside autocast
    assert seen[-1] is False
    torch.testing.assert_close(logits, reference, rtol=tol, atol=tol)
    losses, _ = _losses(tmp_path, cifar_root, teacher_precision=precision)
    np.testing.assert_allclose(losses, baseline, rtol=tol, atol=tol)


def test_teacher_precision_is_checked() -> None:
    with pytest.raises(KDConfigError, match=r"model.init_args.teacher_precision: must be 'bf16', 'fp16' or null"):
        _module(teacher_precision="fp8")


def test_channels_last_converts_networks_and_inputs_with_equal_results(tmp_path: Path, cifar_root, baseline) -> None:
    losses, module = _losses(tmp_path, cifar_root, channels_last=True)
    np.testing.assert_allclose(losses, baseline, rtol=1e-5, atol=1e-6)
    for network in (module.student, module.teacher):
        assert network.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    formats: list[bool] = []
    module.student.register_forward_hook(
        lambda m, i, o: formats.append(i[0].is_contiguous(memory_format=torch.channels_last))
    )
    module.student(torch.randn(2, 3, 32, 32))  # a contiguous input is converted on the way in
    assert formats == [True]
    plain = TinyCifarNet(width=4)
    plain.load_state_dict(module.student.state_dict())  # checkpoints stay loadable into plain networks


def test_compile_switches_compile_in_place_with_equal_results(tmp_path: Path, cifar_root, baseline) -> None:
    # The eager backend exercises torch.compile's tracing in about a second; inductor is tested (slow) below.
    losses, module = _losses(
        tmp_path, cifar_root, compile_student=True, compile_teacher=True, compile_options={"backend": "eager"}
    )
    np.testing.assert_allclose(losses, baseline, rtol=1e-6, atol=1e-7)
    for network in (module.student, module.teacher):
        assert network._compiled_call_impl is not None  # nn.Module.compile: in place...
    assert all("_orig_mod" not in key for key in module.state_dict())  # ...so checkpoint keys are unchanged


@pytest.mark.slow  # inductor compiles C++ kernels: ~1 min on a shared CPU
def test_compile_with_inductor_gives_equal_results(tmp_path: Path, cifar_root, baseline) -> None:
    losses, _ = _losses(tmp_path, cifar_root, compile_student=True, compile_teacher=True)
    np.testing.assert_allclose(losses, baseline, rtol=1e-4, atol=1e-5)


def test_network_checks_probe_on_the_networks_own_device() -> None:
    # Lightning's setup() runs before the module moves to the accelerator, while module.device already names it.
    module = _module()
    module._device = torch.device("meta")
    module.num_classes = 100
    module.check_networks((3, 32, 32))  # probes on CPU, where the networks are; a meta probe would fail
    bad = VanillaKD(student=nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), teacher=TinyCifarNet())
    bad.num_classes = 100
    with pytest.raises(KDConfigError, match=r"model.init_args.student: Sequential outputs 10 classes"):
        bad.check_networks((3, 32, 32))
