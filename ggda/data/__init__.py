"""Data sets (bundled and file-based), label noise and the Lightning data module."""

from ggda.data.base import DataBundle
from ggda.data.bundled import Digits, MNIST5k, Synthetic
from ggda.data.datamodule import BundleDataModule

__all__ = ["BundleDataModule", "DataBundle", "Digits", "MNIST5k", "Synthetic"]
