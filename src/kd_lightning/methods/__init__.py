"""Distillation methods as LightningModules (one class per file), on the task-neutral core.

``core.DistillationModule`` owns teachers, optimisation, schedules, logging and export; the task siblings in
``tasks/`` add batches, metrics and data checks (classification, language modelling, masked images). The
registry is this module: every class listed in ``__all__`` is usable by its short name in configs
(``class_path: PLD``).
"""

from kd_lightning.methods.adakd import AdaKD
from kd_lightning.methods.align_ti import AlignTI
from kd_lightning.methods.attention_transfer import AT
from kd_lightning.methods.attribution_nmt import AttributionGuidedNMT
from kd_lightning.methods.bd_kd import BDKD
from kd_lightning.methods.bild import BiLD
from kd_lightning.methods.boot import BOOT
from kd_lightning.methods.core import DistillationModule
from kd_lightning.methods.crd import CRD
from kd_lightning.methods.dbild import DBiLD
from kd_lightning.methods.decoupled_kl import DecoupledKLDistill
from kd_lightning.methods.det_acam_kd import DetACAMKD
from kd_lightning.methods.det_clockdistill import CLoCKDistill
from kd_lightning.methods.det_cwd import DetCWD
from kd_lightning.methods.det_fgd import DetFGD
from kd_lightning.methods.det_fpn_imitation import DetFPNImitation
from kd_lightning.methods.det_logit_kd import DetLogitKD
from kd_lightning.methods.det_mgd import DetMGD
from kd_lightning.methods.det_pkd import DetPKD
from kd_lightning.methods.dho import DHO
from kd_lightning.methods.dkd import DKD
from kd_lightning.methods.dmae import DMAE
from kd_lightning.methods.ensemble_kd import EnsembleKD
from kd_lightning.methods.ff_g2m import FFG2M
from kd_lightning.methods.fitnet import FitNet
from kd_lightning.methods.kd3 import KD3
from kd_lightning.methods.kl_mixing import KLMixingKD
from kd_lightning.methods.lelp import LELP
from kd_lightning.methods.llkd import LLKD
from kd_lightning.methods.lm_distill import LMDistill
from kd_lightning.methods.logit_standard_kd import LogitStandardKD
from kd_lightning.methods.mix_kd import MixKD
from kd_lightning.methods.mixsd import MixSD
from kd_lightning.methods.mst_distill import MSTDistill
from kd_lightning.methods.on_policy import OnPolicyDistill
from kd_lightning.methods.opsd import OPSD
from kd_lightning.methods.pld import PLD
from kd_lightning.methods.policy_gradient import PolicyGradient
from kd_lightning.methods.rkd import RKD
from kd_lightning.methods.seg_acam_kd import SegACAMKD
from kd_lightning.methods.seg_cirkd import SegCIRKD
from kd_lightning.methods.seg_cwd import SegCWD
from kd_lightning.methods.seg_pixel_kd import SegPixelKD
from kd_lightning.methods.self_distill import GTSelfDistill
from kd_lightning.methods.semi_supervised_kd import SemiSupervisedKD
from kd_lightning.methods.seq2seq_kd import Seq2SeqKD
from kd_lightning.methods.sinkd import SinKD
from kd_lightning.methods.skd import SKD
from kd_lightning.methods.soda import SODA
from kd_lightning.methods.sparse_ensemble_kd import SparseEnsembleKD
from kd_lightning.methods.steve2 import HierarchicalMirroredKD
from kd_lightning.methods.swing import SwingKD
from kd_lightning.methods.switch_kd import SwitchKD
from kd_lightning.methods.taid import TAID
from kd_lightning.methods.talking_models import TalkingModels
from kd_lightning.methods.tasks import (
    ClassificationDistillation,
    DetectionDistillation,
    DetectionSupervised,
    DiffusionDistillation,
    DiffusionSupervised,
    LanguageModelDistillation,
    LMSupervised,
    MaskedImageDistillation,
    NodeClassificationDistillation,
    NodeSupervised,
    ReasoningDistillation,
    ReasoningSupervised,
    RetrievalDistillation,
    RetrievalSupervised,
    SegmentationDistillation,
    SegmentationSupervised,
    Supervised,
)
from kd_lightning.methods.tasks.policy import PolicyDistillation, PolicySupervised
from kd_lightning.methods.tasks.seq2seq import Seq2SeqDistillation, Seq2SeqSupervised
from kd_lightning.methods.tasks.vision_language import VisionLanguageDistillation, VLMSupervised
from kd_lightning.methods.tgeo_kd import TGeoKD
from kd_lightning.methods.trg import TRG
from kd_lightning.methods.tsd_kd import TSDKD
from kd_lightning.methods.vanilla_kd import VanillaKD
from kd_lightning.methods.vlm_kd import VLMTokenKD

__all__ = [
    "AT",
    "BDKD",
    "BOOT",
    "CRD",
    "DHO",
    "DKD",
    "DMAE",
    "FFG2M",
    "KD3",
    "LELP",
    "LLKD",
    "OPSD",
    "PLD",
    "RKD",
    "SKD",
    "SODA",
    "TAID",
    "TRG",
    "TSDKD",
    "AdaKD",
    "AlignTI",
    "AttributionGuidedNMT",
    "BiLD",
    "CLoCKDistill",
    "ClassificationDistillation",
    "DBiLD",
    "DecoupledKLDistill",
    "DetACAMKD",
    "DetCWD",
    "DetFGD",
    "DetFPNImitation",
    "DetLogitKD",
    "DetMGD",
    "DetPKD",
    "DetectionDistillation",
    "DetectionSupervised",
    "DiffusionDistillation",
    "DiffusionSupervised",
    "DistillationModule",
    "EnsembleKD",
    "FitNet",
    "GTSelfDistill",
    "HierarchicalMirroredKD",
    "KLMixingKD",
    "LMDistill",
    "LMSupervised",
    "LanguageModelDistillation",
    "LogitStandardKD",
    "MSTDistill",
    "MaskedImageDistillation",
    "MixKD",
    "MixSD",
    "NodeClassificationDistillation",
    "NodeSupervised",
    "OnPolicyDistill",
    "PolicyDistillation",
    "PolicyGradient",
    "PolicySupervised",
    "ReasoningDistillation",
    "ReasoningSupervised",
    "RetrievalDistillation",
    "RetrievalSupervised",
    "SegACAMKD",
    "SegCIRKD",
    "SegCWD",
    "SegPixelKD",
    "SegmentationDistillation",
    "SegmentationSupervised",
    "SemiSupervisedKD",
    "Seq2SeqDistillation",
    "Seq2SeqKD",
    "Seq2SeqSupervised",
    "SinKD",
    "SparseEnsembleKD",
    "Supervised",
    "SwingKD",
    "SwitchKD",
    "TGeoKD",
    "TalkingModels",
    "VLMSupervised",
    "VLMTokenKD",
    "VanillaKD",
    "VisionLanguageDistillation",
]
