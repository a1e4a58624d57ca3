"""TracIn invariants: group = M^T per-sample; singleton = brute-force loop; sign."""

import pytest
import torch

from factory import tiny_data, tiny_task
from ggda.attribution.tracin import TracIn
from ggda.errors import ConfigError
from ggda.grouping import KMeansGrouper, RandomGrouper
from ggda.grouping.base import GroupingInputs
from ggda.models.functional import measurement_fn, per_example_loss


def brute_force_tracin(task, measurement):
    """sum_t lr_t <grad f_q, -grad l_i> with explicit loops over points and queries."""
    net = task.net
    f = measurement_fn(measurement)
    n, m = len(task.y_train), task.queries.m
    out = torch.zeros(n, m, dtype=torch.float64)
    for ck in task.checkpoints:
        net.load_state_dict(ck.state_dict)
        for i in range(n):
            net.zero_grad()
            per_example_loss(net(task.x_train[i : i + 1]), task.y_train[i : i + 1]).sum().backward()
            gi = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            for q in range(m):
                net.zero_grad()
                f(net(task.queries.x[q : q + 1]), task.queries.y[q : q + 1]).sum().backward()
                gq = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
                out[i, q] += ck.lr * torch.dot(gq, -gi)
    return out


@pytest.mark.parametrize("measurement", ["loss", "margin"])
@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_singleton_equals_brute_force(measurement, kind):
    n = 16
    task = tiny_task(torch.arange(n), n, kind=kind, measurement=measurement, n=n)
    want = brute_force_tracin(task, measurement)
    for backend in ("factored", "vmap", "loop"):
        got = TracIn(max_points=5, backend=backend).attribute(task).scores
        assert torch.allclose(got, want, atol=1e-10), backend


@pytest.mark.parametrize("grouper", ["random", "kmeans"])
@pytest.mark.parametrize("backend", ["factored", "vmap", "loop"])
def test_group_scores_are_member_sums(grouper, backend):
    n = 24
    x, y, _, _ = tiny_data(n=n)
    g = (RandomGrouper(5, seed=1) if grouper == "random" else KMeansGrouper(5, seed=1)).group(
        GroupingInputs(x, y, 3)
    )
    per = TracIn().attribute(tiny_task(torch.arange(n), n, n=n)).scores
    got = TracIn(backend=backend).attribute(tiny_task(g.group_ids, g.k, n=n)).scores
    assert torch.allclose(got, g.aggregate(per), atol=1e-10)
    assert torch.allclose(got, g.membership(torch.float64).T @ per, atol=1e-10)


def test_projected_scores_match_projected_inner_products():
    n = 12
    task = tiny_task(torch.arange(n), n, n=n)
    exact = TracIn().attribute(task).scores
    proj = TracIn(proj_dim=4096, proj_seed=0).attribute(task).scores
    # JL: a wide Rademacher projection preserves inner products approximately
    assert torch.corrcoef(torch.stack([exact.flatten(), proj.flatten()]))[0, 1] > 0.95


def test_self_attribution_is_lr_weighted_squared_norm():
    n = 10
    task = tiny_task(torch.arange(n), n, n=n)
    got = TracIn().self_attribute(task).scores[:, 0]
    net = task.net
    want = torch.zeros(n, dtype=torch.float64)
    for ck in task.checkpoints:
        net.load_state_dict(ck.state_dict)
        for i in range(n):
            net.zero_grad()
            per_example_loss(net(task.x_train[i : i + 1]), task.y_train[i : i + 1]).sum().backward()
            want[i] += ck.lr * sum((p.grad**2).sum() for p in net.parameters())
    assert torch.allclose(got, want, atol=1e-10)


def test_a_step_on_a_helpful_group_lowers_the_query_loss():
    """Sign convention: positive score <=> one SGD step on the group lowers the query loss."""
    n = 20
    ids = torch.arange(n) % 4
    task = tiny_task(ids, 4, n=n)
    task.checkpoints = task.checkpoints[-1:]
    lr = 1e-4
    task.checkpoints[0].lr = lr
    scores = TracIn().attribute(task).scores
    net = task.net
    net.load_state_dict(task.checkpoints[0].state_dict)
    q = task.queries
    base = per_example_loss(net(q.x), q.y)
    for j in range(4):
        net.load_state_dict(task.checkpoints[0].state_dict)
        net.zero_grad()
        members = ids == j
        per_example_loss(net(task.x_train[members]), task.y_train[members]).sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
        change = base - per_example_loss(net(q.x), q.y)  # > 0: loss went down
        assert torch.allclose(change, scores[j], rtol=1e-2, atol=1e-9)


def test_config_validation():
    with pytest.raises(ConfigError, match="method.proj_dim"):
        TracIn(proj_dim=0)
    with pytest.raises(ConfigError, match="method.checkpoints"):
        TracIn(checkpoints="first")
    with pytest.raises(ConfigError, match="method.backend"):
        TracIn(backend="magic")


def test_nan_scores_are_reported_not_saved():
    from ggda.attribution.base import check_finite_scores
    from ggda.errors import GGDAError

    n = 6
    task = tiny_task(torch.arange(n), n, n=n)
    for ck in task.checkpoints:
        ck.state_dict["fc.weight"][0, 0] = float("nan")
    result = TracIn().attribute(task)
    assert torch.isnan(result.scores).any()
    with pytest.raises(GGDAError, match="NaN/infinite scores"):
        check_finite_scores(result, "tracin")


def test_last_layer_scores_are_plain_tensors_and_match_head_only_brute_force():
    n = 8
    task = tiny_task(torch.arange(n), n, n=n)
    for p in task.net.parameters():
        p.requires_grad_(True)
    got = TracIn(last_layer=True).attribute(task).scores
    assert not got.requires_grad
    net = task.net
    want = torch.zeros_like(got)
    for ck in task.checkpoints:
        net.load_state_dict(ck.state_dict)
        head = list(net.fc.parameters())
        for i in range(n):
            gi = torch.autograd.grad(
                per_example_loss(net(task.x_train[i : i + 1]), task.y_train[i : i + 1]).sum(), head
            )
            for q in range(task.queries.m):
                f = measurement_fn("loss")(
                    net(task.queries.x[q : q + 1]), task.queries.y[q : q + 1]
                )
                gq = torch.autograd.grad(f.sum(), head)
                want[i, q] += ck.lr * sum((a * -b).sum() for a, b in zip(gq, gi, strict=True))
    assert torch.allclose(got, want, atol=1e-10)
