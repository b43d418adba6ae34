"""MST-Distill: Mixture of Specialized Teachers for cross-modal KD (Li, Yang, Chen, Dong, Chen, Wang; ACM MM 2025,
arXiv 2507.07015; official code github.com/Gray-OREO/MST-Distill)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature, label_cross_entropy
from kd_lightning.losses.mst import co_training_loss, decayed_weight, masknet_loss, mst_student_loss
from kd_lightning.losses.terms import check_weights
from kd_lightning.methods.tasks.classification import ClassificationDistillation
from kd_lightning.models.mst import GateNet, build_masknet, masked_forward
from kd_lightning.models.taps import FeatureTaps, UnknownModuleError

__all__ = ["MSTDistill"]

_CHECKPOINT_KEY = "kd_mst_parts"
_STUDENT = "student"


class MSTDistill(ClassificationDistillation):
    """MST-Distill, the three stages of the official script in one run; stage boundaries are epochs.

    A unimodal student (e.g. ``ModalityNet(SmallCNN, ["m1"])`` on paired data) learns from *specialised* copies of
    its teachers (e.g. a multimodal ``ModalityNet(LateFusionNet, ["m1", "m2"])`` and a cross-modal
    ``ModalityNet(SignalNet, ["m2"])``): expert ``(t, l)`` is teacher ``t`` with the output of layer ``l`` gated
    channel-wise by a MaskNet (:mod:`kd_lightning.models.mst`). With ``KD(p <- q) = T^2 KL(softmax(q/T) ||
    softmax(p/T))`` (batchmean):

    - **Stage 1** (epochs ``[0, stage1_epochs)``), co-training from scratch (or from ``teacher_ckpt``), one
      optimiser over student and teachers: ``L1 = sum_n [CE(z_n, y) + sum_{m != n} KD(z_n <- z_m)]`` over the
      student and every teacher (targets not detached, as in the code).
    - **Stage 2** (the next ``stage2_epochs``), teachers and student frozen in eval mode, one optimiser per MaskNet:
      ``L2_j = KD(z_j <- sg(z_S))`` (each masked teacher pulled toward the student). The MaskNet weights with the
      lowest validation ``sum_t mean_{j of t} L2_j`` are kept (in the module's state: ``best_masknets``) and
      loaded at the start of stage 3 (without validation batches the last MaskNets are used).
    - **Stage 3** (until ``max_epochs``), student + GateNet: ``g = softmax(GateNet(z_S))``, top-``k`` experts per
      sample, ``L3 = w_task CE(z_S, y) + w_kl (1/k) sum_{i in topk} KD(z_S <- sg(z_i)) + w_lb L_lb`` with
      ``L_lb = KL(U || mean_b g) / E`` (or the CV variant). ``routing="soft"`` distils from the gate-weighted
      sum of the experts' logits instead.

    Every masked forward installs its hook(s) and removes them in a ``finally`` (no hook survives a forward).
    The top-k selection is not differentiable: in ``"topk"`` routing the GateNet is trained by ``L_lb`` only
    (no gradient of the KD term reaches it, as in the code); in ``"soft"`` routing the KD term trains it too
    (unless ``detach_soft_weights``). The gate's input (the student's logits) is not detached in the code, so
    ``L_lb`` also trains the student (``detach_gate_input`` stops that).

    Verified against the official code (HEAD 093b2fe): the three losses, MaskNet_1d/2d, GateNet, hidden width
    ``h = (D // (factor * heads)) * heads``, the 1/E of the KL balancing loss (``batchmean`` on a 1-D tensor),
    the schedule. Schedule (``main-MST-Distill.py``): after stage-3 epoch ``e`` (counted from 0 at the start of
    stage 3, as the code's own loop counts), ``w_lb *= 0.9`` if ``e % 10 == 0`` and ``w_kl *= 0.5`` if ``e % 30 ==
    0``; the update runs at the *end* of the epoch, so it fires after epoch 0 already: epoch 0 uses the initial
    weights, epochs 1..30 use ``w_kl / 2`` (the method spec's "effective initial w_kl = 0.5" misreads this).

    RECONSTRUCTION (choices the paper/code leave open, all arguments): ``cumulative_masks`` (the code's stage-3
    ``TGroup_forward`` removes a teacher's hooks only after all its experts ran, so its expert ``j`` carries the
    masks of layers ``1..j``; default off: one mask per expert, as the paper and stage 2 describe); the soft
    variant's gradient (``detach_soft_weights``); the best student is chosen by the checkpoint callback:
    ``val/stage3_loss`` is the student's validation CE during stage 3 and ``inf`` before (monitor it with mode
    ``min`` to select among stage-3 epochs as the code does); a 1-D MaskNet on a ``[B, C, 1, 1]`` output keeps
    that shape (the code squeezes it); stage-2 validation averages per batch as the code does.

    Args:
        student: the unimodal network to distil into.
        teachers: ``{name: network}``; trained in stage 1 (``teacher_ckpt`` optionally initialises them).
        mask_layers: ``{teacher name: [module path, ...]}``: one expert per (teacher, layer), in this order. Paths
            are ``named_modules()`` names of the teacher as configured (``net.fc1`` inside a ``ModalityNet``).
            Outputs ``[B, D]`` get a MaskNet_1d, ``[B, C, H, W]`` a MaskNet_2d.
        stage1_epochs: epochs of co-training.
        stage2_epochs: epochs of MaskNet training (0: the MaskNets stay at their initialisation).
        k: experts per sample in top-k routing (``1 <= k <= E``).
        routing: ``"topk"`` (the paper's) or ``"soft"`` (the code's unused ``weighted_MTGdistillation``).
        temperature: T of every KD term.
        ce_weight: w_task of stage 3.
        kd_weight: initial w_kl of stage 3.
        lb_weight: initial w_lb of stage 3.
        lb_mode: ``"kl"`` or ``"cv"`` load balancing.
        kd_decay: factor of w_kl's decay.
        kd_decay_every: period (stage-3 epochs) of w_kl's decay; 0: constant.
        lb_decay: factor of w_lb's decay.
        lb_decay_every: period of w_lb's decay; 0: constant.
        stage1_ce_weight: weight of each network's CE in stage 1.
        stage1_kd_weight: weight of each network's KD terms in stage 1.
        stage1_detach_targets: detach the targets of the stage-1 KD terms (the code does not).
        mask_heads: attention heads of the MaskNets.
        mask_hidden_factor: the MaskNets' token width is about ``D / mask_hidden_factor``.
        cumulative_masks: reproduce the code's stage-3 mask stacking within a teacher (see above).
        detach_soft_weights: soft routing: no gradient from the KD term to the gate (the code's detached variant).
        detach_gate_input: feed the GateNet ``sg(z_S)`` (the code does not detach).
        input_shape: one input without batch dimension (``{modality: shape}`` for paired data) to build the MaskNets
            at construction; ``None`` waits for the data module's ``input_shape`` at ``setup``.
        stage1_optimizer: stage 1's optimiser; ``None``: the same as ``optimizer``.
        mask_optimizer: each MaskNet's optimiser (stage 2); ``None``: the same as ``optimizer``.
        student, **kwargs: ``optimizer`` (stage 3: student + GateNet), ``lr_scheduler`` (stage 3's optimiser,
            stepped during stage 3 only), ``teacher_ckpt`` and the rest of :class:`ClassificationDistillation`.
            The paper's optimisers are Adam, lr 1e-4 (all stages).

    Training uses manual optimisation (Lightning's ``global_step`` counts every optimiser step: one per batch in
    stages 1 and 3, one per MaskNet in stage 2); the Trainer's gradient clipping and accumulation are not available.
    Logged: ``train/s1_<network>``, ``train/s2_<teacher>``, ``train/s3_{ce,kd,lb,expert_ce}``, ``train/w_kl``,
    ``train/w_lb``, ``train/route_<j>`` (share of samples routed to expert j), ``val/s2_loss``,
    ``val/stage3_loss`` and ``val/acc_<teacher>`` for every teacher.
    """

    trains_teacher = True
    object_arguments = (*ClassificationDistillation.object_arguments, "stage1_optimizer", "mask_optimizer")

    def __init__(
        self,
        student: nn.Module,
        teachers: dict[str, nn.Module],
        mask_layers: dict[str, list[str]],
        stage1_epochs: int = 1,
        stage2_epochs: int = 1,
        k: int = 1,
        routing: Literal["topk", "soft"] = "topk",
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        lb_weight: float = 1.0,
        lb_mode: Literal["kl", "cv"] = "kl",
        kd_decay: float = 0.5,
        kd_decay_every: int = 30,
        lb_decay: float = 0.9,
        lb_decay_every: int = 10,
        stage1_ce_weight: float = 1.0,
        stage1_kd_weight: float = 1.0,
        stage1_detach_targets: bool = False,
        mask_heads: int = 3,
        mask_hidden_factor: int = 2,
        cumulative_masks: bool = False,
        detach_soft_weights: bool = False,
        detach_gate_input: bool = False,
        input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        stage1_optimizer: OptimizerCallable | None = None,
        mask_optimizer: OptimizerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teachers=teachers, **kwargs)
        check_temperature(temperature)
        check_weights(
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            lb_weight=lb_weight,
            stage1_ce_weight=stage1_ce_weight,
            stage1_kd_weight=stage1_kd_weight,
        )
        for name, value in (("stage1_epochs", stage1_epochs), ("stage2_epochs", stage2_epochs)):
            if not isinstance(value, int) or value < 0:
                raise KDConfigError(name, f"must be an integer >= 0, got {value!r}")
        for name, value in (("kd_decay_every", kd_decay_every), ("lb_decay_every", lb_decay_every)):
            if not isinstance(value, int) or value < 0:
                raise KDConfigError(name, f"must be an integer >= 0 (0: no decay), got {value!r}")
        for name, value in (("kd_decay", kd_decay), ("lb_decay", lb_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise KDConfigError(name, f"must be a finite number > 0, got {value!r}", "the code uses 0.5 and 0.9")
        if routing not in ("topk", "soft"):
            raise KDConfigError("routing", f"must be 'topk' or 'soft', got {routing!r}")
        if lb_mode not in ("kl", "cv"):
            raise KDConfigError("lb_mode", f"must be 'kl' or 'cv', got {lb_mode!r}")
        if mask_heads < 1:
            raise KDConfigError("mask_heads", f"must be >= 1, got {mask_heads}")
        if mask_hidden_factor < 1:
            raise KDConfigError("mask_hidden_factor", f"must be >= 1, got {mask_hidden_factor}")
        if _STUDENT in self.teachers:
            raise KDConfigError(f"teachers.{_STUDENT}", "'student' names the student", "rename that teacher")
        self.experts = self._experts(mask_layers)
        if not 1 <= k <= len(self.experts):
            raise KDConfigError(
                "k", f"must be in [1, {len(self.experts)}] (the number of experts), got {k}", "the paper uses k = 1"
            )
        self.mask_layers = {name: list(layers) for name, layers in mask_layers.items()}
        self.stage1_epochs = stage1_epochs
        self.stage2_epochs = stage2_epochs
        self.k = k
        self.routing = routing
        self.temperature = float(temperature)
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.lb_weight = lb_weight
        self.lb_mode = lb_mode
        self.kd_decay, self.kd_decay_every = kd_decay, kd_decay_every
        self.lb_decay, self.lb_decay_every = lb_decay, lb_decay_every
        self.stage1_ce_weight = stage1_ce_weight
        self.stage1_kd_weight = stage1_kd_weight
        self.stage1_detach_targets = stage1_detach_targets
        self.mask_heads = mask_heads
        self.mask_hidden_factor = mask_hidden_factor
        self.cumulative_masks = cumulative_masks
        self.detach_soft_weights = detach_soft_weights
        self.detach_gate_input = detach_gate_input
        self.stage1_optimizer_factory = stage1_optimizer
        self.mask_optimizer_factory = mask_optimizer
        self.automatic_optimization = False
        self.masknets = nn.ModuleList()
        self.best_masknets = nn.ModuleList()
        self.gate: GateNet | None = None
        self.register_buffer("best_mask_loss", torch.tensor(float("inf")))
        self.part_shapes: dict[str, Any] | None = None
        if input_shape is not None and self.num_classes is not None:
            self.build_parts(self.probe_shapes(input_shape), int(self.num_classes))

    # ------------------------------------------------------------------ experts and parts
    def _experts(self, mask_layers: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
        field = "mask_layers"
        if not isinstance(mask_layers, Mapping) or not mask_layers:
            raise KDConfigError(
                field, f"must map teacher names to module paths, got {mask_layers!r}", "e.g. {multimodal: [net.fc1]}"
            )
        experts: list[tuple[str, str]] = []
        for name, layers in mask_layers.items():
            if name not in self.teachers:
                raise KDConfigError(
                    field, f"names the teacher {name!r} but the teachers are {list(self.teachers)}", "use their names"
                )
            if isinstance(layers, str):
                layers = [layers]
            for layer in layers:
                if ":" in layer:
                    raise KDConfigError(
                        field, f"{layer!r}: a MaskNet gates a module's output", "give the module path without ':'"
                    )
                try:
                    FeatureTaps(self.teachers[name], [layer], transient=True)
                except UnknownModuleError as err:
                    raise KDConfigError(field, f"teacher {name!r}: {err}") from None
                experts.append((name, layer))
        if not experts:
            raise KDConfigError(field, "lists no layer: MST-Distill needs at least one expert", "e.g. [net.fc1]")
        return experts

    @property
    def num_experts(self) -> int:
        """E, the number of specialised teachers (masked layers)."""
        return len(self.experts)

    def probe_shapes(self, input_shape: Sequence[int] | Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """The output shape (without batch dimension) of every masked layer, from one forward on zeros."""
        device = next(iter(self.student.parameters())).device
        if isinstance(input_shape, Mapping):
            probe: Any = {
                m: torch.zeros(2, *[int(s) for s in shape], device=device) for m, shape in input_shape.items()
            }
        else:
            probe = torch.zeros(2, *[int(s) for s in input_shape], device=device)
        shapes = []
        for name in self.teachers:
            layers = [layer for teacher, layer in self.experts if teacher == name]
            if not layers:
                continue
            network = self.teachers[name]
            taps = FeatureTaps(network, layers, transient=True)
            was_training = network.training
            network.eval()
            try:
                with torch.no_grad():
                    _, feats = taps(probe)
            finally:
                network.train(was_training)
            shapes.extend([name, layer, list(feats[layer].shape[1:])] for layer in layers)
        order = {(t, layer): i for i, (t, layer) in enumerate(self.experts)}
        return {"layers": sorted(shapes, key=lambda s: order[(s[0], s[1])])}

    def build_parts(self, shapes: dict[str, Any], num_classes: int) -> None:
        """Build the MaskNets (one per expert, 1-D or 2-D by the layer's output shape) and the GateNet."""
        if self.gate is not None:
            return
        try:
            masknets = [
                build_masknet(shape, self.mask_hidden_factor, self.mask_heads) for _, _, shape in shapes["layers"]
            ]
        except KDConfigError as err:
            raise err.with_prefix("model.init_args.") from None
        self.masknets = nn.ModuleList(masknets)
        self.best_masknets = nn.ModuleList(copy.deepcopy(m).requires_grad_(False) for m in masknets)
        self.gate = GateNet(num_classes, self.num_experts)
        self.part_shapes = {**shapes, "num_classes": num_classes}
        self.to(self.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # check_data: num_classes, the networks against the data
        if self.gate is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        input_shape = getattr(datamodule, "input_shape", None)
        if input_shape is None:
            raise KDConfigError(
                "model.init_args.input_shape",
                f"{type(self).__name__} needs the input shape to build its MaskNets",
                "set it (e.g. {m1: [1, 8, 8], m2: [1, 64]}) or use a data module with an input_shape",
            )
        self.build_parts(self.probe_shapes(input_shape), int(self.num_classes))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self.part_shapes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        shapes = checkpoint.get(_CHECKPOINT_KEY)
        if self.gate is None and shapes is not None:
            self.build_parts(shapes, int(shapes["num_classes"]))

    def _layer(self, expert: int) -> nn.Module:
        name, layer = self.experts[expert]
        return self.teachers[name].get_submodule(layer)

    def expert_forward(self, x: Any, expert: int) -> Tensor:
        """Teacher of expert ``expert`` with that expert's mask installed for this one forward."""
        name, _ = self.experts[expert]
        return masked_forward(self.teachers[name], x, [(self._layer(expert), self.masknets[expert])])

    def expert_logits(self, x: Any) -> list[Tensor]:
        """Every expert's logits, in expert order (one teacher forward each). With ``cumulative_masks`` a teacher's
        expert ``j`` also carries the masks of its experts before ``j`` (the code's stage-3 ``TGroup_forward``)."""
        if not self.cumulative_masks:
            return [self.expert_forward(x, j) for j in range(self.num_experts)]
        outputs, pairs_of = [], {}
        for j, (name, _) in enumerate(self.experts):
            pairs = pairs_of.setdefault(name, [])
            pairs.append((self._layer(j), self.masknets[j]))
            outputs.append(masked_forward(self.teachers[name], x, list(pairs)))
        return outputs

    # ------------------------------------------------------------------ stages
    def stage_of(self, epoch: int) -> int:
        """1, 2 or 3: the stage that epoch ``epoch`` (0-based) trains."""
        if epoch < self.stage1_epochs:
            return 1
        return 2 if epoch < self.stage1_epochs + self.stage2_epochs else 3

    @property
    def stage(self) -> int:
        """The stage of the current epoch."""
        return self.stage_of(self.current_epoch)

    def stage3_epoch(self) -> int:
        """Epochs since the start of stage 3 (the code's stage-3 loop counter)."""
        return max(self.current_epoch - self.stage1_epochs - self.stage2_epochs, 0)

    def stage3_weights(self, stage3_epoch: int | None = None) -> tuple[float, float]:
        """``(w_kl, w_lb)`` of a stage-3 epoch (default: the current one); see :func:`decayed_weight`."""
        e = self.stage3_epoch() if stage3_epoch is None else stage3_epoch
        return (
            decayed_weight(self.kd_weight, e, self.kd_decay, self.kd_decay_every),
            decayed_weight(self.lb_weight, e, self.lb_decay, self.lb_decay_every),
        )

    def train(self, mode: bool = True) -> MSTDistill:
        """Training mode, except what the current stage freezes: teachers from stage 2 on, the student in stage 2,
        the MaskNets in stage 3 (all in eval mode)."""
        super().train(mode)
        if mode and hasattr(self, "stage2_epochs"):  # (not while the core's constructor runs)
            stage = self.stage
            if stage >= 2:
                self.teachers.eval()
            if stage == 2:
                self.student.eval()
            if stage == 3:
                self.masknets.eval()
        if hasattr(self, "best_masknets"):
            self.best_masknets.eval()
        return self

    def on_fit_start(self) -> None:
        super().on_fit_start()
        max_epochs = self.trainer.max_epochs
        if isinstance(max_epochs, int) and 0 < max_epochs <= self.stage1_epochs + self.stage2_epochs:
            raise KDConfigError(
                "trainer.max_epochs",
                f"is {max_epochs} but {type(self).__name__} trains stage 1 for {self.stage1_epochs} and stage 2 for "
                f"{self.stage2_epochs} epochs, which leaves no stage 3 (the student's distillation)",
                f"set trainer.max_epochs above {self.stage1_epochs + self.stage2_epochs} or shorten the stages",
            )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        stage = self.stage
        if stage >= 2:  # the teachers are trained: frozen from here on
            self.teachers.requires_grad_(False)
        if stage == 3:
            if torch.isfinite(self.best_mask_loss):
                for mask, best in zip(self.masknets, self.best_masknets, strict=True):
                    mask.load_state_dict(best.state_dict())
            self.masknets.requires_grad_(False)
        self.train()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        if self.gate is None:
            raise KDConfigError(
                "model.init_args.input_shape",
                f"{type(self).__name__}'s MaskNets are not built",
                "call setup with a data module that has input_shape, or give input_shape",
            )
        stage1 = self.make_optimizer(
            [*self.student.parameters(), *self.teachers.parameters()],
            self.stage1_optimizer_factory,
            "model.init_args.stage1_optimizer",
        )
        masks = [
            self.make_optimizer(list(m.parameters()), self.mask_optimizer_factory, "model.init_args.mask_optimizer")
            for m in self.masknets
        ]
        stage3 = self.make_optimizer([*self.student.parameters(), *self.gate.parameters()])
        scheduler = self.make_scheduler(stage3)
        optimizers = [stage1, *masks, stage3]
        return (optimizers, [scheduler]) if scheduler is not None else optimizers

    def _scheduler(self) -> Any:
        schedulers = self.lr_schedulers()
        if isinstance(schedulers, list):
            return schedulers[0] if schedulers else None
        return schedulers

    def _step_scheduler(self) -> None:
        scheduler = self._scheduler()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitored = self.trainer.callback_metrics.get("val/loss")
            if monitored is not None:
                scheduler.step(monitored)
        else:
            scheduler.step()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.stage == 3 and self.lr_scheduler_interval == "epoch":
            self._step_scheduler()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.unpack(batch)
        self.check_targets(y)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        stage = self.stage
        logits: Tensor | None = None
        if stage == 1:
            terms, logits = self._stage1(batch, batch_idx, x, y, optimizers[0])
        elif stage == 2:
            terms = self._stage2(batch, batch_idx, x, optimizers[1 : 1 + self.num_experts])
        else:
            terms, logits = self._stage3(batch, batch_idx, x, y, optimizers[-1])
        self.log_terms("train", terms, batch_size=self.batch_size_of(batch))
        if logits is not None:
            self.update_train_metrics(batch, logits, y)
        return terms["loss"].detach()

    def _stage1(self, batch: Any, batch_idx: int, x: Any, y: Tensor, optimizer: Any) -> tuple[dict, Tensor]:
        logits = {_STUDENT: self.student(x), **{name: t(x) for name, t in self.teachers.items()}}
        parts = co_training_loss(
            logits, y, self.temperature, self.stage1_ce_weight, self.stage1_kd_weight, self.stage1_detach_targets
        )
        self.check_finite(parts, batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(parts["loss"])
        optimizer.step()
        terms = {"loss": parts["loss"], **{f"s1_{n}": v for n, v in parts.items() if n != "loss"}}
        return terms, logits[_STUDENT]

    def _stage2(self, batch: Any, batch_idx: int, x: Any, optimizers: Sequence[Any]) -> dict[str, Tensor]:
        with torch.no_grad():
            student_logits = self.student(x)
        losses: dict[str, list[Tensor]] = {}
        for j, optimizer in enumerate(optimizers):
            loss = masknet_loss(self.expert_forward(x, j), student_logits, self.temperature)
            self.check_finite({"loss": loss, f"masknet_{j}": loss}, batch, batch_idx)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            losses.setdefault(self.experts[j][0], []).append(loss.detach())
        means = {f"s2_{name}": torch.stack(v).mean() for name, v in losses.items()}
        return {"loss": torch.stack(list(means.values())).sum(), **means}

    def _stage3(self, batch: Any, batch_idx: int, x: Any, y: Tensor, optimizer: Any) -> tuple[dict, Tensor]:
        with torch.no_grad():
            experts = torch.stack(self.expert_logits(x), dim=1)  # [B, E, C]
        student_logits = self.student(x)
        gate_logits = self.gate(student_logits.detach() if self.detach_gate_input else student_logits)
        w_kl, w_lb = self.stage3_weights()
        parts, indices = mst_student_loss(
            student_logits,
            experts,
            gate_logits,
            y,
            k=self.k,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            kd_weight=w_kl,
            lb_weight=w_lb,
            lb_mode=self.lb_mode,
            routing=self.routing,
            detach_soft_weights=self.detach_soft_weights,
        )
        self.check_finite(parts, batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(parts["loss"])
        optimizer.step()
        if self.lr_scheduler_interval == "step":
            self._step_scheduler()
        with torch.no_grad():
            expert_ce = torch.stack([label_cross_entropy(experts[:, j], y) for j in range(self.num_experts)]).mean()
            if indices is not None:
                share = torch.bincount(indices.reshape(-1), minlength=self.num_experts).float() / indices.numel()
            else:
                share = gate_logits.detach().softmax(-1).mean(0)
        terms = {
            "loss": parts["loss"],
            **{f"s3_{n}": v for n, v in parts.items() if n != "loss"},
            "s3_expert_ce": expert_ce,
            "w_kl": torch.tensor(w_kl, device=student_logits.device),
            "w_lb": torch.tensor(w_lb, device=student_logits.device),
            **{f"route_{j}": share[j] for j in range(self.num_experts)},
        }
        return terms, student_logits

    # ------------------------------------------------------------------ evaluation
    def build_metrics(self) -> None:
        super().build_metrics()
        n = int(self.num_classes)
        for stage in ("val", "test"):
            for name in self.teachers:
                self.metrics[f"{stage}_acc_{name}"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
        self.metrics["val_mask_loss"] = MeanMetric()

    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        super().evaluate(batch, batch_idx, stage)
        if stage != "val":
            return
        x, y = self.unpack(batch)
        in_stage = self.stage
        batch_size = int(y.numel())
        if in_stage == 3:
            selection = F.cross_entropy(self(x).float(), y)
        else:
            selection = torch.tensor(float("inf"), device=y.device)
        self.log("val/stage3_loss", selection, batch_size=batch_size, sync_dist=True)
        if in_stage == 2 and self.gate is not None:
            student_logits = self(x)
            losses: dict[str, list[Tensor]] = {}
            for j in range(self.num_experts):
                loss = masknet_loss(self.expert_forward(x, j), student_logits, self.temperature)
                losses.setdefault(self.experts[j][0], []).append(loss)
            self.metrics["val_mask_loss"].update(sum(torch.stack(v).mean() for v in losses.values()))

    def eval_extra(self, x: Any, y: Tensor, logits: Tensor, stage: str) -> None:
        """Every teacher's accuracy (``<stage>/acc_<name>``) and the fidelity to the first teacher."""
        with torch.no_grad():
            outputs = {name: network(x) for name, network in self.teachers.items()}
        flat_y = y.reshape(-1)
        for name, z in outputs.items():
            metric = self.metrics[f"{stage}_acc_{name}"]
            metric.update(z.reshape(-1, z.shape[-1]), flat_y)
            self.log(f"{stage}/acc_{name}", metric, batch_size=flat_y.shape[0])
        self.eval_with_teacher(y, logits, next(iter(outputs.values())), stage)

    def on_validation_epoch_end(self) -> None:
        if "val_mask_loss" not in self.metrics:
            return
        metric = self.metrics["val_mask_loss"]
        if self.stage != 2 or self.trainer.sanity_checking:
            metric.reset()
            return
        value = metric.compute()
        metric.reset()
        self.log("val/s2_loss", value)
        if value < self.best_mask_loss:  # keep the MaskNets of the best validation L2 (the code's selection)
            self.best_mask_loss.fill_(float(value))
            for mask, best in zip(self.masknets, self.best_masknets, strict=True):
                best.load_state_dict(mask.state_dict())
