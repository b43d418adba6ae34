"""Digit scenes: determinism, internal consistency of both formats, and both dense data modules reading them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd_lightning.data import CityscapesDataModule, COCODetectionDataModule, make_scenes
from kd_lightning.data.digit_scenes import BACKGROUND_LABEL_ID, DIGIT_LABEL_IDS, encode_rle
from kd_lightning.errors import KDConfigError

TINY = {"train": 12, "val": 6, "size": 64, "digit_size": (12, 24)}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    make_scenes(out, seed=0, **TINY)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files(scenes: Path, tmp_path: Path) -> None:
    again = make_scenes(tmp_path / "again", seed=0, **TINY)
    first, second = _files(scenes), _files(tmp_path / "again")
    assert first.keys() == second.keys() and len(first) == 4 + 18 + 2 * 18 + 18  # json/md + coco + gt (2 each) + left
    assert first == second
    assert again["splits"]["train"]["images"] == 12 and again["bytes"] > 0 and again["seconds"] > 0
    other = make_scenes(tmp_path / "other", seed=1, **TINY)
    assert (
        _files(tmp_path / "other")["coco/annotations/instances_train.json"]
        != first["coco/annotations/instances_train.json"]
    )
    assert other["seed"] == 1


def test_rle_encoding_matches_pycocotools() -> None:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    masks = [rng.random((13, 17)) < p for p in (0.0, 0.1, 0.5, 0.9, 1.0)]
    masks.append(np.kron(rng.random((5, 4)) < 0.5, np.ones((40, 40), dtype=bool)))  # long runs: multi-char counts
    for mask in masks:
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = encode_rle(mask)
        assert ours["counts"] == expected["counts"].decode("ascii") and ours["size"] == list(mask.shape)
        assert np.array_equal(mask_utils.decode(ours), mask)


def test_coco_and_cityscapes_outputs_agree(scenes: Path) -> None:
    from pycocotools import mask as mask_utils

    ids: set[int] = set()
    for split in ("train", "val"):
        data = json.loads((scenes / "coco" / "annotations" / f"instances_{split}.json").read_text())
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(d + 1, str(d)) for d in range(10)]
        assert not ids & {i["id"] for i in data["images"]}
        ids |= {i["id"] for i in data["images"]}
        labels = sorted((scenes / "cityscapes" / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
        lefts = sorted((scenes / "cityscapes" / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(labels) == len(lefts) == len(data["images"])
        by_frame = {int(p.name.split("_")[2]): p for p in labels}
        for position, image in enumerate(data["images"]):
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            assert 1 <= len(anns) <= 5
            label_path = by_frame[position]
            label = np.asarray(Image.open(label_path))
            instances = np.asarray(Image.open(str(label_path).replace("labelIds", "instanceIds")))
            coco_pixels = np.asarray(Image.open(scenes / "coco" / split / image["file_name"]))
            left = label_path.parent.parent.parent.parent / "leftImg8bit" / split / label_path.parent.name
            left_pixels = np.asarray(Image.open(left / label_path.name.replace("gtFine_labelIds", "leftImg8bit")))
            assert np.array_equal(coco_pixels, left_pixels) and coco_pixels.shape == (64, 64, 3)
            covered = np.zeros((64, 64), dtype=int)
            for ann in anns:
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                tight = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
                assert ann["bbox"] == [int(v) for v in tight] and ann["area"] == int(mask.sum()) > 0
                assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
                assert (label[mask] == DIGIT_LABEL_IDS[ann["category_id"] - 1]).all()
                assert len(np.unique(instances[mask])) == 1
                assert int(np.unique(instances[mask])[0]) // 1000 == DIGIT_LABEL_IDS[ann["category_id"] - 1]
                covered += mask
            assert covered.max() == 1  # visible masks do not overlap
            assert (label[covered == 0] == BACKGROUND_LABEL_ID).all()


def test_both_data_modules_read_the_scenes_unchanged(scenes: Path) -> None:
    coco = COCODetectionDataModule(
        root=str(scenes / "coco"), train_split="train", val_split="val", masks=True, batch_size=4, num_workers=0
    )
    assert coco.num_classes == 10 and coco.class_names == [str(d) for d in range(10)]
    assert coco.category_ids == list(range(1, 11)) and coco.input_shape == (3, 64, 64)
    coco.setup("fit")
    assert len(coco.train_set) == 12 and len(coco.val_set) == 6
    images, targets = next(iter(coco.val_dataloader()))
    assert len(images) == 4 and images[0].shape == (3, 64, 64)
    data = json.loads((scenes / "coco" / "annotations" / "instances_val.json").read_text())
    first = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    x, y, w, h = first[0]["bbox"]
    assert targets[0]["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert targets[0]["labels"].tolist() == [a["category_id"] for a in first]  # digit d = label d + 1
    assert targets[0]["masks"].shape == (len(first), 64, 64)
    assert targets[0]["area"].tolist() == [float(a["area"]) for a in first]

    city = CityscapesDataModule(root=str(scenes / "cityscapes"), crop_size=(48, 48), batch_size=4, num_workers=0)
    city.setup("fit")
    assert len(city.train_set) == 12 and len(city.val_set) == 6
    images, masks = next(iter(city.train_dataloader()))
    assert images.shape == (4, 3, 48, 48) and set(masks.unique().tolist()) <= {*range(11), 255}
    images, masks = next(iter(city.val_dataloader()))
    assert images.shape == (4, 3, 64, 64)
    assert set(masks.unique().tolist()) <= set(range(11))  # background trainId 0, digit d -> d + 1, no ignore
    digits = targets[0]["masks"].bool()
    for mask, label in zip(digits, targets[0]["labels"]):
        assert (masks[0][mask] == label).all()  # the same image: COCO label d + 1 == trainId d + 1
    assert (masks[0][~digits.any(0)] == 0).all()


def test_readme_and_scenes_json_document_the_set(scenes: Path) -> None:
    meta = json.loads((scenes / "scenes.json").read_text())
    assert meta["seed"] == 0 and meta["config"]["size"] == 64
    assert meta["splits"]["train"]["images"] == 12 and meta["splits"]["val"]["images"] == 6
    assert sum(meta["splits"]["val"]["instances_per_digit"]) == meta["splits"]["val"]["instances"]
    assert meta["cityscapes"]["digits"]["3"] == {"labelId": 13, "trainId": 4}
    assert meta["coco"]["categories"]["9"] == 10
    readme = (scenes / "README.md").read_text()
    assert "--data.init_args.root" in readme and "| 9 | 10 | 23 | 10 |" in readme


def test_bad_settings_and_existing_output(scenes: Path, tmp_path: Path) -> None:
    with pytest.raises(KDConfigError, match=r"already exists.*--overwrite"):
        make_scenes(scenes, **TINY)
    for kwargs, field in (
        ({"train": 0}, "train"),
        ({"digit_size": (10, 40), "size": 64}, "digit_size"),
        ({"min_digits": 3, "max_digits": 2}, "min_digits"),
        ({"colour": 1}, "colour"),
    ):
        with pytest.raises(KDConfigError, match=rf"^{field}: "):
            make_scenes(tmp_path / field, **kwargs)
    out = tmp_path / "over"
    make_scenes(out, train=2, val=1, size=32, digit_size=(8, 16))
    (out / "coco" / "train" / "stale.png").write_bytes(b"x")
    make_scenes(out, train=1, val=1, size=32, digit_size=(8, 16), overwrite=True)
    assert not (out / "coco" / "train" / "stale.png").exists()
    assert len(list((out / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))) == 1


@pytest.mark.slow
def test_default_set_is_generated_in_about_a_minute(tmp_path: Path) -> None:
    summary = make_scenes(tmp_path / "default")
    assert summary["splits"]["train"]["images"] == 2400 and summary["splits"]["val"]["images"] == 600
    assert summary["seconds"] < 60
