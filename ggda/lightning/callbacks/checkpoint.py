"""Saves a model at the configured epochs into its model store."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl

from ggda.faults import maybe_fail
from ggda.io import atomic_write_json
from ggda.lightning.callbacks.base import GGDACallback, RunContext
from ggda.models.store import EPOCH_TIMES, ModelStore

log = logging.getLogger(__name__)


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
        self.store = context.objects.store

    def _store(self) -> ModelStore:
        if self.store is None:
            raise RuntimeError("EpochCheckpoint has no model store (see ggda.pipeline)")
        return self.store

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < (trainer.max_epochs or 0):
            log.info(
                "training the base model: epochs %d-%d into %s",
                trainer.current_epoch + 1,
                trainer.max_epochs,
                self._store().dir,
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        t0 = getattr(self, "_epoch_t0", None)
        if t0 is not None:  # wall seconds of the epoch, kept beside the checkpoints
            record_epoch_seconds(self._store().dir, epoch, time.perf_counter() - t0)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self._store().save(trainer, epoch, lr)
        maybe_fail(f"train_epoch_{epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= (trainer.max_epochs or 0):
            self._store().mark_complete()
        self._store().unlock()


def record_epoch_seconds(store_dir: Path, epoch: int, seconds: float) -> None:
    """Add one epoch's training wall time to ``<store>/epoch_seconds.json``."""
    path = Path(store_dir) / EPOCH_TIMES
    times = read_epoch_seconds(store_dir)
    times[str(epoch)] = seconds
    atomic_write_json(path, times)


def read_epoch_seconds(store_dir: Path) -> dict[str, float]:
    """{epoch: seconds} recorded while the model trained ({} for older caches)."""
    try:
        return {
            str(k): float(v)
            for k, v in json.loads((Path(store_dir) / EPOCH_TIMES).read_text()).items()
        }
    except (FileNotFoundError, json.JSONDecodeError, AttributeError, ValueError):
        return {}


def median_epoch_seconds(store_dir: Path) -> float | None:
    """``time/epoch``: the median training epoch of the model in ``store_dir``, or None."""
    times = list(read_epoch_seconds(store_dir).values())
    return statistics.median(times) if times else None
