"""Thin Lightning callbacks over the library: checkpoints, attribution, evaluation."""

from ggda.callbacks.attribution import GroupAttributionCallback
from ggda.callbacks.base import GGDACallback, RunContext
from ggda.callbacks.checkpoint import EpochCheckpoint
from ggda.callbacks.evaluation import EvaluationCallback

__all__ = [
    "EpochCheckpoint",
    "EvaluationCallback",
    "GGDACallback",
    "GroupAttributionCallback",
    "RunContext",
]
