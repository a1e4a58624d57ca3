"""Data sets (bundled and file-based) and label noise; no Lightning (see ggda.lightning)."""

from ggda.data.base import DataBundle
from ggda.data.bundled import Digits, MNIST5k, Synthetic
from ggda.data.images import CIFAR10Files, MNISTFiles
from ggda.data.loading import DataFileError
from ggda.data.tabular import GermanCredit, HELOCFile
from ggda.data.text import BBCNews, QNLIFiles

__all__ = [
    "BBCNews",
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
