"""Kronecker projections: exact against the explicit Kronecker product, unbiased inner products."""

import math

import pytest
import torch
from torch import nn

from ggda.gradients import (
    KroneckerProjector,
    group_gradients,
    per_sample_gradients,
    select_params,
)
from ggda.gradients.projection import kron_dims, random_matrix, split_budget
from ggda.models.functional import margin, per_example_loss
from ggda.models.nets import CNN, MLP, ResNet9, TextClassifier


def _net(kind):
    torch.manual_seed(2)
    if kind == "mlp":
        return MLP((6,), 3, hidden=[5]).double().eval(), torch.randn(8, 6).double()
    if kind == "cnn":
        net = CNN((1, 8, 8), 3, channels=[2, 3], hidden=4)
        return net.double().eval(), torch.randn(8, 1, 8, 8).double()
    if kind == "resnet9":
        return ResNet9((3, 8, 8), 3, width=2).double().eval(), torch.randn(8, 3, 8, 8).double()
    net = TextClassifier((6,), 3, vocab_size=11, embed_dim=4, hidden=[3])
    return net.double().eval(), torch.randint(0, 11, (8, 6))


def test_linear_block_equals_explicit_kronecker_product():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4)).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.arange(5) % 4
    params = select_params(net)
    proj = KroneckerProjector(net, params, 8, seed=3)
    (blk,) = proj.blocks
    assert (blk.rows, blk.cols) == (4, 7)  # the bias is the extra input column
    pr, pc = proj.mats(0, "cpu", torch.float64)
    grads = per_sample_gradients(net, x, y, per_example_loss)  # (n, 4*6 + 4)
    gmat = torch.cat([grads[:, :24].reshape(5, 4, 6), grads[:, 24:].reshape(5, 4, 1)], 2)
    # (P_r kron P_c)^T vec_row(G) = vec_row(P_r^T G P_c)
    explicit = gmat.reshape(5, -1) @ torch.kron(pr, pc)
    assert torch.allclose(proj(grads), explicit, atol=1e-12)
    got = group_gradients(
        net, x, y, torch.arange(5), 5, per_example_loss, projector=proj, backend="factored"
    )
    assert torch.allclose(got, explicit, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet9", "text"])
def test_factored_kronecker_equals_projected_autograd(kind):
    net, x = _net(kind)
    y = torch.arange(8) % 3
    params = select_params(net)
    proj = KroneckerProjector(net, params, 40, seed=1)
    assert proj.d <= 40
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    ref = group_gradients(net, x, y, ids, 3, margin, backend="loop")
    got = group_gradients(net, x, y, ids, 3, margin, projector=proj, backend="factored")
    assert torch.allclose(got, proj(ref), atol=1e-11)
    # the same projector on the vmap path (flat gradients) gives the same features
    vm = group_gradients(net, x, y, ids, 3, margin, projector=proj, backend="vmap")
    assert torch.allclose(vm, got, atol=1e-11)
    # linear in the gradient: proj(g) = g @ matrix
    assert torch.allclose(ref @ proj.matrix(dtype=ref.dtype), proj(ref), atol=1e-11)


def test_budget_split_and_dims():
    assert sum(split_budget([1000, 10, 10], 64)) <= 64
    assert split_budget([1000, 10, 10], 64)[0] > 50
    assert min(split_budget([5, 5, 5000], 30)) >= 1
    for rows, cols, b in [(10, 785, 64), (64, 288, 100), (5000, 32, 16), (3, 3, 100)]:
        dr, dc = kron_dims(rows, cols, b)
        assert 1 <= dr <= rows and 1 <= dc <= cols and dr * dc <= b


def test_kronecker_inner_products_unbiased():
    """Mean over 200 seeds of <Phi u, Phi v> is within 3 standard errors of <u, v>."""
    net, x = _net("cnn")
    y = torch.arange(8) % 3
    params = select_params(net)
    g = per_sample_gradients(net, x, y, per_example_loss)
    u, v = g[0:1], g[1:2]
    exact = float((u * v).sum())
    est = []
    for s in range(200):
        proj = KroneckerProjector(net, params, 64, seed=s)
        est.append(float((proj(u) * proj(v)).sum()))
    est = torch.tensor(est, dtype=torch.float64)
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 3 * se
    assert se > 0  # a real random estimate, not the identity


def test_random_matrix_second_moment():
    p = torch.stack([random_matrix(5, 7, s, "rademacher", dtype=torch.float64) for s in range(400)])
    pp = torch.einsum("sij,skj->ik", p, p) / 400
    assert torch.allclose(pp, torch.eye(5, dtype=torch.float64), atol=0.1)


@pytest.mark.parametrize("method", ["tracin", "trak"])
def test_methods_with_kronecker_agree_across_backends(method):
    from factory import tiny_task
    from ggda.attribution.tracin import TracIn
    from ggda.attribution.trak import TRAK

    make = {
        "tracin": lambda b: TracIn(proj_dim=12, proj_structure="kronecker", backend=b),
        "trak": lambda b: TRAK(proj_dim=12, kernel="groups", proj_structure="kronecker", backend=b),
    }[method]
    ids = torch.arange(24) % 5
    meas = "margin" if method == "trak" else "loss"
    ref = make("loop").attribute(tiny_task(ids, 5, "mlp", meas))
    got = make("factored").attribute(tiny_task(ids, 5, "mlp", meas))
    assert torch.allclose(got.scores, ref.scores, atol=1e-9, rtol=1e-7)
    assert got.info["proj_dim_used"] <= 12 and got.info["fallback_params"] == 0


def test_grad_kmeans_kronecker_features():
    from ggda.grouping.features import compute_features

    torch.manual_seed(0)
    net = MLP((6,), 4, hidden=[9]).double().eval()
    x, y = torch.randn(20, 6).double(), torch.arange(20) % 4
    f = compute_features("gradients", x, y, 4, net, proj_dim=12, proj_structure="kronecker", seed=2)
    full = compute_features("gradients", x, y, 4, net, proj_dim=10_000)  # unprojected (n, 4*10)
    d_out, d_in = kron_dims(4, 10, 12)
    p_out = random_matrix(4, d_out, 5, "rademacher", dtype=torch.float64)
    p_in = random_matrix(10, d_in, 6, "rademacher", dtype=torch.float64)
    assert f.shape == (20, d_out * d_in)
    assert torch.allclose(f, full @ torch.kron(p_out, p_in), atol=1e-12)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_a_times_equals_unfolded_patches(stride, padding, dilation):
    """LayerFactors.a_times (conv as r filters) equals unfold(x) @ mat, for two uses."""
    from ggda.gradients.layers import LayerFactors

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation).double()
    uses = []
    for _ in range(2):  # a layer applied twice in the forward pass
        x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
        gout = torch.randn_like(conv(x))
        uses.append((x, gout))
    g = torch.cat([go.flatten(2).transpose(1, 2) for _, go in uses], 1)
    f = LayerFactors("c", conv, "conv2d", None, g, "c.weight", "c.bias", conv_uses=uses)
    mat = torch.randn(f.a_width, 7, dtype=torch.float64)
    fast = f.a_times(mat)
    ref = f.a @ mat  # forms the unfolded patches
    assert fast.shape == ref.shape == (5, g.shape[1], 7)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
