"""Properties: the scalar functions of the trained model that we attribute.

A property has m rows. Row r is the sum (or mean) of the per-example measurement f over a
set S_r of evaluation examples, so its gradient is a *group gradient* of f over S_r and
comes from the same primitive as the training side. The default property is one row per
query test point; ``reduce: mean`` over the validation split is the pruning property;
``classes`` + ``reduce: mean`` is a class-mean property; ``indices: [..]`` an index list.

User functions (:class:`FunctionProperty`): any differentiable function of the model's
logits on a set of evaluation examples,

    fn(logits (N, C), y (N,)) -> (m,) values, oriented so that higher is better,

given in config as a ``_target_`` node with ``_partial_: true`` (extra keys become keyword
arguments) or as a dotted path. Its rows need not be sums over examples; their gradients
come from one reverse-mode Jacobian over the N examples
(:func:`ggda.attribution.loop.query_gradients`), and
retraining evaluations read their values from the logits (:meth:`FunctionProperty.values`).

Every property object offers ``split``, ``name``, ``measurement``, ``point_indices(bundle)``,
``examples(bundle) -> PropertyExamples`` and ``values(logits, bundle) -> (..., m)``.
"""

from __future__ import annotations

import functools
import importlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ggda.data.base import DataBundle
from ggda.errors import ConfigError, GGDAError, check_choice
from ggda.models.functional import MEASUREMENTS, measurement_fn

RowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SPLITS = ("test", "val", "train")
REDUCES = ("none", "mean")


@dataclass
class PropertyExamples:
    """The examples that define a property and how they group into its rows.

    Attributes:
        x: (N, *input_shape) inputs; y: (N,) labels.
        row_ids: (N,) long in [0, m): which property row each example belongs to.
        m: number of rows.
        weight: (m,) factor of each row (1 for sums, 1/|S_r| for means).
        measurement: ``loss`` or ``margin``: the per-example f of every row.
        fn: a user function ``(logits (N, C), y (N,)) -> (m,)`` over *all* N examples
            at once; when set it defines the rows and ``row_ids``/``weight`` are unused.
    """

    x: torch.Tensor
    y: torch.Tensor
    row_ids: torch.Tensor
    m: int
    weight: torch.Tensor
    measurement: str = "loss"
    fn: RowFn | None = None

    def rows(self, start: int, stop: int) -> PropertyExamples:
        """The property restricted to rows [start, stop) (query batches for large m)."""
        if (start, stop) == (0, self.m):
            return self
        if self.fn is not None:
            fn = self.fn

            def sub(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return fn(logits, y).reshape(-1)[start:stop]

            return PropertyExamples(
                self.x,
                self.y,
                self.row_ids,
                stop - start,
                self.weight[start:stop],
                self.measurement,
                sub,
            )
        keep = (self.row_ids >= start) & (self.row_ids < stop)
        return PropertyExamples(
            self.x[keep],
            self.y[keep],
            self.row_ids[keep] - start,
            stop - start,
            self.weight[start:stop],
            self.measurement,
        )

    def values(self, logits: torch.Tensor) -> torch.Tensor:
        """Row values from logits (N, C) on these examples: (m,)."""
        if self.fn is not None:
            return self.fn(logits, self.y.to(logits.device)).reshape(-1)
        f = measurement_fn(self.measurement)
        vals = f(logits, self.y.to(logits.device))
        out = vals.new_zeros(self.m).index_add_(0, self.row_ids.to(vals.device), vals)
        return out * self.weight.to(out)


class QueryProperty:
    """Measurement f over points of one split, per point or averaged.

    Args:
        split: ``test`` (default), ``val`` or ``train``.
        indices: ``queries`` (the data set's fixed query points, test split only), ``all``,
            or an explicit list of indices into the split.
        classes: restrict to points of these classes (``reduce: mean`` then gives one row
            per class when ``per_class`` is true).
        reduce: ``none`` (one row per point) or ``mean`` (one row for the whole set).
        per_class: with ``reduce: mean``, one row per class instead of one in total.
        measurement: ``loss`` (f = -cross-entropy) or ``margin``.
        name: label used in logs.
    """

    def __init__(
        self,
        split: str = "test",
        indices: str | list[int] = "queries",
        classes: list[int] | None = None,
        reduce: str = "none",
        per_class: bool = False,
        measurement: str = "loss",
        name: str = "test_points",
    ) -> None:
        self.split = check_choice("property.split", split, SPLITS)
        if isinstance(indices, str):
            check_choice("property.indices", indices, ("queries", "all"))
            if indices == "queries" and split != "test":
                raise ConfigError(
                    "property.indices",
                    indices,
                    "`all` or a list for a non-test split",
                    "The fixed query points live in the test split.",
                )
        self.indices = indices if isinstance(indices, str) else [int(i) for i in indices]
        self.classes = None if classes is None else [int(c) for c in classes]
        self.reduce = check_choice("property.reduce", reduce, REDUCES)
        self.per_class = bool(per_class)
        self.measurement = check_choice("property.measurement", measurement, MEASUREMENTS)
        self.name = name

    def point_indices(self, bundle: DataBundle) -> torch.Tensor:
        """(N,) indices into the split of the points this property uses."""
        _, y = bundle.split(self.split)
        if self.indices == "queries":
            idx = bundle.query_idx
        elif self.indices == "all":
            idx = torch.arange(y.shape[0])
        else:
            idx = torch.tensor(self.indices, dtype=torch.long)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= y.shape[0]:
                raise ConfigError("property.indices", self.indices, f"indices in [0, {y.shape[0]})")
        if self.classes is not None:
            idx = idx[torch.isin(y[idx], torch.tensor(self.classes))]
            if idx.numel() == 0:
                raise ConfigError("property.classes", self.classes, "classes present in the split")
        return idx

    def examples(self, bundle: DataBundle) -> PropertyExamples:
        """The examples that define this property and the property row of each.

        Args:
            bundle: the data; the examples come from its ``self.split`` split.

        Returns:
            The N examples of :meth:`point_indices` with their rows: one row per example
            (``reduce="none"``, weight 1), or with ``reduce="mean"`` one row per class
            present (``per_class``) or a single row, weighted 1/|S_r| (a mean).
        """
        x, y = bundle.split(self.split)
        idx = self.point_indices(bundle)
        yi = y[idx]
        if self.reduce == "none":
            m = idx.numel()
            rows = torch.arange(m)
        elif self.per_class:
            classes, rows = torch.unique(yi, return_inverse=True)
            m = classes.numel()
        else:
            m = 1
            rows = torch.zeros(idx.numel(), dtype=torch.long)
        weight = 1.0 / torch.bincount(rows, minlength=m).double()
        if self.reduce == "none":
            weight = torch.ones(m, dtype=torch.double)
        return PropertyExamples(x[idx], yi, rows, m, weight, self.measurement)

    def values(self, logits: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
        """Property values from a model's logits on the whole split.

        Args:
            logits: (..., N_split, C) logits on every point of ``self.split``.
            bundle: the data the logits were computed on (labels and query indices).

        Returns:
            (..., m) property values.
        """
        _, y = bundle.split(self.split)
        idx = self.point_indices(bundle)
        ex = self.examples(bundle)
        f = measurement_fn(self.measurement)
        lg = logits[..., idx, :]
        yy = y[idx].to(lg.device).expand(lg.shape[:-1])
        vals = f(lg.reshape(-1, lg.shape[-1]), yy.reshape(-1)).reshape(lg.shape[:-1])
        out = vals.new_zeros(*vals.shape[:-1], ex.m)
        out = out.index_add_(-1, ex.row_ids.to(vals.device), vals)
        return out * ex.weight.to(out)


def _resolve(spec: Any) -> RowFn:
    """A callable from a dotted path, a ``_target_`` node (partial) or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        mod, _, attr = spec.rpartition(".")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError("property.fn", spec, "an importable dotted path to a function") from e
    if isinstance(spec, dict) and "_target_" in spec:
        kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
        base = _resolve(spec["_target_"])

        def bound(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return base(logits, y, **kwargs)

        return bound
    raise ConfigError("property.fn", spec, "a `_target_` node, a dotted path or a callable")


_CALLABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FunctionProperty(QueryProperty):
    """A user function of the model's outputs on a set of evaluation examples.

    The interface of the function (documented in the module docstring)::

        fn(logits: Tensor (N, C), y: Tensor (N,), **kwargs) -> Tensor (m,)

    differentiable in ``logits``, higher = better for the user. It receives the logits on
    the selected examples of ``split`` (``indices``, ``classes`` as for
    :class:`QueryProperty`) in a fixed order, all at once.

    Args:
        fn: ``{"_target_": "pkg.mod.func", **kwargs}`` (put ``_recursive_: false`` in the
            property config so Hydra hands the node over unbuilt and it stays hashable),
            a dotted path, or a callable (Python use).
        split, indices, classes, name: as for :class:`QueryProperty`.
        measurement: recorded for methods that only know per-example measurements.
    """

    def __init__(
        self,
        fn: Any,
        split: str = "val",
        indices: str | list[int] = "all",
        classes: list[int] | None = None,
        measurement: str = "loss",
        name: str = "function",
    ) -> None:
        super().__init__(split, indices, classes, "none", False, measurement, name)
        if isinstance(fn, functools.partial):  # a `_target_` node Hydra built already
            fn = {"_target_": f"{fn.func.__module__}.{fn.func.__qualname__}", **fn.keywords}
        # vars(self) must stay JSON (the pipeline hashes it into cache keys): the callable
        # lives outside the instance dict, self.fn is its description.
        _CALLABLES[self] = _resolve(fn)
        self.fn = fn if isinstance(fn, (str, dict)) else getattr(fn, "__qualname__", repr(fn))

    @property
    def _fn(self) -> RowFn:
        return _CALLABLES[self]

    def examples(self, bundle: DataBundle) -> PropertyExamples:
        """The examples of :meth:`point_indices`, with the user function defining the rows.

        Args:
            bundle: the data; the examples come from its ``self.split`` split.

        Returns:
            The N examples; ``fn`` maps their (N, C) logits and (N,) labels to the (m,)
            property values (m probed once on zero logits).

        Raises:
            GGDAError: the function does not return a 1-d float tensor.
        """
        x, y = bundle.split(self.split)
        idx = self.point_indices(bundle)
        xi, yi = x[idx], y[idx]
        probe = self._fn(torch.zeros(idx.numel(), bundle.num_classes), yi)
        if probe.ndim > 1 or not torch.is_floating_point(probe):
            raise GGDAError(
                f"property function {self.fn!r} must return a 1-d float tensor (m,), "
                f"got shape {tuple(probe.shape)} dtype {probe.dtype}"
            )
        m = max(1, probe.numel())
        return PropertyExamples(
            xi,
            yi,
            torch.zeros(idx.numel(), dtype=torch.long),
            m,
            torch.ones(m, dtype=torch.double),
            self.measurement,
            fn=self._fn,
        )

    def values(self, logits: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
        """(..., N_split, C) logits on the whole split -> (..., m) property values."""
        _, y = bundle.split(self.split)
        idx = self.point_indices(bundle)
        lg = logits[..., idx, :]
        lead = lg.shape[:-2]
        flat = lg.reshape(-1, *lg.shape[-2:])
        yy = y[idx].to(lg.device)
        out = torch.stack([self._fn(row, yy).reshape(-1) for row in flat])
        return out.reshape(*lead, out.shape[-1])


def mean_true_class_probability(
    logits: torch.Tensor, y: torch.Tensor, classes: list[int] | None = None
) -> torch.Tensor:
    """Example user function: mean softmax probability of the true class, (1,).

    With ``classes``, one row per listed class (mean over that class's examples; an
    absent class gives 0). A smooth stand-in for accuracy.
    """
    p = torch.softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
    if classes is None:
        return p.mean().reshape(1)
    rows = []
    for c in classes:
        sel = y == c
        rows.append(p[sel].mean() if bool(sel.any()) else p.sum() * 0)
    return torch.stack(rows)
