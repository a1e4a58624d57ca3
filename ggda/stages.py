"""The stages of a run as plain functions: group, attribute, evaluate, each cached.

A run is three stages over library objects, each returning a small typed result:

- :func:`group`: a :class:`~ggda.grouping.base.Grouper` on
  :class:`~ggda.grouping.base.GroupingInputs` -> :class:`GroupingStage` (the grouping, its
  seconds and phase timings, whether it came from the cache);
- :func:`attribute`: an :class:`~ggda.attribution.base.Attributor` on an
  :class:`~ggda.attribution.base.AttributionTask` -> :class:`AttributionStage`;
- :func:`evaluate` (or :func:`iter_evaluate`, one evaluator at a time): the evaluators on an
  attribution -> :class:`EvaluationStage` (metrics, tables, figures per evaluator).

Given an :class:`ArtifactCache`, the grouping and the scores are stored under
``<cache>/groupings/<key>.pt`` and ``<cache>/scores/<key>.pt``, each key a hash of exactly
what decides the artifact (:func:`cache_keys`), and a second call returns the stored
result. The Lightning callbacks (``ggda.lightning.callbacks``) call these functions, and so
can plain Python code and the benchmarks. This module imports neither Lightning nor Hydra
nor OmegaConf: the key functions take plain dicts.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Attributor
from ggda.attribution.base import check_finite_scores as _check_finite
from ggda.evaluation.base import EvalContext, EvalResult, Evaluator
from ggda.grouping.base import Grouper, Grouping, GroupingInputs
from ggda.io import atomic_torch_save, load_or_none, save_artifact, stable_hash

log = logging.getLogger(__name__)

# Bumped when code changes what a cached artifact holds for the same config (data
# preprocessing, training loop), so that stale caches are not reused.
# 3: per-epoch shuffle order a function of (seed, epoch) (exact resume); data fingerprints.
CACHE_VERSION = 3

DEFAULT_PRECISION = "32-true"


# -- cache keys -----------------------------------------------------------------------------


def data_key(data: Mapping[str, Any], fingerprint: Mapping[str, Any] | None = None) -> str:
    """Key of the data: its config without ``num_queries``, the files read, the version.

    Args:
        data: the resolved ``dataset`` node (``num_queries`` is ignored: queries change
            neither training nor the evaluation logits).
        fingerprint: :func:`ggda.data.fingerprint.fingerprint` of the files (and data
            packages) the data set was loaded from; a changed file changes every key.
    """
    cfg = {k: v for k, v in data.items() if k != "num_queries"}
    return stable_hash({"data": cfg, "files": dict(fingerprint or {}), "version": CACHE_VERSION})


def recipe_key(data_key: str, model: Mapping[str, Any]) -> str:
    """Key of a training recipe on the data: the whole ``model`` node (optimizer included)."""
    return stable_hash({"data": data_key, "model": dict(model)})


def model_key(recipe_key: str, seed: int, trainer: Mapping[str, Any], fraction: float = 1.0) -> str:
    """Key of a model trained with the recipe and seed (base model or ensemble member).

    Args:
        recipe_key: :func:`recipe_key`.
        seed: the training seed.
        trainer: the result-deciding ``trainer`` keys (precision, determinism, gradient
            clipping, ...; without presentation keys such as progress bars), precision
            spelled out (``32-true`` by default).
        fraction: < 1 for a model trained on :func:`member_indices` (seed, fraction) of
            the training set; a full-data model's key does not name it.
    """
    key = {"recipe": recipe_key, "seed": int(seed), "trainer": dict(trainer)}
    if fraction < 1:
        key["fraction"] = float(fraction)
    return stable_hash(key)


def member_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The training points of a model trained on a fraction of the data: (round(f n),) sorted.

    A seeded random subset, one per seed, so each ensemble member sees its own
    (TRAK's ensembles are trained on random halves).
    """
    size = min(n, max(1, round(fraction * n)))
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=gen)[:size].sort().values


def retrain_key(recipe_key: str, precision: str = DEFAULT_PRECISION) -> str:
    """Key of the retrains: the recipe, and the precision when it is float64.

    Retrains train in the data's dtype: float64 under ``64-true``, float32 otherwise.
    """
    if str(precision).startswith("64"):
        return stable_hash({"recipe": recipe_key, "precision": str(precision)})
    return recipe_key


def grouping_key(data_key: str, grouper: Mapping[str, Any], model_key: str | None) -> str:
    """Key of a grouping: the data, the grouper config, the model when the grouper uses it."""
    return stable_hash({"data": data_key, "grouper": dict(grouper), "model": model_key})


def scores_key(
    model_key: str, grouping_key: str, method: Mapping[str, Any], prop: Mapping[str, Any]
) -> str:
    """Key of attribution scores: the model, the grouping, the method, the property."""
    return stable_hash(
        {"model": model_key, "grouping": grouping_key, "method": dict(method), "property": prop}
    )


def cache_keys(
    *,
    data: Mapping[str, Any],
    model: Mapping[str, Any],
    seed: int,
    trainer: Mapping[str, Any],
    grouper: Mapping[str, Any],
    uses_model: bool,
    method: Mapping[str, Any],
    prop: Mapping[str, Any],
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Keys of a run's cached artifacts, each a hash of exactly what decides it.

    Args:
        data: the resolved ``dataset`` node.
        model: the resolved ``model`` node.
        seed: the run seed (the base model's training seed).
        trainer: the result-deciding ``trainer`` keys (see :func:`model_key`).
        grouper: the grouper's ``config()``.
        uses_model: whether the grouper reads the trained model.
        method: the attribution method's ``config()``.
        prop: the property's attributes (``vars(prop)``).
        fingerprint: the data files' fingerprint (see :func:`data_key`).

    Returns:
        ``data``, ``recipe``, ``retrain``, ``model``, ``grouping`` and ``scores`` keys.
    """
    d = data_key(data, fingerprint)
    r = recipe_key(d, model)
    m = model_key(r, seed, trainer)
    g = grouping_key(d, grouper, m if uses_model else None)
    return {
        "data": d,
        "recipe": r,
        "retrain": retrain_key(r, str(trainer.get("precision", DEFAULT_PRECISION))),
        "model": m,
        "grouping": g,
        "scores": scores_key(m, g, method, prop),
    }


@dataclass(frozen=True)
class ArtifactCache:
    """Where groupings and scores are cached, and the keys of the data and model.

    The grouping and scores keys follow from these two and the grouper, method and
    property at hand (:func:`grouping_key`, :func:`scores_key`), so changing any of them
    misses the cache; a stored entry whose recorded config differs is recomputed, never
    reused.

    Attributes:
        dir: the cache root (``paths.cache_dir`` in a run).
        data_key: :func:`data_key` of the data.
        model_key: :func:`model_key` of the trained model the stages read.
    """

    dir: Path
    data_key: str
    model_key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))

    @classmethod
    def for_setup(
        cls,
        dir: str | Path,
        *,
        data: Mapping[str, Any],
        model: Mapping[str, Any],
        seed: int,
        trainer: Mapping[str, Any] | None = None,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> ArtifactCache:
        """The cache of a setup described by plain dicts (the data and the model trained).

        Args:
            dir: the cache root.
            data: what decides the data (a run's ``dataset`` node, or any description).
            model: what decides the trained model (a run's ``model`` node, or any
                description of the recipe).
            seed: the training seed.
            trainer: result-deciding training settings; precision defaults to ``32-true``.
            fingerprint: the data files' fingerprint, if any.
        """
        tr = dict(trainer or {})
        tr["precision"] = str(tr.get("precision", DEFAULT_PRECISION))
        d = data_key(data, fingerprint)
        return cls(Path(dir), d, model_key(recipe_key(d, model), seed, tr))

    def grouping_key(self, grouper: Grouper) -> str:
        """The key ``grouper``'s grouping is stored under."""
        return grouping_key(
            self.data_key, grouper.config(), self.model_key if grouper.uses_model else None
        )

    def scores_key(self, grouping_key: str, attributor: Attributor, prop: Any) -> str:
        """The key the scores of ``attributor`` on that grouping and property are stored under."""
        return scores_key(self.model_key, grouping_key, attributor.config(), vars(prop))


# -- stage results --------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupingStage:
    """The grouping stage's result.

    Attributes:
        grouping: the partition.
        seconds: wall seconds the grouping took when it was computed (also when reused).
        timings: the grouper's seconds per phase (``features``, ``kmeans``, ...).
        cached: whether it was read from the cache.
        key: its cache key, or None without a cache.
    """

    grouping: Grouping
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    key: str | None = None

    def metrics(self) -> dict[str, float]:
        """``time/grouping``, ``grouping/cached`` (0 or 1) and ``time/<phase>``."""
        out: dict[str, float] = {"time/grouping": self.seconds, "grouping/cached": int(self.cached)}
        out.update({f"time/{k}": v for k, v in self.timings.items()})
        return out


@dataclass(frozen=True)
class AttributionStage:
    """The attribution stage's result: the scores of a method on a task.

    Attributes:
        attributor: the method.
        task: what it scored (grouping, queries, checkpoints).
        result: the scores (k, m), seconds per phase (``total`` included) and info.
        cached: whether the scores were read from the cache.
        key: their cache key, or None without a cache.
    """

    attributor: Attributor
    task: AttributionTask
    result: AttributionResult
    cached: bool = False
    key: str | None = None

    @property
    def scores(self) -> torch.Tensor:
        """The (k, m) group scores."""
        return self.result.scores

    @property
    def seconds(self) -> float:
        """Wall seconds of the attribution when it was computed (also when reused)."""
        return float(self.result.timings.get("total", math.nan))

    def metrics(self) -> dict[str, float]:
        """``attribution/cached``, ``time/attribution`` and ``time/attribution/<phase>``."""
        out: dict[str, float] = {"attribution/cached": int(self.cached)}
        out["time/attribution"] = self.result.timings.get("total", math.nan)
        out.update(
            {f"time/attribution/{k}": v for k, v in self.result.timings.items() if k != "total"}
        )
        return out


@dataclass(frozen=True)
class EvaluatorOutcome:
    """One evaluator's result.

    Attributes:
        name: the evaluator's name (its metrics namespace).
        result: its metrics, tables and figures.
        seconds: wall seconds it took.
        retrains: the retrain service's counters it added (models trained, reused, ...).
    """

    name: str
    result: EvalResult
    seconds: float
    retrains: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``<name>/<metric>`` and ``<name>/<retrain counter>``."""
        out = {f"{self.name}/{k}": v for k, v in self.result.metrics.items()}
        out.update({f"{self.name}/{k}": v for k, v in self.retrains.items()})
        return out


@dataclass(frozen=True)
class EvaluationStage:
    """Every evaluator's outcome, in order."""

    outcomes: tuple[EvaluatorOutcome, ...] = ()

    def metrics(self) -> dict[str, float]:
        """``time/eval/<name>`` and each evaluator's metrics, merged."""
        out: dict[str, float] = {}
        for o in self.outcomes:
            out[f"time/eval/{o.name}"] = o.seconds
            out.update(o.metrics())
        return out


# -- the stages -----------------------------------------------------------------------------


def group(
    grouper: Grouper, inputs: GroupingInputs, cache: ArtifactCache | None = None
) -> GroupingStage:
    """Group the training points of ``inputs`` (or reuse the cached grouping).

    Args:
        grouper: the strategy.
        inputs: the training data (and, for model-based groupers, the trained net).
        cache: where to look for and store the grouping; None computes it every time.
    """
    key = path = meta = None
    if cache is not None:
        key = cache.grouping_key(grouper)
        meta = {
            "data": cache.data_key,
            "grouper": grouper.config(),
            "model": cache.model_key if grouper.uses_model else None,
        }
        path = cache.dir / "groupings" / f"{key}.pt"
        hit = load_or_none(path, meta, what="grouping")
        if hit is not None:
            log.info("Reusing cached grouping %s", path.name)
            return GroupingStage(
                Grouping(hit["group_ids"], hit["k"]),
                hit["seconds"],
                dict(hit.get("timings", {})),
                cached=True,
                key=key,
            )
    t0 = time.perf_counter()
    grouping = grouper.group(inputs)
    secs = time.perf_counter() - t0
    timings = dict(getattr(grouper, "timings", {}) or {})
    if path is not None and meta is not None:
        save_artifact(
            path,
            {"group_ids": grouping.group_ids, "k": grouping.k, "seconds": secs, "timings": timings},
            meta,
        )
    return GroupingStage(grouping, secs, timings, cached=False, key=key)


def attribute(
    attributor: Attributor,
    task: AttributionTask,
    cache: ArtifactCache | None = None,
    grouping_key: str | None = None,
) -> AttributionStage:
    """Score the task's groups against its queries (or reuse the cached scores).

    The scores are checked to be finite (a clear error otherwise).

    Args:
        attributor: the method.
        task: what to score; with a cache, ``task.prop`` (the property behind the
            queries) is part of the key and must be set.
        cache: where to look for and store the scores; None computes them every time.
        grouping_key: the key of the task's grouping (:attr:`GroupingStage.key`);
            needed with a cache.

    Raises:
        ValueError: a cache without ``grouping_key`` or without ``task.prop``.
    """
    key = path = meta = None
    if cache is not None:
        if grouping_key is None or task.prop is None:
            raise ValueError(
                "caching scores needs the grouping's key (GroupingStage.key) and the "
                "task's property (AttributionTask.prop)"
            )
        key = cache.scores_key(grouping_key, attributor, task.prop)
        meta = {
            "model": cache.model_key,
            "grouping": grouping_key,
            "method": attributor.config(),
            "property": vars(task.prop),
        }
        path = cache.dir / "scores" / f"{key}.pt"
        hit = load_or_none(path, meta, what="attribution scores")
        if hit is not None:
            log.info("Reusing cached attribution scores %s", path.name)
            result = AttributionResult(hit["scores"], hit["timings"], hit["info"])
            _check_finite(result, attributor.name)
            return AttributionStage(attributor, task, result, cached=True, key=key)
    t0 = time.perf_counter()
    result = attributor.attribute(task)
    result.scores = result.scores.detach()
    result.timings["total"] = time.perf_counter() - t0
    if path is not None and meta is not None:
        save_artifact(
            path,
            {"scores": result.scores.cpu(), "timings": result.timings, "info": result.info},
            meta,
        )
    _check_finite(result, attributor.name)
    return AttributionStage(attributor, task, result, cached=False, key=key)


def eval_context(attributed: AttributionStage) -> EvalContext:
    """What the evaluators receive: the attribution's data, grouping, scores and services.

    The bundle, property and retrain service are the task's (``task.bundle``,
    ``task.prop``, ``task.retrain``).
    """
    task = attributed.task
    return EvalContext(
        bundle=task.bundle,
        grouping=task.grouping,
        scores=attributed.scores,
        prop=task.prop,
        retrain=task.retrain,
        attributor=attributed.attributor,
        task=task,
    )


def iter_evaluate(
    evaluators: Sequence[Evaluator], attributed: AttributionStage
) -> Iterator[EvaluatorOutcome]:
    """Run each evaluator on the attribution in turn, yielding its outcome as it finishes."""
    ctx = eval_context(attributed)
    for ev in evaluators:
        stats = getattr(ctx.retrain, "stats", None)
        before = dict(stats) if stats is not None else {}
        t0 = time.perf_counter()
        res = ev.evaluate(ctx)
        secs = time.perf_counter() - t0
        added = {k: stats[k] - before[k] for k in before} if stats is not None else {}
        yield EvaluatorOutcome(ev.name, res, secs, added)


def evaluate(evaluators: Sequence[Evaluator], attributed: AttributionStage) -> EvaluationStage:
    """Run every evaluator on the attribution (see :func:`iter_evaluate`)."""
    return EvaluationStage(tuple(iter_evaluate(evaluators, attributed)))


# -- run-directory files --------------------------------------------------------------------

SCORES_PT, SCORES_NPY = "scores.pt", "scores.npy"


def save_scores(run_dir: Path, scores: torch.Tensor, mmap_bytes: int) -> str:
    """Write the (k, m) scores into the run directory; return the file name.

    ``scores.pt`` (torch) up to ``mmap_bytes``; above it ``scores.npy``, written through a
    memory map (``numpy.lib.format.open_memmap``) so that readers can map it instead of
    loading k x m floats, and written to a temp file first, then renamed (atomic).
    """
    run_dir = Path(run_dir)
    if scores.numel() * scores.element_size() <= mmap_bytes:
        atomic_torch_save(run_dir / SCORES_PT, scores.cpu())
        (run_dir / SCORES_NPY).unlink(missing_ok=True)
        return SCORES_PT
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{SCORES_NPY}.", suffix=".tmp")
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(
            tmp,
            mode="w+",
            dtype=str(scores.dtype).removeprefix("torch."),
            shape=tuple(scores.shape),
        )
        rows = max(1, (64 << 20) // max(1, scores.shape[1] * scores.element_size()))
        for s in range(0, scores.shape[0], rows):  # 64 MB at a time off the device
            arr[s : s + rows] = scores[s : s + rows].cpu().numpy()
        arr.flush()
        del arr
        os.replace(tmp, run_dir / SCORES_NPY)
    finally:
        Path(tmp).unlink(missing_ok=True)
    (run_dir / SCORES_PT).unlink(missing_ok=True)
    return SCORES_NPY


def load_scores(run_dir: str | Path, mmap: bool = True) -> torch.Tensor:
    """The (k, m) scores of a finished run, from ``scores.pt`` or ``scores.npy``.

    The file is the one ``metrics.json`` names (``attribution/scores_file``); a
    ``scores.npy`` is memory-mapped read-only unless ``mmap=False``.
    """
    import json

    run_dir = Path(run_dir)
    name = SCORES_PT
    try:
        name = json.loads((run_dir / "metrics.json").read_text()).get(
            "attribution/scores_file", SCORES_PT
        )
    except (FileNotFoundError, json.JSONDecodeError):
        if (run_dir / SCORES_NPY).exists():
            name = SCORES_NPY
    if name == SCORES_NPY:
        arr = np.load(run_dir / SCORES_NPY, mmap_mode="r" if mmap else None)
        with warnings.catch_warnings():  # a read-only map: torch warns that it is not writable
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.load(run_dir / SCORES_PT)
