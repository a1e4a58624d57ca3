"""Layer rules of the factored path equal autograd, per rule and on the shipped nets (float64)."""

import logging

import pytest
import torch
from torch import nn

from ggda.gradients import (
    capture_factors,
    fallback_params,
    group_gradients,
    per_sample_gradients,
    per_sample_inner_products,
    select_params,
)
from ggda.gradients.layers import group_layer_gradients
from ggda.models.functional import margin, neg_loss, per_example_loss
from ggda.models.nets import CNN, MLP, ResNet9, TextClassifier


def _brute(net, x, y, fn, names=None):
    """(n, p) per-sample gradients from one plain backward per point."""
    live = dict(net.named_parameters())
    names = names or list(live)
    rows = []
    for i in range(len(y)):
        out = fn(net(x[i : i + 1]), y[i : i + 1]).sum()
        gs = torch.autograd.grad(out, [live[k] for k in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(live[k])).reshape(-1)
                    for g, k in zip(gs, names, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _ids(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, k, (n,), generator=g)
    ids[:k] = torch.arange(k)
    return ids


class _Seq(nn.Module):
    """x -> layer -> flatten -> linear head (the head makes the loss depend on all outputs)."""

    def __init__(self, layer: nn.Module, feat: int, c: int = 3) -> None:
        super().__init__()
        self.layer = layer
        self.fc = nn.Linear(feat, c)

    def forward(self, x):
        h = self.layer(x)
        if h.ndim > 2 and isinstance(self.layer, nn.Linear):
            h = torch.tanh(h).mean(1)  # tokens: mean over positions
        return self.fc(torch.tanh(h.flatten(1)))


def _randomise_bn(net):
    g = torch.Generator().manual_seed(5)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return net


def _cases():
    """(name, net, x) for one layer of each rule (and configurations of it)."""
    torch.manual_seed(0)
    n = 7
    img = torch.randn(n, 2, 7, 7, dtype=torch.float64)
    ids = torch.randint(0, 9, (n, 5))
    ids[0, :3] = 0  # padding tokens
    ids[1] = 0  # all padding: a zero bag
    cases = [
        ("linear_tokens", _Seq(nn.Linear(4, 3), 3), torch.randn(n, 5, 4, dtype=torch.float64)),
        ("conv", _Seq(nn.Conv2d(2, 3, 3, padding=1), 3 * 49), img),
        (
            "conv_strided_dilated",
            _Seq(nn.Conv2d(2, 3, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1)), 3 * 16),
            img,
        ),
        ("conv_nobias", _Seq(nn.Conv2d(2, 4, 2, stride=3, bias=False), 4 * 4), img),
        ("embedding_pad", _Seq(nn.Embedding(9, 3, padding_idx=0), 15), ids),
        ("bag_mean", _Seq(nn.EmbeddingBag(9, 3, mode="mean", padding_idx=0), 3), ids),
        ("bag_sum", _Seq(nn.EmbeddingBag(9, 3, mode="sum"), 3), ids),
        ("bn1d", _Seq(nn.BatchNorm1d(4), 4), torch.randn(n, 4, dtype=torch.float64)),
        ("bn1d_seq", _Seq(nn.BatchNorm1d(4), 12), torch.randn(n, 4, 3, dtype=torch.float64)),
        ("bn2d", _Seq(nn.BatchNorm2d(2), 2 * 49), img),
        ("layernorm", _Seq(nn.LayerNorm([5, 4]), 20), torch.randn(n, 5, 4, dtype=torch.float64)),
    ]
    return [(nm, _randomise_bn(net.double().eval()), x) for nm, net, x in cases]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_equals_autograd_per_sample(case):
    _, net, x = case
    y = torch.arange(x.shape[0]) % 3
    params = select_params(net)
    factors, rest = capture_factors(net, params, x, y, per_example_loss)
    assert rest == [] and {f.name for f in factors} == {"layer", "fc"}
    # each rule's per-point gradient (singleton groups) against one backward per point
    n = x.shape[0]
    per = {}
    for f in factors:
        per |= group_layer_gradients(f, torch.arange(n), n)
    got = torch.cat([per[k].reshape(n, -1) for k in params], 1)
    assert torch.allclose(got, _brute(net, x, y, per_example_loss), atol=1e-12)
    assert fallback_params(net, params) == 0


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_group_gradients_equal_loop(case):
    _, net, x = case
    y = torch.arange(x.shape[0]) % 3
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    ref = group_gradients(net, x, y, ids, 3, margin, backend="loop")
    got = group_gradients(net, x, y, ids, 3, margin, backend="factored", max_points=2)
    assert torch.allclose(got, ref, atol=1e-12)


def test_unsupported_configurations_fall_back():
    grouped = _Seq(nn.Conv2d(2, 4, 3, groups=2), 4 * 25).double().eval()
    reflect = _Seq(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), 3 * 49).double().eval()
    bn_train = _Seq(nn.BatchNorm1d(4), 4).double().train()
    for net, conv_params in ((grouped, 36 + 4), (reflect, 54 + 3), (bn_train, 8)):
        assert fallback_params(net, select_params(net)) == conv_params


def _shipped(kind: str):
    torch.manual_seed(1)
    n = 9
    if kind == "mlp":
        net, x = MLP((6,), 3, hidden=[5, 4]), torch.randn(n, 6)
    elif kind == "cnn":
        net, x = CNN((1, 8, 8), 3, channels=[2, 3], hidden=4), torch.randn(n, 1, 8, 8)
    elif kind == "resnet9":
        net, x = ResNet9((3, 8, 8), 3, width=2), torch.randn(n, 3, 8, 8)
    else:
        net = TextClassifier((6,), 3, vocab_size=11, embed_dim=4, hidden=[3])
        x = torch.randint(0, 11, (n, 6))
        x[0, 2:] = 0  # padding
    net = _randomise_bn(net.double().eval())
    x = x.double() if x.is_floating_point() else x
    return net, x, torch.arange(n) % 3


SHIPPED = ["mlp", "cnn", "resnet9", "text"]


@pytest.mark.parametrize("kind", SHIPPED)
def test_shipped_nets_never_fall_back(kind, caplog):
    net, x, y = _shipped(kind)
    params = select_params(net)
    assert fallback_params(net, params) == 0
    ids = _ids(9, 4, seed=2)
    with caplog.at_level(logging.WARNING):
        got = group_gradients(net, x, y, ids, 4, per_example_loss, backend="factored")
    assert not [r for r in caplog.records if "no layer rule" in r.message]
    ref = group_gradients(net, x, y, ids, 4, per_example_loss, backend="loop")
    assert torch.allclose(got, ref, atol=1e-11)
    per = per_sample_gradients(net, x, y, per_example_loss, backend="factored")
    assert torch.allclose(per, _brute(net, x, y, per_example_loss), atol=1e-11)


@pytest.mark.parametrize("kind", SHIPPED)
@pytest.mark.parametrize("grouped", [False, True])
def test_shipped_inner_products_equal_explicit_dots(kind, grouped):
    net, x, y = _shipped(kind)
    qx, qy = x[:4], (y[:4] + 1) % 3
    g_train = _brute(net, x, y, per_example_loss)
    g_query = _brute(net, qx, qy, neg_loss)
    ref = g_train @ g_query.T
    kw = {}
    if grouped:
        ids = _ids(9, 3, seed=3)
        kw = {"group_ids": ids, "k": 3}
        ref = torch.zeros(3, 4, dtype=ref.dtype).index_add_(0, ids, ref)
    got = per_sample_inner_products(net, x, y, per_example_loss, qx, qy, neg_loss, chunk=4, **kw)
    assert torch.allclose(got, ref, atol=1e-11)


def test_inner_products_choose_per_layer_form():
    """The plan: ghost for plain Linear rows at k = n, materialise for conv positions."""
    from ggda.gradients.inner import _plan

    net, x, y = _shipped("cnn")
    params = select_params(net)
    tf, _ = capture_factors(net, params, x[:1], y[:1], per_example_loss)
    plans = {f.name: _plan(f, f, 1000, 1000, 100) for f in tf}
    assert plans["body.0"] == "materialise" and plans["fc"] == "ghost"
    # few groups: materialising the (k, p) group gradients beats n m (in + out)
    assert _plan(tf[-1], tf[-1], 100_000, 10, 1000) == "materialise"
    # embedding: sparse group gradients for many groups, dense ones for few
    net, x, y = _shipped("text")
    (emb, *_), _ = capture_factors(net, select_params(net), x[:1], y[:1], per_example_loss)
    assert emb.kind == "embedding"
    assert _plan(emb, emb, 10_000, 10_000, 1000) == "sparse"
    assert _plan(emb, emb, 10_000, 10, 1000) == "dense_groups"


class _Scaled(nn.Module):
    """A custom layer type with its own parameter (no rule): the fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.scale


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(5, 4)
        self.custom = _Scaled(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.custom(self.lin(x))))


def test_unsupported_layer_falls_back_warns_once_and_is_counted(caplog):
    net = _Custom().double().eval()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.arange(10) % 3
    params = select_params(net)
    assert fallback_params(net, params) == 4
    ids = _ids(10, 3, seed=1)
    with caplog.at_level(logging.WARNING):
        got = group_gradients(net, x, y, ids, 3, per_example_loss, backend="factored")
        ip = per_sample_inner_products(net, x, y, per_example_loss, x[:3], y[:3], neg_loss)
        group_gradients(net, x, y, ids, 3, margin, backend="factored", max_points=2)
    warns = [r.getMessage() for r in caplog.records if "no layer rule" in r.getMessage()]
    assert len(warns) == 1 and "_Scaled (4 parameters)" in warns[0]
    ref = group_gradients(net, x, y, ids, 3, per_example_loss, backend="loop")
    assert torch.allclose(got, ref, atol=1e-12)
    dots = _brute(net, x, y, per_example_loss) @ _brute(net, x[:3], y[:3], neg_loss).T
    assert torch.allclose(ip, dots, atol=1e-12)


def test_methods_report_fallback_params():
    from factory import tiny_task
    from ggda.attribution.tracin import TracIn
    from ggda.attribution.trak import TRAK

    ids = _ids(24, 4, seed=0)
    for method in (TracIn(), TracIn(proj_dim=6), TRAK(proj_dim=6)):
        assert method.attribute(tiny_task(ids, 4)).info["fallback_params"] == 0
    task = tiny_task(ids, 4)
    task.net = _CustomHead().double().eval()
    task.checkpoints = [
        type(task.checkpoints[0])(task.net.state_dict(), 0.1, 1),
    ]
    res = TracIn().attribute(task)
    assert res.info["fallback_params"] == 3
    ref = TracIn(backend="loop").attribute(task)
    assert torch.allclose(res.scores, ref.scores, atol=1e-10)


class _CustomHead(nn.Module):
    """An MLP on the tiny data (5 features, 3 classes) with a custom scaling layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(5, 3)
        self.custom = _Scaled(3)

    def forward(self, x):
        return self.custom(self.lin(x))


def _weighted_brute(net, x, y, fn, w, ids, k):
    """(k, p): sum_{i in G} w_i grad fn(z_i) from one plain backward per point."""
    per = _brute(net, x, y, fn) * w[:, None]
    return torch.zeros(k, per.shape[1], dtype=per.dtype).index_add_(0, ids, per)


@pytest.mark.parametrize(
    "case", CASES + [(k, *_shipped(k)[:2]) for k in SHIPPED], ids=lambda c: c[0]
)
def test_weighted_pair_from_one_pass_equals_brute_force(case):
    # TRAK's group kernel takes the margin features and the loss gradient from one
    # capture: grad loss_i = -(1 - p_i) grad margin_i.
    from ggda.attribution.trak import loss_weight
    from ggda.gradients import iter_weighted_group_gradients

    _, net, x = case
    n = x.shape[0]
    y = torch.arange(n) % 3
    ids = _ids(n, 3, seed=4)
    got_plain = torch.zeros(3, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    got_w = torch.zeros_like(got_plain)
    for groups, plain, weighted in iter_weighted_group_gradients(
        net, x, y, ids, 3, margin, loss_weight, max_points=2
    ):
        got_plain[groups], got_w[groups] = plain, weighted
    assert torch.allclose(got_plain, group_gradients(net, x, y, ids, 3, margin, backend="loop"))
    with torch.no_grad():
        w = loss_weight(net(x), y)
    assert torch.allclose(got_w, _weighted_brute(net, x, y, margin, w, ids, 3), atol=1e-11)
    # ... which is the group loss gradient
    ref_loss = group_gradients(net, x, y, ids, 3, per_example_loss, backend="loop")
    assert torch.allclose(got_w, ref_loss, atol=1e-11)


def test_weighted_pair_refuses_parameters_without_a_rule():
    from ggda.attribution.trak import loss_weight
    from ggda.gradients import iter_weighted_group_gradients

    net = _Seq(nn.Conv2d(2, 4, 3, groups=2), 4 * 25).double().eval()
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="no rule covers"):
        next(
            iter_weighted_group_gradients(
                net, x, torch.arange(4) % 3, torch.arange(4), 4, margin, loss_weight
            )
        )


@pytest.mark.parametrize(
    "sizes,budget",
    [([3, 3, 3, 3], 7), ([4, 2, 2, 1, 0], 4), ([5, 3], 2), ([1] * 6, 4)],
    ids=["equal", "unequal", "group_over_budget", "singletons"],
)
def test_capture_batches_cover_each_point_once(sizes, budget):
    from ggda.gradients.group import capture_batches

    s = max(max(sizes), 1)
    members = torch.full((len(sizes), s), -1)
    nxt = 0
    for r, z in enumerate(sizes):
        members[r, :z] = torch.arange(nxt, nxt + z)
        nxt += z
    seen = []
    for pts, lo, rows, slot in capture_batches(members, budget, torch.device("cpu")):
        assert 0 < pts.numel() <= budget and pts.shape == slot.shape
        assert lo >= 0 and lo + rows <= len(sizes)
        assert bool((slot >= 0).all() and (slot < rows).all())
        for p, sl in zip(pts.tolist(), slot.tolist(), strict=True):  # each point in its row
            assert p in members[lo + sl].tolist()
        if max(sizes) <= budget:  # whole groups per batch: no group split across batches
            assert sum(sizes[lo : lo + rows]) == pts.numel()
        seen += pts.tolist()
    assert sorted(seen) == list(range(sum(sizes)))


@pytest.mark.parametrize("kind", SHIPPED)
def test_small_capture_batches_equal_loop(kind, monkeypatch):
    """Capture batches of 2 points split groups (sizes 1-4) across batches: same sums."""
    import ggda.gradients.group as group_mod
    from ggda.gradients.projection import KroneckerProjector

    net, x, y = _shipped(kind)
    params = select_params(net)
    per_point = group_mod.factor_elems(net, params, x[:1], y[:1], per_example_loss)
    monkeypatch.setattr(group_mod, "FACTOR_ELEMS", 2 * per_point)
    monkeypatch.setattr("ggda.gradients.inner.GROUP_ELEMS", 50)  # dense blocks of 1 group
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 2, 3, 3])  # sizes 1, 2, 4, 2
    ref = group_gradients(net, x, y, ids, 4, per_example_loss, backend="loop")
    got = group_gradients(net, x, y, ids, 4, per_example_loss, backend="factored")
    assert torch.allclose(got, ref, atol=1e-11)
    proj = KroneckerProjector(net, params, 24, seed=5)
    kr = group_gradients(net, x, y, ids, 4, per_example_loss, projector=proj, backend="factored")
    assert torch.allclose(kr, proj(ref), atol=1e-11)
    qx, qy = x[:3], (y[:3] + 1) % 3
    q = _brute(net, qx, qy, neg_loss)
    ip = per_sample_inner_products(
        net, x, y, per_example_loss, qx, qy, neg_loss, chunk=2, group_ids=ids, k=4
    )
    assert torch.allclose(ip, ref @ q.T, atol=1e-11)


@pytest.mark.parametrize("kind", SHIPPED)
@pytest.mark.parametrize("blocks", [0, 1, 2], ids=["pass_per_query_batch", "held", "held_2_blocks"])
def test_query_batches_equal_explicit_dots(kind, blocks, monkeypatch):
    """Queries in several batches: one training pass per batch, or the group gradients
    held (in blocks) and the query gradients streamed past them."""
    import ggda.gradients.inner as inner_mod

    net, x, y = _shipped(kind)
    p = sum(v.numel() for v in select_params(net).values())
    monkeypatch.setattr(inner_mod, "QUERY_ELEMS", 1)  # one query per batch
    monkeypatch.setattr(inner_mod, "HELD_ELEMS", 2 * p if blocks == 2 else 10**9 if blocks else 1)
    calls = []
    real = inner_mod.group_gradients
    monkeypatch.setattr(
        inner_mod, "group_gradients", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    ids = _ids(9, 3, seed=4)
    qx, qy = x[:5], (y[:5] + 2) % 3
    ref = torch.zeros(3, 5, dtype=torch.float64).index_add_(
        0, ids, _brute(net, x, y, per_example_loss) @ _brute(net, qx, qy, neg_loss).T
    )
    got = per_sample_inner_products(
        net, x, y, per_example_loss, qx, qy, neg_loss, group_ids=ids, k=3
    )
    assert torch.allclose(got, ref, atol=1e-11)
    assert len(calls) == blocks


@pytest.mark.parametrize("kind", SHIPPED)
def test_output_pieces_of_one_capture_batch_equal_loop(kind, monkeypatch):
    """One capture batch of all points, its output in pieces of one group: same sums,
    plain, Kronecker-projected and weighted (the factors sliced per piece)."""
    import ggda.gradients.group as group_mod
    from ggda.gradients import iter_weighted_group_gradients
    from ggda.gradients.projection import KroneckerProjector

    net, x, y = _shipped(kind)
    monkeypatch.setattr(group_mod, "FACTORED_CHUNK_ELEMS", 1)  # pieces of one row
    ids = _ids(9, 4, seed=6)
    ref = group_gradients(net, x, y, ids, 4, margin, backend="loop")
    pieces = list(group_mod.iter_group_gradients(net, x, y, ids, 4, margin, backend="factored"))
    assert len(pieces) == 4 and all(g.shape[0] == 1 for _, g in pieces)
    got = group_gradients(net, x, y, ids, 4, margin, backend="factored")
    assert torch.allclose(got, ref, atol=1e-11)
    proj = KroneckerProjector(net, select_params(net), 24, seed=2)
    monkeypatch.setattr(group_mod, "FACTORED_CHUNK_ELEMS", 10**9)
    kr = group_gradients(net, x, y, ids, 4, margin, projector=proj, backend="factored",
                         max_elems=proj.d)  # fmt: skip
    assert torch.allclose(kr, proj(ref), atol=1e-11)
    w_ref = torch.zeros_like(ref)
    for j in range(4):  # weighted: grad sum_i w_i margin_i with w_i = margin_i (constants)
        sel = (ids == j).nonzero().squeeze(1)
        wts = margin(net(x[sel]), y[sel]).detach()
        out = (margin(net(x[sel]), y[sel]) * wts).sum()
        gs = torch.autograd.grad(out, list(net.parameters()), allow_unused=True)
        w_ref[j] = torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(gs, net.parameters(), strict=True)
        ])  # fmt: skip
    monkeypatch.setattr(group_mod, "FACTORED_CHUNK_ELEMS", 1)
    plain, weighted = torch.zeros_like(ref), torch.zeros_like(ref)
    for groups, g, gw in iter_weighted_group_gradients(
        net, x, y, ids, 4, margin, lambda lg, yy: margin(lg, yy)
    ):
        plain[groups], weighted[groups] = g, gw
    assert torch.allclose(plain, ref, atol=1e-11)
    assert torch.allclose(weighted, w_ref, atol=1e-10)
