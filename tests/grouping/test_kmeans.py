"""K-means internals against brute-force references."""

from __future__ import annotations

import pytest
import torch

from ggda.grouping.kmeans import (
    assign,
    balanced_assign,
    capacity_assign,
    fill_empty,
    kmeans_pp,
    lloyd,
    rank_within,
    size_cap,
)


def blobs(k: int, per: int, dim: int = 4, seed: int = 0, spread: float = 50.0):
    """k well-separated blobs of ``per`` points each, shuffled: (x (k*per, dim), truth)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g, dtype=torch.float64) * spread
    truth = torch.arange(k).repeat_interleave(per)
    perm = torch.randperm(k * per, generator=g)
    truth = truth[perm]
    return centres[truth] + torch.randn(k * per, dim, generator=g, dtype=torch.float64), truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are equal up to renaming the clusters."""
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()


def test_assign_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(50, 3, generator=g).double(), torch.randn(7, 3, generator=g).double()
    d = ((x[:, None, :] - c[None]) ** 2).sum(2)
    labels, dist = assign(x, c, chunk=16)
    assert torch.equal(labels, d.argmin(1))
    torch.testing.assert_close(dist, d.min(1).values)
    mask = torch.tensor([True, False, True, False, True, False, False])
    labels, _ = assign(x, c, chunk=16, mask=mask)
    assert torch.equal(labels, torch.where(mask, d, torch.inf).argmin(1))


def test_rank_within_matches_loop():
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (40,), generator=g)
    order = torch.randperm(40, generator=g)
    ranks = rank_within(labels, order, 5)
    seen = [0] * 5
    for i in order.tolist():
        assert ranks[i] == seen[labels[i]]
        seen[labels[i]] += 1


def test_fill_empty_moves_worst_points_without_emptying():
    labels = torch.tensor([0, 0, 0, 1, 1, 3])  # clusters 2 and 4 are empty; 3 is a singleton
    d = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 100.0])
    out = fill_empty(labels, d, 5)
    assert torch.unique(out).numel() == 5
    # worst movable points: index 3 (d=9, cluster 1 keeps index 4) and 1 (d=5, cluster 0)
    assert set((out != labels).nonzero().squeeze(1).tolist()) == {1, 3}
    assert out[5] == 3  # the singleton stays


@pytest.mark.parametrize("k", [5, 40])
def test_kmeans_pp_draws_distinct_points(k):
    x, _ = blobs(k, 6)
    for rounds in (1, 4, k):
        c = kmeans_pp(x, k, torch.Generator().manual_seed(0), rounds)
        assert c.shape == (k, 4)
        # every centre is a data point, and no two coincide
        assert torch.all(((c[:, None, :] - x[None]) ** 2).sum(2).min(1).values == 0)
        assert torch.unique(c, dim=0).shape[0] == k


def test_kmeans_pp_covers_separated_blobs():
    """Exact k-means++ (k <= 33) puts one seed in each of k far-apart blobs almost surely."""
    x, truth = blobs(8, 20, spread=1000.0)
    c = kmeans_pp(x, 8, torch.Generator().manual_seed(0))
    labels, _ = assign(x, c)
    assert same_partition(labels, truth)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_lloyd_recovers_blobs(init):
    x, truth = blobs(6, 15)
    labels = lloyd(x, 6, 50, seed=0, init=init)
    if init == "k-means++":
        assert same_partition(labels, truth)
    assert torch.unique(labels).numel() == 6


def test_lloyd_result_is_a_fixed_point():
    """Each point is nearest to its own cluster's mean (Lloyd converged, free assignment)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 3, generator=g, dtype=torch.float64)
    labels = lloyd(x, 6, 300, seed=0, tol=0.0)
    means = torch.stack([x[labels == j].mean(0) for j in range(6)])
    assert torch.equal(assign(x, means)[0], labels)


def test_balanced_assign_recovers_equal_blobs_and_balances_unequal_ones():
    x, truth = blobs(5, 12)
    centres = torch.stack([x[truth == j].mean(0) for j in range(5)])
    assert torch.equal(balanced_assign(x, centres), truth)
    # 3 blobs of sizes 30, 10, 5 into 3 balanced clusters of 15
    big, t = blobs(3, 30)
    keep = torch.cat([(t == 0).nonzero(), (t == 1).nonzero()[:10], (t == 2).nonzero()[:5]])
    xs, ts = big[keep.squeeze(1)], t[keep.squeeze(1)]
    centres = torch.stack([xs[ts == j].mean(0) for j in range(3)])
    labels = balanced_assign(xs, centres)
    assert torch.bincount(labels).tolist() == [15, 15, 15]
    # the small blobs keep all their points: only the big blob's points were displaced
    for j in (1, 2):
        assert torch.all(labels[ts == j] == j)


def test_lloyd_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5"):
        lloyd(torch.randn(4, 2), 5, 10, 0)


def test_info_reports_iterations():
    x, _ = blobs(4, 10)
    info: dict = {}
    lloyd(x, 4, 50, 0, balanced=True, info=info)
    assert 1 <= info["iterations"] <= 50 and info["balanced_rounds"] >= 1


def test_capacity_assign_respects_caps_and_is_stable_brute_force():
    """Every point sits in a centre with room; every strictly nearer centre is full."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    c = torch.randn(7, 3, generator=g, dtype=torch.float64)
    c[0] = 0.0  # one central centre that most points prefer
    cap = 35
    labels = capacity_assign(x, c, (cap,))
    counts = torch.bincount(labels, minlength=7)
    assert labels.min() >= 0 and int(counts.max()) <= cap and int(counts.sum()) == 200
    d = torch.cdist(x, c) ** 2
    for i in range(200):  # brute force over points and centres
        nearer = (d[i] < d[i, labels[i]] - 1e-12).nonzero().squeeze(1)
        assert all(int(counts[j]) == cap for j in nearer), i


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 4.0])
def test_size_capped_lloyd_splits_a_giant_cluster(factor):
    # one dense blob of 300 points around 0 (well-fit gradients) and 10 small blobs of 10
    g = torch.Generator().manual_seed(0)
    dense = 0.01 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    small, _ = blobs(10, 10, seed=1)
    x = torch.cat([dense, small])
    n, k = 400, 20
    free = torch.bincount(lloyd(x, k, 50, 0), minlength=k)
    assert int(free.max()) > 2 * n // k  # the free solution has a giant group
    labels = lloyd(x, k, 50, 0, max_size_factor=factor)
    sizes = torch.bincount(labels, minlength=k)
    cap = size_cap(n, k, factor)
    assert cap == max(20, int(-(-factor * n // k)))
    assert int(sizes.max()) <= cap and int(sizes.min()) >= 1 and labels.numel() == n


def test_size_cap_keeps_the_free_solution_when_it_already_fits():
    x, truth = blobs(5, 12)
    free = lloyd(x, 5, 50, 0)
    assert same_partition(free, truth)
    assert torch.equal(lloyd(x, 5, 50, 0, max_size_factor=2.0), free)
