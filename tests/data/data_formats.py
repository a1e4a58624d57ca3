"""Writers of tiny files in the real formats (MNIST IDX, CIFAR-10 pickles, HELOC CSV,
GLUE QNLI TSV), shared by the loader tests and the end-to-end smoke tests.

Every image holds, in every channel, one pixel 0 and one pixel 255 (so a test can undo the
per-channel standardisation of each image exactly) and its own id in pixel (0, 0, 2).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from ggda.data.tabular import FICO_FEATURES


def images(n: int, c: int, side: int, first_id: int, seed: int) -> np.ndarray:
    """(n, c, side, side) uint8 random images with the 0/255 anchors and the id pixel."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 255, size=(n, c, side, side), dtype=np.uint8)
    x[:, :, 0, 0] = 0
    x[:, :, 0, 1] = 255
    x[:, 0, 0, 2] = (np.arange(n) + first_id).astype(np.uint8)
    return x


def unstandardize(x: np.ndarray) -> np.ndarray:
    """Invert any per-image, per-channel increasing affine map using the 0/255 anchors."""
    lo = x[:, :, 0, 0][..., None, None]
    hi = x[:, :, 0, 1][..., None, None]
    return np.rint((x - lo) / (hi - lo) * 255).astype(np.int64)


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 dims, data."""
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = False) -> dict:
    """The four MNIST IDX files under ``root``; ids 0..n_train-1 train, 100.. test."""
    root.mkdir(parents=True, exist_ok=True)
    xtr = images(n_train, 1, 28, 0, seed=1)[:, 0]
    xte = images(n_test, 1, 28, 100, seed=2)[:, 0]
    ytr = (np.arange(n_train) * 7 + 3) % 10
    yte = (np.arange(n_test) * 3 + 1) % 10
    write_idx(root / "train-images-idx3-ubyte", xtr, gz)
    write_idx(root / "train-labels-idx1-ubyte", ytr.astype(np.uint8), gz)
    write_idx(root / "t10k-images-idx3-ubyte", xte, gz)
    write_idx(root / "t10k-labels-idx1-ubyte", yte.astype(np.uint8), gz)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def write_cifar(root: Path, per_batch: int = 6, n_test: int = 10) -> dict:
    """``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` as python-2 style pickles
    (protocol 2, bytes keys); image ids 0..5*per_batch-1 train, 200.. test."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(5):
        x = images(per_batch, 3, 32, b * per_batch, seed=10 + b)
        y = [int(v) for v in (np.arange(per_batch) + b * per_batch) % 10]
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": y,
            b"data": x.reshape(per_batch, 3072),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        (d / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(x)
        ys += y
    xte = images(n_test, 3, 32, 200, seed=20)
    yte = [int(v) for v in (np.arange(n_test) * 3) % 10]
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": yte, b"data": xte.reshape(-1, 3072)}
    (d / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    return {
        "x_train": np.concatenate(xs),
        "y_train": np.array(ys),
        "x_test": xte,
        "y_test": np.array(yte),
    }


HELOC_COLUMNS = list(FICO_FEATURES)


def heloc_rows(n: int, seed: int = 0) -> list[list]:
    """Rows [RiskPerformance, the 23 FICO features] with -7 codes in MSinceMostRecentDelq
    and -8 in NetFractionRevolvingBurden; every tenth row is an 'all -9' row (no bureau
    record). Bad <=> ExternalRiskEstimate < 70."""
    rng = np.random.default_rng(seed)
    delq = HELOC_COLUMNS.index("MSinceMostRecentDelq")
    burden = HELOC_COLUMNS.index("NetFractionRevolvingBurden")
    rows = []
    for i in range(n):
        if i % 10 == 9:
            rows.append(["Bad" if i % 2 else "Good", *([-9] * len(HELOC_COLUMNS))])
            continue
        feats = [int(v) for v in rng.integers(0, 100, size=len(HELOC_COLUMNS))]
        feats[0] = ext = int(rng.integers(40, 95))
        if i % 4 == 0:
            feats[delq] = -7  # never delinquent
        if i % 5 == 0:
            feats[burden] = -8
        rows.append(["Bad" if ext < 70 else "Good", *feats])
    return rows


def write_heloc(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(["RiskPerformance", *HELOC_COLUMNS])]
    lines += [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def qnli_rows(n: int, seed: int = 0, offset: int = 0) -> list[tuple[str, str, str]]:
    """(question, sentence, label) rows; entailed pairs share a topic word."""
    rng = np.random.default_rng(seed)
    topics = ["river", "castle", "engine", "violin", "planet", "harbour", "forest", "museum"]
    rows = []
    for i in range(n):
        a, b = rng.choice(len(topics), 2, replace=False)
        ent = bool(i % 2)
        q = f'What is the "{topics[a]}" known for, item {i + offset}?'
        s = f"The {topics[a] if ent else topics[b]} is known for its long history."
        rows.append((q, s, "entailment" if ent else "not_entailment"))
    return rows


def write_qnli(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["index\tquestion\tsentence\tlabel"]
    lines += [f"{i}\t{q}\t{s}\t{lab}" for i, (q, s, lab) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
