"""The data contract: a :class:`DataBundle` of train/val/test tensors plus the queries."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ggda.errors import ConfigError, GGDAError, check_float, check_int


@dataclass
class DataBundle:
    """All splits of one data set as tensors, on the CPU.

    Attributes:
        name: data set name (used in run directory names).
        x_train: (n, *input_shape) float inputs.
        y_train: (n,) long labels, possibly with injected noise.
        x_val, y_val: validation split (pruning property, early checks).
        x_test, y_test: test split; queries are drawn from it.
        num_classes: number of classes C.
        query_idx: (m,) long indices into the test split.
        noise_mask: (n,) bool, True where the training label was flipped (or None).
        clean_y_train: (n,) the labels before noise (or None).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    query_idx: torch.Tensor
    noise_mask: torch.Tensor | None = None
    clean_y_train: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        """Number of training points n."""
        return int(self.y_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``x_train.shape[1:]``."""
        return tuple(self.x_train.shape[1:])

    def summary(self) -> dict:
        """Sizes, shapes and what the loader recorded (class names, features, files).

        The values are JSON-serialisable (written to the run directory's ``data.json``).
        """
        return {
            "name": self.name,
            "n_train": self.n_train,
            "n_val": int(self.y_val.shape[0]),
            "n_test": int(self.y_test.shape[0]),
            "num_queries": int(self.query_idx.numel()),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.x_train.dtype).replace("torch.", ""),
            "label_noise_flipped": 0 if self.noise_mask is None else int(self.noise_mask.sum()),
            **{k: v for k, v in self.meta.items() if k != "vocab"},
        }

    def train_subset(self, idx: torch.Tensor) -> DataBundle:
        """The bundle with the training split restricted to ``idx`` (r,): (r, ...) tensors.

        Validation, test and queries are unchanged (a model trained on a subset is still
        measured on the same queries).
        """
        idx = idx.long()

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return replace(
            self,
            x_train=self.x_train[idx],
            y_train=self.y_train[idx],
            noise_mask=pick(self.noise_mask),
            clean_y_train=pick(self.clean_y_train),
        )

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of split ``train`` | ``val`` | ``test``."""
        if name not in ("train", "val", "test"):
            raise GGDAError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def validate(self) -> None:
        """Check shapes, dtypes and label range; raise a clear error naming the split."""
        for s in ("train", "val", "test"):
            x, y = self.split(s)
            if x.shape[0] != y.shape[0]:
                raise GGDAError(
                    f"{self.name}: split {s} has {x.shape[0]} inputs but {y.shape[0]} labels"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise GGDAError(
                    f"{self.name}: split {s} has a label outside [0, {self.num_classes}) "
                    f"(min {int(y.min())}, max {int(y.max())})"
                )
            if not torch.isfinite(x).all():
                raise GGDAError(f"{self.name}: split {s} contains NaN or infinite inputs")
        if self.query_idx.numel() and int(self.query_idx.max()) >= self.y_test.shape[0]:
            raise GGDAError(f"{self.name}: query index out of range of the test split")


def split_indices(
    n: int, sizes: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random disjoint (train, val, test) index sets of the given sizes."""
    if sum(sizes) > n:
        raise GGDAError(
            f"dataset.num_train + num_val + num_test = {' + '.join(map(str, sizes))} = "
            f"{sum(sizes)} is more than the {n} points the data set holds; lower "
            "`dataset.num_train` (or num_val / num_test) so that they add up to at most "
            f"{n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b, c = sizes
    return perm[:a], perm[a : a + b], perm[a + b : a + b + c]


def choose_queries(n_test: int, num_queries: int, seed: int) -> torch.Tensor:
    """A fixed seeded subset of test indices, sorted (so the order is stable)."""
    if isinstance(num_queries, int) and not isinstance(num_queries, bool) and num_queries > n_test:
        raise ConfigError(
            "dataset.num_queries",
            num_queries,
            f"an integer in [1, {n_test}]",
            f"The test split holds {n_test} points; lower `dataset.num_queries` to at most "
            f"{n_test} (or raise `dataset.num_test` if the data holds more).",
        )
    num_queries = check_int("dataset.num_queries", num_queries, 1, n_test)
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n_test, generator=g)[:num_queries].sort().values


def flip_labels(
    y: torch.Tensor, num_classes: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly ``round(fraction * n)`` labels, each to a different random class.

    Returns:
        (noisy labels (n,), mask (n,) bool True where flipped).
    """
    fraction = check_float("dataset.label_noise", fraction, 0.0, 1.0)
    n = y.shape[0]
    n_flip = round(fraction * n)
    g = torch.Generator().manual_seed(seed + 104729)
    idx = torch.randperm(n, generator=g)[:n_flip]
    # Adding an offset in [1, C) modulo C never returns the original class.
    offset = torch.randint(1, num_classes, (n_flip,), generator=g)
    y_noisy = y.clone()
    y_noisy[idx] = (y[idx] + offset) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return y_noisy, mask


def standardize(
    x_train: torch.Tensor, *others: torch.Tensor, floor: float = 0.1, eps: float = 1e-6
) -> list[torch.Tensor]:
    """Standardise every split with the training split's per-feature mean and std.

    The std is floored at ``floor`` times the mean std of the varying features: a pixel
    that is (almost) constant in the training split but not elsewhere would otherwise be
    divided by ~0 and reach values of 1e5 on a few validation/test points, dominating
    their loss.
    """
    mu = x_train.mean(0, keepdim=True)
    sd = x_train.std(0, keepdim=True)
    varying = sd[sd > eps]
    ref = float(varying.mean()) if varying.numel() else 1.0
    sd = sd.clamp_min(max(floor * ref, eps))
    return [(x - mu) / sd for x in (x_train, *others)]
