"""Training-free scores of candidate student networks: DisWOT's two teacher-student similarities and the baselines.

DisWOT (Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023;
official code github.com/lilujunai/DisWOT-CVPR2023, README "Core Code"): with a RANDOMLY INITIALISED teacher and
student and one mini-batch ``(x, y)``,

* semantic similarity — ``G = dCE(f(x), y)/dW_fc`` (``[K, C]``: classes x final channels, a Grad-CAM proxy) of
  each network; per class the channel-correlation ``E_k = g_k g_k^T`` (``[C, C]``), each row L2-normalised;
  ``D_sem = sum (E_S - E_T)^2 / (C K)``; score ``-D_sem`` (README ``semantic_similarity_metric`` /
  ``channel_similarity``; ``ICKDLoss`` in the NAS-Bench-201 search). It needs equal final widths ``C``;
* relation similarity — ``f`` = features before global average pooling, flattened per sample; ``G = f f^T``
  (``[B, B]``), rows L2-normalised; ``D_rel = sum (G_T - G_S)^2 / B^2``; score ``-D_rel`` (README
  ``relation_similarity_metric`` / ``batch_similarity``, the SP loss);
* DisWOT score = ``semantic_weight * (-D_sem) + relation_weight * (-D_rel)`` (higher is better).

Library extension (not in the paper): when the final widths differ, ``semantic_mode="class_gram"`` compares the
``K x K`` class Gram matrices ``G G^T`` (rows L2-normalised, ``sum (M_S - M_T)^2 / K^2``) instead, which is
width-agnostic; ``semantic_mode="auto"`` picks ``channel`` when every candidate's width equals the teacher's and
``class_gram`` otherwise (:func:`resolve_semantic_mode`).

Baselines (teacher-agnostic): parameter count and FLOPs (:func:`count_cost`, the convention of ``kd model-stats``),
NASWOT (Mellor et al., "Neural Architecture Search without Training", ICML 2021: ``log|K_H|`` of the ReLU
activation-pattern kernel, :func:`naswot_score`) and a Zen-score proxy (Lin et al., "Zen-NAS", ICCV 2021,
:func:`zen_score`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.errors import KDConfigError
from kd_lightning.models.taps import FeatureTaps

__all__ = [
    "SEMANTIC_MODES",
    "DisWOTScorer",
    "class_gram_distance",
    "classifier_of",
    "count_cost",
    "naswot_score",
    "pre_pool_tap",
    "relation_distance",
    "resolve_semantic_mode",
    "semantic_distance",
    "zen_score",
]

SemanticMode = Literal["auto", "channel", "class_gram"]
SEMANTIC_MODES: tuple[str, ...] = ("auto", "channel", "class_gram")


# ---------------------------------------------------------------------------------------------- the two metrics
def semantic_distance(grad_teacher: Tensor, grad_student: Tensor) -> Tensor:
    """DisWOT's channel-correlation distance ``D_sem`` between two classifier-weight gradients ``[K, C]``.

    ``E = g_k g_k^T`` per class ``k`` (``[K, C, C]``), ``F.normalize(E, dim=2)``, ``sum (E_S - E_T)^2 / (C K)``.

    Raises:
        KDConfigError: ``semantic_mode`` when the shapes differ (different final widths ``C``).
    """
    if grad_teacher.dim() != 2 or grad_teacher.shape != grad_student.shape:
        raise KDConfigError(
            "semantic_mode",
            f"channel mode compares equal final widths, got teacher {tuple(grad_teacher.shape)} and student "
            f"{tuple(grad_student.shape)} classifier weights ([classes, channels])",
            "use semantic_mode auto or class_gram (K x K class Gram, width-agnostic), or candidates whose final "
            "width equals the teacher's",
        )
    k, c = grad_student.shape
    e_t = F.normalize(grad_teacher.unsqueeze(2) @ grad_teacher.unsqueeze(1), dim=2)
    e_s = F.normalize(grad_student.unsqueeze(2) @ grad_student.unsqueeze(1), dim=2)
    return ((e_s - e_t) ** 2).sum() / (c * k)


def class_gram_distance(grad_teacher: Tensor, grad_student: Tensor) -> Tensor:
    """Width-agnostic fallback of :func:`semantic_distance` (library extension, not in the paper).

    ``M = G G^T`` (``[K, K]``), rows L2-normalised, ``sum (M_S - M_T)^2 / K^2``.
    """
    if grad_teacher.shape[0] != grad_student.shape[0]:
        raise KDConfigError(
            "num_classes",
            f"teacher and student have {grad_teacher.shape[0]} and {grad_student.shape[0]} classes",
            "build both for the data module's classes",
        )
    k = grad_student.shape[0]
    m_t = F.normalize(grad_teacher @ grad_teacher.T, dim=1)
    m_s = F.normalize(grad_student @ grad_student.T, dim=1)
    return ((m_s - m_t) ** 2).sum() / (k * k)


def relation_distance(feature_teacher: Tensor, feature_student: Tensor) -> Tensor:
    """DisWOT's sample-relation distance ``D_rel`` between two batches of features (any shapes, same batch).

    ``f`` flattened per sample, ``G = f f^T`` (``[B, B]``), ``F.normalize(G)`` (rows), ``sum (G_T - G_S)^2 / B^2``.
    """
    b = feature_student.shape[0]
    if feature_teacher.shape[0] != b:
        raise KDConfigError("batch", f"teacher and student features have {feature_teacher.shape[0]} and {b} rows", "")
    f_t = feature_teacher.reshape(b, -1)
    f_s = feature_student.reshape(b, -1)
    g_t = F.normalize(f_t @ f_t.T)
    g_s = F.normalize(f_s @ f_s.T)
    return ((g_t - g_s) ** 2).sum() / (b * b)


def resolve_semantic_mode(mode: str, teacher_width: int, student_widths: Sequence[int]) -> tuple[str, str | None]:
    """``(mode to use, note or None)``: ``auto`` is ``channel`` when every candidate's final width equals the
    teacher's, else ``class_gram`` (the note says so); ``channel`` with a differing width is an error.

    Raises:
        KDConfigError: ``score.semantic_mode`` for an unknown mode or ``channel`` with differing widths.
    """
    if mode not in SEMANTIC_MODES:
        raise KDConfigError(
            "score.semantic_mode", f"unknown mode {mode!r}", f"choose one of {', '.join(SEMANTIC_MODES)}"
        )
    widths = sorted(set(int(w) for w in student_widths))
    differ = [w for w in widths if w != teacher_width]
    if mode == "channel" and differ:
        raise KDConfigError(
            "score.semantic_mode",
            f"channel mode needs every candidate's final width to equal the teacher's {teacher_width}, and the "
            f"search space has {differ}",
            "use semantic_mode auto or class_gram (K x K class Gram, width-agnostic), or fix the space's final width",
        )
    if mode == "auto":
        if differ:
            return "class_gram", (
                f"semantic similarity: candidate final widths {widths} differ from the teacher's {teacher_width}; "
                "using the class-Gram fallback (K x K, width-agnostic; a library extension, not the paper's metric)"
            )
        return "channel", None
    return mode, None


# ---------------------------------------------------------------------------------------------- helpers
def pre_pool_tap(model: nn.Module) -> str:
    """The tap of the features before global average pooling: ``avgpool:input`` (the zoo's convention), else
    ``global_pooling:input``, else the classifier's input ``fc:input`` (networks without a feature map)."""
    names = {name for name, _ in model.named_modules()}
    for candidate in ("avgpool", "global_pooling"):
        if candidate in names:
            return f"{candidate}:input"
    if "fc" in names:
        return "fc:input"
    raise KDConfigError(
        "score.feature_tap",
        f"{type(model).__name__} has no avgpool, global_pooling or fc module",
        "name the pre-pooling module, e.g. feature_tap: 'layer4'",
    )


def classifier_of(model: nn.Module, name: str = "fc") -> nn.Linear:
    """The ``nn.Linear`` classifier called ``name`` (the zoo calls it ``fc``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise KDConfigError(
            "score.classifier",
            f"{type(model).__name__} has no nn.Linear called {name!r}",
            "name the classifier (the kd-lightning zoo calls it fc)",
        )
    return module


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm in train mode (batch statistics, as the official code), dropout off; the mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _gradient_and_feature(
    model: nn.Module, x: Tensor, y: Tensor, classifier: str, feature_tap: str
) -> tuple[Tensor, Tensor, int]:
    """``(dCE/dW_classifier [K, C], pre-pooling feature, C)`` of one forward/backward (no ``.grad`` touched)."""
    fc = classifier_of(model, classifier)
    taps = FeatureTaps(model, [feature_tap])
    try:
        with scoring_mode(model), torch.enable_grad():
            logits, feats = taps(x)
            loss = F.cross_entropy(logits, y)
            weight = fc.weight
            if not weight.requires_grad:
                raise KDConfigError("score.classifier", f"{classifier}.weight does not require grad", "unfreeze it")
            (grad,) = torch.autograd.grad(loss, weight, allow_unused=False)
    finally:
        taps.remove()
    return grad.detach(), feats[feature_tap].detach(), fc.in_features


# ---------------------------------------------------------------------------------------------- scorer
class DisWOTScorer:
    """DisWOT scores of candidate students against one teacher on fixed mini-batches (Dong et al., CVPR 2023).

    The teacher's classifier-weight gradient and pre-pooling features are computed once per batch; each candidate
    costs one forward and one backward per batch. Scores are averaged over the batches (the paper: one batch).
    Networks run with BatchNorm in train mode and dropout off; the given teacher is copied, never modified.

    Args:
        teacher: the teacher network (random weights, as the paper, or trained).
        batches: ``(x, y)`` mini-batches of real data.
        semantic_weight: weight of ``-D_sem`` (0 leaves it out).
        relation_weight: weight of ``-D_rel`` (0 leaves it out).
        semantic_mode: ``channel`` (the paper; equal final widths), ``class_gram`` (width-agnostic fallback, a
            library extension). ``auto`` is resolved by the caller (:func:`resolve_semantic_mode`); here it means
            ``channel`` for a student of the teacher's width and ``class_gram`` otherwise.
        teacher_classifier: the teacher's ``nn.Linear`` classifier.
        teacher_feature: tap of the teacher's pre-pooling features (``None``: :func:`pre_pool_tap`).
        student_classifier: the students' classifier.
        student_feature: tap of the students' pre-pooling features (``None``: :func:`pre_pool_tap`).

    RECONSTRUCTION: the paper combines both metrics (recalled, not verified; the official searches each use one):
    both weights default to 1 and either can be 0.
    """

    def __init__(
        self,
        teacher: nn.Module,
        batches: Sequence[tuple[Tensor, Tensor]],
        *,
        semantic_weight: float = 1.0,
        relation_weight: float = 1.0,
        semantic_mode: str = "auto",
        teacher_classifier: str = "fc",
        teacher_feature: str | None = None,
        student_classifier: str = "fc",
        student_feature: str | None = None,
    ) -> None:
        if not batches:
            raise KDConfigError("score.batches", "no batch to score on", "give at least one (x, y) batch")
        for name, value in (("semantic_weight", semantic_weight), ("relation_weight", relation_weight)):
            if not math.isfinite(value) or value < 0:
                raise KDConfigError(f"score.{name}", f"must be a finite number >= 0, got {value}", "the paper: 1")
        if semantic_weight == 0 and relation_weight == 0:
            raise KDConfigError(
                "score.semantic_weight", "and score.relation_weight are both 0: nothing to score", "set one > 0"
            )
        if semantic_mode not in SEMANTIC_MODES:
            raise KDConfigError(
                "score.semantic_mode", f"unknown mode {semantic_mode!r}", f"choose one of {', '.join(SEMANTIC_MODES)}"
            )
        self.semantic_weight = float(semantic_weight)
        self.relation_weight = float(relation_weight)
        self.semantic_mode = semantic_mode
        self.student_classifier = student_classifier
        self.student_feature = student_feature
        self.batches = [(x, y) for x, y in batches]
        network = copy.deepcopy(teacher).requires_grad_(True)
        tap = teacher_feature or pre_pool_tap(network)
        stats = [_gradient_and_feature(network, x, y, teacher_classifier, tap) for x, y in self.batches]
        self.teacher_grads = [g for g, _, _ in stats]
        self.teacher_features = [f for _, f, _ in stats]
        self.teacher_width = stats[0][2]

    def mode_for(self, student_width: int) -> str:
        """The semantic mode used for a student of final width ``student_width``."""
        if self.semantic_mode == "auto":
            return "channel" if student_width == self.teacher_width else "class_gram"
        return self.semantic_mode

    @torch.no_grad()
    def score(self, student: nn.Module) -> dict[str, float | str]:
        """``{"score", "semantic", "relation", "semantic_mode"}``: the DisWOT score (higher is better) and its
        two similarity terms (``-D``), averaged over the batches. ``student`` is run as it is (its ``.grad`` and
        weights are untouched; BatchNorm running statistics do change)."""
        tap = self.student_feature or pre_pool_tap(student)
        semantic, relation = [], []
        mode = "none"
        for (x, y), g_t, f_t in zip(self.batches, self.teacher_grads, self.teacher_features):
            g_s, f_s, width = _gradient_and_feature(student, x, y, self.student_classifier, tap)
            if self.semantic_weight:
                mode = self.mode_for(width)
                distance = semantic_distance(g_t, g_s) if mode == "channel" else class_gram_distance(g_t, g_s)
                semantic.append(-float(distance))
            if self.relation_weight:
                relation.append(-float(relation_distance(f_t, f_s)))
        sem = sum(semantic) / len(semantic) if semantic else 0.0
        rel = sum(relation) / len(relation) if relation else 0.0
        return {
            "score": self.semantic_weight * sem + self.relation_weight * rel,
            "semantic": sem if semantic else math.nan,
            "relation": rel if relation else math.nan,
            "semantic_mode": mode,
        }


# ---------------------------------------------------------------------------------------------- baselines
def count_cost(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """``{"params", "flops"}`` of ``model`` for one input of ``input_shape`` (no batch dimension).

    FLOPs as ``kd model-stats`` counts them: :class:`~torch.utils.flop_counter.FlopCounterMode` on a batch of one in
    eval mode (matmuls and convolutions; 2 per multiply-accumulate; pooling, normalisation and element-wise
    operations are not counted).
    """
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return {"params": int(params), "flops": int(counter.get_total_flops())}


@torch.no_grad()
def naswot_score(model: nn.Module, x: Tensor) -> float:
    """NASWOT (Mellor et al., ICML 2021): ``log |K_H|`` with ``K_H[i, j] = sum over ReLU units of [c_i = c_j]``,
    ``c`` the binary pattern ``input > 0`` of every ``nn.ReLU`` module on sample ``i`` (``x @ x^T + (1-x)(1-x)^T``
    as the official hook). The network runs as it is (train/eval mode unchanged); ``-inf`` for a singular kernel,
    ``nan`` without ``nn.ReLU`` modules."""
    kernel = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    handles = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        codes = (inputs[0].reshape(inputs[0].shape[0], -1) > 0).to(torch.float64)
        kernel.add_(codes @ codes.T + (1 - codes) @ (1 - codes).T)

    for module in model.modules():
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_hook(hook))
    if not handles:
        return math.nan
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if sign > 0 else -math.inf


@torch.no_grad()
def gaussian_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Zen-NAS's re-initialisation: conv/linear weights ``N(0, 1)``, biases 0, BatchNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.weight.normal_(generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@torch.no_grad()
def zen_score(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 16,
    mixup_gamma: float = 1e-2,
    repeat: int = 1,
    feature_tap: str | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """A Zen-score proxy (Lin et al., Zen-NAS, ICCV 2021) of a copy of ``model`` (the model is not changed).

    Per repeat: Gaussian re-initialisation (:func:`gaussian_init_`), Gaussian inputs ``x`` and ``x' = x + gamma e``;
    ``Delta = mean over samples of sum |f(x) - f(x')|`` of the pre-pooling features ``f``; score
    ``log Delta + sum over BatchNorm layers of log sqrt(mean batch variance of the BN input)``, averaged over repeats.
    RECONSTRUCTION: the official code reads the BN ``running_var`` after the forwards (a momentum blend of the batch
    variance); here the batch variance itself is used. A baseline only.
    """
    net = copy.deepcopy(model)
    tap = feature_tap or pre_pool_tap(net)
    scores = []
    for _ in range(repeat):
        gaussian_init_(net, generator)
        net.train()
        x = torch.randn(batch_size, *input_shape, generator=generator)
        noise = torch.randn(batch_size, *input_shape, generator=generator)
        variances: list[Tensor] = []

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, out: list[Tensor] = variances) -> None:
            h = inputs[0]
            dims = [d for d in range(h.dim()) if d != 1]
            out.append(h.var(dim=dims, unbiased=False).mean())

        handles = [
            m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        taps = FeatureTaps(net, [tap])
        try:
            _, feats = taps(x)
            for handle in handles:
                handle.remove()
            handles = []
            _, feats_mix = taps(x + mixup_gamma * noise)
        finally:
            taps.remove()
            for handle in handles:
                handle.remove()
        f, f_mix = feats[tap], feats_mix[tap]
        delta = (f - f_mix).abs().reshape(f.shape[0], -1).sum(dim=1).mean()
        log_bn = sum((0.5 * torch.log(v.clamp_min(1e-30)) for v in variances), torch.zeros(()))
        scores.append(float(torch.log(delta.clamp_min(1e-30)) + log_bn))
    return sum(scores) / len(scores)
