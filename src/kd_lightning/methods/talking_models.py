"""Talking Models (Zhao, Liu, Gui, An, Hong, Chi; arXiv 2310.03188): distillation as a conversation in a shared
message space between a frozen teacher and a downstream student."""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, label_cross_entropy
from kd_lightning.losses.talking import (
    MessageCoder,
    MessageEncoder,
    autoencoding_loss,
    interactive_terms,
    message_variance_loss,
    translation_loss,
)
from kd_lightning.losses.terms import active, check_weights, weighted_terms
from kd_lightning.methods.core import AUTOCAST_DTYPES
from kd_lightning.methods.feature_base import FeatureDistillationModule
from kd_lightning.models.substitute import resolve_layer, run_with_substitute
from kd_lightning.models.taps import UnknownModuleError

__all__ = ["TalkingModels"]

TeacherHead = Literal["own", "new"]


class TalkingModels(FeatureDistillationModule):
    """Talking Models: teacher and student talk through encoders/decoders into one message space.

    With ``h_S``, ``h_T`` the tapped hidden states (``student_layer``, ``teacher_layer``), ``Enc``/``Dec`` the
    message coders (:class:`~kd_lightning.losses.talking.MessageCoder`, ``d → 2m → m`` with LayerNorm on the
    message, ``m → 2m → d``), ``S_{>l}`` the rest of the student after its tap (run on a substituted hidden
    state, :func:`~kd_lightning.models.substitute.run_with_substitute`) and ``z_T`` the teacher's prediction
    ``H_T(T_up(h_T))``::

        L = w_task·CE(y, S(x))
          + a·[mean((Dec_S(Enc_S(h_S)) − h_S)²) + mean((Dec_T(Enc_T(h_T)) − h_T)²)]            (ae)
          + b·[mean((ĥ_S − sg(h_S))²) + w_t2s_task·CE(y, S_{>l}(ĥ_S))],  ĥ_S = Dec_S(Enc_T(h_T))  (t2s, t2s_task)
          + c·[w_ic·CE(y, z) + w_ik·τ²·KL(softmax(z_T/τ) ‖ softmax(z/τ))]                        (int_ce, int_kd)
          + w_head·CE(y, H_T(f_T))            (only with teacher_head "new": H_T's own training)
          + w_var·Σ_{m ∈ {m_S, m_T}} mean_j relu(γ − std_b(m_j))                                 (var, default off)

    where the interactive round is: the student asks ``m_S = Enc_S(h_S)``; the teacher interprets it,
    ``h̃_T = Dec_T(m_S)``, continues its own computation from its tap to ``teacher_response_layer``
    (``T_{l_T..r}(h̃_T)``; with no response layer its answer is ``h̃_T`` itself) and answers
    ``r_T = Enc_R(·)`` (``Enc_R = Enc_T`` when the response layer is the tap); the student decodes
    ``ȟ_S = Dec_S(r_T)`` and predicts ``z = S_{>l}(ȟ_S)``. Gradients reach the student's backbone through
    ``CE(y, S(x))`` and through ``Enc_S`` in the interactive round (and through L_ae only with
    ``ae_student_grad``, through L_t2s only with ``t2s_detach_student: false``); they pass through the frozen
    teacher layers to ``Dec_T`` and ``Enc_S`` without changing them. Inference uses the student alone.
    Cost per step: one teacher and one student forward, up to two more student forwards on decoded states (their
    layers before the tap without autograd) and, with a response layer, a teacher forward with autograd to its
    input (``compile_student``/``compile_teacher`` are untested with the substitution hooks).

    VERIFIED (abstract): encoders to a shared message space and decoders back, for both models; the teacher
    interprets the student's messages and answers. RECONSTRUCTION (paper body unavailable, every choice an
    argument): which layers talk (default both penultimate features), ``m`` (128), the coder MLPs, the
    loss list and weights (``a = b = c = 1``, ``τ = 2``), MSE as the reconstruction distance, the
    stop-gradients, H_T (``teacher_head``: the teacher's own frozen classifier, or a new trainable linear head
    trained by CE on the downstream labels), the optional teacher-side warm-up and the variance regulariser.
    The teacher backbone is always frozen and in eval mode; coders and H_T are parts of this module.

    Args:
        student, teacher: the networks (the teacher is frozen).
        student_layer: the student's tap (module path; ``"path:input"`` = that module's input). Hidden states
            of any shape are flattened for the coders and reshaped back for ``S_{>l}``.
        teacher_layer: the teacher's tap.
        teacher_response_layer: a later teacher tap at which the teacher's answer is read after running on
            ``h̃_T`` (its own encoder ``Enc_R`` is built); ``None``: the answer is ``h̃_T`` (right for a tap on
            the last hidden layer, the default).
        teacher_head: ``"own"`` (z_T = the frozen teacher's logits) or ``"new"`` (z_T = a new trainable linear
            head H_T on the input of ``teacher_head_layer``, trained by ``head_weight``·CE).
        teacher_head_layer: the teacher's classifier module (H_T reads its input); used with ``"new"``.
        message_dim: m.
        coder_hidden_dim: the coder MLPs' hidden width (``None``: 2m).
        message_norm: LayerNorm on the messages.
        task_weight: w_task (student CE on the data).
        ae_weight: a.
        t2s_weight: b (L_t2s and, times ``t2s_task_weight``, CE of the translated state).
        t2s_task_weight: w_t2s_task, relative to b.
        int_weight: c.
        int_ce_weight: w_ic, relative to c.
        int_kd_weight: w_ik, relative to c.
        head_weight: w_head (CE of a new H_T; unused with ``"own"``).
        variance_weight: w_var (0: off; LayerNorm and L_ae already keep messages from collapsing here).
        variance_target: γ, the wanted per-dimension std of messages over a batch.
        temperature: τ.
        ae_student_grad: let L_ae's gradient reach the student's backbone (default: coders only).
        t2s_detach_student: stop-gradient on h_S in L_t2s, as in the spec (``False`` pulls h_S toward ĥ_S).
        teacher_coder_trainable: whether the teacher's encoder/decoder (and response encoder) train; ``False``
            keeps them at their (seeded) initialisation, so only the student side adapts to the message space.
        teacher_warmup_epochs: first epochs in which only the teacher side trains (Enc_T/Dec_T by L_ae, a new
            H_T by its CE); the student is not run.
        student_rest_grad: the runs of ``S_{>l}`` on decoded states (t2s_task, the interactive round) update
            the student's layers after the tap (the spec's literal reading). ``False``: those layers act there as
            a fixed read-out and the gradient only reaches the decoded state, so the coders cannot solve the
            decoded tasks by scaling decoded states up while the student's own logits flatten (seen on digits).
        **kwargs: ``input_shape``, ``clone_features`` and the arguments of :class:`ClassificationDistillation`.
    """

    data_regimes: ClassVar[frozenset[str]] = frozenset({"supervised"})

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layer: str = "fc:input",
        teacher_layer: str = "fc:input",
        teacher_response_layer: str | None = None,
        teacher_head: TeacherHead = "own",
        teacher_head_layer: str = "fc",
        message_dim: int = 128,
        coder_hidden_dim: int | None = None,
        message_norm: bool = True,
        task_weight: float = 1.0,
        ae_weight: float = 1.0,
        t2s_weight: float = 1.0,
        t2s_task_weight: float = 1.0,
        int_weight: float = 1.0,
        int_ce_weight: float = 1.0,
        int_kd_weight: float = 1.0,
        head_weight: float = 1.0,
        variance_weight: float = 0.0,
        variance_target: float = 1.0,
        temperature: float = 2.0,
        ae_student_grad: bool = False,
        t2s_detach_student: bool = True,
        teacher_warmup_epochs: int = 0,
        teacher_coder_trainable: bool = True,
        student_rest_grad: bool = True,
        **kwargs: Any,
    ) -> None:
        if teacher_head not in ("own", "new"):
            raise KDConfigError("teacher_head", f"must be 'own' or 'new', got {teacher_head!r}")
        for name, value in (("message_dim", message_dim), ("coder_hidden_dim", coder_hidden_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise KDConfigError(name, f"must be an integer >= 1, got {value!r}")
        check_weights(
            task_weight=task_weight,
            ae_weight=ae_weight,
            t2s_weight=t2s_weight,
            t2s_task_weight=t2s_task_weight,
            int_weight=int_weight,
            int_ce_weight=int_ce_weight,
            int_kd_weight=int_kd_weight,
            head_weight=head_weight,
            variance_weight=variance_weight,
            variance_target=variance_target,
        )
        check_temperature(temperature)
        if not isinstance(teacher_warmup_epochs, int) or teacher_warmup_epochs < 0:
            raise KDConfigError("teacher_warmup_epochs", f"must be an integer >= 0, got {teacher_warmup_epochs!r}")
        new_head = teacher_head == "new"
        if teacher_warmup_epochs and not (active(ae_weight) or (new_head and active(head_weight))):
            raise KDConfigError(
                "teacher_warmup_epochs",
                f"is {teacher_warmup_epochs} but nothing trains in the warm-up (ae_weight is 0 and there is no new "
                "teacher head)",
                "set ae_weight > 0, teacher_head: new, or teacher_warmup_epochs: 0",
            )
        head_input = f"{teacher_head_layer}:input" if new_head else None
        self._check_layer(student, "student_layer", student_layer)
        for field, name in (
            ("teacher_layer", teacher_layer),
            ("teacher_response_layer", teacher_response_layer),
            ("teacher_head_layer", teacher_head_layer if new_head else None),
        ):
            self._check_layer(teacher, field, name)
        # Read by build_parts, which runs inside super().__init__ when input_shape is given.
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.teacher_response_layer = teacher_response_layer
        self.teacher_head = teacher_head
        self.teacher_head_layer = teacher_head_layer
        self.teacher_head_input = head_input
        self.message_dim = message_dim
        self.coder_hidden_dim = coder_hidden_dim
        self.message_norm = message_norm
        self.term_weights = {
            "ce": task_weight,
            "ae": ae_weight,
            "t2s": t2s_weight,
            "t2s_task": t2s_weight * t2s_task_weight,
            "int_ce": int_weight * int_ce_weight,
            "int_kd": int_weight * int_kd_weight,
            "head": head_weight if new_head else 0.0,
            "var": variance_weight,
        }
        if not any(active(w) for w in self.term_weights.values()):
            raise KDConfigError("task_weight", "every loss weight is 0", "give at least one term a positive weight")
        self.variance_target = variance_target
        self.temperature = temperature
        self.ae_student_grad = ae_student_grad
        self.t2s_detach_student = t2s_detach_student
        self.teacher_warmup_epochs = teacher_warmup_epochs
        self.teacher_coder_trainable = teacher_coder_trainable
        self.student_rest_grad = student_rest_grad
        teacher_taps = [teacher_layer, teacher_response_layer, head_input]
        super().__init__(
            student,
            teacher,
            student_layers=[student_layer],
            teacher_layers=[name for name in teacher_taps if name is not None],
            **kwargs,
        )

    @staticmethod
    def _check_layer(model: Any, field: str, name: str | None) -> None:
        """``name`` must be a tap of ``model`` (networks that are not modules are refused by the base class)."""
        if name is None or not isinstance(model, nn.Module):
            return
        if not isinstance(name, str):
            raise KDConfigError(field, f"must be a module path (a string), got {type(name).__name__}")
        try:
            resolve_layer(model, name)
        except (UnknownModuleError, KDConfigError) as err:
            raise KDConfigError(field, str(err), "pick a module path of the network") from None

    # ------------------------------------------------------------------ parts
    def probe_shapes(self, input_shape: tuple[int, ...]) -> dict[str, Any]:
        """The taps' shapes and the teacher's class count (the size of a new H_T)."""
        shapes = super().probe_shapes(input_shape)
        with torch.no_grad():
            out = self.teacher(torch.zeros(2, *input_shape, device=self.device))
        shapes["teacher_classes"] = int(out.shape[-1])
        return shapes

    def build_parts(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
        """Enc/Dec for both models, ``Enc_R`` for a separate response layer, a new H_T when asked."""
        teacher = dict(zip(self.teacher_taps.names, teacher_shapes, strict=True))
        coder = {"message_dim": self.message_dim, "hidden_dim": self.coder_hidden_dim, "norm": self.message_norm}
        self.student_coder = MessageCoder(student_shapes[0], **coder)
        self.teacher_coder = MessageCoder(teacher[self.teacher_layer], **coder)
        self.response_encoder: nn.Module | None = None
        if self.teacher_response_layer is not None:
            dim = math.prod(teacher[self.teacher_response_layer])
            self.response_encoder = MessageEncoder(dim, self.message_dim, self.coder_hidden_dim, self.message_norm)
        if not self.teacher_coder_trainable:  # the teacher's side of the message space stays at its initialisation
            self.teacher_coder.requires_grad_(False)
            if self.response_encoder is not None:
                self.response_encoder.requires_grad_(False)
        self.teacher_task_head: nn.Module | None = None
        if self.teacher_head_input is not None:
            classes = int(self.feature_shapes["teacher_classes"]) if self.feature_shapes else self.num_classes
            self.teacher_task_head = nn.Linear(math.prod(teacher[self.teacher_head_input]), classes)

    # ------------------------------------------------------------------ forward pieces
    def teacher_pass(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The frozen teacher on ``x``: ``(logits, {tap: detached feature})``, without autograd."""
        taps = self.teacher_taps
        try:
            with taps:
                logits = self.run_teacher(x)
                feats = taps.features
        finally:
            taps.clear()
        return logits, feats

    def student_rest(self, x: Tensor, hidden: Tensor) -> Tensor:
        """``S_{>l}(hidden)``: the student's logits with ``hidden`` in place of its tapped state.

        Runs on copies of the student's buffers: its BatchNorm statistics come from real inputs only (and the
        real forward's saved running statistics stay intact for its backward)."""
        return run_with_substitute(
            self.student,
            self.student_layer,
            x,
            hidden,
            grad_from_tap=True,
            preserve_buffers=True,
            constant_params=not self.student_rest_grad,
        )

    def teacher_response(self, x: Tensor, interpreted: Tensor) -> Tensor:
        """The teacher's answer state: its layers from ``teacher_layer`` to ``teacher_response_layer`` on
        ``interpreted`` (frozen weights, gradient to ``interpreted``); ``interpreted`` itself without one."""
        if self.teacher_response_layer is None:
            return interpreted
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            out = run_with_substitute(
                self.teacher, self.teacher_layer, x, interpreted, until=self.teacher_response_layer, grad_from_tap=True
            )
        return out.float() if dtype is not None else out

    def teacher_prediction(self, teacher_logits: Tensor, teacher_feats: dict[str, Tensor]) -> Tensor:
        """z_T: the teacher's own logits, or a new H_T on its classifier input."""
        if self.teacher_task_head is None:
            return teacher_logits
        return self.teacher_task_head(teacher_feats[self.teacher_head_input].flatten(1))

    def in_warmup(self) -> bool:
        """Whether this epoch is a teacher-side warm-up epoch."""
        return self.current_epoch < self.teacher_warmup_epochs

    # ------------------------------------------------------------------ loss
    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        x, y = self.unpack(batch)
        self.check_targets(y)
        w = self.term_weights
        teacher_logits, teacher_feats = self.teacher_pass(x)
        h_t = teacher_feats[self.teacher_layer]
        terms: dict[str, Tensor] = {}
        if active(w["head"]):
            terms["head"] = label_cross_entropy(self.teacher_prediction(teacher_logits, teacher_feats), y)
        if self.in_warmup():
            if active(w["ae"]):
                terms["ae"] = autoencoding_loss(self.teacher_coder, h_t)
            return (weighted_terms(terms, w),)

        student_logits, student_feats = self.student_taps(x)
        h_s = student_feats[self.student_layer]
        if active(w["ce"]):
            terms["ce"] = label_cross_entropy(student_logits, y)
        if active(w["ae"]):
            terms["ae"] = autoencoding_loss(
                self.student_coder, h_s, detach_input=not self.ae_student_grad
            ) + autoencoding_loss(self.teacher_coder, h_t)
        m_t = m_s = None
        if active(w["t2s"]) or active(w["t2s_task"]):
            m_t = self.teacher_coder.encode(h_t)
            translated = self.student_coder.decode(m_t)
            if active(w["t2s"]):
                terms["t2s"] = translation_loss(translated, h_s, self.t2s_detach_student)
            if active(w["t2s_task"]):
                terms["t2s_task"] = label_cross_entropy(self.student_rest(x, translated), y)
        if active(w["int_ce"]) or active(w["int_kd"]):
            m_s = self.student_coder.encode(h_s)
            answer_state = self.teacher_response(x, self.teacher_coder.decode(m_s))
            encoder = self.response_encoder if self.response_encoder is not None else self.teacher_coder.encoder
            z = self.student_rest(x, self.student_coder.decode(encoder(answer_state.flatten(1))))
            z_t = self.teacher_prediction(teacher_logits, teacher_feats).detach() if active(w["int_kd"]) else None
            terms.update(interactive_terms(z, y if active(w["int_ce"]) else None, z_t, self.temperature))
        if active(w["var"]):
            m_s = self.student_coder.encode(h_s) if m_s is None else m_s
            m_t = self.teacher_coder.encode(h_t) if m_t is None else m_t
            terms["var"] = message_variance_loss(m_s, self.variance_target) + message_variance_loss(
                m_t, self.variance_target
            )
        return weighted_terms(terms, w), student_logits

    def feature_loss(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Unused: :meth:`training_loss` runs the whole conversation."""
        raise NotImplementedError("TalkingModels computes its loss in training_loss")
