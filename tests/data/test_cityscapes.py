"""CityscapesDataModule on tiny fake trees in the real layout (leftImg8bit + gtFine/gtCoarse labelIds PNGs)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import CityscapesDataModule
from kd_lightning.data.cityscapes import (
    CITYSCAPES_CLASSES,
    LABEL_TABLE,
    SegmentationTrainTransform,
    labelids_to_trainids,
    segmentation_collate,
)
from kd_lightning.data.coco import RandomScale
from kd_lightning.errors import DataFileError, DatasetNotFoundError, KDConfigError
from tests.helpers.dense_files import FakeCityscapes, write_cityscapes_pair, write_fake_cityscapes

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeCityscapes:
    return write_fake_cityscapes(tmp_path_factory.mktemp("cityscapes"), size=(32, 64))


def _lut(label: np.ndarray) -> torch.Tensor:
    table = {r.id % 256: (r.train_id if r.train_id >= 0 else 255) for r in LABEL_TABLE}
    return torch.tensor([[table[int(v)] for v in row] for row in label], dtype=torch.long)


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_official_label_table_on_a_hand_made_label_image() -> None:
    assert CITYSCAPES_CLASSES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    )  # fmt: skip
    assert len(LABEL_TABLE) == 35 and [r.id for r in LABEL_TABLE[:34]] == list(range(34))
    label = np.array([[7, 8, 26], [0, 255, 33], [9, 24, 31]], dtype=np.uint8)  # 255: the license plate's -1
    expected = [[0, 1, 13], [255, 255, 18], [255, 11, 16]]
    assert labelids_to_trainids(label).tolist() == expected
    assert labelids_to_trainids(label).dtype == torch.uint8


def test_label_values_outside_the_table_name_the_file_and_values() -> None:
    with pytest.raises(DataFileError, match=r"x_gtFine_labelIds\.png holds values \[34, 200\]") as err:
        labelids_to_trainids(np.array([[7, 34], [200, 34]], dtype=np.uint8), "x_gtFine_labelIds.png")
    _one_line(err)
    with pytest.raises(DataFileError, match=r"holds values \[7007\]"):  # an instanceIds image by mistake
        labelids_to_trainids(np.array([[7, 7007]], dtype=np.int32), "y.png")


def test_reads_the_real_layout(fake: FakeCityscapes) -> None:
    dm = CityscapesDataModule(
        root=str(fake.root), crop_size=(32, 64), scale_range=None, hflip_prob=0.0, num_workers=0, batch_size=2
    )
    assert (dm.num_classes, dm.ignore_index, dm.task, dm.input_shape) == (19, 255, "segmentation", (3, 32, 64))
    assert dm.class_names == list(CITYSCAPES_CLASSES)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    assert dm.train_set.pairs == fake.pairs["train"]
    assert len(pickle.loads(pickle.dumps(dm.train_set))) == 3  # picklable for spawned DataLoader workers
    from PIL import Image

    image, mask = dm.train_set[0]
    raw = torch.from_numpy(np.array(Image.open(fake.pairs["train"][0][0]))).permute(2, 0, 1).float() / 255
    assert image.dtype == torch.float32 and image.shape == (3, 32, 64)
    assert torch.allclose(image, (raw - MEAN) / STD, atol=1e-5)  # crop = whole image: only normalised
    assert mask.dtype == torch.int64 and torch.equal(mask, _lut(fake.label_ids["train"][0]))
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 64) and masks.shape == (2, 32, 64) and masks.dtype == torch.int64
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 64)  # whole images
    dm.setup("test")
    assert dm.test_set is dm.val_set  # test labels are withheld: test_split defaults to val


def test_eval_scale_downscales_images_and_labels_nearest(fake: FakeCityscapes) -> None:
    dm = CityscapesDataModule(root=str(fake.root), eval_scale=0.5, num_workers=0)
    dm.setup("validate")
    image, mask = dm.val_set[0]
    assert image.shape == (3, 16, 32) and mask.shape == (16, 32)
    assert torch.equal(mask, _lut(fake.label_ids["val"][0])[::2, ::2])


def test_cirkd_scales_are_the_0_1_grid() -> None:
    torch.manual_seed(0)
    draws = {round(RandomScale((0.5, 2.0), 0.1).draw(), 6) for _ in range(400)}
    assert draws == {round(0.5 + k / 10, 6) for k in range(16)}
    continuous = [RandomScale((0.5, 2.0), None).draw() for _ in range(50)]
    assert min(continuous) >= 0.5 and max(continuous) <= 2.0 and len(set(continuous)) == 50


def test_augmentation_keeps_image_and_label_aligned() -> None:
    """The label is a function of the colour; after scale + pad + crop + flip it still is."""
    palette = {(200, 30, 30): 7, (30, 200, 30): 8, (30, 30, 200): 26, (230, 230, 40): 11}
    colours = torch.tensor(list(palette), dtype=torch.float32)
    train_ids = torch.tensor([0, 1, 13, 2])
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4, size=(4, 6))
    index = np.kron(blocks, np.ones((16, 16), dtype=np.int64))  # 64 x 96
    image = torch.from_numpy(colours.numpy()[index].astype(np.uint8)).permute(2, 0, 1).contiguous()
    label = labelids_to_trainids(np.array(list(palette.values()), dtype=np.uint8)[index]).unsqueeze(0)
    transform = SegmentationTrainTransform(crop_size=(48, 80), scale_range=(0.5, 2.0), scale_step=0.1)
    torch.manual_seed(0)
    padded = 0
    for _ in range(16):
        x, y = transform(image, label)
        assert x.shape == (3, 48, 80) and y.shape == (48, 80) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 1, 2, 13, 255}
        rgb = (x * STD + MEAN) * 255
        nearest = torch.cdist(rgb.permute(1, 2, 0).reshape(-1, 3), colours).argmin(1).view(48, 80)
        valid = y != 255
        agree = (train_ids[nearest] == y)[valid].float().mean()
        assert agree > 0.97  # only bilinear edge pixels may blend two colours
        if not valid.all():  # padding: image exactly 0 after normalisation (the mean colour)
            padded += 1
            assert torch.all(x[:, ~valid] == 0)
    assert padded > 0


def test_flip_and_crop_move_image_and_label_together() -> None:
    image = torch.arange(3 * 6 * 10, dtype=torch.uint8).view(3, 6, 10)
    label = (torch.arange(60).view(1, 6, 10) % 34).to(torch.uint8)
    flip = SegmentationTrainTransform(
        crop_size=(6, 10), scale_range=None, hflip_prob=1.0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    x, y = flip(image, label)
    assert torch.allclose(x, image.flip(-1).float() / 255) and torch.equal(y, label[0].flip(-1).long())
    pad = SegmentationTrainTransform(crop_size=(8, 12), scale_range=None, hflip_prob=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = pad(image, label)
    assert torch.equal(y[:6, :10], label[0].long()) and (y[6:] == 255).all() and (y[:, 10:] == 255).all()
    assert (x[:, 6:] == 0).all() and torch.allclose(x[:, :6, :10], image.float() / 255)


def test_missing_folders_and_label_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        CityscapesDataModule(root=str(tmp_path)).setup("fit")
    text = _one_line(err)
    assert str(tmp_path / "gtFine" / "train") in text and str(tmp_path / "leftImg8bit" / "train") in text
    assert "https://www.cityscapes-dataset.com" in text and "gtFine_trainvaltest.zip" in text
    assert "leftImg8bit_trainvaltest.zip" in text and "kd make-scenes" in text
    fake = write_fake_cityscapes(tmp_path, counts={"train": 2, "val": 1})
    fake.pairs["train"][1][1].unlink()
    with pytest.raises(DatasetNotFoundError, match="has no label file") as err:
        CityscapesDataModule(root=str(tmp_path)).setup("fit")
    assert str(fake.pairs["train"][1][1]) in _one_line(err)


def test_bad_label_png_in_the_loader(tmp_path: Path) -> None:
    write_cityscapes_pair(tmp_path, "val", "x", 0, np.zeros((8, 8, 3)), np.full((8, 8), 40))
    dm = CityscapesDataModule(root=str(tmp_path), num_workers=0)
    dm.setup("validate")
    with pytest.raises(DataFileError, match=r"x_000000_000000_gtFine_labelIds\.png holds values \[40\]") as err:
        dm.val_set[0]
    _one_line(err)


def test_undecodable_image_names_its_path_or_is_skipped(tmp_path: Path) -> None:
    fake = write_fake_cityscapes(tmp_path, counts={"train": 3, "val": 3}, size=(16, 16))
    for split in ("train", "val"):
        fake.pairs[split][1][0].write_bytes(b"broken")
    dm = CityscapesDataModule(root=str(tmp_path), crop_size=(16, 16), num_workers=0, batch_size=3)
    dm.setup("fit")
    with pytest.raises(DataFileError, match="cannot decode the image") as err:
        dm.train_set[1]
    assert str(fake.pairs["train"][1][0]) in _one_line(err)
    loader = torch.utils.data.DataLoader(dm.val_set, batch_size=3, num_workers=1, collate_fn=segmentation_collate)
    with pytest.raises(DataFileError) as err:  # through a worker: still one line with the path
        next(iter(loader))
    assert str(fake.pairs["val"][1][0]) in _one_line(err)
    skipping = CityscapesDataModule(
        root=str(tmp_path), crop_size=(16, 16), num_workers=0, batch_size=3, skip_bad_images=True
    )
    skipping.setup("fit")
    with pytest.warns(UserWarning, match="skip_bad_images: skipped"):
        images, masks = next(iter(skipping.train_dataloader()))
    assert images.shape == (3, 3, 16, 16)  # the next image stood in
    with pytest.warns(UserWarning, match="skip_bad_images: skipped"):
        images, masks = next(iter(skipping.val_dataloader()))
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16)  # left out of the batch
    images, masks = segmentation_collate([None])
    assert images.shape == (0, 3, 0, 0) and masks.dtype == torch.int64


def test_coarse_mode_and_train_extra(tmp_path: Path) -> None:
    write_fake_cityscapes(tmp_path, counts={"train": 2, "val": 1, "train_extra": 3}, size=(16, 16), mode="coarse")
    dm = CityscapesDataModule(root=str(tmp_path), mode="coarse", train_extra=True, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 5 and all("gtCoarse_labelIds" in p[1].name for p in dm.train_set.pairs)
    with pytest.raises(DatasetNotFoundError, match="gtFine"):
        CityscapesDataModule(root=str(tmp_path)).setup("fit")
    with pytest.raises(KDConfigError, match=r"^data\.init_args\.train_extra: needs mode 'coarse'"):
        CityscapesDataModule(train_extra=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "medium"}, "mode"),
        ({"crop_size": (0, 5)}, "crop_size"),
        ({"eval_scale": 0}, "eval_scale"),
        ({"scale_range": (2.0, 0.5)}, "scale_range"),
        ({"scale_step": 0}, "scale_step"),
        ({"hflip_prob": -1}, "hflip_prob"),
        ({"download": True}, "download"),
    ],
)
def test_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(KDConfigError, match=rf"^data\.init_args\.{field}: ") as err:
        CityscapesDataModule(**kwargs)
    _one_line(err)


def test_data_identity_counts_label_files(fake: FakeCityscapes) -> None:
    identity = CityscapesDataModule(root=str(fake.root)).data_identity()
    assert identity["train"]["labels"] == 3 and identity["val"]["labels"] == 2 and identity["mode"] == "fine"
    assert identity["train"]["bytes"] == sum(p[1].stat().st_size for p in fake.pairs["train"])
