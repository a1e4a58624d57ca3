"""Data sets (bundled and file-based), label noise and the Lightning data module."""

from ggda.data.base import DataBundle
from ggda.data.bundled import Digits, MNIST5k, Synthetic
from ggda.data.datamodule import BundleDataModule
from ggda.data.images import CIFAR10Files, MNISTFiles
from ggda.data.loading import DataFileError
from ggda.data.tabular import GermanCredit, HELOCFile
from ggda.data.text import BBCNews, QNLIFiles

__all__ = [
    "BBCNews",
    "BundleDataModule",
    "CIFAR10Files",
    "DataBundle",
    "DataFileError",
    "Digits",
    "GermanCredit",
    "HELOCFile",
    "MNIST5k",
    "MNISTFiles",
    "QNLIFiles",
    "Synthetic",
]
