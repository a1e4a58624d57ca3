"""Shared state of one run, handed by the pipeline to the GGDA callbacks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ggda import tracking
from ggda.attribution.base import AttributionResult, AttributionTask, Attributor, Checkpoint
from ggda.attribution.properties import QueryProperty
from ggda.data.base import DataBundle
from ggda.evaluation.base import Evaluator
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouper, Grouping
from ggda.models.store import ModelStore


@dataclass
class RunContext:
    """Objects built from config plus what the stages produce.

    Built once by :func:`ggda.pipeline.run`; the callbacks read and fill it.
    """

    run_dir: Path
    cache_dir: Path
    bundle: DataBundle
    store: ModelStore
    grouper: Grouper
    attributor: Attributor
    prop: QueryProperty
    retrain: RetrainService
    evaluators: list[Evaluator]
    keys: dict[str, str]
    seed: int
    loggers: list[Any] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    grouping: Grouping | None = None
    task: AttributionTask | None = None
    result: AttributionResult | None = None
    ensemble: Callable[[int], list[list[Checkpoint]]] | None = None

    def log(self, metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
        """Record scalars (for metrics.json) and send them to the loggers."""
        full = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.metrics.update(full)
        tracking.log_scalars(self.loggers, full, step=step)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Time a stage into ``time/<stage>``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.log({f"time/{stage}": time.perf_counter() - t0})


class GGDACallback(pl.Callback):
    """A callback that gets the run's :class:`RunContext` from the pipeline."""

    context: RunContext | None = None

    def bind(self, context: RunContext) -> None:
        self.context = context

    @property
    def ctx(self) -> RunContext:
        if self.context is None:
            raise RuntimeError(
                f"{type(self).__name__} used without a RunContext (see ggda.pipeline)"
            )
        return self.context
