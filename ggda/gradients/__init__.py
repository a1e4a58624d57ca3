"""Gradients of sums of per-example functions, per group, per layer and projected.

Imports only torch, :mod:`ggda.errors` and its own modules, so every other package
(attribution methods, grouping features) can use it without import cycles.
"""

from ggda.gradients.group import (
    BACKENDS,
    Fn,
    group_gradients,
    iter_group_gradients,
    linear_layers,
    num_params,
    per_sample_gradients,
    per_sample_inner_products,
    select_params,
)
from ggda.gradients.projection import PROJ_TYPES, RandomProjector

__all__ = [
    "BACKENDS",
    "PROJ_TYPES",
    "Fn",
    "RandomProjector",
    "group_gradients",
    "iter_group_gradients",
    "linear_layers",
    "num_params",
    "per_sample_gradients",
    "per_sample_inner_products",
    "select_params",
]
