"""K-FAC / EK-FAC: exact cases against the Gauss-Newton matrix, factors against brute-force
per-sample autograd (Linear, Conv2d, Embedding, BatchNorm, fallback), group = M^T
per-sample, self-influence, the factor cache and the memory guard."""

import pytest
import torch
from torch import nn

from factory import tiny_data, tiny_task
from ggda.attribution.base import AttributionTask, Checkpoint
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.kfac import FactorFitter
from ggda.attribution.properties import PropertyExamples
from ggda.errors import ConfigError
from ggda.gradients import select_params
from ggda.grouping import RandomGrouper
from ggda.grouping.base import Grouping, GroupingInputs
from ggda.models.functional import per_example_loss
from ggda.models.nets import CNN, LogisticRegression, ResNet9, TextClassifier


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _flat_params(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _mean_loss_fn(net, x, y, loss_fn):
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def f(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        prm = {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}
        return loss_fn(torch.func.functional_call(net, prm, (x,)), y).mean()

    return f


def _per_sample_grads(net, x, y, loss_fn):
    """(n, p) per-sample gradients by one plain backward per point."""
    rows = []
    for i in range(y.shape[0]):
        net.zero_grad()
        loss_fn(net(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


def _kron_basis(blk):
    """Eigenbasis (p, p) of a linear block in the flat (weight row-major, then bias) layout."""
    q = torch.kron(blk.qs, blk.qa)  # row-major vec of [W, b] (out, in+1)
    out, inb = blk.out_dim, blk.in_dim
    idx = torch.arange(out * inb).reshape(out, inb)
    perm = torch.cat([idx[:, :-1].reshape(-1), idx[:, -1]]) if blk.bias else idx.reshape(-1)
    return q[perm]  # rows in the flat layout


# -- exact cases ------------------------------------------------------------------------


def _squared_problem(n=30, d=4, c=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    targets = torch.randn(n, c, generator=g)
    torch.manual_seed(0)
    net = nn.Linear(d, c)

    def sq(logits, idx):  # y carries the row index of the regression target
        return 0.5 * ((logits - targets[idx]) ** 2).sum(-1)

    return net, x, torch.arange(n), sq


@pytest.mark.parametrize("ekfac", [False, True])
def test_linear_squared_loss_equals_damped_gauss_newton(ekfac):
    """One linear layer, squared loss: G = I (x) E[a~ a~^T] is Kronecker, so K-FAC and
    EK-FAC (exact Fisher) invert it exactly."""
    net, x, y, sq = _squared_problem()
    fac = FactorFitter(net, select_params(net), x, y, fisher="exact", chunk=7, loss_fn=sq).fit(
        ekfac=ekfac
    )
    theta = _flat_params(net)
    h = torch.autograd.functional.hessian(_mean_loss_fn(net, x, y, sq), theta)
    v = torch.randn(5, theta.numel(), generator=torch.Generator().manual_seed(1))
    want = torch.linalg.solve(h + 0.1 * torch.eye(theta.numel()), v.T).T
    got = fac.precondition(v, 0.1, "absolute", ekfac=ekfac)
    assert torch.allclose(got, want, atol=1e-10)


def _ggn(net, x, y):
    """(1/n) sum_i J_i^T Lambda_i J_i for cross-entropy, by autograd per point."""
    theta = _flat_params(net)
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    total = 0
    for i in range(y.shape[0]):

        def out(t, i=i):
            parts = torch.split(t, [s.numel() for s in shapes])
            prm = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes, strict=True)}
            return torch.func.functional_call(net, prm, (x[i : i + 1],))[0]

        jac = torch.autograd.functional.jacobian(out, theta)  # (C, p)
        p = torch.softmax(out(theta), -1)
        lam = torch.diag(p) - p[:, None] * p[None, :]
        total = total + jac.T @ lam @ jac
    return total / y.shape[0]


def test_ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_basis():
    """Logistic regression with CE: EK-FAC's fitted eigenvalues = diag(Q^T G Q), and its
    inverse is that of Q diag(.) Q^T (+ damping); K-FAC's l_S l_A^T differ from them."""
    x, y, _, _ = tiny_data(n=20)
    torch.manual_seed(0)
    net = LogisticRegression((5,), 3).double().eval()
    fac = FactorFitter(net, select_params(net), x, y, fisher="exact", chunk=6).fit(ekfac=True)
    (blk,) = fac.blocks
    q = _kron_basis(blk)
    g = _ggn(net, x, y)
    diag = torch.diagonal(q.T @ g @ q)
    assert torch.allclose(blk.ev.reshape(-1), diag, atol=1e-10)
    assert not torch.allclose((blk.ls[:, None] * blk.la[None, :]).reshape(-1), diag, atol=1e-4)
    v = torch.randn(3, q.shape[0], generator=torch.Generator().manual_seed(2))
    want = torch.linalg.solve(q @ torch.diag(diag + 0.05) @ q.T, v.T).T
    assert torch.allclose(fac.precondition(v, 0.05, ekfac=True), want, atol=1e-10)


def test_relative_damping_is_scaled_by_the_mean_eigenvalue():
    net, x, y, sq = _squared_problem()
    fac = FactorFitter(net, select_params(net), x, y, fisher="exact", loss_fn=sq).fit()
    (blk,) = fac.blocks
    mean_ev = float((blk.ls[:, None] * blk.la[None, :]).mean())
    v = torch.randn(2, 15, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(
        fac.precondition(v, 0.3, "relative"), fac.precondition(v, 0.3 * mean_ev, "absolute")
    )


def test_true_fisher_is_seeded_and_chunking_invariant():
    x, y, _, _ = tiny_data(n=30)
    torch.manual_seed(0)
    net = LogisticRegression((5,), 3).double().eval()
    prm = select_params(net)
    a = FactorFitter(net, prm, x, y, fisher="true", seed=3, chunk=7).fit()
    b = FactorFitter(net, prm, x, y, fisher="true", seed=3, chunk=11).fit()
    c = FactorFitter(net, prm, x, y, fisher="true", seed=4, chunk=7).fit()
    e = FactorFitter(net, prm, x, y, fisher="exact").fit()
    assert torch.allclose(a.blocks[0].ls, b.blocks[0].ls, atol=1e-12)
    assert not torch.allclose(a.blocks[0].ls, c.blocks[0].ls, atol=1e-6)
    # one sampled label per point estimates the exact expectation (loosely, n = 30)
    s_true = a.blocks[0].qs @ torch.diag(a.blocks[0].ls) @ a.blocks[0].qs.T
    s_exact = e.blocks[0].qs @ torch.diag(e.blocks[0].ls) @ e.blocks[0].qs.T
    assert (s_true - s_exact).norm() < 0.8 * s_exact.norm()


# -- factors against brute-force per-sample autograd ---------------------------------------


def _output_grads(net, mod, x, y, loss_fn):
    """Per point: (layer input, gradient w.r.t. the layer output) by one backward each."""
    ins, outs = [], []
    for i in range(y.shape[0]):
        keep = {}

        def hook(m, inp, out, keep=keep):
            out.retain_grad()
            keep["in"], keep["out"] = inp[0].detach(), out

        h = mod.register_forward_hook(hook)
        loss_fn(net(x[i : i + 1]), y[i : i + 1]).sum().backward()
        h.remove()
        ins.append(keep["in"][0])
        outs.append(keep["out"].grad[0])
    return ins, outs


def _patches(x, k=3, pad=1):
    """(H*W, C*k*k) patches of one (C, H, W) image by explicit slicing (stride 1)."""
    c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = [xp[:, i : i + k, j : j + k].reshape(-1) for i in range(h) for j in range(w)]
    return torch.stack(rows)


def test_conv2d_factors_equal_sums_of_per_sample_outer_products():
    n = 10
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    net = CNN((2, 6, 6), 3, channels=[3], hidden=4).double().eval()
    conv = net.body[0]
    fac = FactorFitter(net, select_params(net), x, y, fisher="empirical", chunk=4).fit(ekfac=True)
    blk = next(b for b in fac.blocks if b.kind == "conv2d")
    ins, outs = _output_grads(net, conv, x, y, per_example_loss)
    a_sum = torch.zeros(2 * 9 + 1, 2 * 9 + 1)
    s_sum = torch.zeros(3, 3)
    ev = torch.zeros(3, 19)
    for xi, gi in zip(ins, outs, strict=True):
        pt = torch.cat([_patches(xi), torch.ones(36, 1)], 1)  # (T, in+1)
        go = gi.reshape(3, -1).T  # (T, out)
        a_sum += pt.T @ pt
        s_sum += go.T @ go
        gw = go.T @ pt  # the per-sample [W, b] gradient, (out, in+1)
        ev += (blk.qs.T @ gw @ blk.qa) ** 2
    a, s = a_sum / n, s_sum / (n * 36)  # KFC: A sums positions, S averages them
    assert torch.allclose(blk.qa @ torch.diag(blk.la) @ blk.qa.T, a, atol=1e-10)
    assert torch.allclose(blk.qs @ torch.diag(blk.ls) @ blk.qs.T, s, atol=1e-10)
    assert torch.allclose(blk.ev, ev / n, atol=1e-10)
    # the per-sample gradient assembled from the patches is autograd's
    psg = _per_sample_grads(net, x[:1], y[:1], per_example_loss)[0]
    pt = torch.cat([_patches(ins[0]), torch.ones(36, 1)], 1)
    gw = outs[0].reshape(3, -1) @ pt
    assert torch.allclose(psg[:54], gw[:, :-1].reshape(-1), atol=1e-10)
    assert torch.allclose(psg[54:57], gw[:, -1], atol=1e-10)


def test_embedding_factors_equal_per_sample_sums():
    n, length, vocab = 12, 5, 9
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, length), generator=g)
    x[:, -2:] = 0  # padding
    x[0, :] = 0  # an all-padding row
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    net = TextClassifier((length,), 3, vocab_size=vocab, embed_dim=4, hidden=[3]).double().eval()
    fac = FactorFitter(net, select_params(net), x, y, fisher="empirical", chunk=5).fit(ekfac=True)
    blk = next(b for b in fac.blocks if b.kind == "embedding")
    _, outs = _output_grads(net, net.embedding, x, y, per_example_loss)
    counts = torch.zeros(vocab)
    s_sum = torch.zeros(4, 4)
    ev = torch.zeros(vocab, 4)
    tokens = 0
    for i in range(n):
        gw = torch.zeros(vocab, 4)  # per-sample embedding gradient, by explicit loop
        for t in range(length):
            v = int(x[i, t])
            if v == 0:
                continue
            counts[v] += 1
            s_sum += torch.outer(outs[i][t], outs[i][t])
            gw[v] += outs[i][t]
            tokens += 1
        ev += (gw @ blk.qs) ** 2
    assert torch.allclose(blk.la, counts / n, atol=1e-12)
    assert torch.allclose(blk.qs @ torch.diag(blk.ls) @ blk.qs.T, s_sum / tokens, atol=1e-10)
    assert torch.allclose(blk.ev, ev / n, atol=1e-10)


def test_batchnorm_and_fallback_params_get_the_diagonal_fisher():
    """ResNet-9 (BatchNorm affine params: diagonal from the captured factors) and a net with
    LayerNorm (no rule: vmap fallback): both equal (1/n) sum_i g_i^2 by autograd."""
    n = 6
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    res = ResNet9((3, 8, 8), 3, width=2).double().eval()
    ln = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3)).eval()
    for net, x in ((res, torch.randn(n, 3, 8, 8, generator=g)), (ln, torch.randn(n, 5))):
        for mod in net.modules():  # non-trivial running statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        y = torch.randint(0, 3, (n,), generator=g)
        prm = select_params(net)
        fac = FactorFitter(net, prm, x, y, fisher="empirical", chunk=4).fit()
        psg = _per_sample_grads(net, x, y, per_example_loss)
        sq = dict(
            zip(prm, torch.split((psg**2).mean(0), [v.numel() for v in prm.values()]), strict=True)
        )
        norm_names = [k for k in prm if ("1.weight" in k or "1.bias" in k) and prm[k].ndim == 1]
        assert fac.diag and set(fac.diag) == set(norm_names)
        for k, v in fac.diag.items():
            assert torch.allclose(v.reshape(-1), sq[k], atol=1e-10), k
        v = torch.randn(2, psg.shape[1])
        assert torch.isfinite(fac.precondition(v, 0.1, ekfac=False)).all()


# -- influence in group form ---------------------------------------------------------------


@pytest.mark.parametrize("solver", ["kfac", "ekfac"])
def test_group_scores_equal_member_sums_and_brute_force(solver):
    n = 24
    x, y, _, _ = tiny_data(n=n)
    grp = RandomGrouper(5, seed=1).group(GroupingInputs(x, y, 3))
    method = InfluenceFunction(solver=solver, damping=0.1, last_layer=False, fisher="exact")
    task = tiny_task(torch.arange(n), n, kind="mlp", n=n)
    per = method.attribute(task).scores
    got = method.attribute(tiny_task(grp.group_ids, grp.k, kind="mlp", n=n)).scores
    m = torch.zeros(n, grp.k)
    m[torch.arange(n), grp.group_ids] = 1.0
    assert torch.allclose(got, m.T @ per, atol=1e-10)
    # brute force: (1/n) P grad f_q . (-grad l_i), P from the factors, per-sample by loops
    net = task.net
    net.load_state_dict(task.checkpoints[-1].state_dict)
    fac = FactorFitter(net, select_params(net), task.x_train, task.y_train, fisher="exact").fit(
        ekfac=solver == "ekfac"
    )
    neg = lambda lg, yy: -per_example_loss(lg, yy)
    qg = _per_sample_grads(net, task.queries.x, task.queries.y, neg)
    tg = _per_sample_grads(net, task.x_train, task.y_train, per_example_loss)
    u = fac.precondition(qg, 0.1, ekfac=solver == "ekfac")
    assert torch.allclose(per, -(tg @ u.T) / n, atol=1e-10)
    # self-influence: k quadratic forms g_G^T P g_G / n
    s = method.self_attribute(tiny_task(grp.group_ids, grp.k, kind="mlp", n=n)).scores[:, 0]
    gg = m.T @ tg
    want = (gg * fac.precondition(gg, 0.1, ekfac=solver == "ekfac")).sum(1) / n
    assert torch.allclose(s, want, atol=1e-10)
    assert (s > 0).all()


def test_all_parameters_of_every_shipped_net_run():
    """CNN, ResNet-9 and the text model: every parameter preconditioned, finite scores."""
    g = torch.Generator().manual_seed(0)
    n = 8
    cases = [
        (CNN((1, 8, 8), 3, channels=[2, 3], hidden=4), torch.randn(n, 1, 8, 8, generator=g)),
        (ResNet9((3, 8, 8), 3, width=2), torch.randn(n, 3, 8, 8, generator=g)),
        (
            TextClassifier((6,), 3, vocab_size=11, embed_dim=4, hidden=[3]),
            torch.randint(0, 11, (n, 6), generator=g),
        ),
    ]
    for net, x in cases:
        net = net.double().eval()
        y = torch.randint(0, 3, (n,), generator=g)
        q = PropertyExamples(x[:2], y[:2], torch.arange(2), 2, torch.ones(2), "loss")
        task = AttributionTask(
            net, [Checkpoint(net.state_dict(), 0.1, 1)], x, y, Grouping(torch.arange(n) % 3, 3), q
        )
        res = InfluenceFunction(
            solver="ekfac", damping=0.1, damping_mode="relative", last_layer=False
        ).attribute(task)
        assert res.scores.shape == (3, 2) and torch.isfinite(res.scores).all()
        assert res.info["num_params"] == sum(p.numel() for p in net.parameters())
        assert res.info["kfac_layers"] >= 2


def test_factors_are_cached_and_reused(tmp_path):
    n = 20
    method = InfluenceFunction(solver="ekfac", damping=0.1, last_layer=False)
    task = tiny_task(torch.arange(n), n, kind="mlp", n=n)
    task.cache_dir = tmp_path
    first = method.attribute(task)
    files = list((tmp_path / "factors").glob("*.pt"))
    assert len(files) == 1 and first.info["factors_cached"] == 0
    assert "factors" in first.timings
    # another grouping and damping reuse them; scores equal a cache-free computation
    grp = RandomGrouper(4, seed=0).group(GroupingInputs(task.x_train, task.y_train, 3))
    task2 = tiny_task(grp.group_ids, grp.k, kind="mlp", n=n)
    task2.cache_dir = tmp_path
    other = InfluenceFunction(solver="ekfac", damping=0.3, last_layer=False)
    second = other.attribute(task2)
    assert second.info["factors_cached"] == 1
    assert len(list((tmp_path / "factors").glob("*.pt"))) == 1
    fresh = other.attribute(tiny_task(grp.group_ids, grp.k, kind="mlp", n=n))
    assert torch.allclose(second.scores, fresh.scores, atol=1e-12)
    # a different Fisher type is a different artifact
    InfluenceFunction(solver="ekfac", fisher="empirical", last_layer=False).attribute(task)
    assert len(list((tmp_path / "factors").glob("*.pt"))) == 2


def test_too_large_layer_names_it_and_the_options():
    n = 10
    task = tiny_task(torch.arange(n), n, kind="mlp", n=n)
    with pytest.raises(ConfigError) as e:
        InfluenceFunction(solver="kfac", max_factor_dim=5, last_layer=False).attribute(task)
    msg = str(e.value)
    assert "method.max_factor_dim" in msg and "body.1" in msg and "method.last_layer=true" in msg
    # the head alone fits (in 4 + 1 bias = 5)
    res = InfluenceFunction(solver="kfac", max_factor_dim=5, last_layer=True).attribute(task)
    assert torch.isfinite(res.scores).all()


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"solver": "kfacc"}, "method.solver"),
        ({"fisher": "model"}, "method.fisher"),
        ({"damping_mode": "rel"}, "method.damping_mode"),
        ({"factor_chunk": 0}, "method.factor_chunk"),
        ({"max_factor_dim": 0}, "method.max_factor_dim"),
    ],
)
def test_validation(kw, key):
    with pytest.raises(ConfigError, match=key):
        InfluenceFunction(**kw)
    assert InfluenceFunction(fisher=True).fisher == "true"  # YAML boolean from the CLI


@pytest.mark.slow
def test_cli_ekfac_factors_are_reused_across_jobs(tmp_path):
    """Two CLI jobs with different k: the second loads the first job's factors."""
    import json

    from factory import run_cli

    common = ["experiment=smoke", "logger=none", "method=ekfac", "evaluation=none"]
    for k, cached in ((8, 0), (4, 1)):
        res = run_cli([*common, f"groups={k}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        # evaluation=none decides the results, so it names the run directory too
        d = tmp_path / f"runs/synthetic/influence/kmeans_k{k}_s0,evaluation=none"
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["attribution/factors_cached"] == cached
        assert metrics["time/attribution/factors"] > 0
    assert len(list((tmp_path / "cache" / "factors").glob("*.pt"))) == 1
    bad = run_cli([*common, "method.fisher=model"], tmp_path)
    assert bad.returncode == 2 and "method.fisher" in bad.stderr
