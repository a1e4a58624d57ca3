"""TRAK invariants: points kernel = M^T per-sample; groups kernel on singletons = per-sample;
brute-force loops; ensemble averaging; validation."""

import copy

import pytest
import torch

from factory import perturbed_checkpoints, tiny_data, tiny_task
from ggda.attribution.trak import TRAK
from ggda.errors import ConfigError
from ggda.gradients import num_params, select_params
from ggda.gradients.projection import RandomProjector
from ggda.grouping import RandomGrouper
from ggda.grouping.base import GroupingInputs
from ggda.models.functional import margin, measurement_fn, per_example_loss

D = 12


def _grad(net, out):
    net.zero_grad()
    out.backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def brute_force_trak(task, measurement, damping, kernel, seed=0, checkpoint=-1):
    """TRAK for one checkpoint with explicit loops; numerator from (1 - p_i) phi_i."""
    net = task.net
    net.load_state_dict(task.checkpoints[checkpoint].state_dict)
    f = measurement_fn(measurement)
    p = sum(t.numel() for t in net.parameters())
    proj = RandomProjector(p, D, seed).matrix(dtype=torch.float64)  # (p, D)
    n, m, k = len(task.y_train), task.queries.m, task.grouping.k
    gid = task.grouping.group_ids
    phi = []
    weight = []
    for i in range(n):
        xi, yi = task.x_train[i : i + 1], task.y_train[i : i + 1]
        phi.append(_grad(net, margin(net(xi), yi).sum()) @ proj)
        with torch.no_grad():
            weight.append(1 - torch.sigmoid(margin(net(xi), yi))[0])
    kern = torch.zeros(D, D, dtype=torch.float64)
    if kernel == "points":
        for i in range(n):
            kern += torch.outer(phi[i], phi[i])
    else:
        for j in range(k):
            pg = sum(phi[i] for i in range(n) if gid[i] == j)
            size = int((gid == j).sum())
            kern += torch.outer(pg, pg) / size
    lam = damping * torch.trace(kern) / D
    inv = torch.linalg.inv(kern + lam * torch.eye(D, dtype=torch.float64))
    out = torch.zeros(k, m, dtype=torch.float64)
    for q in range(m):
        xq, yq = task.queries.x[q : q + 1], task.queries.y[q : q + 1]
        phi_q = _grad(net, f(net(xq), yq).sum()) @ proj
        for j in range(k):
            num = sum(weight[i] * phi[i] for i in range(n) if gid[i] == j)
            out[j, q] = phi_q @ inv @ num
    return out


@pytest.mark.parametrize("measurement", ["loss", "margin"])
@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_singleton_equals_brute_force(measurement, kind):
    n = 12
    task = tiny_task(torch.arange(n), n, kind=kind, measurement=measurement, n=n)
    got = TRAK(proj_dim=D, kernel="points", damping=0.1).attribute(task).scores
    want = brute_force_trak(task, measurement, 0.1, "points")
    assert torch.allclose(got, want, atol=1e-10)
    # kernel=groups with singleton groups is per-sample TRAK too
    got_g = TRAK(proj_dim=D, kernel="groups", damping=0.1).attribute(task).scores
    assert torch.allclose(got_g, want, atol=1e-10)


def test_group_kernel_equals_brute_force():
    """Groups kernel: K = sum_j phi_G phi_G^T / |G|, numerator = -P^T grad L_G."""
    n = 15
    gid = torch.arange(n) % 4
    task = tiny_task(gid, 4, kind="mlp", n=n)
    got = TRAK(proj_dim=D, kernel="groups", damping=0.05).attribute(task).scores
    want = brute_force_trak(task, "loss", 0.05, "groups")
    assert torch.allclose(got, want, atol=1e-9)


@pytest.mark.parametrize("backend", ["vmap", "loop", "factored"])
def test_points_kernel_group_scores_are_member_sums(backend):
    n = 24
    x, y, _, _ = tiny_data(n=n)
    g = RandomGrouper(5, seed=1).group(GroupingInputs(x, y, 3))
    method = TRAK(proj_dim=16, kernel="points", backend=backend)
    per = method.attribute(tiny_task(torch.arange(n), n, n=n)).scores
    got = method.attribute(tiny_task(g.group_ids, g.k, n=n)).scores
    assert torch.allclose(got, g.membership(torch.float64).T @ per, atol=1e-10)
    # the group kernel differs (within-group scatter is dropped), so it is not M^T per-sample
    approx = TRAK(proj_dim=16, kernel="groups").attribute(tiny_task(g.group_ids, g.k, n=n))
    assert not torch.allclose(approx.scores, got, atol=1e-6)


def test_ensemble_averages_models_and_checkpoints():
    n = 10
    task = tiny_task(torch.arange(n), n, n=n)
    others = [perturbed_checkpoints(task.net, seed=s) for s in (5, 6)]
    calls = []

    def ensemble(count):
        calls.append(count)
        return others[:count]

    task.ensemble = ensemble
    got = TRAK(proj_dim=D, kernel="points", ensemble_size=3, checkpoints="all").attribute(task)
    assert calls == [2]
    assert got.info["ensemble_models"] == 3 and got.info["num_checkpoints"] == 6
    want = torch.zeros_like(got.scores)
    for e, cks in enumerate([task.checkpoints, *others]):
        t = copy.copy(task)
        t.checkpoints = cks
        for c in range(len(cks)):
            want += brute_force_trak(t, "loss", 0.01, "points", seed=e, checkpoint=c)
    assert torch.allclose(got.scores, want / 6, atol=1e-10)


@pytest.mark.parametrize("kernel", ["points", "groups"])
def test_last_layer_scores_carry_no_graph(kernel):
    n = 8
    task = tiny_task(torch.arange(n) % 3, 3, n=n)
    got = TRAK(proj_dim=D, kernel=kernel, last_layer=True).attribute(task).scores
    assert not got.requires_grad and got.abs().max() > 0


def test_ensemble_without_pipeline_uses_base_model():
    n = 8
    task = tiny_task(torch.arange(n), n, n=n)
    one = TRAK(proj_dim=D).attribute(task).scores
    three = TRAK(proj_dim=D, ensemble_size=3).attribute(task)
    assert three.info["ensemble_models"] == 1
    assert torch.allclose(one, three.scores)


def test_self_attribution_brute_force():
    n = 9
    gid = torch.arange(n) % 3
    task = tiny_task(gid, 3, kind="logreg", n=n)
    got = TRAK(proj_dim=D, kernel="groups", damping=0.1).self_attribute(task).scores[:, 0]
    net = task.net
    net.load_state_dict(task.checkpoints[-1].state_dict)
    proj = RandomProjector(num_params(select_params(net)), D, 0).matrix(dtype=torch.float64)
    kern = torch.zeros(D, D, dtype=torch.float64)
    nums = []
    for j in range(3):
        members = (gid == j).nonzero().squeeze(1)
        xg, yg = task.x_train[members], task.y_train[members]
        pg = _grad(net, margin(net(xg), yg).sum()) @ proj
        kern += torch.outer(pg, pg) / len(members)
        nums.append(-_grad(net, per_example_loss(net(xg), yg).sum()) @ proj)
    inv = torch.linalg.inv(kern + 0.1 * torch.trace(kern) / D * torch.eye(D, dtype=torch.float64))
    want = torch.stack([v @ inv @ v for v in nums])
    assert torch.allclose(got, want, atol=1e-9)


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"proj_dim": 0}, "method.proj_dim"),
        ({"kernel": "neighbours"}, "method.kernel"),
        ({"damping": -0.1}, "method.damping"),
        ({"ensemble_size": 0}, "method.ensemble_size"),
        ({"proj_type": "sparse"}, "method.proj_type"),
        ({"checkpoints": "best"}, "method.checkpoints"),
    ],
)
def test_validation(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TRAK(**kw)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """`python run.py method=trak` on the smoke setup: scores (k, m) saved, LDS logged."""
    import json

    from factory import run_cli

    res = run_cli(["experiment=smoke", "logger=none", "method=trak"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    scores = torch.load(run / "scores.pt")
    assert scores.shape == (metrics["attribution/k"], metrics["attribution/m"])
    assert torch.isfinite(scores).all() and "lds/point/mean" in metrics


@pytest.mark.parametrize("structure", ["dense", "kronecker"])
def test_group_kernel_one_capture_pass_equals_two_passes(structure, monkeypatch):
    # backend=factored takes the margin features and the loss gradient from one capture
    # pass (grad loss_i = -(1 - p_i) grad margin_i); vmap runs the two passes.
    from ggda.attribution import trak as trak_mod

    calls = []
    real = trak_mod.iter_weighted_group_gradients
    monkeypatch.setattr(
        trak_mod,
        "iter_weighted_group_gradients",
        lambda *a, **kw: calls.append(1) or real(*a, **kw),
    )
    ids = torch.arange(24) % 5
    kw = {"proj_dim": D, "kernel": "groups", "proj_structure": structure, "damping": 0.05}
    fused = TRAK(backend="factored", **kw).attribute(tiny_task(ids, 5, "mlp", n=24)).scores
    assert calls  # the one-pass path ran
    two = TRAK(backend="vmap", **kw).attribute(tiny_task(ids, 5, "mlp", n=24)).scores
    assert torch.allclose(fused, two, atol=1e-10, rtol=1e-8)


def test_group_kernel_falls_back_to_two_passes_without_layer_rules(monkeypatch):
    # A parameter no layer rule covers makes the one-pass iterator refuse before its first
    # chunk (tests/attribution/test_layer_rules.py); TRAK then runs the two passes.
    from ggda.attribution import trak as trak_mod
    from ggda.gradients.group import UncoveredParams

    def refuse(*a, **kw):
        raise UncoveredParams(["layer.weight"])
        yield  # a generator, like the real one

    monkeypatch.setattr(trak_mod, "iter_weighted_group_gradients", refuse)
    ids = torch.arange(24) % 5
    kw = {"proj_dim": D, "kernel": "groups", "damping": 0.05}
    got = TRAK(backend="factored", **kw).attribute(tiny_task(ids, 5, "mlp", n=24)).scores
    two = TRAK(backend="vmap", **kw).attribute(tiny_task(ids, 5, "mlp", n=24)).scores
    assert torch.allclose(got, two, atol=1e-10, rtol=1e-8)
