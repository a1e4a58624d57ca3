"""The one LightningModule: wraps any plain net, trains it with a :class:`Recipe`."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ggda.faults import maybe_fail
from ggda.lightning.datamodule import epoch_seed
from ggda.models.functional import accuracy, per_example_loss
from ggda.models.training import Recipe, check_finite_loss


class GGDAModule(pl.LightningModule):
    """Trains ``net`` with cross-entropy using the recipe's optimizer and scheduler.

    Args:
        net: the plain torch network.
        recipe: optimizer/scheduler settings (shared with the lean retraining loop).
        seed: run seed; the global torch RNG (dropout) is re-seeded from (seed, epoch) at
            every epoch start, so a resumed training draws what an uninterrupted one does.
            None leaves the RNG alone.
    """

    def __init__(self, net: nn.Module, recipe: Recipe, seed: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe
        self.seed = seed

    def on_train_epoch_start(self) -> None:
        if self.seed is not None:
            torch.manual_seed(epoch_seed(self.seed, self.current_epoch, "torch"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        maybe_fail(f"train_epoch_{self.current_epoch + 1}_batch_{batch_idx}")
        x, y = batch
        logits = self.net(x)
        loss = per_example_loss(logits, y).mean()
        check_finite_loss(loss, "training the base model", self.current_epoch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self.net(x)
        self.log("val/loss", per_example_loss(logits, y).mean(), prog_bar=True)
        self.log("val/acc", accuracy(logits, y), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt, sched = self.recipe.build_optimizer(self.net.parameters())
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def current_lr(self) -> float:
        """Learning rate of the first param group right now."""
        if self.trainer is None or not self.trainer.optimizers:
            return float(self.recipe.lr)
        return float(self.trainer.optimizers[0].param_groups[0]["lr"])
