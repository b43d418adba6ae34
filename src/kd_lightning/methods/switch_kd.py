"""Switch-KD: visual-switch distillation of vision-language models (Sun et al., CVPR Findings 2026) — a
RECONSTRUCTION."""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bild import DBiLDLoss
from kd_lightning.losses.lm import shift_for_next_token
from kd_lightning.losses.switch_kd import SWITCH_DIVERGENCES, SWITCH_TARGETS, SwitchKDLoss
from kd_lightning.losses.terms import active
from kd_lightning.methods.core import AUTOCAST_DTYPES
from kd_lightning.methods.tasks.language_model import lm_batch
from kd_lightning.methods.tasks.vision_language import VisionLanguageDistillation, batch_images

__all__ = ["SwitchKD", "build_switch_adapter"]

SwitchPoint = Literal["projector", "encoder"]
AlignProjector = Literal["linear", "mlp", "none"]
SWITCH_POINTS = ("projector", "encoder")
ALIGN_PROJECTORS = ("linear", "mlp", "none")


def build_switch_adapter(in_dim: int, out_dim: int, kind: AlignProjector, hidden: int | None = None) -> nn.Module:
    """The trainable alignment adapter ``in_dim -> out_dim``: ``linear``, ``mlp`` (Linear-GELU-Linear, hidden
    ``hidden`` or ``out_dim``) or ``none`` (identity; the dimensions must match)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        width = hidden or out_dim
        return nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise KDConfigError(
                "align_projector",
                f"is 'none' but the student's features are {in_dim}-dimensional and the teacher reads {out_dim}",
                "use align_projector: linear or mlp",
            )
        return nn.Identity()
    raise KDConfigError("align_projector", f"must be one of {list(ALIGN_PROJECTORS)}, got {kind!r}")


class SwitchKD(VisionLanguageDistillation):
    """Switch-KD: SFT + DBiLD token KD + a *visual-switch* term — **RECONSTRUCTION** (no training code released).

    Paper: Sun, Wang, Mao, Wang, Mu, Zheng, Wei, Chen, "Switch-KD: Visual-Switch Knowledge Distillation for
    Vision-Language Models", CVPR Findings 2026, arXiv 2604.14629 (Li Auto; repo ``haoyi199815/Switch-KD``: README,
    inference script only).

    Verified (abstract, arXiv HTML front matter, project page): (1) *Visual-Switch Distillation* "switches the
    student's visual outputs into the teacher's language pathway to construct cross-modal probabilistic references
    for implicit visual knowledge transfer"; the project page adds "switches the student's visual encoder outputs
    into the teacher's language pathway, creating a hybrid inference route where the teacher's language modules
    interpret the student's visual features ... without modifying the student's architecture"; (2) the DBiLD loss
    ("adaptively aligns informative probability regions ... through bidirectional supervision"; README: reverse KL);
    (3) TinyLLaVA 3B -> 0.5B, +3.6 points on 10 benchmarks. A third-party summary (arxivlens) adds that the method
    "requires feature-space and vocabulary consistency between teacher and student". Not found: the exact switch
    point, whether an adapter is used, which pair of distributions the switch term compares, its direction, weights.
    (A third-party pipeline, ``xwx199612/Switch-KD``, not the authors', uses ``L = LM + DBiLD + VSD`` with the
    switched logits precomputed without gradient as a reference for the student's logits: our
    ``switch_target="student"``.)

    Reconstruction, per micro-batch summed over the answer tokens (:class:`~kd_lightning.losses.switch_kd.
    SwitchKDLoss`; the LM task normalises by the token count)::

        z_S  = student(images, text)                      z_T = teacher(images, text)      (no grad)
        v    = adapter(student.visual_tokens(images))                         (switch_point="projector")
             | teacher.projector(adapter(student.encode_images(images)))      (switch_point="encoder")
        z_SW = teacher(visual_embeds=v, text)     (frozen teacher, eval mode, WITH autograd to v)
        L = w_SFT·Σ CE(z_S, y) + w_DBiLD·Σ DBiLD(z_S ‖ z_T) + w_SW·Σ D(z_SW ‖ sg(z_T))

    Default pair (``switch_target="teacher"``): the switched output is trained towards the teacher's own output,
    its gradient running through the frozen teacher LM into the adapter and the student's encoder/projector: the
    student's visual tokens must mean to the teacher's LM what the teacher's own visual tokens mean (the "implicit
    visual knowledge transfer"; the only reading in which the gradient through the teacher trains anything).
    ``switch_target="student"`` is the third-party reading: ``D(z_S ‖ sg(z_SW))``, the switched output a reference
    for the student (computed without autograd; then nothing trains the adapter, so it needs
    ``align_projector: none``). ``switch_weight: 0`` is "Switch-KD without the switch" = SFT + DBiLD token KD (no
    switched forward). The teacher's logits are computed only when a term needs them.

    Teachers stay frozen (``requires_grad`` False, eval mode): no teacher parameter receives a gradient. The
    switched forward needs the live teacher (no offline teacher logits).

    Args:
        student: the VLM to train (:class:`~kd_lightning.models.vlm.VisionLanguageModel`).
        teacher: the frozen VLM teacher.
        dbild: the DBiLD loss (RECONSTRUCTION, :class:`~kd_lightning.losses.bild.DBiLDLoss`: ``mass``, ``k_min``,
            ``k_max``, ``temperature``, ``reverse_weight``, ...) of the DBiLD term and of ``switch_loss: dbild``;
            its ``kd_weight`` scales both, its ``ce_weight`` is unused. ``None``: its defaults.
        switch_point: ``"projector"`` (the student's projected tokens, ``d_S -> d_T`` adapter, teacher LM) or
            ``"encoder"`` (the student's encoder tokens, ``C_S -> C_T`` adapter, the teacher's projector and LM).
            UNVERIFIED.
        align_projector: the adapter, ``"linear"``, ``"mlp"`` or ``"none"`` (dimensions must match). UNVERIFIED.
        adapter_hidden: hidden width of the ``mlp`` adapter (``None``: the output width).
        switch_loss: ``"dbild"`` or ``"kl"`` (forward KL at ``switch_temperature``) for the switch term.
        switch_target: ``"teacher"`` or ``"student"`` (see above). UNVERIFIED.
        switch_temperature: τ of ``switch_loss: kl``.
        sft_weight: w_SFT of the answers' next-token cross-entropy.
        dbild_weight: w_DBiLD of DBiLD(student ‖ teacher).
        switch_weight: w_SW of the switch term (0: no switched forward).
        **kwargs: :class:`~kd_lightning.methods.tasks.vision_language.VisionLanguageDistillation`'s arguments.

    The adapter (``self.switch_adapter``) is built here from the VLMs' ``hidden_size`` / ``vision_dim``, trained
    with the student and saved in checkpoints (frozen when ``switch_weight`` is 0). Logged terms: ``train/sft``,
    ``train/dbild``, ``train/switch``.
    """

    object_arguments: ClassVar[tuple[str, ...]] = (*VisionLanguageDistillation.object_arguments, "dbild")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        dbild: DBiLDLoss | None = None,
        switch_point: SwitchPoint = "projector",
        align_projector: AlignProjector = "linear",
        adapter_hidden: int | None = None,
        switch_loss: Literal["dbild", "kl"] = "dbild",
        switch_target: Literal["teacher", "student"] = "teacher",
        switch_temperature: float = 1.0,
        sft_weight: float = 1.0,
        dbild_weight: float = 1.0,
        switch_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if switch_point not in SWITCH_POINTS:
            raise KDConfigError("switch_point", f"must be one of {list(SWITCH_POINTS)}, got {switch_point!r}")
        if align_projector not in ALIGN_PROJECTORS:
            raise KDConfigError("align_projector", f"must be one of {list(ALIGN_PROJECTORS)}, got {align_projector!r}")
        if switch_loss not in SWITCH_DIVERGENCES:
            raise KDConfigError("switch_loss", f"must be one of {list(SWITCH_DIVERGENCES)}, got {switch_loss!r}")
        if switch_target not in SWITCH_TARGETS:
            raise KDConfigError("switch_target", f"must be one of {list(SWITCH_TARGETS)}, got {switch_target!r}")
        if adapter_hidden is not None and adapter_hidden < 1:
            raise KDConfigError("adapter_hidden", f"must be >= 1, got {adapter_hidden}")
        if dbild is not None and not isinstance(dbild, DBiLDLoss):
            raise KDConfigError("dbild", f"must be a DBiLDLoss, got {type(dbild).__name__}")
        if len(self.teachers) != 1:
            raise KDConfigError("teachers", f"Switch-KD uses one teacher, got {len(self.teachers)}", "give teacher")
        if active(switch_weight) and switch_target == "student" and align_projector != "none":
            raise KDConfigError(
                "align_projector",
                f"is {align_projector!r} but with switch_target: student the switched output is a reference without "
                "gradient, so nothing would train the adapter (it would stay at its random initialisation)",
                "use align_projector: none (matching dimensions) or switch_target: teacher",
            )
        self.criterion = SwitchKDLoss(
            dbild, switch_loss, switch_target, switch_temperature, sft_weight, dbild_weight, switch_weight
        )
        self.switch_point = switch_point
        self.align_projector = align_projector
        self.switch_loss = switch_loss
        self.switch_target = switch_target
        self.sft_weight = sft_weight
        self.dbild_weight = dbild_weight
        self.switch_weight = switch_weight
        s, t = self.student, self.teacher
        if switch_point == "projector":
            dims = int(s.hidden_size), int(t.hidden_size)
        else:
            dims = int(s.vision_dim), int(t.vision_dim)
        self.switch_adapter = build_switch_adapter(*dims, align_projector, adapter_hidden)
        if not active(switch_weight):  # unused: kept out of the optimiser (and of DDP's unused-parameter check)
            self.switch_adapter.requires_grad_(False)

    # ------------------------------------------------------------------ the visual switch
    def student_visual(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(encoder tokens [B, N_v, C_S], projected tokens [B, N_v, d_S])`` of the student (one encoder pass)."""
        features = self.student.encode_images(images)
        return features, self.student.projector(features)

    def switched_inputs(self, features: Tensor, tokens: Tensor) -> Tensor:
        """The visual embeddings ``[B, N_v, d_T]`` the teacher's LM reads in the switched forward."""
        if self.switch_point == "projector":
            return self.switch_adapter(tokens)
        return self.teacher.projector(self.switch_adapter(features))

    def switched_logits(
        self, input_ids: Tensor, attention_mask: Tensor | None, features: Tensor, tokens: Tensor
    ) -> Tensor:
        """The frozen teacher VLM on the student's (adapted) visual tokens: ``[B, T, V]`` at the text positions.

        Runs with autograd (not :meth:`run_teacher`'s ``no_grad``) when the switch term trains through it, under
        ``teacher_precision``'s autocast; the teacher stays in eval mode and its parameters frozen.
        """
        grad = torch.enable_grad() if self.switch_target == "teacher" else torch.no_grad()
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        device = tokens.device.type
        cast = torch.autocast(device_type=device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with grad, cast:
            visual = self.switched_inputs(features, tokens)
            out = self.teacher(input_ids, attention_mask=attention_mask, visual_embeds=visual)
        return out.float() if dtype is not None else out

    # ------------------------------------------------------------------ training
    def token_loss_sums(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        input_ids, attention_mask, labels = lm_batch(batch)
        images = batch_images(batch)
        features, tokens = self.student_visual(images)
        student = self.student(input_ids, attention_mask=attention_mask, visual_embeds=tokens)
        crit = self.criterion
        needs_teacher = active(crit.dbild_weight) or (active(crit.switch_weight) and crit.switch_target == "teacher")
        teacher = self.teacher_logits(batch) if needs_teacher else student.detach()
        switched = None
        if active(crit.switch_weight):
            switched = self.switched_logits(input_ids, attention_mask, features, tokens)
            switched = self.align(student, switched)[1]
        student, teacher = self.align(student, teacher)
        s, y, mask = shift_for_next_token(student, labels)
        sums = crit.token_sums(s, teacher[:, :-1], y, mask, None if switched is None else switched[:, :-1])
        return sums, mask.sum()
