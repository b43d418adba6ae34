"""FFG2M and the node-classification task: frozen teacher, graph-free student, ablation modes, checks, CLI fits."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch

pytest.importorskip("torch_geometric")

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.graph import DigitsGraphDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import FFG2M, NodeSupervised
from kd_lightning.methods.tasks.node_classification import graph_batch
from kd_lightning.models.graph import GCNNet, GraphMLP
from tests.helpers.cli import CONFIGS_DIR, SHARED_TEACHERS, TINY, fit, fit_config

ADAM = functools.partial(torch.optim.Adam, lr=0.01, weight_decay=5e-4)


@pytest.fixture(scope="module")
def graph_data() -> DigitsGraphDataModule:
    dm = DigitsGraphDataModule(k=5, train_per_class=3, num_val=60, num_test=200)
    dm.setup("fit")
    return dm


def trainer(epochs: int, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def networks(seed: int = 0) -> tuple[GraphMLP, GCNNet]:
    torch.manual_seed(seed)
    return GraphMLP(64, hidden=32, num_classes=10), GCNNet(64, hidden=16, num_classes=10)


def test_teacher_stays_frozen_in_eval_mode_and_the_student_learns(graph_data: DigitsGraphDataModule) -> None:
    student, teacher = networks()
    model = FFG2M(student=student, teacher=teacher, lamb=0.4, tau=1.5, optimizer=ADAM)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    calls: list[int] = []
    student.register_forward_pre_hook(lambda module, args: calls.append(len(args)))
    trainer(2).fit(model, datamodule=graph_data)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in student_before.items())
    assert calls and set(calls) == {1}  # the student is called with the node features only, never the graph
    metrics = trainer(1).validate(model, datamodule=graph_data, verbose=False)[0]
    assert {"val/acc", "val/teacher_acc", "val/agreement", "val/kl_to_teacher"} <= set(metrics)


def test_terms_are_the_loss_module_on_the_whole_graph(graph_data: DigitsGraphDataModule) -> None:
    student, teacher = networks()
    model = FFG2M(student=student, teacher=teacher, lamb=0.25, tau=1.2, optimizer=ADAM)
    model.check_data(graph_data)
    student.eval()  # no dropout: the two forwards below agree
    terms, logits, y = model.training_loss(graph_data.graph)
    assert set(terms) == {"loss", "ce", "lfd", "hfd"}
    g = graph_batch(graph_data.graph)
    assert torch.equal(y, g.y[g.train_mask]) and logits.shape == (int(g.train_mask.sum()), 10)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(student(g.x)[g.train_mask], g.y[g.train_mask])
    assert terms["ce"].item() == pytest.approx(0.25 * ce.item(), rel=1e-5)


def test_mlp_mode_never_runs_the_teacher(graph_data: DigitsGraphDataModule) -> None:
    student, teacher = networks()
    calls: list[tuple] = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(args))
    model = FFG2M(student=student, teacher=teacher, mode="mlp", fidelity=False, optimizer=ADAM)
    trainer(2, limit_val_batches=0).fit(model, datamodule=graph_data)
    assert len(calls) == 1 and calls[0][0].shape[0] == 3  # only the setup probe (3 nodes), no training forward


def test_node_supervised_keeps_the_best_validation_weights(graph_data: DigitsGraphDataModule) -> None:
    torch.manual_seed(0)
    model = NodeSupervised(model=GCNNet(64, hidden=16, num_classes=10), optimizer=ADAM)
    trainer(4).fit(model, datamodule=graph_data)
    best = model._best_val[0]
    model.eval()
    g = graph_data.graph
    with torch.no_grad():
        acc = (model.student(g.x, g.edge_index)[g.val_mask].argmax(-1) == g.y[g.val_mask]).float().mean()
    assert acc.item() == pytest.approx(best)
    zeros = {k: torch.zeros_like(v) for k, v in model.student.state_dict().items()}
    model._best_val = (1.0, zeros)  # the end of training puts back whatever was best
    model.on_train_end()
    assert all(float(v.abs().sum()) == 0.0 for v in model.student.state_dict().values())


def test_a_gnn_student_an_image_data_module_and_wrong_widths_are_refused(graph_data: DigitsGraphDataModule) -> None:
    _, teacher = networks()
    gnn_student = FFG2M(student=GCNNet(64, num_classes=10), teacher=teacher, optimizer=ADAM)
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.student: GCNNet reads the graph .*GraphMLP"):
        gnn_student.check_data(graph_data)
    with pytest.raises(KDConfigError, match=r"^data: DigitsDataModule serves classification batches"):
        FFG2M(student=GraphMLP(64), teacher=teacher, optimizer=ADAM).check_data(DigitsDataModule())
    wide_teacher = FFG2M(student=GraphMLP(64), teacher=GCNNet(100, num_classes=10), optimizer=ADAM)
    wide = r"^model\.init_args\.teacher: GCNNet has in_channels=100 .* have 64 features"
    with pytest.raises(KDConfigError, match=wide):
        wide_teacher.check_data(graph_data)
    with pytest.raises(KDConfigError, match=r"^model\.init_args\.student: GraphMLP outputs 7 classes but"):
        FFG2M(student=GraphMLP(64, num_classes=7), teacher=teacher, optimizer=ADAM).check_data(graph_data)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mode": "kd"}, "mode"), ({"lamb": 1.5}, "lamb"), ({"tau": -1.0}, "tau")],
)
def test_bad_arguments_name_the_config_field(kwargs: dict, field: str) -> None:
    student, teacher = networks()
    with pytest.raises(KDConfigError, match=rf"^model\.init_args\.{field}: "):
        FFG2M(student=student, teacher=teacher, optimizer=ADAM, **kwargs)


def test_cli_fit_trains_the_gcn_teacher_then_distils(in_tmp: Path) -> None:
    cli = fit_config("digits_graph_ff_g2m.yaml")
    results, model = cli.results, cli.model
    assert {"train/lfd", "train/hfd", "train/ce", "val/acc", "val/teacher_acc"} <= set(results)
    assert isinstance(model.teacher, GCNNet) and isinstance(model.student, GraphMLP)
    assert not model.teacher.training
    cached = NodeSupervised.__name__ in Path(model.teacher_ckpt).with_name("teacher.json").read_text()
    assert cached  # the missing teacher was trained by the node-classification supervised module
    from safetensors.torch import load_file

    weights = load_file(model.teacher_ckpt)
    assert all(torch.equal(model.teacher.state_dict()[k], v) for k, v in weights.items())


def test_cli_student_with_the_wrong_input_width_fails_before_the_teacher_trains(in_tmp: Path) -> None:
    with pytest.raises(KDConfigError) as info:
        fit_config("digits_graph_ff_g2m.yaml", "--model.init_args.student.init_args.in_channels=32")
    assert str(info.value) == (
        "model.init_args.student: GraphMLP has in_channels=32 but the nodes of DigitsGraphDataModule have 64 "
        "features. set model.init_args.student.init_args.in_channels: 64"
    )


def test_cli_missing_planetoid_folder_names_the_files(in_tmp: Path) -> None:
    args = ["--config", str(CONFIGS_DIR / "cora_ff_g2m.yaml"), *TINY, f"--teacher_training.cache_dir={SHARED_TEACHERS}"]
    with pytest.raises(KDConfigError) as info:
        fit([*args, f"--data.init_args.root={in_tmp / 'nowhere'}"])
    message = str(info.value)
    assert message.startswith("data.init_args.root: ") and "\n" not in message
    assert "ind.cora.x" in message and "data.init_args.download true" in message
