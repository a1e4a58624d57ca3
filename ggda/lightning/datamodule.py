"""A LightningDataModule over a :class:`DataBundle` (tensors already in memory)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from ggda.data.base import DataBundle


def epoch_seed(seed: int, epoch: int, stream: str = "shuffle") -> int:
    """A 63-bit seed that depends only on (run seed, epoch, stream name).

    Every per-epoch random choice is drawn from its own seed, so an epoch replayed after a
    resume draws exactly what it drew in an uninterrupted run.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(epoch)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochShuffle(Sampler[int]):
    """A random permutation of ``range(n)`` that is a function of (seed, epoch) only.

    A ``RandomSampler`` with a generator seeded once draws epoch e's order from the state
    epochs 0..e-1 left behind; a resumed training re-seeds it and replays epoch 0's order
    for epoch e. Lightning calls :meth:`set_epoch` before every epoch (also after a
    resume, with the restored epoch).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


class BundleDataModule(pl.LightningDataModule):
    """Serves the train and validation splits of a bundle in minibatches.

    Args:
        bundle: the data.
        batch_size: minibatch size for training.
        seed: seed of the shuffling (epoch e's order is a function of (seed, e)).
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
            sampler=EpochShuffle(b.n_train, self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        b = self.bundle
        return DataLoader(TensorDataset(b.x_val, b.y_val), batch_size=1024)
