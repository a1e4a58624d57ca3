"""HELOC CSV loader (tiny files in the real format) and the bundled German credit set."""

import numpy as np
import pytest
import torch
from data_formats import HELOC_COLUMNS, heloc_rows, write_heloc

from ggda.data.loading import DataFileError
from ggda.data.tabular import GermanCredit, HELOCFile, heloc_features
from ggda.errors import ConfigError


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
    assert names[:23] == HELOC_COLUMNS and "MSinceMostRecentDelq==-7" in names
    assert "NetFractionRevolvingBurden==-8" in names and not any(n.endswith("==-9") for n in names)
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


def _heloc(tmp_path, **kw):
    kw = {"num_val": 4, "num_test": 4, "num_queries": 2} | kw
    return HELOCFile(str(tmp_path), **kw)


def _write_frame(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")


HEADER = ["RiskPerformance", *HELOC_COLUMNS]


def test_heloc_missing_and_malformed(tmp_path):
    with pytest.raises(DataFileError) as e:
        _heloc(tmp_path).load()
    msg = str(e.value)
    assert "heloc_dataset_v1.csv" in msg and f"paths.data_dir={tmp_path}" in msg
    assert "RiskPerformance" in msg and "fico" in msg.lower()
    p = tmp_path / "heloc_dataset_v1.csv"
    rows = heloc_rows(30)
    _write_frame(p, ["Risk", *HELOC_COLUMNS], rows)
    with pytest.raises(DataFileError, match="no RiskPerformance column"):
        _heloc(tmp_path).load()
    bad = [list(r) for r in rows]
    bad[5][0] = "Maybe"
    _write_frame(p, HEADER, bad)
    with pytest.raises(DataFileError, match=r"'Maybe'.*first at line 7"):
        _heloc(tmp_path).load()
    bad = [list(r) for r in rows]
    bad[3][11] = "high"  # MaxDelqEver of data row 4 = line 5
    _write_frame(p, HEADER, bad)
    with pytest.raises(DataFileError, match=r"line 5, column 'MaxDelqEver' holds 'high'") as e:
        _heloc(tmp_path).load()
    assert str(p) in str(e.value)


def test_heloc_checks_the_23_fico_columns(tmp_path, caplog):
    p = tmp_path / "heloc_dataset_v1.csv"
    rows = heloc_rows(40)
    j = HEADER.index("MaxDelqEver")
    _write_frame(p, HEADER[:j] + HEADER[j + 1 :], [r[:j] + r[j + 1 :] for r in rows])
    with pytest.raises(DataFileError, match=r"lacks the feature column\(s\) \['MaxDelqEver'\]"):
        _heloc(tmp_path).load()
    # A pandas index column is left out with a notice: the all -9 rows are still dropped.
    _write_frame(p, ["Unnamed: 0", *HEADER], [[i, *r] for i, r in enumerate(rows)])
    with caplog.at_level("WARNING"):
        b = _heloc(tmp_path).load()
    assert "Unnamed: 0" in caplog.text and "Unnamed: 0" not in b.meta["features"]
    assert b.meta["dropped_no_record"] == 4 and b.n_train == 36 - 8
    # Any other column is an error unless listed.
    _write_frame(p, [*HEADER, "Zip"], [[*r, 100 + i] for i, r in enumerate(rows)])
    with pytest.raises(DataFileError, match=r"\['Zip'\].*extra_features.*ignore_columns"):
        _heloc(tmp_path).load()
    assert "Zip" not in _heloc(tmp_path, ignore_columns=["Zip"]).load().meta["features"]
    b = _heloc(tmp_path, extra_features=["Zip"]).load()
    assert b.meta["features"][23] == "Zip" and b.x_train.shape[1] == len(b.meta["features"])


def test_heloc_empty_truncated_and_all_no_record(tmp_path):
    p = tmp_path / "heloc_dataset_v1.csv"
    _write_frame(p, HEADER, [])
    with pytest.raises(DataFileError, match="has a header row .* but no data rows"):
        _heloc(tmp_path).load()
    _write_frame(p, HEADER, [["Good", *([-9] * 23)] for _ in range(12)])
    with pytest.raises(
        DataFileError, match="0 rows left after dropping rows where every feature is -9"
    ):
        _heloc(tmp_path).load()
    rows = heloc_rows(20)
    _write_frame(p, HEADER, rows)
    text = p.read_text()
    p.write_text(text[: text.rindex(",", 0, len(text) - 30)])  # cut inside the last row
    with pytest.raises(DataFileError, match=r"line 21 has \d+ fields but the header has 24"):
        _heloc(tmp_path).load()


def test_heloc_size_errors_say_what_the_file_holds(tmp_path):
    write_heloc(tmp_path / "heloc_dataset_v1.csv", heloc_rows(60))
    with pytest.raises(ConfigError) as e:
        _heloc(tmp_path, num_val=5000).load()
    msg = str(e.value)
    assert "dataset.num_val` = 5000" in msg and "[1, 52]" in msg
    assert "holds 60 rows, 54 after dropping the 6 where every feature is -9" in msg
    assert "lower `dataset.num_val`" in msg
    with pytest.raises(ConfigError, match=r"num_train` = 100 .*\[1, 46\].*46 are left"):
        _heloc(tmp_path, num_train=100).load()


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
