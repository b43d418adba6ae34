"""BD-KD: Balancing the Divergences for Online KD (Amara, Sepahvand, Meyer, Gross, Clark; arXiv 2212.12965)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.bd_kd import BDKDLoss
from kd_lightning.methods.tasks.classification import ClassificationDistillation


class BDKD(ClassificationDistillation):
    """BD-KD, online: teacher and student train together; **RECONSTRUCTION / UNVERIFIED** loss.

    Verified (abstract level): online KD; the student's KL is a per-sample mix of forward and reverse
    KL guided by the teacher-student entropy gap; the teacher is regularised by a reverse KL; the aim
    is accuracy *and* calibration. Reconstructed (no official code, paper body not read): the rule
    below, its weights and the direction of the teacher's KL (all arguments). With
    ``Δ_i = H(p_S,i) − H(p_T,i)`` at τ (detached)::

        hard:    w_r = λ_r·1[Δ > 0] + λ_0·1[Δ ≤ 0],   w_f = λ_f·1[Δ ≤ 0] + λ_0·1[Δ > 0]
        sigmoid: w_r = λ_r·σ(κΔ),                      w_f = λ_f·(1 − σ(κΔ))
        L_S = w_CE·CE(z_S, y) + α·τ²·mean_i[w_f·KL(p_T‖p_S) + w_r·KL(p_S‖p_T)]     (teacher detached)
        L_T = w_CE·CE(z_T, y) + β·τ²·mean_i KL(p_S‖p_T)  ("reverse"; or KL(p_T‖p_S))  (student detached)

    Training uses manual optimisation with two optimisers: the student's from ``optimizer`` /
    ``lr_scheduler``, the teacher's from ``teacher_optimizer`` / ``teacher_lr_scheduler``. Both
    step once per batch (so Lightning's ``global_step`` advances by 2 per batch; gradient clipping
    and gradient accumulation of the Trainer are not available). The teacher is in train mode while
    training and in eval mode for validation/test and after fit. ``teacher_ckpt`` optionally
    initialises it; without one both networks start from scratch (the CLI trains no teacher first).
    Validation and test log the expected calibration error (15 bins, L1) of both networks:
    ``val/ece``, ``val/teacher_ece``, ``test/ece``, ``test/teacher_ece``.

    Args:
        temperature: τ of the divergences and entropies.
        kd_weight: α, weight of the student's balanced KL.
        teacher_kd_weight: β, weight of the teacher's KL regulariser.
        ce_weight: w_CE of both cross-entropies.
        weighting: ``"hard"`` (switch on the sign of Δ) or ``"sigmoid"`` (smooth; not from the paper).
        forward_weight: λ_f.
        reverse_weight: λ_r.
        other_weight: λ_0, weight of the switched-off divergence (hard rule).
        sharpness: κ (sigmoid rule).
        teacher_kl: ``"reverse"`` = KL(p_S‖p_T) (spec default) or ``"forward"`` = KL(p_T‖p_S).
        teacher_optimizer: the teacher's optimiser; ``None``: the same as ``optimizer``.
        teacher_lr_scheduler: the teacher's scheduler; ``None``: the same as ``lr_scheduler``.
        student, teacher, **kwargs: ``teacher_ckpt``, ``optimizer``, ``lr_scheduler``,
            ``lr_scheduler_interval`` and the rest of :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    trains_teacher = True
    object_arguments = (*ClassificationDistillation.object_arguments, "teacher_optimizer", "teacher_lr_scheduler")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        teacher_kd_weight: float = 1.0,
        ce_weight: float = 1.0,
        weighting: Literal["hard", "sigmoid"] = "hard",
        forward_weight: float = 1.0,
        reverse_weight: float = 1.0,
        other_weight: float = 0.0,
        sharpness: float = 5.0,
        teacher_kl: Literal["reverse", "forward"] = "reverse",
        teacher_optimizer: OptimizerCallable | None = None,
        teacher_lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        try:
            self.criterion = BDKDLoss(
                temperature=temperature,
                kd_weight=kd_weight,
                teacher_kd_weight=teacher_kd_weight,
                ce_weight=ce_weight,
                weighting=weighting,
                forward_weight=forward_weight,
                reverse_weight=reverse_weight,
                other_weight=other_weight,
                sharpness=sharpness,
                teacher_kl=teacher_kl,
            )
        except ValueError as err:
            raise KDConfigError(f"model.init_args.{err}") from None
        self.teacher_optimizer_factory = teacher_optimizer
        self.teacher_lr_scheduler_factory = teacher_lr_scheduler
        self.automatic_optimization = False

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        student_params = self.trainable_parameters()
        teacher_params = [p for p in self.teacher.parameters() if p.requires_grad]
        if not student_params or not teacher_params:
            raise KDConfigError(f"{type(self).__name__} needs trainable parameters in both student and teacher.")
        student_opt = self.make_optimizer(student_params)
        teacher_opt = self.make_optimizer(
            teacher_params, self.teacher_optimizer_factory, "model.init_args.teacher_optimizer"
        )
        student_scheduler = self.make_scheduler(student_opt)
        teacher_scheduler = self.make_scheduler(
            teacher_opt, self.teacher_lr_scheduler_factory, "model.init_args.teacher_lr_scheduler"
        )
        return [student_opt, teacher_opt], [s for s in (student_scheduler, teacher_scheduler) if s is not None]

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list) else [schedulers]

    def _step_schedulers(self) -> None:
        for scheduler in self._schedulers():
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitored = self.trainer.callback_metrics.get("val/loss")
                if monitored is not None:  # no validation yet: nothing to react to
                    scheduler.step(monitored)
            else:
                scheduler.step()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack(batch)
        student_logits = self.student(x)
        teacher_logits = self.teacher(x)
        parts = self.criterion(student_logits, teacher_logits, y)
        self.check_finite(parts, batch, batch_idx)
        student_opt, teacher_opt = self.optimizers()
        student_opt.zero_grad()
        teacher_opt.zero_grad()
        # One backward: the student terms hold the teacher constant and vice versa, so each network
        # receives exactly the gradient of its own objective.
        self.manual_backward(parts["loss"])
        student_opt.step()
        teacher_opt.step()
        if self.lr_scheduler_interval == "step":
            self._step_schedulers()

        batch_size = y.numel()
        w_f, w_r = self.criterion.weights(student_logits, teacher_logits)
        zero = parts["loss"].new_zeros(())  # terms of weight 0 are absent
        extras = {
            "student_loss": sum((parts.get(k, zero) for k in ("ce", "kd_forward", "kd_reverse")), zero),
            "teacher_loss": sum((parts.get(k, zero) for k in ("teacher_ce", "teacher_kl")), zero),
            "reverse_share": (w_r / (w_f + w_r).clamp_min(torch.finfo(w_r.dtype).tiny)).mean(),
        }
        self.log_terms("train", {**parts, **extras}, batch_size=batch_size)
        flat_y = y.reshape(-1)
        for name, logits in (("train_acc", student_logits), ("train_teacher_acc", teacher_logits)):
            self.metrics[name].update(logits.detach().reshape(-1, logits.shape[-1]), flat_y)
            self.log(name.replace("_", "/", 1), self.metrics[name], on_step=False, on_epoch=True)
        return parts["loss"].detach()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.lr_scheduler_interval == "epoch":
            self._step_schedulers()

    def on_fit_end(self) -> None:
        """Leave the teacher in eval mode once training is over (it is a trained network to use)."""
        self.teacher.eval()

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self) -> None:
        super().build_metrics()
        n = int(self.num_classes)
        self.metrics["train_teacher_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        for stage in ("val", "test"):
            for name in ("ece", "teacher_ece"):
                self.metrics[f"{stage}_{name}"] = MulticlassCalibrationError(num_classes=n, n_bins=15, norm="l1")

    def eval_with_teacher(self, y: Tensor, logits: Tensor, teacher_logits: Tensor, stage: str) -> None:
        super().eval_with_teacher(y, logits, teacher_logits, stage)
        flat_y = y.reshape(-1)
        for name, z in (("ece", logits), ("teacher_ece", teacher_logits)):
            probs = z.detach().reshape(-1, z.shape[-1]).float().softmax(-1)  # probabilities, never raw logits
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(probs, flat_y)
            self.log(f"{stage}/{name}", metric, batch_size=flat_y.shape[0])
