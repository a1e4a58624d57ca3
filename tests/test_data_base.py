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
