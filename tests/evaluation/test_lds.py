"""LDS against hand-computed values, and the subset construction."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from factory import tiny_bundle, tiny_recipe
from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError
from ggda.evaluation.base import EvalContext, spearman_columns
from ggda.evaluation.lds import LDS, lds_from_predictions, random_subsets, subset_seeds
from ggda.evaluation.lds_store import LDSStore
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouping


def test_lds_hand_computed():
    # 4 subsets, 2 queries. Query 0: predictions in the same order as actual -> 1.
    # Query 1: ranks pred (1,2,3,4) vs actual (2,1,4,3): d = (1,1,1,1), rho = 1 - 6*4/(4*15) = 0.6
    pred = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    actual = torch.tensor([[0.1, 2.0], [0.2, 1.0], [0.3, 4.0], [0.9, 3.0]])
    assert np.allclose(lds_from_predictions(pred, actual), [1.0, 0.6])


def test_spearman_matches_scipy_with_ties_and_nan():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(20, 3)).astype(float)
    b = rng.normal(size=(20, 3))
    b[:, 2] = 1.0  # constant column -> undefined
    got = spearman_columns(a, b)
    for j in range(2):
        assert got[j] == pytest.approx(spearmanr(a[:, j], b[:, j]).statistic)
    assert np.isnan(got[2])


def test_random_subsets_exact_size_and_seeded():
    m = random_subsets(50, 20, 6, seed=3)
    assert m.shape == (6, 50) and (m.sum(1) == 20).all()
    assert torch.equal(m, random_subsets(50, 20, 6, seed=3))
    assert not torch.equal(m, random_subsets(50, 20, 6, seed=4))


class FakeRetrain:
    """Retrain stand-in: the 'retrained' measurement is exactly linear in the subset."""

    def __init__(self, bundle, true_point_scores, root):
        self.bundle = bundle
        self.a = true_point_scores  # (n, m) effect of each point on each query's -loss
        self.calls = []
        self.root = root

    def store(self, level, masks, seeds, sampler=None):
        c = self.bundle.num_classes
        shapes = {"val": (20, c), "test": (self.bundle.y_test.shape[0], c)}
        return LDSStore.open(self.root, "fake", level, masks, seeds, shapes, sampler)

    def run(self, masks, seeds, desc="", store=None):
        self.calls.append(masks.clone())
        seeds = torch.as_tensor(seeds)
        seeds = seeds[0] if seeds.ndim == 2 else seeds
        # Craft test logits whose -loss on the queries equals masks @ a (+ const).
        s, n_test, c = masks.shape[0], self.bundle.y_test.shape[0], self.bundle.num_classes
        target = masks.double() @ self.a - 5.0  # (S, m) = -loss, so loss = 5 - masks @ a
        logits = torch.zeros(s, len(seeds), n_test, c, dtype=torch.float64)
        q = self.bundle.query_idx
        y = self.bundle.y_test[q]
        # For 2 classes with logits (t, 0): -loss = -log(1 + e^{-t}); invert for t.
        t = -torch.log(torch.expm1(-target))
        logits[:, :, q, y] = t[:, None, :]
        out = {"val": logits[:, :, :20], "test": logits}
        if store is not None:
            store.write_rows({s: {k: v[s] for k, v in out.items()} for s in range(len(masks))})
        return out


def test_lds_is_one_when_scores_are_the_true_linear_model(tmp_path):
    b = tiny_bundle(n=30, c=2)
    b.y_test[:] = 0
    a = torch.rand(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    ids = torch.arange(30) % 6
    g = Grouping(ids, 6)
    ctx = EvalContext(b, g, g.aggregate(a), QueryProperty(), FakeRetrain(b, a, tmp_path))
    res = LDS(num_subsets=10, levels=["group"]).evaluate(ctx)
    # group subsets are unions of groups, so sum of group scores is exact
    assert res.metrics["group/mean"] == pytest.approx(1.0)
    # singleton grouping: point-level LDS with exact point scores is 1 as well
    g1 = Grouping(torch.arange(30), 30)
    ctx1 = EvalContext(b, g1, a, QueryProperty(), FakeRetrain(b, a, tmp_path))
    assert LDS(num_subsets=10, levels=["point"]).evaluate(ctx1).metrics["point/mean"] == (
        pytest.approx(1.0)
    )


def test_group_subsets_are_unions_of_groups():
    b = tiny_bundle(n=30)
    g = Grouping(torch.arange(30) % 5, 5)
    ctx = EvalContext(b, g, torch.zeros(5, 8), QueryProperty(), None)
    masks = LDS(num_subsets=7).subsets(ctx, "group")
    for mask in masks:
        for j in range(5):
            members = mask[g.group_ids == j]
            assert members.all() or (~members).all()
        assert int(mask.sum()) == round(0.5 * 5) * 6


def test_lds_with_real_retrains(tmp_path):
    b = tiny_bundle(n=40)
    svc = RetrainService(tmp_path, backend="sequential").bind(tiny_recipe(), b, "k")
    g = Grouping(torch.arange(40) % 4, 4)
    ctx = EvalContext(b, g, torch.randn(4, 8), QueryProperty(), svc)
    lds = LDS(num_subsets=5)
    res = lds.evaluate(ctx)
    # brute force: the same subsets and per-subset seeds (the default seed_mode) retrained
    # through the service, Spearman per query by scipy
    seeds = subset_seeds(lds.seed, lds.num_subsets, lds.repeats, lds.seed_mode)
    assert seeds.shape == (5, 1) and seeds.unique().numel() == 5
    for level in ("point", "group"):
        masks = lds.subsets(ctx, level)
        logits = svc.run(masks, seeds)
        actual = ctx.prop.values(logits[ctx.prop.split].double(), b).mean(1).numpy()  # (M, m)
        pred = (masks.double() @ g.broadcast(ctx.scores.double())).numpy()
        rho = [spearmanr(pred[:, q], actual[:, q])[0] for q in range(actual.shape[1])]
        assert res.metrics[f"{level}/mean"] == pytest.approx(np.nanmean(rho), abs=1e-12)
        assert res.metrics[f"{level}/nan_count"] == int(np.isnan(rho).sum())
    before = svc.stats["retrains_run"]
    LDS(num_subsets=5).evaluate(ctx)  # all cached now
    assert svc.stats["retrains_run"] == before


def test_lds_validation():
    with pytest.raises(ConfigError, match="evaluation.lds.alpha"):
        LDS(alpha=1.5)
    with pytest.raises(ConfigError, match="evaluation.lds.levels"):
        LDS(levels=["points"])
    with pytest.raises(ConfigError, match="evaluation.lds.num_subsets"):
        LDS(num_subsets=1)
    with pytest.raises(ConfigError, match="evaluation.lds.seed_mode"):
        LDS(seed_mode="each")
