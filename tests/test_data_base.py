"""The data contract: standardisation, splits, queries, validation."""

import pytest
import torch

from ggda.data.base import DataBundle, choose_queries, split_indices, standardize
from ggda.errors import GGDAError


def test_standardize_floors_near_constant_features():
    x_train = torch.zeros(100, 3)
    x_train[:, 0] = torch.randn(100)
    x_train[:, 1] = torch.randn(100) * 2
    x_train[0, 2] = 1e-4  # almost constant in train
    x_test = torch.ones(5, 3)
    tr, te = standardize(x_train, x_test)
    assert torch.allclose(tr[:, 0].std(), torch.tensor(1.0), atol=1e-5)
    # the near-constant feature is scaled by >= 0.1 x mean std, not by ~1e-5
    assert te[:, 2].abs().max() < 100


def test_splits_are_disjoint_and_seeded():
    a, b, c = split_indices(100, (60, 20, 20), seed=1)
    assert len(set(a.tolist()) | set(b.tolist()) | set(c.tolist())) == 100
    assert torch.equal(a, split_indices(100, (60, 20, 20), seed=1)[0])
    with pytest.raises(GGDAError):
        split_indices(10, (8, 2, 2), seed=0)
    q = choose_queries(50, 10, seed=0)
    assert torch.equal(q, q.sort().values) and len(set(q.tolist())) == 10


def test_bundle_validation_names_the_problem():
    x = torch.randn(10, 2)
    y = torch.zeros(10, dtype=torch.long)
    ok = DataBundle("d", x, y, x, y, x, y, 2, torch.arange(3))
    ok.validate()
    bad_label = DataBundle("d", x, torch.full((10,), 5), x, y, x, y, 2, torch.arange(3))
    with pytest.raises(GGDAError, match="split train has a label outside"):
        bad_label.validate()
    bad_shape = DataBundle("d", x, y[:5], x, y, x, y, 2, torch.arange(3))
    with pytest.raises(GGDAError, match="10 inputs but 5 labels"):
        bad_shape.validate()
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    with pytest.raises(GGDAError, match="NaN"):
        DataBundle("d", x, y, x_nan, y, x, y, 2, torch.arange(3)).validate()


def test_train_subset_restricts_the_training_split_only():
    from factory import tiny_bundle

    b = tiny_bundle(n=30)
    b.noise_mask = torch.arange(30) % 3 == 0
    b.clean_y_train = b.y_train.clone()
    idx = torch.tensor([2, 5, 11, 29])
    s = b.train_subset(idx)
    assert s.n_train == 4 and torch.equal(s.x_train, b.x_train[idx])
    assert torch.equal(s.y_train, b.y_train[idx]) and torch.equal(s.noise_mask, b.noise_mask[idx])
    assert torch.equal(s.clean_y_train, b.clean_y_train[idx])
    assert s.x_test is b.x_test and torch.equal(s.query_idx, b.query_idx)
    assert b.n_train == 30  # the original is untouched
