"""CLIPZeroShotClassifier: a tiny CLIPModel built from a config (nothing downloaded), saved and loaded back."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kd_lightning.errors import KDConfigError
from kd_lightning.models import CLIPZeroShotClassifier

transformers = pytest.importorskip("transformers")

CLASSES = ["zero", "one", "two"]
TEMPLATES = ["a photo of a {}.", "a blurry digit: {}."]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _write_tokenizer_files(folder: Path) -> None:
    """A CLIP BPE vocabulary without merges: every word is spelled letter by letter (``c`` and ``c</w>``)."""
    chars = string.ascii_lowercase + string.digits + ".,:'\"-"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPModel (32-wide towers, one layer, 32x32 images, 8x8 patches) with tokenizer and processor."""
    files = tmp_path_factory.mktemp("tokenizer")
    _write_tokenizer_files(files)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(files))
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 40,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # exp(2) = 7.39: not the default, so the learned scale is really read
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(str(folder))
    return folder


def _features(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _manual_logits(folder: Path, pixels: torch.Tensor, classes: list[str], templates: list[str], scale: float | None):
    """CLIP zero-shot logits computed independently: per class, the templates one by one through the full model."""
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        weights = []
        for name in classes:
            per_template = []
            for template in templates:
                tokens = tokenizer([template.format(name)], return_tensors="pt")
                embedding = _features(model.get_text_features(**tokens))[0]
                per_template.append(embedding / embedding.norm())
            mean = torch.stack(per_template).mean(0)
            weights.append(mean / mean.norm())
        image = _features(model.get_image_features(pixel_values=pixels))
        image = image / image.norm(dim=-1, keepdim=True)
        s = model.logit_scale.exp() if scale is None else scale
        return s * image @ torch.stack(weights).t()


def _clip_normalise(folder: Path, images01: torch.Tensor) -> torch.Tensor:
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (images01 - mean) / std


def test_logits_equal_clip_zero_shot_with_prompt_ensembling(clip_dir: Path) -> None:
    classifier = CLIPZeroShotClassifier(str(clip_dir), CLASSES, TEMPLATES)
    torch.manual_seed(1)
    images = torch.rand(4, 3, 32, 32)  # already [0, 1] at the model's size: input_mean 0, input_std 1 (defaults)
    logits = classifier(images)
    assert logits.shape == (4, len(CLASSES))
    assert classifier.num_classes == len(CLASSES) and classifier.text_classifier.shape == (16, len(CLASSES))
    expected = _manual_logits(clip_dir, _clip_normalise(clip_dir, images), CLASSES, TEMPLATES, None)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert classifier.scale == pytest.approx(float(torch.tensor(2.0).exp()))

    fixed = CLIPZeroShotClassifier(str(clip_dir), CLASSES, TEMPLATES, logit_scale=100.0)
    torch.testing.assert_close(fixed(images), expected * 100.0 / classifier.scale, atol=1e-4, rtol=1e-5)

    # Prompts encoded one at a time (no padding) give the same classifier as one padded batch.
    one_by_one = CLIPZeroShotClassifier(str(clip_dir), CLASSES, TEMPLATES, text_batch_size=1)
    torch.testing.assert_close(one_by_one.text_classifier, classifier.text_classifier, atol=1e-5, rtol=1e-5)

    # Each template changes the class embeddings: the ensemble is not the first template alone.
    single = CLIPZeroShotClassifier(str(clip_dir), CLASSES, TEMPLATES[:1])
    assert not torch.allclose(single.text_classifier, classifier.text_classifier, atol=1e-3)
    torch.testing.assert_close(single.text_classifier.norm(dim=0), torch.ones(len(CLASSES)))


def test_grey_8x8_input_is_denormalised_replicated_and_resized_like_the_clip_processor(clip_dir: Path) -> None:
    mean, std = 0.3, 0.4
    classifier = CLIPZeroShotClassifier(str(clip_dir), CLASSES, input_mean=mean, input_std=std)
    torch.manual_seed(2)
    grey = torch.randint(0, 256, (2, 1, 8, 8)).float() / 255  # 8-bit values: what the processor sees exactly
    normalised = (grey - mean) / std  # what a data module serves
    pixels = classifier.preprocess(normalised)
    assert pixels.shape == (2, 3, 32, 32)

    processor = transformers.CLIPImageProcessor.from_pretrained(str(clip_dir))
    as_uint8 = [np.repeat((g[0].numpy() * 255).round().astype(np.uint8)[..., None], 3, axis=-1) for g in grey]
    reference = processor(images=as_uint8, return_tensors="pt")["pixel_values"]
    assert reference.shape == pixels.shape
    # The processor resizes 8-bit images with PIL (rounded and clipped to 8 bits between its two passes):
    # close on average, a few grey levels apart at most.
    assert (pixels - reference).abs().mean() < 0.01 and (pixels - reference).abs().max() < 0.2
    # The same bicubic resize in float (PIL on 32-bit float images) matches exactly once clamped to [0, 1].
    for image, grey_image in zip(pixels, grey):
        resized = Image.fromarray(grey_image[0].numpy(), mode="F").resize((32, 32), Image.BICUBIC)
        expected = torch.from_numpy(np.array(resized)).clamp(0, 1)
        mean3 = torch.tensor(processor.image_mean).view(3, 1, 1)
        std3 = torch.tensor(processor.image_std).view(3, 1, 1)
        torch.testing.assert_close(image, (expected.expand(3, -1, -1) - mean3) / std3, atol=1e-5, rtol=1e-5)
    # and the logits of the 1x8x8 input are those of the processed image.
    torch.testing.assert_close(
        classifier(normalised), _manual_logits(clip_dir, pixels, CLASSES, TEMPLATES[:1], None), atol=1e-5, rtol=1e-5
    )


def test_frozen_pretrained_and_gradients_reach_only_the_input(clip_dir: Path) -> None:
    classifier = CLIPZeroShotClassifier(str(clip_dir), CLASSES)
    assert CLIPZeroShotClassifier.is_pretrained is True and classifier.is_pretrained
    assert not classifier.training
    params = list(classifier.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not classifier.text_classifier.requires_grad
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    classifier(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in params)
    # Only the image tower is kept: the text tower's weights are not in the module.
    assert not any("text_model" in key for key in classifier.state_dict())


def test_missing_checkpoint_names_field_path_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "clip-vit-base-patch32"
    with pytest.raises(KDConfigError) as info:
        CLIPZeroShotClassifier(str(missing), CLASSES)
    message = str(info.value)
    assert "\n" not in message
    assert info.value.field == "checkpoint" and message.startswith("checkpoint: ")
    assert f"{missing} does not exist" in message
    assert f"huggingface-cli download openai/clip-vit-base-patch32 --local-dir {missing}" in message


def test_a_folder_that_is_not_clip_is_refused(tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(str(bert))
    with pytest.raises(KDConfigError, match=r"^checkpoint: .*'bert' model, not a CLIP model") as info:
        CLIPZeroShotClassifier(str(bert), CLASSES)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KDConfigError, match=r"^checkpoint: .*holds no transformers model config"):
        CLIPZeroShotClassifier(str(empty), CLASSES)


def test_without_transformers_the_error_names_the_extra(
    tmp_path: Path, clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(KDConfigError, match=r'pip install "kd-lightning\[transformers\]"'):
        CLIPZeroShotClassifier(str(clip_dir), CLASSES)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt_templates": ["a photo"]}, "prompt_templates"),
        ({"prompt_templates": []}, "prompt_templates"),
        ({"class_names": []}, "class_names"),
        ({"logit_scale": 0.0}, "logit_scale"),
        ({"input_mean": [0.1, 0.2]}, "input_mean"),
        ({"input_std": -1.0}, "input_std"),
        ({"model_name": "ViT-B-32"}, "model_name"),
        ({"backend": "open_clip"}, "model_name"),
        ({"image_mean": [0.5]}, "image_mean"),
        ({"text_device": "gpu0"}, "text_device"),
        ({"text_batch_size": 0}, "text_batch_size"),
    ],
)
def test_bad_arguments_name_their_field(clip_dir: Path, kwargs: dict, field: str) -> None:
    arguments = {"checkpoint": str(clip_dir), "class_names": CLASSES, **kwargs}
    with pytest.raises(KDConfigError) as info:
        CLIPZeroShotClassifier(**arguments)
    assert info.value.field == field


def test_wrong_channel_count_is_refused(clip_dir: Path) -> None:
    classifier = CLIPZeroShotClassifier(str(clip_dir), CLASSES, input_mean=[0.1, 0.2, 0.3], input_std=0.5)
    assert classifier(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    with pytest.raises(KDConfigError, match="input_mean"):
        classifier(torch.randn(1, 1, 8, 8))


def test_open_clip_backend(tmp_path: Path) -> None:
    """A tiny open_clip architecture registered from a config file; weights saved as safetensors."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    name = "kd-test-tiny-clip"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / f"{name}.json"))
    torch.manual_seed(3)
    model = open_clip.create_model(name).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    classifier = CLIPZeroShotClassifier(str(weights), CLASSES, TEMPLATES, backend="open_clip", model_name=name)
    images = torch.rand(2, 3, 32, 32)
    cfg = open_clip.get_model_preprocess_cfg(model)
    pixels = (images - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = [model.encode_text(tokenizer([t.format(c) for t in TEMPLATES]), normalize=True).mean(0) for c in CLASSES]
        weights_per_class = F.normalize(torch.stack(text), dim=-1)
        expected = model.logit_scale.exp() * model.encode_image(pixels, normalize=True) @ weights_per_class.t()
    torch.testing.assert_close(classifier(images), expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(KDConfigError, match=r"^checkpoint: .*does not exist"):
        CLIPZeroShotClassifier(str(tmp_path / "absent.safetensors"), CLASSES, backend="open_clip", model_name=name)
    (tmp_path / "text.bin").write_text("not a checkpoint")
    with pytest.raises(KDConfigError, match=r"^checkpoint: .*not a safely loadable open_clip"):
        CLIPZeroShotClassifier(str(tmp_path / "text.bin"), CLASSES, backend="open_clip", model_name=name)


# ------------------------------------------------------------------------------------------------ the CLI
def test_kd_fit_with_a_clip_teacher_trains_no_teacher(
    clip_dir: Path, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kd_lightning.data import DigitsDataModule
    from tests.helpers.cli import fit_config

    digits = DigitsDataModule()
    digits.setup("fit")
    teacher = {
        "class_path": "CLIPZeroShotClassifier",
        "init_args": {
            "checkpoint": str(clip_dir),
            "class_names": DIGIT_NAMES,
            "input_mean": digits.mean,
            "input_std": digits.std,
        },
    }
    cache = in_tmp / "teachers"
    override = f"--model.init_args.teacher={json.dumps(teacher)}"
    cli = fit_config("digits_semi_kd.yaml", override, f"--teacher_training.cache_dir={cache}")
    out = capsys.readouterr().out
    assert cli.trainer.state.finished
    assert "trained and cached teacher" not in out and "reused cached teacher" not in out
    assert not cache.exists() or not any(cache.iterdir())
    assert isinstance(cli.model.teacher, CLIPZeroShotClassifier) and not cli.model.teacher.training
    assert cli.model.teacher_ckpt is None
    fresh = CLIPZeroShotClassifier(str(clip_dir), DIGIT_NAMES, input_mean=digits.mean, input_std=digits.std)
    for key, value in fresh.state_dict().items():  # the teacher was not changed by the run
        assert torch.equal(value, cli.model.teacher.state_dict()[key]), key
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_clip_example_config_without_its_folder_is_one_line_error(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kd_lightning.commands import main
    from tests.helpers.cli import CONFIGS_DIR, TINY_DIGITS

    assert not (in_tmp / "checkpoints").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS_DIR / "digits_semi_kd_clip.yaml"), *TINY_DIGITS])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kd: error:")]
    assert len(errors) == 1, lines
    assert errors[0].startswith("kd: error: checkpoint: ")
    assert str(in_tmp / "checkpoints" / "clip-vit-base-patch32") in errors[0]
    assert "huggingface-cli download openai/clip-vit-base-patch32" in errors[0]
