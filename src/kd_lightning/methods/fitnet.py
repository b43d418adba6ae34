"""FitNets: hints for thin deep nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio; ICLR 2015; arXiv 1412.6550)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.feature import hint_loss
from kd_lightning.losses.terms import check_weights, weighted_terms
from kd_lightning.methods.feature_base import FeatureDistillationModule, default_layers

__all__ = ["FitNet", "HintRegressor", "stage_layers"]


def stage_layers(
    model: nn.Module, field: str, given: Sequence[str] | None, stages: slice, preact: bool = False
) -> list[str]:
    """``given`` as a list, or the zoo stages ``stages`` of ``model`` (``preact_stages`` when ``preact``).

    Raises:
        KDConfigError: naming ``model.init_args.<field>`` when nothing is given and ``model`` lists no
            stages, or ``model.init_args.preact`` when it has no ``preact_stages``.
    """
    if given is not None:
        if isinstance(given, str):
            return [given]
        return list(given)
    if not preact:
        return default_layers(model, field, stages)
    names = getattr(model, "preact_stages", None)
    if not names:
        raise KDConfigError(
            f"model.init_args.preact is true but {type(model).__name__} has no preact_stages: set "
            f'model.init_args.{field} to the module paths to distil ("<module>:input" reads a module\'s input).'
        )
    return list(names)[stages]


def check_pairs(student_layers: Sequence[str], teacher_layers: Sequence[str]) -> None:
    """Raise ``KDConfigError`` unless the two layer lists pair one to one (and are not empty)."""
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise KDConfigError(
            f"model.init_args.student_layers ({len(student_layers)}: {list(student_layers)}) and "
            f"model.init_args.teacher_layers ({len(teacher_layers)}: {list(teacher_layers)}) must list the same "
            "number (at least one) of layers: they are distilled in pairs, in order."
        )


class HintRegressor(nn.Module):
    """Maps a student feature to the shape of a teacher feature (FitNets' regressor, RepDistiller's ``ConvReg``).

    For maps ``[C_S, H_S, W_S] → [C_T, H_T, W_T]``: a 3x3 stride-2 conv when ``H_S = 2·H_T``; a 4x4
    stride-2 transposed conv when ``2·H_S = H_T``; otherwise (``H_S ≥ H_T``) a valid conv with kernel
    ``(1 + H_S − H_T, 1 + W_S − W_T)``, i.e. a 1x1 conv at equal sizes. For vectors ``[D_S] → [D_T]`` a
    linear layer. Then BatchNorm and ReLU (both optional; RepDistiller uses both).

    Raises:
        ValueError: the shapes cannot be matched by these rules.
    """

    def __init__(
        self, student_shape: Sequence[int], teacher_shape: Sequence[int], batch_norm: bool = True, relu: bool = True
    ) -> None:
        super().__init__()
        s, t = tuple(student_shape), tuple(teacher_shape)
        norm: nn.Module
        if len(s) == 3 and len(t) == 3:
            (s_c, s_h, s_w), (t_c, t_h, t_w) = s, t
            if s_h == 2 * t_h:
                self.proj: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
            elif 2 * s_h == t_h:
                self.proj = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
            elif s_h >= t_h and s_w >= t_w:
                self.proj = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
            else:
                raise KDConfigError(
                    f"no conv regressor maps a student map {s} to a teacher map {t}: the student map must be "
                    "half, twice, or at least the teacher's size"
                )
            norm = nn.BatchNorm2d(t_c) if batch_norm else nn.Identity()
        elif len(s) == 1 and len(t) == 1:
            self.proj = nn.Linear(s[0], t[0])
            norm = nn.BatchNorm1d(t[0]) if batch_norm else nn.Identity()
        else:
            raise KDConfigError(
                f"cannot regress a student feature of shape {s} onto a teacher feature of shape {t}: both must be "
                "[C, H, W] maps or both [D] vectors"
            )
        self.norm = norm
        self.act = nn.ReLU() if relu else nn.Identity()
        out = self._output_shape(s)
        if out != t:
            raise KDConfigError(
                f"a regressor from {s} gives {out}, not the teacher's {t}: the widths cannot be matched"
            )

    def _output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.proj(torch.zeros(1, *shape)).shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class FitNet(FeatureDistillationModule):
    """FitNet hints: ``w_CE·CE(z_S, y) + w_hint·Σ_j mean((r_j(f_S,j) − f_T,j)²)``.

    ``r_j`` is a trainable :class:`HintRegressor` per layer pair (built from the probed feature shapes,
    optimised with the student). Single-stage training with the hint term throughout, as RepDistiller
    and mdistiller do on CIFAR-100 (the paper's two-stage schedule — hints first, then KD — is not
    used). Verified against RepDistiller ``distiller_zoo/FitNet.py``, ``models/util.py`` (``ConvReg``)
    and ``helper/loops.py``: the hint layer is ``feat[2]`` of ``forward(is_feat=True, preact=False)``,
    i.e. the post-activation output of the second stage (``layer2`` of the CIFAR ResNets), the
    regressor is conv + BN + ReLU, and the MSE averages over all elements.

    Args:
        student, teacher: the networks.
        student_layers: student module paths; ``None`` takes ``feature_stages[2]`` (RepDistiller's
            ``hint_layer=2``; ``preact_stages[2]`` with ``preact``).
        teacher_layers: teacher module paths, paired in order with ``student_layers``; same default.
        ce_weight: w_CE.
        hint_weight: w_hint (100 in RepDistiller's and mdistiller's CIFAR-100 recipe).
        regressor_batch_norm: BatchNorm after the regressor's conv/linear (RepDistiller: yes).
        regressor_relu: ReLU at the end of the regressor (RepDistiller: yes; their teacher features
            are post-ReLU). With pre-activation teacher features it cannot reach their negative values:
            consider ``false`` there (our suggestion, UNVERIFIED).
        preact: default layers from the zoo's ``preact_stages`` (before the stage's last ReLU) instead
            of ``feature_stages``. RepDistiller uses post-activation features for FitNet.
        **kwargs: ``input_shape``, ``clone_features`` of :class:`FeatureDistillationModule`, then
            ``teacher_ckpt``, ``optimizer``, ``lr_scheduler``, ... of ``DistillationModule``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: Sequence[str] | None = None,
        teacher_layers: Sequence[str] | None = None,
        ce_weight: float = 1.0,
        hint_weight: float = 100.0,
        regressor_batch_norm: bool = True,
        regressor_relu: bool = True,
        preact: bool = False,
        **kwargs: Any,
    ) -> None:
        hint = slice(2, 3)
        s_layers = stage_layers(student, "student_layers", student_layers, hint, preact)
        t_layers = stage_layers(teacher, "teacher_layers", teacher_layers, hint, preact)
        check_pairs(s_layers, t_layers)
        check_weights(ce_weight=ce_weight, hint_weight=hint_weight)
        # Read by build_parts, which runs inside super().__init__ when input_shape is given.
        self.ce_weight = ce_weight
        self.hint_weight = hint_weight
        self.regressor_batch_norm = regressor_batch_norm
        self.regressor_relu = regressor_relu
        super().__init__(student, teacher, student_layers=s_layers, teacher_layers=t_layers, **kwargs)

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        regressors = []
        for i, (s_shape, t_shape) in enumerate(zip(student_shapes, teacher_shapes, strict=True)):
            try:
                regressors.append(HintRegressor(s_shape, t_shape, self.regressor_batch_norm, self.regressor_relu))
            except ValueError as err:
                raise KDConfigError(
                    f"model.init_args.student_layers[{i}] ({self.student_layers[i]!r}, shape {tuple(s_shape)}) "
                    f"cannot be regressed onto model.init_args.teacher_layers[{i}] ({self.teacher_layers[i]!r}, "
                    f"shape {tuple(t_shape)}): {err}. Pick a pair of layers with compatible shapes."
                ) from None
        self.regressors = nn.ModuleList(regressors)

    def feature_loss(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        batch: Any,
    ) -> dict[str, Tensor]:
        ce = label_cross_entropy(student_logits, target)
        hints = [hint_loss(reg(s), t) for reg, s, t in zip(self.regressors, student_feats, teacher_feats)]
        terms = {"ce": ce, "hint": sum(hints[1:], hints[0])}
        return weighted_terms(terms, {"ce": self.ce_weight, "hint": self.hint_weight})
