"""Thin Lightning callbacks over the library: checkpoints, attribution, evaluation."""

from ggda.lightning.callbacks.attribution import GroupAttributionCallback
from ggda.lightning.callbacks.base import GGDACallback, RunContext, RunObjects
from ggda.lightning.callbacks.checkpoint import EpochCheckpoint
from ggda.lightning.callbacks.evaluation import EvaluationCallback

__all__ = [
    "EpochCheckpoint",
    "EvaluationCallback",
    "GGDACallback",
    "GroupAttributionCallback",
    "RunContext",
    "RunObjects",
]
