"""Closed-form gradient features against autograd's per-sample gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from factory import tiny_data, tiny_net
from ggda.errors import ConfigError, GGDAError
from ggda.gradients.projection import RandomProjector
from ggda.grouping.features import compute_features


def per_sample_head_grads(net, x, y):
    """Brute force: one autograd backward per point. Returns (dW (n,C,H), db (n,C), dh (n,H))."""
    dws, dbs, dhs = [], [], []
    for i in range(x.shape[0]):
        h = net.features(x[i : i + 1]).detach().requires_grad_(True)
        loss = F.cross_entropy(net.head(h), y[i : i + 1], reduction="sum")
        dw, db, dh = torch.autograd.grad(loss, [net.head.weight, net.head.bias, h])
        dws.append(dw)
        dbs.append(db)
        dhs.append(dh[0])
    return torch.stack(dws), torch.stack(dbs), torch.stack(dhs)


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_last_layer_equals_autograd(kind):
    x, y, _, _ = tiny_data(n=12)
    net = tiny_net(kind)
    dw, db, _ = per_sample_head_grads(net, x, y)
    exact = torch.cat([dw, db[:, :, None]], 2).flatten(1)  # row c: [dl/dW_c, dl/db_c]
    p = exact.shape[1]
    f = compute_features("gradients", x, y, 3, net, gradient_kind="last_layer", proj_dim=p)
    assert f.dtype == torch.float64
    torch.testing.assert_close(f, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
def test_projected_last_layer_equals_projection_of_exact(kind):
    x, y, _, _ = tiny_data(n=12)
    net = tiny_net(kind)
    dw, db, _ = per_sample_head_grads(net, x, y)
    exact = torch.cat([dw, db[:, :, None]], 2).flatten(1)
    p, d = exact.shape[1], 4
    assert p > d
    f = compute_features("gradients", x, y, 3, net, proj_dim=d, seed=7)
    P = RandomProjector(p, d, seed=7).matrix(dtype=torch.float64)
    torch.testing.assert_close(f, exact @ P, rtol=1e-10, atol=1e-12)
    # a different seed is a different projection
    f2 = compute_features("gradients", x, y, 3, net, proj_dim=d, seed=8)
    assert not torch.allclose(f, f2)


def test_logit_and_penultimate_gradients_equal_autograd():
    x, y, _, _ = tiny_data(n=12)
    net = tiny_net("mlp")
    _, db, dh = per_sample_head_grads(net, x, y)
    logits = compute_features("gradients", x, y, 3, net, gradient_kind="logits")
    pen = compute_features("gradients", x, y, 3, net, gradient_kind="penultimate")
    torch.testing.assert_close(logits, db, rtol=1e-10, atol=1e-12)  # dl/db = dl/do
    torch.testing.assert_close(pen, dh, rtol=1e-10, atol=1e-12)


def test_representations_and_inputs():
    x, y, _, _ = tiny_data(n=12)
    net = tiny_net("mlp")
    h = compute_features("representations", x, y, 3, net)
    torch.testing.assert_close(h, net.features(x).detach())
    xc = torch.cat([x, torch.ones(12, 1, dtype=x.dtype)], 1)  # a constant column
    f = compute_features("inputs", xc, y, 3)
    torch.testing.assert_close(f[:, :-1].mean(0), torch.zeros(5, dtype=x.dtype))
    torch.testing.assert_close(f[:, :-1].std(0), torch.ones(5, dtype=x.dtype))
    assert torch.all(f[:, -1] == 0)  # constant feature -> 0, not NaN


def test_features_errors():
    x, y, _, _ = tiny_data(n=6)
    with pytest.raises(ConfigError, match="grouping.features"):
        compute_features("pixels", x, y, 3)
    with pytest.raises(GGDAError, match="need the trained model"):
        compute_features("gradients", x, y, 3, None)
    with pytest.raises(GGDAError, match="features"):
        compute_features("representations", x, y, 3, torch.nn.Linear(5, 3))
