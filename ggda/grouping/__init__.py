"""Groupings of the training set: the partition and one file per strategy."""

from ggda.grouping.base import Grouper, Grouping, GroupingInputs, resolve_k
from ggda.grouping.classwise import ClassGrouper
from ggda.grouping.kmeans import KMeansGrouper
from ggda.grouping.random import RandomGrouper
from ggda.grouping.singleton import SingletonGrouper

__all__ = [
    "ClassGrouper",
    "Grouper",
    "Grouping",
    "GroupingInputs",
    "KMeansGrouper",
    "RandomGrouper",
    "SingletonGrouper",
    "resolve_k",
]
