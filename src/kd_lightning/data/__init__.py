"""Data modules of the zoo: one file per dataset family, all built on :class:`KDDataModule`."""

from kd_lightning.data.base import KDDataModule, stratified_split
from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.cityscapes import CityscapesDataModule
from kd_lightning.data.coco import COCODetectionDataModule, detection_collate
from kd_lightning.data.digit_scenes import make_scenes
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.digits_variants import DigitsVariantsDataModule
from kd_lightning.data.digits_web import DigitsWebDataModule
from kd_lightning.data.embodied import EnvRolloutDataModule
from kd_lightning.data.facts import FactInjectionDataModule
from kd_lightning.data.graph import CoauthorAmazonDataModule, DigitsGraphDataModule, PlanetoidDataModule
from kd_lightning.data.imagenet import ImageNetDataModule
from kd_lightning.data.noise import NoiseDataModule
from kd_lightning.data.paired import AVDigitsDataModule, AVMNISTDataModule, PairedDataModule
from kd_lightning.data.radioml import RadioMLDataModule
from kd_lightning.data.reasoning import ReasoningDataModule
from kd_lightning.data.retrieval import RetrievalDataModule
from kd_lightning.data.semi_supervised import LABELED, UNLABELED, SemiSupervisedDataModule
from kd_lightning.data.teacher_logits import TeacherLogitStore, write_teacher_logits
from kd_lightning.data.text import ByteTokenizer, HFTokenizer, TextDataModule, TokenBatchLoader
from kd_lightning.data.transfer import TransferSetDataModule
from kd_lightning.data.translation import TranslationDataModule, WordTokenizer
from kd_lightning.data.vqa import DigitVQADataModule
from kd_lightning.data.wrappers import ClassGroupsDataModule, WrappedDataModule

__all__ = [
    "LABELED",
    "UNLABELED",
    "AVDigitsDataModule",
    "AVMNISTDataModule",
    "ByteTokenizer",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "COCODetectionDataModule",
    "CityscapesDataModule",
    "ClassGroupsDataModule",
    "CoauthorAmazonDataModule",
    "DigitVQADataModule",
    "DigitsDataModule",
    "DigitsGraphDataModule",
    "DigitsVariantsDataModule",
    "DigitsWebDataModule",
    "EnvRolloutDataModule",
    "FactInjectionDataModule",
    "HFTokenizer",
    "ImageNetDataModule",
    "KDDataModule",
    "NoiseDataModule",
    "PairedDataModule",
    "PlanetoidDataModule",
    "RadioMLDataModule",
    "ReasoningDataModule",
    "RetrievalDataModule",
    "SemiSupervisedDataModule",
    "TeacherLogitStore",
    "TextDataModule",
    "TokenBatchLoader",
    "TransferSetDataModule",
    "TranslationDataModule",
    "WordTokenizer",
    "WrappedDataModule",
    "detection_collate",
    "make_scenes",
    "stratified_split",
    "write_teacher_logits",
]
