"""The cached, parallel retraining service shared by every evaluation (design §5).

``retrain(subset_mask, seed)`` trains a fresh model on the masked training set with the
base model's recipe and returns its logits on the validation and test splits, from which
every measurement (query loss or margin, any property, test accuracy) is derived. Results
are stored once per (recipe, data, subset, seed) under ``<cache_dir>/retrain/<recipe key>/``
and reused by every method, grouping and sweep job that asks for the same subset.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ggda.data.base import DataBundle
from ggda.errors import GGDAError, check_choice, check_int
from ggda.io import load_or_none, save_artifact, tensor_hash
from ggda.models.training import Recipe, train_lean

log = logging.getLogger(__name__)

BACKENDS = ("process", "sequential")

# Per-worker state, set once by the pool initializer (so the data is pickled once).
_WORKER: dict[str, Any] = {}


def _init_worker(recipe: Recipe, bundle: DataBundle, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["recipe"] = recipe
    _WORKER["bundle"] = bundle


def _train_and_measure(
    recipe: Recipe, bundle: DataBundle, idx: torch.Tensor, seed: int, device: str
) -> dict[str, torch.Tensor]:
    net = train_lean(
        recipe, bundle.x_train[idx], bundle.y_train[idx], bundle.num_classes, seed, device
    )
    with torch.no_grad():
        return {
            "val": net(bundle.x_val.to(device)).float().cpu(),
            "test": net(bundle.x_test.to(device)).float().cpu(),
        }


def _worker_job(path: str, meta: dict, idx: torch.Tensor, seed: int) -> str:
    out = _train_and_measure(_WORKER["recipe"], _WORKER["bundle"], idx, seed, "cpu")
    # The worker writes the result itself, so a killed evaluation keeps finished retrains.
    save_artifact(path, out, meta)
    return path


class RetrainService:
    """Retrain on subsets, in parallel, with a persistent cache.

    Args:
        cache_dir: root of the cache (shared by runs and sweep jobs).
        backend: ``process`` (a pool of worker processes, one torch thread each) or
            ``sequential`` (in this process; used on GPU and for tiny jobs).
        workers: worker processes; 0 or less means one per CPU core.
        device: ``cpu`` or ``cuda`` (``auto`` picks cuda when available); non-CPU devices
            train sequentially in this process.
        min_parallel: fewer pending jobs than this run sequentially (pool start-up costs
            a few seconds).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        backend: str = "process",
        workers: int = 0,
        device: str = "cpu",
        min_parallel: int = 4,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.backend = check_choice("evaluation.retrain.backend", backend, BACKENDS)
        self.workers = int(workers) if int(workers) > 0 else (os.cpu_count() or 1)
        self.device = check_choice("evaluation.retrain.device", device, ("cpu", "cuda", "auto"))
        self.min_parallel = check_int("evaluation.retrain.min_parallel", min_parallel, 1)
        self.recipe: Recipe | None = None
        self.bundle: DataBundle | None = None
        self.key: str | None = None
        self.stats = {"retrains_run": 0, "retrains_cached": 0, "retrain_seconds": 0.0}

    def bind(self, recipe: Recipe, bundle: DataBundle, key: str) -> RetrainService:
        """Attach the recipe and data; ``key`` identifies both (see the pipeline)."""
        self.recipe, self.bundle, self.key = recipe, bundle, key
        return self

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def entry(self, mask: torch.Tensor, seed: int) -> tuple[Path, dict]:
        """Cache path and meta of one (subset, seed)."""
        if self.key is None:
            raise GGDAError("RetrainService.bind() must be called before use")
        mh = tensor_hash(mask.bool())
        meta = {"recipe_key": self.key, "mask": mh, "n": int(mask.numel()), "seed": int(seed)}
        return self.cache_dir / "retrain" / self.key / f"{mh}-s{seed}.pt", meta

    def run(
        self, masks: torch.Tensor, seeds: list[int], desc: str = "retrain"
    ) -> dict[str, torch.Tensor]:
        """Retrain on each mask with each seed.

        Args:
            masks: (S, n) bool, True = keep the training point.
            seeds: R seeds.
            desc: progress bar label.

        Returns:
            ``{"val": (S, R, N_val, C), "test": (S, R, N_test, C)}`` logits.
        """
        if self.recipe is None or self.bundle is None:
            raise GGDAError("RetrainService.bind() must be called before use")
        masks = masks.bool().cpu()
        if masks.ndim != 2 or masks.shape[1] != self.bundle.n_train:
            raise GGDAError(f"masks must have shape (S, {self.bundle.n_train})")
        if (masks.sum(1) == 0).any():
            raise GGDAError("cannot retrain on an empty subset")
        results: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        todo: list[tuple[int, int, Path, dict]] = []
        for s, mask in enumerate(masks):
            for r, seed in enumerate(seeds):
                path, meta = self.entry(mask, seed)
                got = load_or_none(path, meta, what="retrain result")
                if got is None:
                    todo.append((s, r, path, meta))
                else:
                    results[(s, r)] = got
        self.stats["retrains_cached"] += len(results)
        if todo:
            log.info("%s: %d retrains to run, %d reused from cache", desc, len(todo), len(results))
        t0 = time.perf_counter()
        device = self._device()
        parallel = (
            self.backend == "process"
            and device == "cpu"
            and self.workers > 1
            and len(todo) >= self.min_parallel
        )
        if parallel:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(self.workers, len(todo)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(self.recipe, self.bundle, 1),
            ) as pool:
                futs = {
                    pool.submit(
                        _worker_job, str(path), meta, masks[s].nonzero().squeeze(1), seeds[r]
                    ): (s, r, path, meta)
                    for s, r, path, meta in todo
                }
                for fut in tqdm(as_completed(futs), total=len(futs), desc=desc, leave=False):
                    s, r, path, meta = futs[fut]
                    fut.result()
                    results[(s, r)] = load_or_none(path, meta, what="retrain result")
        else:
            for s, r, path, meta in tqdm(todo, desc=desc, leave=False, disable=not todo):
                out = _train_and_measure(
                    self.recipe, self.bundle, masks[s].nonzero().squeeze(1), seeds[r], device
                )
                save_artifact(path, out, meta)
                results[(s, r)] = out
        self.stats["retrains_run"] += len(todo)
        self.stats["retrain_seconds"] += time.perf_counter() - t0
        missing = [
            sr
            for sr in ((s, r) for s in range(len(masks)) for r in range(len(seeds)))
            if results.get(sr) is None
        ]
        if missing:
            raise GGDAError(f"{len(missing)} retrain results could not be read back from the cache")
        return {
            split: torch.stack(
                [
                    torch.stack([results[(s, r)][split] for r in range(len(seeds))])
                    for s in range(len(masks))
                ]
            )
            for split in ("val", "test")
        }
