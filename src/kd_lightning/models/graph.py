"""Node classifiers for graph distillation (pure torch; the GNN layers come from torch_geometric).

Call convention: a network that reads the graph has ``uses_graph = True`` and is called ``net(x, edge_index)``
(``x [N, F]`` node features, ``edge_index [2, E]`` long, source row 0, target row 1); a network that does not
(:class:`GraphMLP`) has ``uses_graph = False`` and is called ``net(x)``. Every one returns logits ``[N, C]``.
The GNNs add self loops themselves (GCN normalisation, GAT attention, GraphSAGE's ``gcn`` aggregation), so
``edge_index`` is the plain graph. torch_geometric (``pip install kd-lightning[graph]``) is imported when a GNN
is built, so this module imports without it.

Layouts follow the FF-G2M code (github.com/LirongWu/FF-G2M, src/models.py, on DGL; here on torch_geometric):
``layers`` graph layers of width ``hidden``, ReLU and dropout between them, none after the last.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = ["GATNet", "GCNNet", "GraphMLP", "SAGENet", "check_node_features", "import_torch_geometric", "uses_graph"]


def import_torch_geometric() -> Any:
    """The ``torch_geometric`` package, or a one-line error saying how to install it."""
    try:
        import torch_geometric
    except ImportError:
        raise KDConfigError(
            "torch_geometric", "is not installed (graph networks and data need it)", "pip install 'kd-lightning[graph]'"
        ) from None
    return torch_geometric


def uses_graph(network: nn.Module) -> bool:
    """Whether ``network`` is called with the graph: its ``uses_graph`` attribute, else whether its ``forward`` has
    two or more positional parameters without defaults (``forward(x, edge_index)``)."""
    flag = getattr(network, "uses_graph", None)
    if flag is not None:
        return bool(flag)
    try:
        params = inspect.signature(network.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(positional) >= 2


def check_node_features(network: nn.Module, x: Tensor) -> None:
    """Node features must be ``[N, in_channels]`` for a network with ``in_channels``.

    Raises:
        KDConfigError: naming the network, both widths and the fix.
    """
    width = getattr(network, "in_channels", None)
    if x.dim() != 2 or (width is not None and x.shape[1] != width):
        got = f"{x.shape[1]} features" if x.dim() == 2 else f"input of shape {tuple(x.shape)}"
        raise KDConfigError(
            f"{type(network).__name__}(in_channels={width}) got {got} per node: "
            f"set in_channels to the node feature width of the data"
        )


def _check_sizes(name: str, in_channels: int, hidden: int, num_classes: int, layers: int, dropout: float) -> None:
    for field, value in (("in_channels", in_channels), ("hidden", hidden), ("num_classes", num_classes)):
        if value < 1:
            raise KDConfigError(f"{name}.{field}", f"must be >= 1, got {value}")
    if layers < 1:
        raise KDConfigError(f"{name}.layers", f"must be >= 1, got {layers}")
    if not 0.0 <= dropout < 1.0:
        raise KDConfigError(f"{name}.dropout", f"must be in [0, 1), got {dropout}")


def _widths(in_channels: int, hidden: int, num_classes: int, layers: int) -> list[tuple[int, int]]:
    """``(in, out)`` of each of ``layers`` layers: in -> hidden -> ... -> hidden -> classes."""
    sizes = [in_channels] + [hidden] * (layers - 1) + [num_classes]
    return list(itertools.pairwise(sizes))


class GraphMLP(nn.Module):
    """The student: an MLP on node features only, ``(Linear-ReLU-Dropout) x (layers - 1)`` then ``Linear``.

    As the FF-G2M/GLNN code's MLP (``num_layers`` linear layers, ReLU and dropout after every one but the last).

    Args:
        in_channels: node feature width.
        hidden: width of the hidden layers.
        num_classes: output logits.
        layers: linear layers (1: softmax regression).
        dropout: dropout probability after every hidden ReLU.
    """

    uses_graph = False

    def __init__(
        self, in_channels: int, hidden: int = 256, num_classes: int = 10, layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        _check_sizes("GraphMLP", in_channels, hidden, num_classes, layers, dropout)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dropout = dropout
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in _widths(in_channels, hidden, num_classes, layers))

    def forward(self, x: Tensor) -> Tensor:
        check_node_features(self, x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.dropout(F.relu(x), self.dropout, self.training)
        return x


class _GNN(nn.Module):
    uses_graph = True
    in_channels: int
    convs: nn.ModuleList

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        check_node_features(self, x)
        for i, conv in enumerate(self.convs):
            x = self.layer(i, conv, x, edge_index)
        return x

    def layer(self, i: int, conv: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
        x = conv(x, edge_index)
        if i < len(self.convs) - 1:
            x = F.dropout(F.relu(x), self.dropout, self.training)
        return x


class GCNNet(_GNN):
    """Graph convolutional network (Kipf & Welling, ICLR 2017): ``GCNConv`` layers (symmetric normalisation of
    A + I), ReLU and dropout between them. As the FF-G2M code's GCN (DGL ``GraphConv``, norm ``both``, on the graph
    with self loops).

    Args:
        in_channels: node feature width.
        hidden: width of the hidden layers.
        num_classes: output logits.
        layers: graph convolutions.
        dropout: dropout probability after every hidden ReLU.
    """

    def __init__(
        self, in_channels: int, hidden: int = 64, num_classes: int = 10, layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        _check_sizes("GCNNet", in_channels, hidden, num_classes, layers, dropout)
        import_torch_geometric()
        from torch_geometric.nn import GCNConv

        self.in_channels, self.num_classes, self.dropout = in_channels, num_classes, dropout
        self.convs = nn.ModuleList(GCNConv(i, o) for i, o in _widths(in_channels, hidden, num_classes, layers))


class SAGENet(_GNN):
    """GraphSAGE (Hamilton et al., NeurIPS 2017) with the ``gcn`` aggregator: ``h_i' = W mean_{j in N(i) ∪ {i}} h_j
    + b`` (``SAGEConv(aggr="mean", root_weight=False)`` on the graph with self loops), ReLU and dropout between
    layers. RECONSTRUCTION: DGL's ``gcn`` aggregator, used by the FF-G2M code on a graph that already has self
    loops, counts the node itself twice; this counts it once.

    Args:
        in_channels: node feature width.
        hidden: width of the hidden layers.
        num_classes: output logits.
        layers: SAGE layers.
        dropout: dropout probability after every hidden ReLU.
    """

    def __init__(
        self, in_channels: int, hidden: int = 64, num_classes: int = 10, layers: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        _check_sizes("SAGENet", in_channels, hidden, num_classes, layers, dropout)
        import_torch_geometric()
        from torch_geometric.nn import SAGEConv

        self.in_channels, self.num_classes, self.dropout = in_channels, num_classes, dropout
        self.convs = nn.ModuleList(
            SAGEConv(i, o, aggr="mean", root_weight=False) for i, o in _widths(in_channels, hidden, num_classes, layers)
        )

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        from torch_geometric.utils import add_remaining_self_loops

        return super().forward(x, add_remaining_self_loops(edge_index, num_nodes=x.shape[0])[0])


class GATNet(_GNN):
    """Graph attention network (Veličković et al., ICLR 2018): ``GATConv`` layers with ``heads`` heads of width
    ``hidden // heads`` concatenated, then an output layer with one head; as the FF-G2M code's GAT (DGL ``GATConv``
    with feature dropout ``dropout`` on each layer's input, attention dropout, ReLU between layers).

    Args:
        in_channels: node feature width.
        hidden: width of the hidden layers (``heads`` heads of ``hidden // heads``).
        num_classes: output logits.
        layers: attention layers.
        dropout: feature dropout on the input of every layer (DGL's ``feat_drop``).
        heads: attention heads of the hidden layers.
        attn_dropout: dropout on the attention coefficients.
        negative_slope: LeakyReLU slope of the attention scores.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 64,
        num_classes: int = 10,
        layers: int = 2,
        dropout: float = 0.6,
        heads: int = 4,
        attn_dropout: float = 0.3,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        _check_sizes("GATNet", in_channels, hidden, num_classes, layers, dropout)
        if heads < 1 or hidden % heads:
            raise KDConfigError("GATNet.heads", f"must be >= 1 and divide hidden={hidden}, got {heads}")
        if not 0.0 <= attn_dropout < 1.0:
            raise KDConfigError("GATNet.attn_dropout", f"must be in [0, 1), got {attn_dropout}")
        import_torch_geometric()
        from torch_geometric.nn import GATConv

        self.in_channels, self.num_classes, self.dropout = in_channels, num_classes, dropout
        convs: list[nn.Module] = []
        width = in_channels
        for _ in range(layers - 1):
            convs.append(
                GATConv(width, hidden // heads, heads=heads, dropout=attn_dropout, negative_slope=negative_slope)
            )
            width = hidden
        convs.append(GATConv(width, num_classes, heads=1, dropout=attn_dropout, negative_slope=negative_slope))
        self.convs = nn.ModuleList(convs)

    def layer(self, i: int, conv: nn.Module, x: Tensor, edge_index: Tensor) -> Tensor:
        x = conv(F.dropout(x, self.dropout, self.training), edge_index)
        return F.relu(x) if i < len(self.convs) - 1 else x
