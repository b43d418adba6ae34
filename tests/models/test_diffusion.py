"""DiffusionUNet (models/diffusion.py): diffusers U-Net + schedule, prediction types, guidance, DDIM, pipelines."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from kd_lightning.errors import KDConfigError
from kd_lightning.models.diffusion import (
    DiffusionUNet,
    check_prediction_type,
    ddim_sample,
    to_x0,
    training_target,
)

TINY = {"sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4, "num_train_timesteps": 100}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_targets_and_x0_conversion_are_inverse(prediction_type: str) -> None:
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    alpha = torch.tensor([0.9, 0.5, 0.1]).view(-1, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x_t = alpha * x0 + sigma * eps
    target = training_target(x0, eps, alpha, sigma, prediction_type)
    assert torch.allclose(to_x0(target, x_t, alpha, sigma, prediction_type), x0, atol=1e-5)


def test_schedule_and_targets_match_diffusers() -> None:
    net = DiffusionUNet(**TINY, prediction_type="v_prediction")
    scheduler = net.scheduler
    t = torch.tensor([0, 10, 99])
    alpha, sigma = net.alpha_sigma(t)
    assert alpha.dtype == torch.float64
    assert torch.allclose(alpha**2, scheduler.alphas_cumprod[t].double(), atol=1e-7)
    x0, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    a, s = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    assert torch.allclose(a * x0 + s * eps, scheduler.add_noise(x0, eps, t), atol=1e-5)
    assert torch.allclose(training_target(x0, eps, a, s, "v_prediction"), scheduler.get_velocity(x0, eps, t), atol=1e-5)


def test_forward_shapes_and_null_class() -> None:
    torch.manual_seed(0)
    net = DiffusionUNet(**TINY, num_classes=3).eval()
    assert net.null_class == 3 and net.sample_shape == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([5, 7]), torch.tensor([0, 2]))
        unconditional = net(x, torch.tensor([5, 7]))  # no labels -> the null class
        null = net(x, torch.tensor([5, 7]), torch.tensor([3, 3]))
    assert out.shape == x.shape
    assert torch.allclose(unconditional, null)
    assert not torch.allclose(out, null)


def test_classifier_free_guidance_formula() -> None:
    torch.manual_seed(0)
    net = DiffusionUNet(**TINY, num_classes=3, prediction_type="epsilon").eval()
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([40, 60]), torch.tensor([1, 2])
    with torch.no_grad():
        cond = net.denoise(x, t, c)
        uncond = net.denoise(x, t, None)
        guided = net.denoise(x, t, c, guidance=2.0)
        clipped = net.denoise(x, t, c, guidance=2.0, clip=(-0.5, 0.5))
    assert torch.allclose(guided, 3.0 * cond - 2.0 * uncond, atol=1e-4)
    assert torch.allclose(clipped, guided.clamp(-0.5, 0.5))


def test_ddim_one_step_and_exact_for_a_perfect_denoiser() -> None:
    abar = DiffusionUNet(**TINY).alphas_cumprod
    noise = torch.randn(4, 1, 8, 8)
    calls = []

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.tolist())
        return torch.full_like(x, 0.25)  # all data is the constant image 0.25: x̂_0 is exact

    assert torch.allclose(ddim_sample(denoise, noise, abar, steps=1), torch.full_like(noise, 0.25))
    assert calls == [[99] * 4]
    calls.clear()
    out = ddim_sample(denoise, noise, abar, steps=4)
    assert [c[0] for c in calls] == [99, 74, 50, 25]  # trailing spacing, first call at T
    assert torch.allclose(out, torch.full_like(noise, 0.25))
    with pytest.raises(KDConfigError, match="steps"):
        ddim_sample(denoise, noise, abar, steps=0)


def test_local_pipeline_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    net = DiffusionUNet(**TINY, num_classes=2, prediction_type="v_prediction").eval()
    net.save_pipeline(tmp_path / "pipe")
    loaded = DiffusionUNet(pretrained_path=str(tmp_path / "pipe")).eval()
    assert loaded.prediction_type == "v_prediction" and loaded.num_classes == 2
    assert torch.allclose(loaded.alphas_cumprod, net.alphas_cumprod)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, torch.tensor([0, 1])), net(x, t, torch.tensor([0, 1])), atol=1e-6)
    with pytest.raises(KDConfigError, match="pretrained_path"):
        DiffusionUNet(pretrained_path=str(tmp_path / "missing"))


def test_bad_arguments() -> None:
    with pytest.raises(KDConfigError, match="block_out_channels"):
        DiffusionUNet(sample_size=8, block_out_channels=[6, 16], norm_num_groups=4)
    with pytest.raises(KDConfigError, match="sample_size"):
        DiffusionUNet(sample_size=6, block_out_channels=[8, 16, 16], norm_num_groups=4)
    with pytest.raises(KDConfigError, match="scheduler"):
        DiffusionUNet(**TINY, scheduler="EulerDiscreteScheduler")
    with pytest.raises(KDConfigError, match=r"^teacher\.init_args\.prediction_type: 'flow_prediction' is not"):
        check_prediction_type("flow_prediction", "DDPMScheduler", "teacher.init_args.prediction_type")


def test_diffusers_is_imported_lazily() -> None:
    code = "import sys, kd_lightning.methods.boot, kd_lightning.data.noise; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
