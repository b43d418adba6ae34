"""CIRKD: Cross-Image Relational Knowledge Distillation for Semantic Segmentation.

Chuanguang Yang, Helong Zhou, Zhulin An, Xue Jiang, Yongjun Xu, Qian Zhang; CVPR 2022, pp. 12319-12328;
arXiv 2204.06986. Official code winycg/CIRKD @ 2d8ad0f (``train_cirkd.py``, ``losses/{kd,cirkd_mini_batch,
cirkd_memory}.py``); dense-baselines spec, section 5.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses._common import check_temperature
from kd_lightning.losses.dense import CIRKDMemoryLoss, pairwise_affinity_kd, pixel_kd
from kd_lightning.losses.terms import active, check_weights
from kd_lightning.methods.tasks.segmentation import SegmentationDistillation

__all__ = ["SegCIRKD"]


class SegCIRKD(SegmentationDistillation):
    """Pixel KD on logits + cross-image pixel-pair affinity + (optionally) memory-based pixel/region contrast.

    ``L = CE(out) + aux_weight·CE(aux) + kd_weight·L_KD(τ_kd) + pair_weight·L_pair(τ_pair)
    + memory_pixel_weight·L_mem_pixel + memory_region_weight·L_mem_region`` where

    - ``L_KD`` = per-pixel ``τ²·KL`` of the native-stride logits (:func:`~kd_lightning.losses.dense.pixel_kd`);
    - ``L_pair`` = for every ordered image pair ``(i, j)`` of the (per-process) batch, the KL between the
      teacher's and student's row-softmaxed ``HW x HW`` affinities of L2-normalised head features
      (:func:`~kd_lightning.losses.dense.pairwise_affinity_kd`; no projection, so channel counts may differ);
    - ``L_mem_*`` = :class:`~kd_lightning.losses.dense.CIRKDMemoryLoss` against class-wise queues of teacher pixel
      and region embeddings (a trainable projection head maps the student feature to the teacher's width).

    Defaults are the Cityscapes ones of ``train_cirkd.py``: ``τ_kd = 1``, weights 1 / 1 / 0.1 / 0.1,
    ``τ_pair = 0.1``, ``aux_weight = 0.4`` (the task's default). The features are the penultimate head map
    (``head_feature`` role: DeepLabV3 ASPP → 3x3 conv → BN → ReLU). Memory sizes default to CIRKD's (20000
    pixels / 2000 regions per class, ~390 MB at 19 x 256); shrink them for small runs.
    ``pair_pool_size`` average-pools both feature maps before the affinity to bound its ``B²·(HW)²`` memory
    (``None``: faithful). ``memory_pixel_enqueue="official"`` keeps the official code's enqueue (random positions
    of the image, not of the class; see the loss' docstring); ``"class"`` is what the paper describes.

    Args:
        student, teacher: segmenters with the same classes and output stride.
        kd_tau, kd_weight: pixel KD temperature and weight.
        pair_tau, pair_weight, pair_pool_size: pair-wise affinity temperature, weight and optional pooling.
        memory_pixel_weight, memory_region_weight: memory-term weights (both 0: no memory, no projection head).
        memory_pixel_size, memory_region_size, memory_pixel_contrast, memory_region_contrast: queue and sample
            sizes of the memory terms; memory_tau, memory_kd_tau: their temperatures.
        memory_pixel_enqueue: ``"official"`` or ``"class"``.
        feature_role: the map role of the relational terms.
        **kwargs: :class:`~kd_lightning.methods.tasks.segmentation.SegmentationDistillation`'s arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        kd_tau: float = 1.0,
        kd_weight: float = 1.0,
        pair_tau: float = 0.1,
        pair_weight: float = 1.0,
        pair_pool_size: int | None = None,
        memory_pixel_weight: float = 0.1,
        memory_region_weight: float = 0.1,
        memory_pixel_size: int = 20000,
        memory_region_size: int = 2000,
        memory_pixel_contrast: int = 4096,
        memory_region_contrast: int = 1024,
        memory_tau: float = 0.1,
        memory_kd_tau: float = 1.0,
        memory_pixel_enqueue: Literal["official", "class"] = "official",
        feature_role: str = "head_feature",
        **kwargs: Any,
    ) -> None:
        check_temperature(kd_tau, "kd_tau")
        check_temperature(pair_tau, "pair_tau")
        check_weights(
            kd_weight=kd_weight,
            pair_weight=pair_weight,
            memory_pixel_weight=memory_pixel_weight,
            memory_region_weight=memory_region_weight,
        )
        if pair_pool_size is not None and pair_pool_size < 1:
            raise KDConfigError("pair_pool_size", f"must be >= 1 or null, got {pair_pool_size}")
        self.kd_tau, self.kd_weight = kd_tau, kd_weight
        self.pair_tau, self.pair_weight, self.pair_pool_size = pair_tau, pair_weight, pair_pool_size
        self.memory_options = {
            "pixel_weight": memory_pixel_weight,
            "region_weight": memory_region_weight,
            "pixel_memory_size": memory_pixel_size,
            "region_memory_size": memory_region_size,
            "pixel_contrast_size": memory_pixel_contrast,
            "region_contrast_size": memory_region_contrast,
            "tau": memory_tau,
            "kd_tau": memory_kd_tau,
            "pixel_enqueue": memory_pixel_enqueue,
        }
        self.uses_memory = active(memory_pixel_weight) or active(memory_region_weight)
        self.feature_role = feature_role
        super().__init__(student=student, teacher=teacher, **kwargs)

    def map_roles(self) -> tuple[str, ...]:
        relational = active(self.pair_weight) or self.uses_memory
        return ("logits",) + ((self.feature_role,) if relational else ())

    def build_parts(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        if not self.uses_memory:
            return
        num_classes = teacher_shapes["logits"][0]
        self.memory = CIRKDMemoryLoss(
            student_shapes[self.feature_role][0],
            teacher_shapes[self.feature_role][0],
            num_classes,
            ignore_index=self.ignore_index,
            **self.memory_options,
        )

    def distill_terms(
        self, student_maps: dict[str, Tensor], teacher_maps: dict[str, Tensor], masks: Tensor, batch: Any
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if active(self.kd_weight):
            terms["pixel_kd"] = self.kd_weight * pixel_kd(student_maps["logits"], teacher_maps["logits"], self.kd_tau)
        if active(self.pair_weight):
            s, t = student_maps[self.feature_role], teacher_maps[self.feature_role]
            terms["pair"] = self.pair_weight * pairwise_affinity_kd(s, t, self.pair_tau, self.pair_pool_size)
        if self.uses_memory:
            memory = getattr(self, "memory", None)
            if memory is None:
                raise KDConfigError(
                    "model.init_args.input_shape",
                    "SegCIRKD's projection head and queues are built from the map shapes at setup and none were probed",
                    "train through a Trainer with a data module that has input_shape, or set input_shape",
                )
            out = memory(student_maps[self.feature_role], teacher_maps[self.feature_role], masks)
            terms.update({f"memory_{k}": v for k, v in out.items() if k != "loss"})
        return terms
