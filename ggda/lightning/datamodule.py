"""A LightningDataModule over a :class:`DataBundle` (tensors already in memory)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ggda.data.base import DataBundle


class BundleDataModule(pl.LightningDataModule):
    """Serves the train and validation splits of a bundle in minibatches.

    Args:
        bundle: the data.
        batch_size: minibatch size for training.
        seed: seed of the shuffling generator (so training is reproducible).
    """

    def __init__(self, bundle: DataBundle, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        self.bundle = bundle
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        b = self.bundle
        return DataLoader(
            TensorDataset(b.x_train, b.y_train),
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        b = self.bundle
        return DataLoader(TensorDataset(b.x_val, b.y_val), batch_size=1024)
