"""The Evaluator interface and what evaluations receive and return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from ggda.attribution.base import AttributionTask, Attributor
from ggda.attribution.properties import QueryProperty
from ggda.data.base import DataBundle
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouping


@dataclass
class EvalContext:
    """Inputs of every evaluation.

    Attributes:
        bundle: the data.
        grouping: the partition that was scored.
        scores: (k, m) group scores, sum-aggregated (positive = helps).
        prop: the property the scores attribute.
        retrain: the shared retraining service (already bound to recipe and data).
        attributor: the method, for evaluations that attribute another property.
        task: the attribution task (checkpoints, data), to re-attribute.
    """

    bundle: DataBundle
    grouping: Grouping
    scores: torch.Tensor
    prop: QueryProperty
    retrain: RetrainService
    attributor: Attributor | None = None
    task: AttributionTask | None = None


@dataclass
class EvalResult:
    """Scalars (logged under ``<evaluator>/...``), tables and matplotlib figures."""

    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


# Metric namespace -> evaluator class, filled by every Evaluator subclass as it is defined.
NAMESPACES: dict[str, type[Evaluator]] = {}


class Evaluator:
    """One evaluation of group attributions (LDS, pruning, noisy labels, ...).

    A subclass sets ``name``; its metrics are logged under ``<name>/...`` and the name is
    registered in :data:`NAMESPACES` when the class is defined, so summaries and reports
    find every evaluation's metrics without a hard-coded list.
    """

    name = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name != "base":
            NAMESPACES[cls.name] = cls

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Evaluate the group scores in ``ctx``; metrics are relative to ``<name>/``."""
        raise NotImplementedError


def metric_namespaces() -> frozenset[str]:
    """Names of every evaluation defined so far (the built-ins are always among them)."""
    return frozenset(NAMESPACES)


def spearman_columns(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Spearman correlation of matching columns: (S, m), (S, m) -> (m,).

    Ties get average ranks; a column with constant values gives NaN (undefined).
    """
    ra = rankdata(np.asarray(a, dtype=np.float64), axis=0)
    rb = rankdata(np.asarray(b, dtype=np.float64), axis=0)
    return pearson_columns(ra, rb)


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns; NaN where a column is constant."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / den
    r[den <= 1e-300] = np.nan
    return r
