"""Diffusion task sibling: :class:`DiffusionDistillation` (data-free few-step students of a diffusion teacher) and
:class:`DiffusionSupervised` (the denoising objective that trains a missing diffusion teacher).

What the task adds to the core:

- **Teachers**: the diffusion teacher (``teacher``, or ``teachers.diffusion``; a
  :class:`~kd_lightning.models.diffusion.DiffusionUNet`) and, optionally, ``teachers.classifier``: a frozen image
  classifier of the same data (e.g. the digits ``SmallCNN``) that only *evaluates* generated images. ``kd fit``
  trains whichever of them is missing once and caches it (:class:`DiffusionTeacherTraining` picks the objective:
  denoising for the diffusion network, cross-entropy for the classifier), both on the noise module's ``source``.
- **Data**: noise only (:class:`~kd_lightning.data.noise.NoiseDataModule`); a data module that serves real images
  is refused at setup.
- **Evaluation** of generated images (the student's one-step samples, or with ``sampler="teacher"`` the
  teacher's ``teacher_steps``-step DDIM samples from the same noise): FID and KID (torchmetrics) on the
  classifier's penultimate features (``feature_layer``) against the source's real validation/test images; the
  classifier's accuracy on class-conditional samples (``acc``: the class asked for vs the class recognised);
  wall time per generated image (``ms_per_image``); the method's loss terms on the evaluation noise.
- **EMA** of the trained network (``ema_decay``), used for sampling/evaluation when on.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import weighted_terms
from kd_lightning.methods.core import AUTOCAST_DTYPES, DEFAULT_TEACHER, DistillationModule, SingleNetwork, describe
from kd_lightning.methods.tasks.classification import Supervised
from kd_lightning.models.diffusion import (
    check_prediction_type,
    ddim_sample,
    is_diffusion_network,
    training_target,
)
from kd_lightning.models.taps import FeatureTaps

__all__ = ["DiffusionDistillation", "DiffusionSupervised", "DiffusionTeacherTraining", "FeatureIdentity"]

#: Names of the networks in ``teachers``: the diffusion teacher and the evaluation classifier.
DIFFUSION, CLASSIFIER = "diffusion", "classifier"


class FeatureIdentity(nn.Module):
    """The feature extractor handed to torchmetrics' FID/KID: features are computed by the task (the classifier's
    penultimate layer) and passed through, so the classifier is not a submodule of the metrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class _EMA:
    """Exponential moving average of a network: ``θ_ema ← d·θ_ema + (1 − d)·θ`` with
    ``d = min(decay, (1 + k)/(10 + k))`` at update ``k`` (warm-up; diffusers' EMA)."""

    def setup_ema(self: Any, decay: float | None) -> None:
        if decay is not None and not 0.0 <= decay < 1.0:
            raise KDConfigError("ema_decay", f"must be in [0, 1) or null, got {decay}")
        self.ema_decay = decay
        self.ema = copy.deepcopy(self.student).requires_grad_(False) if decay is not None else None
        self._ema_updates = 0

    @torch.no_grad()
    def update_ema(self: Any) -> None:
        if self.ema is None:
            return
        decay = min(float(self.ema_decay), (1 + self._ema_updates) / (10 + self._ema_updates))
        self._ema_updates += 1
        for ema_p, p in zip(self.ema.parameters(), self.student.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.ema.buffers(), self.student.buffers()):
            ema_b.copy_(b)

    def sampling_network(self: Any) -> nn.Module:
        """The network that generates in evaluation: the EMA when on, else the trained network."""
        return self.ema if self.ema is not None else self.student


class DiffusionSupervised(SingleNetwork, _EMA, DistillationModule):
    """Denoising training of a diffusion network on real images: the task's teacher objective.

    ``L = ‖net(α_t x_0 + σ_t ε, t, c) − target‖²`` with ``t ~ U{0, …, T−1}``, ``ε ~ N(0, I)`` and the target of the
    network's prediction type (``ε``, ``v = α_t ε − σ_t x_0`` or ``x_0``; Ho et al. 2020, Salimans & Ho 2022); class
    labels are replaced by the null class with probability ``class_dropout`` (classifier-free guidance training).

    Args:
        model: a :class:`~kd_lightning.models.diffusion.DiffusionUNet`.
        label_smoothing: must be 0 (accepted because ``kd fit`` passes its teacher-training settings).
        class_dropout: probability of dropping the class label (conditional networks).
        ema_decay: EMA decay of the weights (``None``: off); with ``ema_into_model`` the trained network takes the
            EMA's weights when training ends (so a cached teacher is the EMA).
        ema_into_model: copy the EMA into the network at the end of training.
        eval_seed: seed of the validation/test noise and timesteps (batch ``i`` uses ``eval_seed + i``).
        **kwargs: the core's arguments (``optimizer``, ``lr_scheduler``, ...).
    """

    teacher_training_module: ClassVar[Callable[..., DistillationModule] | None] = None

    def __init__(
        self,
        model: nn.Module,
        label_smoothing: float = 0.0,
        class_dropout: float = 0.1,
        ema_decay: float | None = 0.995,
        ema_into_model: bool = True,
        eval_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=model, **kwargs)
        if label_smoothing != 0.0:
            raise KDConfigError(
                "label_smoothing",
                f"has no meaning for a denoising objective, got {label_smoothing}",
                "set teacher_training.label_smoothing to 0 for a diffusion teacher",
            )
        if not is_diffusion_network(model):
            raise KDConfigError(
                "model", f"{describe(model)} is not a diffusion network", "use class_path DiffusionUNet"
            )
        check_prediction_type(
            model.prediction_type, model.scheduler_name, "model.init_args.model.init_args.prediction_type"
        )
        if not 0.0 <= class_dropout < 1.0:
            raise KDConfigError("class_dropout", f"must be in [0, 1), got {class_dropout}")
        self.label_smoothing = label_smoothing
        self.class_dropout = class_dropout
        self.ema_into_model = ema_into_model
        self.eval_seed = eval_seed
        self.setup_ema(ema_decay)

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.student}

    def check_data(self, datamodule: Any) -> None:
        if datamodule is None:
            return
        shape = getattr(datamodule, "input_shape", None)
        net = self.student
        if shape is not None and tuple(shape) != tuple(net.sample_shape):
            raise KDConfigError(
                "model.init_args.model",
                f"{describe(net)} generates images of shape {tuple(net.sample_shape)} but "
                f"{type(datamodule).__name__} serves {tuple(shape)}",
                "set sample_size/in_channels to the data's image shape",
            )
        classes = getattr(datamodule, "num_classes", None)
        if net.num_classes is not None and classes is not None and classes != net.num_classes:
            raise KDConfigError(
                "model.init_args.model",
                f"is conditioned on {net.num_classes} classes but {type(datamodule).__name__} has {classes}",
                f"set num_classes to {classes}",
            )

    def inputs_of(self, batch: Any) -> Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def denoising_loss(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"loss", "denoise"}`` of one batch of real images (noise and timesteps from ``generator`` if given)."""
        x0, labels = batch[0], batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        net = self.student
        n = x0.shape[0]
        device = x0.device
        t = torch.randint(net.num_train_timesteps, (n,), generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        alpha, sigma = (v.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1))) for v in net.alpha_sigma(t))
        x_t = alpha * x0 + sigma * eps
        if net.num_classes is not None and labels is not None:
            labels = labels.long()
            if self.class_dropout > 0:
                drop = torch.rand(n, generator=generator).to(device) < self.class_dropout
                labels = torch.where(drop, torch.full_like(labels, int(net.num_classes)), labels)
        else:
            labels = None
        out = net(x_t, t, labels)
        target = training_target(x0, eps, alpha, sigma, net.prediction_type)
        return weighted_terms({"denoise": F.mse_loss(out.float(), target.float())})

    def training_loss(self, batch: Any) -> dict[str, Tensor]:
        return self.denoising_loss(batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.update_ema()

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.eval_seed + batch_idx)
        student = self.student
        if self.ema is not None:
            self.student = self.ema  # evaluate the EMA (what sampling uses)
        try:
            terms = self.denoising_loss(batch, generator)
        finally:
            self.student = student
        self.log_terms(stage, terms, batch_size=int(self.inputs_of(batch).shape[0]))

    def on_fit_end(self) -> None:
        if self.ema is not None and self.ema_into_model:
            self.student.load_state_dict(self.ema.state_dict())


class DiffusionTeacherTraining:
    """Builds the module that trains a missing teacher of a diffusion method (``teacher_training_module``): a
    diffusion network gets :class:`DiffusionSupervised` (denoising), any other network (the evaluation classifier)
    :class:`~kd_lightning.methods.tasks.classification.Supervised` (cross-entropy)."""

    def __new__(cls, model: nn.Module, **kwargs: Any) -> DistillationModule:  # type: ignore[misc]
        if is_diffusion_network(model):
            return DiffusionSupervised(model=model, **kwargs)
        return Supervised(model=model, **kwargs)


class DiffusionDistillation(_EMA, DistillationModule):
    """Base of data-free diffusion distillation: a student generator learns from a frozen diffusion teacher.

    Subclasses implement :meth:`training_loss` (on noise batches ``(ε, class_label)``) and :meth:`student_sample`
    (the student's images from ``ε``), optionally :meth:`eval_terms`.

    Args:
        student: the generator (a :class:`~kd_lightning.models.diffusion.DiffusionUNet` of the teacher's
            architecture for BOOT).
        teacher: the diffusion teacher (or ``teachers={"diffusion": ..., "classifier": ...}``).
        teachers: ``diffusion`` (required) and ``classifier`` (optional, evaluation only).
        sampler: what evaluation generates with: ``"student"`` (the student, one network call) or ``"teacher"``
            (the teacher's deterministic DDIM with ``teacher_steps`` calls; a baseline).
        teacher_steps: DDIM steps of the teacher sampler.
        guidance: classifier-free guidance weight ``w`` of the teacher (``0``: none; needs a conditional teacher).
        clip_denoised: clip the teacher's data predictions to the range of the source's training images.
        init_student_from_teacher: copy the diffusion teacher's weights into the student (at construction and
            whenever the teacher's checkpoint is set, e.g. after ``kd fit`` trained it).
        feature_layer: the classifier tap whose output is the FID/KID feature (``"fc:input"``: the penultimate
            features of SmallCNN).
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size (lowered to the number of samples when there are fewer).
        ema_decay: EMA of the student's weights for evaluation (``None``: off).
        **kwargs: the core's arguments (``teacher_ckpt`` — ``{"diffusion": path, "classifier": path}`` for two —,
            ``optimizer``, ``lr_scheduler``, ...).
    """

    teacher_training_module: ClassVar[Callable[..., DistillationModule] | None] = DiffusionTeacherTraining

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        teachers: dict[str, nn.Module] | None = None,
        sampler: Literal["student", "teacher"] = "student",
        teacher_steps: int = 25,
        guidance: float = 0.0,
        clip_denoised: bool = True,
        init_student_from_teacher: bool = True,
        feature_layer: str = "fc:input",
        kid_subsets: int = 50,
        kid_subset_size: int = 100,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.init_student_from_teacher = False  # the core loads teacher_ckpt before the student can be set up
        super().__init__(student=student, teacher=teacher, teachers=teachers, **kwargs)
        unknown = sorted(set(self.teachers) - {DEFAULT_TEACHER, DIFFUSION, CLASSIFIER})
        if unknown or (DEFAULT_TEACHER in self.teachers and len(self.teachers) > 1):
            raise KDConfigError(
                "teachers",
                f"names {sorted(self.teachers)}; a diffusion method takes teachers 'diffusion' and 'classifier'",
                "give teacher: <diffusion network>, or teachers: {diffusion: ..., classifier: ...}",
            )
        if DIFFUSION not in self.teachers and DEFAULT_TEACHER not in self.teachers:
            raise KDConfigError("teachers", "has no 'diffusion' teacher", "add teachers.diffusion: <DiffusionUNet>")
        field = self.diffusion_field()
        net = self.diffusion_teacher
        if not is_diffusion_network(net):
            raise KDConfigError(field, f"{describe(net)} is not a diffusion network", "use class_path DiffusionUNet")
        check_prediction_type(net.prediction_type, net.scheduler_name, f"{field}.init_args.prediction_type")
        if not is_diffusion_network(student):
            raise KDConfigError(
                "model.init_args.student",
                f"{describe(student)} is not a diffusion network",
                "use the teacher's DiffusionUNet architecture",
            )
        if sampler not in ("student", "teacher"):
            raise KDConfigError("sampler", f"must be 'student' or 'teacher', got {sampler!r}")
        if teacher_steps < 1:
            raise KDConfigError("teacher_steps", f"must be >= 1, got {teacher_steps}")
        if guidance < 0 or (guidance > 0 and net.num_classes is None):
            raise KDConfigError(
                "guidance",
                f"must be >= 0 and needs a class-conditional teacher, got {guidance}",
                "set it to 0 or give the teacher num_classes",
            )
        if kid_subsets < 1 or kid_subset_size < 2:
            raise KDConfigError("kid_subset_size", "KID needs kid_subsets >= 1 and kid_subset_size >= 2")
        self.sampler = sampler
        self.teacher_steps = teacher_steps
        self.guidance = guidance
        self.clip_denoised = clip_denoised
        self.feature_layer = feature_layer
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.clip_range: tuple[float, float] | None = None
        self.eval_metrics = nn.ModuleDict()
        self._reference_done: set[str] = set()
        self._taps: FeatureTaps | None = None
        self._gen_seconds = 0.0
        self._gen_count = 0
        self.init_student_from_teacher = init_student_from_teacher
        self.copy_teacher_into_student()
        self.setup_ema(ema_decay)

    # ------------------------------------------------------------------ networks
    @property
    def diffusion_teacher(self) -> nn.Module:
        """The frozen diffusion teacher."""
        return self.teachers[DIFFUSION] if DIFFUSION in self.teachers else self.teachers[DEFAULT_TEACHER]

    @property
    def classifier(self) -> nn.Module | None:
        """The frozen evaluation classifier (``None`` without one)."""
        return dict(self.teachers.items()).get(CLASSIFIER)

    def diffusion_field(self) -> str:
        """The config field of the diffusion teacher."""
        return "model.init_args.teacher" if DEFAULT_TEACHER in self.teachers else "model.init_args.teachers.diffusion"

    def copy_teacher_into_student(self) -> None:
        """Start the student from the diffusion teacher's weights (``init_student_from_teacher``).

        Raises:
            KDConfigError: the student's architecture differs from the teacher's.
        """
        if not self.init_student_from_teacher:
            return
        try:
            self.student.load_state_dict(self.diffusion_teacher.state_dict())
        except RuntimeError as err:
            raise KDConfigError(
                "model.init_args.student",
                f"cannot start from the teacher's weights ({' '.join(str(err).split())[:200]})",
                "give the student the teacher's architecture or set init_student_from_teacher false",
            ) from None
        self.student.requires_grad_(True)
        if getattr(self, "ema", None) is not None:
            self.ema.load_state_dict(self.student.state_dict())

    def load_teacher(self, path: Any, name: str = DEFAULT_TEACHER) -> None:
        super().load_teacher(path, name)
        if name in (DIFFUSION, DEFAULT_TEACHER):
            self.copy_teacher_into_student()

    def teacher_x0(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The frozen teacher's data prediction ``f_φ(x_t, t, c)`` (guidance, clipping), without autograd."""
        dtype = AUTOCAST_DTYPES[self.teacher_precision]
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            out = self.diffusion_teacher.denoise(x, t, labels, guidance=self.guidance, clip=self.clip_range)
        return out.float() if dtype is not None else out

    def class_labels(self, labels: Tensor | None) -> Tensor | None:
        """Labels to condition on: ``None`` for an unconditional teacher."""
        return labels.long() if labels is not None and self.diffusion_teacher.num_classes is not None else None

    # ------------------------------------------------------------------ data
    def inputs_of(self, batch: Any) -> Tensor:
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def noise_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(ε, class labels or None)`` of a noise batch."""
        if isinstance(batch, (tuple, list)):
            return batch[0], self.class_labels(batch[1] if len(batch) > 1 else None)
        return batch, None

    def check_data(self, datamodule: Any) -> None:
        if datamodule is None:
            return
        name = type(datamodule).__name__
        if not getattr(datamodule, "noise_only", False):
            raise KDConfigError(
                "data",
                f"{name} serves real data but {type(self).__name__} is data-free (its student sees noise only)",
                f"use data.class_path NoiseDataModule with init_args.source: {name} (the teacher's data)",
            )
        net = self.diffusion_teacher
        shape = getattr(datamodule, "input_shape", None)
        if shape is not None and tuple(shape) != tuple(net.sample_shape):
            raise KDConfigError(
                self.diffusion_field(),
                f"generates images of shape {tuple(net.sample_shape)} but {name} serves noise of shape {tuple(shape)}",
                "set the network's sample_size/in_channels or the data's sample_shape to match",
            )
        classes = getattr(datamodule, "num_classes", None)
        if net.num_classes is not None and classes != net.num_classes:
            raise KDConfigError(
                self.diffusion_field(),
                f"is conditioned on {net.num_classes} classes but {name} serves labels of {classes}",
                f"set num_classes of the noise data (or of the networks) to {net.num_classes}",
            )
        if self.clip_denoised and self.clip_range is None and hasattr(datamodule, "data_range"):
            self.clip_range = datamodule.data_range()
        self.build_eval_metrics(datamodule)

    def build_eval_metrics(self, datamodule: Any) -> None:
        """FID/KID/accuracy metrics (with a classifier), once."""
        classifier = self.classifier
        if classifier is None or len(self.eval_metrics):
            return
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        param = next(iter(classifier.parameters()), None)
        probe = torch.zeros(2, *self.diffusion_teacher.sample_shape, device=param.device if param is not None else None)
        try:
            features, logits = self.classify(probe)
        except Exception as err:
            raise KDConfigError(
                "model.init_args.teachers.classifier",
                f"{describe(classifier)} fails on generated images {tuple(probe.shape)} or has no tap "
                f"{self.feature_layer!r} ({type(err).__name__}: {' '.join(str(err).split())[:160]})",
                "give a classifier of the data's images and a feature_layer of it",
            ) from None
        dim = int(features.shape[-1])
        classes = getattr(datamodule, "num_classes", None) if datamodule is not None else None
        for stage in ("val", "test"):
            self.eval_metrics[f"{stage}_fid"] = FrechetInceptionDistance(
                feature=FeatureIdentity(dim), reset_real_features=False
            )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all extracted")
                self.eval_metrics[f"{stage}_kid"] = KernelInceptionDistance(
                    feature=FeatureIdentity(dim),
                    subsets=self.kid_subsets,
                    subset_size=self.kid_subset_size,
                    reset_real_features=False,
                )
            if classes and logits.shape[-1] == classes:
                self.eval_metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes=int(classes), average="micro")

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(features [B, D], logits)`` of the evaluation classifier (features at ``feature_layer``)."""
        classifier = self.classifier
        if classifier is None:
            raise RuntimeError("no evaluation classifier (teachers.classifier)")
        if self._taps is None:
            self._taps = FeatureTaps(classifier, [self.feature_layer], detach=True)
        logits, features = self._taps(images)
        return features[self.feature_layer].flatten(1).float(), logits

    def teardown(self, stage: str) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    # ------------------------------------------------------------------ generation
    def student_sample(self, eps: Tensor, labels: Tensor | None) -> Tensor:
        """The student's images from noise ``ε`` (subclass hook)."""
        raise NotImplementedError(f"{type(self).__name__} implements no student_sample")

    def teacher_sample(self, eps: Tensor, labels: Tensor | None, steps: int | None = None) -> Tensor:
        """The teacher's deterministic DDIM images from ``x_T = ε`` in ``steps`` (default ``teacher_steps``) calls."""
        net = self.diffusion_teacher
        return ddim_sample(
            lambda x, t: self.teacher_x0(x, t, labels), eps, net.alphas_cumprod, steps or self.teacher_steps
        )

    @torch.no_grad()
    def generate(self, eps: Tensor, labels: Tensor | None = None) -> Tensor:
        """Images from noise with the evaluation's ``sampler``."""
        if self.sampler == "teacher":
            return self.teacher_sample(eps, labels)
        return self.student_sample(eps, labels)

    def forward(self, eps: Tensor, class_labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """The student's images from noise (``predict``)."""
        return self.student_sample(eps, self.class_labels(class_labels))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.update_ema()

    # ------------------------------------------------------------------ evaluation
    def eval_terms(self, eps: Tensor, labels: Tensor | None, batch_idx: int) -> dict[str, Tensor] | None:
        """The method's loss terms on evaluation noise (``None``: none)."""
        return None

    def _start_eval(self, stage: str) -> None:
        self._gen_seconds, self._gen_count = 0.0, 0
        if f"{stage}_fid" not in self.eval_metrics or stage in self._reference_done:
            return
        fid, kid = self.eval_metrics[f"{stage}_fid"], self.eval_metrics[f"{stage}_kid"]
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        loader = datamodule.reference_dataloader(stage) if hasattr(datamodule, "reference_dataloader") else None
        if loader is None:
            return
        for batch in loader:
            images = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(self.device)
            features, _ = self.classify(images)
            fid.update(features, real=True)
            kid.update(features, real=True)
        self._reference_done.add(stage)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        eps, labels = self.noise_batch(batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        images = self.generate(eps, labels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._gen_seconds += time.perf_counter() - started
        self._gen_count += int(eps.shape[0])
        if f"{stage}_fid" in self.eval_metrics and stage in self._reference_done:
            features, logits = self.classify(images)
            self.eval_metrics[f"{stage}_fid"].update(features, real=False)
            self.eval_metrics[f"{stage}_kid"].update(features, real=False)
            if f"{stage}_acc" in self.eval_metrics and labels is not None:
                self.eval_metrics[f"{stage}_acc"].update(logits, labels)
        terms = self.eval_terms(eps, labels, batch_idx)
        if terms:
            self.log_terms(stage, terms, batch_size=int(eps.shape[0]))

    def _end_eval(self, stage: str) -> None:
        if self._gen_count:
            ms = 1000.0 * self._gen_seconds / self._gen_count
            self.log(f"{stage}/ms_per_image", ms, batch_size=1, sync_dist=True)
        fid = dict(self.eval_metrics.items()).get(f"{stage}_fid")
        if fid is None or stage not in self._reference_done or int(fid.fake_features_num_samples) < 2:
            return
        kid = self.eval_metrics[f"{stage}_kid"]
        self.log(f"{stage}/fid", fid.compute().float(), batch_size=1)
        fid.reset()
        n_fake = sum(int(f.shape[0]) for f in kid.fake_features)
        n_real = sum(int(f.shape[0]) for f in kid.real_features)
        kid.subset_size = max(2, min(self.kid_subset_size, n_fake, n_real))
        with torch.random.fork_rng(devices=[]):  # KID's subsets use the global RNG: leave training's untouched
            torch.manual_seed(0)
            kid_mean, _ = kid.compute()
        self.log(f"{stage}/kid", kid_mean.float(), batch_size=1)
        kid.reset()
        acc = dict(self.eval_metrics.items()).get(f"{stage}_acc")
        if acc is not None and int(acc.tp.sum() + acc.fn.sum()) > 0:
            self.log(f"{stage}/acc", acc.compute(), batch_size=1)
            acc.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")
