"""LDS on a problem whose true linear datamodel is known.

The "retrained" measurement of a training subset S is exactly additive,
f_q(S) = sum_{i in S} a_iq + sigma * eps (eps ~ N(0, 1), fresh per subset and seed), so the
true attribution is a and the best achievable LDS is fixed by the noise level. The
evaluator (subset draws, group-to-point broadcast, linear prediction, Spearman per query)
must give the exact scores an LDS near that ceiling, and wrong scores a low one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from factory import tiny_bundle
from ggda.evaluation.base import EvalContext
from ggda.evaluation.lds import LDS
from ggda.grouping.base import Grouping

N, M_QUERIES, ALPHA = 60, 6, 0.5


class AdditiveRetrainer:
    """Stands in for the retrain service: 'test' logits (S, R, m, 1) = mask @ a + noise."""

    def __init__(self, a: torch.Tensor, sigma: float, seed: int = 0) -> None:
        self.a, self.sigma, self.seed = a, sigma, seed
        self.stats = {"retrains_run": 0}

    def run(self, masks: torch.Tensor, seeds: list[int], desc: str = "") -> dict:
        g = torch.Generator().manual_seed(self.seed)
        clean = masks.double() @ self.a  # (S, m)
        noise = torch.randn(masks.shape[0], len(seeds), self.a.shape[1], generator=g)
        self.stats["retrains_run"] += masks.shape[0] * len(seeds)
        return {"test": (clean[:, None, :] + self.sigma * noise.double())[..., None]}


class FirstLogit:
    """A property whose value is the (only) logit of each query row: (S, R, m, 1) -> (S, R, m)."""

    split = "test"

    def values(self, logits: torch.Tensor, bundle) -> torch.Tensor:
        return logits[..., 0]


def _problem(sigma_rel: float):
    """True scores a (n, m) and the noise level giving Pearson rho = 1 / sqrt(1 + sigma_rel^2)."""
    a = torch.randn(N, M_QUERIES, generator=torch.Generator().manual_seed(1)).double()
    # Var of sum_{i in S} a_iq over random subsets of size alpha n (finite population)
    size = round(ALPHA * N)
    var = size * (1 - size / N) * N / (N - 1) * a.var(0, unbiased=False).mean()
    return a, sigma_rel * math.sqrt(float(var))


def _lds(scores, grouping, retrainer, levels=("point",)):
    ctx = EvalContext(tiny_bundle(n=N), grouping, scores, FirstLogit(), retrainer)
    return LDS(levels=list(levels), alpha=ALPHA, num_subsets=60, seed=3).evaluate(ctx).metrics


def _floor(rho: float, slack: float = 0.06) -> float:
    """Gaussian Spearman of a Pearson-rho pair, (6 / pi) asin(rho / 2), minus sampling slack."""
    return 6 / math.pi * math.asin(rho / 2) - slack


@pytest.mark.parametrize("sigma_rel", [0.0, 0.3, 0.6])
def test_exact_scores_reach_the_floor_and_wrong_ones_do_not(sigma_rel):
    a, sigma = _problem(sigma_rel)
    svc = AdditiveRetrainer(a, sigma)
    single = Grouping(torch.arange(N), N)
    rho = 1 / math.sqrt(1 + sigma_rel**2)
    exact = _lds(a, single, svc)["point/mean"]
    assert exact >= _floor(rho), (exact, _floor(rho))
    if sigma_rel == 0:
        assert exact == pytest.approx(1.0)  # noiseless additive truth: perfect ranks
    flipped = _lds(-a, single, svc)["point/mean"]
    assert flipped <= -_floor(rho)  # the sign convention matters
    shuffled = a[torch.randperm(N, generator=torch.Generator().manual_seed(7))]
    assert abs(_lds(shuffled, single, svc)["point/mean"]) < 0.35  # wrong point, chance level
    noise = torch.randn(N, M_QUERIES, generator=torch.Generator().manual_seed(8)).double()
    assert _lds(a + 3 * a.std() * noise, single, svc)["point/mean"] < exact - 0.2


def test_group_sums_of_true_scores_are_exact_at_group_level():
    """Group LDS: subsets are unions of groups, so tau_j = sum_{i in G_j} a_i is the truth."""
    a, _ = _problem(0.0)
    g = Grouping(torch.arange(N) % 10, 10)
    m = _lds(g.aggregate(a), g, AdditiveRetrainer(a, 0.0), levels=("group",))
    assert m["group/mean"] == pytest.approx(1.0)
    assert m["group/nan_count"] == 0


def test_coarse_groups_lose_point_level_fidelity():
    """Broadcasting group sums back to points (share) loses within-group detail."""
    a, _ = _problem(0.0)
    svc = AdditiveRetrainer(a, 0.0)
    by_k = {}
    for k in (60, 20, 3):
        g = Grouping(torch.arange(N) % k, k)
        by_k[k] = _lds(g.aggregate(a), g, svc)["point/mean"]
    assert by_k[60] == pytest.approx(1.0)
    assert by_k[60] > by_k[20] > by_k[3], by_k
    assert np.isfinite(list(by_k.values())).all()
