"""A user's arrays (``dataset=arrays``): an ``.npz`` file or a ``.pt`` dict of tensors.

Keys: ``x`` (N, *input_shape) inputs and ``y`` (N,) labels, optionally ``x_test`` and
``y_test`` (a test split used as given; validation then comes out of ``x``). Labels of any
type (ints, strings, bools) are mapped to 0..C-1 in sorted order (``bundle.meta["classes"]``).

``dataset.kind`` says what the inputs are:

- ``features``: any shape, float; standardised per element with training statistics
  (:func:`ggda.data.base.standardize`, as for the bundled sets);
- ``images``: (N, C, H, W) (or (N, H, W), given one channel); standardised per channel;
- ``tokens``: integer token ids (N, L), kept as they are (for ``model=text`` set
  ``dataset.max_vocab`` above the largest id).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch

from ggda.data.base import DataBundle, standardize
from ggda.data.files import resolve_path
from ggda.data.loading import DataFileError, assemble, encode_labels, split_any
from ggda.errors import check_choice, check_float, check_int

log = logging.getLogger(__name__)

KINDS = ("features", "images", "tokens")
FORMAT = (
    "an .npz file (np.savez(path, x=..., y=..., [x_test=..., y_test=...])) or a .pt file "
    "holding a dict of tensors with the same keys (torch.save({'x': x, 'y': y}, path))"
)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` or ``.pt`` file as numpy arrays (no pickled objects).

    Raises:
        DataFileError: unknown suffix, unreadable file, object arrays, non-tensor values.
    """
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except ValueError as e:  # object arrays need pickle, which a data file must not run
            raise DataFileError(
                f"{path}: holds object arrays ({e}); save plain numeric or string arrays"
            ) from e
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise DataFileError(
                f"{path}: cannot be read as .npz ({e}); is it complete? Expected {FORMAT}"
            ) from e
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickle refusals, ...
            raise DataFileError(
                f"{path}: cannot be read as a tensor file ({type(e).__name__}: {e}). "
                f"Expected {FORMAT}"
            ) from e
        if not isinstance(obj, dict):
            raise DataFileError(f"{path}: holds a {type(obj).__name__}, not a dict. {FORMAT}")
        out = {}
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[str(k)] = v.numpy()
            elif isinstance(v, (list, tuple)):
                out[str(k)] = np.asarray(v)
            else:
                raise DataFileError(
                    f"{path}: key {k!r} holds a {type(v).__name__}, not a tensor. {FORMAT}"
                )
        return out
    raise DataFileError(f"{path}: unknown file type {suffix!r}. Expected {FORMAT}")


class ArrayFile:
    """Classification data from arrays in an ``.npz`` or ``.pt`` file.

    Args:
        file: the file (absolute, relative to the working directory, or under ``data_dir``).
        kind: ``features`` | ``images`` | ``tokens`` (see the module docstring).
        max_vocab: for ``tokens``, every id must be below it (the text model's embedding
            rows); None = no check.
        flatten: flatten each input to a vector.
        data_dir: ``paths.data_dir``.
        name: data set name.
        num_train, num_val, num_test: split sizes (integers or fractions; ``num_test`` of
            ``x_test`` when given, where None = all of it).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split and the queries.
        label_noise: fraction of training labels flipped.
        noise_seed: seed of the flips.
    """

    def __init__(
        self,
        file: str | None = None,
        kind: str = "features",
        max_vocab: int | None = None,
        flatten: bool = False,
        data_dir: str | None = None,
        name: str = "arrays",
        num_train: int | float | None = None,
        num_val: int | float = 0.1,
        num_test: int | float | None = None,
        num_queries: int = 100,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        self.file, self.data_dir, self.name = file, data_dir, name
        self.kind = check_choice("dataset.kind", kind, KINDS)
        self.max_vocab = None if max_vocab is None else check_int("dataset.max_vocab", max_vocab, 2)
        self.flatten = bool(flatten)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_queries = check_int("dataset.num_queries", num_queries, 1)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)

    def _inputs(self, path: Path, key: str, x: np.ndarray) -> torch.Tensor:
        """Inputs as float (features, images) or long (tokens) tensors, checked."""
        if x.ndim < 2:
            raise DataFileError(
                f"{path}: {key} has shape {x.shape}; expected (N, *input_shape), one row per "
                "example (a vector of N numbers is one feature: reshape it to (N, 1))"
            )
        if x.dtype.kind not in "biuf":
            raise DataFileError(f"{path}: {key} has dtype {x.dtype}; expected numbers")
        if self.kind == "tokens":
            if x.dtype.kind == "f" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
                raise DataFileError(
                    f"{path}: {key} holds non-integer values; dataset.kind=tokens needs "
                    "integer token ids"
                )
            t = torch.as_tensor(x.astype(np.int64))
            if t.numel() and int(t.min()) < 0:
                i = int((t < 0).flatten(1).any(1).nonzero()[0])
                raise DataFileError(f"{path}: {key}[{i}] holds a negative token id")
            if self.max_vocab is not None and t.numel() and int(t.max()) >= self.max_vocab:
                i = int((t >= self.max_vocab).flatten(1).any(1).nonzero()[0])
                raise DataFileError(
                    f"{path}: {key}[{i}] holds token id {int(t[i].max())} >= dataset.max_vocab="
                    f"{self.max_vocab}; raise `dataset.max_vocab` to at least {int(t.max()) + 1}"
                )
            return t
        t = torch.as_tensor(x.astype(np.float32))
        bad = ~torch.isfinite(t).flatten(1).all(1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise DataFileError(
                f"{path}: {key}[{i}] holds NaN or infinite values ({int(bad.sum())} examples "
                "in all); fill or remove them"
            )
        if self.kind == "images":
            if t.ndim == 3:
                t = t.unsqueeze(1)
            if t.ndim != 4:
                raise DataFileError(
                    f"{path}: {key} has shape {tuple(x.shape)}; dataset.kind=images needs "
                    "(N, C, H, W) (channels first) or (N, H, W)"
                )
        return t

    def load(self) -> DataBundle:
        """Read the file, split it and standardise by ``kind`` (see the class docstring).

        Returns:
            The train / val / test splits, the query indices and what was read.
        """
        path = resolve_path("dataset.file", self.file, self.data_dir, "an .npz or .pt file")
        arrays = read_arrays(path)
        for need in ("x", "y"):
            if need not in arrays:
                raise DataFileError(
                    f"{path}: has no array {need!r} (it holds {sorted(arrays)}). Expected {FORMAT}"
                )
        has_test = "x_test" in arrays or "y_test" in arrays
        if has_test and not ("x_test" in arrays and "y_test" in arrays):
            raise DataFileError(f"{path}: holds only one of x_test / y_test; give both or neither")
        pairs = [("x", "y")] + ([("x_test", "y_test")] if has_test else [])
        xs, ys = [], []
        for kx, ky in pairs:
            x, y = arrays[kx], arrays[ky]
            if y.ndim == 2 and y.shape[1] == 1:
                y = y[:, 0]
            if y.ndim != 1:
                raise DataFileError(
                    f"{path}: {ky} has shape {y.shape}; expected (N,) class labels (not one-hot)"
                )
            if x.shape[0] != y.shape[0]:
                raise DataFileError(
                    f"{path}: {kx} holds {x.shape[0]} examples but {ky} holds {y.shape[0]} labels"
                )
            if x.shape[0] == 0:
                raise DataFileError(f"{path}: {kx} holds no examples")
            xs.append(self._inputs(path, kx, x))
            ys.append(y)
        if has_test and xs[0].shape[1:] != xs[1].shape[1:]:
            raise DataFileError(
                f"{path}: x has inputs of shape {tuple(xs[0].shape[1:])} but x_test "
                f"{tuple(xs[1].shape[1:])}"
            )
        codes, classes = encode_labels(ys, str(path), key="y")
        tr, va, te = split_any(
            len(codes[0]),
            len(codes[1]) if has_test else None,
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
            str(path),
        )
        x_pool, x_test_all = xs[0], xs[-1]
        y_pool, y_test_all = torch.as_tensor(codes[0]), torch.as_tensor(codes[-1])
        x = {"train": x_pool[tr], "val": x_pool[va], "test": x_test_all[te]}
        y = {"train": y_pool[tr], "val": y_pool[va], "test": y_test_all[te]}
        if self.kind == "features":
            x["train"], x["val"], x["test"] = standardize(x["train"], x["val"], x["test"])
        elif self.kind == "images":
            dims = (0, *range(2, x["train"].ndim))
            mu = x["train"].mean(dim=dims, keepdim=True)
            sd = x["train"].std(dim=dims, keepdim=True).clamp_min(1e-6)
            x = {s: (v - mu) / sd for s, v in x.items()}
        else:
            top = int(max(int(v.max()) for v in (x_pool, x_test_all)))
            log.info(
                "%s: token ids in [0, %d]; with model=text set dataset.max_vocab >= %d",
                path,
                top,
                top + 1,
            )
        if self.flatten:
            x = {s: v.flatten(1) for s, v in x.items()}
        log.info(
            "%s: %d classes: %s",
            path,
            len(classes),
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
            meta={"classes": classes, "file": str(path), "kind": self.kind},
        )
