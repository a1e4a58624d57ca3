"""HELOC CSV loader (tiny files in the real format) and the bundled German credit set."""

import numpy as np
import pytest
import torch
from data_formats import HELOC_COLUMNS, heloc_rows, write_heloc

from ggda.data.loading import DataFileError
from ggda.data.tabular import GermanCredit, HELOCFile, heloc_features


def test_heloc_special_values_brute_force():
    cols = ["a", "b", "c"]
    tr = np.array([[1, -7, 5], [3, 10, -8], [5, 20, 7], [-9, 30, 9]], dtype=float)
    te = np.array([[2, -7, -9], [4, -8, 1]], dtype=float)
    f_tr, (f_te,), names = heloc_features(tr, [te], cols)
    # Indicators only for (feature, code) pairs seen in training, in feature-then-code order.
    assert names == ["a", "b", "c", "a==-9", "b==-7", "c==-8"]
    med = {0: np.median([1, 3, 5]), 1: np.median([10, 20, 30]), 2: np.median([5, 7, 9])}
    expect_tr = [
        [1, med[1], 5, 0, 1, 0],
        [3, 10, med[2], 0, 0, 1],
        [5, 20, 7, 0, 0, 0],
        [med[0], 30, 9, 1, 0, 0],
    ]
    assert np.array_equal(f_tr, np.array(expect_tr, dtype=float))
    # Test rows use training medians; unseen codes (b==-8, c==-9) are imputed, no new column.
    assert np.array_equal(f_te, np.array([[2, med[1], med[2], 0, 1, 0], [4, med[1], 1, 0, 0, 0]]))


def test_heloc_file_loads_with_training_statistics(tmp_path):
    rows = heloc_rows(60)
    write_heloc(tmp_path / "heloc_dataset_v1.csv", rows)
    ds = HELOCFile(str(tmp_path), num_val=8, num_test=10, num_queries=4, split_seed=1)
    b = ds.load()
    kept = [r for r in rows if r[1] != -9]
    assert b.meta["dropped_no_record"] == len(rows) - len(kept) == 6
    assert b.n_train + b.x_val.shape[0] + b.x_test.shape[0] == len(kept)
    assert b.num_classes == 2 and b.meta["classes"] == ["Good", "Bad"]
    names = b.meta["features"]
    assert names[:4] == HELOC_COLUMNS and "MSinceMostRecentDelq==-7" in names
    assert "PercentBurden==-8" in names and not any(n.endswith("==-9") for n in names)
    assert b.x_train.shape[1] == len(names) and b.x_train.dtype == torch.float32
    # Standardised with training statistics.
    assert torch.allclose(b.x_train.mean(0), torch.zeros(len(names)), atol=1e-5)
    # Labels: Bad = 1; in this file Bad <=> ExternalRiskEstimate < 70, so the first
    # (standardised, monotone) column separates the classes exactly in every split.
    for x, y in ((b.x_train, b.y_train), (b.x_val, b.y_val), (b.x_test, b.y_test)):
        assert x[y == 1, 0].max() < x[y == 0, 0].min()
    sub = HELOCFile(
        str(tmp_path), num_train=20, num_val=8, num_test=10, num_queries=4, split_seed=1
    ).load()
    assert sub.n_train == 20 and torch.equal(sub.y_test, b.y_test)


def test_heloc_missing_and_malformed(tmp_path):
    with pytest.raises(DataFileError) as e:
        HELOCFile(str(tmp_path), num_val=2, num_test=2, num_queries=1).load()
    msg = str(e.value)
    assert "heloc_dataset_v1.csv" in msg and f"paths.data_dir={tmp_path}" in msg
    assert "RiskPerformance" in msg and "fico" in msg.lower()
    p = tmp_path / "heloc_dataset_v1.csv"
    p.write_text("Risk,ExternalRiskEstimate\nGood,50\n")
    with pytest.raises(DataFileError, match="no RiskPerformance column"):
        HELOCFile(str(tmp_path), num_val=2, num_test=2, num_queries=1).load()
    p.write_text("RiskPerformance,ExternalRiskEstimate\nGood,50\nMaybe,60\n")
    with pytest.raises(DataFileError, match="Maybe"):
        HELOCFile(str(tmp_path), num_val=2, num_test=2, num_queries=1).load()
    p.write_text("RiskPerformance,ExternalRiskEstimate\nGood,50\nBad,high\n")
    with pytest.raises(DataFileError, match="non-numeric") as e:
        HELOCFile(str(tmp_path), num_val=2, num_test=2, num_queries=1).load()
    assert str(p) in str(e.value)


def test_german_credit_bundled():
    b = GermanCredit(num_queries=20).load()
    assert (b.n_train, b.x_val.shape[0], b.x_test.shape[0]) == (700, 100, 200)
    assert b.x_train.shape[1] == 61 and b.num_classes == 2
    y = torch.cat([b.y_train, b.y_val, b.y_test])
    assert int(y.sum()) == 300  # the Statlog set: 300 bad of 1,000
    df = GermanCredit.frame()
    # Column 0 is duration_in_month (first numeric column), standardised: its ordering over
    # the whole set must match the raw column's (same split => same multiset of values).
    raw = torch.tensor(df["duration_in_month"].to_numpy(), dtype=torch.float32)
    x0 = torch.cat([b.x_train, b.x_val, b.x_test])[:, 0]
    assert torch.allclose(
        ((x0 - x0.min()) / (x0.max() - x0.min())).sort().values,
        ((raw - raw.min()) / (raw.max() - raw.min())).sort().values,
        atol=1e-5,
    )
