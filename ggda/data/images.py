"""Image data sets read from their standard files under ``paths.data_dir`` (no downloads).

- ``MNISTFiles``: the four MNIST IDX files (60,000 train / 10,000 test, 28x28 grey),
  raw or gzipped, in ``data_dir``, ``data_dir/mnist`` or ``data_dir/MNIST/raw``.
- ``CIFAR10Files``: the CIFAR-10 python pickle batches ``cifar-10-batches-py/data_batch_1..5``
  and ``test_batch`` (50,000 / 10,000, 32x32 RGB).

Both keep the official test split as the test split and draw the validation split from the
official training split (seeded), so that ``num_train``/``num_val``/``num_test`` subsets
(``null`` = all) can make any run small. Pixels are scaled to [0, 1] and standardised per
channel with the training subset's mean and std.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from ggda.data.base import DataBundle
from ggda.data.loading import assemble, data_file_error, find_file, split_with_fixed_test
from ggda.errors import check_float, check_int

MNIST_SOURCE = (
    "the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) from "
    "http://yann.lecun.com/exdb/mnist/ or any mirror of it"
)
CIFAR_SOURCE = (
    "the 'CIFAR-10 python version' archive cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extracted into paths.data_dir "
    "(it creates cifar-10-batches-py/)"
)


class ImageFiles:
    """Base: subset, scale, standardise per channel, add label noise, choose queries.

    Args:
        data_dir: root of the data files (``paths.data_dir``).
        name: data set name.
        num_train: training points drawn from the official training split after the
            validation points are set aside (None = all of them).
        num_val: validation points drawn from the official training split.
        num_test: test points drawn from the official test split (None = all).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the subsets and the queries.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seed of the flips.
        flatten: flat inputs (MLP, logistic regression) or (C, H, W) images (CNN, ResNet).
    """

    num_classes = 10

    def __init__(
        self,
        data_dir: str,
        name: str,
        num_train: int | None = None,
        num_val: int = 5000,
        num_test: int | None = None,
        num_queries: int = 200,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        flatten: bool = False,
    ) -> None:
        self.data_dir = str(data_dir)
        self.name = name
        self.num_train = None if num_train is None else check_int("dataset.num_train", num_train, 1)
        self.num_val = check_int("dataset.num_val", num_val, 1)
        self.num_test = None if num_test is None else check_int("dataset.num_test", num_test, 1)
        self.num_queries = check_int("dataset.num_queries", num_queries, 1)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)
        self.flatten = bool(flatten)

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train (N, C, H, W) uint8, y_train (N,), x_test (M, C, H, W) uint8, y_test (M,))."""
        raise NotImplementedError

    def load(self) -> DataBundle:
        """Read the files, split them (the shipped test split stays the test split) and scale.

        Returns:
            The splits, the query indices and what was read.
        """
        x_pool, y_pool, x_test, y_test = self.read()
        tr, va, te = split_with_fixed_test(
            len(y_pool),
            len(y_test),
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
        )
        check_int("dataset.num_queries", self.num_queries, 1, int(te.numel()))
        xs = {
            "train": x_pool[tr.numpy()],
            "val": x_pool[va.numpy()],
            "test": x_test[te.numpy()],
        }
        ys = {"train": y_pool[tr.numpy()], "val": y_pool[va.numpy()], "test": y_test[te.numpy()]}
        f = {
            s: torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0) for s, a in xs.items()
        }
        # Per-channel statistics of the training subset only (no peeking at val/test).
        mu = f["train"].mean(dim=(0, 2, 3), keepdim=True)
        sd = f["train"].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        splits = {}
        for s in ("train", "val", "test"):
            x = (f[s] - mu) / sd
            splits[s] = (x.flatten(1) if self.flatten else x, torch.as_tensor(ys[s]).long())
        return assemble(
            self.name,
            splits,
            self.num_classes,
            self.num_queries,
            self.split_seed,
            self.label_noise,
            self.noise_seed,
            meta={"image_shape": tuple(x_pool.shape[1:])},
        )


# -- MNIST IDX -----------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path, data_dir: str, expect_ndim: int) -> np.ndarray:
    """Read one IDX file (raw or gzipped) as an array of ``expect_ndim`` dimensions.

    The format: magic 0x0000 | dtype | ndim, big-endian uint32 dimensions, then the data.

    Raises:
        DataFileError: wrong magic, dtype, rank or length.
    """
    fmt = "IDX (magic 0x00000801 labels / 0x00000803 images, unsigned bytes), raw or .gz"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise data_file_error(path, f"cannot be read ({e})", data_dir, fmt, MNIST_SOURCE) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise data_file_error(path, "is not an IDX file (bad magic)", data_dir, fmt, MNIST_SOURCE)
    dtype, ndim = raw[2], raw[3]
    if dtype not in _IDX_DTYPES or ndim != expect_ndim:
        raise data_file_error(
            path,
            f"has IDX type 0x{dtype:02x} with {ndim} dimensions, expected unsigned bytes with "
            f"{expect_ndim}",
            data_dir,
            fmt,
            MNIST_SOURCE,
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise data_file_error(path, "is truncated in its header", data_dir, fmt, MNIST_SOURCE)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise data_file_error(
            path,
            f"holds {len(raw) - header} data bytes but its header {dims} says {count}",
            data_dir,
            fmt,
            MNIST_SOURCE,
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class MNISTFiles(ImageFiles):
    """Full MNIST from the IDX files (60,000 train / 10,000 test, 28x28, 10 classes)."""

    files = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }

    def __init__(self, data_dir: str, name: str = "mnist", **kw) -> None:
        kw.setdefault("flatten", True)  # as conf/dataset/mnist.yaml (MLP / logreg inputs)
        super().__init__(data_dir, name, **kw)

    def _path(self, key: str) -> Path:
        base = self.files[key]
        return find_file(
            self.data_dir,
            [base, base + ".gz"],
            ["", "mnist", "MNIST/raw"],
            "MNIST IDX",
            MNIST_SOURCE,
        )

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four MNIST IDX files.

        Returns:
            (x_train (60000, 1, 28, 28) uint8, y_train (60000,), x_test (10000, 1, 28, 28)
            uint8, y_test (10000,)), or as many as the files hold.
        """
        out = []
        for split in ("train", "test"):
            px, py = self._path(f"{split}_x"), self._path(f"{split}_y")
            x = read_idx(px, self.data_dir, 3)
            y = read_idx(py, self.data_dir, 1)
            if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
                raise data_file_error(
                    px,
                    f"holds images of shape {x.shape} but {py.name} holds {y.shape[0]} labels "
                    "(expected N x 28 x 28 images and N labels)",
                    self.data_dir,
                    "MNIST IDX",
                    MNIST_SOURCE,
                )
            if y.size and y.max() >= 10:
                raise data_file_error(
                    py, f"has label {int(y.max())} > 9", self.data_dir, "MNIST IDX", MNIST_SOURCE
                )
            out += [x[:, None], y.astype(np.int64)]
        return out[0], out[1], out[2], out[3]


# -- CIFAR-10 python pickles ---------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file runs no other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, latin1).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(path: Path, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file.

    It is a pickled dict with ``data`` (N, 3072) uint8 (1024 red, then green, then blue
    values, row-major 32x32) and ``labels`` (N ints in [0, 10)).

    Returns:
        (x (N, 3, 32, 32) uint8, y (N,) int64).
    """
    fmt = "CIFAR-10 python pickle batch (dict with b'data' N x 3072 uint8 and b'labels')"
    try:
        with open(path, "rb") as fh:
            d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except Exception as e:  # any unpickling failure is a malformed file
        raise data_file_error(
            path, f"cannot be unpickled ({e})", data_dir, fmt, CIFAR_SOURCE
        ) from e
    if not isinstance(d, dict):
        raise data_file_error(path, "does not hold a dict", data_dir, fmt, CIFAR_SOURCE)
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise data_file_error(
            path, f"lacks keys data/labels (has {sorted(d)})", data_dir, fmt, CIFAR_SOURCE
        )
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != y.shape[0]:
        raise data_file_error(
            path,
            f"has data {x.dtype} {x.shape} and {y.shape[0]} labels (expected uint8 N x 3072 "
            "and N labels)",
            data_dir,
            fmt,
            CIFAR_SOURCE,
        )
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise data_file_error(path, "has a label outside [0, 10)", data_dir, fmt, CIFAR_SOURCE)
    return x.reshape(-1, 3, 32, 32), y


class CIFAR10Files(ImageFiles):
    """CIFAR-10 from the python pickle batches (50,000 train / 10,000 test, 32x32x3)."""

    subdir = "cifar-10-batches-py"
    train_batches = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, data_dir: str, name: str = "cifar10", **kw) -> None:
        super().__init__(data_dir, name, **kw)

    def _path(self, fname: str) -> Path:
        return find_file(self.data_dir, [fname], [self.subdir], "CIFAR-10 python", CIFAR_SOURCE)

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The CIFAR-10 training batches (concatenated) and the test batch.

        Returns:
            (x_train (N, 3, 32, 32) uint8, y_train (N,), x_test (10000, 3, 32, 32) uint8,
            y_test (10000,)), N = 10,000 per training batch read.
        """
        parts = [read_cifar_batch(self._path(b), self.data_dir) for b in self.train_batches]
        x_te, y_te = read_cifar_batch(self._path("test_batch"), self.data_dir)
        x_tr = np.concatenate([p[0] for p in parts])
        y_tr = np.concatenate([p[1] for p in parts])
        return x_tr, y_tr, x_te, y_te
