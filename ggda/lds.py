"""Export the LDS store for other tools: ``python -m ggda.lds export PATH [--out FILE]``.

PATH is either

- a **run directory** (it has ``tables/lds_store.csv``, written by the LDS evaluator): one
  ``.npz`` per LDS level with ``masks`` (S, n) bool, ``seeds`` (S, R), ``measurements``
  (S, m) (the property values the run compared with, mean over repeats), ``point_scores``
  (n, m) (the run's scores broadcast to points as the LDS did), ``lds`` (m,) ggda's
  per-query LDS, and ``manifest`` (the store's manifest, a JSON string). The LDS is the
  per-query Spearman correlation over subsets of ``masks @ point_scores`` and
  ``measurements``;
- or a **cache directory** (or any folder above LDS stores, or one store): one ``.npz``
  per store with ``masks``, ``seeds``, ``complete`` (S,) bool, ``logits_val`` and
  ``logits_test`` (S, R, N, C), ``measurements_<key>`` (S, m) for every recorded
  measurement (``measurements`` too when there is exactly one) and ``manifest``.

``--out``: the file when there is one output; otherwise a folder for ``<name>.npz`` files
(default: the run directory, or the current directory for a cache).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ggda.errors import GGDAError
from ggda.evaluation.base import spearman_columns
from ggda.evaluation.lds_store import LDSStore, find_stores
from ggda.grouping.base import Grouping
from ggda.io import atomic_write_bytes


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def run_arrays(run_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{level: arrays}`` of a run directory's LDS (see the module docstring)."""
    run_dir = Path(run_dir)
    table = run_dir / "tables" / "lds_store.csv"
    if not table.exists():
        raise GGDAError(
            f"{run_dir} has no tables/lds_store.csv: not a run directory with an LDS "
            "evaluation (run with evaluation=lds), or pass the cache directory instead"
        )
    rows = pd.read_csv(table)
    per_query = run_dir / "tables" / "lds_per_query.csv"
    lds_table = pd.read_csv(per_query) if per_query.exists() else None
    scores = torch.load(run_dir / "scores.pt").double()  # (k, m), sum over members
    gid = torch.load(run_dir / "grouping.pt")
    grouping = Grouping(gid, int(gid.max()) + 1)
    out = {}
    for row in rows.itertuples(index=False):
        store = LDSStore(row.store)
        manifest = store.manifest()
        meas = store.measurements()
        if row.measurement not in meas:
            raise GGDAError(f"LDS store {store.path} has no measurement {row.measurement}")
        arrays = {
            "masks": np.array(store.masks()),
            "seeds": store.seeds(),
            "measurements": meas[row.measurement],
            "point_scores": grouping.broadcast(scores, row.broadcast).numpy(),
            "manifest": np.array(json.dumps(manifest, sort_keys=True)),
        }
        if lds_table is not None and f"lds_{row.level}" in lds_table:
            arrays["lds"] = lds_table[f"lds_{row.level}"].to_numpy(dtype=np.float64)
        out[str(row.level)] = arrays
    return out


def store_arrays(store: LDSStore) -> dict[str, np.ndarray]:
    """Everything one store holds (see the module docstring)."""
    manifest = store.manifest()
    complete = np.zeros(manifest["num_subsets"], dtype=bool)
    complete[manifest["complete"]] = True
    arrays = {
        "masks": np.array(store.masks()),
        "seeds": store.seeds(),
        "complete": complete,
        "logits_val": np.array(store.logits("val")),
        "logits_test": np.array(store.logits("test")),
        "manifest": np.array(json.dumps(manifest, sort_keys=True)),
    }
    meas = store.measurements()
    arrays |= {f"measurements_{k}": v for k, v in meas.items()}
    if len(meas) == 1:
        arrays["measurements"] = next(iter(meas.values()))
    return arrays


def export(path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the ``.npz`` files for ``path`` (a run or cache directory); returns them."""
    path = Path(path)
    if not path.exists():
        raise GGDAError(f"{path} does not exist: pass a run directory or a cache directory")
    if (path / "tables" / "lds_store.csv").exists():
        items = {f"lds_{lv}": a for lv, a in run_arrays(path).items()}
        default_dir = path
    else:
        stores = find_stores(path)
        if not stores:
            raise GGDAError(
                f"no LDS store under {path} (stores are written by evaluation=lds under "
                "<cache_dir>/lds); pass a run directory or the cache directory"
            )
        items = {st.path.name: store_arrays(st) for st in stores}
        default_dir = Path.cwd()
    if out is not None and len(items) == 1:
        targets = {name: Path(out) for name in items}
    else:
        folder = Path(out) if out is not None else default_dir
        targets = {name: folder / f"{name}.npz" for name in items}
    for name, arrays in items.items():
        _save_npz(targets[name], arrays)
    return list(targets.values())


def lds_of_export(npz: str | Path) -> np.ndarray:
    """Per-query LDS recomputed from a run export: Spearman of masks @ scores vs measured."""
    with np.load(npz) as f:
        pred = f["masks"].astype(np.float64) @ f["point_scores"]
        return spearman_columns(pred, f["measurements"])


def main(argv: list[str] | None = None) -> int:
    """Command line ``python -m ggda.lds export PATH [--out OUT]``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after printing a ggda error.
    """
    ap = argparse.ArgumentParser(prog="python -m ggda.lds", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the LDS store as .npz for other tools")
    ex.add_argument("path", help="a run directory or a cache directory")
    ex.add_argument("--out", default=None, help="output file (one output) or folder")
    args = ap.parse_args(argv)
    try:
        for p in export(args.path, args.out):
            print(p)
    except GGDAError as e:
        print(f"ggda: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
