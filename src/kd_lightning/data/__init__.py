"""Data modules of the zoo: one file per dataset family, all built on :class:`KDDataModule`."""

from kd_lightning.data.base import KDDataModule, stratified_split
from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.imagenet import ImageNetDataModule
from kd_lightning.data.radioml import RadioMLDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "KDDataModule",
    "RadioMLDataModule",
    "stratified_split",
]
