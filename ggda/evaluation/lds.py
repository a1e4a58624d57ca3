"""Linear datamodeling score (LDS), at point and at group level.

For M random subsets S of the training data, the retrained measurement f(theta*(S)) is
compared with the linear prediction sum_{i in S} a_i (point level, group scores broadcast
with ``share``) or sum_{j in S} tau_j (group level, S a union of whole groups). LDS is the
Spearman correlation across the M subsets, per query, then averaged over queries.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ggda.errors import check_choice, check_float, check_int
from ggda.evaluation.base import EvalContext, EvalResult, Evaluator, spearman_columns
from ggda.faults import maybe_fail
from ggda.io import stable_hash
from ggda.models.training import retrain_seeds

LEVELS = ("point", "group")


def random_subsets(n: int, size: int, count: int, seed: int) -> torch.Tensor:
    """(count, n) bool masks, each with exactly ``size`` True entries, seeded."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n, dtype=torch.bool)
    for s in range(count):
        masks[s, torch.randperm(n, generator=g)[:size]] = True
    return masks


def lds_from_predictions(pred: torch.Tensor, actual: torch.Tensor) -> np.ndarray:
    """Per-query Spearman across subsets: (S, m), (S, m) -> (m,), NaN where undefined."""
    return spearman_columns(pred.double().cpu().numpy(), actual.double().cpu().numpy())


SEED_MODES = ("per_subset", "shared")


def subset_seeds(seed: int, count: int, repeats: int, mode: str = "per_subset") -> torch.Tensor:
    """(count, R) retrain seeds of the LDS subsets.

    ``per_subset``: subset s, repeat r gets seed * 100003 + 50000 + s * R + r, so the
    training noise is independent across subsets (as in the datamodels setup) and differs
    from the ``shared`` seeds (for R < 50,000); ``shared``: every subset uses :func:`retrain_seeds`.
    Both are fixed by the evaluation seed alone (shared by every run through the cache).
    """
    check_choice("evaluation.lds.seed_mode", mode, SEED_MODES)
    if mode == "shared":
        return torch.tensor(retrain_seeds(seed, repeats), dtype=torch.int64).repeat(count, 1)
    base = seed * 100_003 + 50_000
    return base + torch.arange(count * repeats, dtype=torch.int64).reshape(count, repeats)


class LDS(Evaluator):
    """LDS evaluator.

    Args:
        levels: any of ``point``, ``group``.
        alpha: fraction of points (point level) or groups (group level) in each subset.
        num_subsets: M.
        repeats: R retrains per subset (seeds averaged).
        seed: seed of the subsets and of the retrains (independent of the run seed, so
            point-level retrains are shared by every method, grouping and k).
        broadcast: ``share`` or ``inherit`` for point level.
        seed_mode: ``per_subset`` (a distinct retrain seed per subset and repeat) or
            ``shared`` (the same R seeds for every subset); see :func:`subset_seeds`.

    The retrains of each level live in an LDS store (masks, seeds, logits, manifest; see
    :mod:`ggda.evaluation.lds_store`), where the evaluator also records the measurements
    it compared with; its ``store`` table names the store of each level, for
    ``python -m ggda.lds export``.
    """

    name = "lds"

    def __init__(
        self,
        levels: list[str] | tuple[str, ...] = LEVELS,
        alpha: float = 0.5,
        num_subsets: int = 50,
        repeats: int = 1,
        seed: int = 0,
        broadcast: str = "share",
        seed_mode: str = "per_subset",
    ) -> None:
        self.levels = [check_choice("evaluation.lds.levels[]", lv, LEVELS) for lv in levels]
        self.alpha = check_float(
            "evaluation.lds.alpha", alpha, 0.0, 1.0, lo_open=True, hi_open=True
        )
        self.num_subsets = check_int("evaluation.lds.num_subsets", num_subsets, 3)
        self.repeats = check_int("evaluation.lds.repeats", repeats, 1)
        self.seed = int(seed)
        self.broadcast = check_choice("evaluation.lds.broadcast", broadcast, ("share", "inherit"))
        self.seed_mode = check_choice("evaluation.lds.seed_mode", seed_mode, SEED_MODES)

    def subsets(self, ctx: EvalContext, level: str) -> torch.Tensor:
        """(M, n) bool training masks for the given level."""
        n, k = ctx.grouping.n, ctx.grouping.k
        if level == "point":
            return random_subsets(n, max(1, round(self.alpha * n)), self.num_subsets, self.seed)
        gm = random_subsets(k, max(1, round(self.alpha * k)), self.num_subsets, self.seed + 1)
        return gm[:, ctx.grouping.group_ids]

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        res = EvalResult()
        scores = ctx.scores.double().cpu()
        per_query: dict[str, np.ndarray] = {}
        stores: list[dict] = []
        for level in self.levels:
            if level == "group" and ctx.grouping.k < 3:
                continue  # fewer than 3 distinct subsets: a rank correlation is meaningless
            masks = self.subsets(ctx, level)
            seeds = subset_seeds(self.seed, self.num_subsets, self.repeats, self.seed_mode)
            sampler = {
                "alpha": self.alpha,
                "num_subsets": self.num_subsets,
                "repeats": self.repeats,
                "seed": self.seed,
                "seed_mode": self.seed_mode,
                "groups": ctx.grouping.k if level == "group" else None,
            }
            # a plain Retrainer (the protocol) keeps no store; RetrainService does
            make_store = getattr(ctx.retrain, "store", None)
            store = make_store(level, masks, seeds, sampler) if make_store else None
            kw = {"store": store} if store is not None else {}
            logits = ctx.retrain.run(masks, seeds, desc=f"LDS {level}-level retrains", **kw)
            actual = ctx.prop.values(logits[ctx.prop.split].double(), ctx.bundle).mean(1)
            if store is not None:
                info = measurement_info(ctx)
                mkey = stable_hash(info)
                store.record_measurement(mkey, actual, info)
                stores.append(
                    {"level": level, "store": str(store.path), "measurement": mkey}
                    | {"broadcast": self.broadcast}
                )
            point_scores = ctx.grouping.broadcast(scores, self.broadcast)
            pred = masks.double() @ point_scores  # (M, m)
            corr = lds_from_predictions(pred, actual)
            per_query[level] = corr
            maybe_fail(f"lds_{level}")
            finite = corr[np.isfinite(corr)]
            res.metrics.update(
                {
                    f"{level}/mean": float(finite.mean()) if finite.size else float("nan"),
                    f"{level}/std": float(finite.std()) if finite.size else float("nan"),
                    f"{level}/nan_count": int(np.isnan(corr).sum()),
                    f"{level}/num_subsets": self.num_subsets,
                }
            )
        if per_query:
            res.tables["per_query"] = pd.DataFrame(
                {"query": np.arange(len(next(iter(per_query.values()))))}
                | {f"lds_{lv}": v for lv, v in per_query.items()}
            )
            res.figures["per_query_hist"] = _hist(per_query)
            res.tables["store"] = pd.DataFrame(stores)
        return res


def measurement_info(ctx: EvalContext) -> dict:
    """What the LDS measures on each retrain: the property's settings and its points."""
    prop = ctx.prop
    info = {k: _plain(v) for k, v in sorted(vars(prop).items()) if not k.startswith("_")}
    return {
        "property": info,
        "split": prop.split,
        "point_indices": prop.point_indices(ctx.bundle).tolist(),
    }


def _hist(per_query: dict[str, np.ndarray]):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for level, v in per_query.items():
        v = v[np.isfinite(v)]
        ax.hist(
            v,
            bins=20,
            range=(-1, 1),
            alpha=0.6,
            label=f"{level} (mean {v.mean():.3f})" if v.size else level,
        )
    ax.set_xlabel("per-query LDS (Spearman)")
    ax.set_ylabel("queries")
    ax.set_title("LDS per query")
    ax.legend()
    fig.tight_layout()
    return fig


def _plain(v):
    """A JSON-able, run-independent description of a property setting."""
    if isinstance(v, (str, int, float, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if callable(v):
        return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"
    return type(v).__name__
