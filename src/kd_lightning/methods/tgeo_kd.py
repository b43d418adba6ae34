"""TGeo-KD (Hu, Wu et al., ICLR 2024, "Less or More From Teacher: Exploiting Trilateral Geometry for
Knowledge Distillation", arXiv 2312.15112): per-sample fusion ratios learned by bilevel optimisation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import upcast
from kd_lightning.losses.tgeo_kd import (
    FEATURE_VARIANTS,
    ClassMeanAccumulator,
    FusionRatioNet,
    TGeoKDLoss,
    fusion_feature_dim,
    geometry_features,
)
from kd_lightning.methods.tasks.classification import ClassificationDistillation


def _average_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """Mean of each tensor over the DDP processes (one ``all_reduce``); unchanged without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class TGeoKD(ClassificationDistillation):
    """TGeo-KD: ``ℓ_i = α_i·τ²·KL(p_T^τ ‖ p_S^τ) + (1 − α_i)·CE(s_i, y_i)`` with ``α_i = f_ω(Δ_i)``.

    ``Δ_i`` encodes the geometry of student prediction, teacher prediction, label and the
    teacher's class-mean prediction T̄ (:func:`~kd_lightning.losses.tgeo_kd.geometry_features`);
    ``f_ω`` is a small MLP (:class:`~kd_lightning.losses.tgeo_kd.FusionRatioNet`). Bilevel problem::

        ω* = argmin_ω  CE_heldout(θ*(ω)),   θ*(ω) = argmin_θ (1/N) Σ_i ℓ_i(θ, ω)

    solved per step by one-step unrolling (Meta-Weight-Net style, manual optimisation):

    1. virtual step ``θ' = θ − η_inner ∇_θ mean_i ℓ_i(θ, α(ω))`` (``create_graph``, ``torch.func.functional_call``);
    2. outer: CE of the student with ``θ'`` on a held-out batch; ``ω`` is updated by
       ``fusion_optimizer`` (the student receives no gradient from it);
    3. inner: the real student update on ``mean_i ℓ_i(θ, α_i)`` with ``α`` recomputed by the updated
       ``ω`` and detached.

    The held-out split is the data module's meta split (``data.init_args.meta_split``, 10 % of each class
    in the configs), carved from the training set and served by ``meta_dataloader()``. T̄ is computed from the
    teacher over that split before training (as the official CIFAR code does), or accumulated over the first
    epoch's training batches (``class_mean_source="train_batches"``); both add sums and counts across DDP ranks. Logged:
    ``train/{loss,kd,ce}``, the outer loss ``train/holdout_ce`` and the per-sample fusion ratios
    ``train/alpha_mean``, ``train/alpha_std``.

    RECONSTRUCTION. The paper's method section was not available; the formulas come from the
    official code (Chengming0501/TGeo-KD) and reviews. **The released official code never trains the
    fusion network**: it computes α under ``torch.no_grad()`` and its upper loss does not depend on
    ω, so its controller optimiser step is a no-op and α stays at its random initialisation (the
    older CIFAR code trained it on the training loss, which lets α collapse). The one-step-unrolled
    hypergradient here is this library's choice (the paper does not name its hypergradient
    method). Uncertain choices, each an argument: the feature variant (which one matches the
    paper's Eqs. 7-9 is unverified), the MLP shape, τ² on the KL term (tabular code has it, CIFAR
    code omits it), the default τ = 4 (the library's KD recipe; official CIFAR code: 1, tabular:
    1.5), the fusion optimiser (official tabular: Adam lr 0.1, weight decay 0.05), η_inner, the
    held-out fraction (official tabular: 10 %). Under DDP the gradients of the student and of ω
    are averaged with one ``all_reduce`` each (``torch.autograd.grad`` bypasses DDP's reducer);
    float16 mixed precision is refused (no loss scaling in the hypergradient), bfloat16 works.

    Args:
        temperature: τ of the KL term.
        features: input of the fusion network: ``"tabular_9c"`` (official tabular code),
            ``"cifar_9c"`` (official CIFAR code) or ``"distances"`` (8 scalars: edge lengths and
            true-class probabilities; this library's compact variant). Computed without gradient.
        fusion_hidden: hidden widths of the fusion MLP (tabular code ``[32, 16]``, CIFAR code ``[128]``).
        fusion_activation: ``"leaky_relu"`` (tabular code) or ``"relu"`` (CIFAR code).
        fusion_optimizer: optimiser of ω, called with the fusion network's parameters (default
            Adam, lr 1e-3).
        unroll: ``"full"`` differentiates the virtual step through every student parameter (about
            twice the step cost); ``"last_layer"`` only through the student's last layer.
        last_layer: name of the student submodule unrolled with ``unroll="last_layer"``;
            ``None`` takes the student's last ``nn.Linear`` (``fc`` in the CIFAR zoo).
        inner_lr: η_inner of the virtual step; ``None`` uses the student optimiser's current lr.
        holdout_seed: seed of the held-out batches' order (plus the DDP rank).
        class_mean_source: ``"held_out"`` (T̄ over the held-out split before training) or
            ``"train_batches"`` (accumulated over the training batches of the first epoch).
        student, teacher, **kwargs: ``teacher_ckpt``, ``optimizer`` (the student's),
            ``lr_scheduler`` (the student's) and the other arguments of
            :class:`~kd_lightning.methods.ClassificationDistillation`.
    """

    object_arguments = (*ClassificationDistillation.object_arguments, "fusion_optimizer")

    class_means: Tensor
    class_means_ready: Tensor

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        features: Literal["tabular_9c", "cifar_9c", "distances"] = "tabular_9c",
        fusion_hidden: Sequence[int] = (32, 16),
        fusion_activation: Literal["relu", "leaky_relu"] = "leaky_relu",
        fusion_optimizer: OptimizerCallable = torch.optim.Adam,
        unroll: Literal["full", "last_layer"] = "full",
        last_layer: str | None = None,
        inner_lr: float | None = None,
        holdout_seed: int = 0,
        class_mean_source: Literal["held_out", "train_batches"] = "held_out",
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if not temperature > 0:
            raise KDConfigError(f"model.init_args.temperature must be > 0, got {temperature}.")
        if features not in FEATURE_VARIANTS:
            raise KDConfigError(f"model.init_args.features must be one of {FEATURE_VARIANTS}, got {features!r}.")
        if fusion_activation not in ("relu", "leaky_relu"):
            raise KDConfigError(
                f"model.init_args.fusion_activation must be relu or leaky_relu, got {fusion_activation!r}."
            )
        if any(int(h) < 1 for h in fusion_hidden):
            raise KDConfigError(f"model.init_args.fusion_hidden widths must be >= 1, got {list(fusion_hidden)}.")
        if unroll not in ("full", "last_layer"):
            raise KDConfigError(f"model.init_args.unroll must be 'full' or 'last_layer', got {unroll!r}.")
        if inner_lr is not None and not inner_lr > 0:
            raise KDConfigError(f"model.init_args.inner_lr must be > 0 or null, got {inner_lr}.")
        if class_mean_source not in ("held_out", "train_batches"):
            raise KDConfigError(
                f"model.init_args.class_mean_source must be 'held_out' or 'train_batches', got {class_mean_source!r}."
            )
        self.automatic_optimization = False
        self.temperature = temperature
        self.features = features
        self.fusion_hidden = [int(h) for h in fusion_hidden]
        self.fusion_activation = fusion_activation
        self.fusion_optimizer_factory = fusion_optimizer
        self.unroll = unroll
        self.last_layer = last_layer
        self.inner_lr = inner_lr
        self.holdout_seed = holdout_seed
        self.class_mean_source = class_mean_source
        self.loss_fn = TGeoKDLoss(temperature)
        self.fusion_net: FusionRatioNet | None = None
        self.class_mean_accumulator: ClassMeanAccumulator | None = None
        self._holdout_cycle: DataLoader | None = None
        self._holdout_iter: Iterator[Any] | None = None
        self._unrolled = self._resolve_unrolled()
        if self.num_classes is not None:
            self._build(int(self.num_classes))

    # ------------------------------------------------------------------ parts that need the class count
    def _build(self, num_classes: int) -> None:
        """Create the fusion network, the T̄ accumulator and the T̄ buffers for ``num_classes``."""
        self.fusion_net = FusionRatioNet(
            fusion_feature_dim(self.features, num_classes), self.fusion_hidden, self.fusion_activation
        )
        self.class_mean_accumulator = ClassMeanAccumulator(num_classes)
        self.register_buffer("class_means", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("class_means_ready", torch.tensor(False))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.fusion_net is None and "class_means" in checkpoint.get("state_dict", {}):
            self._build(int(checkpoint["state_dict"]["class_means"].shape[0]))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.fusion_net is None:
            self._build(int(self.num_classes))
        self._unrolled = self._resolve_unrolled()
        if stage != "fit":
            return
        precision = str(getattr(self.trainer, "precision", "32"))
        if precision.startswith("16"):
            raise KDConfigError(
                f"TGeoKD does not support trainer.precision={precision}: its hypergradient has no loss "
                "scaling. Use bf16-mixed or 32."
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not callable(getattr(datamodule, "meta_dataloader", None)):
            raise KDConfigError(
                "data",
                f"TGeoKD learns its fusion network on a held-out meta split served by the data module's "
                f"meta_dataloader(); {type(datamodule).__name__} has none",
                "use a kd_lightning KDDataModule with data.init_args.meta_split: 0.1 (fit with datamodule=...)",
            )
        if not getattr(datamodule, "meta_split", 0):
            raise KDConfigError(
                "data.init_args.meta_split",
                "is 0: TGeoKD learns its fusion network on a held-out meta split of the training set",
                "set data.init_args.meta_split, e.g. 0.1 (the paper's 10 %)",
            )
        self._holdout_cycle = self._holdout_iter = None

    def _resolve_unrolled(self) -> list[str]:
        """Names of the student parameters that the virtual step differentiates through."""
        trainable = [name for name, p in self.student.named_parameters() if p.requires_grad]
        if self.unroll == "full":
            return trainable
        name = self.last_layer
        if name is None:
            linears = [n for n, m in self.student.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise KDConfigError(
                    f"model.init_args.unroll='last_layer': the student ({type(self.student).__name__}) has no "
                    "nn.Linear; name its last layer with model.init_args.last_layer."
                )
            name = linears[-1]
        try:
            module = self.student.get_submodule(name)
        except AttributeError:
            raise KDConfigError(
                f"model.init_args.last_layer={name!r} is not a submodule of the student "
                f"({type(self.student).__name__})."
            ) from None
        names = [f"{name}.{n}" for n, p in module.named_parameters() if p.requires_grad]
        if not names:
            raise KDConfigError(f"model.init_args.last_layer={name!r} has no trainable parameters.")
        return names

    # ------------------------------------------------------------------ held-out data
    def _holdout_loader(self, shuffle: bool, shard: bool) -> DataLoader:
        return self.trainer.datamodule.meta_dataloader(shuffle=shuffle, shard=shard, seed=self.holdout_seed)

    def next_holdout_batch(self) -> tuple[Tensor, Tensor]:
        """The next held-out ``(x, y)`` on the module's device (the loader cycles forever)."""
        if self._holdout_iter is None or self._holdout_cycle is None:
            self._holdout_cycle = self._holdout_loader(shuffle=True, shard=False)
            self._holdout_iter = iter(self._holdout_cycle)
        try:
            batch = next(self._holdout_iter)
        except StopIteration:
            self._holdout_iter = iter(self._holdout_cycle)
            batch = next(self._holdout_iter)
        x, y = self.unpack(batch)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @torch.no_grad()
    def compute_class_means(self) -> Tensor:
        """T̄ from the teacher over the held-out split (each rank a shard; sums and counts all-reduced)."""
        accumulator = self.class_mean_accumulator
        assert accumulator is not None
        accumulator.reset()
        for batch in self._holdout_loader(shuffle=False, shard=True):
            x, y = self.unpack(batch)
            x, y = x.to(self.device), y.to(self.device)
            accumulator.update(F.softmax(self.teacher_forward(x).float(), dim=-1), y)
        return accumulator.compute()

    def on_train_start(self) -> None:
        if self.class_mean_source == "held_out" and not bool(self.class_means_ready):
            self.class_means.copy_(self.compute_class_means())
            self.class_means_ready.fill_(True)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.class_mean_source == "train_batches" and not bool(self.class_means_ready):
            self.class_means.copy_(self.class_mean_accumulator.compute())  # type: ignore[union-attr]
            self.class_means_ready.fill_(True)
        self._step_scheduler("epoch")

    # ------------------------------------------------------------------ the bilevel step
    def fusion_ratio(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample ``α = f_ω(Δ)`` (graph to ω only: the features carry no gradient)."""
        features = geometry_features(student_logits, teacher_logits, target, self.class_means, self.features)
        return self.fusion_net(features)  # type: ignore[misc]

    def hypergradient(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        holdout_x: Tensor,
        holdout_y: Tensor,
        inner_lr: float,
    ) -> tuple[Tensor, list[Tensor]]:
        """Outer loss ``CE(f_θ'(x_v), y_v)`` with ``θ' = θ − η ∇_θ mean ℓ(θ, α(ω))``, and its gradient w.r.t. ω.

        ``student_logits`` must carry the graph of the student's forward (kept for the inner step).
        Uses ``torch.autograd.grad`` only: no ``.grad`` of the student (or of ω) is touched.
        Returns ``(outer_loss, [∂outer/∂ω_k])``.
        """
        alpha = self.fusion_ratio(student_logits, teacher_logits, target)
        inner = self.loss_fn(student_logits, teacher_logits, target, alpha)["loss"]
        params = dict(self.student.named_parameters())
        unrolled = [params[name] for name in self._unrolled]
        grads = torch.autograd.grad(inner, unrolled, create_graph=True, retain_graph=True, allow_unused=True)
        virtual = {name: p if g is None else p - inner_lr * g for name, p, g in zip(self._unrolled, unrolled, grads)}
        fixed = {name: p.detach() for name, p in params.items() if name not in virtual}
        # Copies of the buffers: the virtual forward must not move BatchNorm's running statistics.
        buffers = {name: b.clone() for name, b in self.student.named_buffers()}
        holdout_logits = functional_call(self.student, {**fixed, **virtual, **buffers}, (holdout_x,))
        outer = F.cross_entropy(upcast(holdout_logits), holdout_y)
        omega = list(self.fusion_net.parameters())  # type: ignore[union-attr]
        omega_grads = torch.autograd.grad(outer, omega, retain_graph=True, allow_unused=True)
        return outer.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(omega, omega_grads)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer, fusion_optimizer = self.optimizers()  # type: ignore[misc]
        x, y = self.unpack(batch)
        teacher_logits = self.teacher_forward(x)
        if self.class_mean_source == "train_batches" and not bool(self.class_means_ready):
            self.class_mean_accumulator.update(F.softmax(teacher_logits.float(), dim=-1), y)  # type: ignore[union-attr]
            self.class_means.copy_(self.class_mean_accumulator.compute())  # type: ignore[union-attr]
        student_logits = self.student(x)

        # (1)+(2) outer: virtual step, held-out CE, update ω (raw optimiser: global_step counts student steps).
        holdout_x, holdout_y = self.next_holdout_batch()
        inner_lr = self.inner_lr if self.inner_lr is not None else float(optimizer.param_groups[0]["lr"])
        outer, omega_grads = self.hypergradient(student_logits, teacher_logits, y, holdout_x, holdout_y, inner_lr)
        raw_fusion = fusion_optimizer.optimizer
        raw_fusion.zero_grad(set_to_none=True)
        for p, g in zip(self.fusion_net.parameters(), _average_over_ranks(omega_grads)):  # type: ignore[union-attr]
            p.grad = g.detach()
        raw_fusion.step()
        raw_fusion.zero_grad(set_to_none=True)

        # (3) inner: the real student step with α from the updated ω, detached.
        with torch.no_grad():
            alpha = self.fusion_ratio(student_logits, teacher_logits, y)
        parts = self.loss_fn(student_logits, teacher_logits, y, alpha)
        student_params = [p for p in self.student.parameters() if p.requires_grad]
        grads = torch.autograd.grad(parts["loss"], student_params, allow_unused=True)
        grads = _average_over_ranks([torch.zeros_like(p) if g is None else g for p, g in zip(student_params, grads)])
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(student_params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step_scheduler("step")

        batch_size = y.shape[0]
        self.log_terms("train", parts, batch_size=batch_size)
        alpha = alpha.float()
        stats = {"holdout_ce": outer, "alpha_mean": alpha.mean(), "alpha_std": alpha.std(unbiased=False)}
        for name, value in stats.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=batch_size)
        self.metrics["train_acc"].update(student_logits.detach(), y)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)
        return parts["loss"].detach()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        student_params = [p for p in self.student.parameters() if p.requires_grad]
        if not student_params:
            raise KDConfigError("TGeoKD: the student has no trainable parameters.")
        optimizer = self.optimizer_factory(student_params)
        fusion_optimizer = self.fusion_optimizer_factory(self.fusion_net.parameters())  # type: ignore[union-attr]
        if self.lr_scheduler_factory is None:
            return [optimizer, fusion_optimizer]
        return [optimizer, fusion_optimizer], [self.lr_scheduler_factory(optimizer)]

    def _step_scheduler(self, interval: str) -> None:
        if interval != self.lr_scheduler_interval or self.lr_scheduler_factory is None:
            return
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            metric = self.trainer.callback_metrics.get("val/loss")
            if metric is not None:
                scheduler.step(metric)
            return
        scheduler.step()
