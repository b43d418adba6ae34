"""Graph data modules on tiny files written here in the real on-disk formats (Planetoid pickles, gnn-benchmark npz)."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_geometric")
sp = pytest.importorskip("scipy.sparse")

from kd_lightning.data.graph import (  # noqa: E402
    CoauthorAmazonDataModule,
    DigitsGraphDataModule,
    PlanetoidDataModule,
    per_class_split,
)
from kd_lightning.errors import KDConfigError  # noqa: E402

# A 20-node truth: nodes 0-4 labelled (train), 5-11 the rest of allx, 12-19 the test nodes.
N, CORA_FEATURES, CORA_CLASSES = 20, 1433, 7
EDGES = [(i, i + 1) for i in range(N - 1)] + [(0, 19), (3, 12)]


def truth(features: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.random((N, features)) < 0.01).astype(np.float32)
    x[:, 0] = 1.0  # no empty row
    return x, rng.integers(0, classes, N)


def write_planetoid(
    folder: Path, name: str, x: np.ndarray, y: np.ndarray, classes: int, test_index: list[int], isolated: int | None
) -> None:
    """``ind.<name>.*`` as the Planetoid release: pickled scipy CSR features, one-hot numpy labels, a graph dict
    (defaultdict of lists, with a duplicate, a self loop and one-way entries) and the test index text file."""
    folder.mkdir(parents=True, exist_ok=True)
    onehot = np.eye(classes, dtype=np.int32)[y]
    kept_test = [i for i in test_index if i != isolated]
    items = {
        "x": sp.csr_matrix(x[:5]),
        "y": onehot[:5],
        "allx": sp.csr_matrix(x[:12]),
        "ally": onehot[:12],
        "tx": sp.csr_matrix(x[kept_test]),
        "ty": onehot[kept_test],
    }
    graph: dict[int, list[int]] = collections.defaultdict(list)
    for i, j in EDGES:
        graph[i].append(j)  # one direction only: the reader symmetrises
    graph[4].extend([5, 4])  # a duplicate of (4, 5) and a self loop
    items["graph"] = graph
    for suffix, value in items.items():
        with open(folder / f"ind.{name}.{suffix}", "wb") as f:
            pickle.dump(value, f, protocol=2)
    (folder / f"ind.{name}.test.index").write_text("\n".join(str(i) for i in kept_test) + "\n")


def expected_edges(n: int = N) -> set[tuple[int, int]]:
    return {(i, j) for a, b in EDGES for i, j in ((a, b), (b, a)) if i != j and max(i, j) < n}


TEST_ORDER = [15, 12, 19, 13, 18, 14, 17, 16]  # test.index is not sorted in the release either


@pytest.fixture
def cora(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    x, y = truth(CORA_FEATURES, CORA_CLASSES)
    write_planetoid(tmp_path / "Cora" / "raw", "cora", x, y, CORA_CLASSES, TEST_ORDER, None)
    return tmp_path, x, y


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_planetoid_reads_the_release_format_and_public_masks(cora: tuple, trust_pickle: bool) -> None:
    root, x, y = cora
    dm = PlanetoidDataModule(name="cora", root=str(root), num_val=4, trust_pickle=trust_pickle)
    dm.setup("fit")
    g = dm.graph
    assert (dm.num_classes, dm.num_features) == (CORA_CLASSES, CORA_FEATURES)
    assert torch.equal(g.y, torch.as_tensor(y))  # test rows put back at their nodes
    assert torch.allclose(g.x, torch.as_tensor(x / x.sum(1, keepdims=True)))  # row-normalised (DGL)
    assert g.train_mask.nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4]
    assert g.val_mask.nonzero().squeeze(1).tolist() == [5, 6, 7, 8]
    assert g.test_mask.nonzero().squeeze(1).tolist() == list(range(12, 20))
    assert {tuple(e) for e in g.edge_index.t().tolist()} == expected_edges() | {(4, 5), (5, 4)}
    assert g.edge_index.shape[1] == len(expected_edges())  # (4, 5) was already there: no duplicate, no loop
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert all(len(loader) == 1 and next(iter(loader)) is g for loader in loaders)


def test_planetoid_restricted_and_trusted_readers_agree(cora: tuple) -> None:
    root = cora[0]
    graphs = []
    for trust in (False, True):
        dm = PlanetoidDataModule(name="Cora", root=str(root), num_val=4, trust_pickle=trust, normalize_features=False)
        dm.setup("fit")
        graphs.append(dm.graph)
    for key in ("x", "edge_index", "y", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(graphs[0][key], graphs[1][key]), key


def test_citeseer_isolated_test_node_gets_a_zero_row(tmp_path: Path) -> None:
    x, y = truth(3703, 6)
    write_planetoid(tmp_path, "citeseer", x, y, 6, TEST_ORDER, isolated=14)  # files straight in root
    dm = PlanetoidDataModule(name="CiteSeer", root=str(tmp_path), num_val=4)
    dm.setup("fit")
    g = dm.graph
    assert g.num_nodes == N and not g.test_mask[14] and int(g.test_mask.sum()) == 7
    assert float(g.x[14].abs().sum()) == 0.0 and int(g.y[14]) == 0
    others = [i for i in range(N) if i != 14]
    assert torch.equal(g.y[others], torch.as_tensor(y)[others])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_planetoid_refuses_a_pickle_that_names_code_before_running_it(cora: tuple) -> None:
    root = cora[0]
    marker = root / "pwned"
    with open(root / "Cora" / "raw" / "ind.cora.graph", "wb") as f:
        pickle.dump(_Evil(marker), f, protocol=2)
    dm = PlanetoidDataModule(name="Cora", root=str(root), num_val=4)
    with pytest.raises(
        KDConfigError, match=r"^data\.init_args\.trust_pickle: refused to unpickle: .*(posix|os)\.system"
    ):
        dm.setup("fit")
    assert not marker.exists()


def test_planetoid_missing_files_is_one_line_naming_them(tmp_path: Path) -> None:
    dm = PlanetoidDataModule(name="PubMed", root=str(tmp_path))
    with pytest.raises(KDConfigError) as info:
        dm.check_before_teacher()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.init_args.root: ")
    assert "ind.pubmed.x," in message and "ind.pubmed.test.index" in message
    assert "data.init_args.download true" in message
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.name: unknown dataset 'ogbn'"):
        PlanetoidDataModule(name="ogbn")


def write_npz(path: Path, features: int, per_class: int = 6, classes: int = 3) -> np.ndarray:
    """A gnn-benchmark npz: CSR adjacency (a ring, one direction) and attributes (counts), labels, class names."""
    n = per_class * classes
    y = np.repeat(np.arange(classes), per_class)
    rng = np.random.default_rng(0)
    attr = sp.csr_matrix(rng.integers(0, 3, (n, features)).astype(np.float32) * (rng.random((n, features)) < 0.02))
    adj = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), (np.arange(n) + 1) % n)), shape=(n, n))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr, adj_shape=np.array(adj.shape),
        attr_data=attr.data, attr_indices=attr.indices, attr_indptr=attr.indptr, attr_shape=np.array(attr.shape),
        labels=y, class_names=np.array([f"c{i}" for i in range(classes)]),
    )  # fmt: skip
    return attr.toarray()


def test_npz_reader_and_random_per_class_split(tmp_path: Path) -> None:
    attr = write_npz(tmp_path / "Photo" / "raw" / "amazon_electronics_photo.npz", 745)
    kwargs = {"name": "photo", "root": str(tmp_path), "train_per_class": 2, "num_val": 4, "num_test": 5}
    dm = CoauthorAmazonDataModule(split_seed=0, **kwargs)
    dm.setup("fit")
    g = dm.graph
    assert torch.equal(g.x, torch.as_tensor((attr > 0).astype(np.float32)))  # binarised
    n = g.num_nodes
    assert {tuple(e) for e in g.edge_index.t().tolist()} == {(i, (i + 1) % n) for i in range(n)} | {
        ((i + 1) % n, i) for i in range(n)
    }
    assert torch.bincount(g.y[g.train_mask]).tolist() == [2, 2, 2]
    assert (int(g.val_mask.sum()), int(g.test_mask.sum())) == (4, 5)
    assert not (g.train_mask & g.val_mask).any() and not (g.val_mask & g.test_mask).any()
    again = CoauthorAmazonDataModule(split_seed=0, **kwargs)
    again.setup("fit")
    other = CoauthorAmazonDataModule(split_seed=1, **kwargs)
    other.setup("fit")
    assert torch.equal(again.graph.train_mask, g.train_mask)
    assert not torch.equal(other.graph.train_mask, g.train_mask)


def test_npz_missing_file_and_too_large_split(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.root: .* lacks ms_academic_cs\.npz"):
        CoauthorAmazonDataModule(name="CS", root=str(tmp_path)).setup("fit")
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.num_val: 12 nodes remain"):
        per_class_split(torch.arange(3).repeat_interleave(6), 2, 10, 5, seed=0)


def test_digits_graph_noise_and_split_are_seeded_and_the_graph_is_homophilous() -> None:
    dm = DigitsGraphDataModule(k=5, train_per_class=3, num_val=50, num_test=100)
    dm.setup("fit")
    g = dm.graph
    assert (g.num_nodes, dm.num_features, dm.num_classes) == (1797, 64, 10)
    assert dm.split_summary() == {"nodes": 1797, "edges": g.edge_index.shape[1], "train": 30, "val": 50, "test": 100}
    src, dst = g.edge_index
    assert bool((src != dst).all()) and (g.y[src] == g.y[dst]).float().mean() > 0.9
    assert g.edge_index.shape[1] >= 1797 * 5  # k neighbours each, made two-way
    same = DigitsGraphDataModule(k=5, train_per_class=3, num_val=50, num_test=100)
    same.setup("fit")
    assert torch.equal(same.graph.x, g.x) and torch.equal(same.graph.train_mask, g.train_mask)
    noise = DigitsGraphDataModule(k=5, train_per_class=3, num_val=50, num_test=100, graph_seed=1, split_seed=1)
    noise.setup("fit")
    assert not torch.equal(noise.graph.x, g.x) and not torch.equal(noise.graph.train_mask, g.train_mask)
    assert torch.equal(noise.graph.edge_index, g.edge_index)  # the graph comes from the clean pixels
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.feature_noise: "):
        DigitsGraphDataModule(feature_noise=-1.0)
