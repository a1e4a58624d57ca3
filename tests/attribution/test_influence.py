"""Influence functions: group = M^T per-sample; solvers agree; brute-force loops; vs LOO."""

import functools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from factory import tiny_bundle, tiny_data, tiny_task
from ggda.attribution.base import AttributionTask, Checkpoint
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.loo import GroupLOO
from ggda.attribution.properties import QueryProperty
from ggda.errors import ConfigError
from ggda.evaluation.retrain import RetrainService
from ggda.grouping import RandomGrouper
from ggda.grouping.base import Grouping, GroupingInputs
from ggda.models.functional import measurement_fn, per_example_loss
from ggda.models.nets import LogisticRegression
from ggda.models.training import Recipe


def _flat_grad(net, out):
    net.zero_grad()
    out.backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def brute_force_if(task, damping, measurement):
    """(1/n) grad f_q^T (H + lambda I)^{-1} (-grad l_i), every quantity by explicit loops."""
    net = task.net
    net.load_state_dict(task.checkpoints[-1].state_dict)
    f = measurement_fn(measurement)
    n, m = len(task.y_train), task.queries.m
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def mean_loss(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        prm = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}
        total = 0.0
        for i in range(n):  # explicit loop over training points
            logits = torch.func.functional_call(net, prm, (task.x_train[i : i + 1],))
            total = total + per_example_loss(logits, task.y_train[i : i + 1]).sum()
        return total / n

    hess = torch.autograd.functional.hessian(mean_loss, theta0)
    a = hess + damping * torch.eye(theta0.numel(), dtype=torch.float64)
    out = torch.zeros(n, m, dtype=torch.float64)
    for q in range(m):
        gq = _flat_grad(net, f(net(task.queries.x[q : q + 1]), task.queries.y[q : q + 1]).sum())
        u = torch.linalg.solve(a, gq)
        for i in range(n):
            gi = _flat_grad(
                net, per_example_loss(net(task.x_train[i : i + 1]), task.y_train[i : i + 1]).sum()
            )
            out[i, q] = torch.dot(u, -gi) / n
    return out


@pytest.mark.parametrize("measurement", ["loss", "margin"])
@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_singleton_equals_brute_force(measurement, kind):
    n = 12
    task = tiny_task(torch.arange(n), n, kind=kind, measurement=measurement, n=n)
    got = (
        InfluenceFunction(solver="explicit", damping=0.05, last_layer=False).attribute(task).scores
    )
    want = brute_force_if(task, 0.05, measurement)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("solver", ["explicit", "cg"])
@pytest.mark.parametrize("backend", ["vmap", "loop", "factored"])
def test_group_scores_are_member_sums(solver, backend):
    n = 24
    x, y, _, _ = tiny_data(n=n)
    g = RandomGrouper(5, seed=1).group(GroupingInputs(x, y, 3))
    method = InfluenceFunction(solver=solver, damping=0.5, iterations=200, backend=backend)
    kind = "mlp" if solver == "explicit" else "logreg"  # CG needs a positive definite H
    per = method.attribute(tiny_task(torch.arange(n), n, kind=kind, n=n)).scores
    got = method.attribute(tiny_task(g.group_ids, g.k, kind=kind, n=n)).scores
    assert torch.allclose(got, g.membership(torch.float64).T @ per, atol=1e-9)
    assert got.abs().max() > 1e-3  # not trivially zero


def test_solvers_agree_on_well_conditioned_problem():
    n = 24
    task = tiny_task(torch.arange(n) % 6, 6, kind="logreg", n=n)
    ex = InfluenceFunction(solver="explicit", damping=0.2).attribute(task).scores
    cg = InfluenceFunction(solver="cg", damping=0.2, iterations=100, tol=1e-12).attribute(task)
    li = InfluenceFunction(solver="lissa", damping=0.2, iterations=400).attribute(task).scores
    assert torch.allclose(cg.scores, ex, rtol=1e-7, atol=1e-10)
    assert torch.allclose(li, ex, rtol=1e-6, atol=1e-9)
    # stochastic LiSSA (minibatch HVPs) is a noisy estimate: only correlated
    st = InfluenceFunction(solver="lissa", damping=0.2, iterations=400, lissa_batch=12)
    corr = torch.corrcoef(torch.stack([st.attribute(task).scores.flatten(), ex.flatten()]))
    assert corr[0, 1] > 0.8


def test_last_layer_equals_brute_force_on_head():
    n = 10
    task = tiny_task(torch.arange(n), n, kind="mlp", n=n)
    got = InfluenceFunction(damping=0.1, last_layer=True).attribute(task).scores
    assert not got.requires_grad  # no autograd graph leaks from the frozen body
    net = task.net
    net.load_state_dict(task.checkpoints[-1].state_dict)
    head = list(net.fc.parameters())
    h = net.features(task.x_train).detach()
    w0 = torch.cat([p.detach().reshape(-1) for p in head])

    def mean_loss(w):
        wt, b = w[: net.fc.weight.numel()].reshape(net.fc.weight.shape), w[net.fc.weight.numel() :]
        return per_example_loss(h @ wt.T + b, task.y_train).mean()

    a = torch.autograd.functional.hessian(mean_loss, w0) + 0.1 * torch.eye(w0.numel()).double()

    def head_grad(x, y, fn):
        for p in net.parameters():
            p.grad = None
        fn(net(x), y).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in head])

    f = measurement_fn("loss")
    for q in range(task.queries.m):
        u = torch.linalg.solve(
            a, head_grad(task.queries.x[q : q + 1], task.queries.y[q : q + 1], f)
        )
        for i in range(n):
            gi = head_grad(task.x_train[i : i + 1], task.y_train[i : i + 1], per_example_loss)
            assert torch.allclose(got[i, q], torch.dot(u, -gi) / n, atol=1e-10)


def test_self_attribution_brute_force():
    n = 12
    gid = torch.arange(n) % 4
    task = tiny_task(gid, 4, kind="logreg", n=n)
    got = InfluenceFunction(damping=0.1).self_attribute(task).scores[:, 0]
    net = task.net
    net.load_state_dict(task.checkpoints[-1].state_dict)
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    full = torch.zeros(18, 18, dtype=torch.float64)
    for i in range(n):

        def lf(theta, i=i):
            w, b = theta[:15].reshape(3, 5), theta[15:]
            return per_example_loss(
                task.x_train[i : i + 1] @ w.T + b, task.y_train[i : i + 1]
            ).sum()

        full += torch.autograd.functional.hessian(lf, theta0)
    a = full / n + 0.1 * torch.eye(18, dtype=torch.float64)
    for j in range(4):
        members = (gid == j).nonzero().squeeze(1)
        g = _flat_grad(
            net, per_example_loss(net(task.x_train[members]), task.y_train[members]).sum()
        )
        assert torch.allclose(got[j], g @ torch.linalg.solve(a, g) / n, atol=1e-10)
    assert (got > 0).all()  # positive definite damped Hessian: self-influence is positive


def test_explicit_refuses_large_models_with_the_fix():
    task = tiny_task(torch.arange(8), 8, kind="mlp", n=8)
    with pytest.raises(ConfigError, match="last_layer=true.*solver=cg"):
        InfluenceFunction(solver="explicit", max_explicit_params=10).attribute(task)


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"damping": -1.0}, "method.damping"),
        ({"solver": "newton"}, "method.solver"),
        ({"iterations": 0}, "method.iterations"),
        ({"lissa_scale": 0.0}, "method.lissa_scale"),
        ({"lissa_batch": 0}, "method.lissa_batch"),
        ({"backend": "magic"}, "method.backend"),
    ],
)
def test_validation(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        InfluenceFunction(**kw)


def test_group_if_tracks_group_loo_on_damped_logistic_regression(tmp_path):
    """Acceptance 2: convex damped model, full-batch GD to the optimum, 20 groups."""
    n, wd = 200, 0.05
    bundle = tiny_bundle(n=n, seed=3)
    recipe = Recipe(
        net_factory=LogisticRegression,
        optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=wd),
        epochs=300,
        batch_size=n,  # full batch: deterministic GD to the regularised optimum
    )
    svc = RetrainService(tmp_path, backend="sequential").bind(recipe, bundle, "if-vs-loo")
    g = RandomGrouper(20, seed=0).group(GroupingInputs(bundle.x_train, bundle.y_train, 3))
    prop = QueryProperty(split="test", indices="queries", measurement="loss")
    loo_method = GroupLOO(repeats=1, max_retrains=50)
    # theta*(D): the same full-data retrain LOO pairs with, as the final checkpoint
    from ggda.models.training import train_lean

    net = train_lean(recipe, bundle.x_train, bundle.y_train, 3, loo_method.seeds()[0]).double()
    queries = prop.examples(bundle)
    queries.x = queries.x.double()
    task = AttributionTask(
        net=net,
        checkpoints=[Checkpoint({k: v.clone() for k, v in net.state_dict().items()}, 0.5, 300)],
        x_train=bundle.x_train.double(),
        y_train=bundle.y_train,
        grouping=Grouping(g.group_ids, g.k),
        queries=queries,
        retrain=svc,
        prop=prop,
        bundle=bundle,
    )
    loo = loo_method.attribute(task).scores
    inf = InfluenceFunction(solver="explicit", damping=wd).attribute(task).scores
    rho = [spearmanr(inf[:, q], loo[:, q]).statistic for q in range(loo.shape[1])]
    assert np.mean(rho) >= 0.9, rho
    # same scale too: IF predicts the leave-group-out change itself
    assert 0.5 < float((inf * loo).sum() / (loo * loo).sum()) < 2.0


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """`python run.py method=influence` on the smoke setup: scores (k, m) saved, LDS logged."""
    import json

    from factory import run_cli

    res = run_cli(["experiment=smoke", "logger=none", "method=influence"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    scores = torch.load(run / "scores.pt")
    assert scores.shape == (metrics["attribution/k"], metrics["attribution/m"])
    assert torch.isfinite(scores).all() and "lds/point/mean" in metrics


@pytest.mark.parametrize("solver", ["explicit", "kfac", "ekfac"])
def test_fewer_groups_than_queries_precondition_the_groups(solver, monkeypatch):
    """k < m: the k group gradients are preconditioned instead of the m queries (A is
    symmetric); the scores equal the query-side ones and M^T the per-sample scores."""
    from ggda.attribution.loop import GradientAttributor

    n, k = 24, 3
    ids = torch.arange(n) % k
    method = InfluenceFunction(solver=solver, damping=0.05)
    task = tiny_task(ids, k, kind="mlp", n=n)
    assert task.queries.m > k
    calls = []
    real = InfluenceFunction.precondition
    monkeypatch.setattr(
        InfluenceFunction,
        "precondition",
        lambda self, step, v: calls.append(v.shape[0]) or real(self, step, v),
    )
    got = method.attribute(task).scores
    assert calls == [k]  # one preconditioning, of the k groups
    monkeypatch.setattr(GradientAttributor, "train_side_preconditioned", lambda self, step: False)
    calls.clear()
    ref = method.attribute(tiny_task(ids, k, kind="mlp", n=n)).scores
    assert calls == [task.queries.m]
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)
    per = method.attribute(tiny_task(torch.arange(n), n, kind="mlp", n=n)).scores
    summed = torch.zeros(k, per.shape[1], dtype=per.dtype).index_add_(0, ids, per)
    assert torch.allclose(got, summed, rtol=1e-8, atol=1e-12)
