"""Logging of metrics, tables and figures to the run directory and to Lightning loggers.

Every scalar also lands in ``metrics.json`` (written by the pipeline); tables go to
``tables/<name>.csv`` and figures to ``figures/<name>.png`` in the run directory, and to
W&B as ``wandb.Table`` / ``wandb.Image`` when a WandbLogger is configured.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ggda.io import atomic_write_bytes

log = logging.getLogger(__name__)


# Warnings known to be harmless for ggda's use of Lightning, W&B and torch (messages as
# regular expressions); everything else still shows.
HARMLESS_WARNINGS = (
    r"The `srun` command is available on your system but is not used",  # not under SLURM
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning vs torch 2.13
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r"The given NumPy array is not writable",  # read-only memory-mapped scores.npy
    r".*does not have many workers which may be a bottleneck",  # in-memory tensors
    r"The anonymous setting has no effect",  # W&B
)


def quiet_console() -> None:
    """Filter the known harmless warnings and silence W&B's banners.

    The run directory and ``wandb sync`` say where a run went; ``WANDB_SILENT=false``
    brings the banners back.
    """
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("WANDB_SILENT", "true")


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def log_scalars(loggers: Sequence[Any], metrics: dict[str, float], step: int | None = None) -> None:
    """Send scalars to every logger (and to the W&B summary, so tables compare runs)."""
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not clean:
        return
    for lg in loggers:
        lg.log_metrics(clean, step=step)
        if _is_wandb(lg):
            for k, v in clean.items():
                lg.experiment.summary[k] = v if math.isfinite(v) else None


def set_config(loggers: Sequence[Any], values: dict[str, Any]) -> None:
    """Add keys to every logger's run config (W&B: ``config.update``, values may change)."""
    for lg in loggers:
        if _is_wandb(lg):
            lg.experiment.config.update(values, allow_val_change=True)
        else:
            lg.log_hyperparams(values)


# Metrics that a W&B dashboard plots against the effective number of groups.
STEP_METRIC = "grouping/k"
K_METRICS = ("lds/*", "time/*", "attribution/*", "speedup/*")


def define_metrics(loggers: Sequence[Any]) -> None:
    """Make ``grouping/k`` the W&B step metric of ``lds/*``, ``time/*`` and other results.

    A panel over a sweep's runs then draws these per-run results against k.
    """
    for lg in loggers:
        if _is_wandb(lg):
            run = lg.experiment
            run.define_metric(STEP_METRIC)
            for pattern in K_METRICS:
                run.define_metric(pattern, step_metric=STEP_METRIC)


def log_table(run_dir: Path, loggers: Sequence[Any], name: str, df: pd.DataFrame) -> Path:
    """Write ``tables/<name>.csv`` atomically and log the table to W&B."""
    path = Path(run_dir) / "tables" / f"{name.replace('/', '_')}.csv"
    atomic_write_bytes(path, df.to_csv(index=False).encode())
    for lg in loggers:
        if _is_wandb(lg):
            import wandb

            lg.experiment.log({f"table/{name}": wandb.Table(dataframe=df)})
    return path


def log_figure(run_dir: Path, loggers: Sequence[Any], name: str, fig: Any) -> Path:
    """Save ``figures/<name>.png`` and log it to W&B; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "figures" / f"{name.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    for lg in loggers:
        if _is_wandb(lg):
            import wandb

            lg.experiment.log({f"figure/{name}": wandb.Image(str(path))})
    plt.close(fig)
    return path


def finish(loggers: Sequence[Any]) -> None:
    """Flush loggers; end the W&B run so the next sweep job starts a new one."""
    for lg in loggers:
        try:
            lg.save()
        except Exception:  # a logger that cannot save must not lose the run's results
            log.warning("logger %s failed to save", type(lg).__name__, exc_info=True)
        if _is_wandb(lg):
            import wandb

            wandb.finish()
