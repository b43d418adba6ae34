"""Node-classification task sibling: :class:`NodeClassificationDistillation` (GNN teacher -> graph-free student)
and :class:`NodeSupervised` (one network trained with cross-entropy on the labelled nodes).

Full batch: every batch is the whole graph (``torch_geometric.data.Data`` or a mapping) with ``x [N, F]``,
``edge_index [2, E]``, ``y [N]`` and bool ``train_mask``, ``val_mask``, ``test_mask`` (the graph data modules of
:mod:`kd_lightning.data.graph`). A training step is an epoch; validation reports accuracy on ``val_mask``, test on
``test_mask``, training accuracy on ``train_mask`` (of the training forward, dropout on).

Call convention (:mod:`kd_lightning.models.graph`): a network with ``uses_graph`` is called ``net(x, edge_index)``,
any other ``net(x)``. The distillation student is always called ``student(x)``: it never sees the graph (a GNN
student is refused at setup). Teachers are called with the graph when they use it, under ``no_grad``, in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import label_cross_entropy
from kd_lightning.losses.divergences import forward_kl
from kd_lightning.methods.core import DistillationModule, SingleNetwork, class_count, describe
from kd_lightning.methods.tasks.classification import check_class_targets
from kd_lightning.models.graph import uses_graph

__all__ = ["GraphBatch", "NodeClassificationDistillation", "NodeSupervised", "graph_batch"]

NODE_CLASSIFICATION = "node_classification"
GRAPH_FIELDS = ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask")


class GraphBatch(NamedTuple):
    """The parts of a full-graph batch."""

    x: Tensor
    edge_index: Tensor
    y: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor

    def mask(self, stage: str) -> Tensor:
        """The node mask of ``"train"``, ``"val"`` or ``"test"``."""
        return {"train": self.train_mask, "val": self.val_mask, "test": self.test_mask}[stage]


def graph_batch(batch: Any) -> GraphBatch:
    """The :class:`GraphBatch` of a ``Data`` (attributes) or a mapping (keys).

    Raises:
        KDConfigError: the batch is not a full graph (e.g. an image data module).
    """
    get = batch.get if isinstance(batch, Mapping) else (lambda name: getattr(batch, name, None))
    values = [get(name) for name in GRAPH_FIELDS]
    missing = [name for name, value in zip(GRAPH_FIELDS, values, strict=True) if not isinstance(value, Tensor)]
    if missing:
        raise KDConfigError(
            "data",
            f"node-classification methods train on a whole graph per batch, got a {type(batch).__name__} without "
            f"{', '.join(missing)}",
            "use a graph data module (DigitsGraphDataModule, PlanetoidDataModule, CoauthorAmazonDataModule)",
        )
    return GraphBatch(*values)


def network_inputs(network: nn.Module, graph: GraphBatch) -> tuple[Tensor, ...]:
    """``(x, edge_index)`` for a network that uses the graph, ``(x,)`` otherwise."""
    return (graph.x, graph.edge_index) if uses_graph(network) else (graph.x,)


class NodeClassificationDistillation(DistillationModule):
    """Node classification on one graph: a student that sees node features only learns from frozen teacher(s)
    that may use the graph (GNN -> MLP distillation).

    Args:
        student: the classifier trained on node features (``student(x) -> [N, C]``; e.g. ``GraphMLP``).
        teacher: the classifier to learn from (``teacher(x, edge_index)`` for a GNN).
        num_classes: classes; ``None`` takes the data module's.
        fidelity: also measure the teacher's accuracy, top-1 agreement and KL(p_T || p_S) on the evaluated nodes.
        **kwargs: the core's arguments (``teacher_ckpt``, ``optimizer``, ``lr_scheduler``, ...).

    Subclasses implement :meth:`distillation_loss` (``(student_logits, teacher_logits, graph) -> terms``) or override
    :meth:`training_loss`.
    """

    teacher_training_module: ClassVar[type[DistillationModule] | None] = None  # NodeSupervised, set below
    #: Whether the trained network is called with the graph when it uses it (only the supervised module).
    network_sees_graph: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        num_classes: int | None = None,
        fidelity: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        if num_classes is not None and num_classes < 1:
            raise KDConfigError("num_classes", f"must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.fidelity = fidelity and bool(len(self.teachers))
        self.metrics = nn.ModuleDict()
        self._targets_checked = False

    # ------------------------------------------------------------------ batches and forward passes
    def inputs_of(self, batch: Any) -> Any:
        return graph_batch(batch).x

    def batch_size_of(self, batch: Any) -> int:
        return int(graph_batch(batch).x.shape[0])

    def student_logits(self, graph: GraphBatch) -> Tensor:
        """The trained network's logits of every node (the distillation student sees ``x`` only)."""
        if self.network_sees_graph:
            return self.student(*network_inputs(self.student, graph))
        return self.student(graph.x)

    def teacher_logits(self, graph: GraphBatch, name: str | None = None) -> Tensor:
        """A frozen teacher's logits of every node, without autograd (with the graph when it uses it)."""
        network = self.teachers[name] if name is not None else self.teacher
        return self.run_teacher(*network_inputs(network, graph), name=name)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.student_logits(graph_batch(batch))

    def check_targets(self, y: Tensor) -> None:
        check_class_targets(y, self.num_classes, check_range=not self._targets_checked)
        self._targets_checked = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._targets_checked = False

    # ------------------------------------------------------------------ checks
    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"student": self.student, **self.teacher_fields()}

    def check_data(self, datamodule: Any) -> None:
        data_name = type(datamodule).__name__ if datamodule is not None else "the data"
        task = getattr(datamodule, "task", NODE_CLASSIFICATION) if datamodule is not None else NODE_CLASSIFICATION
        if task != NODE_CLASSIFICATION:
            raise KDConfigError(
                "data",
                f"{data_name} serves {task} batches but {type(self).__name__} classifies the nodes of a graph",
                "use a graph data module (DigitsGraphDataModule, PlanetoidDataModule, CoauthorAmazonDataModule)",
            )
        self.num_classes = class_count(type(self).__name__, self.num_classes, datamodule, "use a graph data module")
        width = getattr(datamodule, "num_features", None)
        if width is not None:
            self.check_networks(int(width), data_name)
        if not self.metrics:
            self.build_metrics()

    def check_networks(self, num_features: int, data_name: str = "the data") -> None:
        """Each network must take ``num_features`` node features and output ``num_classes`` logits (one probe on a
        3-node path graph); the distillation student must not need the graph.

        Raises:
            KDConfigError: naming the config field, the network and the fix.
        """
        for field, module in self.networks_to_check().items():
            where = f"model.init_args.{field}"
            sees_graph = uses_graph(module) and (field != "student" or self.network_sees_graph)
            if field == "student" and uses_graph(module) and not self.network_sees_graph:
                raise KDConfigError(
                    where,
                    f"{describe(module)} reads the graph (forward(x, edge_index)) but the student of "
                    f"{type(self).__name__} sees node features only",
                    "use a graph-free student such as kd_lightning.models.graph.GraphMLP",
                )
            width = getattr(module, "in_channels", None)
            if isinstance(width, int) and width != num_features:
                raise KDConfigError(
                    where,
                    f"{describe(module)} has in_channels={width} but the nodes of {data_name} have {num_features} "
                    "features",
                    f"set {where}.init_args.in_channels: {num_features}",
                )
            param = next(iter(module.parameters()), None)
            device = param.device if param is not None else self.device
            x = torch.zeros(3, num_features, device=device)
            edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]], device=device)
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    out = module(x, edge_index) if sees_graph else module(x)
            except Exception as err:
                raise KDConfigError(
                    where,
                    f"{describe(module)} fails on {num_features} node features from {data_name} "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                    "does its input width match the node features?",
                ) from None
            finally:
                module.train(was_training)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[-1] != self.num_classes:
                got = out.shape[-1] if isinstance(out, Tensor) and out.dim() == 2 else "no"
                raise KDConfigError(
                    where,
                    f"{describe(module)} outputs {got} classes but {data_name} has {self.num_classes}",
                    f"build it with num_classes={self.num_classes}",
                )

    # ------------------------------------------------------------------ metrics
    def build_metrics(self) -> None:
        n = int(self.num_classes)
        self.metrics["train_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro", validate_args=False)
        for stage in ("val", "test"):
            self.metrics[f"{stage}_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
            if self.fidelity:
                self.metrics[f"{stage}_teacher_acc"] = MulticlassAccuracy(num_classes=n, top_k=1, average="micro")
                self.metrics[f"{stage}_agreement"] = MeanMetric()
                self.metrics[f"{stage}_kl_to_teacher"] = MeanMetric()

    def update_train_metrics(self, batch: Any, logits: Tensor | None, *targets: Tensor) -> None:
        if logits is None:
            return
        graph = graph_batch(batch)
        y = targets[0] if targets else graph.y[graph.train_mask]
        self.metrics["train_acc"].update(logits.detach(), y)
        self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True, batch_size=int(y.shape[0]))

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        """``(terms, student logits of the train nodes, their labels)``; teacher first (no autograd)."""
        graph = graph_batch(batch)
        self.check_targets(graph.y)
        teacher_logits = self.teacher_logits(graph) if len(self.teachers) and self.uses_teacher_logits() else None
        student_logits = self.student_logits(graph)
        terms = self.distillation_loss(student_logits, teacher_logits, graph)
        return terms, student_logits[graph.train_mask], graph.y[graph.train_mask]

    def uses_teacher_logits(self) -> bool:
        """Whether :meth:`training_loss` runs the teacher (``False`` hands ``None`` to the loss)."""
        return True

    def distillation_loss(
        self, student_logits: Tensor, teacher_logits: Tensor | None, graph: GraphBatch
    ) -> dict[str, Tensor]:
        """The method's named terms from the logits of every node and the graph."""
        raise NotImplementedError(f"{type(self).__name__} implements no distillation_loss")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        graph = graph_batch(batch)
        mask = graph.mask(stage)
        logits = self.student_logits(graph)[mask]
        y = graph.y[mask]
        n = int(y.shape[0])
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), y), batch_size=n, sync_dist=True)
        self.metrics[f"{stage}_acc"].update(logits, y)
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], batch_size=n, prog_bar=True)
        self.after_evaluate(stage, logits, y)
        if self.fidelity:
            with torch.no_grad():
                teacher = self.teacher_logits(graph)[mask].float()
            s = logits.float()
            updates = {
                "teacher_acc": (teacher, y),
                "agreement": ((s.argmax(-1) == teacher.argmax(-1)).float(),),
                "kl_to_teacher": (forward_kl(s, teacher, reduction="none"),),
            }
            for name, args in updates.items():
                metric = self.metrics[f"{stage}_{name}"]
                metric.update(*args)
                self.log(f"{stage}/{name}", metric, batch_size=n)

    def after_evaluate(self, stage: str, logits: Tensor, y: Tensor) -> None:
        """Hook after the student's metrics of an evaluation (``logits``/``y`` of the evaluated nodes)."""

    def export_metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "task": NODE_CLASSIFICATION}


class NodeSupervised(SingleNetwork, NodeClassificationDistillation):
    """Cross-entropy on the labelled nodes of one network (a GNN teacher, or the MLP-alone baseline).

    ``L = CE(z[train], y[train])`` (label smoothing ε optional). The network is called with the graph when it uses
    it. ``kd fit`` trains missing GNN teachers with it.

    Args:
        model: the network (``GCNNet``, ``GATNet``, ``SAGENet``, ``GraphMLP``, ...).
        label_smoothing: ε in [0, 1).
        keep_best_val: at the end of training, put back the weights of the epoch with the best validation accuracy
            (ties: the later epoch), as the FF-G2M code does for its teachers (which then produce the soft labels).
        **kwargs: ``optimizer``, ``lr_scheduler``, ``num_classes`` and the core's switches.
    """

    network_sees_graph: ClassVar[bool] = True

    def __init__(
        self, model: nn.Module, label_smoothing: float = 0.0, keep_best_val: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(student=model, **kwargs)
        self.set_label_smoothing(label_smoothing)
        self.keep_best_val = keep_best_val
        self._best_val: tuple[float, dict[str, Tensor]] | None = None

    def networks_to_check(self) -> dict[str, nn.Module]:
        return {"model": self.student}

    def training_loss(self, batch: Any) -> tuple[Any, ...]:
        graph = graph_batch(batch)
        self.check_targets(graph.y)
        logits = self.student_logits(graph)[graph.train_mask]
        y = graph.y[graph.train_mask]
        ce = label_cross_entropy(logits, y, self.label_smoothing)
        return {"loss": ce, "ce": ce}, logits, y

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._best_val = None

    def after_evaluate(self, stage: str, logits: Tensor, y: Tensor) -> None:
        trainer = self._trainer
        fitting = trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking
        if not (self.keep_best_val and stage == "val" and fitting):
            return
        acc = float((logits.argmax(-1) == y).float().mean()) if y.numel() else 0.0
        if self._best_val is None or acc >= self._best_val[0]:
            state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            self._best_val = (acc, state)

    def on_train_end(self) -> None:
        if self.keep_best_val and self._best_val is not None:
            self.student.load_state_dict(self._best_val[1])


NodeClassificationDistillation.teacher_training_module = NodeSupervised
