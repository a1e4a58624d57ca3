"""A user's image folder (``dataset=image_folder``): ``root/<class>/*.png|jpg``.

Layout: ``root/<class>/<image>`` (images in sub-folders of a class folder count too), or
``root/train/<class>/...`` with an optional ``root/test/<class>/...`` used as the test split
as given (validation then comes out of ``train``). Classes are the folder names, sorted,
mapped to 0..C-1 (``bundle.meta["classes"]``).

Images are read with Pillow, converted to RGB (or to grey when every image is grey, or
as ``dataset.channels`` says) and resized to ``dataset.size`` (bilinear). The decoded
uint8 tensor is cached in ``<cache_dir>/image_folder/<key>.pt``, written atomically; the
key hashes the folder's listing (relative paths, sizes, modification times), the size
and the channels, so adding, removing or editing an image rebuilds the cache. Pixels are
scaled to [0, 1] and standardised per channel with the training split's mean and std.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ggda.data.base import DataBundle
from ggda.data.files import resolve_path
from ggda.data.loading import DataFileError, assemble, split_any
from ggda.errors import ConfigError, check_float, check_int
from ggda.io import atomic_torch_save, stable_hash

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CACHE_VERSION = 1


def _size(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        s = check_int("dataset.size", size, 1)
        return s, s
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return check_int("dataset.size[0]", size[0], 1), check_int("dataset.size[1]", size[1], 1)
    raise ConfigError("dataset.size", size, "an integer side or [height, width]")


def list_images(split_root: Path) -> tuple[list[str], list[tuple[Path, str]], int]:
    """Classes (sorted folder names), (image path, class) pairs, count of skipped files.

    Raises:
        DataFileError: no class folders, or a class folder without images.
    """
    classes = sorted(
        p.name for p in split_root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise DataFileError(
            f"{split_root}: holds no class folders. Expected {split_root}/<class>/*.png|jpg "
            "(one folder per class), optionally under train/ and test/"
        )
    items, skipped = [], 0
    for c in classes:
        found = 0
        for p in sorted((split_root / c).rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.parts[-2:]):
                continue
            if p.suffix.lower() in EXTENSIONS:
                items.append((p, c))
                found += 1
            else:
                skipped += 1
        if not found:
            raise DataFileError(
                f"{split_root / c}: class folder holds no images ({', '.join(EXTENSIONS)}); "
                "add images or remove the folder"
            )
    return classes, items, skipped


def _decode(path: Path, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """(3, H, W) uint8 RGB of one image resized to ``hw``, and whether it was grey."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            grey = im.mode in GREY_MODES
            rgb = im.convert("RGB").resize((hw[1], hw[0]), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1), grey
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataFileError(
            f"{path}: cannot be read as an image ({e}); replace or delete the file"
        ) from e


class ImageFolder:
    """Classification images from class folders.

    Args:
        root: the folder (absolute, relative to the working directory, or under
            ``data_dir``).
        size: side of the (square) resized images, or [height, width].
        channels: 1 (grey), 3 (RGB) or None (grey when every image is grey, else RGB).
        cache_dir: where the decoded tensors are cached (None: ``root/.ggda_cache``).
        flatten: flatten each image to a vector (MLP, logistic regression).
        data_dir: ``paths.data_dir``.
        name: data set name.
        num_train, num_val, num_test: split sizes (integers or fractions; ``num_test`` of
            ``root/test`` when it exists, where None = all of it).
        num_queries: number of test points used as queries (m).
        split_seed: seed of the split and the queries.
        label_noise: fraction of training labels flipped.
        noise_seed: seed of the flips.
    """

    def __init__(
        self,
        root: str | None = None,
        size: int | list[int] = 32,
        channels: int | None = None,
        cache_dir: str | None = None,
        flatten: bool = False,
        data_dir: str | None = None,
        name: str = "image_folder",
        num_train: int | float | None = None,
        num_val: int | float = 0.1,
        num_test: int | float | None = None,
        num_queries: int = 100,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        self.root, self.data_dir, self.name = root, data_dir, name
        self.size = size  # as given (the config key); `hw` is the resolved (height, width)
        self.hw = _size(size)
        if channels is not None and channels not in (1, 3):
            raise ConfigError("dataset.channels", channels, "1, 3 or null (automatic)")
        self.channels = channels
        self.cache_dir = cache_dir
        self.flatten = bool(flatten)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_queries = check_int("dataset.num_queries", num_queries, 1)
        self.split_seed = int(split_seed)
        self.label_noise = check_float("dataset.label_noise", label_noise, 0.0, 1.0, hi_open=True)
        self.noise_seed = int(noise_seed)

    def _layout(self, root: Path) -> tuple[Path, Path | None]:
        train, test = root / "train", root / "test"
        if train.is_dir():
            return train, test if test.is_dir() else None
        if test.is_dir():
            raise DataFileError(
                f"{root}: has test/ but no train/; put the training images in {train}/<class>/"
            )
        return root, None

    def _listing(self, root: Path) -> dict:
        """Classes and images of each split, plus the cache key of the decoded tensors."""
        train_root, test_root = self._layout(root)
        classes, train_items, skipped = list_images(train_root)
        test_items: list[tuple[Path, str]] = []
        if test_root is not None:
            test_classes, test_items, more = list_images(test_root)
            skipped += more
            extra = sorted(set(test_classes) - set(classes))
            if extra:
                raise DataFileError(
                    f"{test_root}: has class folder(s) {extra} that {train_root} lacks; every "
                    "test class needs training images"
                )
        if len(classes) < 2:
            raise DataFileError(
                f"{train_root}: holds one class folder only ({classes[0]!r}); a classifier "
                f"needs at least 2 (one folder per class: {train_root}/<class>/*.png)"
            )
        if skipped:
            log.warning("%s: skipped %d files that are not images", root, skipped)
        files = [
            (str(p.relative_to(root)), c, p.stat().st_size, p.stat().st_mtime_ns)
            for p, c in [*train_items, *test_items]
        ]
        key = stable_hash(
            {
                "root": str(root.resolve()),
                "files": files,
                "hw": list(self.hw),
                "channels": self.channels,
                "version": CACHE_VERSION,
            }
        )
        return {"classes": classes, "train": train_items, "test": test_items, "key": key}

    def _decode_all(self, listing: dict) -> dict:
        index = {c: i for i, c in enumerate(listing["classes"])}
        out: dict = {"classes": listing["classes"]}
        all_grey = True
        for split in ("train", "test"):
            items = listing[split]
            x = np.zeros((len(items), 3, *self.hw), dtype=np.uint8)
            for i, (p, _) in enumerate(items):
                x[i], grey = _decode(p, self.hw)
                all_grey &= grey
            out[f"x_{split}"] = torch.from_numpy(x)
            out[f"y_{split}"] = torch.tensor([index[c] for _, c in items], dtype=torch.long)
        channels = self.channels or (1 if all_grey else 3)
        if channels == 1:
            # Grey images convert to RGB with equal channels; luminance of RGB otherwise.
            for split in ("train", "test"):
                x = out[f"x_{split}"].float()
                lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
                out[f"x_{split}"] = lum.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
        return out

    def read(self, root: Path) -> dict:
        """Decoded uint8 images and labels of both splits, from the cache when valid."""
        listing = self._listing(root)
        cache_root = Path(self.cache_dir) if self.cache_dir else root / ".ggda_cache"
        path = cache_root / "image_folder" / f"{listing['key']}.pt"
        if path.exists():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if cached.get("key") == listing["key"]:
                    log.info("%s: %d images from the cache %s", root, len(cached["y_train"]), path)
                    return cached
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring the unreadable image cache %s (%s)", path, e)
        n = len(listing["train"]) + len(listing["test"])
        log.info("%s: decoding %d images to %dx%d", root, n, *self.hw)
        out = self._decode_all(listing)
        out["key"] = listing["key"]
        atomic_torch_save(path, out)
        return out

    def load(self) -> DataBundle:
        root = resolve_path(
            "dataset.root", self.root, self.data_dir, "a folder of class folders of images"
        )
        if not root.is_dir():
            raise DataFileError(f"dataset.root={self.root}: {root} is a file, not a folder")
        d = self.read(root)
        has_test = d["y_test"].numel() > 0
        tr, va, te = split_any(
            len(d["y_train"]),
            len(d["y_test"]) if has_test else None,
            self.num_train,
            self.num_val,
            self.num_test,
            self.split_seed,
            str(root),
        )
        test_x, test_y = (d["x_test"], d["y_test"]) if has_test else (d["x_train"], d["y_train"])
        xs = {"train": d["x_train"][tr], "val": d["x_train"][va], "test": test_x[te]}
        ys = {"train": d["y_train"][tr], "val": d["y_train"][va], "test": test_y[te]}
        f = {s: v.float().div_(255.0) for s, v in xs.items()}
        mu = f["train"].mean(dim=(0, 2, 3), keepdim=True)
        sd = f["train"].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        splits = {}
        for s in ("train", "val", "test"):
            x = (f[s] - mu) / sd
            splits[s] = (x.flatten(1) if self.flatten else x, ys[s])
        classes = list(d["classes"])
        log.info(
            "%s: %d classes: %s",
            root,
            len(classes),
            ", ".join(f"{c!r} -> {i}" for i, c in enumerate(classes[:20])),
        )
        return assemble(
            self.name,
            splits,
            len(classes),
            self.num_queries,
            self.split_seed,
            self.label_noise,
            self.noise_seed,
            meta={
                "classes": classes,
                "root": str(root),
                "image_shape": tuple(d["x_train"].shape[1:]),
            },
        )
