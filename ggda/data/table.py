"""A user's tabular file (``dataset=csv``): CSV, TSV or Parquet, one row per example.

Columns: ``dataset.target`` holds the class label (any type: strings, ints, floats,
bools; mapped to 0..C-1 in sorted order, the mapping kept in ``bundle.meta["classes"]``
and written to the run directory's ``data.json``); ``dataset.features`` (default: every
other column) are the inputs; those in ``dataset.categorical`` are one-hot encoded, the
rest must be numeric. A pandas index column (``Unnamed: 0``) is left out with a notice.

Missing values (``dataset.missing``): ``error`` stops at the first empty cell, naming the
line and column; ``drop`` drops rows with an empty feature or label; ``impute_median``
fills numeric cells with the training split's median and gives categorical cells their own
category ``<missing>`` (rows without a label are dropped: a label cannot be imputed).

Preprocessing learned from data uses the training split only: medians, the category list
of each one-hot column (a value unseen in training encodes as all zeros), and the
per-column mean/std of :func:`ggda.data.base.standardize`.

Splits: a seeded random split of the rows (``num_val``, ``num_test``: integers or
fractions), or, with ``dataset.test_file``, that file is the test split as given (a
``num_test`` subset of it if set) and validation comes out of ``dataset.file``.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ggda.data.base import DataBundle, standardize
from ggda.data.files import RowLocator, read_table, resolve_path
from ggda.data.loading import DataFileError, assemble, encode_labels, split_any
from ggda.errors import ConfigError, check_choice, check_float, check_int

log = logging.getLogger(__name__)

MISSING = ("error", "drop", "impute_median")
MISSING_CATEGORY = "<missing>"


def _suggest(name: str, options: list[str]) -> str:
    same_case = [o for o in options if o.lower() == name.lower()]
    close = same_case or difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _columns_text(cols: list[str]) -> str:
    return ", ".join(cols[:12]) + (f", ... ({len(cols)} in all)" if len(cols) > 12 else "")


class _Part:
    """One file of the data (the pool or the test part): its frame and row locator."""

    def __init__(self, path: Path, df: pd.DataFrame, loc: RowLocator) -> None:
        self.path, self.df, self.loc = path, df, loc
        self.rows = np.arange(len(df))  # surviving original row numbers (for messages)


class TableFile:
    """Classification data from a CSV, TSV or Parquet file.

    Args:
        file: path of the table (absolute, relative to the working directory, or under
            ``data_dir``).
        target: the label column.
        features: input columns (None = every column but the target and index columns).
        categorical: columns to one-hot encode (must be among the features).
        missing: ``error`` | ``drop`` | ``impute_median`` (see the module docstring).
        test_file: optional separate test table with the same columns.
        sep: CSV separator (None: ``,``, or a tab for ``.tsv``/``.tab``).
        data_dir: ``paths.data_dir``, searched when ``file`` is not found as given.
        name: data set name.
        num_train: training rows (None = all left after val and test; or a fraction).
        num_val, num_test: validation and test rows (integers or fractions of the rows).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split and the queries.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seed of the flips.
    """

    def __init__(
        self,
        file: str | None = None,
        target: str | None = None,
        features: list[str] | None = None,
        categorical: list[str] | None = None,
        missing: str = "error",
        test_file: str | None = None,
        sep: str | None = None,
        data_dir: str | None = None,
        name: str = "csv",
        num_train: int | float | None = None,
        num_val: int | float = 0.1,
        num_test: int | float | None = None,
        num_queries: int = 100,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        self.file, self.test_file, self.data_dir = file, test_file, data_dir
        if target is None or str(target).strip() in ("", "???"):
            raise ConfigError(
                "dataset.target",
                target,
                "the name of the label column",
                "Set `dataset.target=COL`.",
            )
        self.target = str(target).strip()
        self.features = None if features is None else [str(c).strip() for c in features]
        self.categorical = [str(c).strip() for c in (categorical or [])]
        self.missing = check_choice("dataset.missing", missing, MISSING)
        self.sep = sep
        self.name = name
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_queries = check_int("dataset.num_queries", num_queries, 1)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)

    # -- reading and checking -------------------------------------------------------------

    def _read(self, key: str, file: str) -> _Part:
        what = "a CSV, TSV or Parquet file with a header row"
        path = resolve_path(key, file, self.data_dir, what)
        df, loc = read_table(path, self.sep)
        return _Part(path, df, loc)

    def _feature_columns(self, part: _Part) -> list[str]:
        cols = list(part.df.columns)
        if self.target not in cols:
            raise DataFileError(
                f"{part.path}: has no column {self.target!r} (dataset.target)."
                f"{_suggest(self.target, cols)} "
                f"Its columns: {_columns_text(cols)}. Set `dataset.target` to the label column"
            )
        if self.features is None:
            index_cols = [c for c in cols if c.startswith("Unnamed: ")]
            if index_cols:
                log.warning(
                    "%s: ignoring the column(s) %s (an index written by pandas, not a "
                    "feature); list them in dataset.features to use them",
                    part.path,
                    index_cols,
                )
            feats = [c for c in cols if c != self.target and c not in index_cols]
        else:
            absent = [c for c in self.features if c not in cols]
            if absent:
                hint = _suggest(absent[0], cols)
                raise DataFileError(
                    f"{part.path}: has no column(s) {absent} named in dataset.features.{hint} "
                    f"Its columns: {_columns_text(cols)}. Fix `dataset.features` (null = "
                    "every column but the target)"
                )
            if self.target in self.features:
                raise ConfigError(
                    "dataset.features",
                    self.features,
                    "input columns other than the target",
                    f"Remove the label column {self.target!r} from it.",
                )
            feats = list(self.features)
        if not feats:
            raise DataFileError(
                f"{part.path}: has no feature columns besides the target {self.target!r}"
            )
        stray = [c for c in self.categorical if c not in feats]
        if stray:
            raise ConfigError(
                "dataset.categorical",
                self.categorical,
                "feature columns to one-hot encode",
                f"{stray} {'is' if len(stray) == 1 else 'are'} not among the features "
                f"({_columns_text(feats)}).",
            )
        for c in feats:
            if c in self.categorical:
                continue
            col = part.df[c]
            if pd.api.types.is_bool_dtype(col):
                part.df[c] = col.astype(np.float64)
            elif not pd.api.types.is_numeric_dtype(col):
                num = pd.to_numeric(col, errors="coerce")
                bad = np.flatnonzero(num.isna().to_numpy() & col.notna().to_numpy())
                i = int(bad[0])
                raise DataFileError(
                    f"{part.path}: column {c!r} is not numeric ({part.loc.where(i)} holds "
                    f"{col.iloc[i]!r}). Add it to `dataset.categorical` to one-hot encode it, "
                    "fix that cell, or leave the column out of `dataset.features`"
                )
        return feats

    def _handle_missing(self, part: _Part, feats: list[str]) -> int:
        """Apply ``dataset.missing`` to one part; returns the number of rows dropped."""
        df = part.df
        used = [*feats, self.target]
        na = df[used].isna().to_numpy()
        if not na.any():
            return 0
        no_label = na[:, -1]
        if self.missing == "error":
            i, j = (int(v[0]) for v in np.nonzero(na))
            raise DataFileError(
                f"{part.path}: {part.loc.where(i)}, column {used[j]!r} is empty "
                f"({int(na.sum())} empty cells in all). Fill it, or set "
                "`dataset.missing=drop` (drop such rows) or `dataset.missing=impute_median` "
                "(training medians)"
            )
        drop = na.any(axis=1) if self.missing == "drop" else no_label
        if drop.any():
            log.warning(
                "%s: dropping %d of %d rows with %s (dataset.missing=%s)",
                part.path,
                int(drop.sum()),
                len(df),
                "an empty cell" if self.missing == "drop" else "no label",
                self.missing,
            )
        part.df = df[~drop].reset_index(drop=True)
        part.rows = part.rows[~drop]
        if len(part.df) == 0:
            raise DataFileError(
                f"{part.path}: 0 rows left after dropping rows with empty cells "
                f"(dataset.missing={self.missing}); fill the empty cells or choose other "
                "dataset.features"
            )
        return int(drop.sum())

    # -- features -------------------------------------------------------------------------

    def _encode(
        self, frames: dict[str, pd.DataFrame], feats: list[str], source: Path
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Impute, one-hot and standardise with training statistics only."""
        train = frames["train"]
        blocks: dict[str, list[np.ndarray]] = {s: [] for s in frames}
        names: list[str] = []
        for c in feats:
            if c in self.categorical:
                col_tr = train[c].astype(object).where(train[c].notna(), MISSING_CATEGORY)
                cats = sorted({str(v) for v in col_tr}, key=str)
                for s, df in frames.items():
                    v = df[c].astype(object).where(df[c].notna(), MISSING_CATEGORY).map(str)
                    blocks[s].append(
                        (v.to_numpy()[:, None] == np.array(cats)[None, :]).astype(np.float64)
                    )
                names += [f"{c}={v}" for v in cats]
                continue
            med = train[c].median()
            if pd.isna(med):
                raise DataFileError(
                    f"{source}: column {c!r} has no values in the training split, so it "
                    "cannot be imputed; fill it or leave it out of `dataset.features`"
                )
            for s, df in frames.items():
                blocks[s].append(df[c].fillna(med).to_numpy(dtype=np.float64)[:, None])
            names.append(c)
        xs = {
            s: torch.as_tensor(np.concatenate(b, axis=1), dtype=torch.float32)
            for s, b in blocks.items()
        }
        order = list(frames)
        out = standardize(*(xs[s] for s in order))
        return dict(zip(order, out, strict=True)), names

    def load(self) -> DataBundle:
        """Read the table (and test table), encode and standardise the features, and split.

        Returns:
            The splits, the query indices and what was read (feature names, dropped rows).

        Raises:
            DataFileError: a file cannot be read or lacks a configured column.
        """
        pool = self._read("dataset.file", self.file)
        test = None if self.test_file is None else self._read("dataset.test_file", self.test_file)
        feats = self._feature_columns(pool)
        if test is not None:
            self._feature_columns(test)
            missing_cols = [c for c in [*feats, self.target] if c not in test.df.columns]
            if missing_cols:
                raise DataFileError(f"{test.path}: lacks the column(s) {missing_cols}")
        dropped = self._handle_missing(pool, feats)
        if test is not None:
            dropped += self._handle_missing(test, feats)
        parts = [pool] if test is None else [pool, test]
        codes, classes = encode_labels(
            [p.df[self.target].to_numpy() for p in parts], str(pool.path)
        )
        tr, va, te = split_any(
            len(pool.df),
            None if test is None else len(test.df),
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
            str(pool.path),
        )
        test_src = pool if test is None else test
        y_test_all = codes[0] if test is None else codes[1]
        frames = {
            "train": pool.df.iloc[tr.numpy()],
            "val": pool.df.iloc[va.numpy()],
            "test": test_src.df.iloc[te.numpy()],
        }
        x, names = self._encode(frames, feats, pool.path)
        y = {
            "train": torch.as_tensor(codes[0][tr.numpy()]),
            "val": torch.as_tensor(codes[0][va.numpy()]),
            "test": torch.as_tensor(y_test_all[te.numpy()]),
        }
        absent = sorted(set(range(len(classes))) - set(y["train"].tolist()))
        if absent:
            log.warning(
                "%s: class(es) %s have no training example in this split",
                pool.path,
                [classes[i] for i in absent],
            )
        log.info(
            "%s: %d classes from column %r: %s",
            pool.path,
            len(classes),
            self.target,
            ", ".join(f"{c!r} -> {i}" for i, c in enumerate(classes[:20])),
        )
        return assemble(
            self.name,
            {s: (x[s], y[s]) for s in ("train", "val", "test")},
            len(classes),
            self.num_queries,
            self.split_seed,
            self.label_noise,
            self.noise_seed,
            meta={
                "classes": classes,
                "features": names,
                "target": self.target,
                "file": str(pool.path),
                "test_file": None if test is None else str(test.path),
                "dropped_missing": dropped,
            },
        )
