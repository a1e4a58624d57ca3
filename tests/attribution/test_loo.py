"""Group leave-one-out: brute-force retraining loops, sign, budget, self-attribution."""

import pytest
import torch

from factory import tiny_bundle, tiny_recipe
from ggda.attribution.base import AttributionTask
from ggda.attribution.loo import GroupLOO
from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError, GGDAError
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouping
from ggda.models.functional import neg_loss, per_example_loss
from ggda.models.training import train_lean


def _task(tmp_path, group_ids, k, n, prop=None, retrain=True):
    bundle = tiny_bundle(n=n, seed=1)
    recipe = tiny_recipe(epochs=3)
    svc = RetrainService(tmp_path, backend="sequential").bind(recipe, bundle, "loo-test")
    prop = prop or QueryProperty(split="test", indices="queries", measurement="loss")
    q = prop.examples(bundle)
    return AttributionTask(
        net=None,
        checkpoints=[],
        x_train=bundle.x_train,
        y_train=bundle.y_train,
        grouping=Grouping(group_ids, k),
        queries=q,
        retrain=svc if retrain else None,
        prop=prop,
        bundle=bundle,
    ), recipe


def test_singleton_equals_brute_force_retraining(tmp_path):
    n = 10
    task, recipe = _task(tmp_path, torch.arange(n), n, n)
    method = GroupLOO(repeats=2, max_retrains=100)
    got = method.attribute(task).scores
    b = task.bundle
    xq, yq = b.x_test[b.query_idx], b.y_test[b.query_idx]
    want = torch.zeros(n, len(yq), dtype=torch.float64)
    for s in method.seeds():
        full = train_lean(recipe, b.x_train, b.y_train, 3, s)
        f_full = neg_loss(full(xq), yq).detach().double()
        for i in range(n):
            keep = [j for j in range(n) if j != i]
            net = train_lean(recipe, b.x_train[keep], b.y_train[keep], 3, s)
            want[i] += (f_full - neg_loss(net(xq), yq).detach().double()) / len(method.seeds())
    assert torch.allclose(got, want, atol=1e-5)
    assert got.abs().max() > 1e-4


def test_removing_a_helpful_group_scores_positive(tmp_path):
    """Group = every training point of class 0; query = class-0 mean loss: it must help."""
    n = 30
    bundle = tiny_bundle(n=n, seed=1)
    gid = (bundle.y_train != 0).long()  # group 0 holds all of class 0
    prop = QueryProperty(split="test", indices="all", classes=[0], reduce="mean")
    task, _ = _task(tmp_path, gid, 2, n, prop=prop)
    scores = GroupLOO(max_retrains=10).attribute(task).scores
    assert scores[0, 0] > 0.1


def test_budget_is_refused_with_a_clear_error(tmp_path):
    n = 12
    task, _ = _task(tmp_path, torch.arange(n), n, n)
    with pytest.raises(ConfigError, match=r"method\.max_retrains.*\(12 \+ 1\) x 2 = 26"):
        GroupLOO(repeats=2, max_retrains=25).attribute(task)


def test_needs_a_retrain_service(tmp_path):
    task, _ = _task(tmp_path, torch.arange(4) % 2, 2, 4, retrain=False)
    with pytest.raises(GGDAError, match="retrain"):
        GroupLOO().attribute(task)


def test_self_attribution_brute_force(tmp_path):
    n = 12
    gid = torch.arange(n) % 3
    task, recipe = _task(tmp_path, gid, 3, n)
    method = GroupLOO(repeats=1, max_retrains=10)
    got = method.self_attribute(task).scores[:, 0]
    b = task.bundle
    s = method.seeds()[0]
    full = train_lean(recipe, b.x_train, b.y_train, 3, s)
    for j in range(3):
        keep = gid != j
        net = train_lean(recipe, b.x_train[keep], b.y_train[keep], 3, s)
        xg, yg = b.x_train[gid == j], b.y_train[gid == j]
        want = per_example_loss(net(xg), yg).sum() - per_example_loss(full(xg), yg).sum()
        assert torch.allclose(got[j], want.detach().double(), atol=1e-4)


@pytest.mark.parametrize(
    "kw,key",
    [({"repeats": 0}, "method.repeats"), ({"max_retrains": 0}, "method.max_retrains")],
)
def test_validation(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        GroupLOO(**kw)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """`python run.py method=loo` on the smoke setup: scores (k, m) saved, LDS logged."""
    import json

    from factory import run_cli

    res = run_cli(["experiment=smoke", "logger=none", "method=loo", "groups=4"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    scores = torch.load(run / "scores.pt")
    assert scores.shape == (metrics["attribution/k"], metrics["attribution/m"])
    assert torch.isfinite(scores).all() and "lds/point/mean" in metrics
