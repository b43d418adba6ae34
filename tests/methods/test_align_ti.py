"""AlignTI: IRS layer choice on a toy VLM, layers in checkpoints, frozen teacher, skipped terms, bad arguments, CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.align_ti import instruction_to_vision_attention, iva_loss, salient_visual_tokens
from kd_lightning.methods import AlignTI
from kd_lightning.models.lm import TinyGPT
from kd_lightning.models.vlm import DigitPatchEncoder, VisionLanguageModel, VLMOutput


# ---------------------------------------------------------------------------------------------- toy VLM
class ToyVLM(nn.Module):
    """A stand-in VLM (8 visual tokens, vocabulary 32) whose layer ``dependent`` attends from the instruction tokens
    to visual token ``(first instruction id) % 8``; every other layer's attention is the same for every input."""

    num_image_tokens = 8
    hidden_size = 16

    def __init__(self, n_layers: int, dependent: int) -> None:
        super().__init__()
        self.language = nn.Module()
        self.language.blocks = nn.ModuleList(nn.Identity() for _ in range(n_layers))
        self.head = nn.Linear(1, 32)
        self.dependent = dependent

    def visual_tokens(self, images: Tensor) -> Tensor:
        return torch.zeros(images.shape[0], 8, self.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, images: Tensor | None = None) -> Tensor:
        return self.head(torch.zeros(*input_ids.shape, 1))

    def forward_detailed(self, input_ids, attention_mask=None, images=None, visual_embeds=None, **_: bool) -> VLMOutput:
        b, t = input_ids.shape
        length = 8 + t
        attentions = []
        for layer in range(len(self.language.blocks)):
            attn = torch.zeros(b, 2, length, length)
            if layer == self.dependent:
                attn[torch.arange(b), :, 8:, input_ids[:, 0] % 8] = 1.0
            else:
                attn[:, :, 8:, :8] = torch.linspace(1.0, 2.0, 8) / 12.0  # input-independent
            attentions.append(attn)
        return VLMOutput(self(input_ids), self.visual_tokens(input_ids), (), tuple(attentions), 8)


def toy_batch(size: int = 6) -> dict[str, Tensor]:
    ids = torch.arange(size).unsqueeze(1).repeat(1, 4)  # different instructions
    return {
        "images": torch.zeros(size, 3, 16, 64),
        "input_ids": ids,
        "attention_mask": torch.ones(size, 4, dtype=torch.bool),
        "labels": torch.full((size, 4), -100),
        "instruction_mask": torch.tensor([[True, True, True, False]] * size),
    }


@pytest.mark.parametrize(("rule", "student_layer"), [("irs", 1), ("relative", 0), (0, 0)])
def test_irs_picks_the_layer_whose_attention_depends_on_the_instruction(rule, student_layer: int) -> None:
    model = AlignTI(
        student=ToyVLM(n_layers=2, dependent=1), teacher=ToyVLM(n_layers=3, dependent=1), student_layer=rule
    )
    assert model.calibrate([toy_batch(3), toy_batch(4)]) == (1, student_layer)
    scores = model.irs_scores["teacher"]
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[2] == pytest.approx(0.0, abs=1e-6) and scores[1] > 0.5
    assert ("student" in model.irs_scores) == (rule == "irs")
    fixed = AlignTI(student=ToyVLM(2, 1), teacher=ToyVLM(3, 1), teacher_layer=-1, student_layer=0)
    assert fixed.layers_chosen and fixed.calibrate([]) == (2, 0)  # given layers: no calibration


# ---------------------------------------------------------------------------------------------- real tiny VLMs
def tiny_vlm(seed: int, d_model: int, n_layers: int) -> VisionLanguageModel:
    torch.manual_seed(seed)
    vision = DigitPatchEncoder(channels=(4, 8), patch_size=(4, 4), image_size=(16, 64))
    return VisionLanguageModel(vision, TinyGPT(d_model=d_model, n_layers=n_layers, n_heads=2, max_seq_len=32))


def method(**kwargs: object) -> AlignTI:
    return AlignTI(student=tiny_vlm(0, 16, 1), teacher=tiny_vlm(1, 24, 2), **kwargs)  # type: ignore[arg-type]


def batch(size: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (size, 8), generator=g)
    mask = torch.ones(size, 8, dtype=torch.bool)
    mask[1, 7:] = False
    labels = ids.masked_fill(~mask, -100)
    labels[:, :4] = -100
    instruction = torch.zeros(size, 8, dtype=torch.bool)
    instruction[:, 1:4] = True
    return {
        "images": torch.randn(size, 3, 16, 64, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "instruction_mask": instruction,
    }


def test_iva_term_is_the_salient_hidden_mse_of_the_chosen_layers() -> None:
    model = method(sft_weight=0, kd_weight=0, tpa_weight=0, teacher_layer=0, student_layer=0)
    sums, count = model.token_loss_sums(batch())
    assert set(sums) == {"loss", "iva"}
    b = batch()
    s = model.student.forward_detailed(b["input_ids"], b["attention_mask"], b["images"], output_hidden_states=True)
    t = model.teacher.forward_detailed(
        b["input_ids"], b["attention_mask"], b["images"], output_hidden_states=True, output_attentions=True
    )
    a_t = instruction_to_vision_attention(t.attentions[0], b["instruction_mask"], 4)
    _, salient = salient_visual_tokens(a_t, 0.25)
    assert salient.sum() == 3  # one of 4 visual tokens per row
    expected = iva_loss(s.hidden_states[1][:, :4], t.hidden_states[1][:, :4], salient, model.iva_projector)
    torch.testing.assert_close(sums["iva"], expected * count)


def test_gradients_reach_student_and_projector_teacher_frozen_in_eval() -> None:
    model = method()
    model.train()
    before = copy.deepcopy(model.teacher.state_dict())
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    for _ in range(2):
        sums, _ = model.token_loss_sums(batch())
        assert {"sft", "kd", "iva", "tpa"} <= set(sums) and all(torch.isfinite(v) for v in sums.values())
        optimizer.zero_grad()
        sums["loss"].backward()
        assert model.iva_projector.weight.grad is not None and model.iva_projector.weight.grad.abs().sum() > 0
        assert model.student.language.token_embedding.weight.grad is not None
        assert all(p.grad is None for p in model.teacher.parameters())
        optimizer.step()
    assert model.layers_chosen  # calibrated on the first batch outside a fit
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_zero_weight_terms_are_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    import kd_lightning.methods.align_ti as module

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("computed a zero-weight term")

    requested: list[bool] = []
    model = method(iva_weight=0, tpa_weight=0)
    original = model.teacher.language.forward_embeds

    def spy(*args: object, **kwargs: bool) -> object:
        requested.append(bool(kwargs.get("output_attentions")) or bool(kwargs.get("output_hidden_states")))
        return original(*args, **kwargs)

    monkeypatch.setattr(model.teacher.language, "forward_embeds", spy)
    monkeypatch.setattr(module, "transition_probability_alignment", fail)
    monkeypatch.setattr(module, "iva_loss", fail)
    sums, _ = model.token_loss_sums(batch())
    assert set(sums) == {"loss", "sft", "kd"} and requested == [False]
    assert model.iva_projector is None and not model.layers_chosen
    sft_only = method(kd_weight=0, iva_weight=0, tpa_weight=0)
    monkeypatch.setattr(sft_only.teacher, "forward", fail)
    assert set(sft_only.token_loss_sums(batch())[0]) == {"loss", "sft"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"iva_weight": -1.0}, "iva_weight"),
        ({"sft_weight": 0, "kd_weight": 0, "iva_weight": 0, "tpa_weight": 0}, "sft_weight"),
        ({"salient_ratio": 0.0}, "salient_ratio"),
        ({"salient_ratio": 1.5}, "salient_ratio"),
        ({"tpa_top_k": 0}, "tpa_top_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"iva_form": "cosine"}, "iva_form"),
        ({"teacher_layer": 2}, "teacher_layer"),
        ({"student_layer": "deepest"}, "student_layer"),
        ({"student_layer": 1}, "student_layer"),
        ({"irs_similarity": "dot"}, "irs_similarity"),
        ({"calibration_batches": 0}, "calibration_batches"),
    ],
)
def test_bad_arguments_name_their_field(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"model\.init_args\.{field}") as err:
        method(**kwargs)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_fit_logs_pass_at_1_and_keeps_the_layers_in_the_checkpoint(tmp_path: Path) -> None:
    from tests.helpers.cli import TINY_VQA, fit_config

    cli = fit_config(
        "vqa_align_ti.yaml",
        *TINY_VQA,
        "--model.init_args.calibration_batches=2",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    model = cli.model
    assert isinstance(model, AlignTI) and not model.teacher.training and model.layers_chosen
    assert len(model.irs_scores["teacher"]) == 3  # the teacher's TinyGPT has 3 blocks
    teacher_layer = max(range(3), key=lambda i: model.irs_scores["teacher"][i])
    assert int(model.teacher_layer_index) == teacher_layer
    assert int(model.student_layer_index) == model.relative_student_layer(teacher_layer)
    metrics = cli.trainer.logged_metrics
    assert {"train/sft_epoch", "train/kd_epoch", "train/iva_epoch", "train/tpa_epoch", "val/pass@1"} <= set(metrics)
    checkpoint = torch.load(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=False)
    saved = checkpoint["align_ti"]
    assert (saved["teacher_layer"], saved["student_layer"]) == (teacher_layer, int(model.student_layer_index))
    fresh = AlignTI(student=copy.deepcopy(model.student).cpu(), teacher=copy.deepcopy(model.teacher).cpu())
    assert not fresh.layers_chosen
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.layers_chosen and int(fresh.teacher_layer_index) == teacher_layer
    assert fresh.irs_scores == model.irs_scores
    torch.testing.assert_close(fresh.iva_projector.weight, model.iva_projector.weight.cpu())
