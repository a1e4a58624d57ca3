"""The TRAK kernel solve: damping means damping, in float32 as in float64.

Reference: the float64 textbook formula tau_{jq} = phi_q^T (K + lambda I)^{-1} num_j with
lambda = damping * trace(K) / d, computed with an explicit inverse from float64 features.
The library's solve is fed float32 features (as a float32 model produces them).
"""

import numpy as np
import pytest
import torch
from torch import nn

from ggda.attribution.trak import damped_inverse_apply
from ggda.models.functional import margin


def textbook(phi, num, phi_q, damping):
    """(k, m) float64 scores with an explicit inverse."""
    phi, num, phi_q = phi.double(), num.double(), phi_q.double()
    kern = phi.T @ phi
    d = kern.shape[0]
    lam = damping * torch.trace(kern) / d
    inv = torch.linalg.inv(kern + lam * torch.eye(d, dtype=torch.float64))
    return num @ inv @ phi_q.T


def library(phi, num, phi_q, damping):
    """(k, m) scores the way TRAK forms them, all inputs float32."""
    phi, num, phi_q = phi.float(), num.float(), phi_q.float()
    kern = phi.T @ phi
    return num @ damped_inverse_apply(kern, phi_q.T, damping)


def pearson(a, b):
    return float(np.corrcoef(a.double().reshape(-1).numpy(), b.double().reshape(-1).numpy())[0, 1])


def head_features(dtype):
    """Head-only (identity projection) TRAK features of a small trained MLP.

    MLP 20 -> 128 -> 10: the head has 128 * 10 + 10 = 1,290 parameters. Per-sample margin
    gradients w.r.t. the head, d margin / d W = g h^T, d margin / d b = g, with
    g = d margin / d logits (which sums to 0 over classes: a 129-dimensional null space).

    Returns:
        phi (n, 1290), num (k, 1290) = per-point (1 - p_i) phi_i for the first k points,
        phi_q (m, 1290) = margin gradients of held-out queries.
    """
    g = torch.Generator().manual_seed(0)
    n, m, f = 1600, 40, 20
    scales = torch.logspace(0, -3, f)  # a spread input spectrum -> spread head spectrum
    x = torch.randn(n + m, f, generator=g) * scales
    w_true = torch.randn(f, 10, generator=g)
    y = (x / scales @ w_true).argmax(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(f, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:n]), y[:n]).backward()
        opt.step()
    net = net.to(dtype)
    with torch.no_grad():
        h = net[1](net[0](x.to(dtype)))  # (n + m, 128)
    z = net[2](h).detach().requires_grad_(True)
    marg = margin(z, y)
    (gz,) = torch.autograd.grad(marg.sum(), z)  # (n + m, 10), rows are per-sample
    feats = torch.cat([(gz[:, :, None] * h[:, None, :]).reshape(n + m, -1), gz], 1)
    p = torch.sigmoid(marg).detach()
    phi = feats[:n]
    num = (1 - p[:200, None]) * phi[:200]
    return phi, num, feats[n:]


def test_head_identity_projection_float32_matches_float64_textbook():
    phi64, num64, q64 = head_features(torch.float64)
    assert phi64.shape[1] == 1290
    evals = torch.linalg.eigvalsh(phi64.T @ phi64)
    # the case that broke: a spectrum spread far beyond damping / (d * eps32)
    lam = 0.01 * evals.sum() / 1290
    assert (evals[evals > 1e-9 * evals.max()] < lam).sum() > 200
    ref = textbook(phi64, num64, q64, 0.01)
    got = library(phi64.float(), num64.float(), q64.float(), 0.01)
    assert pearson(got, ref) >= 0.999
    # per query too (the LDS ranks within a query)
    for q in range(0, ref.shape[1], 7):
        assert pearson(got[:, q], ref[:, q]) >= 0.999


@pytest.mark.parametrize("damping", [1e-3, 1e-2, 1e-1])
def test_spread_spectrum_float32_matches_float64_textbook(damping):
    g = torch.Generator().manual_seed(1)
    n, d, k, m = 900, 400, 60, 12
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sv = torch.logspace(0, -6, d, dtype=torch.float64)  # eigenvalues over 12 decades
    phi = torch.randn(n, d, generator=g, dtype=torch.float64) * sv @ basis.T
    num = torch.randn(k, n, generator=g, dtype=torch.float64).abs() @ phi / n
    phi_q = torch.randn(m, d, generator=g, dtype=torch.float64) * sv @ basis.T
    ref = textbook(phi, num, phi_q, damping)
    got = library(phi, num, phi_q, damping)
    assert pearson(got, ref) >= 0.999
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=1e-3 * ref.abs().max())


def test_zero_damping_is_pseudo_inverse_of_a_rank_deficient_kernel():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(30, 8, generator=g, dtype=torch.float64)
    kern = a @ a.T  # (30, 30), rank 8
    rhs = kern @ torch.randn(30, 3, generator=g, dtype=torch.float64)  # in the range
    got = damped_inverse_apply(kern.float(), rhs.float(), 0.0)
    torch.testing.assert_close(got.double(), torch.linalg.pinv(kern) @ rhs, rtol=1e-3, atol=1e-3)


def test_damped_solve_equals_linear_solve_and_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(50, 20, generator=g, dtype=torch.float64)
    kern = a.T @ a
    rhs = torch.randn(20, 4, generator=g, dtype=torch.float64)
    lam = 0.05 * torch.trace(kern) / 20
    ref = torch.linalg.solve(kern + lam * torch.eye(20, dtype=torch.float64), rhs)
    got = damped_inverse_apply(kern, rhs, 0.05)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert damped_inverse_apply(kern.float(), rhs.float(), 0.05).dtype == torch.float32
