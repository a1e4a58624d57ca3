"""Saves the base model at the configured epochs into the model store."""

from __future__ import annotations

import pytorch_lightning as pl

from ggda.callbacks.base import GGDACallback


class EpochCheckpoint(GGDACallback):
    """After each training epoch: ``last.ckpt`` (resume point) and the configured epochs.

    Each checkpoint records the learning rate in force (TracIn weighs by it).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.ctx.store.save(trainer, epoch, lr)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= (trainer.max_epochs or 0):
            self.ctx.store.mark_complete()
        self.ctx.store.unlock()
