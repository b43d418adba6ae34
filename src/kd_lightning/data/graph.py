"""Node-classification graphs as full-batch data modules (GNN -> MLP distillation, e.g. FF-G2M).

Every loader (train, validation, test) yields the same single batch: the whole graph as a
``torch_geometric.data.Data`` with ``x [N, F]`` (float node features), ``edge_index [2, E]`` (long; undirected:
both directions, no self loops, no duplicates), ``y [N]`` (class ids) and bool ``train_mask``, ``val_mask``,
``test_mask`` ``[N]``. One training step = one epoch. ``batch_size`` is ignored (full batch).

- :class:`PlanetoidDataModule`: Cora, CiteSeer, PubMed from the Planetoid raw files (``ind.<name>.{x, tx, allx,
  y, ty, ally, graph, test.index}``; torch_geometric's layout ``<root>/<Name>/raw/``) with the standard public
  masks (train: the labelled ``y`` rows, val: the next 500 nodes, test: ``test.index``), as torch_geometric's
  ``read_planetoid_data``. Those files are Python pickles: they are read with a restricted unpickler that admits
  only numpy arrays, scipy CSR/CSC/COO matrix *states* (rebuilt here, no scipy object is created), dicts and lists,
  and refuses anything else before it runs. ``trust_pickle: true`` reads them with torch_geometric's own reader
  (plain ``pickle.load``): only for files you trust. torch_geometric's processed cache (``processed/data.pt``) is
  neither written nor read: its loader (torch_geometric 2.8 ``io.fs.torch_load``) tries ``weights_only=True`` and
  falls back to a full unpickle when that fails.
- :class:`CoauthorAmazonDataModule`: Coauthor CS/Physics and Amazon Computers/Photo from the gnn-benchmark ``.npz``
  files (``np.load(allow_pickle=False)``), with random splits per ``split_seed``: 20 labelled nodes per class,
  500 validation and 1000 test nodes drawn from the rest (as the FF-G2M code's ``load_data``).
- :class:`DigitsGraphDataModule`: an offline graph over scikit-learn's 1,797 digits (see its docstring).

``download`` is off by default; missing files are a one-line error naming them.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.digits import load_sklearn_digits
from kd_lightning.errors import KDConfigError
from kd_lightning.models.graph import import_torch_geometric
from kd_lightning.utils.safe_pickle import ALLOWED_GLOBALS, UnsafePickleError

__all__ = [
    "NODE_CLASSIFICATION",
    "NPZ_DATASETS",
    "PLANETOID_DATASETS",
    "PLANETOID_FILES",
    "CoauthorAmazonDataModule",
    "DigitsGraphDataModule",
    "GraphDataModule",
    "PlanetoidDataModule",
    "knn_graph",
    "per_class_split",
    "read_planetoid_file",
    "row_normalize",
    "undirected",
]

#: The ``task`` of the graph data modules (node-classification methods refuse other data).
NODE_CLASSIFICATION = "node_classification"
#: Planetoid datasets: canonical name -> (classes, feature width).
PLANETOID_DATASETS: dict[str, tuple[int, int]] = {"Cora": (7, 1433), "CiteSeer": (6, 3703), "PubMed": (3, 500)}
#: The raw files of a Planetoid dataset, ``ind.<name>.<suffix>``.
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
#: gnn-benchmark npz datasets: canonical name -> (file, classes, feature width).
NPZ_DATASETS: dict[str, tuple[str, int, int]] = {
    "CS": ("ms_academic_cs.npz", 15, 6805),
    "Physics": ("ms_academic_phy.npz", 5, 8415),
    "Computers": ("amazon_electronics_computers.npz", 10, 767),
    "Photo": ("amazon_electronics_photo.npz", 8, 745),
}
NPZ_URL = "https://github.com/shchur/gnn-benchmark/raw/master/data/npz"
NPZ_KEYS = ("adj_data", "adj_indices", "adj_indptr", "adj_shape", "attr_data", "attr_indices", "attr_indptr",
            "attr_shape", "labels")  # fmt: skip


# ---------------------------------------------------------------------------------------------- graph helpers
def undirected(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Both directions of every edge, self loops and duplicates removed, sorted by (source, target)."""
    edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    keys = torch.unique(edge_index[0] * num_nodes + edge_index[1])
    return torch.stack([keys // num_nodes, keys % num_nodes])


def row_normalize(x: Tensor) -> Tensor:
    """Each row divided by its sum (rows summing to 0 stay 0): DGL's citation-graph feature preprocessing."""
    total = x.sum(dim=1, keepdim=True)
    return torch.where(total != 0, x / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(x))


def knn_graph(features: Tensor, k: int) -> Tensor:
    """Undirected k-nearest-neighbour graph (Euclidean) over the rows of ``features``: each node links to its ``k``
    nearest other nodes, then every edge is made two-way."""
    dist = torch.cdist(features, features)
    dist.fill_diagonal_(float("inf"))
    neighbours = dist.topk(k, dim=1, largest=False).indices
    rows = torch.arange(features.shape[0]).repeat_interleave(k)
    return undirected(torch.stack([rows, neighbours.reshape(-1)]), features.shape[0])


def per_class_split(
    y: Tensor, train_per_class: int, num_val: int, num_test: int | None, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Random masks: ``train_per_class`` nodes of each class, then ``num_val`` and ``num_test`` (``None``: all the
    rest) nodes drawn from the remaining ones (the FF-G2M/GLNN split of Coauthor and Amazon). Fixed by ``seed``.

    Raises:
        KDConfigError: when too few nodes remain for the validation and test parts.
    """
    generator = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    train = torch.zeros(n, dtype=torch.bool)
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().squeeze(1)
        train[idx[torch.randperm(len(idx), generator=generator)[:train_per_class]]] = True
    rest = (~train).nonzero().squeeze(1)
    rest = rest[torch.randperm(len(rest), generator=generator)]
    wanted = num_val + (num_test or 0)
    if len(rest) < wanted or (num_test is None and len(rest) <= num_val):
        raise KDConfigError(
            "data.init_args.num_val",
            f"{len(rest)} nodes remain after the training nodes but num_val + num_test asks for {wanted}",
            "lower num_val / num_test (or train_per_class)",
        )
    val = torch.zeros(n, dtype=torch.bool)
    val[rest[:num_val]] = True
    test = torch.zeros(n, dtype=torch.bool)
    test[rest[num_val : None if num_test is None else num_val + num_test]] = True
    return train, val, test


class _Graph(Dataset):
    """The one item of a full-batch loader: the graph."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        return self.graph


def _only(items: list[Any]) -> Any:
    return items[0]


# ---------------------------------------------------------------------------------------------- base
class GraphDataModule(KDDataModule):
    """Base of the full-batch graph data modules: subclasses implement :meth:`load` (tensors of the graph).

    After ``setup``: ``graph`` (the ``Data``), ``num_classes``, ``num_features`` and ``input_shape = (F,)`` (one
    node). Class and feature counts known before reading the files are set at construction, so that networks can
    be checked before a teacher is trained.

    Args:
        **kwargs: :class:`~kd_lightning.data.base.KDDataModule`'s ``root``, ``download``, ``split_seed`` (the split
            of the random-split datasets), ``num_workers``; ``batch_size`` is ignored (full batch).
    """

    task: ClassVar[str] = NODE_CLASSIFICATION

    def __init__(self, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        if self.meta_split:
            raise KDConfigError("meta_split", "graph data modules serve one full graph and hold out no meta split")
        self.graph: Any = None
        self.num_classes: int | None = None  # type: ignore[assignment]
        self.num_features: int | None = None

    def load(self) -> dict[str, Tensor]:
        """``{"x", "edge_index", "y", "train_mask", "val_mask", "test_mask"}`` of the graph."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.graph is not None:
            return
        tg = import_torch_geometric()
        parts = self.load()
        x, y = parts["x"].float().contiguous(), parts["y"].long()
        self.graph = tg.data.Data(
            x=x,
            edge_index=parts["edge_index"].long().contiguous(),
            y=y,
            train_mask=parts["train_mask"],
            val_mask=parts["val_mask"],
            test_mask=parts["test_mask"],
        )
        self.num_classes = int(y.max()) + 1 if self.num_classes is None else self.num_classes
        self.num_features = int(x.shape[1])
        self.input_shape = (self.num_features,)
        self.train_set = self.val_set = self.test_set = _Graph(self.graph)

    def check_before_teacher(self) -> None:
        """Read the graph now (downloading it first when ``download`` is on): missing files fail before a teacher
        is trained, and the networks are checked against the real feature width."""
        self.prepare_data()
        self.setup("fit")

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create the {split} set.")
        return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=_only, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def split_summary(self) -> dict[str, int]:
        """Nodes per split and edges (both directions counted), for reports."""
        g = self.graph
        return {
            "nodes": int(g.num_nodes),
            "edges": int(g.edge_index.shape[1]),
            "train": int(g.train_mask.sum()),
            "val": int(g.val_mask.sum()),
            "test": int(g.test_mask.sum()),
        }


def _missing_files_error(folder: Path, missing: list[str], what: str, layout: str) -> KDConfigError:
    return KDConfigError(
        "data.init_args.root",
        f"{folder} lacks {', '.join(missing)} ({what})",
        f"put the files there ({layout}) or set data.init_args.download true",
    )


def _canonical(name: str, known: dict[str, Any], field: str = "data.init_args.name") -> str:
    for canonical in known:
        if canonical.lower() == name.lower():
            return canonical
    raise KDConfigError(field, f"unknown dataset {name!r}", f"choose one of {', '.join(known)}")


# ---------------------------------------------------------------------------------------------- Planetoid
class _SparseState:
    """What a pickled scipy sparse matrix holds (its ``__dict__``), without scipy: rebuilt by :meth:`to_dense`."""

    fmt = "csr"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafePickleError(f"a pickled {self.fmt} matrix with a {type(state).__name__} state")
        self.state = state

    def to_dense(self) -> np.ndarray:
        state = getattr(self, "state", {})
        shape = state.get("_shape", state.get("shape"))
        if shape is None:
            raise UnsafePickleError(f"a pickled {self.fmt} matrix without a shape")
        rows, cols = (int(s) for s in shape)
        data = np.asarray(state["data"])
        out = np.zeros((rows, cols), dtype=np.float32)
        if self.fmt == "coo":
            np.add.at(out, (np.asarray(state["row"]), np.asarray(state["col"])), data)
            return out
        indptr, indices = np.asarray(state["indptr"]), np.asarray(state["indices"])
        major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        if self.fmt == "csr":
            np.add.at(out, (major, indices), data)
        else:  # csc
            np.add.at(out, (indices, major), data)
        return out


def _sparse_class(fmt: str) -> type[_SparseState]:
    return type(f"_{fmt.upper()}State", (_SparseState,), {"fmt": fmt})


_SPARSE_CLASSES = {fmt: _sparse_class(fmt) for fmt in ("csr", "csc", "coo")}


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copy_reg._reconstructor`` (protocol 0/1 pickles) for the sparse stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, _SparseState)) or base is not object or state is not None:
        raise UnsafePickleError("refused copy_reg._reconstructor on anything but a sparse matrix")
    return cls.__new__(cls)


def _planetoid_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    allowed: dict[tuple[str, str], Callable[[], Any]] = dict(ALLOWED_GLOBALS)
    for fmt, cls in _SPARSE_CLASSES.items():
        for module in (f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}"):
            allowed[(module, f"{fmt}_matrix")] = lambda cls=cls: cls
            allowed[(module, f"{fmt}_array")] = lambda cls=cls: cls
    allowed[("collections", "defaultdict")] = lambda: lambda *_: {}
    for module in ("__builtin__", "builtins"):
        allowed[(module, "list")] = lambda: list
        allowed[(module, "object")] = lambda: object
    for module in ("copy_reg", "copyreg"):
        allowed[(module, "_reconstructor")] = lambda: _reconstructor
    return allowed


class _PlanetoidUnpickler(pickle.Unpickler):
    ALLOWED = _planetoid_globals()

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = self.ALLOWED.get((module, name))
        if resolve is None:
            raise UnsafePickleError(f"{self.source} names {module}.{name}, which a Planetoid data file never holds")
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused a persistent id")


def read_planetoid_file(path: Path, trust_pickle: bool = False) -> Any:
    """One Planetoid raw file: ``test.index`` -> long tensor; ``graph`` -> ``{node: [neighbours]}``; the others
    -> dense float tensors.

    Args:
        path: ``.../ind.<name>.<suffix>``.
        trust_pickle: read the pickles with torch_geometric's reader (plain ``pickle.load``, runs whatever the
            file names) instead of the restricted reader.

    Raises:
        KDConfigError: a file the restricted reader refuses (naming the global and the opt-in) or cannot parse.
    """
    suffix = path.name.split(".", 2)[-1]
    if suffix == "test.index":
        return torch.tensor([int(line) for line in path.read_text().split()], dtype=torch.long)
    if trust_pickle:
        from torch_geometric.io.planetoid import read_file

        prefix = path.name.split(".")[1]
        return read_file(str(path.parent), prefix, suffix)
    try:
        out = _PlanetoidUnpickler(io.BytesIO(path.read_bytes()), str(path)).load()
    except UnsafePickleError as err:
        raise KDConfigError(
            "data.init_args.trust_pickle",
            f"refused to unpickle: {err}",
            "if the file is the official Planetoid release (or your own), set data.init_args.trust_pickle true",
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise KDConfigError(
            "data.init_args.root",
            f"{path} is not a readable Planetoid file ({type(err).__name__}: {err})",
            "the file may be truncated: fetch it again",
        ) from None
    if suffix == "graph":
        if not isinstance(out, dict):
            raise KDConfigError("data.init_args.root", f"{path} holds a {type(out).__name__}, not a graph dict")
        return {int(k): [int(v) for v in vs] for k, vs in out.items()}
    dense = out.to_dense() if isinstance(out, _SparseState) else np.asarray(out, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))


def assemble_planetoid(items: dict[str, Any], name: str, num_val: int = 500) -> dict[str, Tensor]:
    """Features, edges, labels and the public masks from the raw items, as torch_geometric's
    ``read_planetoid_data`` (CiteSeer's isolated test nodes get zero rows)."""
    tx, allx, y, ty, ally = (items[k] for k in ("tx", "allx", "y", "ty", "ally"))
    test_index = items["test.index"]
    sorted_test = test_index.sort().values
    if name == "CiteSeer":
        span = int(test_index.max() - test_index.min()) + 1
        tx_ext = torch.zeros(span, tx.shape[1], dtype=tx.dtype)
        tx_ext[sorted_test - test_index.min()] = tx
        ty_ext = torch.zeros(span, ty.shape[1], dtype=ty.dtype)
        ty_ext[sorted_test - test_index.min()] = ty
        tx, ty = tx_ext, ty_ext
    features = torch.cat([allx, tx])
    features[test_index] = features[sorted_test]
    labels = torch.cat([ally, ty]).argmax(dim=1)
    labels[test_index] = labels[sorted_test]
    n = labels.shape[0]
    masks = {k: torch.zeros(n, dtype=torch.bool) for k in ("train_mask", "val_mask", "test_mask")}
    masks["train_mask"][: y.shape[0]] = True
    masks["val_mask"][y.shape[0] : y.shape[0] + num_val] = True
    masks["test_mask"][test_index] = True
    pairs = [(int(k), int(v)) for k, vs in items["graph"].items() for v in vs]
    edges = torch.tensor(pairs, dtype=torch.long).t() if pairs else torch.zeros(2, 0, dtype=torch.long)
    edges = edges[:, (edges < n).all(dim=0)]
    return {"x": features, "y": labels, "edge_index": undirected(edges, n), **masks}


class PlanetoidDataModule(GraphDataModule):
    """Cora, CiteSeer or PubMed with the standard public split (Yang et al., ICML 2016; Kipf & Welling, 2017).

    Reads ``ind.<name>.{x, tx, allx, y, ty, ally, graph, test.index}`` from ``<root>/<Name>/raw/`` (torch_geometric's
    layout) or from ``<root>`` itself. Edges are made undirected without self loops (the FF-G2M code takes DGL's
    graph, drops and re-adds self loops; the losses add them where they need them).

    Args:
        name: ``"Cora"``, ``"CiteSeer"`` or ``"PubMed"`` (any case).
        root: folder of the files (see above).
        normalize_features: divide each node's features by their sum (DGL's citation datasets do, and the FF-G2M
            code loads them through DGL). RECONSTRUCTION: recalled from DGL's loader, not checked here.
        trust_pickle: read the pickled raw files with plain ``pickle.load`` (torch_geometric's reader), which runs
            any code a tampered file names. Off: a restricted reader admits only arrays, sparse matrices, dicts and
            lists (enough for the official files).
        num_val: validation nodes after the training nodes (500 in the public split).
        num_workers: DataLoader workers (0: the graph is one in-memory batch).
        **kwargs: ``download`` (fetch missing raw files from the Planetoid repository).
    """

    def __init__(
        self,
        name: str = "Cora",
        root: str = "data/planetoid",
        normalize_features: bool = True,
        trust_pickle: bool = False,
        num_val: int = 500,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, num_workers=num_workers, **kwargs)
        self.name = _canonical(name, PLANETOID_DATASETS)
        if num_val < 1:
            raise KDConfigError("num_val", f"must be >= 1, got {num_val}")
        self.normalize_features = normalize_features
        self.trust_pickle = trust_pickle
        self.num_val = num_val
        self.num_classes, self.num_features = PLANETOID_DATASETS[self.name]
        self.input_shape = (self.num_features,)

    def file_names(self) -> list[str]:
        return [f"ind.{self.name.lower()}.{suffix}" for suffix in PLANETOID_FILES]

    def folder(self) -> Path:
        """The first of ``<root>/<Name>/raw``, ``<root>/<name>/raw``, ``<root>`` holding every file (else the first)."""
        root = Path(self.root)
        candidates = [root / self.name / "raw", root / self.name.lower() / "raw", root]
        for folder in candidates:
            if all((folder / f).is_file() for f in self.file_names()):
                return folder
        return candidates[0]

    def prepare_data(self) -> None:
        folder = self.folder()
        missing = [f for f in self.file_names() if not (folder / f).is_file()]
        if missing and self.download:
            download_url = import_torch_geometric().data.download_url
            for file in missing:
                download_url(f"{PLANETOID_URL}/{file}", str(folder), log=False)

    def load(self) -> dict[str, Tensor]:
        folder = self.folder()
        missing = [f for f in self.file_names() if not (folder / f).is_file()]
        if missing:
            raise _missing_files_error(
                folder,
                missing,
                f"the Planetoid raw files of {self.name}",
                f"<root>/{self.name}/raw/ind.{self.name.lower()}.*, from {PLANETOID_URL}",
            )
        items = {
            suffix: read_planetoid_file(folder / f"ind.{self.name.lower()}.{suffix}", self.trust_pickle)
            for suffix in PLANETOID_FILES
        }
        parts = assemble_planetoid(items, self.name, self.num_val)
        width = int(parts["x"].shape[1])
        if width != self.num_features:
            raise KDConfigError(
                "data.init_args.name",
                f"the files in {folder} have {width} features per node but {self.name} has {self.num_features}",
                "check that the files are the ones of this dataset",
            )
        if self.normalize_features:
            parts["x"] = row_normalize(parts["x"])
        return parts

    def data_identity(self) -> dict[str, Any]:
        folder = self.folder()
        return {f: (folder / f).stat().st_size for f in self.file_names() if (folder / f).is_file()}


# ---------------------------------------------------------------------------------------------- Coauthor / Amazon
def _csr_dense(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: Any) -> np.ndarray:
    rows, cols = (int(s) for s in shape)
    out = np.zeros((rows, cols), dtype=np.float32)
    np.add.at(out, (np.repeat(np.arange(rows), np.diff(indptr)), indices), data)
    return out


class CoauthorAmazonDataModule(GraphDataModule):
    """Coauthor CS / Physics and Amazon Computers / Photo (Shchur et al., 2018) with random per-seed splits.

    Reads the gnn-benchmark ``.npz`` (CSR adjacency and attributes, labels) from ``<root>/<Name>/raw/`` or ``<root>``
    with ``allow_pickle=False``. The split (``split_seed``): ``train_per_class`` nodes of each class, then ``num_val``
    and ``num_test`` random nodes of the rest (the FF-G2M code: 20 / 500 / 1000). Set ``split_seed`` per run seed
    for the papers' protocol (a new split every seed).

    Args:
        name: ``"CS"``, ``"Physics"``, ``"Computers"`` or ``"Photo"`` (any case).
        root: folder of the file.
        train_per_class: labelled nodes per class.
        num_val: validation nodes.
        num_test: test nodes (``None``: every remaining node).
        binarize_features: set every positive feature to 1 (torch_geometric's reader does; the attributes are
            bag-of-words indicators).
        num_workers: DataLoader workers (0: the graph is one in-memory batch).
        **kwargs: ``split_seed``, ``download`` (fetch the missing file from the gnn-benchmark repository).
    """

    def __init__(
        self,
        name: str = "CS",
        root: str = "data/gnn_benchmark",
        train_per_class: int = 20,
        num_val: int = 500,
        num_test: int | None = 1000,
        binarize_features: bool = True,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, num_workers=num_workers, **kwargs)
        self.name = _canonical(name, NPZ_DATASETS)
        for field, value in (("train_per_class", train_per_class), ("num_val", num_val), ("num_test", num_test or 1)):
            if value < 1:
                raise KDConfigError(field, f"must be >= 1, got {value}")
        self.train_per_class, self.num_val, self.num_test = train_per_class, num_val, num_test
        self.binarize_features = binarize_features
        self.file_name, self.num_classes, self.num_features = NPZ_DATASETS[self.name]
        self.input_shape = (self.num_features,)

    def path(self) -> Path:
        root = Path(self.root)
        candidates = [root / self.name / "raw" / self.file_name, root / self.file_name]
        return next((p for p in candidates if p.is_file()), candidates[0])

    def prepare_data(self) -> None:
        path = self.path()
        if not path.is_file() and self.download:
            import_torch_geometric().data.download_url(f"{NPZ_URL}/{self.file_name}", str(path.parent), log=False)

    def load(self) -> dict[str, Tensor]:
        path = self.path()
        if not path.is_file():
            raise _missing_files_error(
                path.parent, [self.file_name], f"{self.name} in the gnn-benchmark npz format", f"from {NPZ_URL}"
            )
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in NPZ_KEYS if k not in f.files]
                if missing:
                    raise KDConfigError(
                        "data.init_args.root",
                        f"{path} lacks the arrays {', '.join(missing)}",
                        "is it a gnn-benchmark .npz file?",
                    )
                x = _csr_dense(f["attr_data"], f["attr_indices"], f["attr_indptr"], f["attr_shape"])
                adj_shape, indptr = f["adj_shape"], f["adj_indptr"]
                rows = np.repeat(np.arange(int(adj_shape[0])), np.diff(indptr))
                edges = torch.from_numpy(np.stack([rows, f["adj_indices"]]).astype(np.int64))
                y = torch.from_numpy(f["labels"].astype(np.int64))
        except (ValueError, OSError) as err:
            raise KDConfigError(
                "data.init_args.root",
                f"{path} is not a readable npz file ({type(err).__name__}: {' '.join(str(err).split())[:160]})",
                "fetch it again",
            ) from None
        features = torch.from_numpy(x)
        if self.binarize_features:
            features = (features > 0).float()
        if features.shape[1] != self.num_features:
            raise KDConfigError(
                "data.init_args.name",
                f"{path} has {features.shape[1]} features per node but {self.name} has {self.num_features}",
                "check that the file is the one of this dataset",
            )
        train, val, test = per_class_split(y, self.train_per_class, self.num_val, self.num_test, self.split_seed)
        return {
            "x": features,
            "y": y,
            "edge_index": undirected(edges, y.shape[0]),
            "train_mask": train,
            "val_mask": val,
            "test_mask": test,
        }

    def data_identity(self) -> dict[str, Any]:
        path = self.path()
        return {path.name: path.stat().st_size} if path.is_file() else {}


# ---------------------------------------------------------------------------------------------- offline digits graph
class DigitsGraphDataModule(GraphDataModule):
    """An offline node-classification graph over scikit-learn's 1,797 digits, where the graph carries information
    the node features lack (so a GNN beats an MLP, and distilling the GNN helps the MLP).

    - Nodes: the digit images; labels: the digit.
    - Edges: the ``k`` nearest neighbours of each image by Euclidean distance between the CLEAN pixels
      (standardised), made two-way. Neighbours share their class ~96 % of the time with ``k = 10``.
    - Node features: the standardised 64 pixels plus Gaussian noise of std ``feature_noise`` (drawn once, fixed by
      ``graph_seed``): a node alone is hard to classify, its neighbourhood averages the noise away.
    - Split (``split_seed``): ``train_per_class`` labelled nodes per class, ``num_val`` validation nodes,
      ``num_test`` test nodes (``None``: all the rest), as :func:`per_class_split`.

    kd-lightning's own construction (no paper uses it); its purpose is a graph where "MLP alone" is far below the
    GCN teacher: with the defaults and seed 0, MLP alone 59.8 % vs GCN 93.6 % test accuracy (configs
    digits_graph_mlp.yaml and digits_graph_gcn.yaml, 200 epochs; README, "GNN -> MLP (FF-G2M)").

    Args:
        k: neighbours per node.
        feature_noise: std of the noise added to the standardised pixels.
        graph_seed: seed of the noise.
        train_per_class: labelled nodes per class.
        num_val: validation nodes.
        num_test: test nodes (``None``: every remaining node).
        num_workers: DataLoader workers (0: the graph is one in-memory batch).
        **kwargs: ``split_seed``.
    """

    def __init__(
        self,
        k: int = 10,
        feature_noise: float = 1.0,
        graph_seed: int = 0,
        train_per_class: int = 5,
        num_val: int = 300,
        num_test: int | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_workers=num_workers, **kwargs)
        for field, value in (("k", k), ("train_per_class", train_per_class), ("num_val", num_val)):
            if value < 1:
                raise KDConfigError(field, f"must be >= 1, got {value}")
        if num_test is not None and num_test < 1:
            raise KDConfigError("num_test", f"must be >= 1 or null, got {num_test}")
        if not feature_noise >= 0:
            raise KDConfigError("feature_noise", f"must be >= 0, got {feature_noise}")
        self.k, self.feature_noise, self.graph_seed = k, feature_noise, graph_seed
        self.train_per_class, self.num_val, self.num_test = train_per_class, num_val, num_test
        self.num_classes, self.num_features = 10, 64
        self.input_shape = (64,)

    def prepare_data(self) -> None:
        """Nothing to do: the digits ship with scikit-learn."""

    def load(self) -> dict[str, Tensor]:
        images, y = load_sklearn_digits()
        clean = images.reshape(len(y), -1)
        clean = (clean - clean.mean()) / clean.std()
        generator = torch.Generator().manual_seed(self.graph_seed)
        noisy = clean + self.feature_noise * torch.randn(clean.shape, generator=generator)
        train, val, test = per_class_split(y, self.train_per_class, self.num_val, self.num_test, self.split_seed)
        return {
            "x": noisy,
            "y": y,
            "edge_index": knn_graph(clean, self.k),
            "train_mask": train,
            "val_mask": val,
            "test_mask": test,
        }
