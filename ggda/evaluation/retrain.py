"""The cached, parallel retraining service shared by every evaluation.

``retrain(subset_mask, seed)`` trains a fresh model on the masked training set with the
base model's recipe and returns its logits on the validation and test splits, from which
every measurement (query loss or margin, any property, test accuracy) is derived. Results
are stored once per (recipe, data, subset, seed) under ``<cache_dir>/retrain/<recipe key>/``
and reused by every method, grouping and sweep job that asks for the same subset.

Backends: ``sequential`` (in this process), ``process`` (a local pool of worker processes,
one torch thread each) and ``submitit`` (retrains submitted as submitit jobs: SLURM array
jobs with ``executor: slurm``, local processes with ``executor: local``). A SLURM array
is submitted only from a process outside any SLURM job; inside one (a ``submitit_slurm``
sweep job, an ``sbatch`` script) ``executor: slurm`` retrains within the job's own
allocation, since an array it waited for could need the very CPUs it holds.

Concurrency: many sweep jobs share one cache. Every entry is written atomically (temp file
+ rename) and computed under a per-entry POSIX lock (``.<entry>.lock`` beside it): a job
that wants a subset another job is computing waits for it and then reads its result, so a
subset is trained once and the cache ends with one valid entry. (``flock`` works on local
disks and on most cluster file systems; where it does not, the atomic rename still leaves
one valid entry, at the price of a duplicated retrain.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ggda.cluster import follow_jobs_without_accounting, slurm_job_id
from ggda.data.base import DataBundle
from ggda.errors import GGDAError, check_choice, check_int
from ggda.evaluation.lds_store import LDSStore
from ggda.io import LockBusy, file_lock, load_or_none, save_artifact, tensor_hash
from ggda.models.training import Recipe, train_lean
from ggda.procs import exit_with_parent

log = logging.getLogger(__name__)

BACKENDS = ("process", "sequential", "submitit")
EXECUTORS = ("local", "slurm")

# Per-worker state, set once by the pool initializer (so the data is pickled once).
_WORKER: dict[str, Any] = {}

# One retrain to do: (cache path, meta, training indices, seed).
Item = tuple[str, dict, torch.Tensor, int]


def seed_table(seeds: torch.Tensor | list[int], count: int) -> torch.Tensor:
    """(count, R) int64 retrain seeds: per-subset seeds as given, or R shared ones tiled."""
    t = torch.as_tensor(seeds, dtype=torch.int64)
    if t.ndim == 1:
        return t[None, :].expand(count, -1).clone()
    if t.ndim != 2 or t.shape[0] != count:
        raise GGDAError(f"seeds must be R shared seeds or ({count}, R); got {tuple(t.shape)}")
    return t


def auto_workers() -> int:
    """Worker processes for ``workers: 0``: the CPUs this job may use.

    A single run uses every CPU it can see. A job of a parallel sweep must use only its
    share, or n jobs x n workers oversubscribe the machine: a SLURM job uses its
    allocation (``SLURM_CPUS_PER_TASK``); a joblib (loky) worker or a ``submitit_local``
    job uses ``OMP_NUM_THREADS``, which joblib sets to CPUs // n_jobs and the
    ``submitit_local`` launcher config sets to 1.
    """
    env = os.environ
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    in_sweep_worker = multiprocessing.current_process().name.startswith("LokyProcess") or (
        env.get("SUBMITIT_EXECUTOR") == "local"
    )
    if in_sweep_worker:
        n = env.get("OMP_NUM_THREADS", "1")
        return max(1, int(n)) if n.isdigit() else 1
    return available_cpus()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_workers(workers: object) -> int:
    """``retrain.workers`` as a worker count: 0 = :func:`auto_workers`; at most the CPUs.

    More workers than CPUs only slows every retrain down (each worker trains with one
    thread), so a larger value is capped with a warning.

    Raises:
        ConfigError: not an integer, or negative.
    """
    n = check_int("retrain.workers", workers, 0)
    if n == 0:
        return auto_workers()
    cpus = available_cpus()
    if n > cpus:
        log.warning(
            "retrain.workers=%d is more than the %d CPUs this job may use: using %d",
            n,
            cpus,
            cpus,
        )
        return cpus
    return n


class EntryBusy(Exception):
    """Another process holds the entry's lock (raised by a non-blocking lock attempt)."""


@contextlib.contextmanager
def entry_lock(path: str | Path, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive POSIX lock on ``.<name>.lock`` beside a cache entry.

    The lock file is never deleted: unlinking a lock file another process is about to
    open would let two processes hold "the" lock at once.

    Raises:
        EntryBusy: ``blocking`` is False and another process holds the lock.
    """
    path = Path(path)
    try:
        with file_lock(path.with_name(f".{path.name}.lock"), blocking):
            yield
    except LockBusy as e:
        raise EntryBusy(str(path)) from e


def _train_and_measure(
    recipe: Recipe, bundle: DataBundle, idx: torch.Tensor, seed: int, device: str
) -> dict[str, torch.Tensor]:
    net = train_lean(
        recipe, bundle.x_train[idx], bundle.y_train[idx], bundle.num_classes, seed, device
    )
    return {"val": predict(net, bundle.x_val, device), "test": predict(net, bundle.x_test, device)}


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, device: str, batch: int = 512) -> torch.Tensor:
    """Logits (N, C) in chunks, so a large net on a large split fits in memory."""
    return torch.cat(
        [net(x[s : s + batch].to(device)).float().cpu() for s in range(0, x.shape[0], batch)]
    )


def compute_entry(
    recipe: Recipe,
    bundle: DataBundle,
    path: str | Path,
    meta: dict,
    idx: torch.Tensor,
    seed: int,
    device: str = "cpu",
    blocking: bool = True,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Retrain one (subset, seed) into the cache unless another process already has.

    Under the entry's lock the cache is checked again, so of several processes asking
    for the same entry at once exactly one trains and the others read its result.

    Returns:
        ``({"val": (N_val, C), "test": (N_test, C)} logits, computed)``; ``computed`` is
        False when the entry was found in the cache.

    Raises:
        EntryBusy: ``blocking`` is False and another process is computing the entry.
    """
    with entry_lock(path, blocking):
        got = load_or_none(path, meta, what="retrain result")
        if got is not None:
            return got, False
        out = _train_and_measure(recipe, bundle, idx, seed, device)
        # Written by whoever trained it, so a killed evaluation keeps finished retrains.
        save_artifact(path, out, meta)
        return out, True


def compute_entries(
    recipe: Recipe, bundle: DataBundle, items: list[Item], device: str = "cpu", desc: str = ""
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """Compute ``items`` in two passes: first those no other process is computing, then
    (waiting for their locks) the rest, which are then usually read from the cache. Sweep
    jobs asking for the same subsets at once thus share the work instead of queueing.

    Returns:
        ``({path: logits}, number trained here)``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    computed, busy = 0, []
    bar = tqdm(total=len(items), desc=desc, leave=False, disable=None if desc else True)
    for blocking, todo in ((False, items), (True, busy)):
        for path, meta, idx, seed in todo:
            try:
                out[path], did = compute_entry(
                    recipe, bundle, path, meta, idx, seed, device, blocking
                )
            except EntryBusy:
                busy.append((path, meta, idx, seed))
                continue
            computed += did
            bar.update()
    bar.close()
    return out, computed


def _init_worker(recipe: Recipe, bundle: DataBundle, threads: int, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides (it cancels the queue
    # and terminates the pool); a worker must not die mid-write on its own. A worker
    # whose parent was killed exits instead of training on for nobody.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent(parent)
    torch.set_num_threads(threads)
    _WORKER["recipe"] = recipe
    _WORKER["bundle"] = bundle


def _worker_job(path: str, meta: dict, idx: torch.Tensor, seed: int, blocking: bool) -> int:
    """1 trained, 0 found in the cache, -1 busy (another process is computing it)."""
    try:
        _, computed = compute_entry(
            _WORKER["recipe"], _WORKER["bundle"], path, meta, idx, seed, "cpu", blocking
        )
    except EntryBusy:
        return -1
    return int(computed)


def submitit_job(recipe: Recipe, bundle: DataBundle, items: list[Item], threads: int) -> int:
    """Body of one submitit job (one SLURM array task): retrain ``items`` into the cache.

    Returns:
        How many of the items this job trained (the rest it found in the cache).
    """
    torch.set_num_threads(threads)
    return compute_entries(recipe, bundle, items)[1]


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Block SIGINT in this thread for the block; a pending one is delivered at its end."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _terminate_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel queued work and kill the workers (a half-written entry is only a temp file)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


class RetrainService:
    """Retrain on subsets, in parallel, with a persistent cache.

    Args:
        cache_dir: root of the cache (shared by runs and sweep jobs).
        backend: ``process`` (a pool of worker processes, one torch thread each),
            ``sequential`` (in this process; used on GPU and for tiny jobs) or
            ``submitit`` (submitit jobs; see ``executor``).
        workers: worker processes (``process``) or concurrent local jobs (``submitit``
            with ``executor: local``); 0 or less means :func:`auto_workers`.
        device: ``cpu`` or ``cuda`` (``auto`` picks cuda when available); non-CPU devices
            train sequentially in this process.
        min_parallel: fewer pending jobs than this run sequentially (pool start-up costs
            a few seconds).
        executor: for ``backend: submitit``: ``local`` (processes on this machine) or
            ``slurm`` (one SLURM array job per call, its tasks share the retrains).
        jobs: submitit jobs (array tasks) per call; 0 means ``workers`` for ``local`` and
            one per ``retrains_per_job`` retrains for ``slurm``.
        retrains_per_job: retrains per SLURM array task when ``jobs`` is 0.
        submitit_folder: where submitit keeps its pickles and job logs; default
            ``<cache_dir>/submitit``.
        slurm: SLURM resources per array task: ``partition``, ``timeout_min``,
            ``cpus_per_task``, ``mem_gb``, ``array_parallelism``, ``account``, ``qos``,
            ``additional_parameters`` (a dict of extra sbatch options).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        backend: str = "process",
        workers: int = 0,
        device: str = "cpu",
        min_parallel: int = 4,
        executor: str = "local",
        jobs: int = 0,
        retrains_per_job: int = 8,
        submitit_folder: str | None = None,
        slurm: dict | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.backend = check_choice("retrain.backend", backend, BACKENDS)
        self.workers = check_workers(workers)
        self.device = check_choice("retrain.device", device, ("cpu", "cuda", "auto"))
        self.min_parallel = check_int("retrain.min_parallel", min_parallel, 1)
        self.executor = check_choice("retrain.executor", executor, EXECUTORS)
        self.jobs = check_int("retrain.jobs", jobs, 0)
        self.retrains_per_job = check_int("retrain.retrains_per_job", retrains_per_job, 1)
        self.submitit_folder = (
            Path(submitit_folder) if submitit_folder else self.cache_dir / "submitit"
        )
        self.slurm = dict(slurm or {})
        unknown = set(self.slurm) - {
            "partition",
            "timeout_min",
            "cpus_per_task",
            "mem_gb",
            "array_parallelism",
            "account",
            "qos",
            "additional_parameters",
        }
        if unknown:
            raise GGDAError(
                f"retrain.slurm has unknown keys {sorted(unknown)}; allowed: partition, "
                "timeout_min, cpus_per_task, mem_gb, array_parallelism, account, qos, "
                "additional_parameters"
            )
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
        """Cache path and meta of one (subset, seed): the unit of work and of locking."""
        if self.key is None:
            raise GGDAError("RetrainService.bind() must be called before use")
        mh = tensor_hash(mask.bool())
        meta = {"recipe_key": self.key, "mask": mh, "n": int(mask.numel()), "seed": int(seed)}
        return self.cache_dir / "retrain" / self.key / f"{mh}-s{seed}.pt", meta

    def store(
        self,
        level: str,
        masks: torch.Tensor,
        seeds: torch.Tensor | list[int],
        sampler: dict[str, Any] | None = None,
    ) -> LDSStore:
        """The LDS store (datamodels layout) of these subsets under ``<cache_dir>/lds``.

        Args:
            level: ``point`` | ``group``.
            masks: (S, n) bool.
            seeds: (S, R) per-subset seeds, or R seeds shared by every subset.
            sampler: how masks and seeds were drawn, recorded in the manifest.
        """
        if self.key is None or self.bundle is None:
            raise GGDAError("RetrainService.bind() must be called before use")
        b = self.bundle
        return LDSStore.open(
            self.cache_dir / "lds",
            self.key,
            level,
            masks.bool().cpu(),
            seed_table(seeds, masks.shape[0]),
            {
                "val": (b.x_val.shape[0], b.num_classes),
                "test": (b.x_test.shape[0], b.num_classes),
            },
            sampler,
        )

    def run(
        self,
        masks: torch.Tensor,
        seeds: torch.Tensor | list[int],
        desc: str = "retrain",
        store: LDSStore | None = None,
    ) -> dict[str, torch.Tensor]:
        """Retrain on each mask with each seed.

        Args:
            masks: (S, n) bool, True = keep the training point.
            seeds: R seeds shared by every subset, or (S, R) seeds per subset.
            desc: progress bar label.
            store: an LDS store of exactly these masks and seeds (see :meth:`store`): its
                complete rows are read from it, the others retrained (through the per-entry
                cache) and then recorded in it.

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
        table = seed_table(seeds, masks.shape[0])
        n_rep = table.shape[1]
        results: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        done_rows: set[int] = set()
        if store is not None:
            rows, arrays = store.read_complete()  # damaged rows are reported and dropped
            done_rows = set(rows)
            if done_rows:
                got = {sp: torch.from_numpy(a) for sp, a in arrays.items()}
                for i, s in enumerate(rows):
                    for r in range(n_rep):
                        results[(s, r)] = {sp: got[sp][i, r] for sp in got}
        # Pending entries by path: a subset drawn twice is trained once.
        todo: dict[str, tuple[dict, torch.Tensor, int, list[tuple[int, int]]]] = {}
        for s, mask in enumerate(masks):
            if s in done_rows:
                continue
            for r in range(n_rep):
                seed = int(table[s, r])
                path, meta = self.entry(mask, seed)
                if str(path) in todo:
                    todo[str(path)][3].append((s, r))
                    continue
                got = load_or_none(path, meta, what="retrain result")
                if got is None:
                    todo[str(path)] = (meta, mask.nonzero().squeeze(1), seed, [(s, r)])
                else:
                    results[(s, r)] = got
        cached_before = len(results)
        if todo:
            log.info("%s: %d retrains to run, %d reused from cache", desc, len(todo), len(results))
        t0 = time.perf_counter()
        device = self._device()
        items: list[Item] = [(p, meta, idx, seed) for p, (meta, idx, seed, _) in todo.items()]
        if not items:
            computed = 0
        elif self.backend == "submitit" and device == "cpu" and not self._in_allocation():
            computed = self._run_submitit(items, desc)
        elif self.backend == "submitit" and device == "cpu":  # inside a SLURM job
            computed = self._run_in_allocation(items, desc)
        elif (
            self.backend == "process"
            and device == "cpu"
            and self.workers > 1
            and len(items) >= self.min_parallel
        ):
            computed = self._run_pool(items, desc)
        else:
            outs, computed = compute_entries(self.recipe, self.bundle, items, device, desc)
            for path, out in outs.items():
                for sr in todo[path][3]:
                    results[sr] = out
        # Read back what the workers wrote (and copy to repeated draws of a subset).
        for path, (meta, _, _, where) in todo.items():
            got = results.get(where[0]) or load_or_none(path, meta, what="retrain result")
            for sr in where:
                results[sr] = got
        self.stats["retrains_run"] += computed
        self.stats["retrains_cached"] += cached_before + len(todo) - computed
        self.stats["retrain_seconds"] += time.perf_counter() - t0
        missing = [
            sr
            for sr in ((s, r) for s in range(len(masks)) for r in range(n_rep))
            if results.get(sr) is None
        ]
        if missing:
            raise GGDAError(f"{len(missing)} retrain results could not be read back from the cache")
        out = {
            split: torch.stack(
                [
                    torch.stack([results[(s, r)][split] for r in range(n_rep)])
                    for s in range(len(masks))
                ]
            )
            for split in ("val", "test")
        }
        if store is not None:
            new_rows = [s for s in range(len(masks)) if s not in done_rows]
            store.write_rows({s: {sp: out[sp][s] for sp in out} for s in new_rows})
        return out

    # -- backends -------------------------------------------------------------------------
    def _run_pool(self, items: list[Item], desc: str) -> int:
        ctx = get_context("spawn")
        computed = 0
        pool = ProcessPoolExecutor(
            max_workers=min(self.workers, len(items)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.recipe, self.bundle, 1, os.getpid()),
        )
        try:
            bar = tqdm(total=len(items), desc=desc, leave=False, disable=None)
            # First what no other process is computing, then wait for the rest.
            for blocking in (False, True):
                # Workers start on submit. A Ctrl-C while one boots would kill it with a
                # traceback before its initializer ignores SIGINT: hold the signal (the
                # new processes inherit the mask) and take it right after.
                with _sigint_held():
                    futs = {pool.submit(_worker_job, *item, blocking): item for item in items}
                items = []
                for fut in as_completed(futs):
                    got = fut.result()
                    if got < 0:
                        items.append(futs[fut])
                    else:
                        computed += got
                        bar.update()
            bar.close()
        except BaseException:
            # Ctrl-C or an error: drop the queue and stop the workers now, instead of
            # waiting for every queued retrain (finished ones are already in the cache).
            _terminate_pool(pool)
            raise
        pool.shutdown(wait=True)
        return computed

    # Where ``executor: slurm`` runs the retrains (said once per service, with the reason).
    _said_route = False

    def _in_allocation(self) -> bool:
        """``executor: slurm`` from inside a SLURM job (``SLURM_JOB_ID`` set).

        Such a process holds CPUs; an array job it submitted and waited for could need
        exactly those CPUs and stay pending forever (on a full cluster or under a per-user
        job limit), so from inside a job the retrains run within its allocation instead.
        Array fan-out happens only from a launching process outside any job.
        """
        return self.executor == "slurm" and slurm_job_id() is not None

    def _run_in_allocation(self, items: list[Item], desc: str) -> int:
        """Retrain ``items`` in this SLURM job's own allocation: a pool of ``workers``
        processes (0 = the job's ``SLURM_CPUS_PER_TASK``), one torch thread each, or in this
        process when there is one CPU or few items.
        """
        pool = self.workers > 1 and len(items) >= self.min_parallel
        if not self._said_route:
            self._said_route = True
            log.info(
                "retrain.executor=slurm inside SLURM job %s: retrains run within this job's "
                "allocation (%s), not as a new array job, which would wait for the CPUs "
                "this job holds",
                slurm_job_id(),
                f"{min(self.workers, len(items))} worker processes" if pool else "this process",
            )
        if pool:
            return self._run_pool(items, desc)
        return compute_entries(self.recipe, self.bundle, items, "cpu", desc)[1]

    def _submitit_executor(self) -> Any:
        try:
            import submitit
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise GGDAError("retrain.backend=submitit needs `pip install submitit`") from e
        if self.executor == "slurm":
            follow_jobs_without_accounting()  # squeue where sacct fails, one note
        self.submitit_folder.mkdir(parents=True, exist_ok=True)
        try:
            ex = submitit.AutoExecutor(
                folder=str(self.submitit_folder / "%j"), cluster=self.executor
            )
        except Exception as e:  # no sbatch on this machine, for example
            raise GGDAError(
                f"retrain.executor={self.executor} is not available here ({e}); use "
                "retrain.executor=local or another retrain.backend"
            ) from e
        s = self.slurm
        params: dict[str, Any] = {"timeout_min": int(s.get("timeout_min", 60))}
        if self.executor == "slurm":
            params |= {
                "cpus_per_task": int(s.get("cpus_per_task", 1)),
                "slurm_array_parallelism": int(s.get("array_parallelism", 64)),
            }
            if s.get("mem_gb"):
                params["mem_gb"] = int(s["mem_gb"])
            for key in ("partition", "account", "qos"):
                if s.get(key):
                    params[f"slurm_{key}"] = s[key]
            if s.get("additional_parameters"):
                params["slurm_additional_parameters"] = dict(s["additional_parameters"])
        ex.update_parameters(name="ggda-retrain", **params)
        return ex

    def _run_submitit(self, items: list[Item], desc: str) -> int:
        if self.jobs > 0:
            n_jobs = self.jobs
        elif self.executor == "local":
            n_jobs = self.workers
        else:
            n_jobs = math.ceil(len(items) / self.retrains_per_job)
        n_jobs = max(1, min(n_jobs, len(items)))
        # Strided chunks: neighbouring subsets cost about the same, so tasks stay balanced.
        chunks = [items[i::n_jobs] for i in range(n_jobs)]
        threads = int(self.slurm.get("cpus_per_task", 1)) if self.executor == "slurm" else 1
        ex = self._submitit_executor()
        jobs = ex.map_array(
            submitit_job,
            [self.recipe] * n_jobs,
            [self.bundle] * n_jobs,
            chunks,
            [threads] * n_jobs,
        )
        log.info(
            "%s: %d retrains submitted as %d %s submitit jobs%s (logs in %s)",
            desc,
            len(items),
            n_jobs,
            self.executor,
            " (one array job, from outside any SLURM job)" if self.executor == "slurm" else "",
            self.submitit_folder,
        )
        computed = 0
        for job in tqdm(jobs, desc=desc, leave=False, disable=None):
            try:
                computed += int(job.result())
            except Exception as e:
                raise GGDAError(
                    f"retrain job {job.job_id} failed ({type(e).__name__}); its log: "
                    f"{job.paths.stderr}. Finished retrains are cached: rerun to resume."
                ) from e
        return computed
