"""Gradients of sums of per-example functions: per group, per layer, projected.

- :mod:`ggda.gradients.layers`: layer rules and :func:`capture_factors` (per-example
  factors of every supported layer from one batched forward/backward);
- :mod:`ggda.gradients.group`: group / per-sample gradients (``vmap``, ``loop``,
  ``factored`` backends), streamed chunk by chunk;
- :mod:`ggda.gradients.inner`: factorised inner products with query gradients;
- :mod:`ggda.gradients.projection`: dense and Kronecker random projections.

Imports only torch, :mod:`ggda.errors` and its own modules, so every other package
(attribution methods, grouping features) can use it without import cycles.
"""

from ggda.gradients.group import (
    BACKENDS,
    fallback_params,
    group_gradients,
    iter_group_gradients,
    iter_weighted_group_gradients,
    linear_layers,
    num_params,
    per_sample_gradients,
    select_params,
)
from ggda.gradients.inner import per_sample_inner_products
from ggda.gradients.layers import Fn, LayerFactors, capture_factors, split_params
from ggda.gradients.projection import (
    PROJ_STRUCTURES,
    PROJ_TYPES,
    KroneckerProjector,
    RandomProjector,
    make_projector,
)

__all__ = [
    "BACKENDS",
    "PROJ_STRUCTURES",
    "PROJ_TYPES",
    "Fn",
    "KroneckerProjector",
    "LayerFactors",
    "RandomProjector",
    "capture_factors",
    "fallback_params",
    "group_gradients",
    "iter_group_gradients",
    "iter_weighted_group_gradients",
    "linear_layers",
    "make_projector",
    "num_params",
    "per_sample_gradients",
    "per_sample_inner_products",
    "select_params",
    "split_params",
]
