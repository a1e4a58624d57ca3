"""The one place that builds objects from config and runs a job end to end.

``run(cfg)`` loads the data, builds the LightningModule, grouper, method, property,
retrain service, evaluators, loggers and callbacks, then calls ``trainer.fit``. The
callbacks group, attribute and evaluate when the fit ends (also when a cached base model
is resumed and training is skipped). Every run directory ends with ``config.json`` and
``metrics.json`` written atomically, ``metrics.json`` last: its presence marks a finished run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

import ggda.config  # noqa: F401  (registers the config resolvers before any compose)
from ggda import stages, tracking
from ggda.config import drop_presentation
from ggda.data.fingerprint import fingerprint, recording
from ggda.errors import ConfigError, GGDAError, check_int
from ggda.evaluation.base import metric_namespaces
from ggda.io import atomic_write_json, diff_keys, open_lock
from ggda.lightning.callbacks.base import GGDACallback, RunContext, RunObjects
from ggda.lightning.callbacks.checkpoint import EpochCheckpoint
from ggda.lightning.datamodule import BundleDataModule
from ggda.lightning.module import GGDAModule
from ggda.models.checkpoint import Checkpoint
from ggda.models.custom import check_net, net_factory
from ggda.models.store import ModelStore
from ggda.models.training import Recipe

log = logging.getLogger(__name__)
# Lightning announces every checkpoint load at INFO; our own log says what is reused.
logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").setLevel(
    logging.WARNING
)
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)

# The cache version lives with the cache keys (bumped there when cached artifacts change).
CACHE_VERSION = stages.CACHE_VERSION


def is_multirun() -> bool:
    """True inside a Hydra multirun job (``python run.py -m ...``)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError):
        return False


def build(node: Any, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` config node.

    Drops its display ``name`` and the ``warn_share`` of a grouping node (read by the
    attribution callback).
    """
    cfg = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cfg.pop("name", None)
    cfg.pop("warn_share", None)
    try:
        return instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as e:
        # Hydra wraps constructor errors; a user error should read as the user's error.
        cause = e.__cause__
        while cause is not None and not isinstance(cause, GGDAError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_recipe(model_cfg: DictConfig) -> Recipe:
    """The training recipe from the ``model`` config group.

    ``optim`` and ``scheduler`` are ``_target_`` nodes built as partials (the recipe calls
    them with the parameters / the optimizer); keys the node omits keep :class:`Recipe`'s
    defaults.
    """
    m = OmegaConf.to_container(model_cfg, resolve=True)
    kw: dict[str, Any] = {k: m[k] for k in ("epochs", "batch_size", "save_epochs") if k in m}
    for key, arg in (("optim", "optimizer"), ("scheduler", "scheduler")):
        node = m.get(key)
        if node is None:
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(
                f"model.{key}",
                node,
                "a node with a `_target_` (e.g. `{_target_: torch.optim.SGD, lr: 0.05}`)",
                "See conf/model/mlp.yaml.",
            )
        try:
            kw[arg] = build(node, _partial_=True)
        except (InstantiationException, ImportError, AttributeError) as e:
            raise ConfigError(
                f"model.{key}._target_",
                node["_target_"],
                "an importable class such as torch.optim.SGD or torch.optim.lr_scheduler.StepLR",
                f"({type(e).__name__})",
            ) from None
    return Recipe(net_factory=net_factory(m["net"], build), **kw)


def cache_keys(
    cfg: DictConfig,
    grouper_cfg: dict,
    uses_model: bool,
    method_cfg: dict,
    prop_cfg: dict,
    data_fingerprint: dict | None = None,
) -> dict[str, str]:
    """Keys of the cached artifacts (:func:`ggda.stages.cache_keys` of the run's config).

    Args:
        cfg: The composed run config (``dataset``, ``model``, ``seed`` and ``trainer``
            are read).
        grouper_cfg: The grouper's ``config()``.
        uses_model: Whether the grouper reads the trained model.
        method_cfg: The method's ``config()``.
        prop_cfg: The property's attributes.
        data_fingerprint: :func:`ggda.data.fingerprint.fingerprint` of the files (and
            data packages) the data set was loaded from (``bundle.meta["fingerprint"]``
            as set by :func:`load_data`); a changed file changes every key.
    """
    return stages.cache_keys(
        data=OmegaConf.to_container(cfg.dataset, resolve=True),
        model=OmegaConf.to_container(cfg.model, resolve=True),
        seed=int(cfg.seed),
        trainer=trainer_results(cfg),
        grouper=grouper_cfg,
        uses_model=uses_model,
        method=method_cfg,
        prop=prop_cfg,
        fingerprint=data_fingerprint,
    )


def base_model_key(recipe_key: str, seed: int, cfg: DictConfig, fraction: float = 1.0) -> str:
    """Key of a model trained with the recipe and seed (base model or ensemble member).

    Every result-deciding ``trainer`` key (precision, determinism, gradient clipping, ...)
    is in it; the presentation ones (progress bars, accelerator) are not. ``fraction`` < 1:
    a model trained on the seed's :func:`ggda.stages.member_indices`.
    """
    return stages.model_key(recipe_key, seed, trainer_results(cfg), fraction)


def trainer_results(cfg: DictConfig) -> dict[str, Any]:
    """The ``trainer`` keys that decide a trained model.

    ``ggda.config.PRESENTATION_KEYS`` are removed; precision is spelled out so that the
    default and an explicit ``32-true`` share a key.
    """
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    out = drop_presentation({"trainer": kw})["trainer"]
    out["precision"] = str(out.get("precision", stages.DEFAULT_PRECISION))
    return out


def model_store(
    cfg: DictConfig, keys: dict[str, str], seed: int, recipe: Recipe, fraction: float = 1.0
) -> ModelStore:
    """The cache entry of the model trained with the run's recipe and ``seed``.

    ``fraction`` < 1: the model trained on the seed's subset of the training set.
    """
    meta = {
        "recipe": keys["recipe"],
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": seed,
    }
    if fraction < 1:
        meta["fraction"] = fraction
    key = base_model_key(keys["recipe"], seed, cfg, fraction)
    return ModelStore(Path(cfg.paths.cache_dir) / "models", key, meta, recipe.save_epochs)


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    kw.pop("_target_", None)
    # A multirun's epoch bars would interleave, and a log file gets every redraw: there the
    # one-line stage logs say what happens.
    if is_multirun() or not sys.stderr.isatty():
        kw["enable_progress_bar"] = False
    return kw


def train_member(
    cfg: DictConfig,
    keys: dict[str, str],
    bundle: Any,
    recipe: Recipe,
    seed: int,
    fraction: float = 1.0,
) -> list[Checkpoint]:
    """Train (or reuse) the model of ``seed``; return its checkpoints.

    Same Lightning path as the base model, without the attribution callbacks. ``fraction``
    < 1: trained on :func:`ggda.stages.member_indices` (n, fraction, seed) only.
    """
    store = model_store(cfg, keys, seed, recipe, fraction)
    if store.status() != "complete":
        store.lock()  # check (and wipe) only under the lock: another job may be mid-save
        try:
            if store.verify() != "complete":
                log.info(
                    "Training ensemble member seed=%d%s into %s",
                    seed,
                    "" if fraction >= 1 else f" on {fraction:g} of the training set",
                    store.dir,
                )
                if fraction < 1:
                    bundle = bundle.train_subset(
                        stages.member_indices(bundle.n_train, fraction, seed)
                    )
                pl.seed_everything(seed, workers=True, verbose=False)
                module = GGDAModule(
                    recipe.build_net(bundle.input_shape, bundle.num_classes), recipe, seed
                )
                kw = _trainer_kwargs(cfg) | {"enable_progress_bar": False}
                trainer = pl.Trainer(
                    **kw,
                    max_epochs=recipe.epochs,
                    logger=False,
                    callbacks=[EpochCheckpoint(store)],
                    enable_checkpointing=False,
                    default_root_dir=str(store.dir),
                )
                trainer.fit(
                    module,
                    datamodule=BundleDataModule(bundle, recipe.batch_size, seed),
                    ckpt_path=store.resume_path(),
                    weights_only=False,
                )
        finally:
            store.unlock()
    return store.checkpoints()


def results_config(cfg: DictConfig) -> dict:
    """The resolved config minus its presentation keys.

    Presentation keys are ``ggda.config.PRESENTATION_KEYS``; two runs with the same
    results config produce the same results.
    """
    return drop_presentation(OmegaConf.to_container(cfg, resolve=True))


def check_run_dir(run_dir: Path, cfg: DictConfig) -> dict | None:
    """Refuse to overwrite finished results of another config; return them if the same.

    Returns:
        The finished run's metrics when the directory holds a finished run of the same
        config (nothing to do), else None.
    """
    metrics_path = run_dir / "metrics.json"
    config_path = run_dir / "config.json"
    if not metrics_path.exists():
        return None
    try:
        prev_cfg = json.loads(config_path.read_text())["results_config"]
        prev_metrics = json.loads(metrics_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        prev_cfg, prev_metrics = None, None
    if cfg.get("overwrite", False):
        log.warning("overwrite=true: replacing the finished results in %s", run_dir)
        return None
    now = results_config(cfg)
    if prev_cfg == now and prev_metrics is not None:
        return prev_metrics
    keys = diff_keys(prev_cfg, now) if prev_cfg is not None else ["<unreadable config.json>"]
    raise GGDAError(
        f"{run_dir} already holds finished results of a different config "
        f"(differs in: {', '.join(keys[:8])}). Nothing was overwritten. Set `tag=NAME` to "
        "write this run elsewhere, or `overwrite=true` to replace those results."
    )


def _run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (Python API, tests)
        return Path(cfg.paths.output_dir) / "runs" / "api"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """Loggers from the ``logger`` group, with the run's config logged.

    The group is a dict of ``_target_`` nodes; empty means none.

    A W&B run is named after the run directory (``grad_kmeans_k100_s0``, or the sweep
    job's ``groups=10,grouping=singleton``); its config holds the resolved config plus
    ``groups_requested`` (the ``groups`` value as given) and, once grouped, ``grouping/k``
    (the effective k), and ``grouping/k`` is the step metric of ``lds/*`` and ``time/*``.
    """
    loggers = []
    for _, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        target = str(node.get("_target_", ""))
        kw = {"name": run_dir.name} if target.endswith("WandbLogger") else {}
        lg = build(node, **kw)
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)  # Lightning passes None; W&B warns about the key
        loggers.append(lg)
    params = OmegaConf.to_container(cfg, resolve=True)
    params["groups_requested"] = params.get("groups")
    for lg in loggers:
        lg.log_hyperparams(params)
    tracking.define_metrics(loggers)
    return loggers


def load_data(cfg: DictConfig) -> Any:
    """The data bundle of ``cfg.dataset``, with ``meta["fingerprint"]`` of the files read."""
    with recording() as reads:
        bundle = build(cfg.dataset).load()
    bundle.name = cfg.dataset.name
    bundle.meta["fingerprint"] = fingerprint(reads)
    return bundle


def _check_job(cfg: DictConfig) -> None:
    """Refuse, before anything is loaded or trained, settings this pipeline cannot honour."""
    # Lightning replaces a seed outside [0, 2^32) by a random one: refuse it instead.
    check_int("seed", cfg.get("seed"), 0, 2**32 - 1)
    tr = cfg.trainer
    accel = str(tr.get("accelerator", "auto")).lower()
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator",
            tr.get("accelerator"),
            "an accelerator this machine has",
            "No CUDA GPU is visible here: use `trainer.accelerator=cpu` (or `trainer=cpu`).",
        )
    if str(cfg.retrain.get("device", "cpu")) == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "retrain.device", "cuda", "cpu or auto on this machine", "No CUDA GPU is visible."
        )
    devices = tr.get("devices", 1)
    n_dev = _device_count(devices, accel)
    nodes = int(tr.get("num_nodes", 1) or 1)
    if n_dev != 1 or nodes != 1:
        key, value = ("trainer.num_nodes", nodes) if nodes != 1 else ("trainer.devices", devices)
        raise ConfigError(
            key,
            value,
            "1 (one device on one node)",
            "ggda trains a base model on one device: the model cache, the checkpoints "
            "TracIn reads and the attribution run in one process, and multi-process "
            "(DDP) training is not supported. Set `trainer.devices=1`; retrains run in "
            "parallel through `retrain.workers` / `retrain.backend`.",
        )


def _device_count(devices: Any, accel: str) -> int:
    """How many devices Lightning would train on for ``trainer.devices``."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        gpu = accel in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return max(1, torch.cuda.device_count()) if gpu else 1
    if "," in text:
        return len([t for t in text.split(",") if t.strip()])
    try:
        return int(text)
    except ValueError:
        raise ConfigError("trainer.devices", devices, "1") from None


def _check_finished_files(run_dir: Path, cfg: DictConfig) -> None:
    """Say exactly which file of a finished run is damaged (before it is compared)."""
    if cfg.get("overwrite", False) or not (run_dir / "metrics.json").exists():
        return
    fix = (
        "Nothing was changed. Delete that run directory, set `overwrite=true` to replace "
        "its results, or `tag=NAME` to write this run elsewhere."
    )
    for name in ("metrics.json", "config.json"):
        path = run_dir / name
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise GGDAError(f"{run_dir} holds metrics.json but no config.json. {fix}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GGDAError(f"{path} is damaged (not valid JSON: {e}). {fix}") from None
        if not isinstance(obj, dict) or (name == "config.json" and "results_config" not in obj):
            raise GGDAError(f"{path} is damaged (no `results_config` table). {fix}")


class _RunDirLock:
    """One process at a time per run directory (an ``flock`` on ``<run_dir>/.lock``).

    The holder writes its pid and results config into the lock file, so a second process
    with a different config is refused at once (it would mix two runs' files), and one
    with the same config waits and then finds the finished run.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig) -> None:
        self.path = run_dir / ".lock"
        self.mine = results_config(cfg)
        self.fh: Any = None

    def __enter__(self) -> _RunDirLock:
        fh = open_lock(self.path)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._owner(fh)
            other = owner.get("results_config")
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
            if other is not None and other != self.mine:
                fh.close()
                keys = diff_keys(other, self.mine)
                raise GGDAError(
                    f"{self.path.parent} is in use by another ggda run ({who}) of a different "
                    f"config (differs in: {', '.join(keys[:8])}). Nothing was written. Set "
                    "`tag=NAME` to write this run elsewhere, or wait for that run to finish."
                ) from None
            log.info("%s is in use by %s (same config): waiting for it", self.path.parent, who)
            fcntl.flock(fh, fcntl.LOCK_EX)
        self.fh = fh
        if fh.writable():
            fh.seek(0)
            fh.truncate()
            json.dump(
                {"pid": os.getpid(), "host": socket.gethostname(), "results_config": self.mine},
                fh,
                default=str,
            )
            fh.flush()
        return self

    @staticmethod
    def _owner(fh: Any) -> dict:
        try:
            fh.seek(0)
            return json.loads(fh.read() or "{}")
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def _check_writable(key: str, path: Path) -> None:
    """Create ``path`` (a directory) or fail naming the config key."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGDAError(
            f"cannot create the directory {path} ({e.strerror}): set `{key}=DIR` to a "
            "writable directory"
        ) from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or reuse) the base model, group, attribute, evaluate; return the metrics.

    The run directory is held by this process for the whole run (see :class:`_RunDirLock`).
    """
    t_start = time.perf_counter()
    tracking.quiet_console()
    _check_job(cfg)
    run_dir = _run_dir(cfg)
    _check_writable("paths.output_dir", run_dir)
    if not os.access(run_dir, os.W_OK):
        raise GGDAError(
            f"the run directory {run_dir} is not writable: set `paths.output_dir=DIR` to a "
            "directory of your own"
        )
    with _RunDirLock(run_dir, cfg):
        _check_finished_files(run_dir, cfg)
        finished = check_run_dir(run_dir, cfg)
        if finished is not None:
            log.info("%s already holds finished results of this config; nothing to do.", run_dir)
            _print_finished(cfg, run_dir, finished)
            finished["skipped"] = True
            return finished
        return _run(cfg, run_dir, t_start)


def _run(cfg: DictConfig, run_dir: Path, t_start: float) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.paths.cache_dir)
    _check_writable("paths.cache_dir", cache_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    # -- objects from config ------------------------------------------------------------
    t0 = time.perf_counter()
    bundle = load_data(cfg)
    t_data = time.perf_counter() - t0
    atomic_write_json(run_dir / "data.json", bundle.summary())
    recipe = build_recipe(cfg.model)
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision.startswith("64"):
        # Lightning trains in float64 and casts each batch; everything after training
        # (grouping features, gradients, retrains) reads the bundle directly, so the data
        # must be float64 too.
        _to_float64(bundle)
    net = recipe.build_net(bundle.input_shape, bundle.num_classes)
    check_net(net, bundle.x_train[:2], bundle.num_classes)
    module = GGDAModule(net, recipe, int(cfg.seed))
    grouper = build(cfg.grouping)
    k = grouper.k_for(bundle.n_train) if grouper.groups is not None else bundle.n_train
    attributor = build(cfg.method)
    prop = build(cfg.property)
    # An experiment may tune an evaluation that this run does not select: such a node has
    # settings but no `_target_`, and is not an evaluation to run.
    evaluators = [
        build(node)
        for node in (cfg.get("evaluation") or {}).values()
        if node and "_target_" in node
    ]
    if k < 2 and any(getattr(ev, "name", "") == "lds" for ev in evaluators):
        raise ConfigError(
            "groups",
            cfg.get("groups"),
            "at least 2 for the LDS evaluation",
            "With one group every training point gets the same score, so every subset's "
            "predicted output is the same and the rank correlation is undefined (group-level "
            "LDS needs at least 3 groups).",
        )
    keys = cache_keys(
        cfg,
        grouper.config(),
        grouper.uses_model,
        attributor.config(),
        vars(prop),
        bundle.meta["fingerprint"],
    )
    retrain = build(cfg.retrain, cache_dir=str(cache_dir)).bind(recipe, bundle, keys["retrain"])
    store = model_store(cfg, keys, int(cfg.seed), recipe)
    callbacks = [build(node) for node in (cfg.get("callbacks") or {}).values() if node]
    _check_callback_order(cfg, callbacks)
    loggers = build_loggers(cfg, run_dir)
    cache = stages.ArtifactCache(cache_dir, keys["data"], keys["model"])
    # The stages derive the grouping and scores keys themselves: they must be the ones that
    # config.json records.
    derived = {"grouping": cache.grouping_key(grouper)}
    derived["scores"] = cache.scores_key(derived["grouping"], attributor, prop)
    if any(derived[k] != keys[k] for k in derived):
        raise RuntimeError(f"ggda.stages keys {derived} differ from the run's {keys}")
    objects = RunObjects(
        bundle=bundle,
        store=store,
        grouper=grouper,
        attributor=attributor,
        prop=prop,
        retrain=retrain,
        evaluators=tuple(evaluators),
        cache=cache,
        # TRAK's ensemble: models of seeds seed+1.. trained and cached like the base model
        # (on seeded random subsets when fraction < 1)
        ensemble=lambda count, fraction=1.0: [
            train_member(cfg, keys, bundle, recipe, int(cfg.seed) + i, fraction)
            for i in range(1, count + 1)
        ],
    )
    ctx = RunContext(objects=objects, run_dir=run_dir, loggers=loggers)
    ctx.log(
        {
            "time/data": t_data,
            "data/n_train": bundle.n_train,
            "data/num_queries": int(bundle.query_idx.numel()),
        }
    )
    for cb in callbacks:
        if isinstance(cb, GGDACallback):
            cb.bind(ctx)

    # -- fit (or resume the cached fit) -------------------------------------------------
    try:
        trainer = pl.Trainer(
            **_trainer_kwargs(cfg),
            max_epochs=recipe.epochs,
            logger=loggers or False,
            callbacks=callbacks,
            enable_checkpointing=False,
            default_root_dir=str(run_dir),
        )
    except MisconfigurationException as e:
        raise GGDAError(f"the `trainer` config is not usable here: {e}") from None
    # Check (and wipe a corrupt store) only under the lock: another job may be training
    # this very model and be in the middle of writing a checkpoint.
    store.lock()
    try:
        status = store.verify()
        resume = store.resume_point() if status != "none" else None
    except BaseException:
        store.unlock()
        raise
    if status == "complete":
        store.unlock()  # a finished store is read only from here on
        log.info("Reusing the cached base model %s (training skipped).", store.dir)
    elif status == "partial":
        log.info("Resuming the interrupted training of %s.", store.dir)
    ctx.log({"model/cached": float(status == "complete")})
    dm = BundleDataModule(bundle, recipe.batch_size, seed=int(cfg.seed))
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=False)
    finally:
        store.unlock()
    ctx.metrics["time/total"] = time.perf_counter() - t_start
    ctx.metrics["seed"] = int(cfg.seed)

    # -- outputs ------------------------------------------------------------------------
    atomic_write_json(
        run_dir / "config.json",
        {
            "results_config": results_config(cfg),
            "resolved": OmegaConf.to_container(cfg, resolve=True),
            "keys": keys,
            "data_fingerprint": bundle.meta["fingerprint"],
        },
    )
    timings = {k: v for k, v in ctx.metrics.items() if k.startswith("time/")}
    atomic_write_json(run_dir / "timings.json", timings)
    atomic_write_json(run_dir / "metrics.json", ctx.metrics)  # last: marks the run finished
    tracking.log_scalars(loggers, {"time/total": ctx.metrics["time/total"]})
    tracking.finish(loggers)
    _print_summary(
        run_dir,
        ctx.metrics,
        per_sample_reference(
            cfg, keys, attributor.config(), vars(prop), bundle.meta["fingerprint"]
        ),
        per_sample_command(),
    )
    return ctx.metrics


def _check_callback_order(cfg: DictConfig, callbacks: list[Any]) -> None:
    """Refuse, before training, a GGDA callback listed before one whose result it reads."""
    names = [k for k, node in (cfg.get("callbacks") or {}).items() if node]
    for i, cb in enumerate(callbacks):
        for need in getattr(cb, "after", ()):
            if not any(isinstance(c, need) for c in callbacks[:i]):
                raise ConfigError(
                    "callbacks",
                    names,
                    f"a list with a {need.__name__} before the {type(cb).__name__}",
                    f"`{names[i] if i < len(names) else type(cb).__name__}` evaluates what the "
                    f"{need.__name__} produces: list it after "
                    "that one (see conf/callbacks/default.yaml).",
                )


def _to_float64(bundle: Any) -> None:
    """Cast the bundle's floating-point inputs to float64 in place (precision=64-true)."""
    for split in ("train", "val", "test"):
        x = getattr(bundle, f"x_{split}")
        if x.is_floating_point():
            setattr(bundle, f"x_{split}", x.double())


def per_sample_reference(
    cfg: DictConfig,
    keys: dict[str, str],
    method_cfg: dict,
    prop_cfg: dict,
    data_fingerprint: dict | None = None,
) -> float | None:
    """Attribution seconds of the cached per-sample result, or None when none is cached.

    The per-sample (``grouping=singleton``) result is of the same data, model, method
    and queries.
    """
    from ggda.grouping.singleton import SingletonGrouper
    from ggda.io import load_or_none

    single = SingletonGrouper(seed=int(cfg.seed))
    ref = cache_keys(
        cfg, single.config(), single.uses_model, method_cfg, prop_cfg, data_fingerprint
    )
    if ref["scores"] == keys["scores"]:
        return None  # this run is the per-sample one
    path = Path(cfg.paths.cache_dir) / "scores" / f"{ref['scores']}.pt"
    cached = load_or_none(path, what="per-sample scores")
    if cached is None:
        return None
    secs = (cached.get("timings") or {}).get("total")
    return float(secs) if secs is not None else None


def per_sample_command() -> str:
    """The command that makes the per-sample reference of this run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        task = []
    keep = [
        o
        for o in task
        if o.lstrip("~+").split("=", 1)[0].split(".")[0] not in ("grouping", "groups")
    ]
    import shlex

    return " ".join(["python run.py", *(shlex.quote(o) for o in keep), "grouping=singleton"])


def _print_finished(cfg: DictConfig, run_dir: Path, m: dict[str, Any]) -> None:
    """Print the summary of a finished run.

    Includes the speed-up against a per-sample result that may have been cached since.
    """
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        method, prop = build(cfg.method), build(cfg.property)
        ref = per_sample_reference(
            cfg, saved["keys"], method.config(), vars(prop), saved.get("data_fingerprint")
        )
    except (OSError, KeyError, ValueError, GGDAError):
        ref = None
    _print_summary(run_dir, m, ref, per_sample_command())


def _print_summary(
    run_dir: Path, m: dict[str, Any], per_sample_s: float | None = None, command: str = ""
) -> None:
    """The run's results at a glance: fidelity, groups, cost, speed-up vs per-sample."""
    lines = [f"ggda results ({run_dir}):"]
    for key in sorted(m):
        headline = key.split("/")[0] in metric_namespaces() and (
            key.endswith("/mean") or key == "noisy_labels/auc"
        )
        if headline and isinstance(m[key], (int, float)):
            lines.append(f"  {key:<28s} {m[key]:.4f}")
    if "grouping/k" in m:
        n = int(m.get("data/n_train", 0))
        share = m.get("grouping/largest_share", float("nan"))
        lines.append(
            f"  {'grouping/k':<28s} {int(m['grouping/k'])} of n={n}; largest group "
            f"{int(m.get('grouping/size_max', 0))} points ({100 * share:.1f} % of n)"
        )
    for key in ("time/attribution", "time/grouping", "time/attribution+grouping"):
        if key in m:
            lines.append(f"  {key:<28s} {m[key]:.2f} s")
    if "attribution/epochs" in m:
        lines.append(
            f"  {'attribution/epochs':<28s} {m['attribution/epochs']:.2f} "
            f"(time/epoch {m['time/epoch']:.2f} s)"
        )
    if "time/total" in m:
        lines.append(f"  {'time/total':<28s} {m['time/total']:.2f} s")
    both = m.get("time/attribution+grouping")
    if m.get("grouping/k") is not None and m.get("grouping/k") == m.get("data/n_train"):
        lines.append("  (per-sample run: the reference that grouped runs are compared with)")
    elif per_sample_s is not None and both:
        lines.append(
            f"  {'speed-up vs per-sample':<28s} {per_sample_s / both:.2f}x "
            f"(cached per-sample attribution {per_sample_s:.2f} s vs "
            f"{both:.2f} s attribution + grouping)"
        )
    elif command:
        lines.append(
            f"  speed-up vs per-sample: no cached per-sample result; make one with\n    {command}"
        )
    print("\n".join(lines), flush=True)


def configure_threads() -> None:
    """Respect OMP_NUM_THREADS when set (joblib workers set it to 1)."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))
