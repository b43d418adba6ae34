"""KD³: knowledge distillation with webly collected images under distribution shift (Tang, Chen, Niu, Sugiyama,
Gong; ICCV 2023; arXiv 2307.11469)."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.kd3 import (
    CLASSIFIER_ALIGNMENTS,
    ClassifierAlignment,
    MixDistribution,
    WeightNormalization,
    combined_prediction,
    instance_contrastive,
    lambda_schedule,
    projected_classifier_ce,
    select_instances,
    teacher_anchored_contrastive,
    weight_alignment,
    weighted_feature_alignment,
    weighted_kd,
)
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.feature_base import FeatureDistillationModule
from kd_lightning.methods.tasks.classification import regime_parts
from kd_lightning.models.taps import module_names

__all__ = ["KD3"]

PseudoLabels = Literal["combined", "teacher"]
ContrastiveAnchor = Literal["student", "teacher", "both"]
ContrastiveOn = Literal["kept", "all"]


def _submodule(model: nn.Module, path: str, field: str) -> nn.Module:
    """``model.get_submodule(path)``, or a KDConfigError naming ``field`` and close matches."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, module_names(model), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(repr(c) for c in close)}" if close else "no close match"
        raise KDConfigError(
            field,
            f"{type(model).__name__} has no submodule {path!r}; {hint}",
            "list the names with kd_lightning.models.module_names(model)",
        ) from None


class KD3(FeatureDistillationModule):
    """KD³ on an unlabeled transfer set ("web" images whose distribution differs from the teacher's data).

    RECONSTRUCTION: the paper's abstract gives the three components (verified); every formula, threshold and
    weight below is our reconstruction (no official code found; spec ``shared/methods/07_kd3.md``) and is an
    argument. Per step, on the batch ``x`` of the transfer set:

    1. selection: ``p_c = λ_t·softmax(z_T/τ_s) + (1 − λ_t)·softmax(z_S/τ_s)`` with ``λ_t`` linear from
       ``lambda_start`` to ``lambda_end`` over training (:meth:`training_progress`); keep ``x`` when
       ``max p_c ≥ δ``; pseudo-label ``ŷ = argmax p_c`` (or ``argmax p_T``); confidence ``a(x) = max p_c``;
    2. memorisation, on the kept instances: ``kd = mean a(x)·τ²·KL(p_T^τ ‖ p_S^τ)``, ``pseudo_ce = CE(ŷ, z_S)``,
       ``feat = mean a(x)·‖P(φ_S) − φ_T‖²`` (P: a linear projector d_S → d_T built at setup from one probe of
       the penultimate features) and ``cls``: ``CE(ŷ, W_T·P(φ_S) + b_T)`` (``"projected_ce"``, default) or
       ``‖W_S·P⁺ − W_T‖²_F`` (``"weights"``); see :func:`~kd_lightning.losses.kd3.classifier_alignment`;
    3. MixDistribution: a second student forward in which a forward hook on ``mix_layer`` replaces that
       module's output by :class:`~kd_lightning.losses.kd3.MixDistribution` (per-instance channel statistics
       mixed with a random partner's, ``λ ~ Beta(α, α)``, optional statistics noise; the hook exists only for
       that forward, so evaluation never mixes); ``con = InfoNCE(normalize(P(φ_S(x))), normalize(P(φ_S^mix(x))))``
       with the other instances as negatives, or teacher-anchored ``InfoNCE(e', normalize(φ_T(x)))``.

    ``loss = w_kd·kd + w_pce·pseudo_ce + w_feat·feat + w_cls·cls + w_con·con``; a term of weight 0 is neither
    computed nor in the loss dict (``contrastive_weight: 0`` also skips the second forward). Logged:
    ``train/kept_fraction`` (step and epoch), ``train/lambda``, ``train/kept_class/<k>`` (kept instances per
    pseudo-class, summed over the epoch). Outside a Trainer (direct calls) λ is ``lambda_start``.

    Args:
        student, teacher: the networks (classifiers).
        student_feature, teacher_feature: module paths of the features φ (default ``"fc:input"``, the
            classifier's input); flattened to vectors.
        student_classifier, teacher_classifier: module paths of the linear classifiers (``"fc"``).
        mix_layer: student module whose output MixDistribution re-styles (an early conv stage; ``"blocks.0"``).
        temperature: τ of the KD term.
        kd_weight, pseudo_ce_weight, feature_weight, classifier_weight, contrastive_weight: the term weights
            (spec's 1, 1, 1, 1, 0.5; unverified).
        select: keep only instances with ``max p_c ≥ delta`` (``False``: keep every instance).
        delta: δ, the confidence threshold (0.7; unverified).
        lambda_start, lambda_end: λ at the start and end of training (1 → 0.5).
        selection_temperature: τ_s of the probabilities that select (1).
        pseudo_labels: ``"combined"`` (``argmax p_c``) or ``"teacher"`` (``argmax p_T``).
        confidence_weighting: weight the KD and feature terms by ``a(x)`` (``False``: ``a = 1``).
        weight_normalization: ``"count"`` (``Σ a·v / n``, the spec's mean) or ``"weights"`` (``Σ a·v / Σ a``).
        feature_reduction: squared distance per instance averaged (``"mean"``) or summed (``"sum"``) over d_T.
        classifier_alignment: ``"projected_ce"`` or ``"weights"`` (see above).
        contrastive_temperature: τ of InfoNCE (0.1).
        contrastive_anchor: ``"student"`` (clean student embedding), ``"teacher"`` (teacher features) or
            ``"both"`` (their mean).
        contrastive_on: the instances of the contrastive term: ``"kept"`` or ``"all"`` of the batch.
        contrastive_symmetric: also the ``e' → anchor`` direction of InfoNCE.
        mix_alpha: α of Beta(α, α) (0.1).
        mix_noise: DSU-like noise on the mixed statistics (0: none).
        mix_detach_statistics: no gradient through the mixed statistics (MixStyle).
        mix_keep_bn_stats: restore the student's BatchNorm running statistics after the mixed forward (the
            perturbed batch does not enter them).
        projector_bias: bias of the projector P.
        log_class_counts: log ``train/kept_class/<k>`` (one series per class).
        input_shape, clone_features: see :class:`~kd_lightning.methods.feature_base.FeatureDistillationModule`.
        **kwargs: the arguments of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    #: Distils on inputs alone (a transfer set: :class:`~kd_lightning.data.TransferSetDataModule`).
    data_regimes: ClassVar[frozenset[str]] = frozenset({"unlabeled"})

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_feature: str = "fc:input",
        teacher_feature: str = "fc:input",
        student_classifier: str = "fc",
        teacher_classifier: str = "fc",
        mix_layer: str = "blocks.0",
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        pseudo_ce_weight: float = 1.0,
        feature_weight: float = 1.0,
        classifier_weight: float = 1.0,
        contrastive_weight: float = 0.5,
        select: bool = True,
        delta: float = 0.7,
        lambda_start: float = 1.0,
        lambda_end: float = 0.5,
        selection_temperature: float = 1.0,
        pseudo_labels: PseudoLabels = "combined",
        confidence_weighting: bool = True,
        weight_normalization: WeightNormalization = "count",
        feature_reduction: Literal["mean", "sum"] = "mean",
        classifier_alignment: ClassifierAlignment = "projected_ce",
        contrastive_temperature: float = 0.1,
        contrastive_anchor: ContrastiveAnchor = "student",
        contrastive_on: ContrastiveOn = "kept",
        contrastive_symmetric: bool = False,
        mix_alpha: float = 0.1,
        mix_noise: float = 0.0,
        mix_detach_statistics: bool = True,
        mix_keep_bn_stats: bool = True,
        projector_bias: bool = True,
        log_class_counts: bool = True,
        input_shape: Sequence[int] | None = None,
        clone_features: bool = False,
        **kwargs: Any,
    ) -> None:
        check_temperature(temperature)
        check_temperature(selection_temperature, "selection_temperature")
        check_temperature(contrastive_temperature, "contrastive_temperature")
        check_weights(
            kd_weight=kd_weight,
            pseudo_ce_weight=pseudo_ce_weight,
            feature_weight=feature_weight,
            classifier_weight=classifier_weight,
            contrastive_weight=contrastive_weight,
        )
        if not any(
            active(w) for w in (kd_weight, pseudo_ce_weight, feature_weight, classifier_weight, contrastive_weight)
        ):
            raise KDConfigError("kd_weight", "every KD³ term has weight 0", "give at least one term a positive weight")
        for name, value in (("delta", delta), ("lambda_start", lambda_start), ("lambda_end", lambda_end)):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise KDConfigError(name, f"must be in [0, 1], got {value!r}")
        choices: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
            ("pseudo_labels", pseudo_labels, ("combined", "teacher")),
            ("weight_normalization", weight_normalization, ("count", "weights")),
            ("feature_reduction", feature_reduction, ("mean", "sum")),
            ("classifier_alignment", classifier_alignment, CLASSIFIER_ALIGNMENTS),
            ("contrastive_anchor", contrastive_anchor, ("student", "teacher", "both")),
            ("contrastive_on", contrastive_on, ("kept", "all")),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise KDConfigError(name, f"must be one of {list(allowed)}, got {value!r}")
        # load_from_checkpoint passes back the base's recorded student_layers/teacher_layers: they must be ours.
        for field, given, path in (
            ("student_layers", kwargs.pop("student_layers", None), student_feature),
            ("teacher_layers", kwargs.pop("teacher_layers", None), teacher_feature),
        ):
            if given is not None and list(given) != [path]:
                raise KDConfigError(
                    field, f"KD3 taps one feature per network, got {list(given)}", "set student_feature/teacher_feature"
                )
        for field, network, path in (
            ("student_feature", student, student_feature),
            ("teacher_feature", teacher, teacher_feature),
        ):
            _submodule(network, path.rpartition(":")[0] if path.endswith((":input", ":output")) else path, field)
        super().__init__(
            student,
            teacher,
            student_layers=[student_feature],
            teacher_layers=[teacher_feature],
            clone_features=clone_features,
            **kwargs,
        )
        needs_classifier = active(classifier_weight)
        if needs_classifier and classifier_alignment == "weights":
            _submodule(student, student_classifier, "student_classifier")
        if needs_classifier:
            _submodule(teacher, teacher_classifier, "teacher_classifier")
        if active(contrastive_weight):
            _submodule(student, mix_layer, "mix_layer")
        self.student_feature = student_feature
        self.teacher_feature = teacher_feature
        self.student_classifier = student_classifier
        self.teacher_classifier = teacher_classifier
        self.mix_layer = mix_layer
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.pseudo_ce_weight = pseudo_ce_weight
        self.feature_weight = feature_weight
        self.classifier_weight = classifier_weight
        self.contrastive_weight = contrastive_weight
        self.select = select
        self.delta = delta
        self.lambda_start = lambda_start
        self.lambda_end = lambda_end
        self.selection_temperature = selection_temperature
        self.pseudo_labels = pseudo_labels
        self.confidence_weighting = confidence_weighting
        self.weight_normalization: WeightNormalization = weight_normalization
        self.feature_reduction: Literal["mean", "sum"] = feature_reduction
        self.classifier_alignment: ClassifierAlignment = classifier_alignment
        self.contrastive_temperature = contrastive_temperature
        self.contrastive_anchor = contrastive_anchor
        self.contrastive_on = contrastive_on
        self.contrastive_symmetric = contrastive_symmetric
        self.mix_keep_bn_stats = mix_keep_bn_stats
        self.projector_bias = projector_bias
        self.log_class_counts = log_class_counts
        self.mixer = MixDistribution(mix_alpha, mix_noise, detach_statistics=mix_detach_statistics)
        self.projector: nn.Linear | None = None
        if input_shape is not None:
            self.build_from_input(tuple(input_shape))

    # ------------------------------------------------------------------ parts
    @property
    def needs_projector(self) -> bool:
        """Whether a term uses P (feature, classifier or contrastive alignment)."""
        return any(active(w) for w in (self.feature_weight, self.classifier_weight, self.contrastive_weight))

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """The projector ``P = nn.Linear(d_S, d_T)`` from the probed feature sizes (and, for the ``"weights"``
        alignment, a check that the classifiers' weights fit ``[K, d_S]`` and ``[K, d_T]``)."""
        d_s, d_t = student_shapes[0].numel(), teacher_shapes[0].numel()
        self.projector = nn.Linear(d_s, d_t, bias=self.projector_bias)
        if active(self.classifier_weight) and self.classifier_alignment == "weights":
            for field, network, path, d in (
                ("student_classifier", self.student, self.student_classifier, d_s),
                ("teacher_classifier", self.teacher, self.teacher_classifier, d_t),
            ):
                weight = getattr(_submodule(network, path, field), "weight", None)
                if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != d:
                    got = tuple(weight.shape) if isinstance(weight, Tensor) else "no weight"
                    raise KDConfigError(
                        f"model.init_args.{field}",
                        f"classifier_alignment 'weights' needs a linear classifier with a [K, {d}] weight at "
                        f"{path!r} (the feature's size), got {got}",
                        "point it at the linear layer that reads the feature, or use 'projected_ce'",
                    )

    # ------------------------------------------------------------------ schedule and logging
    def current_lambda(self) -> float:
        """λ_t of the combined prediction at the current training progress."""
        progress = self.training_progress() if self._trainer is not None else 0.0
        return lambda_schedule(progress, self.lambda_start, self.lambda_end)

    def _log_selection(self, mask: Tensor, labels: Tensor, lam: float) -> None:
        if self._trainer is None:
            return
        kept = mask.float().mean()
        self.log("train/kept_fraction", kept, on_step=True, on_epoch=True, batch_size=mask.numel())
        self.log("train/lambda", lam, on_step=True, on_epoch=False, batch_size=1)
        if self.log_class_counts and self.num_classes is not None:
            counts = torch.bincount(labels[mask], minlength=int(self.num_classes)).float()
            for k in range(int(self.num_classes)):
                self.log(f"train/kept_class/{k}", counts[k], on_step=False, on_epoch=True, reduce_fx="sum")

    # ------------------------------------------------------------------ MixDistribution forward
    @contextlib.contextmanager
    def mixing(self) -> Iterator[None]:
        """Within the block the student's ``mix_layer`` output is re-styled by MixDistribution (the hook is
        removed on exit; the BatchNorm running statistics are restored when ``mix_keep_bn_stats``)."""
        module = _submodule(self.student, self.mix_layer, "mix_layer")
        # The mixed forward updates throw-away copies of the running statistics: the originals are swapped back
        # untouched (an in-place restore would invalidate the clean forward's autograd graph, which saved them).
        saved: list[tuple[nn.Module, dict[str, Tensor]]] = []
        if self.mix_keep_bn_stats:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
                    originals = {k: v for k, v in m.named_buffers(recurse=False) if v is not None}
                    saved.append((m, originals))
                    for k, v in originals.items():
                        setattr(m, k, v.detach().clone())
        handle = module.register_forward_hook(self.mixer.hook)
        try:
            yield
        finally:
            handle.remove()
            for m, originals in saved:
                for k, v in originals.items():
                    setattr(m, k, v)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        labeled, unlabeled = regime_parts(batch)
        part = unlabeled if unlabeled is not None else labeled
        assert part is not None
        x = part[0]
        student_logits, student_feats, teacher_logits, teacher_feats = self.forward_features(x)
        return (self.kd3_loss(x, student_logits, student_feats[0], teacher_logits, teacher_feats[0]),)

    def feature_loss(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        batch: Any,
    ) -> dict[str, Tensor]:
        """:meth:`kd3_loss` of the batch's inputs (``target`` is not used: KD³ trains without labels)."""
        return self.kd3_loss(self.inputs_of(batch), student_logits, student_feats[0], teacher_logits, teacher_feats[0])

    def selection(self, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(mask, pseudo_labels, confidence, λ_t)`` of a batch: the instances kept by the combined prediction
        (all of them when ``select`` is off), their pseudo-labels and confidences ``a(x) = max p_c``."""
        lam = self.current_lambda()
        p_t = F.softmax(teacher_logits.detach().float() / self.selection_temperature, dim=-1)
        p_s = F.softmax(student_logits.detach().float() / self.selection_temperature, dim=-1)
        p_c = combined_prediction(p_t, p_s, lam)
        mask, labels, confidence = select_instances(
            p_c, self.delta if self.select else 0.0, p_t if self.pseudo_labels == "teacher" else None
        )
        return mask, labels, confidence, lam

    def kd3_loss(
        self,
        x: Tensor,
        student_logits: Tensor,
        student_feature: Tensor,
        teacher_logits: Tensor,
        teacher_feature: Tensor,
    ) -> dict[str, Tensor]:
        """The weighted KD³ terms of a batch ``x`` from the clean forwards (see the class docstring)."""
        phi_s, phi_t = student_feature.flatten(1), teacher_feature.flatten(1).detach()
        teacher_logits = teacher_logits.detach().float()
        mask, labels, confidence, lam = self.selection(student_logits, teacher_logits)
        self._log_selection(mask, labels, lam)
        keep = mask.nonzero().squeeze(1)
        weights = confidence[keep] if self.confidence_weighting else None
        y = labels[keep]
        terms: dict[str, Tensor] = {}
        if active(self.kd_weight) or active(self.pseudo_ce_weight):
            memo = weighted_kd(
                student_logits[keep],
                teacher_logits[keep],
                y,
                weights,
                self.temperature,
                self.kd_weight,
                self.pseudo_ce_weight,
                self.weight_normalization,
            )
            terms.update({k: v for k, v in memo.items() if k != "loss"})  # already weighted
        projected = self.projector(phi_s) if self.projector is not None and self.needs_projector else None
        if active(self.feature_weight):
            assert projected is not None, "the projector is built at setup (or with input_shape)"
            terms["feat"] = self.feature_weight * weighted_feature_alignment(
                projected[keep], phi_t[keep], weights, self.feature_reduction, self.weight_normalization
            )
        if active(self.classifier_weight):
            assert self.projector is not None and projected is not None
            if self.classifier_alignment == "projected_ce":
                head = self.teacher.get_submodule(self.teacher_classifier)
                cls = projected_classifier_ce(projected[keep], head, y)
            else:
                cls = weight_alignment(
                    self.student.get_submodule(self.student_classifier).weight,
                    self.projector.weight,
                    self.teacher.get_submodule(self.teacher_classifier).weight,
                )
            terms["cls"] = self.classifier_weight * cls
        if active(self.contrastive_weight):
            assert projected is not None
            terms["con"] = self.contrastive_weight * self.contrastive_term(x, projected, phi_t, keep)
        return weighted_terms(terms)

    def contrastive_term(self, x: Tensor, projected: Tensor, teacher_feature: Tensor, keep: Tensor) -> Tensor:
        """InfoNCE between the clean embeddings (student's projected, or the teacher's features) and those of a
        MixDistribution forward of the same instances (``contrastive_on`` of them)."""
        assert self.projector is not None
        if self.contrastive_on == "kept":
            x, projected, teacher_feature = x[keep], projected[keep], teacher_feature[keep]
        if x.shape[0] < 2:  # no negatives: a zero that keeps the graph
            return projected.sum() * 0.0
        with self.mixing():
            _, feats = self.student_taps(x)
        e_mix = self.projector(feats[self.student_feature].flatten(1))
        losses = []
        if self.contrastive_anchor in ("student", "both"):
            losses.append(
                instance_contrastive(
                    projected, e_mix, self.contrastive_temperature, symmetric=self.contrastive_symmetric
                )
            )
        if self.contrastive_anchor in ("teacher", "both"):
            losses.append(
                teacher_anchored_contrastive(
                    e_mix, teacher_feature, self.contrastive_temperature, symmetric=self.contrastive_symmetric
                )
            )
        return torch.stack(losses).mean()
