"""Noisy-label detection by ranking groups.

The data set flips a seeded fraction r of the training labels (``dataset.label_noise``,
mask in ``bundle.noise_mask``). Groups are ranked by a suspicion value and inspected in
that order:

- ``score: self``: self-attribution tau_jj (the method applied with the group's own summed
  loss as the query, e.g. TracIn's sum_t eta_t ||grad L_{G_j}(theta_t)||^2); high first.
- ``score: val_loss``: attribution to the mean validation loss; most harmful (lowest) first.

Reported: the fraction of flipped points found after inspecting 5, 10, 20, 30% of the
training points (recall at a budget), and the ROC-AUC of the point ranking in which every
member inherits its group's value (``Grouping.broadcast(.., "inherit")``).
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from ggda.errors import ConfigError, GGDAError, check_choice, check_float
from ggda.evaluation.base import EvalContext, EvalResult, Evaluator
from ggda.evaluation.pruning import property_group_scores, rank_scores, val_loss_property
from ggda.grouping.base import Grouping
from ggda.models.functional import MEASUREMENTS

SCORES = ("self", "val_loss")
DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3)
RANK_BY = ("auto", "sum", "mean", "mean2")


def normalise(scores: torch.Tensor, sizes: torch.Tensor, rank_by: str) -> torch.Tensor:
    """Group value used for ranking.

    tau_j (``sum``), tau_j / |G_j| (``mean``) or tau_j / |G_j|^2 (``mean2``).

    Self-influence is quadratic in the group: for TracIn tau_jj = sum_t eta_t ||grad L_G||^2,
    which grows like |G|^2 for a coherent group, so ``mean2`` is the self-influence of the
    group's *mean* loss, sum_t eta_t ||mean_{i in G} grad l_i||^2, comparable across sizes.
    Attribution to the validation loss is linear in the group: use ``sum`` or ``mean``.
    """
    if rank_by == "mean2":
        return scores.double() / sizes.double() ** 2
    return rank_scores(scores, sizes, rank_by)


def roc_auc(labels: torch.Tensor | np.ndarray, values: torch.Tensor | np.ndarray) -> float:
    """ROC-AUC of ``values`` (higher = more suspicious) for binary ``labels`` (n,).

    Mann-Whitney form with average ranks, so tied values count one half:
    AUC = (sum of positive ranks - P(P+1)/2) / (P N).
    """
    y = np.asarray(labels, dtype=bool).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise GGDAError("ROC-AUC needs both flipped and clean training points")
    ranks = rankdata(v)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def inspection_curve(
    grouping: Grouping, noise_mask: torch.Tensor, order: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative points inspected and flipped points found, group by group.

    Args:
        grouping: the partition (n points, k groups).
        noise_mask: (n,) bool, True where the label was flipped.
        order: (k,) group indices in inspection order.

    Returns:
        (inspected (k+1,), found (k+1,)), both starting at 0.
    """
    sizes = grouping.sizes()[order].double()
    flips = torch.bincount(grouping.group_ids, weights=noise_mask.double(), minlength=grouping.k)[
        order
    ]
    zero = torch.zeros(1, dtype=torch.float64)
    return (
        torch.cat([zero, torch.cumsum(sizes, 0)]).numpy(),
        torch.cat([zero, torch.cumsum(flips, 0)]).numpy(),
    )


def recall_at(
    grouping: Grouping, noise_mask: torch.Tensor, order: torch.Tensor, fraction: float
) -> float:
    """Fraction of flipped points found after inspecting ``fraction * n`` points.

    Groups are inspected whole in ``order``; the group that straddles the budget is
    inspected in part, counting the expected number of flips found when its members are
    looked at in random order (its flip rate times the points inspected in it). The
    budget is therefore exact for every k, and the value is the piecewise-linear recall
    curve evaluated at the budget.
    """
    total = float(noise_mask.sum())
    if total == 0:
        raise GGDAError("recall needs at least one flipped label")
    inspected, found = inspection_curve(grouping, noise_mask, order)
    return float(np.interp(fraction * grouping.n, inspected, found)) / total


class NoisyLabels(Evaluator):
    """Noisy-label detection evaluator.

    Args:
        score: ``self`` (self-attribution, default) or ``val_loss``.
        fractions: fractions of the training set inspected, each in (0, 1].
        rank_by: ``sum`` (the group's score), ``mean`` (score / |G_j|), ``mean2``
            (score / |G_j|^2; see :func:`normalise`) or ``auto`` (default: ``mean2`` for
            self-attribution, which is quadratic in the group, ``mean`` for ``val_loss``,
            which is linear). All agree for singleton groups.
        measurement: measurement of the validation property for ``score: val_loss``.
    """

    name = "noisy_labels"

    def __init__(
        self,
        score: str = "self",
        fractions: list[float] | tuple[float, ...] = DEFAULT_FRACTIONS,
        rank_by: str = "auto",
        measurement: str = "loss",
    ) -> None:
        self.score = check_choice("evaluation.noisy_labels.score", score, SCORES)
        if isinstance(fractions, (int, float)) or not len(fractions):
            raise ConfigError(
                "evaluation.noisy_labels.fractions",
                fractions,
                "a non-empty list of numbers in (0, 1]",
            )
        self.fractions = sorted(
            {
                check_float("evaluation.noisy_labels.fractions[]", f, 0.0, 1.0, lo_open=True)
                for f in fractions
            }
        )
        self.rank_by = check_choice("evaluation.noisy_labels.rank_by", rank_by, RANK_BY)
        if self.rank_by == "auto":
            self.rank_by = "mean2" if self.score == "self" else "mean"
        self.measurement = check_choice(
            "evaluation.noisy_labels.measurement", measurement, MEASUREMENTS
        )

    def suspicion(self, ctx: EvalContext) -> tuple[torch.Tensor, float]:
        """(k,) value per group, higher = inspect earlier; and the seconds it took."""
        g = ctx.grouping
        if self.score == "val_loss":
            scores, secs = property_group_scores(ctx, val_loss_property(self.measurement))
            return -normalise(scores, g.sizes(), self.rank_by), secs
        if ctx.attributor is None or ctx.task is None:
            raise GGDAError(
                "self-attribution needs the run's method and attribution task "
                "(EvalContext.attributor and .task)"
            )
        t0 = time.perf_counter()
        res = ctx.attributor.self_attribute(ctx.task)
        secs = time.perf_counter() - t0
        scores = res.scores.detach().double().cpu().reshape(-1)
        if scores.shape != (g.k,):
            raise GGDAError(f"self-attribution must return ({g.k}, 1) scores")
        if not torch.isfinite(scores).all():
            raise GGDAError("self-attribution produced NaN/infinite scores")
        return normalise(scores, g.sizes(), self.rank_by), secs

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Recall at each inspection budget and the ROC-AUC of the point ranking."""
        b, g = ctx.bundle, ctx.grouping
        mask = b.noise_mask
        if mask is None or not bool(mask.any()):
            raise ConfigError(
                "dataset.label_noise",
                float(mask.float().mean()) if mask is not None else 0.0,
                "a fraction in (0, 1) for `evaluation=noisy_labels`",
                "The training labels have no flipped labels to detect: set "
                "`dataset.label_noise=0.1` (for example).",
            )
        mask = mask.bool().cpu()
        value, secs = self.suspicion(ctx)
        point = g.broadcast(value[:, None], "inherit")[:, 0]
        order = torch.sort(-value, stable=True).indices
        res = EvalResult()
        res.metrics["auc"] = roc_auc(mask, point)
        rows = []
        for f in self.fractions:
            r = recall_at(g, mask, order, f)
            res.metrics[f"recall/{f:g}"] = r
            rows.append(
                {
                    "fraction_inspected": f,
                    "points_inspected": f * g.n,
                    "flipped_found": r * float(mask.sum()),
                    "recall": r,
                    "random_recall": f,
                    "oracle_recall": min(1.0, f * g.n / float(mask.sum())),
                }
            )
        res.metrics["recall/mean"] = float(np.mean([row["recall"] for row in rows]))
        res.metrics["num_flipped"] = int(mask.sum())
        res.metrics["noise_rate"] = float(mask.double().mean())
        res.metrics["score_seconds"] = secs
        res.tables["recall"] = pd.DataFrame(rows)
        inspected, found = inspection_curve(g, mask, order)
        res.tables["curve"] = pd.DataFrame(
            {"fraction_inspected": inspected / g.n, "recall": found / float(mask.sum())}
        )
        res.figures["recall_curve"] = recall_figure(
            inspected / g.n,
            found / float(mask.sum()),
            float(mask.double().mean()),
            self,
            g.k,
            res.metrics["auc"],
        )
        return res


def recall_figure(x: np.ndarray, y: np.ndarray, rate: float, ev: NoisyLabels, k: int, auc: float):
    """Recall of flipped labels against the fraction of the training set inspected."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(x, y, color="C3", label=f"{ev.score} ranking, k={k} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="C0", ls=":", label="random inspection")
    ax.plot([0, rate, 1], [0, 1, 1], color="k", ls="--", lw=1, label="oracle")
    ax.scatter(ev.fractions, np.interp(ev.fractions, x, y), color="C3", zorder=3)
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("noisy-label detection")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
