"""Pixel diffusion networks (pure torch + diffusers): a U-Net with its noise schedule, conversions between the
prediction types, classifier-free guidance and deterministic DDIM sampling.

:class:`DiffusionUNet` wraps diffusers' ``UNet2DModel`` (built from plain arguments, or loaded from a local
pipeline folder: nothing is downloaded) together with the variance-preserving noise schedule of a diffusers
scheduler built from its config (``DDPMScheduler`` / ``DDIMScheduler``): ``x_t = α_t x_0 + σ_t ε`` with
``α_t² = ᾱ_t`` (the scheduler's ``alphas_cumprod``) and ``σ_t² = 1 − ᾱ_t``. Its ``forward(x_t, t, class_labels)``
returns the raw prediction of its ``prediction_type``; :meth:`DiffusionUNet.denoise` turns it into the data
prediction ``x̂_0`` (``epsilon``: ``(x_t − σ_t ε̂)/α_t``; ``v_prediction``: ``α_t x_t − σ_t v̂``; ``sample``: as is).

Class conditioning (``num_classes``) uses the U-Net's class embedding with one extra *null* class (id
``num_classes``) for classifier-free guidance: ``x̂_0 = (1 + w)·x̂_0(x, t, c) − w·x̂_0(x, t, ∅)`` (Ho & Salimans, 2022).

diffusers is imported when a network is built (the ``diffusion`` extra), not when this module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.models.checkpoints import pretrained_folder_kwargs

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "DiffusionUNet",
    "check_prediction_type",
    "ddim_sample",
    "is_diffusion_network",
    "to_x0",
]

#: The prediction types a diffusers DDPM/DDIM scheduler supports, by scheduler class.
SCHEDULERS: dict[str, tuple[str, ...]] = {
    "DDPMScheduler": ("epsilon", "v_prediction", "sample"),
    "DDIMScheduler": ("epsilon", "v_prediction", "sample"),
}
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:  # pragma: no cover - the extra is installed in the test environment
        raise KDConfigError(
            "DiffusionUNet", "needs the diffusers library", "pip install 'kd-lightning[diffusion]'"
        ) from None
    return diffusers


def check_prediction_type(prediction_type: str, scheduler: str, field: str = "prediction_type") -> None:
    """The scheduler must support the prediction type.

    Raises:
        KDConfigError: naming ``field``, the scheduler and the supported types.
    """
    supported = SCHEDULERS.get(scheduler)
    if supported is None:
        raise KDConfigError(
            field.rsplit(".", 1)[0] + ".scheduler" if "." in field else "scheduler",
            f"unknown scheduler {scheduler!r}",
            f"choose one of {', '.join(SCHEDULERS)}",
        )
    if prediction_type not in supported:
        raise KDConfigError(
            field,
            f"{prediction_type!r} is not a prediction type {scheduler} supports ({', '.join(supported)})",
            f"set it to the objective the network was trained with: one of {', '.join(supported)}",
        )


def to_x0(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The data prediction ``x̂_0`` from a network output of ``prediction_type`` at ``x_t = α x_0 + σ ε``.

    ``alpha``/``sigma`` broadcast against ``x_t`` (e.g. ``[B, 1, 1, 1]``).
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * output
    if prediction_type == "sample":
        return output
    raise KDConfigError("prediction_type", f"unknown prediction type {prediction_type!r}", f"one of {PREDICTION_TYPES}")


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """What a network of ``prediction_type`` regresses: ``ε``, ``v = α ε − σ x_0`` or ``x_0``."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise KDConfigError("prediction_type", f"unknown prediction type {prediction_type!r}", f"one of {PREDICTION_TYPES}")


def is_diffusion_network(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusion network (has a noise schedule and a ``denoise``)."""
    return isinstance(module, DiffusionUNet) or (hasattr(module, "denoise") and hasattr(module, "alphas_cumprod"))


class DiffusionUNet(nn.Module):
    """diffusers ``UNet2DModel`` + a diffusers scheduler's noise schedule; ``forward`` gives the raw prediction.

    Args:
        sample_size: image side (8 for the digits).
        in_channels: image channels (output channels are the same).
        block_out_channels: channels of each resolution level (its length is the number of down blocks).
        layers_per_block: ResNet layers per block.
        norm_num_groups: GroupNorm groups (must divide every channel count).
        attention: attention in the middle block.
        num_classes: class-conditional with this many classes (plus a null class ``num_classes`` for
            classifier-free guidance); ``None``: unconditional.
        prediction_type: what the network predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        scheduler: the diffusers scheduler whose config defines the schedule (``"DDPMScheduler"`` or
            ``"DDIMScheduler"``).
        num_train_timesteps: discrete timesteps of the schedule.
        beta_schedule: diffusers ``beta_schedule`` (``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``).
        beta_start: first β.
        beta_end: last β.
        pretrained_path: a local diffusers pipeline folder (``unet/`` and ``scheduler/`` subfolders) or U-Net
            folder; its U-Net config and weights and its scheduler config replace the arguments above (the
            ``prediction_type`` of its scheduler config wins unless it has none). Nothing is downloaded.
    """

    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        attention: bool = False,
        num_classes: int | None = None,
        prediction_type: str = "epsilon",
        scheduler: str = "DDPMScheduler",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        diffusers = _diffusers()
        if scheduler not in SCHEDULERS:
            raise KDConfigError(
                "scheduler", f"unknown scheduler {scheduler!r}", f"choose one of {', '.join(SCHEDULERS)}"
            )
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1 or null, got {num_classes}")
        if pretrained_path is not None:
            self.unet, schedule_config = _load_pipeline(diffusers, Path(pretrained_path))
            prediction_type = schedule_config.get("prediction_type", prediction_type)
            scheduler = schedule_config.get("_class_name", scheduler)
            num_class_embeds = self.unet.config.num_class_embeds
            num_classes = None if num_class_embeds is None else int(num_class_embeds) - 1
            if scheduler not in SCHEDULERS:
                raise KDConfigError(
                    "pretrained_path",
                    f"the pipeline's scheduler is {scheduler}; kd-lightning reads the schedule of "
                    f"{', '.join(SCHEDULERS)}",
                    "give a pipeline saved with one of them",
                )
        else:
            channels = tuple(int(c) for c in block_out_channels)
            if not channels or any(c % norm_num_groups for c in channels):
                raise KDConfigError(
                    "block_out_channels",
                    f"must be non-empty and divisible by norm_num_groups={norm_num_groups}, got {list(channels)}",
                    "e.g. [32, 64] with norm_num_groups 8",
                )
            if sample_size % (2 ** (len(channels) - 1)):
                raise KDConfigError(
                    "sample_size",
                    f"{sample_size} cannot be halved {len(channels) - 1} times (one per down block but the last)",
                    "use fewer block_out_channels or a larger sample_size",
                )
            self.unet = diffusers.UNet2DModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=in_channels,
                block_out_channels=channels,
                layers_per_block=layers_per_block,
                down_block_types=("DownBlock2D",) * len(channels),
                up_block_types=("UpBlock2D",) * len(channels),
                norm_num_groups=norm_num_groups,
                add_attention=attention,
                num_class_embeds=None if num_classes is None else num_classes + 1,
            )
            schedule_config = {
                "num_train_timesteps": num_train_timesteps,
                "beta_schedule": beta_schedule,
                "beta_start": beta_start,
                "beta_end": beta_end,
            }
        schedule_config = {k: v for k, v in schedule_config.items() if not k.startswith("_")}
        schedule_config["prediction_type"] = prediction_type
        schedule_config["clip_sample"] = False
        self.scheduler_name = scheduler
        self.scheduler = getattr(diffusers, scheduler).from_config(schedule_config)
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.sample_size = int(self.unet.config.sample_size)
        self.in_channels = int(self.unet.config.in_channels)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.register_buffer(
            "alphas_cumprod", self.scheduler.alphas_cumprod.to(torch.float64).clone(), persistent=False
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One image ``(C, H, W)``."""
        return (self.in_channels, self.sample_size, self.sample_size)

    @property
    def null_class(self) -> int | None:
        """The class id of the unconditional (null) class, ``None`` for an unconditional network."""
        return self.num_classes

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)`` in float64 for integer timesteps ``t`` (shape of ``t``)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar.sqrt(), (1.0 - abar).sqrt()

    def class_input(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """Class ids for the U-Net: ``None`` stays ``None`` for an unconditional network, becomes the null class
        for a conditional one."""
        if self.num_classes is None:
            return None
        if class_labels is None:
            return torch.full((batch,), int(self.num_classes), dtype=torch.long, device=device)
        return class_labels.long()

    def forward(self, x: Tensor, t: Tensor | int, class_labels: Tensor | None = None) -> Tensor:
        """The raw prediction (of :attr:`prediction_type`) at noisy images ``x`` and integer timesteps ``t``."""
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.unet(x, t, class_labels=self.class_input(class_labels, x.shape[0], x.device)).sample

    def denoise(
        self,
        x: Tensor,
        t: Tensor | int,
        class_labels: Tensor | None = None,
        guidance: float = 0.0,
        clip: tuple[float, float] | None = None,
    ) -> Tensor:
        """The data prediction ``x̂_0(x_t, t)``, with classifier-free guidance ``w = guidance`` and optional clipping.

        ``x̂_0 = (1 + w)·x̂_0(x, t, c) − w·x̂_0(x, t, ∅)`` (guidance needs a class-conditional network and labels).
        """
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = (v.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) for v in self.alpha_sigma(t))
        if guidance and self.num_classes is not None and class_labels is not None:
            null = torch.full_like(class_labels, int(self.num_classes))
            out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            cond, uncond = out.chunk(2)
            x0 = (1 + guidance) * to_x0(cond, x, alpha, sigma, self.prediction_type) - guidance * to_x0(
                uncond, x, alpha, sigma, self.prediction_type
            )
        else:
            x0 = to_x0(self(x, t, class_labels), x, alpha, sigma, self.prediction_type)
        return x0.clamp(*clip) if clip is not None else x0

    def save_pipeline(self, path: str | Path) -> Path:
        """Write a diffusers-layout folder (``unet/`` + ``scheduler/``) that ``pretrained_path`` reads back."""
        path = Path(path)
        self.unet.save_pretrained(str(path / "unet"))
        self.scheduler.save_pretrained(str(path / "scheduler"))
        return path


def _load_pipeline(diffusers: Any, path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(UNet2DModel, scheduler config)`` of a local pipeline folder (or a bare U-Net folder)."""
    if not path.is_dir():
        raise KDConfigError(
            "pretrained_path",
            f"{path} is not a folder (nothing is downloaded)",
            "give a local diffusers pipeline folder with unet/ and scheduler/ subfolders",
        )
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    if not (unet_dir / "config.json").is_file():
        raise KDConfigError(
            "pretrained_path",
            f"{unet_dir} has no config.json of a UNet2DModel",
            "save the pipeline with save_pretrained (unet/config.json + weights)",
        )
    unet = diffusers.UNet2DModel.from_pretrained(
        str(unet_dir), **pretrained_folder_kwargs(unet_dir, library="diffusers")
    )
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    config: dict[str, Any] = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return unet, config


@torch.no_grad()
def ddim_sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    t_max: int | None = None,
) -> Tensor:
    """Deterministic DDIM (η = 0; Song et al., 2021) from ``x_T = noise`` in ``steps`` network calls.

    Timesteps ``T = t_max`` down to 0 evenly spaced ("trailing": the first call is at ``T``), then
    ``x_s = α_s x̂_0 + σ_s ε̂`` with ``ε̂ = (x_t − α_t x̂_0)/σ_t``; the last call's ``x̂_0`` is returned.

    Args:
        denoise: ``(x_t, t [B] long) -> x̂_0`` (guidance and clipping inside).
        noise: ``x_T``.
        alphas_cumprod: the schedule's ``ᾱ`` (float64).
        steps: network calls (1: one call at ``T``, returning ``x̂_0(x_T, T)``).
        t_max: the first timestep (default the last of the schedule).
    """
    if steps < 1:
        raise KDConfigError("steps", f"must be >= 1, got {steps}")
    last = len(alphas_cumprod) - 1 if t_max is None else int(t_max)
    times = torch.linspace(last, 0, steps + 1, dtype=torch.float64).round().long().tolist()[:-1]
    x = noise
    x0 = noise
    for i, t in enumerate(times):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x, t_batch)
        if i + 1 == len(times):
            break
        abar_t, abar_s = alphas_cumprod[t], alphas_cumprod[times[i + 1]]
        a_t, s_t = float(abar_t.sqrt()), float((1 - abar_t).sqrt())
        a_s, s_s = float(abar_s.sqrt()), float((1 - abar_s).sqrt())
        eps = (x - a_t * x0) / s_t
        x = a_s * x0 + s_s * eps
    return x0
