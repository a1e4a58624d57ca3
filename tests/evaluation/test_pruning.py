"""Pruning: which groups are removed, what is retrained, what is reported."""

import math

import numpy as np
import pytest
import torch

from factory import tiny_bundle, tiny_recipe, tiny_task
from ggda.attribution.base import AttributionResult, Attributor
from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError
from ggda.evaluation.base import EvalContext
from ggda.evaluation.pruning import Pruning, removal_mask, removal_order, val_loss_property
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouping


class SpyRetrain:
    """Records the masks and seeds it is asked for; returns logits whose test accuracy is
    the fraction of the training set kept (so every mask maps to a known accuracy)."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.calls = []

    def run(self, masks, seeds, desc=""):
        self.calls.append((masks.clone(), list(seeds)))
        b = self.bundle
        s, r = masks.shape[0], len(seeds)
        n_test, c = b.y_test.shape[0], b.num_classes
        keep = masks.double().mean(1)  # (S,)
        correct = (torch.arange(n_test)[None, :] < (keep[:, None] * n_test).round()).double()
        y = b.y_test
        logits = torch.zeros(s, r, n_test, c)
        right = torch.nn.functional.one_hot(y, c).float()
        wrong = torch.nn.functional.one_hot((y + 1) % c, c).float()
        pick = correct[:, None, :, None].float()
        logits += pick * right + (1 - pick) * wrong
        val = torch.zeros(s, r, b.y_val.shape[0], c)
        return {"val": val, "test": logits}


class FixedScores(Attributor):
    """attribute() returns fixed (k, 1) scores and counts its calls."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def attribute(self, task):
        self.calls.append(task.queries)
        return AttributionResult(self.scores[:, None].clone())


def test_removal_order_and_prefix():
    value = torch.tensor([0.5, -2.0, 1.0, -2.0, 0.0])
    assert removal_order(value, "harmful").tolist() == [1, 3, 4, 0, 2]  # stable on ties
    assert removal_order(value, "helpful").tolist() == [2, 0, 4, 1, 3]
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(removal_order(value, "random", g1), removal_order(value, "random", g2))
    # groups of sizes 3, 1, 2 (ids below); remove in order 1, 2, 0 until >= budget
    g = Grouping(torch.tensor([0, 0, 2, 0, 1, 2]), 3)
    order = torch.tensor([1, 2, 0])
    keep, count = removal_mask(g, order, 1)
    assert count == 1 and keep.tolist() == [True, True, True, True, False, True]
    keep, count = removal_mask(g, order, 2)  # 1 point is not enough: take group 2 too
    assert count == 2 and keep.tolist() == [True, True, False, True, False, False]
    keep, count = removal_mask(g, order, 3)
    assert count == 2


def test_pruning_removes_exactly_the_configured_groups_and_retrains_the_complement():
    b = tiny_bundle(n=20)
    # 5 groups of sizes 2, 3, 4, 5, 6
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor([2, 3, 4, 5, 6]))
    g = Grouping(ids[torch.randperm(20, generator=torch.Generator().manual_seed(1))], 5)
    tau = torch.tensor([1.0, -3.0, 2.0, -1.0, 0.5], dtype=torch.float64)  # sums
    spy = SpyRetrain(b)
    att = FixedScores(tau)
    ctx = EvalContext(
        b, g, torch.zeros(5, 3), QueryProperty(), spy, att, tiny_task(g.group_ids, 5, n=20)
    )
    ev = Pruning(fractions=[0.1, 0.4], orders=["harmful", "helpful"], repeats=3, rank_by="sum")
    res = ev.evaluate(ctx)
    # it attributed the validation-loss property (one row over the whole val split)
    assert len(att.calls) == 1 and att.calls[0].m == 1
    assert att.calls[0].x.shape[0] == b.y_val.shape[0]
    ((masks, seeds),) = spy.calls
    assert len(seeds) == 3
    sizes = g.sizes()
    # expected removals: harmful order by sum = groups 1, 3, 4, 0, 2; helpful = 2, 0, 4, 3, 1
    expected = {
        ("harmful", 0.1): [1],  # 3 points >= 2
        ("harmful", 0.4): [1, 3],  # 3 + 5 = 8 >= 8
        ("helpful", 0.1): [2],  # 4 >= 2
        ("helpful", 0.4): [2, 0, 4],  # 4 + 2 = 6 < 8, + 6 = 12
    }
    wanted = [torch.ones(20, dtype=torch.bool)]
    for removed in expected.values():
        wanted.append(~torch.isin(g.group_ids, torch.tensor(removed)))
    got = {tuple(m.tolist()) for m in masks}
    assert got == {tuple(m.tolist()) for m in wanted}
    t = res.tables["curve"].set_index(["order", "target_fraction"])
    for (order, frac), removed in expected.items():
        row = t.loc[(order, frac)]
        assert row.groups_removed == len(removed)
        assert row.points_removed == int(sizes[removed].sum())
        assert row.points_removed >= math.ceil(frac * 20)
        # the spy's accuracy is the kept fraction (rounded to the 20 test points)
        assert row.test_acc_mean == pytest.approx(round((20 - row.points_removed) / 20 * 20) / 20)
        assert res.metrics[f"{order}/{frac:g}/points_removed"] == row.points_removed
    assert res.metrics["full/acc_mean"] == pytest.approx(1.0)
    assert "curve" in res.figures


def test_rank_by_mean_and_by_sum():
    b = tiny_bundle(n=10)
    g = Grouping(torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2]), 3)
    # sums -1, -1, +2 -> group 0 first (stable on the tie);
    # per point -1/6, -1/2, +1: harmful per point = group 1 first
    att = FixedScores(torch.tensor([-1.0, -1.0, 2.0], dtype=torch.float64))
    spy = SpyRetrain(b)
    ctx = EvalContext(
        b, g, torch.zeros(3, 1), QueryProperty(), spy, att, tiny_task(g.group_ids, 3, n=10)
    )
    t = Pruning(fractions=[0.2], orders=["harmful"], rank_by="mean").evaluate(ctx)
    assert t.tables["curve"].set_index("order").loc["harmful"].points_removed == 2
    t = Pruning(fractions=[0.2], orders=["harmful"], rank_by="sum").evaluate(ctx)
    assert t.tables["curve"].set_index("order").loc["harmful"].points_removed == 6


def test_reuses_run_scores_when_the_run_attributed_val_loss():
    b = tiny_bundle(n=10)
    g = Grouping(torch.arange(10), 10)
    scores = torch.linspace(-1, 1, 10, dtype=torch.float64)[:, None]
    spy = SpyRetrain(b)
    ctx = EvalContext(b, g, scores, val_loss_property(), spy, None, None)
    res = Pruning(fractions=[0.3], orders=["harmful", "random"], random_draws=2).evaluate(ctx)
    masks, _ = spy.calls[0]
    t = res.tables["curve"].set_index("order")
    assert t.loc["harmful"].points_removed == 3
    assert t.loc["random"].runs == 2 * 2  # 2 draws x 2 seeds
    assert any((~m[:3]).all() and m[3:].all() for m in masks)  # lowest three removed
    assert res.metrics["attribution_seconds"] == 0.0


def test_a_fraction_that_removes_every_group_is_skipped():
    b = tiny_bundle(n=10)
    g = Grouping(torch.tensor([0] * 5 + [1] * 5), 2)
    spy = SpyRetrain(b)
    ctx = EvalContext(b, g, torch.zeros(2, 1), val_loss_property(), spy)
    res = Pruning(fractions=[0.3, 0.6], orders=["harmful"]).evaluate(ctx)
    assert res.metrics["skipped"] == 1
    assert "harmful/0.3/acc_mean" in res.metrics and "harmful/0.6/acc_mean" not in res.metrics
    assert (spy.calls[0][0].sum(1) > 0).all()


def test_tiny_real_retrain_service(tmp_path):
    b = tiny_bundle(n=30)
    g = Grouping(torch.arange(30) % 6, 6)
    svc = RetrainService(tmp_path, backend="sequential").bind(tiny_recipe(epochs=2), b, "k")
    scores = torch.linspace(-1, 1, 6, dtype=torch.float64)[:, None]
    ctx = EvalContext(b, g, scores, val_loss_property(), svc)
    res = Pruning(fractions=[0.2, 0.5], repeats=1).evaluate(ctx)
    # 1 full + 3 orders x 2 fractions (at most; identical sets are retrained once)
    assert 1 <= svc.stats["retrains_run"] <= 7
    t = res.tables["curve"]
    assert np.isfinite(t.test_acc_mean).all() and (t.runs == 1).all()
    assert set(t.order) == {"none", "harmful", "helpful", "random"}
    res2 = Pruning(fractions=[0.2, 0.5], repeats=1).evaluate(ctx)  # everything cached
    assert svc.stats["retrains_cached"] >= svc.stats["retrains_run"]
    assert res2.metrics == res.metrics


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"fractions": [0.0]}, "evaluation.pruning.fractions[]"),
        ({"fractions": [1.0]}, "evaluation.pruning.fractions[]"),
        ({"fractions": []}, "evaluation.pruning.fractions"),
        ({"fractions": 0.2}, "evaluation.pruning.fractions"),
        ({"orders": ["worst"]}, "evaluation.pruning.orders[]"),
        ({"orders": "harmful"}, "evaluation.pruning.orders"),
        ({"repeats": 0}, "evaluation.pruning.repeats"),
        ({"random_draws": 0}, "evaluation.pruning.random_draws"),
        ({"rank_by": "max"}, "evaluation.pruning.rank_by"),
        ({"measurement": "acc"}, "evaluation.pruning.measurement"),
        ({"seed": -1}, "evaluation.pruning.seed"),
    ],
)
def test_config_validation_names_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        Pruning(**kw)
    assert e.value.key == key
