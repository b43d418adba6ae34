"""Swing Distillation (Li, Wu, Dong, Wu, Bian, Xiong 2022; arXiv 2212.08349) — an UNVERIFIED reconstruction.

Only the abstract was available: "the temperature is set per token according to the likelihood that
it holds private information" and "noise is injected into the soft targets". Everything concrete
here (the linear temperature map, where the noise goes, its calibration, the loss weights) is a
**reconstruction**; each uncertain choice is an argument.

Per item *i* (a sample of a ``[B, C]`` batch, or a token of ``[..., C]``) with privacy score
``π_i ∈ [0, 1]``::

    T_i  = T_min + (T_max − T_min) · π_i
    q_i  = softmax(z_T,i / T_i)
    q̃_i  = max(q_i + ξ_i, 0) / Σ_c max(q_i + ξ_i, 0)_c      ξ_i ~ Laplace(0, Δ/ε)^C  (or Gaussian)
    L    = (1 − α) · CE(z_S, y) + α · mean_i T_i² · KL(q̃_i ‖ softmax(z_S,i / T_i))

The noise is drawn afresh at every call (every training step). Clipping at 0 and renormalising
changes the noise distribution: ``q̃`` is no longer ``q`` plus Laplace noise, its expectation is
pulled toward uniform (small probabilities gain mass, large ones lose it) and the ε of the
Laplace mechanism is **not** a differential-privacy guarantee for the trained student (the same
sample's targets are released at every epoch, and no accounting is done).

Pure torch; no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_logits, check_temperature, upcast
from kd_lightning.losses.divergences import reduce_items
from kd_lightning.losses.terms import weighted_terms

NoiseKind = Literal["laplace", "gaussian", "none"]
NoiseTarget = Literal["probs", "logits"]
PrivacySource = Tensor | Sequence[float] | Mapping[int, float] | str | Path | Callable[..., Tensor] | None

__all__ = [
    "PrivacyScores",
    "SwingLoss",
    "noise_scale",
    "noisy_soft_targets",
    "sample_noise",
    "soft_target_kl",
    "swing_temperatures",
]


def swing_temperatures(privacy: Tensor, t_min: float, t_max: float) -> Tensor:
    """Per-item temperatures ``T_i = T_min + (T_max − T_min) · π_i``.

    Raises:
        ValueError: if ``t_min <= 0``, ``t_max < t_min`` or a score lies outside ``[0, 1]``.
    """
    check_temperature(t_min, "t_min")
    if t_max < t_min:
        raise KDConfigError(f"t_max must be >= t_min, got t_max={t_max} and t_min={t_min}.")
    privacy = upcast(privacy.float() if not privacy.is_floating_point() else privacy)
    if privacy.numel() and (privacy.min() < 0 or privacy.max() > 1 or torch.isnan(privacy).any()):
        raise KDConfigError(
            f"privacy scores must lie in [0, 1], got values in [{privacy.min().item()}, {privacy.max().item()}]."
        )
    return t_min + (t_max - t_min) * privacy


def noise_scale(noise: NoiseKind, sensitivity: float, epsilon: float, delta: float = 1e-5) -> float:
    """Scale of the noise for a privacy budget ε (0 when there is no noise).

    - ``"laplace"``: ``b = Δ/ε`` (Laplace mechanism; Δ an L1 sensitivity).
    - ``"gaussian"``: ``σ = Δ·sqrt(2·ln(1.25/δ))/ε`` (classical Gaussian mechanism; Δ an L2
      sensitivity; the (ε, δ) statement of that calibration holds for ε < 1 only).
    - ``"none"`` or ``ε = inf``: 0.

    The L1 distance between two probability vectors is at most 2 and their L2 distance at most
    √2, so those are the worst-case sensitivities of a soft-target vector.
    """
    if noise not in ("laplace", "gaussian", "none"):
        raise KDConfigError(f"noise must be 'laplace', 'gaussian' or 'none', got {noise!r}.")
    if not epsilon > 0:
        raise KDConfigError(f"epsilon (the privacy budget ε) must be > 0, got {epsilon}.")
    if not sensitivity >= 0:
        raise KDConfigError(f"sensitivity (Δ) must be >= 0, got {sensitivity}.")
    if noise == "none" or math.isinf(epsilon):
        return 0.0
    if noise == "laplace":
        return sensitivity / epsilon
    if not 0.0 < delta < 1.0:
        raise KDConfigError(f"delta (δ of the Gaussian mechanism) must be in (0, 1), got {delta}.")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def sample_noise(
    shape: Sequence[int] | torch.Size,
    noise: NoiseKind,
    scale: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero-mean noise of the given ``scale``: Laplace(0, b) as ``b·(E₁ − E₂)`` with ``E ~ Exp(1)``, or N(0, σ²)."""
    if noise == "none" or scale == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    if noise == "laplace":
        e1 = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
        e2 = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
        return scale * (e1 - e2)
    if noise == "gaussian":
        return scale * torch.randn(shape, device=device, dtype=dtype, generator=generator)
    raise KDConfigError(f"noise must be 'laplace', 'gaussian' or 'none', got {noise!r}.")


def noisy_soft_targets(
    teacher_logits: Tensor,
    temperatures: Tensor,
    noise: NoiseKind = "laplace",
    scale: float = 0.0,
    noise_on: NoiseTarget = "probs",
    generator: torch.Generator | None = None,
    return_noise: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``q̃ = normalise(max(softmax(z_T/T) + ξ, 0))`` (``noise_on="probs"``) or ``softmax(z_T/T + ξ)`` (``"logits"``).

    ``temperatures`` has the items' shape (``teacher_logits.shape[:-1]``). An item whose
    clipped vector is all zero (possible only with very large noise) becomes uniform. The
    teacher logits are detached. With ``return_noise`` also returns the raw draw ξ (before
    clipping), for inspection.
    """
    t = upcast(teacher_logits).detach() / temperatures.unsqueeze(-1).to(upcast(teacher_logits).dtype)
    xi = sample_noise(t.shape, noise, scale, device=t.device, dtype=t.dtype, generator=generator)
    if noise_on == "logits":
        targets = F.softmax(t + xi, dim=-1)
    elif noise_on == "probs":
        probs = F.softmax(t, dim=-1)
        if noise == "none" or scale == 0:
            targets = probs
        else:
            clipped = (probs + xi).clamp_min(0.0)
            total = clipped.sum(-1, keepdim=True)
            uniform = torch.full_like(clipped, 1.0 / clipped.shape[-1])
            targets = torch.where(total > 0, clipped / total.clamp_min(torch.finfo(t.dtype).tiny), uniform)
    else:
        raise KDConfigError(f"noise_on must be 'probs' or 'logits', got {noise_on!r}.")
    return (targets, xi) if return_noise else targets


def soft_target_kl(target_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Per-item ``KL(q ‖ softmax(z_S)) = Σ_c q_c (log q_c − log p_c)`` for targets given as probabilities.

    The divergences of :mod:`kd_lightning.losses.divergences` take logits on both sides; noisy,
    clipped targets have exact zeros (``log 0``), so this uses ``xlogy`` (``0·log 0 = 0``).
    """
    log_p = F.log_softmax(upcast(student_logits), dim=-1)
    q = target_probs.to(log_p.dtype)
    return (torch.xlogy(q, q) - q * log_p).sum(-1)


class PrivacyScores(nn.Module):
    """Where each item's privacy score π ∈ [0, 1] comes from.

    Args:
        source: one of

            - ``None``: every item scores 0 (the method degenerates to KD with noisy targets at T_min);
            - a list/tuple of floats of length ``num_classes``: a per-class table, looked up with
              the label ``y`` (config-friendly);
            - a dict ``{class: score}``: the same, classes not listed score 0;
            - a 1-D tensor, or the path of a ``.pt``/``.npy`` file holding one: a per-sample table
              looked up with the dataset index of each sample (batches ``(x, y, index)``: set the
              data module's ``return_index=True``);
            - a callable ``fn(inputs, targets, indices) -> Tensor`` returning the scores of the batch
              (``indices`` is ``None`` when the batch has none).
        num_classes: needed to expand a dict into a table; optional otherwise.
        name: the configuration field, used in error messages.
    """

    table: Tensor

    def __init__(self, source: PrivacySource = None, num_classes: int | None = None, name: str = "privacy_scores"):
        super().__init__()
        self.name = name
        self.fn: Callable[..., Tensor] | None = None
        self.partial = False  # a {class: score} dict: classes beyond the listed ones score 0
        self.kind: Literal["none", "class", "sample", "callable"]
        table: Tensor | None = None
        if source is None:
            self.kind = "none"
        elif callable(source) and not isinstance(source, (Tensor, nn.Module, str, Path)):
            self.kind, self.fn = "callable", source
        elif isinstance(source, (str, Path)):
            self.kind, table = "sample", self._load(Path(source))
        elif isinstance(source, Tensor):
            self.kind, table = "sample", source.detach().flatten()
        elif isinstance(source, Mapping):
            classes = [int(k) for k in source]
            if any(c < 0 for c in classes):
                raise KDConfigError(f"{name}: class indices must be >= 0, got {sorted(classes)}.")
            size = max(num_classes or 0, max(classes, default=-1) + 1)
            table = torch.zeros(size)
            for cls, score in source.items():
                table[int(cls)] = float(score)
            self.kind, self.partial = "class", True
        elif isinstance(source, Sequence):
            self.kind, table = "class", torch.as_tensor([float(v) for v in source])
        else:
            raise TypeError(
                f"{name} must be None, a per-class list or dict, a per-sample tensor or file path, or a callable; "
                f"got {type(source).__name__}."
            )
        if table is not None:
            table = table.float()
            if table.numel() == 0:
                raise KDConfigError(f"{name}: the table of privacy scores is empty.")
            if table.min() < 0 or table.max() > 1 or torch.isnan(table).any():
                raise KDConfigError(f"{name}: scores must lie in [0, 1], got values in [{table.min()}, {table.max()}].")
        # Inputs of the run, not learnt state: not saved in checkpoints (the config holds them).
        self.register_buffer("table", table if table is not None else torch.zeros(0), persistent=False)
        if num_classes is not None:
            self.fit_classes(num_classes)

    def _load(self, path: Path) -> Tensor:
        if not path.expanduser().is_file():
            raise FileNotFoundError(f"{self.name}: no file at {path.expanduser().resolve()} (a .pt or .npy tensor).")
        path = path.expanduser()
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path)).flatten()
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Tensor):
            raise TypeError(
                f"{self.name}: {path} must hold a tensor of per-sample scores, got {type(loaded).__name__}."
            )
        return loaded.flatten()

    def fit_classes(self, num_classes: int) -> None:
        """Check (or, for a dict, zero-pad) a per-class table to ``num_classes`` entries."""
        if self.kind != "class" or len(self.table) == num_classes:
            return
        if self.partial and len(self.table) < num_classes:
            self.table = torch.cat([self.table, self.table.new_zeros(num_classes - len(self.table))])
            return
        raise KDConfigError(
            f"{self.name}: a per-class table needs {num_classes} scores (one per class), got {len(self.table)}."
        )

    @property
    def needs_index(self) -> bool:
        """Whether the scores are looked up by dataset index (per-sample table)."""
        return self.kind == "sample"

    def forward(self, inputs: Tensor | None, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        """Scores of a batch, shaped like ``targets``.

        Raises:
            ValueError: a per-sample table without ``indices`` (the message says how to get
                them), an index beyond the table, or a callable returning bad scores.
        """
        if self.kind == "none":
            return torch.zeros(targets.shape, device=targets.device)
        if self.kind == "callable":
            assert self.fn is not None
            scores = torch.as_tensor(self.fn(inputs, targets, indices), device=targets.device).float()
            if scores.shape != targets.shape:
                scores = scores.reshape(targets.shape) if scores.numel() == targets.numel() else scores
            if scores.shape != targets.shape:
                raise KDConfigError(
                    f"{self.name}: the callable returned scores of shape {tuple(scores.shape)}, "
                    f"expected {tuple(targets.shape)} (one per item)."
                )
            if scores.numel() and (scores.min() < 0 or scores.max() > 1 or torch.isnan(scores).any()):
                raise KDConfigError(f"{self.name}: the callable returned scores outside [0, 1].")
            return scores
        if self.kind == "class":
            if self.partial and targets.numel() and int(targets.max()) >= len(self.table):
                self.fit_classes(int(targets.max()) + 1)  # classes a dict does not list score 0
            if targets.numel() and int(targets.max()) >= len(self.table):
                raise KDConfigError(
                    f"{self.name}: label {int(targets.max())} has no entry in the per-class table of "
                    f"{len(self.table)} scores."
                )
            return self.table[targets]
        if indices is None:
            raise KDConfigError(
                f"{self.name} is a per-sample table, looked up by each sample's dataset index, but the "
                "batch carries no indices: build the data module with return_index=True "
                "(--data.init_args.return_index=true) so that batches are (inputs, targets, index)."
            )
        indices = torch.as_tensor(indices, device=self.table.device).long()
        if indices.numel() and (int(indices.max()) >= len(self.table) or int(indices.min()) < 0):
            raise KDConfigError(
                f"{self.name}: dataset index {int(indices.max())} is beyond the per-sample table of "
                f"{len(self.table)} scores: the table must have one score per training sample."
            )
        scores = self.table[indices].to(targets.device)
        if scores.numel() == targets.numel():
            return scores.reshape(targets.shape)
        # One score per sample, items are tokens [B, T, ...]: every token of a sample shares it.
        return scores.reshape(-1, *([1] * (targets.dim() - 1))).expand(targets.shape)


class SwingLoss(nn.Module):
    """Swing Distillation loss (**UNVERIFIED reconstruction**, see the module docstring).

    ``L = (1 − α)·CE(z_S, y) + α·mean_i T_i²·KL(q̃_i ‖ softmax(z_S,i/T_i))`` with
    ``T_i = T_min + (T_max − T_min)·π_i`` and ``q̃_i`` the teacher's tempered probabilities plus
    fresh Laplace/Gaussian noise, clipped at 0 and renormalised.

    Args:
        t_min: temperature of items with π = 0.
        t_max: temperature of items with π = 1.
        alpha: α, weight of the soft-target term; ``1 − α`` weighs the cross-entropy.
        noise: ``"laplace"`` (scale Δ/ε), ``"gaussian"`` (σ = Δ·sqrt(2 ln(1.25/δ))/ε) or ``"none"``.
        epsilon: ε, the privacy budget (``inf`` disables the noise).
        sensitivity: Δ, the sensitivity of the noised vector (≤ 2 in L1 for probabilities).
        delta: δ of the Gaussian option.
        noise_on: add the noise to the tempered probabilities (``"probs"``, the reconstruction's
            default) or to the tempered teacher logits before the softmax (``"logits"``, the
            spec's alternative; no clipping needed).
        soften_student: divide the student's logits by T_i too and weigh by T_i² (the formula
            above; **at high T_i this tends to logit matching, so a flat target does not hide the
            teacher's ranking from the student**). ``False`` compares the flattened target with the
            student's plain softmax, without the T_i² factor (a variant, not from the paper).
        generator: optional ``torch.Generator`` for the noise (reproducible draws in tests).

    Returns ``{"loss", "ce", "kd"}`` (weighted parts).
    """

    def __init__(
        self,
        t_min: float = 1.0,
        t_max: float = 10.0,
        alpha: float = 0.5,
        noise: NoiseKind = "laplace",
        epsilon: float = 10.0,
        sensitivity: float = 1.0,
        delta: float = 1e-5,
        noise_on: NoiseTarget = "probs",
        soften_student: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_temperature(t_min, "t_min")
        if t_max < t_min:
            raise KDConfigError(f"t_max must be >= t_min, got t_max={t_max} and t_min={t_min}.")
        if not 0.0 <= alpha <= 1.0:
            raise KDConfigError(f"alpha must be in [0, 1], got {alpha}.")
        if noise_on not in ("probs", "logits"):
            raise KDConfigError(f"noise_on must be 'probs' or 'logits', got {noise_on!r}.")
        self.t_min = t_min
        self.t_max = t_max
        self.alpha = alpha
        self.noise = noise
        self.epsilon = epsilon
        self.sensitivity = sensitivity
        self.delta = delta
        self.noise_on = noise_on
        self.soften_student = soften_student
        self.generator = generator
        self.scale = noise_scale(noise, sensitivity, epsilon, delta)

    def per_item(self, student_logits: Tensor, teacher_logits: Tensor, privacy: Tensor) -> tuple[Tensor, Tensor]:
        """``(T_i²·KL(q̃_i ‖ softmax(z_S,i/T_i)), T_i)`` per item (unweighted, no mean)."""
        temperatures = swing_temperatures(privacy.to(student_logits.device), self.t_min, self.t_max)
        targets = noisy_soft_targets(
            teacher_logits, temperatures, self.noise, self.scale, self.noise_on, generator=self.generator
        )
        s = upcast(student_logits)
        if self.soften_student:
            kl = soft_target_kl(targets, s / temperatures.unsqueeze(-1).to(s.dtype))
            return kl * temperatures.to(kl.dtype) ** 2, temperatures
        return soft_target_kl(targets, s), temperatures

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, privacy: Tensor | None = None
    ) -> dict[str, Tensor]:
        check_logits(student_logits, teacher_logits, target)
        if privacy is None:
            privacy = torch.zeros(student_logits.shape[:-1], device=student_logits.device)
        if privacy.shape != student_logits.shape[:-1]:
            raise KDConfigError(
                f"privacy scores must have the items' shape {tuple(student_logits.shape[:-1])}, "
                f"got {tuple(privacy.shape)}."
            )
        items, _ = self.per_item(student_logits, teacher_logits, privacy)
        kd = reduce_items(items)
        flat = upcast(student_logits.reshape(-1, student_logits.shape[-1]))
        terms = {"ce": F.cross_entropy(flat, target.reshape(-1)), "kd": kd}
        return weighted_terms(terms, {"ce": 1.0 - self.alpha, "kd": self.alpha})
