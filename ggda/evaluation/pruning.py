"""Dataset pruning guided by group attributions to the validation loss.

The property is f = -(mean cross-entropy on the validation split), so a group with a
negative score tau_j raises the validation loss: it is *harmful*. Groups are removed in
score order until at least a fraction rho of the n training points is gone (whole groups,
so the budget overshoots; the exact number removed is recorded), the model is retrained on
the complement with R seeds through the shared retrain service, and test accuracy is
reported per fraction for three orders:

- ``harmful``: lowest score first (should keep or raise accuracy),
- ``helpful``: highest score first (sanity check: should hurt most),
- ``random``: a seeded random order of the groups with the same budget rule (baseline),

beside the no-removal baseline (the full training set, same recipe and seeds). The
per-sample comparison (k = n) is the same evaluation run with ``grouping=singleton``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError, GGDAError, check_choice, check_float, check_int
from ggda.evaluation.base import EvalContext, EvalResult, Evaluator
from ggda.evaluation.lds import retrain_seeds
from ggda.grouping.base import Grouping
from ggda.models.functional import MEASUREMENTS

log = logging.getLogger(__name__)

ORDERS = ("harmful", "helpful", "random")
RANK_BY = ("sum", "mean")
DEFAULT_FRACTIONS = (0.1, 0.2, 0.3, 0.5)


def val_loss_property(measurement: str = "loss") -> QueryProperty:
    """One property row: the mean measurement over the whole validation split."""
    return QueryProperty(
        split="val", indices="all", reduce="mean", measurement=measurement, name="val_loss"
    )


def _same_property(a: QueryProperty, b: QueryProperty) -> bool:
    keys = ("split", "indices", "classes", "reduce", "per_class", "measurement")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def property_group_scores(ctx: EvalContext, prop: QueryProperty) -> tuple[torch.Tensor, float]:
    """Sum-aggregated group scores (k,) for a one-row property, and the seconds spent.

    Reuses the run's scores when the run already attributed this very property (for
    example ``property=val_loss``); otherwise attributes it with the run's method on the
    run's checkpoints and grouping.
    """
    if _same_property(ctx.prop, prop) and ctx.scores.shape[1] == 1:
        return ctx.scores[:, 0].detach().double().cpu(), 0.0
    if ctx.attributor is None or ctx.task is None:
        raise GGDAError(
            "this evaluation attributes the validation loss itself and needs the run's "
            "method and attribution task (EvalContext.attributor and .task)"
        )
    t0 = time.perf_counter()
    task = dataclasses.replace(ctx.task, queries=prop.examples(ctx.bundle))
    res = ctx.attributor.attribute(task)
    scores = res.scores.detach().double().cpu()
    if scores.shape != (ctx.grouping.k, 1):
        raise GGDAError(
            f"expected scores of shape ({ctx.grouping.k}, 1), got {tuple(scores.shape)}"
        )
    return scores[:, 0], time.perf_counter() - t0


def rank_scores(scores: torch.Tensor, sizes: torch.Tensor, rank_by: str) -> torch.Tensor:
    """The value groups are ordered by: (k,) sums, or per-member means (``tau_j / |G_j|``).

    ``mean`` is the greedy choice for a budget counted in points (score per point removed);
    ``sum`` orders by the whole group's predicted effect. They agree for equal-size groups.
    """
    scores = scores.double()
    return scores / sizes.double() if rank_by == "mean" else scores


def removal_order(
    value: torch.Tensor, order: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(k,) group indices in removal order.

    Ascending value (``harmful``), descending (``helpful``) or a seeded permutation
    (``random``). Ties keep index order (stable).
    """
    check_choice("evaluation.pruning.orders[]", order, ORDERS)
    if order == "random":
        return torch.randperm(value.numel(), generator=generator)
    key = value if order == "harmful" else -value
    return torch.sort(key, stable=True).indices


def removal_mask(grouping: Grouping, order: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
    """Remove the shortest prefix of ``order`` holding at least ``budget`` points.

    Returns:
        (keep mask (n,) bool, number of groups removed).
    """
    sizes = grouping.sizes()[order]
    cum = torch.cumsum(sizes, 0)
    count = int(torch.searchsorted(cum, torch.tensor([budget]), right=False)[0]) + 1
    count = min(count, grouping.k)
    removed = torch.zeros(grouping.k, dtype=torch.bool)
    removed[order[:count]] = True
    return ~removed[grouping.group_ids], count


class Pruning(Evaluator):
    """Dataset-pruning evaluator.

    Args:
        fractions: target fractions of training points to remove, each in (0, 1).
        orders: any of ``harmful``, ``helpful``, ``random``.
        repeats: R retrains (seeds) per pruned training set.
        random_draws: independent random group orders for the ``random`` baseline.
        rank_by: ``mean`` (score per member; default) or ``sum`` (group total).
        measurement: measurement of the validation property (``loss`` or ``margin``).
        seed: seed of the random orders and of the retrains (shared with every run that
            asks for the same subsets, so retrains are reused from the cache).
    """

    name = "pruning"

    def __init__(
        self,
        fractions: list[float] | tuple[float, ...] = DEFAULT_FRACTIONS,
        orders: list[str] | tuple[str, ...] = ORDERS,
        repeats: int = 2,
        random_draws: int = 1,
        rank_by: str = "mean",
        measurement: str = "loss",
        seed: int = 0,
    ) -> None:
        if isinstance(fractions, (int, float)) or not len(fractions):
            raise ConfigError(
                "evaluation.pruning.fractions", fractions, "a non-empty list of numbers in (0, 1)"
            )
        self.fractions = sorted(
            {
                check_float(
                    "evaluation.pruning.fractions[]", f, 0.0, 1.0, lo_open=True, hi_open=True
                )
                for f in fractions
            }
        )
        if isinstance(orders, str) or not len(orders):
            raise ConfigError(
                "evaluation.pruning.orders", orders, "a non-empty list of " + ", ".join(ORDERS)
            )
        self.orders = [check_choice("evaluation.pruning.orders[]", o, ORDERS) for o in orders]
        self.repeats = check_int("evaluation.pruning.repeats", repeats, 1)
        self.random_draws = check_int("evaluation.pruning.random_draws", random_draws, 1)
        self.rank_by = check_choice("evaluation.pruning.rank_by", rank_by, RANK_BY)
        self.measurement = check_choice("evaluation.pruning.measurement", measurement, MEASUREMENTS)
        self.seed = check_int("evaluation.pruning.seed", seed, 0)

    def plan(
        self, grouping: Grouping, scores: torch.Tensor
    ) -> tuple[torch.Tensor, list[dict[str, float | int | str]], list[str]]:
        """The training sets to retrain on.

        Args:
            grouping: the partition.
            scores: (k,) sum-aggregated group scores for the validation property.

        Returns:
            (keep masks (S, n) bool, one row of bookkeeping per mask, skipped
            ``order/fraction`` pairs whose budget would remove every group). Row 0 is the
            full set.
        """
        n = grouping.n
        value = rank_scores(scores, grouping.sizes(), self.rank_by)
        masks = [torch.ones(n, dtype=torch.bool)]
        rows: list[dict[str, float | int | str]] = [
            {"order": "none", "draw": 0, "target_fraction": 0.0, "groups_removed": 0}
        ]
        g = torch.Generator().manual_seed(self.seed + 31337)
        skipped: list[str] = []
        for order in self.orders:
            draws = self.random_draws if order == "random" else 1
            for draw in range(draws):
                perm = removal_order(value, order, g)
                for frac in self.fractions:
                    budget = math.ceil(frac * n - 1e-9)  # "at least" the fraction
                    keep, count = removal_mask(grouping, perm, budget)
                    if not keep.any():
                        # Known only once k and the group sizes are: skip, keep the rest.
                        log.warning(
                            "pruning: removing %d of %d points (%s order, fraction %g) takes "
                            "every group (k=%d, largest group %d points); skipped",
                            budget,
                            n,
                            order,
                            frac,
                            grouping.k,
                            int(grouping.sizes().max()),
                        )
                        skipped.append(f"{order}/{frac:g}")
                        continue
                    masks.append(keep)
                    rows.append(
                        {
                            "order": order,
                            "draw": draw,
                            "target_fraction": frac,
                            "groups_removed": count,
                        }
                    )
        stacked = torch.stack(masks)
        for row, keep in zip(rows, stacked, strict=True):
            removed = n - int(keep.sum())
            row["points_removed"] = removed
            row["fraction_removed"] = removed / n
        return stacked, rows, skipped

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Test accuracy after removing groups in each order, per removed fraction."""
        res = EvalResult()
        b = ctx.bundle
        scores, secs = property_group_scores(ctx, val_loss_property(self.measurement))
        masks, rows, skipped = self.plan(ctx.grouping, scores)
        # Identical training sets (e.g. random draws that coincide) are retrained once.
        uniq, inverse = torch.unique(masks, dim=0, return_inverse=True)
        logits = ctx.retrain.run(
            uniq, retrain_seeds(self.seed, self.repeats), desc="pruning retrains"
        )
        test = logits["test"][inverse].float()  # (S, R, N_test, C)
        val = logits["val"][inverse].float()
        acc = (test.argmax(-1) == b.y_test).double().mean(-1)  # (S, R)
        yv = b.y_val.expand(val.shape[:-1])
        vloss = F.cross_entropy(val.reshape(-1, val.shape[-1]), yv.reshape(-1), reduction="none")
        vloss = vloss.reshape(val.shape[:-1]).double().mean(-1)  # (S, R)
        df = pd.DataFrame(rows)
        df["acc"] = list(acc.numpy())
        df["val_loss"] = list(vloss.numpy())
        table = self._summarise(df)
        res.tables["curve"] = table
        res.metrics.update(self._metrics(table))
        res.metrics["attribution_seconds"] = secs
        res.metrics["skipped"] = len(skipped)
        res.metrics["rank_by_mean"] = float(self.rank_by == "mean")
        res.figures["curve"] = curve_figure(table, ctx.grouping.k, ctx.grouping.n)
        return res

    @staticmethod
    def _summarise(df: pd.DataFrame) -> pd.DataFrame:
        """One row per (order, target fraction): mean/std over seeds (and random draws)."""
        out = []
        for (order, frac), grp in df.groupby(["order", "target_fraction"], sort=False):
            acc = np.concatenate(grp["acc"].to_list())
            vl = np.concatenate(grp["val_loss"].to_list())
            out.append(
                {
                    "order": order,
                    "target_fraction": frac,
                    "groups_removed": float(grp["groups_removed"].mean()),
                    "points_removed": float(grp["points_removed"].mean()),
                    "fraction_removed": float(grp["fraction_removed"].mean()),
                    "test_acc_mean": float(acc.mean()),
                    "test_acc_std": float(acc.std()),
                    "val_loss_mean": float(vl.mean()),
                    "runs": int(acc.size),
                }
            )
        return pd.DataFrame(out)

    def _metrics(self, table: pd.DataFrame) -> dict[str, float]:
        m: dict[str, float] = {}
        full = table[table.order == "none"].iloc[0]
        m["full/acc_mean"] = full.test_acc_mean
        m["full/acc_std"] = full.test_acc_std
        for row in table[table.order != "none"].itertuples():
            key = f"{row.order}/{row.target_fraction:g}"
            m[f"{key}/acc_mean"] = row.test_acc_mean
            m[f"{key}/acc_std"] = row.test_acc_std
            m[f"{key}/points_removed"] = row.points_removed
            m[f"{key}/groups_removed"] = row.groups_removed
        # One number per order for sweeps: mean accuracy change vs random removal.
        if "random" in self.orders:
            rnd = table[table.order == "random"].set_index("target_fraction").test_acc_mean
            for order in ("harmful", "helpful"):
                if order in self.orders:
                    o = table[table.order == order].set_index("target_fraction").test_acc_mean
                    m[f"{order}_vs_random/mean"] = float((o - rnd).mean())
        return m


CURVE_COLORS = {"harmful": "C2", "helpful": "C3", "random": "C0"}
CURVE_NAMES = {"harmful": "harmful first", "helpful": "helpful first", "random": "random groups"}


def draw_curve(ax, table: pd.DataFrame) -> None:
    """Accuracy vs fraction removed on ``ax``: the no-removal line and one line per order."""
    full = table[table.order == "none"].iloc[0]
    ax.axhline(full.test_acc_mean, color="k", ls="--", lw=1, label="no removal")
    for order, grp in table[table.order != "none"].groupby("order", sort=False):
        ax.errorbar(
            grp.fraction_removed,
            grp.test_acc_mean,
            yerr=grp.test_acc_std,
            marker="o",
            capsize=3,
            color=CURVE_COLORS.get(order),
            label=CURVE_NAMES.get(order, order),
        )


def curve_figure(table: pd.DataFrame, k: int, n: int):
    """Test accuracy against the fraction of training points removed, one line per order."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    draw_curve(ax, table)
    ax.set_xlabel("fraction of training points removed")
    ax.set_ylabel("test accuracy (retrained)")
    ax.set_title(f"pruning by attribution to validation loss (k={k}, n={n})")
    ax.legend()
    fig.tight_layout()
    return fig
