"""The shared primitive: batched group gradients == sums of per-sample gradients."""

import pytest
import torch

from factory import tiny_data, tiny_net
from ggda.gradients import group_gradients, per_sample_gradients, select_params
from ggda.gradients.projection import RandomProjector
from ggda.grouping.base import Grouping
from ggda.models.functional import margin, per_example_loss


def _brute_per_sample(net, x, y, fn):
    rows = []
    for i in range(len(y)):
        net.zero_grad()
        fn(net(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("fn", [per_example_loss, margin])
def test_per_sample_matches_explicit_loop(fn):
    x, y, _, _ = tiny_data(n=12)
    net = tiny_net("mlp")
    got = per_sample_gradients(net, x, y, fn, max_points=5)  # several chunks
    assert torch.allclose(got, _brute_per_sample(net, x, y, fn), atol=1e-12)


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_group_gradients_are_member_sums(backend):
    x, y, _, _ = tiny_data(n=30)
    net = tiny_net("mlp")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (30,), generator=g)
    ids[:7] = torch.arange(7)  # no empty group
    grouping = Grouping(ids, 7)
    per = per_sample_gradients(net, x, y, per_example_loss)
    got = group_gradients(net, x, y, ids, 7, per_example_loss, backend=backend, max_points=9)
    assert torch.allclose(got, grouping.aggregate(per), atol=1e-12)


def test_chunking_and_padding_do_not_change_results():
    x, y, _, _ = tiny_data(n=40)
    net = tiny_net("mlp")
    ids = torch.cat([torch.zeros(20), torch.arange(20) % 5 + 1]).long()  # one big, 5 small
    a = group_gradients(net, x, y, ids, 6, per_example_loss, max_points=4096)
    b = group_gradients(net, x, y, ids, 6, per_example_loss, max_points=3, max_elems=50)
    assert torch.allclose(a, b, atol=1e-12)


def test_last_layer_selects_head_only():
    net = tiny_net("mlp")
    params = select_params(net, last_layer=True)
    assert set(params) == {"fc.weight", "fc.bias"}
    x, y, _, _ = tiny_data(n=6)
    full = per_sample_gradients(net, x, y, per_example_loss)
    head = per_sample_gradients(net, x, y, per_example_loss, params=params)
    # the head's parameters come last in the flattened full gradient
    assert torch.allclose(full[:, -head.shape[1] :], head, atol=1e-12)


def test_projection_is_linear_and_seeded():
    x, y, _, _ = tiny_data(n=10)
    net = tiny_net("mlp")
    p = sum(v.numel() for v in net.parameters())
    proj = RandomProjector(p, 16, seed=1, block=7)
    g = per_sample_gradients(net, x, y, per_example_loss)
    gp = per_sample_gradients(net, x, y, per_example_loss, projector=proj)
    assert torch.allclose(gp, g @ proj.matrix(dtype=g.dtype), atol=1e-10)
    # blockwise path (no cached matrix) gives the same numbers
    lazy = RandomProjector(p, 16, seed=1, block=7, cache_elems=0)
    assert torch.allclose(lazy(g), gp, atol=1e-10)
    assert not torch.allclose(RandomProjector(p, 16, seed=2)(g), gp)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_matrix_drawn_in_parallel_equals_blocks_drawn_in_turn(kind, monkeypatch):
    # matrix() draws its blocks on threads; each block has its own seeded generator, so the
    # result must equal the blocks drawn one after another (as the lazy path draws them).
    proj = RandomProjector(1000, 9, seed=4, kind=kind, block=64)
    blocks = [
        proj._block(i, min(64, 1000 - s), "cpu", torch.float32)
        for i, s in enumerate(range(0, 1000, 64))
    ]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # 4 drawing threads
    assert torch.equal(proj.matrix(), torch.cat(blocks))
    assert torch.equal(proj.matrix(dtype=torch.float64), torch.cat(blocks).double())
    if kind == "rademacher":
        assert set(proj.matrix().mul(3).round().unique().tolist()) == {-1.0, 1.0}
