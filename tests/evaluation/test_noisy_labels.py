"""Noisy-label detection: recall at a budget and ROC-AUC on hand-built rankings."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from factory import tiny_bundle, tiny_task
from ggda.attribution.base import AttributionResult, Attributor
from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError
from ggda.evaluation.base import EvalContext
from ggda.evaluation.noisy_labels import NoisyLabels, inspection_curve, recall_at, roc_auc
from ggda.grouping.base import Grouping

# A real AttributionTask (only passed through: the fake attributors ignore it).
TASK = tiny_task(torch.arange(20), 20, n=20)


def test_roc_auc_hand_computed_and_matches_sklearn():
    # positives at values 4, 2; negatives at 3, 1: pairs (4>3, 4>1, 2<3, 2>1) -> 3/4.
    assert roc_auc([1, 1, 0, 0], [4.0, 2.0, 3.0, 1.0]) == pytest.approx(0.75)
    # ties count one half: positive 1 tied with negative 1, above negative 0 -> 0.75
    assert roc_auc([1, 0, 0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.1
    v = rng.integers(0, 6, 200).astype(float) + 2.0 * y  # many ties
    assert roc_auc(y, v) == pytest.approx(roc_auc_score(y, v))


def test_recall_singleton_hand_built_ranking():
    # 10 points, flipped = {0, 3, 7}; inspection order 0, 1, 3, 2, 4, ...
    noise = torch.zeros(10, dtype=torch.bool)
    noise[[0, 3, 7]] = True
    g = Grouping(torch.arange(10), 10)
    order = torch.tensor([0, 1, 3, 2, 4, 5, 6, 7, 8, 9])
    assert recall_at(g, noise, order, 0.1) == pytest.approx(1 / 3)  # inspected {0}
    assert recall_at(g, noise, order, 0.2) == pytest.approx(1 / 3)  # {0, 1}
    assert recall_at(g, noise, order, 0.3) == pytest.approx(2 / 3)  # {0, 1, 3}
    assert recall_at(g, noise, order, 0.8) == pytest.approx(1.0)
    # half a point into the budget: expected half a flip of point 3
    assert recall_at(g, noise, order, 0.25) == pytest.approx(0.5)


def test_recall_groups_whole_then_partial():
    # groups: A={0,1,2,3} (2 flips), B={4,5} (0), C={6,7,8,9} (1 flip); order A, C, B
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    noise = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    g = Grouping(ids, 3)
    order = torch.tensor([0, 2, 1])
    inspected, found = inspection_curve(g, noise, order)
    assert np.allclose(inspected, [0, 4, 8, 10]) and np.allclose(found, [0, 2, 3, 3])
    assert recall_at(g, noise, order, 0.4) == pytest.approx(2 / 3)  # exactly group A
    # 2 points into A (flip rate 1/2): expect one flip
    assert recall_at(g, noise, order, 0.2) == pytest.approx(1 / 3)
    # A plus 2 of C's 4 (flip rate 1/4): 2 + 0.5 flips
    assert recall_at(g, noise, order, 0.6) == pytest.approx(2.5 / 3)


class SelfAttributor(Attributor):
    """Returns fixed self-attribution scores."""

    def __init__(self, scores):
        self.scores = scores

    def self_attribute(self, task):
        return AttributionResult(self.scores[:, None].clone())

    def attribute(self, task):
        return AttributionResult(-self.scores[:, None].clone())


def _noisy_bundle(n=20):
    b = tiny_bundle(n=n)
    noise = torch.zeros(n, dtype=torch.bool)
    noise[[1, 4, 9, 15]] = True
    b.noise_mask = noise
    return b


def test_evaluator_auc_uses_inherited_group_scores():
    b = _noisy_bundle()
    ids = torch.arange(20) % 5
    g = Grouping(ids, 5)
    tau = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    ctx = EvalContext(b, g, torch.zeros(5, 1), QueryProperty(), None, SelfAttributor(tau), TASK)
    res = NoisyLabels(fractions=[0.2, 0.4]).evaluate(ctx)
    point = tau[ids]
    assert res.metrics["auc"] == pytest.approx(roc_auc_score(b.noise_mask.numpy(), point))
    # order: group 0 (points 0,5,10,15: one flip), then group 4 (4,9,14,19: two flips)
    assert res.metrics["recall/0.2"] == pytest.approx(1 / 4)
    assert res.metrics["recall/0.4"] == pytest.approx(3 / 4)
    assert {"recall", "curve"} <= set(res.tables) and "recall_curve" in res.figures


def test_rank_by_mean_changes_order_for_unequal_groups():
    b = _noisy_bundle()
    # group 0 = {1, 4} (both flipped, tau 3), group 1 = the other 18 (tau 10)
    ids = torch.ones(20, dtype=torch.long)
    ids[[1, 4]] = 0
    g = Grouping(ids, 2)
    tau = torch.tensor([3.0, 10.0], dtype=torch.float64)
    ctx = EvalContext(b, g, torch.zeros(2, 1), QueryProperty(), None, SelfAttributor(tau), TASK)
    by_sum = NoisyLabels(fractions=[0.1], rank_by="sum").evaluate(ctx).metrics
    by_mean = NoisyLabels(fractions=[0.1], rank_by="mean").evaluate(ctx).metrics
    assert by_mean["recall/0.1"] == pytest.approx(0.5)  # 3/2 > 10/18: group 0 first
    assert by_sum["recall/0.1"] == pytest.approx(2 / 18 * 2 / 4)  # 2 points of group 1


def test_val_loss_score_inspects_most_harmful_first():
    b = _noisy_bundle()
    g = Grouping(torch.arange(20), 20)
    harm = torch.zeros(20, dtype=torch.float64)
    harm[[1, 4, 9, 15]] = 1.0
    # attribute() returns -harm: flipped points have the lowest (most harmful) scores
    ctx = EvalContext(b, g, torch.zeros(20, 1), QueryProperty(), None, SelfAttributor(harm), TASK)
    res = NoisyLabels(score="val_loss", fractions=[0.2]).evaluate(ctx)
    assert res.metrics["auc"] == pytest.approx(1.0)
    assert res.metrics["recall/0.2"] == pytest.approx(1.0)


def test_no_label_noise_is_a_clear_error():
    b = tiny_bundle(n=20)
    g = Grouping(torch.arange(20), 20)
    ctx = EvalContext(
        b, g, torch.zeros(20, 1), QueryProperty(), None, SelfAttributor(torch.ones(20))
    )
    with pytest.raises(ConfigError, match=r"dataset\.label_noise=0\.1"):
        NoisyLabels().evaluate(ctx)


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"score": "loss"}, "evaluation.noisy_labels.score"),
        ({"fractions": [0.0]}, "evaluation.noisy_labels.fractions[]"),
        ({"fractions": [1.5]}, "evaluation.noisy_labels.fractions[]"),
        ({"fractions": []}, "evaluation.noisy_labels.fractions"),
        ({"fractions": 0.1}, "evaluation.noisy_labels.fractions"),
        ({"rank_by": "max"}, "evaluation.noisy_labels.rank_by"),
        ({"measurement": "acc"}, "evaluation.noisy_labels.measurement"),
    ],
)
def test_config_validation_names_the_key(kw, key):
    with pytest.raises(ConfigError) as e:
        NoisyLabels(**kw)
    assert e.value.key == key


def test_rank_by_mean2_divides_by_size_squared():
    b = _noisy_bundle()
    ids = torch.ones(20, dtype=torch.long)
    ids[[1, 4]] = 0  # group 0 = two flipped points, group 1 = the other 18
    g = Grouping(ids, 2)
    tau = torch.tensor([3.0, 30.0], dtype=torch.float64)
    ctx = EvalContext(b, g, torch.zeros(2, 1), QueryProperty(), None, SelfAttributor(tau), TASK)
    # mean: 3/2 < 30/18 -> group 1 first; mean2: 3/4 > 30/324 -> group 0 first
    by_mean = NoisyLabels(fractions=[0.1], rank_by="mean").evaluate(ctx).metrics
    by_mean2 = NoisyLabels(fractions=[0.1], rank_by="mean2").evaluate(ctx).metrics
    assert by_mean["recall/0.1"] == pytest.approx(2 / 18 * 2 / 4)
    assert by_mean2["recall/0.1"] == pytest.approx(0.5)
    assert by_mean2["auc"] == pytest.approx(roc_auc_score(b.noise_mask.numpy(), (ids == 0).numpy()))


def test_rank_by_auto_resolves_by_score():
    assert NoisyLabels().rank_by == "mean2"
    assert NoisyLabels(score="val_loss").rank_by == "mean"
    assert NoisyLabels(rank_by="sum").rank_by == "sum"
