"""Graph node classifiers: call convention, one-layer values against hand-written propagation, argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torch_geometric")

from kd_lightning.errors import KDConfigError
from kd_lightning.models.graph import GATNet, GCNNet, GraphMLP, SAGENet, uses_graph

# A 4-node graph: path 0-1-2 plus 2-3, both directions.
EDGES = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
ADJ = torch.zeros(4, 4)
ADJ[EDGES[0], EDGES[1]] = 1.0


def test_one_gcn_layer_is_the_symmetric_normalised_propagation() -> None:
    torch.manual_seed(0)
    net = GCNNet(3, num_classes=2, layers=1).eval()
    x = torch.randn(4, 3)
    a = ADJ + torch.eye(4)
    d = a.sum(1).rsqrt()
    conv = net.convs[0]
    expected = (d[:, None] * a * d[None, :]) @ (x @ conv.lin.weight.t()) + conv.bias
    assert torch.allclose(net(x, EDGES), expected, atol=1e-5)


def test_one_sage_layer_averages_the_node_and_its_neighbours() -> None:
    torch.manual_seed(0)
    net = SAGENet(3, num_classes=2, layers=1).eval()
    x = torch.randn(4, 3)
    a = ADJ + torch.eye(4)
    mean = (a @ x) / a.sum(1, keepdim=True)
    conv = net.convs[0]
    expected = conv.lin_l(mean)
    assert torch.allclose(net(x, EDGES), expected, atol=1e-5)
    # An edge list that already holds self loops gives the same result (each node counted once).
    looped = torch.cat([EDGES, torch.arange(4).repeat(2, 1)], dim=1)
    assert torch.allclose(net(x, looped), expected, atol=1e-5)


@pytest.mark.parametrize("cls", [GCNNet, SAGENet, GATNet])
def test_gnns_use_the_graph_and_return_logits(cls: type) -> None:
    torch.manual_seed(0)
    net = cls(5, hidden=8, num_classes=3, layers=2)
    x = torch.randn(4, 5)
    assert uses_graph(net) and net(x, EDGES).shape == (4, 3)
    net.eval()
    assert torch.equal(net(x, EDGES), net(x, EDGES))  # no dropout in eval mode
    without_edges = net(x, torch.zeros(2, 0, dtype=torch.long))
    assert not torch.allclose(without_edges, net(x, EDGES))  # the edges matter


def test_mlp_ignores_the_graph_and_checks_its_width() -> None:
    net = GraphMLP(5, hidden=8, num_classes=3, layers=3)
    assert not uses_graph(net) and net(torch.randn(4, 5)).shape == (4, 3)
    assert len(net.layers) == 3
    with pytest.raises(KDConfigError, match=r"GraphMLP\(in_channels=5\) got 7 features per node"):
        net(torch.randn(4, 7))


def test_uses_graph_falls_back_to_the_forward_signature() -> None:
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
            return x

    assert uses_graph(TwoInputs()) and not uses_graph(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: GATNet(5, hidden=10, heads=4), "GATNet.heads"),
        (lambda: GCNNet(5, layers=0), "GCNNet.layers"),
        (lambda: SAGENet(5, dropout=1.0), "SAGENet.dropout"),
        (lambda: GraphMLP(0), "GraphMLP.in_channels"),
    ],
)
def test_bad_sizes_name_the_argument(build: object, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"^{field}: "):
        build()  # type: ignore[operator]
