"""COCO mAP through torchmetrics equals pycocotools' COCOeval run directly; DDP-synced mAP equals one process."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.errors import KDConfigError
from kd_lightning.metrics import MAP_KEYS, detection_map, map_backend, map_predictions, map_targets

# A tiny COCO-style set: 4 images, categories 1, 2, 3; small (< 32²), medium and large (> 96²) objects, one crowd
# region, and one object whose COCO area (its segmentation) is smaller than its box (a medium box, small area).
IMAGES = [{"id": i, "width": 200, "height": 200} for i in range(4)]
# (image, category, x, y, w, h, iscrowd, area or None = w·h)
GTS = [
    (0, 1, 10, 10, 20, 20, 0, None),  # small
    (0, 2, 50, 50, 60, 60, 0, None),  # medium
    (0, 3, 20, 100, 100, 100, 0, None),  # large
    (1, 1, 0, 0, 40, 40, 0, 900.0),  # medium box, small area (the area decides)
    (1, 2, 100, 100, 80, 40, 0, None),
    (1, 1, 120, 10, 60, 60, 1, None),  # crowd
    (2, 3, 30, 30, 120, 110, 0, None),
    (2, 2, 5, 150, 30, 30, 0, None),
    (3, 1, 60, 60, 10, 12, 0, None),
]
# (image, category, x, y, w, h, score)
PREDS = [
    (0, 1, 11, 9, 20, 21, 0.9),
    (0, 2, 52, 48, 60, 64, 0.8),
    (0, 2, 50, 50, 30, 30, 0.85),  # poor localisation: a false positive at IoU 0.5+
    (0, 3, 22, 104, 96, 90, 0.7),
    (0, 1, 150, 150, 20, 20, 0.6),  # false positive
    (1, 1, 1, 2, 38, 39, 0.75),
    (1, 2, 104, 100, 76, 44, 0.5),
    (1, 1, 125, 15, 50, 50, 0.95),  # on the crowd region: ignored, not a false positive
    (1, 3, 10, 10, 50, 50, 0.4),  # false positive class
    (2, 3, 35, 28, 110, 115, 0.65),
    (2, 2, 8, 152, 24, 26, 0.55),
    (2, 2, 100, 20, 30, 30, 0.3),  # false positive
    (3, 1, 61, 59, 10, 13, 0.35),
    (3, 1, 62, 62, 8, 8, 0.2),  # duplicate
]


def _coco_json() -> dict:
    annotations = []
    for k, (image, cat, x, y, w, h, crowd, area) in enumerate(GTS):
        annotations.append(
            {
                "id": k + 1,
                "image_id": image,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": float(w * h) if area is None else area,
                "iscrowd": crowd,
            }
        )
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]
    return {"images": IMAGES, "annotations": annotations, "categories": categories}


def _cocoeval_stats() -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = _coco_json()
        gt.createIndex()
        results = [{"image_id": i, "category_id": c, "bbox": [x, y, w, h], "score": s} for i, c, x, y, w, h, s in PREDS]
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


def _batch_targets(images: list[int]) -> list[dict[str, torch.Tensor]]:
    """Targets in the batch convention (xyxy boxes, labels, iscrowd, area) for the given image ids."""
    out = []
    for image in images:
        rows = [g for g in GTS if g[0] == image]
        out.append(
            {
                "boxes": torch.tensor([[x, y, x + w, y + h] for _, _, x, y, w, h, _, _ in rows], dtype=torch.float32),
                "labels": torch.tensor([c for _, c, *_ in rows], dtype=torch.int64),
                "image_id": torch.tensor(image),
                "iscrowd": torch.tensor([r[6] for r in rows], dtype=torch.int64),
                "area": torch.tensor([float(r[4] * r[5]) if r[7] is None else r[7] for r in rows]),
            }
        )
    return out


def _detections(images: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for image in images:
        rows = [p for p in PREDS if p[0] == image]
        out.append(
            {
                "boxes": torch.tensor([[x, y, x + w, y + h] for _, _, x, y, w, h, _ in rows], dtype=torch.float32),
                "scores": torch.tensor([s for *_, s in rows]),
                "labels": torch.tensor([c for _, c, *_ in rows]),
            }
        )
    return out


def _compute(backend: str, images: list[int], class_metrics: bool = False) -> dict[str, torch.Tensor]:
    metric = detection_map(backend, class_metrics=class_metrics)
    for image in images:  # one update per image: the metric accumulates over the split
        metric.update(map_predictions(_detections([image])), map_targets(_batch_targets([image])))
    return metric.compute()


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_map_equals_cocoeval_on_the_same_json_and_predictions(backend: str) -> None:
    expected = _cocoeval_stats()
    result = _compute(backend, [0, 1, 2, 3])
    got = [float(result[key]) for key in MAP_KEYS]
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0 < expected[0] < 1 and min(expected[3:]) > 0  # every size bucket is populated and imperfect


def test_area_and_iscrowd_are_passed_through() -> None:
    full = _compute("pycocotools", [0, 1, 2, 3])
    for dropped, key in (("area", "map_small"), ("iscrowd", "map")):  # without the real field the result changes
        targets = _batch_targets([0, 1, 2, 3])
        for target in targets:
            del target[dropped]
        metric = detection_map("pycocotools")
        metric.update(map_predictions(_detections([0, 1, 2, 3])), map_targets(targets))
        assert float(metric.compute()[key]) != pytest.approx(float(full[key])), dropped
    converted = map_targets(_batch_targets([1]))[0]
    assert converted["iscrowd"].tolist() == [0, 0, 1] and converted["area"][0] == 900.0
    assert map_targets([{"boxes": torch.tensor([[0.0, 0, 4, 5]]), "labels": torch.tensor([1])}])[0]["area"] == 20.0


def test_per_image_updates_equal_one_update_and_class_metrics() -> None:
    once = detection_map("pycocotools", class_metrics=True)
    once.update(map_predictions(_detections([0, 1, 2, 3])), map_targets(_batch_targets([0, 1, 2, 3])))
    a, b = once.compute(), _compute("pycocotools", [0, 1, 2, 3], class_metrics=True)
    for key in MAP_KEYS:
        assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-9)
    assert a["classes"].tolist() == [1, 2, 3] and a["map_per_class"].shape == (3,)


def test_backend_choice_and_missing_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    assert map_backend("auto") == "faster_coco_eval"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "faster_coco_eval" else real(name)
    )
    assert map_backend("auto") == "pycocotools"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(KDConfigError, match=r"^map_backend: .*not installed. pip install 'kd-lightning\[dense\]'$"):
        detection_map()
    with pytest.raises(KDConfigError, match=r"^map_backend: must be"):
        map_backend("coco")  # type: ignore[arg-type]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = [0, 2] if rank == 0 else [1, 3]  # each rank updates half of the images, one batch each
        metric = detection_map("pycocotools")
        for image in mine:
            metric.update(map_predictions(_detections([image])), map_targets(_batch_targets([image])))
        result = metric.compute()  # torchmetrics gathers both ranks' states
        torch.save({key: float(result[key]) for key in MAP_KEYS}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_ddp_synced_map_equals_one_process_over_all_images(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _compute("pycocotools", [0, 1, 2, 3])
    assert ranks[0] == ranks[1]
    for key in MAP_KEYS:
        assert ranks[0][key] == pytest.approx(float(single[key]), abs=1e-9), key
    half = _compute("pycocotools", [0, 2])  # not synced: a different number (the test can fail)
    assert float(half["map"]) != pytest.approx(ranks[0]["map"])
