"""COCODetectionDataModule on tiny fake COCO sets in the real format (json + PNG/JPEG images)."""

from __future__ import annotations

import ast
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

import kd_lightning.data.coco as coco_module
from kd_lightning.data import COCODetectionDataModule, detection_collate
from kd_lightning.errors import DataFileError, DatasetNotFoundError, KDConfigError
from tests.helpers.dense_files import COCO_CATEGORIES, COCO_SIZE, FakeCOCO, write_fake_coco

H, W = COCO_SIZE


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeCOCO:
    return write_fake_coco(tmp_path_factory.mktemp("coco"))


def _dm(root: Path, stage: str = "fit", **kwargs) -> COCODetectionDataModule:
    dm = COCODetectionDataModule(root=str(root), num_workers=0, **{"hflip_prob": 0.0, **kwargs})
    with pytest.warns(UserWarning, match="dropped 1 annotation"):  # the zero-width box of d.png
        dm.setup(stage)
    return dm


def _item(dataset, fake: FakeCOCO, split: str, name: str):
    position = dataset.image_ids.index(fake.image_ids[split][name])
    return dataset[position]


def test_real_layout_and_category_mapping_with_gaps(fake: FakeCOCO) -> None:
    dm = COCODetectionDataModule(root=str(fake.root))
    assert dm.num_classes == 3  # known before setup (read from the val annotation file)
    assert dm.category_ids == [1, 3, 7] and dm.class_names == ["cat", "dog", "bird"]
    assert dm.task == "detection" and dm.input_shape == (3, H, W)
    dm = _dm(fake.root)
    image, target = _item(dm.train_set, fake, "train2017", "a.png")
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and image.min() >= 0 and image.max() <= 1
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    assert target["boxes"].tolist() == [[5, 10, 25, 25], [30, 5, 40, 35]]  # XYWH -> XYXY
    assert target["labels"].tolist() == [2, 3]  # COCO ids 3 and 7 -> labels 2 and 3
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["area"].tolist() == [300.0, 300.0] and target["iscrowd"].tolist() == [0, 0]
    assert target["image_id"].dtype == torch.int64 and int(target["image_id"]) == fake.image_ids["train2017"]["a.png"]
    assert "masks" not in target
    served = _item(dm.val_set, fake, "val2017", "a.png")[1]["boxes"]  # evaluation: no transform at all
    served += 100  # a model editing its targets in place must not change the dataset
    assert _item(dm.val_set, fake, "val2017", "a.png")[1]["boxes"][0].tolist() == [5, 10, 25, 25]
    assert len(pickle.loads(pickle.dumps(dm.train_set))) == 3  # picklable for spawned DataLoader workers
    # the painted rectangle is where the box says (dog = green)
    assert torch.allclose(image[:, 10:25, 5:25].mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]))


def test_crowd_dropped_in_training_kept_in_evaluation(fake: FakeCOCO) -> None:
    dm = _dm(fake.root)
    _, train = _item(dm.train_set, fake, "train2017", "b.jpg")
    assert train["labels"].tolist() == [1] and train["iscrowd"].tolist() == [0]
    _, val = _item(dm.val_set, fake, "val2017", "b.jpg")
    assert val["labels"].tolist() == [1, 1] and val["iscrowd"].tolist() == [0, 1]
    assert val["boxes"][1].tolist() == [44, 20, 59, 32]
    kept = _dm(fake.root, drop_crowd_train=False)
    assert _item(kept.train_set, fake, "train2017", "b.jpg")[1]["iscrowd"].tolist() == [0, 1]


def test_empty_images_skipped_in_training_kept_in_evaluation(fake: FakeCOCO) -> None:
    dm = _dm(fake.root)
    empty = fake.image_ids["train2017"]["c.png"]
    assert empty not in dm.train_set.image_ids and len(dm.train_set) == 3
    assert len(dm.val_set) == 4 and dm.test_set is None
    dm.setup("test")
    assert dm.test_set is dm.val_set  # test_split None: the val split
    _, target = _item(dm.val_set, fake, "val2017", "c.png")
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["area"].shape == (0,)
    dm = _dm(fake.root, skip_empty_train=False, masks=True)
    _, target = _item(dm.train_set, fake, "train2017", "c.png")
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)


def test_zero_width_box_dropped(fake: FakeCOCO) -> None:
    dm = _dm(fake.root)
    _, target = _item(dm.train_set, fake, "train2017", "d.png")
    assert target["labels"].tolist() == [3] and target["boxes"].tolist() == [[2, 2, 10, 10]]


def test_forced_flip_moves_image_boxes_and_masks_together(fake: FakeCOCO) -> None:
    from pycocotools import mask as mask_utils

    plain = _dm(fake.root, masks=True)
    flipped = _dm(fake.root, masks=True, hflip_prob=1.0)
    image0, target0 = _item(plain.train_set, fake, "train2017", "a.png")
    image1, target1 = _item(flipped.train_set, fake, "train2017", "a.png")
    # box [x1, y1, x2, y2] -> [W - x2, y1, W - x1, y2]
    assert target1["boxes"].tolist() == [[W - 25, 10, W - 5, 25], [W - 40, 5, W - 30, 35]]
    assert target1["labels"].tolist() == target0["labels"].tolist()
    assert target1["masks"].dtype == torch.uint8 and target1["masks"].shape == (2, H, W)
    # the RLE mask of the bird is exactly its rectangle; the polygon mask is pycocotools' rasterisation
    rect = torch.zeros(H, W, dtype=torch.uint8)
    rect[5:35, 30:40] = 1
    assert torch.equal(target0["masks"][1], rect)
    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[5, 10, 25, 10, 25, 25, 5, 25]], H, W)))
    assert torch.equal(target0["masks"][0], torch.from_numpy(polygon))
    assert torch.equal(target1["masks"], target0["masks"].flip(-1))
    assert torch.equal(image1, image0.flip(-1))
    # image and mask agree after the flip: blue exactly under the bird's mask
    blue = (image1[2] > 0.9) & (image1[0] < 0.1) & (image1[1] < 0.1)
    assert torch.equal(blue, target1["masks"][1].bool())


def test_crowd_uncompressed_rle_mask_in_evaluation(fake: FakeCOCO) -> None:
    dm = _dm(fake.root, masks=True)
    _, target = _item(dm.val_set, fake, "val2017", "b.jpg")
    assert target["masks"].shape == (2, H, W) and int(target["masks"][1].sum()) == 15 * 12
    assert target["masks"][1, 20:32, 44:59].all()


def test_resize_scales_boxes_masks_and_area(fake: FakeCOCO) -> None:
    dm = _dm(fake.root, masks=True, min_size=80)
    assert dm.input_shape == (3, 80, 120)
    for dataset, split in ((dm.train_set, "train2017"), (dm.val_set, "val2017")):
        image, target = _item(dataset, fake, split, "a.png")
        assert image.shape == (3, 80, 120) and target["masks"].shape == (2, 80, 120)
        assert target["boxes"].tolist() == [[10, 20, 50, 50], [60, 10, 80, 70]]
        assert target["area"].tolist() == [1200.0, 1200.0]  # x 2^2
        assert int(target["masks"][1].sum()) == 4 * 300
    capped = _dm(fake.root, min_size=80, max_size=90)  # longer side 60 * 2 = 120 capped at 90: factor 1.5
    assert capped.input_shape == (3, 60, 90)
    assert _item(capped.val_set, fake, "val2017", "a.png")[1]["area"].tolist() == [675.0, 675.0]


def test_sanitising_drops_small_boxes_with_their_labels_areas_and_masks(fake: FakeCOCO) -> None:
    dm = _dm(fake.root, masks=True, min_box_size=12)  # the bird (10 px wide) goes, the dog (20 x 15) stays
    _, target = _item(dm.train_set, fake, "train2017", "a.png")
    assert target["boxes"].tolist() == [[5, 10, 25, 25]] and target["labels"].tolist() == [2]
    assert target["area"].tolist() == [300.0] and target["iscrowd"].tolist() == [0]
    assert target["masks"].shape == (1, H, W) and int(target["masks"][0, 10:25, 5:25].sum()) == 300
    _, kept = _item(dm.val_set, fake, "val2017", "a.png")  # evaluation keeps every ground-truth box
    assert kept["labels"].tolist() == [2, 3]


def test_scale_jitter_keeps_boxes_and_masks_on_the_objects(fake: FakeCOCO) -> None:
    dm = _dm(fake.root, masks=True, scale_range=(0.5, 1.5), hflip_prob=0.5)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(6):
        image, target = _item(dm.train_set, fake, "train2017", "a.png")
        h, w = image.shape[-2:]
        sizes.add((h, w))
        factor = h / H
        assert target["area"].tolist() == pytest.approx([300 * (h / H) * (w / W)] * 2)
        assert len(target["masks"]) == len(target["boxes"]) == 2
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
            tight = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
            assert torch.allclose(box, tight, atol=1.0 + factor)  # nearest-resized mask vs exactly scaled box
    assert len(sizes) > 1


def test_collate_and_loaders_with_different_box_counts(fake: FakeCOCO) -> None:
    dm = _dm(fake.root, batch_size=3, eval_batch_size=4)
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 3 and len(targets) == 3
    assert sorted(len(t["labels"]) for t in targets) == [1, 1, 2]
    images, targets = next(iter(dm.val_dataloader()))
    assert [len(t["labels"]) for t in targets] == [2, 2, 0, 1]  # val image order: a, b, c, d
    dm.setup("test")
    assert len(next(iter(dm.test_dataloader()))[0]) == 4
    one = (torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)})
    two = (torch.ones(3, 6, 7), {"boxes": torch.ones(2, 4)})
    images, targets = detection_collate([one, None, two])
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 7)] and targets[1]["boxes"].shape == (2, 4)


def test_data_identity_names_annotation_files_and_sizes(fake: FakeCOCO) -> None:
    identity = COCODetectionDataModule(root=str(fake.root)).data_identity()
    size = fake.files["val2017"].stat().st_size
    assert identity["val"] == {"file": "instances_val2017.json", "size": size} == identity["test"]
    assert identity["train"]["file"] == "instances_train2017.json"


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_annotation_file_and_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        COCODetectionDataModule(root=str(tmp_path)).setup("fit")
    text = _one_line(err)
    assert "instances_train2017.json" in text and "https://cocodataset.org/#download" in text
    assert "annotations_trainval2017.zip" in text and "kd make-scenes" in text
    write_fake_coco(tmp_path, splits=("train2017", "val2017"))
    for path in (tmp_path / "val2017").iterdir():
        path.unlink()
    (tmp_path / "val2017").rmdir()
    with pytest.raises(DatasetNotFoundError) as err:
        COCODetectionDataModule(root=str(tmp_path)).setup("fit")
    assert str(tmp_path / "val2017") in _one_line(err)


def test_download_is_refused_with_where_to_get_it() -> None:
    with pytest.raises(KDConfigError, match=r"^data.init_args.download: .*https://cocodataset.org") as err:
        COCODetectionDataModule(download=True)
    _one_line(err)


def test_bad_arguments() -> None:
    with pytest.raises(KDConfigError, match=r"data\.init_args\.hflip_prob"):
        COCODetectionDataModule(hflip_prob=1.5)
    with pytest.raises(KDConfigError, match=r"data\.init_args\.max_size"):
        COCODetectionDataModule(max_size=100)
    with pytest.raises(KDConfigError, match=r"data\.init_args\.scale_range"):
        COCODetectionDataModule(scale_range=(1.5, 0.5))
    with pytest.raises(KDConfigError, match=r"data\.init_args\.annotation_pattern"):
        COCODetectionDataModule(annotation_pattern="annotations/train.json")


def test_splits_with_different_categories(tmp_path: Path) -> None:
    other = [*COCO_CATEGORIES[:2], {"id": 9, "name": "bird"}]
    write_fake_coco(tmp_path, categories={"val2017": other})
    with pytest.raises(KDConfigError, match="different categories") as err:
        COCODetectionDataModule(root=str(tmp_path)).setup("fit")
    text = _one_line(err)
    assert "instances_train2017.json" in text and "instances_val2017.json" in text and "7: 'bird' vs None" in text


def test_not_json_and_unknown_category(tmp_path: Path) -> None:
    fake = write_fake_coco(tmp_path)
    fake.files["val2017"].write_text('{"images": [')
    with pytest.raises(KDConfigError, match=r"instances_val2017.json is not valid JSON") as err:
        COCODetectionDataModule(root=str(tmp_path)).setup("validate")
    _one_line(err)
    fake = write_fake_coco(tmp_path)
    data = json.loads(fake.files["val2017"].read_text())
    data["annotations"][0]["category_id"] = 5
    fake.files["val2017"].write_text(json.dumps(data))
    with pytest.raises(KDConfigError, match=r"has category_id 5, which is not in its 'categories'"):
        COCODetectionDataModule(root=str(tmp_path)).setup("validate")


def test_undecodable_image_names_its_path_or_is_skipped(tmp_path: Path) -> None:
    fake = write_fake_coco(tmp_path)
    bad = tmp_path / "train2017" / "b.jpg"
    bad.write_bytes(b"this is not a JPEG")
    (tmp_path / "val2017" / "b.jpg").write_bytes(b"nor this")
    dm = _dm(tmp_path)
    with pytest.raises(DataFileError, match=r"cannot decode the image .*b\.jpg") as err:
        _item(dm.train_set, fake, "train2017", "b.jpg")
    assert str(bad) in _one_line(err) and "skip_bad_images" in str(err.value)
    assert isinstance(err.value, KDConfigError)
    # through a worker process the message stays one line and keeps the path
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=4, num_workers=1, collate_fn=detection_collate)
    with pytest.raises(DataFileError) as err:
        next(iter(loader))
    assert _one_line(err).startswith("data.init_args.root: cannot decode the image") and "b.jpg" in str(err.value)

    skipping = _dm(tmp_path, skip_bad_images=True, batch_size=3)
    with pytest.warns(UserWarning, match=r"skip_bad_images: skipped .*b\.jpg"):
        _, target = _item(skipping.train_set, fake, "train2017", "b.jpg")  # the next image stands in
    assert int(target["image_id"]) != fake.image_ids["train2017"]["b.jpg"]
    with pytest.warns(UserWarning, match="skipped"):
        images, targets = next(iter(skipping.val_dataloader()))  # a, b (left out), c
    assert len(images) == 2 and fake.image_ids["val2017"]["b.jpg"] not in [int(t["image_id"]) for t in targets]


def test_missing_pycocotools_names_the_extra(fake: FakeCOCO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(KDConfigError, match=r"kd-lightning\[dense\]"):
        COCODetectionDataModule(root=str(fake.root)).setup("validate")


def test_pycocotools_is_imported_inside_functions_only() -> None:
    tree = ast.parse(Path(coco_module.__file__).read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top_level for a in n.names] + [
        n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)
    ]
    assert not [n for n in names if "coco" in n and "kd_lightning" not in n]
