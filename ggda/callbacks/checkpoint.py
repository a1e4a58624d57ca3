"""Saves a model at the configured epochs into its model store."""

from __future__ import annotations

import pytorch_lightning as pl

from ggda.callbacks.base import GGDACallback, RunContext
from ggda.faults import maybe_fail
from ggda.models.store import ModelStore


class EpochCheckpoint(GGDACallback):
    """After each training epoch: the resume point, kept if a configured epoch.

    Each checkpoint records the learning rate in force (TracIn weighs by it). The store is
    the run's base-model store (set by :meth:`bind`) or one given directly (ensemble
    members).
    """

    def __init__(self, store: ModelStore | None = None) -> None:
        self.store = store

    def bind(self, context: RunContext) -> None:
        super().bind(context)
        self.store = context.store

    def _store(self) -> ModelStore:
        if self.store is None:
            raise RuntimeError("EpochCheckpoint has no model store (see ggda.pipeline)")
        return self.store

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._store().save(trainer, epoch, lr)
        maybe_fail(f"train_epoch_{epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= (trainer.max_epochs or 0):
            self._store().mark_complete()
        self._store().unlock()
