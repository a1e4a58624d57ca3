"""What the pipeline hands the GGDA callbacks: the run's objects and its record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ggda import tracking
from ggda.attribution.base import Attributor, Checkpoint
from ggda.attribution.properties import QueryProperty
from ggda.data.base import DataBundle
from ggda.evaluation.base import Evaluator
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouper
from ggda.models.store import ModelStore
from ggda.stages import ArtifactCache, AttributionStage


@dataclass(frozen=True)
class RunObjects:
    """The library objects one run is made of, built from config by :mod:`ggda.pipeline`.

    Attributes:
        bundle: the data.
        store: the base model's cache entry (its checkpoints).
        grouper, attributor, prop: the grouping, the method and the property.
        retrain: the bound retrain service.
        evaluators: the evaluations, in order.
        cache: where groupings and scores are cached (:class:`ggda.stages.ArtifactCache`).
        ensemble: ``ensemble(count[, fraction])`` trains (or reuses) further models of the
            recipe (on seeded random subsets when fraction < 1).
    """

    bundle: DataBundle
    store: ModelStore
    grouper: Grouper
    attributor: Attributor
    prop: QueryProperty
    retrain: RetrainService
    evaluators: tuple[Evaluator, ...]
    cache: ArtifactCache
    ensemble: Callable[..., list[list[Checkpoint]]] | None = None


@dataclass
class RunContext:
    """One run as the callbacks see it: its objects, where it writes, what it recorded.

    Built once by :func:`ggda.pipeline.run`. The attribution callback sets
    :attr:`attributed` (the typed result of the attribution stage), which the evaluation
    callback reads; the pipeline checks before training that the callbacks come in that
    order.
    """

    objects: RunObjects
    run_dir: Path
    loggers: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    attributed: AttributionStage | None = None

    def log(self, metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
        """Record scalars (for metrics.json) and send them to the loggers."""
        full = {f"{prefix}{k}": v for k, v in metrics.items()}
        self.metrics.update(full)
        tracking.log_scalars(self.loggers, full, step=step)


class GGDACallback(pl.Callback):
    """A callback that gets the run's :class:`RunContext` from the pipeline.

    ``after`` names the GGDA callback classes that must come before this one in the
    trainer's callback list (the pipeline checks it before training).
    """

    after: tuple[type[GGDACallback], ...] = ()
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
