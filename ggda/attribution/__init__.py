"""Attribution methods in group form, all on the shared group-gradient primitive."""

from ggda.attribution.base import AttributionResult, AttributionTask, Attributor, Checkpoint
from ggda.attribution.loop import GradientAttributor
from ggda.attribution.properties import QueryProperty
from ggda.attribution.tracin import TracIn
from ggda.gradients import group_gradients, per_sample_gradients

__all__ = [
    "AttributionResult",
    "AttributionTask",
    "Attributor",
    "Checkpoint",
    "GradientAttributor",
    "QueryProperty",
    "TracIn",
    "group_gradients",
    "per_sample_gradients",
]
