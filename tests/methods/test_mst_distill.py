"""MSTDistill: stages and their optimisers, frozen teachers from stage 2 on, hooks removed after every masked forward,
MaskNet selection, the code's weight schedule, checkpoints, bad configurations, CLI fits of the paired-data configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from kd_lightning.data import AVDigitsDataModule
from kd_lightning.errors import KDConfigError
from kd_lightning.methods import MSTDistill, VanillaKD
from kd_lightning.models import LateFusionNet, ModalityNet, SignalNet, SmallCNN
from kd_lightning.models.mst import GateNet, MaskNet1d, MaskNet2d, build_masknet, mask_hidden_dim, masked_forward
from tests.helpers.cli import fit_config
from tests.helpers.tiny import tiny_trainer

SHAPES = {"m1": (1, 8, 8), "m2": (1, 64)}


def networks() -> dict[str, Any]:
    torch.manual_seed(0)
    fusion = LateFusionNet({"m1": SmallCNN(1, [4, 8], 8), "m2": SignalNet(1, [4], [8, 8], 8)}, 8, [12, 6], 10)
    return {
        "student": ModalityNet(SmallCNN(1, [4, 8], 10), ["m1"]),
        "teachers": {
            "multimodal": ModalityNet(fusion, ["m1", "m2"]),
            "crossmodal": ModalityNet(SignalNet(1, [4], [12, 6], 10), ["m2"]),
        },
    }


LAYERS = {"multimodal": ["net.fc1", "net.fc2"], "crossmodal": ["net.fc1", "net.fc2"]}


def make(**kwargs: Any) -> MSTDistill:
    args = {
        **networks(),
        "mask_layers": LAYERS,
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "mask_heads": 3,
        "mask_hidden_factor": 1,
        "optimizer": lambda p: torch.optim.Adam(p, lr=1e-2),
        **kwargs,
    }
    return MSTDistill(**args)


def data() -> AVDigitsDataModule:
    return AVDigitsDataModule(batch_size=32)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


def hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class StageRecorder(Callback):
    """Per epoch: parameters that changed, modes of the networks; the teachers' outputs at the start of stage 2."""

    def __init__(self) -> None:
        self.changed: dict[int, dict[str, list[str]]] = {}
        self.modes: dict[int, dict[str, bool]] = {}
        self.weights: dict[int, tuple[float, float]] = {}

    def parts(self, pl_module: MSTDistill) -> dict[str, torch.nn.Module]:
        return {"student": pl_module.student, "teachers": pl_module.teachers, "masknets": pl_module.masknets,
                "gate": pl_module.gate}  # fmt: skip

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: MSTDistill) -> None:
        self.before = {name: snapshot(part) for name, part in self.parts(pl_module).items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: MSTDistill, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == pl_module.stage1_epochs and batch_idx == 0:  # stage 2 has frozen the teachers
            self.probe = {"m1": torch.randn(5, 1, 8, 8), "m2": torch.randn(5, 1, 64)}
            with torch.no_grad():
                self.teacher_out = {n: t(self.probe) for n, t in pl_module.teachers.items()}
        self.modes[trainer.current_epoch] = {
            "teachers": any(m.training for m in pl_module.teachers.modules()),
            "student": pl_module.student.training,
            "masknets": any(m.training for m in pl_module.masknets.modules()),
        }

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: MSTDistill, *args: Any) -> None:
        assert hooks_left(pl_module.teachers) == 0  # every masked forward removed its hooks
        metrics = trainer.callback_metrics
        if "train/w_kl_step" in metrics:
            self.weights[trainer.current_epoch] = (float(metrics["train/w_kl_step"]), float(metrics["train/w_lb_step"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: MSTDistill) -> None:
        self.changed[trainer.current_epoch] = {
            name: changed(self.before[name], part) for name, part in self.parts(pl_module).items()
        }


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MSTDistill, StageRecorder]:
    module = make(kd_decay_every=1, lb_decay_every=2)
    recorder = StageRecorder()
    trainer = tiny_trainer(
        tmp_path_factory.mktemp("mst"), max_epochs=4, limit_train_batches=3, limit_val_batches=2, callbacks=[recorder]
    )
    trainer.fit(module, datamodule=data())
    return module, recorder


def test_each_stage_trains_exactly_its_parts(staged_run: tuple[MSTDistill, StageRecorder]) -> None:
    module, rec = staged_run
    s1, s2, s3 = rec.changed[0], rec.changed[1], rec.changed[2]
    assert s1["student"] and s1["teachers"] and not s1["masknets"] and not s1["gate"]
    assert s2["masknets"] and not s2["student"] and not s2["teachers"] and not s2["gate"]
    assert s3["student"] and s3["gate"] and not s3["teachers"] and not s3["masknets"]
    assert not rec.changed[3]["teachers"] and not rec.changed[3]["masknets"]
    assert [module.stage_of(e) for e in range(4)] == [1, 2, 3, 3]


def test_teachers_are_frozen_in_eval_mode_from_stage_two(staged_run: tuple[MSTDistill, StageRecorder]) -> None:
    module, rec = staged_run
    assert rec.modes[0] == {"teachers": True, "student": True, "masknets": True}
    assert rec.modes[1] == {"teachers": False, "student": False, "masknets": True}
    assert rec.modes[2] == {"teachers": False, "student": True, "masknets": False}
    assert not any(p.requires_grad for p in module.teachers.parameters())


def test_no_hooks_left_and_unmasked_teachers_unchanged(staged_run: tuple[MSTDistill, StageRecorder]) -> None:
    module, rec = staged_run
    assert hooks_left(module.teachers) == 0
    module.teachers.eval()
    with torch.no_grad():
        for name, teacher in module.teachers.items():
            assert torch.equal(teacher(rec.probe), rec.teacher_out[name])  # after stage 2 and 3 steps
            masked = module.expert_forward(rec.probe, [n for n, _ in module.experts].index(name))
            assert not torch.equal(masked, rec.teacher_out[name])  # the masks do act while installed
    assert hooks_left(module.teachers) == 0


def test_best_masknets_are_kept_and_used_in_stage_three(staged_run: tuple[MSTDistill, StageRecorder]) -> None:
    module, _ = staged_run
    assert torch.isfinite(module.best_mask_loss)
    for mask, best in zip(module.masknets, module.best_masknets, strict=True):
        for key, value in mask.state_dict().items():
            assert torch.equal(value, best.state_dict()[key])
    assert "best_masknets.0.embed.weight" in module.state_dict()


def test_weights_follow_the_codes_schedule_from_the_start_of_stage_three(
    staged_run: tuple[MSTDistill, StageRecorder],
) -> None:
    # kd_decay_every = 1, lb_decay_every = 2: stage-3 epoch 0 trains with the initial weights (1, 1); the decay fires
    # at the end of stage-3 epoch 0 (0 % n == 0), so epoch 1 trains with (0.5, 0.9).
    _, rec = staged_run
    assert rec.weights[2] == pytest.approx((1.0, 1.0))
    assert rec.weights[3] == pytest.approx((0.5, 0.9))
    assert 0 not in rec.weights and 1 not in rec.weights


def test_masknets_follow_the_layer_shapes() -> None:
    assert mask_hidden_dim(596, 2, 3) == 297  # the code's (D // (2 * 3)) * 3
    assert isinstance(build_masknet([12]), MaskNet1d) and not isinstance(build_masknet([12]), MaskNet2d)
    assert isinstance(build_masknet([8, 4, 4]), MaskNet2d)
    assert isinstance(build_masknet([8, 1, 1]), MaskNet1d) and not isinstance(build_masknet([8, 1, 1]), MaskNet2d)
    mask = build_masknet([8, 4, 4], 1, 2)(torch.randn(3, 8, 4, 4))
    assert mask.shape == (3, 8) and bool(((mask > 0) & (mask < 1)).all())
    with pytest.raises(KDConfigError, match="mask_hidden_factor"):
        build_masknet([4], 2, 3)
    with pytest.raises(KDConfigError, match="mask_layers"):
        build_masknet([4, 4])
    assert GateNet(10, 4)(torch.randn(2, 10)).shape == (2, 4)


def test_conv_layers_get_a_2d_masknet_and_hooks_go_away_on_errors() -> None:
    module = make(mask_layers={"multimodal": ["net.encoders.m1.blocks.1"]}, mask_hidden_factor=2, mask_heads=2,
                  input_shape=SHAPES, num_classes=10)  # fmt: skip
    assert isinstance(module.masknets[0], MaskNet2d) and module.num_experts == 1
    teacher = module.teachers["multimodal"]
    layer = teacher.get_submodule("net.encoders.m1.blocks.1")
    with pytest.raises(KDConfigError, match="modalities"):
        masked_forward(teacher, {"m2": torch.zeros(2, 1, 64)}, [(layer, module.masknets[0])])
    assert hooks_left(teacher) == 0


def test_cumulative_masks_reproduce_the_codes_stacking() -> None:
    module = make(input_shape=SHAPES, num_classes=10)
    x = {"m1": torch.randn(4, 1, 8, 8), "m2": torch.randn(4, 1, 64)}
    module.eval()
    with torch.no_grad():
        single = module.expert_logits(x)
        module.cumulative_masks = True
        stacked = module.expert_logits(x)
    assert torch.equal(single[0], stacked[0]) and torch.equal(single[2], stacked[2])  # first expert of each teacher
    assert not torch.equal(single[1], stacked[1])  # second: masked at fc1 and fc2
    assert hooks_left(module.teachers) == 0


def test_kd_gradient_does_not_reach_the_gate_in_topk_mode() -> None:
    from kd_lightning.losses.mst import mst_student_loss

    x = {"m1": torch.randn(6, 1, 8, 8), "m2": torch.randn(6, 1, 64)}
    y = torch.randint(0, 10, (6,))
    for routing, reaches in (("topk", False), ("soft", True)):
        module = make(input_shape=SHAPES, num_classes=10, routing=routing)
        with torch.no_grad():
            experts = torch.stack(module.expert_logits(x), dim=1)
        z = module.student(x)
        terms, _ = mst_student_loss(z, experts, module.gate(z), y, ce_weight=0, lb_weight=0, routing=routing)
        terms["loss"].backward()
        assert all((p.grad is not None) == reaches for p in module.gate.parameters()), routing
        assert all(p.grad is None for p in module.masknets.parameters())


def test_checkpoint_rebuilds_the_parts(staged_run: tuple[MSTDistill, StageRecorder], tmp_path: Path) -> None:
    module, _ = staged_run
    path = tmp_path / "mst.ckpt"
    module.trainer.save_checkpoint(path)
    fresh = make()
    assert fresh.gate is None
    checkpoint = torch.load(path, weights_only=False)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert float(fresh.best_mask_loss) == float(module.best_mask_loss)
    assert torch.equal(fresh.gate.fc2.weight, module.gate.fc2.weight.cpu())


def test_optimisers_one_per_stage_and_per_masknet() -> None:
    module = make(input_shape=SHAPES, num_classes=10, mask_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    optimizers = module.configure_optimizers()
    assert len(optimizers) == 1 + module.num_experts + 1
    ids = [{id(p) for g in o.param_groups for p in g["params"]} for o in optimizers]
    assert ids[0] == {id(p) for p in [*module.student.parameters(), *module.teachers.parameters()]}
    assert all(isinstance(o, torch.optim.SGD) for o in optimizers[1:-1])
    assert ids[1] == {id(p) for p in module.masknets[0].parameters()}
    assert ids[-1] == {id(p) for p in [*module.student.parameters(), *module.gate.parameters()]}


def test_bad_arguments_name_their_field() -> None:
    with pytest.raises(KDConfigError, match=r"^model.init_args.mask_layers: teacher 'multimodal': ModalityNet has no "
                                            r"submodule 'net.fc3'.*close matches: .*'net.fc1'"):  # fmt: skip
        make(mask_layers={"multimodal": ["net.fc3"]})
    with pytest.raises(KDConfigError, match=r"model.init_args.mask_layers: names the teacher 'audio'"):
        make(mask_layers={"audio": ["net.fc1"]})
    with pytest.raises(KDConfigError, match=r"model.init_args.k: must be in \[1, 4\]"):
        make(k=5)
    with pytest.raises(KDConfigError, match=r"model.init_args.routing"):
        make(routing="hard")
    with pytest.raises(KDConfigError, match=r"model.init_args.lb_weight"):
        make(lb_weight=-1.0)
    with pytest.raises(KDConfigError, match=r"model.init_args.stage2_epochs"):
        make(stage2_epochs=-1)
    with pytest.raises(KDConfigError, match=r"model.init_args.temperature"):
        make(temperature=0.0)


def test_no_stage_three_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"trainer.max_epochs: is 2 but MSTDistill trains stage 1 for 1"):
        tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=1).fit(make(), datamodule=data())


def test_missing_modality_of_a_teacher_is_named(tmp_path: Path) -> None:
    expected = (
        r"teachers.multimodal.init_args.modalities: ModalityNet\(LateFusionNet\) reads modality 'm2' but the batch"
    )
    with pytest.raises(KDConfigError, match=rf"^model.init_args.{expected} has \['m1'\]"):
        tiny_trainer(tmp_path, max_epochs=3).fit(make(), datamodule=AVDigitsDataModule(modalities=["m1"]))


# ------------------------------------------------------------------ CLI
MST_TINY = ["--model.init_args.stage1_epochs=1", "--model.init_args.stage2_epochs=1", "--trainer.max_epochs=3"]


def test_cli_fits_the_mst_config(in_tmp: Path) -> None:
    cli = fit_config("digits_av_mst.yaml", *MST_TINY)
    model = cli.model
    assert isinstance(model, MSTDistill) and model.num_experts == 4 and model.stage == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert {"val/acc_multimodal", "val/acc_crossmodal", "val/stage3_loss"} <= set(cli.results)
    assert all(not t.training for t in model.teachers.values())


@pytest.mark.parametrize(
    ("config", "teacher_modalities"),
    [("digits_av_kd_multimodal.yaml", ("m1", "m2")), ("digits_av_kd_crossmodal.yaml", ("m2",))],
)
def test_cli_trains_the_missing_teacher_on_paired_data_then_distils(
    in_tmp: Path, config: str, teacher_modalities: tuple[str, ...]
) -> None:
    cli = fit_config(config)
    assert isinstance(cli.model, VanillaKD)
    assert cli.model.teacher.modalities == teacher_modalities
    assert cli.model.student.modalities == ("m1",)
    assert str(cli.model.teacher_ckpt).endswith("teacher.safetensors")  # trained and cached by kd fit
    assert 0.0 <= cli.results["val/teacher_acc"] <= 1.0


def test_cli_fits_the_unimodal_student(in_tmp: Path) -> None:
    cli = fit_config("digits_av_student.yaml")
    assert cli.model.model.modalities == ("m1",)
    assert "val/acc" in cli.results
