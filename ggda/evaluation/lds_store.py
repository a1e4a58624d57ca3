"""The LDS store: retrained subsets in the datamodels layout, readable by any tool.

One store holds one family of subsets (one level of one LDS configuration) for one recipe
key (recipe + data, see the pipeline), under ``<cache_dir>/lds/<recipe key>/<name>/``:

    manifest.json      what each array holds, n, the recipe key, the sampler settings,
                       the seeds' mode, the complete rows (each with a
                       digest of its logits), the recorded measurements
    masks.npy          (S, n) bool   row s: the training points kept in subset s
    seeds.npy          (S, R) int64  the retrain seeds of subset s (R repeats)
    logits_val.npy     (S, R, N_val, C) float32   logits of each retrain on the val split
    logits_test.npy    (S, R, N_test, C) float32  ... and on the test split
    measurements/<key>.npy  (S, m) float64  a property's values (mean over the R repeats),
                       recorded by the LDS evaluator; the manifest says which property

The arrays are ``.npy`` files opened as memory maps (``numpy.load(mmap_mode="r")``), so a
large store is read row by row. Logits are kept because every measurement (any query's
loss or margin, any property, accuracy) derives from them.

Writes: the arrays are created once (temp file + rename); a row is written into the
memory maps and flushed *before* the manifest (rewritten atomically) lists it as
complete, so a killed run keeps every finished row and a half-written row is simply not
complete. Every change happens under the store's POSIX lock. Reads check each complete
row against its digest (:meth:`LDSStore.read_complete`): a damaged row or array file is
reported, dropped from ``complete`` and retrained, never used. The retrains themselves are
computed and locked per entry by :class:`~ggda.evaluation.retrain.RetrainService` (two jobs
never train the same subset); the store records them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggda.errors import GGDAError
from ggda.io import atomic_write_bytes, atomic_write_json, stable_hash

FORMAT = "ggda-lds-store/1"
SPLITS = ("val", "test")

log = logging.getLogger(__name__)


def _row_hash(row: dict[str, np.ndarray]) -> str:
    """Digest of one row's float32 logits of every split (what the manifest records)."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(np.ascontiguousarray(row[split], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _entry_lock(path: Path):
    # the per-entry lock of the retrain cache, imported late (retrain imports this module)
    from ggda.evaluation.retrain import entry_lock

    return entry_lock(path)


def store_name(level: str, masks: np.ndarray, seeds: np.ndarray) -> str:
    """``<level>-<hash of masks and seeds>``: the same subsets and seeds, the same store."""
    digest = stable_hash(
        {
            "masks": np.packbits(masks, axis=1).tobytes().hex(),
            "shape": list(masks.shape),
            "seeds": seeds.tolist(),
        }
    )
    return f"{level}-{digest}"


class LDSStore:
    """One store directory (see the module docstring).

    Args:
        path: the store directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | Path,
        recipe_key: str,
        level: str,
        masks: torch.Tensor | np.ndarray,
        seeds: torch.Tensor | np.ndarray,
        shapes: dict[str, tuple[int, int]],
        sampler: dict[str, Any] | None = None,
    ) -> LDSStore:
        """Open the store of these subsets and seeds, creating it if needed.

        Args:
            root: ``<cache_dir>/lds``.
            recipe_key: the retrain service's key (recipe + data).
            level: ``point`` | ``group`` (or any label of a family of subsets).
            masks: (S, n) bool.
            seeds: (S, R) integer retrain seeds.
            shapes: ``{"val": (N_val, C), "test": (N_test, C)}``.
            sampler: how the subsets and seeds were drawn (alpha, seed, seed_mode, ...),
                recorded in the manifest.

        Raises:
            GGDAError: an existing store holds other masks or seeds (a hash collision or
                a hand-edited store).
        """
        masks = np.ascontiguousarray(np.asarray(masks, dtype=bool))
        seeds = np.ascontiguousarray(np.asarray(seeds, dtype=np.int64))
        if masks.ndim != 2 or seeds.ndim != 2 or seeds.shape[0] != masks.shape[0]:
            raise GGDAError(
                f"LDS store needs masks (S, n) and seeds (S, R); got {masks.shape}, {seeds.shape}"
            )
        st = cls(Path(root) / recipe_key / store_name(level, masks, seeds))
        with _entry_lock(st.manifest_path):
            if st.manifest_path.exists():
                st._check(masks, seeds)
                return st
            s, r = seeds.shape
            atomic_write_bytes(st.path / "masks.npy", _npy_bytes(masks))
            atomic_write_bytes(st.path / "seeds.npy", _npy_bytes(seeds))
            for split in SPLITS:
                st._create_logits(split, (s, r, *map(int, shapes[split])))
            manifest = {
                "format": FORMAT,
                "recipe_key": recipe_key,
                "level": level,
                "n": int(masks.shape[1]),
                "num_subsets": int(s),
                "repeats": int(r),
                "sampler": dict(sampler or {}),
                "arrays": {
                    "masks": "masks.npy: (subsets, n) bool, True = training point kept",
                    "seeds": "seeds.npy: (subsets, repeats) int64 retrain seeds",
                    **{
                        f"logits_{sp}": f"logits_{sp}.npy: (subsets, repeats, N_{sp}, "
                        f"classes) float32 logits of each retrain on the {sp} split; "
                        "valid for the complete rows only"
                        for sp in SPLITS
                    },
                    "measurements": "measurements/<key>.npy: (subsets, queries) float64, "
                    "a property's values averaged over repeats; see `measurements`",
                },
                "complete": [],
                "row_hashes": {},
                "shapes": {sp: [int(d) for d in shapes[sp]] for sp in SPLITS},
                "measurements": {},
            }
            atomic_write_json(st.manifest_path, manifest)
        return st

    def _create_logits(self, split: str, shape: tuple[int, ...]) -> None:
        """A zeroed (S, R, N, C) float32 logits array (temp file + rename)."""
        tmp = self.path / f".logits_{split}.npy.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        mm.flush()
        del mm
        tmp.replace(self.path / f"logits_{split}.npy")

    def _check(self, masks: np.ndarray, seeds: np.ndarray) -> None:
        if not (
            np.array_equal(np.load(self.path / "masks.npy", mmap_mode="r"), masks)
            and np.array_equal(np.load(self.path / "seeds.npy"), seeds)
        ):
            raise GGDAError(
                f"LDS store {self.path} holds other subsets or seeds than requested; "
                "delete that folder to rebuild it"
            )

    # -- reading --------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        """The manifest (read fresh: other jobs may have completed rows)."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise GGDAError(f"cannot read LDS store manifest {self.manifest_path}: {e}") from e

    def complete(self) -> list[int]:
        """Sorted indices of the rows whose logits are stored."""
        return sorted(self.manifest()["complete"])

    def masks(self) -> np.ndarray:
        """(S, n) bool, memory-mapped."""
        return np.load(self.path / "masks.npy", mmap_mode="r")

    def seeds(self) -> np.ndarray:
        """(S, R) int64."""
        return np.load(self.path / "seeds.npy")

    def logits(self, split: str, rows: list[int] | None = None) -> np.ndarray:
        """(S, R, N, C) memory map of one split's logits, or a copy of ``rows`` of it."""
        mm = np.load(self.path / f"logits_{split}.npy", mmap_mode="r")
        return mm if rows is None else np.array(mm[rows])

    def read_complete(self) -> tuple[list[int], dict[str, np.ndarray]]:
        """The complete rows whose logits match their digests, and those logits.

        A row whose logits no longer match the digest the manifest recorded (a damaged or
        hand-edited file), or every row of an array file that cannot be read (truncated),
        is reported with a warning and removed from ``complete`` so that it is retrained
        and written again. Rows of stores written before digests existed are trusted.

        Returns:
            (rows, ``{"val": (len(rows), R, N_val, C), "test": ...}``) float32 copies.
        """
        with _entry_lock(self.manifest_path):
            manifest = self.manifest()
            rows = sorted(manifest["complete"])
            if not rows:
                return [], {}
            got: dict[str, np.ndarray] = {}
            bad: dict[int, str] = {}
            for split in SPLITS:
                try:
                    got[split] = self.logits(split, rows)
                except (OSError, ValueError) as e:
                    bad |= {s: f"logits_{split}.npy is unreadable ({e})" for s in rows}
                    shape = (manifest["num_subsets"], manifest["repeats"])
                    if "shapes" not in manifest:
                        raise GGDAError(
                            f"LDS store {self.path}: logits_{split}.npy is unreadable ({e}); "
                            "delete that folder to rebuild it"
                        ) from None
                    self._create_logits(split, (*shape, *manifest["shapes"][split]))
            hashes = manifest.get("row_hashes", {})
            for i, s in enumerate(rows):
                want = hashes.get(str(s))
                row = {sp: got[sp][i] for sp in SPLITS} if s not in bad else None
                if want is not None and row is not None and _row_hash(row) != want:
                    bad[s] = "its logits fail their checksum"
            for s, why in sorted(bad.items()):
                log.warning(
                    "Ignoring bad cached retrain result (row %d of LDS store %s: %s) and "
                    "recomputing it",
                    s,
                    self.path,
                    why,
                )
            if bad:
                manifest["complete"] = [s for s in rows if s not in bad]
                for s in bad:
                    hashes.pop(str(s), None)
                atomic_write_json(self.manifest_path, manifest)
            keep = [i for i, s in enumerate(rows) if s not in bad]
            return [rows[i] for i in keep], {sp: got[sp][keep] for sp in got} if keep else {}

    def measurements(self) -> dict[str, np.ndarray]:
        """``{key: (S, m)}`` every recorded measurement."""
        keys = self.manifest().get("measurements", {})
        return {k: np.load(self.path / "measurements" / f"{k}.npy") for k in keys}

    # -- writing --------------------------------------------------------------------------
    def write_rows(self, rows: dict[int, dict[str, torch.Tensor]]) -> None:
        """Store the logits of finished rows and mark them complete.

        Args:
            rows: ``{row: {"val": (R, N_val, C), "test": (R, N_test, C)}}``.
        """
        if not rows:
            return
        with _entry_lock(self.manifest_path):
            arrays = {
                int(s): {sp: out[sp].detach().cpu().float().numpy() for sp in SPLITS}
                for s, out in rows.items()
            }
            for split in SPLITS:
                mm = np.load(self.path / f"logits_{split}.npy", mmap_mode="r+")
                for s, row in arrays.items():
                    mm[s] = row[split]
                mm.flush()  # the data is on disk before the manifest says so
                del mm
            manifest = self.manifest()
            manifest["complete"] = sorted(set(manifest["complete"]) | set(arrays))
            hashes = manifest.setdefault("row_hashes", {})
            hashes |= {str(s): _row_hash(row) for s, row in arrays.items()}
            atomic_write_json(self.manifest_path, manifest)

    def record_measurement(self, key: str, values: torch.Tensor, info: dict[str, Any]) -> None:
        """Store a property's values on every subset (all rows must be complete).

        Args:
            key: file stem, e.g. a hash of the property.
            values: (S, m).
            info: what was measured (property config, query indices), into the manifest.
        """
        arr = np.asarray(values.detach().cpu().double().numpy())
        with _entry_lock(self.manifest_path):
            manifest = self.manifest()
            if len(manifest["complete"]) != manifest["num_subsets"]:
                raise GGDAError(f"LDS store {self.path}: measurements need every row complete")
            atomic_write_bytes(self.path / "measurements" / f"{key}.npy", _npy_bytes(arr))
            manifest.setdefault("measurements", {})[key] = {
                **info,
                "shape": list(arr.shape),
            }
            atomic_write_json(self.manifest_path, manifest)


def find_stores(path: str | Path) -> list[LDSStore]:
    """Every store under ``path`` (a store, a recipe folder, ``lds/`` or a cache dir)."""
    path = Path(path)
    return [LDSStore(p.parent) for p in sorted(path.rglob("manifest.json")) if _is_store(p)]


def _is_store(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False
