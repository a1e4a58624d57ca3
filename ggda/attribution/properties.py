"""Properties: the scalar functions of the trained model that we attribute (design §2).

A property has m rows. Row r is the sum (or mean) of the per-example measurement f over a
set S_r of evaluation examples, so its gradient is a *group gradient* of f over S_r and
comes from the same primitive as the training side. The default property is one row per
query test point; ``reduce: mean`` over the validation split is the pruning property.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ggda.data.base import DataBundle
from ggda.errors import ConfigError, check_choice
from ggda.models.functional import MEASUREMENTS, measurement_fn

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
    """

    x: torch.Tensor
    y: torch.Tensor
    row_ids: torch.Tensor
    m: int
    weight: torch.Tensor
    measurement: str = "loss"


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
