"""The Lightning adapter: data module, LightningModule and the run's callbacks.

The only package (with :mod:`ggda.pipeline`) that imports ``pytorch_lightning``; the library
below it (data, models, grouping, attribution, evaluation) is plain PyTorch.
"""

from ggda.lightning.datamodule import BundleDataModule
from ggda.lightning.module import GGDAModule

__all__ = ["BundleDataModule", "GGDAModule"]
