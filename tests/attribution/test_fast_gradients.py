"""The fast paths equal the simple references (float64, tiny nets)."""

import pytest
import torch
from torch import nn

from factory import tiny_data, tiny_net
from ggda.gradients import (
    group_gradients,
    linear_layers,
    per_sample_gradients,
    per_sample_inner_products,
    select_params,
)
from ggda.gradients.projection import RandomProjector
from ggda.models.functional import margin, neg_loss, per_example_loss


def _ids(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, k, (n,), generator=g)
    ids[:k] = torch.arange(k)  # no empty group
    return ids


@pytest.mark.parametrize("fn", [per_example_loss, margin])
@pytest.mark.parametrize("k", [1, 3, 7, 30])
def test_factored_equals_loop(fn, k):
    x, y, _, _ = tiny_data(n=30)
    net = tiny_net("mlp")
    ids = _ids(30, k, seed=k)
    ref = group_gradients(net, x, y, ids, k, fn, backend="loop")
    got = group_gradients(net, x, y, ids, k, fn, backend="factored", max_points=7)
    assert torch.allclose(got, ref, atol=1e-12)
    # the forward/backward wrote no .grad on the model
    assert all(p.grad is None for p in net.parameters())


def test_factored_chunking_and_padding_invariant():
    x, y, _, _ = tiny_data(n=40)
    net = tiny_net("mlp")
    ids = torch.cat([torch.zeros(20), torch.arange(20) % 5 + 1]).long()  # one big, 5 small
    a = group_gradients(net, x, y, ids, 6, per_example_loss, backend="factored")
    b = group_gradients(
        net, x, y, ids, 6, per_example_loss, backend="factored", max_points=3, max_elems=50
    )
    ref = group_gradients(net, x, y, ids, 6, per_example_loss, backend="vmap")
    assert torch.allclose(a, ref, atol=1e-12) and torch.allclose(b, ref, atol=1e-12)


def test_factored_last_layer_and_projection():
    x, y, _, _ = tiny_data(n=16)
    net = tiny_net("mlp")
    head = select_params(net, last_layer=True)
    ids = _ids(16, 4, seed=1)
    ref = group_gradients(net, x, y, ids, 4, per_example_loss, params=head, backend="loop")
    got = group_gradients(net, x, y, ids, 4, per_example_loss, params=head, backend="factored")
    assert torch.allclose(got, ref, atol=1e-12)
    proj = RandomProjector(ref.shape[1], 5, seed=3)
    gp = group_gradients(
        net, x, y, ids, 4, per_example_loss, params=head, projector=proj, backend="factored"
    )
    assert torch.allclose(gp, ref @ proj.matrix(dtype=ref.dtype), atol=1e-12)


class _Shared(nn.Module):
    """A Linear used twice and a non-Linear parameter: exercises reuse and the fallback."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 5)
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.fc(torch.tanh(self.lin(torch.tanh(self.lin(x)))) * self.scale)


def test_factored_shared_layer_and_fallback():
    x, y, _, _ = tiny_data(n=12)
    net = _Shared().double().eval()
    ids = _ids(12, 3, seed=2)
    allp = select_params(net)
    assert linear_layers(net, allp) is None  # `scale` is not in a Linear: vmap fallback
    ref = group_gradients(net, x, y, ids, 3, per_example_loss, backend="loop")
    got = group_gradients(net, x, y, ids, 3, per_example_loss, backend="factored")
    assert torch.allclose(got, ref, atol=1e-12)
    lin = {k: v for k, v in allp.items() if k.startswith(("lin", "fc"))}
    assert linear_layers(net, lin) is not None
    ref = group_gradients(net, x, y, ids, 3, per_example_loss, params=lin, backend="loop")
    got = group_gradients(net, x, y, ids, 3, per_example_loss, params=lin, backend="factored")
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("last_layer", [False, True])
def test_per_sample_inner_products_match_materialised(last_layer):
    x, y, qx, qy = tiny_data(n=20, m=6)
    net = tiny_net("mlp")
    params = select_params(net, last_layer)
    g_train = per_sample_gradients(net, x, y, per_example_loss, params=params)
    g_query = per_sample_gradients(net, qx, qy, neg_loss, params=params)
    got = per_sample_inner_products(
        net, x, y, per_example_loss, qx, qy, neg_loss, params=params, chunk=7
    )
    assert torch.allclose(got, g_train @ g_query.T, atol=1e-12)


def test_per_sample_inner_products_shared_layer_and_fallback():
    x, y, qx, qy = tiny_data(n=10, m=3)
    net = _Shared().double().eval()
    allp = select_params(net)
    lin = {k: v for k, v in allp.items() if k.startswith(("lin", "fc"))}
    for params in (lin, allp):  # positions (shared layer, T = 2) and the vmap fallback
        g_train = per_sample_gradients(net, x, y, per_example_loss, params=params)
        g_query = per_sample_gradients(net, qx, qy, margin, params=params)
        got = per_sample_inner_products(
            net, x, y, per_example_loss, qx, qy, margin, params=params, chunk=4
        )
        assert torch.allclose(got, g_train @ g_query.T, atol=1e-12)


def test_group_inner_products_are_group_gradient_dots():
    x, y, qx, qy = tiny_data(n=25, m=4)
    net = tiny_net("mlp")
    ids = _ids(25, 6, seed=4)
    g = group_gradients(net, x, y, ids, 6, per_example_loss, backend="loop")
    q = per_sample_gradients(net, qx, qy, neg_loss)
    got = per_sample_inner_products(
        net, x, y, per_example_loss, qx, qy, neg_loss, chunk=8, group_ids=ids, k=6
    )
    assert torch.allclose(got, g @ q.T, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "logreg"])
@pytest.mark.parametrize("method", ["tracin", "influence", "trak"])
def test_methods_agree_across_backends(method, kind):
    """Every method gives the same scores with the factored path as with vmap."""
    from factory import tiny_task
    from ggda.attribution.influence import InfluenceFunction
    from ggda.attribution.tracin import TracIn
    from ggda.attribution.trak import TRAK

    make = {
        "tracin": lambda b: TracIn(backend=b),
        "influence": lambda b: InfluenceFunction(solver="explicit", backend=b),
        "trak": lambda b: TRAK(proj_dim=8, kernel="points", backend=b),
    }[method]
    ids = _ids(24, 5, seed=5)
    meas = "margin" if method == "trak" else "loss"
    ref = make("vmap").attribute(tiny_task(ids, 5, kind, meas)).scores
    got = make("factored").attribute(tiny_task(ids, 5, kind, meas)).scores
    assert torch.allclose(got, ref, atol=1e-10, rtol=1e-8)
    assert ref.abs().max() > 0
