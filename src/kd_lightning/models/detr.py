"""A compact DETR-family detector (pure torch): DAB-DETR-style anchor queries or Conditional-DETR-style point
queries, single- or multi-scale memory, Hungarian matching, optional denoising (DN) query groups.

Why our own and not ``transformers``' ``DetrForObjectDetection`` / ``DeformableDetrForObjectDetection`` /
``DabDetrForObjectDetection``: CLoCKDistill (and DN training) feed *extra query groups* to the decoder that the
normal queries must not see (a per-image self-attention mask, as DN-DETR does); those classes expose no decoder
self-attention mask, no way to append queries with their own anchors, and no access to the encoder memory's
reference points. This module keeps every piece the methods need one attribute away, in ~600 lines, and trains on
a CPU in minutes on 96x96 digit scenes.

Architecture (``d = d_model``):

- ``backbone``: a ResNet-18/34/50/101 or the ``tiny`` CPU body; the stages of ``feature_levels`` (``'0','1','2'``
  = C3, C4, C5, strides 8, 16, 32) each pass a 1x1 conv + GroupNorm to ``d`` channels (Deformable DETR's input
  projection). ``backbone(x)`` returns ``{level: [N, d, h_l, w_l]}`` like an FPN, so feature-imitation methods and
  the detection task's probe treat it like one.
- encoder: ``num_encoder_layers`` post-norm layers of self-attention over all levels' tokens (concatenated level by
  level, row-major) with sine position embeddings of each token's reference point (its cell centre in [0, 1]
  relative to the image's un-padded size) plus a learned level embedding; padding tokens are masked. Plain
  attention, not deformable: the maps are small at the sizes this targets.
- decoder: ``num_decoder_layers`` post-norm layers; ``num_queries`` learned content queries with learned anchors:
  ``query_type="anchor"`` (DAB-DETR): 4-D boxes ``(cx, cy, w, h)``, query position = MLP(sine(anchor)), each layer
  refines the box (``sigmoid(Δ + logit(anchor))``, detached between layers); ``query_type="point"``
  (Conditional DETR): 2-D reference points, fixed over layers, the box head predicts ``(cx, cy)`` relative to the
  point and ``(w, h)`` directly.
- heads: a shared linear sigmoid classifier over K classes (focal loss) and per-layer 3-layer box MLPs; a
  decoder-output LayerNorm before the heads; auxiliary losses at every layer.
- training: Hungarian matching (``scipy.optimize.linear_sum_assignment``) with Deformable DETR's costs (focal class
  2, L1 5, GIoU 2) and losses (focal 2, L1 5, GIoU 2), normalised by the number of boxes (averaged over DDP ranks);
  ``dn_groups`` DN-DETR denoising groups (GT boxes jittered by ``dn_box_noise``, labels flipped with
  ``dn_label_noise``, content = label embedding) reconstruct their GT without matching.
- inference: top ``detections_per_img`` (query, class) pairs by sigmoid score, boxes mapped back to the original
  image (torchvision's ``GeneralizedRCNNTransform`` resizes, normalises and pads, as for the other detectors).

Conventions shared with :mod:`kd_lightning.models.detection`: ``num_classes`` = K foreground categories, targets
with labels 1..K (the head's class ``k`` is label ``k + 1``), detections as torchvision's
``[{boxes, scores, labels}]``; :func:`~kd_lightning.models.detection.detector_family` is ``"detr"``.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss
from torchvision.ops import misc as misc_nn_ops

from kd_lightning.errors import KDConfigError

__all__ = [
    "DETR_BACKBONES",
    "DETRDetector",
    "DecoderOutput",
    "EncoderMemory",
    "QueryGroup",
    "gt_query_group",
    "inverse_sigmoid",
    "normalised_targets",
    "sine_embedding",
]

DETR_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")
QueryType = Literal["anchor", "point"]
#: Stride of the backbone stage behind each level name (C3, C4, C5).
LEVEL_STRIDES = {"0": 8, "1": 16, "2": 32}


# ---------------------------------------------------------------------------------------------------- small pieces
def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]``."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_embedding(coords: Tensor, dim_per_coord: int, temperature: float = 10000.0) -> Tensor:
    """DETR's sine embedding of coordinates in [0, 1]: ``[..., k]`` → ``[..., k·dim_per_coord]``.

    Each coordinate ``u`` becomes ``[sin(2πu/t^(2i/D)), cos(2πu/t^(2i/D))]`` interleaved over ``i < D/2``
    (``D = dim_per_coord``), coordinates concatenated in order (DAB-DETR's ``gen_sineembed_for_position``).
    """
    if dim_per_coord % 2:
        raise KDConfigError("d_model", f"sine embeddings need an even size per coordinate, got {dim_per_coord}")
    i = torch.arange(dim_per_coord // 2, device=coords.device, dtype=torch.float32)
    freq = temperature ** (2 * i / dim_per_coord)
    angles = coords.float().unsqueeze(-1) * (2 * math.pi) / freq  # [..., k, D/2]
    emb = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [..., k, D]
    return emb.flatten(-2)


class MLP(nn.Module):
    """``layers`` linear layers with ReLU between them."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class EncoderMemory:
    """The encoder output and what locates each token.

    Attributes:
        tokens: ``[B, N, d]`` memory (levels concatenated in ``levels`` order, each row-major).
        pos: ``[B, N, d]`` position + level embeddings of the tokens.
        padding: ``[B, N]`` ``True`` where a token lies in the padding outside the image.
        reference: ``[B, N, 2]`` token centres ``(x, y)`` in [0, 1] of the un-padded image.
        level_shapes: ``[(h_l, w_l)]`` per level; ``levels`` their names.
        proposal_logits, proposal_boxes: with ``query_selection``, the encoder's per-token class logits
            ``[B, N, K]`` (padding at ``-inf``) and boxes ``[B, N, 4]`` (DINO's encoder proposals).
    """

    tokens: Tensor
    pos: Tensor
    padding: Tensor
    reference: Tensor
    level_shapes: list[tuple[int, int]]
    levels: list[str]
    proposal_logits: Tensor | None = None
    proposal_boxes: Tensor | None = None


@dataclass
class QueryGroup:
    """Extra decoder queries built from boxes (DN groups, CLoCKDistill's GT queries).

    Attributes:
        anchors: ``[B, G, 4]`` boxes ``(cx, cy, w, h)`` in [0, 1] (a point query uses ``(cx, cy)``).
        labels: ``[B, G]`` class indices 0..K-1 (their embedding is the content part).
        valid: ``[B, G]`` ``False`` for padding (images with fewer boxes).
        content: ``"label"`` (the model's label embedding) or ``"zeros"``.
    """

    anchors: Tensor
    labels: Tensor
    valid: Tensor
    content: Literal["label", "zeros"] = "label"


@dataclass
class DecoderOutput:
    """Per-layer predictions: ``logits [L, B, Q, K]``, ``boxes [L, B, Q, 4]`` (cxcywh in [0, 1]) for the normal
    queries, and the same for each extra group in ``groups`` (in the order given)."""

    logits: Tensor
    boxes: Tensor
    groups: list[tuple[Tensor, Tensor]]


def normalised_targets(
    targets: list[dict[str, Tensor]], image_sizes: Sequence[Sequence[int]]
) -> list[dict[str, Tensor]]:
    """Targets in DETR's frame: ``boxes`` cxcywh divided by the un-padded ``(h, w)``, ``labels`` 0..K-1."""
    out = []
    for target, (h, w) in zip(targets, image_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=target["boxes"].device)
        boxes = box_convert(target["boxes"].float().reshape(-1, 4), "xyxy", "cxcywh") / scale
        out.append({"boxes": boxes, "labels": target["labels"].reshape(-1).long() - 1})
    return out


def gt_query_group(
    targets: list[dict[str, Tensor]],
    box_noise: float = 0.0,
    label_noise: float = 0.0,
    num_classes: int | None = None,
    content: Literal["label", "zeros"] = "label",
    generator: torch.Generator | None = None,
) -> QueryGroup:
    """One query per GT box, padded to the batch's largest count.

    Box jitter as DN-DETR: ``(cx, cy) += U(-1, 1)·(w, h)/2·box_noise``, ``(w, h) *= 1 + U(-1, 1)·box_noise``,
    clamped to [0, 1]; with ``label_noise > 0`` each label is replaced by a random class with that probability
    (DN training; CLoCKDistill's GT queries keep their labels).
    """
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    count = max([len(t["labels"]) for t in targets] + [1])
    batch = len(targets)
    anchors = torch.full((batch, count, 4), 0.5, device=device)
    labels = torch.zeros(batch, count, dtype=torch.long, device=device)
    valid = torch.zeros(batch, count, dtype=torch.bool, device=device)
    for i, target in enumerate(targets):
        n = len(target["labels"])
        anchors[i, :n], labels[i, :n], valid[i, :n] = target["boxes"], target["labels"], True
    if box_noise > 0:
        noise = torch.rand(anchors.shape, generator=generator, device="cpu").to(device) * 2 - 1
        wh = anchors[..., 2:]
        centre = anchors[..., :2] + noise[..., :2] * wh / 2 * box_noise
        size = wh * (1 + noise[..., 2:] * box_noise)
        anchors = torch.cat([centre, size], dim=-1).clamp(1e-4, 1.0)
    if label_noise > 0:
        if num_classes is None:
            raise KDConfigError("num_classes", "label noise needs the class count")
        flip = torch.rand(labels.shape, generator=generator, device="cpu").to(device) < label_noise
        random = torch.randint(0, num_classes, labels.shape, generator=generator, device="cpu").to(device)
        labels = torch.where(flip, random, labels)
    return QueryGroup(anchors=anchors, labels=labels, valid=valid, content=content)


# ---------------------------------------------------------------------------------------------------- backbone
class DETRBackbone(nn.Module):
    """Backbone stages C3..C5 with a 1x1 conv + GroupNorm input projection to ``d_model`` per used level.

    ``forward(x)`` → ``OrderedDict{level: [N, d_model, h, w]}`` for ``levels`` (``'0','1','2'`` = strides 8, 16,
    32); ``out_channels = d_model``.
    """

    def __init__(
        self,
        name: str,
        levels: Sequence[str],
        d_model: int,
        tiny_widths: Sequence[int] = (16, 32, 64),
        weights: str | None = None,
        frozen_bn: bool | None = None,
    ) -> None:
        super().__init__()
        from kd_lightning.models.detection import TinyBody, _read_backbone_weights

        if name not in DETR_BACKBONES:
            raise KDConfigError("backbone", f"unknown backbone {name!r}", f"choose one of {list(DETR_BACKBONES)}")
        frozen = bool(weights) if frozen_bn is None else frozen_bn
        norm_layer = misc_nn_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        if name == "tiny":
            network: nn.Module = TinyBody(tiny_widths, norm_layer=norm_layer)
            stages = ["layer1", "layer2", "layer3"]
            channels = [network.stage_channels[s] for s in stages]
            if weights:
                _read_backbone_weights(weights, network, ignore=())
        else:
            network = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
            if weights:
                _read_backbone_weights(weights, network, ignore=("fc.",))
            stages = ["layer2", "layer3", "layer4"]
            base = network.inplanes // 8
            channels = [base * 2, base * 4, base * 8]
        wanted = {stage: str(i) for i, stage in enumerate(stages) if str(i) in levels}
        self.body = IntermediateLayerGetter(network, return_layers=wanted)
        self.levels = [level for level in ("0", "1", "2") if level in levels]
        groups = math.gcd(32, d_model)
        self.input_proj = nn.ModuleDict(
            {
                level: nn.Sequential(nn.Conv2d(channels[int(level)], d_model, 1), nn.GroupNorm(groups, d_model))
                for level in self.levels
            }
        )
        self.out_channels = d_model

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return OrderedDict((level, self.input_proj[level](feats[level])) for level in self.levels)


# ---------------------------------------------------------------------------------------------------- layers
class EncoderLayer(nn.Module):
    """Post-norm self-attention (queries and keys carry the position embedding) + FFN."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.drop(self.attn(q, q, x, key_padding_mask=padding, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm self-attention (with the group mask), cross-attention to the memory, FFN."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: EncoderMemory, self_mask: Tensor | None) -> Tensor:
        q = tgt + query_pos
        out = self.self_attn(q, q, tgt, attn_mask=self_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.drop(out))
        out = self.cross_attn(
            tgt + query_pos,
            memory.tokens + memory.pos,
            memory.tokens,
            key_padding_mask=memory.padding,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.drop(out))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


# ---------------------------------------------------------------------------------------------------- detector
class DETRDetector(nn.Module):
    """A DETR-family detector (see the module docstring) with torchvision's detector interface.

    ``model(images)`` in eval mode → ``[{boxes, scores, labels}]`` on the original images; in train mode
    ``model(images, targets)`` → the loss dict. The pieces :meth:`encode`, :meth:`decode`, :meth:`denoising_groups` and
    :meth:`training_losses` are public for distillation methods.

    Args:
        num_classes: K foreground categories (labels 1..K in targets; the head has K sigmoid outputs).
        backbone: ``resnet18/34/50/101`` or ``tiny``.
        feature_levels: backbone levels forming the memory: ``'0','1','2'`` = C3, C4, C5 (strides 8, 16, 32);
            ``['2']`` = single-scale DETR / DAB-DETR; Deformable DETR uses all three (plus a C6 we omit).
        d_model, num_heads, dim_feedforward, dropout: transformer sizes (DETR: 256, 8, 2048, 0.1;
            DAB-DETR/Deformable: 256, 8, 1024/2048, 0.0/0.1).
        num_encoder_layers, num_decoder_layers: layer counts (6 and 6 in the papers).
        num_queries: normal queries (DETR 100, Deformable 300).
        query_type: ``"anchor"`` (DAB-DETR 4-D anchor boxes refined per layer) or ``"point"`` (Conditional-DETR
            2-D reference points).
        query_selection: DINO's query selection: the normal queries' anchors are the boxes of the top
            ``num_queries`` encoder proposals (a class + box head on every memory token, trained by its own Hungarian
            loss ``loss_enc_*``); their content stays learned ("mixed" selection). Converges much faster.
        dn_groups: DN-DETR denoising groups during training (0: none); they also train the label embedding that
            GT-derived queries use as content.
        dn_box_noise, dn_label_noise: DN-DETR's box noise scale (0.4) and label flip probability (0.2).
        focal_alpha, focal_gamma: focal loss (0.25, 2).
        class_weight, l1_weight, giou_weight: loss weights (Deformable DETR: 2, 5, 2).
        match_class, match_l1, match_giou: matching costs (Deformable DETR: 2, 5, 2).
        detections_per_img: detections kept per image at inference (100).
        score_thresh: detections with a lower score are dropped (0: keep the top ``detections_per_img``).
        min_size, max_size, image_mean, image_std, size_divisible: torchvision's ``GeneralizedRCNNTransform``.
        tiny_widths, backbone_weights, frozen_bn: as the other detectors (a local checkpoint, never downloaded).
    """

    family = "detr"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        feature_levels: Sequence[str | int] = ("2",),
        d_model: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        num_queries: int = 100,
        query_type: QueryType = "anchor",
        query_selection: bool = False,
        dn_groups: int = 0,
        dn_box_noise: float = 0.4,
        dn_label_noise: float = 0.2,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        match_class: float = 2.0,
        match_l1: float = 5.0,
        match_giou: float = 2.0,
        detections_per_img: int = 100,
        score_thresh: float = 0.0,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
        tiny_widths: Sequence[int] = (16, 32, 64),
        backbone_weights: str | None = None,
        frozen_bn: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise KDConfigError(
                "num_classes", f"must be the number of foreground categories (>= 1), got {num_classes!r}"
            )
        levels = [str(level) for level in ([feature_levels] if isinstance(feature_levels, str) else feature_levels)]
        if not levels or any(level not in LEVEL_STRIDES for level in levels) or len(set(levels)) != len(levels):
            raise KDConfigError(
                "feature_levels", f"must be distinct levels among '0', '1', '2' (C3, C4, C5), got {levels}"
            )
        if query_type not in ("anchor", "point"):
            raise KDConfigError("query_type", f"must be 'anchor' or 'point', got {query_type!r}")
        if d_model % num_heads or d_model % 4:
            raise KDConfigError(
                "d_model", f"{d_model} must be a multiple of num_heads ({num_heads}) and of 4", "e.g. 256 with 8 heads"
            )
        for name, value in (("num_queries", num_queries), ("num_decoder_layers", num_decoder_layers)):
            if value < 1:
                raise KDConfigError(name, f"must be >= 1, got {value}")
        if num_encoder_layers < 0 or dn_groups < 0:
            raise KDConfigError("num_encoder_layers", "and dn_groups must be >= 0")
        self.num_classes = num_classes
        self.query_type: QueryType = query_type
        self.query_selection = query_selection
        self.num_queries = num_queries
        self.dn_groups = dn_groups
        self.dn_box_noise, self.dn_label_noise = dn_box_noise, dn_label_noise
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_weights = {"loss_class": class_weight, "loss_bbox": l1_weight, "loss_giou": giou_weight}
        self.match_weights = (match_class, match_l1, match_giou)
        self.detections_per_img, self.score_thresh = detections_per_img, score_thresh
        self.num_heads = num_heads

        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible
        )
        self.backbone = DETRBackbone(backbone, levels, d_model, tiny_widths, backbone_weights, frozen_bn)
        self.fpn_levels = list(self.backbone.levels)
        self.fpn_strides = {level: LEVEL_STRIDES[level] for level in self.fpn_levels}
        self.level_embed = nn.Parameter(torch.zeros(len(self.fpn_levels), d_model))
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        coords = 4 if query_type == "anchor" else 2
        self.anchor_dims = coords
        self.query_content = nn.Embedding(num_queries, d_model)
        # with query selection the anchors come from the encoder: no learned ones (DDP needs every parameter used)
        self.query_anchor = None if query_selection else nn.Embedding(num_queries, coords)
        self.label_embed = nn.Embedding(num_classes, d_model)
        self.query_pos_head = MLP(coords * (d_model // 2), d_model, d_model, 2)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_heads = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_decoder_layers))
        if query_selection:
            self.proposal_proj = nn.Linear(d_model, d_model)
            self.proposal_norm = nn.LayerNorm(d_model)
            self.proposal_class = nn.Linear(d_model, num_classes)
            self.proposal_box = MLP(d_model, d_model, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.level_embed, std=0.02)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01, as RetinaNet/Deformable
        heads = list(self.box_heads) + ([self.proposal_box] if self.query_selection else [])
        for head in heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if self.query_selection:
            nn.init.constant_(self.proposal_class.bias, -math.log((1 - 0.01) / 0.01))
        if self.query_anchor is not None:
            with torch.no_grad():  # anchors spread uniformly over the image (DAB-DETR's random_refpoints_xy)
                anchor = torch.rand(self.num_queries, self.anchor_dims)
                if self.anchor_dims == 4:
                    anchor[:, 2:] = 0.1 + 0.2 * anchor[:, 2:]
                self.query_anchor.weight.copy_(inverse_sigmoid(anchor))

    # ------------------------------------------------------------------------------------------ encoder
    def encode(self, images: Any, features: dict[str, Tensor]) -> EncoderMemory:
        """Flatten the levels, add position/level embeddings, mask the padding, run the encoder."""
        tokens, pos, padding, reference, shapes = [], [], [], [], []
        sizes = torch.tensor(images.image_sizes, dtype=torch.float32, device=images.tensors.device)  # [B, 2] (h, w)
        d = self.level_embed.shape[1]
        for index, level in enumerate(self.fpn_levels):
            feat = features[level]
            h, w = feat.shape[-2:]
            stride = self.fpn_strides[level]
            ys = (torch.arange(h, device=feat.device, dtype=torch.float32) + 0.5) * stride
            xs = (torch.arange(w, device=feat.device, dtype=torch.float32) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centre = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=-1)  # [hw, 2] pixels
            valid_wh = sizes.flip(-1)  # [B, 2] (w, h)
            ref = centre.unsqueeze(0) / valid_wh.unsqueeze(1)  # [B, hw, 2]
            pad = (ref > 1.0).any(-1)
            pad[:, 0] = False  # an image smaller than half a cell still has one token
            tokens.append(feat.flatten(2).transpose(1, 2))
            pos.append(sine_embedding(ref.clamp(max=1.0), d // 2) + self.level_embed[index])
            padding.append(pad)
            reference.append(ref.clamp(max=1.0))
            shapes.append((h, w))
        memory = torch.cat(tokens, 1)
        pos_all, padding_all = torch.cat(pos, 1).to(memory.dtype), torch.cat(padding, 1)
        for layer in self.encoder:
            memory = layer(memory, pos_all, padding_all)
        ref_all = torch.cat(reference, 1)
        out = EncoderMemory(memory, pos_all, padding_all, ref_all, shapes, list(self.fpn_levels))
        if self.query_selection:
            self._propose(out)
        return out

    def _propose(self, memory: EncoderMemory) -> None:
        """DINO's encoder proposals: per token a class score and a box refining ``(x, y, s_l, s_l)``,
        ``s_l = 0.05·2^l`` for level ``l``; the top ``num_queries`` valid tokens give the decoder's anchors."""
        sizes = torch.cat(
            [
                torch.full((h * w,), 0.05 * 2**index, device=memory.tokens.device)
                for index, (h, w) in enumerate(memory.level_shapes)
            ]
        )
        prior = torch.cat([memory.reference, sizes.view(1, -1, 1).expand(*memory.reference.shape[:2], 2)], dim=-1)
        hidden = self.proposal_norm(self.proposal_proj(memory.tokens))
        logits = self.proposal_class(hidden).float().masked_fill(memory.padding.unsqueeze(-1), float("-inf"))
        memory.proposal_logits = logits
        memory.proposal_boxes = (self.proposal_box(hidden).float() + inverse_sigmoid(prior)).sigmoid()

    # ------------------------------------------------------------------------------------------ decoder
    def _group_queries(self, group: QueryGroup) -> tuple[Tensor, Tensor]:
        """``(content [B, G, d], raw anchors [B, G, coords])`` of an extra group."""
        labels = group.labels.clamp(0, self.num_classes - 1)
        content = self.label_embed(labels)
        if group.content == "zeros":
            content = torch.zeros_like(content)
        anchors = group.anchors[..., : self.anchor_dims]
        return content, inverse_sigmoid(anchors)

    def self_attention_mask(self, batch: int, sizes: Sequence[int], valid: Sequence[Tensor]) -> Tensor | None:
        """``[B·heads, L, L]`` boolean mask (``True`` = blocked): the normal queries (first ``sizes[0]``) see
        only themselves; each extra group sees the normal queries and its own valid queries (and itself)."""
        if len(sizes) == 1:
            return None
        total = sum(sizes)
        device = valid[0].device
        mask = torch.ones(batch, total, total, dtype=torch.bool, device=device)
        q = sizes[0]
        mask[:, :q, :q] = False
        start = q
        for size, ok in zip(sizes[1:], valid):
            end = start + size
            mask[:, start:end, :q] = False
            mask[:, start:end, start:end] = ~ok.unsqueeze(1).expand(batch, size, size)
            idx = torch.arange(start, end, device=device)
            mask[:, idx, idx] = False  # a padded query attends to itself (no all-blocked row)
            start = end
        return mask.repeat_interleave(self.num_heads, dim=0)

    def normal_anchors(self, memory: EncoderMemory) -> Tensor:
        """Raw (inverse-sigmoid) anchors of the normal queries ``[B, Q, coords]``: learned, or (``query_selection``)
        the boxes of the top-``num_queries`` encoder proposals by class score, detached (DINO)."""
        batch = memory.tokens.shape[0]
        if self.query_anchor is not None:
            return self.query_anchor.weight.unsqueeze(0).expand(batch, -1, -1)
        assert memory.proposal_logits is not None and memory.proposal_boxes is not None
        k = min(self.num_queries, memory.tokens.shape[1])
        top = memory.proposal_logits.max(-1).values.topk(k, dim=1).indices  # [B, k]
        boxes = memory.proposal_boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4)).detach()
        if k < self.num_queries:  # fewer tokens than queries: repeat the best ones
            boxes = boxes.repeat(1, math.ceil(self.num_queries / k), 1)[:, : self.num_queries]
        return inverse_sigmoid(boxes[..., : self.anchor_dims])

    def decode(self, memory: EncoderMemory, groups: Sequence[QueryGroup] = ()) -> DecoderOutput:
        """Run the decoder on the normal queries plus ``groups`` (each attention-masked from the others)."""
        batch = memory.tokens.shape[0]
        content = [self.query_content.weight.unsqueeze(0).expand(batch, -1, -1)]
        raw = [self.normal_anchors(memory)]
        for group in groups:
            c, a = self._group_queries(group)
            content.append(c.to(memory.tokens.dtype))
            raw.append(a)
        sizes = [x.shape[1] for x in content]
        mask = self.self_attention_mask(batch, sizes, [g.valid for g in groups])
        tgt = torch.cat(content, 1)
        anchor_logit = torch.cat(raw, 1)  # inverse-sigmoid space
        all_logits, all_boxes = [], []
        for index, layer in enumerate(self.decoder):
            anchor = anchor_logit.sigmoid()
            d = tgt.shape[-1]
            query_pos = self.query_pos_head(sine_embedding(anchor, d // 2)).to(tgt.dtype)
            tgt = layer(tgt, query_pos, memory, mask)
            hidden = self.decoder_norm(tgt)
            delta = self.box_heads[index](hidden)
            if self.query_type == "anchor":
                boxes = (delta + anchor_logit).sigmoid()
                anchor_logit = inverse_sigmoid(boxes.detach())
            else:
                boxes = torch.cat([delta[..., :2] + anchor_logit, delta[..., 2:]], dim=-1).sigmoid()
            all_logits.append(self.class_head(hidden))
            all_boxes.append(boxes)
        logits, boxes = torch.stack(all_logits), torch.stack(all_boxes)
        splits = list(torch.split(logits, sizes, dim=2)), list(torch.split(boxes, sizes, dim=2))
        return DecoderOutput(splits[0][0], splits[1][0], list(zip(splits[0][1:], splits[1][1:])))

    # ------------------------------------------------------------------------------------------ losses
    def _num_boxes(self, targets: list[dict[str, Tensor]], device: torch.device) -> float:
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            count = count / torch.distributed.get_world_size()
        return max(float(count), 1.0)

    @torch.no_grad()
    def match(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Hungarian matching per image: ``[(query indices, target indices)]``; costs focal-class, L1, GIoU."""
        from scipy.optimize import linear_sum_assignment

        w_class, w_l1, w_giou = self.match_weights
        out = []
        prob = logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        for i, target in enumerate(targets):
            labels, gt = target["labels"], target["boxes"]
            if not len(labels):
                empty = torch.zeros(0, dtype=torch.long, device=logits.device)
                out.append((empty, empty))
                continue
            p = prob[i][:, labels]
            neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
            pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
            pred = boxes[i].float()
            cost = (
                w_class * (pos - neg)
                + w_l1 * torch.cdist(pred, gt, p=1)
                - w_giou * generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)))
        return out

    def _layer_losses(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """Focal class loss over all queries, L1 + GIoU over matched pairs, each summed / ``num_boxes``."""
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, query_idx, labels] = 1.0
        focal = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        pred = boxes[batch_idx, query_idx].float()
        gt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        l1 = F.l1_loss(pred, gt, reduction="sum")
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy")))
        return {
            "loss_class": focal / num_boxes,
            "loss_bbox": l1 / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def _sum_layers(self, per_layer: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted losses summed over decoder layers (the last + the auxiliary ones)."""
        return {name: weight * sum(layer[name] for layer in per_layer) for name, weight in self.loss_weights.items()}

    def set_losses(
        self, output: DecoderOutput, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Hungarian set losses of the normal queries at every decoder layer (``targets`` normalised)."""
        per_layer = []
        for logits, boxes in zip(output.logits, output.boxes):
            indices = self.match(logits, boxes, targets)
            per_layer.append(self._layer_losses(logits, boxes, targets, indices, num_boxes))
        return self._sum_layers(per_layer)

    def proposal_losses(
        self, memory: EncoderMemory, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Hungarian set losses of the encoder proposals (DINO's ``enc`` losses); names ``loss_enc_*``."""
        assert memory.proposal_logits is not None and memory.proposal_boxes is not None
        logits = memory.proposal_logits.masked_fill(memory.padding.unsqueeze(-1), -1e4)  # finite for the focal loss
        indices = self.match(logits, memory.proposal_boxes, targets)
        layer = self._layer_losses(logits, memory.proposal_boxes, targets, indices, num_boxes)
        return {name.replace("loss_", "loss_enc_"): value for name, value in self._sum_layers([layer]).items()}

    def denoising_losses(
        self, outputs: Sequence[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """DN groups reconstruct their own GT (query ``j`` of image ``i`` ↔ box ``j``): the same losses, no
        matching, averaged over groups; names ``loss_dn_*``."""
        indices = [(torch.arange(len(t["labels"]), device=t["labels"].device),) * 2 for t in targets]
        total: dict[str, Tensor] = {}
        for logits, boxes in outputs:
            per_layer = [self._layer_losses(lg, bx, targets, indices, num_boxes) for lg, bx in zip(logits, boxes)]
            for name, value in self._sum_layers(per_layer).items():
                key = name.replace("loss_", "loss_dn_")
                total[key] = total.get(key, 0) + value / len(outputs)
        return total

    def denoising_groups(self, targets: list[dict[str, Tensor]]) -> list[QueryGroup]:
        """``dn_groups`` noised GT groups (empty outside training or without GT boxes)."""
        if not self.training or not self.dn_groups or not any(len(t["labels"]) for t in targets):
            return []
        return [
            gt_query_group(targets, self.dn_box_noise, self.dn_label_noise, self.num_classes)
            for _ in range(self.dn_groups)
        ]

    def compute_losses(
        self, images: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Training losses from a transformed batch (``ImageList``) and :attr:`backbone` features; ``targets``
        in the resized frame (xyxy pixels, labels 1..K)."""
        norm = normalised_targets(targets, images.image_sizes)
        memory = self.encode(images, features)
        dn = self.denoising_groups(norm)
        output = self.decode(memory, dn)
        return self.training_losses(memory, output, norm, len(dn))

    def training_losses(
        self, memory: EncoderMemory, output: DecoderOutput, targets: list[dict[str, Tensor]], dn_groups: int
    ) -> dict[str, Tensor]:
        """All training losses of a decoded batch: the set losses, the encoder proposals' (``query_selection``)
        and those of the first ``dn_groups`` extra groups of ``output`` (DN groups). The box count that normalises
        them is averaged over DDP ranks once, on every rank (whatever its batch holds)."""
        num_boxes = self._num_boxes(targets, output.logits.device)
        losses = self.set_losses(output, targets, num_boxes)
        if self.query_selection:
            losses.update(self.proposal_losses(memory, targets, num_boxes))
        if dn_groups:
            losses.update(self.denoising_losses(output.groups[:dn_groups], targets, num_boxes))
        else:  # the label embedding took no part in this step: a zero term keeps DDP's gradient buckets complete
            losses["loss_class"] = losses["loss_class"] + 0.0 * self.label_embed.weight.sum()
        return losses

    # ------------------------------------------------------------------------------------------ forward
    def postprocess(self, output: DecoderOutput, image_sizes: Sequence[Sequence[int]]) -> list[dict[str, Tensor]]:
        """Top ``detections_per_img`` (query, class) pairs of the last layer, boxes as xyxy pixels clipped to the
        image."""
        logits, boxes = output.logits[-1].float(), output.boxes[-1].float()
        results = []
        k = min(self.detections_per_img, logits.shape[1] * logits.shape[2])
        for scores_q, boxes_q, (h, w) in zip(logits.sigmoid(), boxes, image_sizes):
            scores, flat = scores_q.flatten().topk(k)
            query, label = flat // self.num_classes, flat % self.num_classes
            xyxy = box_convert(boxes_q[query], "cxcywh", "xyxy").clamp(0, 1)  # clipped to the image
            xyxy = xyxy * torch.tensor([w, h, w, h], device=boxes_q.device)
            keep = scores > self.score_thresh
            results.append({"boxes": xyxy[keep], "scores": scores[keep], "labels": label[keep] + 1})
        return results

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training and targets is None:
            raise KDConfigError("targets", "a DETR detector in training mode needs targets", "call model.eval() first")
        original = [tuple(img.shape[-2:]) for img in images]
        image_list, resized = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if self.training:
            return self.compute_losses(image_list, features, resized)
        output = self.decode(self.encode(image_list, features))
        detections = self.postprocess(output, image_list.image_sizes)
        return self.transform.postprocess(detections, image_list.image_sizes, original)
