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


def brute_force_qbar(task, models):
    """Qbar_i = mean over every checkpoint of every model of 1 - p_i, by explicit loops."""
    net, n = task.net, len(task.y_train)
    rows = []
    for cks in models:
        for ck in cks:
            net.load_state_dict(ck.state_dict)
            with torch.no_grad():
                rows.append(
                    torch.stack(
                        [
                            1
                            - torch.sigmoid(
                                margin(net(task.x_train[i : i + 1]), task.y_train[i : i + 1])
                            )[0]
                            for i in range(n)
                        ]
                    )
                )
    return torch.stack(rows).mean(0)


def brute_force_trak(task, measurement, damping, kernel, seed=0, checkpoint=-1, weights=None):
    """TRAK for one checkpoint with explicit loops; numerator from w_i phi_i.

    w_i = 1 - p_i at this checkpoint unless ``weights`` (n,) are given (Qbar).
    """
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
            w = weight if weights is None else weights
            num = sum(w[i] * phi[i] for i in range(n) if gid[i] == j)
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


@pytest.mark.parametrize("q_average", ["model", "ensemble"])
@pytest.mark.parametrize("kernel", ["points", "groups"])
def test_ensemble_averages_models_and_checkpoints(q_average, kernel):
    """mean_t phi_q^t (K_t + lambda I)^{-1} sum_{i in G} w_i^t phi_i^t, w = 1 - p^t or Qbar."""
    n = 10
    gid = torch.arange(n) if kernel == "points" else torch.arange(n) % 4
    task = tiny_task(gid, int(gid.max()) + 1, n=n)
    others = [perturbed_checkpoints(task.net, seed=s) for s in (5, 6)]
    calls = []

    def ensemble(count):
        calls.append(count)
        return others[:count]

    task.ensemble = ensemble
    method = TRAK(
        proj_dim=D, kernel=kernel, ensemble_size=3, checkpoints="all", q_average=q_average
    )
    got = method.attribute(task)
    assert calls == [2]
    assert got.info["ensemble_models"] == 3 and got.info["num_checkpoints"] == 6
    models = [task.checkpoints, *others]
    qbar = brute_force_qbar(task, models) if q_average == "ensemble" else None
    want = torch.zeros_like(got.scores)
    for e, cks in enumerate(models):
        t = copy.copy(task)
        t.checkpoints = cks
        for c in range(len(cks)):
            want += brute_force_trak(t, "loss", 0.01, kernel, seed=e, checkpoint=c, weights=qbar)
    assert torch.allclose(got.scores, want / 6, atol=1e-10)


@pytest.mark.parametrize("backend", ["factored", "vmap"])
def test_ensemble_weights_group_scores_are_member_sums(backend):
    """With Qbar the points-kernel group score is still the sum of its members' scores, and
    the group kernel's one capture pass (factored) equals the two streams (vmap)."""
    n = 20
    task = tiny_task(torch.arange(n), n, n=n)
    other = perturbed_checkpoints(task.net, seed=7)
    gid = torch.arange(n) % 6
    tasks = {}
    for name, (ids, k) in {"per": (torch.arange(n), n), "grp": (gid, 6)}.items():
        tasks[name] = tiny_task(ids, k, n=n)
        tasks[name].ensemble = lambda count: [other]
    kw = {"proj_dim": D, "ensemble_size": 2, "q_average": "ensemble", "backend": backend}
    per = TRAK(kernel="points", **kw).attribute(tasks["per"]).scores
    grp = TRAK(kernel="points", **kw).attribute(tasks["grp"]).scores
    member = tasks["grp"].grouping.membership(torch.float64)
    assert torch.allclose(grp, member.T @ per, atol=1e-10)
    fused = TRAK(kernel="groups", **kw).attribute(tasks["grp"]).scores
    kw["backend"] = "loop"
    ref = TRAK(kernel="groups", **kw).attribute(tasks["grp"]).scores
    assert torch.allclose(fused, ref, atol=1e-10, rtol=1e-8)


def test_one_checkpoint_q_average_does_not_matter(monkeypatch):
    """Qbar of one checkpoint is its own 1 - p: no extra forward pass, the same scores."""
    n = 12
    task = tiny_task(torch.arange(n) % 5, 5, n=n)
    a = TRAK(proj_dim=D, kernel="groups", q_average="model").attribute(task).scores
    calls = []
    real = TRAK._mean_q
    monkeypatch.setattr(TRAK, "_mean_q", lambda self, *a: calls.append(1) or real(self, *a))
    b = TRAK(proj_dim=D, kernel="groups", q_average="ensemble").attribute(task).scores
    assert not calls and torch.equal(a, b)
    # with two checkpoints Qbar is formed, and it matters
    c = TRAK(proj_dim=D, kernel="groups", checkpoints="all").attribute(task).scores
    d = TRAK(proj_dim=D, kernel="groups", checkpoints="all", q_average="model")
    assert calls and not torch.allclose(c, d.attribute(task).scores, atol=1e-8)


def test_query_output_margin_differentiates_the_margin_of_a_loss_property():
    n = 12
    task = tiny_task(torch.arange(n), n, kind="mlp", measurement="loss", n=n)
    got = TRAK(proj_dim=D, kernel="points", damping=0.1, query_output="margin").attribute(task)
    want = brute_force_trak(task, "margin", 0.1, "points")
    assert torch.allclose(got.scores, want, atol=1e-10)
    assert task.queries.measurement == "loss"  # the caller's task is left as it was
    # per query it rescales the loss query's scores by 1 / (1 - p_q) > 0
    loss = TRAK(proj_dim=D, kernel="points", damping=0.1).attribute(task).scores
    ratio = got.scores / loss
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-6)
    assert (ratio > 1).all()


def test_query_output_margin_refuses_a_function_property():
    import dataclasses

    from ggda.errors import GGDAError

    n = 8
    task = tiny_task(torch.arange(n), n, n=n)
    task.queries = dataclasses.replace(task.queries, fn=lambda logits, y: logits.sum(1))
    with pytest.raises(GGDAError, match="query_output=property"):
        TRAK(proj_dim=D, query_output="margin").attribute(task)


def test_member_fraction_uses_subset_members_only():
    """member_fraction < 1: ensemble(count, fraction) gives all the models, not the base."""
    n = 10
    task = tiny_task(torch.arange(n), n, n=n)
    others = [perturbed_checkpoints(task.net, seed=s) for s in (5, 6)]
    calls = []

    def ensemble(count, fraction=1.0):
        calls.append((count, fraction))
        return others[:count]

    task.ensemble = ensemble
    got = TRAK(proj_dim=D, kernel="points", ensemble_size=2, member_fraction=0.5).attribute(task)
    assert calls == [(2, 0.5)] and got.info["ensemble_models"] == 2
    qbar = brute_force_qbar(task, [[cks[-1]] for cks in others])
    want = torch.zeros_like(got.scores)
    for e, cks in enumerate(others):
        t = copy.copy(task)
        t.checkpoints = cks
        want += brute_force_trak(t, "loss", 0.01, "points", seed=e, weights=qbar)
    assert torch.allclose(got.scores, want / 2, atol=1e-10)


def test_member_fraction_without_pipeline_is_a_clear_error():
    from ggda.errors import GGDAError

    task = tiny_task(torch.arange(8), 8, n=8)
    with pytest.raises(GGDAError, match="member_fraction=0.5.*member_fraction=1"):
        TRAK(proj_dim=D, ensemble_size=2, member_fraction=0.5).attribute(task)


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
        ({"q_average": "median"}, "method.q_average"),
        ({"query_output": "loss"}, "method.query_output"),
        ({"member_fraction": 0.0}, "method.member_fraction"),
        ({"member_fraction": 1.5}, "method.member_fraction"),
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


@pytest.mark.slow
def test_cli_subset_trained_ensemble(tmp_path):
    """`method.member_fraction=0.5`: two members trained on their own halves, cached with
    the fraction in their metadata, the base model not among TRAK's models."""
    import json

    from factory import run_cli

    args = [
        "experiment=smoke",
        "logger=none",
        "method=trak",
        "method.ensemble_size=2",
        "method.member_fraction=0.5",
        "method.query_output=margin",
        "evaluation=none",
    ]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Training ensemble member seed=1 on 0.5 of the training set" in res.stdout + res.stderr
    (run,) = [p.parent for p in tmp_path.rglob("metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["attribution/ensemble_models"] == 2
    metas = [json.loads(p.read_text())["meta"] for p in tmp_path.rglob("models/*/manifest.json")]
    assert sorted(m.get("fraction", 1.0) for m in metas) == [0.5, 0.5, 1.0]
    assert torch.isfinite(torch.load(run / "scores.pt")).all()
    # a second run reuses every model: nothing is trained again
    res = run_cli(args, tmp_path)
    assert res.returncode == 0 and "Training ensemble member" not in res.stdout + res.stderr


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
