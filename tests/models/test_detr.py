"""DETRDetector: torchvision's detector interface, Hungarian matching, DN groups, and query groups that never
influence the normal queries."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from kd_lightning.errors import KDConfigError
from kd_lightning.models.detection import detection_losses, detector_family, fpn_levels, head_outputs, num_outputs
from kd_lightning.models.detr import DETRDetector, QueryGroup, gt_query_group, normalised_targets, sine_embedding


def tiny(**kwargs: Any) -> DETRDetector:
    base = {
        "backbone": "tiny",
        "tiny_widths": (8, 16, 32),
        "feature_levels": ["0", "1"],
        "d_model": 32,
        "num_heads": 4,
        "dim_feedforward": 64,
        "num_encoder_layers": 1,
        "num_decoder_layers": 2,
        "num_queries": 6,
        "min_size": 64,
        "max_size": 64,
    }
    return DETRDetector(3, **{**base, **kwargs})


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
    ]


def memory_of(model: DETRDetector, images: list[torch.Tensor]) -> Any:
    image_list, _ = model.transform(images)
    return model.encode(image_list, model.backbone(image_list.tensors))


def test_the_detection_helpers_know_the_detr_family() -> None:
    model = tiny()
    assert detector_family(model) == "detr"
    assert num_outputs(model) == 4  # K + 1, torchvision's convention
    assert fpn_levels(model) == ["0", "1"] and model.fpn_strides == {"0": 8, "1": 16}
    with pytest.raises(KDConfigError, match="a DETR has no dense head"):
        head_outputs(model, {})
    feats = model.backbone(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"0": (2, 32, 8, 8), "1": (2, 32, 4, 4)}


def test_eval_returns_torchvision_detections_on_the_original_images() -> None:
    torch.manual_seed(0)
    model = tiny(detections_per_img=10).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 32, 48)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for detections, (h, w) in zip(out, [(64, 64), (32, 48)]):
        assert detections["boxes"].shape == (10, 4)
        assert bool((detections["labels"] >= 1).all() and (detections["labels"] <= 3).all())
        assert bool((detections["scores"][:-1] >= detections["scores"][1:]).all())
        boxes = detections["boxes"]
        assert float(boxes[:, 0::2].max()) <= w + 1e-3 and float(boxes[:, 1::2].max()) <= h + 1e-3


def test_training_losses_are_finite_and_dn_groups_add_their_own() -> None:
    torch.manual_seed(0)
    plain, dn = tiny(), tiny(dn_groups=2)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = plain(images, targets())
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    with_dn = dn(images, targets())
    assert set(with_dn) == {"loss_class", "loss_bbox", "loss_giou", "loss_dn_class", "loss_dn_bbox", "loss_dn_giou"}
    total = sum(with_dn.values())
    assert math.isfinite(float(total.detach()))
    total.backward()
    assert dn.label_embed.weight.grad is not None and dn.label_embed.weight.grad.abs().sum() > 0
    # images without boxes are fine
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert math.isfinite(float(sum(dn(images, empty).values()).detach()))


def test_detection_losses_dispatches_to_the_detr_losses() -> None:
    torch.manual_seed(0)
    model = tiny()
    image_list, resized = model.transform([torch.rand(3, 64, 64) for _ in range(2)], targets())
    losses, head, anchors = detection_losses(model, image_list, model.backbone(image_list.tensors), resized)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"} and head is None and anchors is None


def test_matching_recovers_a_permutation_and_perfect_boxes_cost_nothing() -> None:
    model = tiny()
    gt = torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.2]])
    target = [{"boxes": gt, "labels": torch.tensor([2, 0])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0.2, 0.3, 0.1, 0.2]]])
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, 1, 0], logits[0, 2, 2] = 5.0, 5.0
    ((rows, cols),) = model.match(logits, boxes, target)
    assert dict(zip(rows.tolist(), cols.tolist())) == {1: 1, 2: 0}
    losses = model._layer_losses(logits, boxes, target, [(rows, cols)], 2.0)
    assert float(losses["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.0, abs=1e-6)


def test_the_self_attention_mask_isolates_groups() -> None:
    model = tiny(num_heads=1)
    mask = model.self_attention_mask(1, [2, 2, 1], [torch.tensor([[True, False]]), torch.tensor([[True]])])
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 1],  # normal queries see only normal queries
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],  # group 1 sees normal + its valid queries
            [0, 0, 0, 0, 1],  # its padded query (output unused) sees them and itself: never an all-blocked row
            [0, 0, 1, 1, 0],  # group 2 sees normal + itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0], expected)
    assert model.self_attention_mask(1, [2], []) is None


@pytest.mark.parametrize(("query_type", "selection"), [("anchor", False), ("point", False), ("anchor", True)])
def test_query_groups_never_change_the_normal_queries(query_type: str, selection: bool) -> None:
    torch.manual_seed(0)
    model = tiny(query_type=query_type, query_selection=selection).eval()
    memory = memory_of(model, [torch.rand(3, 64, 64) for _ in range(2)])
    norm = normalised_targets(targets(), [(64, 64), (64, 64)])
    group = gt_query_group(norm)
    moved = QueryGroup(group.anchors.flip(-1) * 0.5 + 0.2, (group.labels + 1) % 3, group.valid)
    with torch.no_grad():
        alone = model.decode(memory)
        a, b = model.decode(memory, [group]), model.decode(memory, [moved])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)  # bit-identical
    torch.testing.assert_close(a.logits, alone.logits)  # and the same as without any group
    assert not torch.equal(a.groups[0][0], b.groups[0][0])  # the groups themselves did change
    assert a.groups[0][0].shape == (2, 2, 2, 3) and torch.isfinite(a.groups[0][0]).all()  # padded query: no NaN


def test_gt_query_group_pads_jitters_and_flips_as_asked() -> None:
    norm = normalised_targets(targets(), [(64, 64), (64, 64)])
    torch.testing.assert_close(norm[1]["boxes"], torch.tensor([[15.0 / 64, 21.0 / 64, 10.0 / 64, 18.0 / 64]]))
    assert norm[0]["labels"].tolist() == [0, 2]  # labels 1..K -> classes 0..K-1
    group = gt_query_group(norm)
    assert group.valid.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(group.anchors[0], norm[0]["boxes"])
    g = torch.Generator().manual_seed(0)
    jittered = gt_query_group(norm, box_noise=0.4, generator=g)
    shift = (jittered.anchors[0, :, :2] - norm[0]["boxes"][:, :2]).abs()
    assert bool((shift <= norm[0]["boxes"][:, 2:] / 2 * 0.4 + 1e-6).all()) and shift.sum() > 0
    assert torch.equal(jittered.labels, group.labels)  # no label noise unless asked
    flipped = gt_query_group(norm, label_noise=1.0, num_classes=3, generator=torch.Generator().manual_seed(1))
    assert flipped.labels.shape == group.labels.shape and int(flipped.labels.max()) < 3


def test_sine_embedding_hand_values() -> None:
    emb = sine_embedding(torch.tensor([[0.0, 0.25]]), 4)
    # coordinate 0 -> [sin 0, cos 0, sin 0, cos 0]; 0.25 -> [sin(pi/2), cos(pi/2), sin(pi/200), cos(pi/200)]
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, math.sin(math.pi / 200), math.cos(math.pi / 200)]])
    torch.testing.assert_close(emb, expected, atol=1e-6, rtol=0)


def test_padding_tokens_are_masked_and_references_are_relative_to_the_image() -> None:
    model = tiny().eval()
    with torch.no_grad():
        memory = memory_of(model, [torch.rand(3, 64, 64), torch.rand(3, 32, 64)])
    assert memory.level_shapes == [(8, 8), (4, 4)] and memory.tokens.shape == (2, 80, 32)
    assert not memory.padding[0].any()
    # image 2 was resized to 32x64 (h x w) and padded to 64x64: the bottom half of the rows is padding
    level0 = memory.padding[1, :64].reshape(8, 8)
    assert not level0[:4].any() and level0[4:].all()
    torch.testing.assert_close(memory.reference[1, 0], torch.tensor([4.0 / 64, 4.0 / 32]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_levels": ["3"]}, r"^feature_levels: must be distinct levels"),
        ({"d_model": 30}, r"^d_model: 30 must be a multiple of num_heads"),
        ({"query_type": "box"}, r"^query_type: must be 'anchor' or 'point'"),
        ({"backbone": "vgg"}, r"^backbone: unknown backbone 'vgg'"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(KDConfigError, match=match) as err:
        tiny(**kwargs)
    assert "\n" not in str(err.value)


def test_state_dict_round_trips() -> None:
    torch.manual_seed(0)
    a, b = tiny().eval(), tiny().eval()
    b.load_state_dict(a.state_dict())
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        out_a, out_b = a(images), b(images)
    assert torch.equal(out_a[0]["boxes"], out_b[0]["boxes"])


def test_query_selection_takes_the_anchors_of_the_best_encoder_proposals() -> None:
    torch.manual_seed(0)
    model = tiny(query_selection=True, num_queries=4).eval()
    with torch.no_grad():
        memory = memory_of(model, [torch.rand(3, 64, 64), torch.rand(3, 32, 64)])
        anchors = model.normal_anchors(memory).sigmoid()
    logits, boxes = memory.proposal_logits, memory.proposal_boxes
    assert logits.shape == (2, 80, 3) and boxes.shape == (2, 80, 4)
    assert bool(torch.isinf(logits[memory.padding]).all()) and bool(torch.isfinite(logits[~memory.padding]).all())
    for i in range(2):
        best = logits[i].max(-1).values.topk(4).indices
        torch.testing.assert_close(anchors[i], boxes[i, best], atol=1e-5, rtol=1e-4)
        assert not memory.padding[i, best].any()  # never a padding token
    # before any training the proposals are the token's cell with a level-sized box
    torch.testing.assert_close(boxes[0, 0], torch.tensor([4 / 64, 4 / 64, 0.05, 0.05]), atol=1e-5, rtol=0)
    model.train()
    losses = model([torch.rand(3, 64, 64)] * 2, targets())
    assert {"loss_enc_class", "loss_enc_bbox", "loss_enc_giou"} <= set(losses)
    sum(losses.values()).backward()
    assert model.proposal_class.weight.grad is not None
