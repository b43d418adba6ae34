"""MeanIoU: confusion-matrix mIoU with ignore pixels, nan-mean over present classes, synced across ranks."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassJaccardIndex

from kd_lightning.errors import KDConfigError
from kd_lightning.metrics.segmentation import MeanIoU, iou_from_confusion

TARGET = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
PREDS = torch.tensor([[[0, 1, 1], [2, 2, 0]]])


def test_hand_computed_confusion_iou_and_pixel_accuracy() -> None:
    metric = MeanIoU(3)
    metric.update(PREDS, TARGET)
    # rows = target, columns = prediction; the ignored pixel (predicted 2) is not counted
    assert metric.confusion.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    scores = metric.compute_per_class()
    torch.testing.assert_close(scores["iou"], torch.tensor([1 / 3, 1 / 3, 1.0]))  # TP / (TP + FP + FN)
    assert float(scores["miou"]) == pytest.approx(5 / 9)
    assert float(scores["pixel_acc"]) == pytest.approx(3 / 5)
    assert float(metric.compute()) == pytest.approx(5 / 9)


def test_logits_are_arg_maxed() -> None:
    logits = torch.nn.functional.one_hot(PREDS, 3).permute(0, 3, 1, 2).float() * 2.0 - 0.5
    a, b = MeanIoU(3), MeanIoU(3)
    a.update(logits, TARGET)
    b.update(PREDS, TARGET)
    assert torch.equal(a.confusion, b.confusion)


def test_absent_classes_are_nan_and_left_out_of_the_mean() -> None:
    metric = MeanIoU(5)
    metric.update(PREDS, TARGET)  # classes 3 and 4 in neither labels nor predictions
    scores = metric.compute_per_class()
    assert math.isnan(scores["iou"][3]) and math.isnan(scores["iou"][4])
    assert float(scores["miou"]) == pytest.approx(5 / 9)
    # a class that is only predicted has a union: IoU 0, counted
    only_predicted = MeanIoU(5)
    only_predicted.update(torch.tensor([[[4, 0]]]), torch.tensor([[[0, 0]]]))
    iou = only_predicted.compute_per_class()["iou"]
    assert float(iou[4]) == 0.0 and float(iou[0]) == 0.5
    assert float(only_predicted.compute()) == pytest.approx(0.25)
    assert math.isnan(float(iou_from_confusion(torch.zeros(3, 3, dtype=torch.long))["miou"]))


def test_ignore_pixels_are_never_counted_whatever_is_predicted() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[:, :4] = 255
    preds = torch.randint(0, 4, (2, 16, 16), generator=g)
    a, b = MeanIoU(4), MeanIoU(4)
    a.update(preds, target)
    other = preds.clone()
    other[:, :4] = (other[:, :4] + 1) % 4
    b.update(other, target)
    assert torch.equal(a.confusion, b.confusion)
    assert int(a.confusion.sum()) == int((target != 255).sum())


def test_equals_torchmetrics_jaccard_on_present_classes() -> None:
    g = torch.Generator().manual_seed(1)
    metric = MeanIoU(6)
    reference = MulticlassJaccardIndex(6, average=None, ignore_index=255)
    for _ in range(3):
        target = torch.randint(0, 5, (2, 12, 12), generator=g)  # class 5 never labelled...
        target[torch.rand(target.shape, generator=g) < 0.1] = 255
        preds = torch.where(
            torch.rand(target.shape, generator=g) < 0.6,
            target.clamp(max=4),
            torch.randint(0, 5, target.shape, generator=g),
        )
        metric.update(preds, target)  # ...nor predicted: absent
        reference.update(preds, target)
    ours, theirs = metric.compute_per_class()["iou"], reference.compute()
    present = ~torch.isnan(ours)
    assert present.tolist() == [True] * 5 + [False]
    torch.testing.assert_close(ours[present], theirs[present])
    assert float(metric.compute()) == pytest.approx(float(theirs[:5].mean()))


def test_out_of_range_labels_and_shape_mismatches_are_one_line_errors() -> None:
    with pytest.raises(KDConfigError, match=r"^target: holds class ids in \[0, 7\] but there are 3 classes"):
        MeanIoU(3).update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(KDConfigError, match=r"^preds: shape \(1, 4, 4\) differs from the target's \(1, 2, 2\)"):
        MeanIoU(3).update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(KDConfigError, match=r"^preds: has 4 score channels but the metric has 3 classes"):
        MeanIoU(3).update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- DDP (gloo, 2 ranks)
def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 4, (8, 10, 10), generator=g)  # class 4 of 5 never appears
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    preds = torch.where(
        torch.rand(target.shape, generator=g) < 0.7, target.clamp(max=3), torch.randint(0, 4, target.shape, generator=g)
    )
    return preds, target


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        preds, target = _ddp_data()
        metric = MeanIoU(5)
        for i in range(rank * 4, rank * 4 + 4, 2):  # each rank updates its half, two images at a time
            metric.update(preds[i : i + 2], target[i : i + 2])
        local = metric.confusion.clone()
        scores = metric.compute_per_class()
        miou = metric.compute()
        torch.save(
            {"local": local, "after": metric.confusion.clone(), "scores": scores, "miou": miou},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_ddp_each_rank_updates_half_and_the_synced_result_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    preds, target = _ddp_data()
    single = MeanIoU(5)
    single.update(preds, target)
    expected = single.compute_per_class()
    assert not torch.equal(ranks[0]["local"], ranks[1]["local"])  # the halves differ
    assert torch.equal(ranks[0]["local"] + ranks[1]["local"], single.confusion)
    for rank in ranks:
        torch.testing.assert_close(rank["scores"]["iou"], expected["iou"], equal_nan=True)
        torch.testing.assert_close(rank["scores"]["pixel_acc"], expected["pixel_acc"])
        torch.testing.assert_close(rank["miou"], single.compute())
        assert torch.equal(rank["after"], rank["local"])  # computing does not overwrite the rank's own counts
    assert math.isnan(float(expected["iou"][4]))
