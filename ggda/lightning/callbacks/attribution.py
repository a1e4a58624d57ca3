"""Groups the training set and computes group attributions once training has finished."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from ggda import tracking
from ggda.attribution.base import AttributionResult, AttributionTask, check_finite_scores
from ggda.errors import GGDAError, check_float, check_int
from ggda.faults import maybe_fail
from ggda.grouping.base import Grouping, GroupingInputs
from ggda.io import atomic_torch_save, load_or_none, save_artifact
from ggda.lightning.callbacks.base import GGDACallback
from ggda.lightning.callbacks.checkpoint import median_epoch_seconds

log = logging.getLogger(__name__)


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


def _grouper_label(grouper) -> str:
    """``kmeans (gradients, cap 2)``: the grouper with what distinguishes its presets."""
    parts = [str(getattr(grouper, "features", ""))]
    if getattr(grouper, "balanced", False):
        parts.append("balanced")
    elif getattr(grouper, "max_size_factor", None) is not None:
        parts.append(f"size cap {grouper.max_size_factor:g} n/k")
    extra = ", ".join(p for p in parts if p)
    return f"{grouper.name} ({extra})" if extra else grouper.name


class GroupAttributionCallback(GGDACallback):
    """on_fit_end: grouping (cached), then attribution (cached), logged and saved.

    Writes ``grouping.pt``, ``scores.pt`` (or ``scores.npy`` above ``scores_mmap_bytes``,
    see :func:`save_scores`) and ``queries.pt`` into the run directory and logs
    ``grouping/...`` (``grouping/largest_share``: the largest group's share of n, warned
    about above ``warn_share``), ``time/...``, ``time/epoch`` and ``attribution/epochs``
    (attribution time in training epochs of the base model), a table of group sizes and
    scores, and figures.

    Args:
        warn_share: warn when the largest group holds more than this share of n.
        scores_mmap_bytes: scores larger than this are written as a memory-mapped .npy.
    """

    def __init__(self, warn_share: float = 0.25, scores_mmap_bytes: int = 256 << 20) -> None:
        self.warn_share = check_float("grouping.warn_share", warn_share, 0.0, 1.0)
        self.scores_mmap_bytes = check_int("scores_mmap_bytes", scores_mmap_bytes, 0)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = self.ctx
        device = trainer.strategy.root_device
        net = pl_module.net.to(device).eval()
        checkpoints = ctx.store.checkpoints()
        if not checkpoints:
            raise GGDAError(f"no checkpoints found in {ctx.store.dir}; delete it and rerun")
        net.load_state_dict(checkpoints[-1].state_dict)
        bundle = ctx.bundle

        # -- grouping ---------------------------------------------------------------------
        grouping = self._grouping(net, device)
        ctx.grouping = grouping
        self._log_sizes(grouping)
        log.info(
            "grouped: %s, k=%d of n=%d, largest group %.1f %% of n (%.2f s)",
            _grouper_label(ctx.grouper),
            grouping.k,
            grouping.n,
            100 * ctx.metrics["grouping/largest_share"],
            ctx.metrics.get("time/grouping", float("nan")),
        )
        atomic_torch_save(ctx.run_dir / "grouping.pt", grouping.group_ids)
        maybe_fail("grouped")

        # -- attribution ------------------------------------------------------------------
        queries = ctx.prop.examples(bundle)
        ctx.task = AttributionTask(
            net=net,
            checkpoints=checkpoints,
            x_train=bundle.x_train,
            y_train=bundle.y_train,
            grouping=grouping,
            queries=queries,
            device=device,
            ensemble=ctx.ensemble,
            retrain=ctx.retrain,
            prop=ctx.prop,
            bundle=bundle,
            cache_dir=ctx.cache_dir,
        )
        result = self._attribute()
        ctx.result = result
        check_finite_scores(result, ctx.attributor.name)
        ctx.metrics["attribution/scores_file"] = save_scores(
            ctx.run_dir, result.scores, self.scores_mmap_bytes
        )
        maybe_fail("attributed")
        atomic_torch_save(
            ctx.run_dir / "queries.pt",
            {
                "split": ctx.prop.split,
                "indices": ctx.prop.point_indices(bundle),
                "row_ids": queries.row_ids,
                "measurement": queries.measurement,
            },
        )
        ctx.log(
            {f"attribution/{k}": v for k, v in result.info.items() if isinstance(v, (int, float))}
        )
        ctx.log({"attribution/k": grouping.k, "attribution/m": queries.m})
        self._log_cost()
        log.info(
            "attributed: %s, %d x %d scores (%.2f s%s)",
            ctx.attributor.name,
            grouping.k,
            queries.m,
            ctx.metrics.get("time/attribution", float("nan")),
            f", {ctx.metrics['attribution/epochs']:.2f} training epochs"
            if "attribution/epochs" in ctx.metrics
            else "",
        )
        self._report(grouping, result)

    def _log_sizes(self, grouping: Grouping) -> None:
        """Group sizes, the effective k (an int) and the largest group's share of n."""
        ctx = self.ctx
        summary = grouping.summary()
        share = summary["size_max"] / grouping.n
        ctx.log({f"grouping/{k}": v for k, v in summary.items() if k != "k"})
        ctx.log({"grouping/k": int(grouping.k), "grouping/largest_share": share})
        tracking.set_config(ctx.loggers, {"grouping/k": int(grouping.k)})
        # A share above 1/k cannot be avoided when k is that small (k < 1 / warn_share).
        if share > self.warn_share and summary["size_max"] > -(-grouping.n // grouping.k):
            log.warning(
                "grouping %s: the largest group holds %d of n=%d points (%.0f %%, above "
                "grouping.warn_share=%.2f); group-level results are then dominated by it. "
                "Cap group sizes (grouping.max_size_factor=2, grouping.balanced=true) or "
                "pick another grouping.",
                _grouper_label(ctx.grouper),
                int(summary["size_max"]),
                grouping.n,
                100 * share,
                self.warn_share,
            )

    def _log_cost(self) -> None:
        """``time/attribution+grouping``, ``time/epoch`` and ``attribution/epochs``."""
        ctx = self.ctx
        m = ctx.metrics
        t_attr = m.get("time/attribution", float("nan"))
        ctx.log({"time/attribution+grouping": t_attr + float(m.get("time/grouping", 0.0))})
        epoch = median_epoch_seconds(ctx.store.dir)
        if epoch is not None and epoch > 0:
            ctx.log({"time/epoch": epoch, "attribution/epochs": t_attr / epoch})

    def _grouping(self, net: torch.nn.Module, device: torch.device) -> Grouping:
        ctx = self.ctx
        g = ctx.grouper
        meta = {
            "data": ctx.keys["data"],
            "grouper": g.config(),
            "model": ctx.keys["model"] if g.uses_model else None,
        }
        path = ctx.cache_dir / "groupings" / f"{ctx.keys['grouping']}.pt"
        cached = load_or_none(path, meta, what="grouping")
        if cached is not None:
            log.info("Reusing cached grouping %s", path.name)
            ctx.log({"time/grouping": cached["seconds"], "grouping/cached": 1})
            for k, v in cached.get("timings", {}).items():
                ctx.log({f"time/{k}": v})
            return Grouping(cached["group_ids"], cached["k"])
        t0 = time.perf_counter()
        b = ctx.bundle
        grouping = g.group(GroupingInputs(b.x_train, b.y_train, b.num_classes, net, device))
        secs = time.perf_counter() - t0
        timings = dict(getattr(g, "timings", {}) or {})
        save_artifact(
            path,
            {"group_ids": grouping.group_ids, "k": grouping.k, "seconds": secs, "timings": timings},
            meta,
        )
        ctx.log({"time/grouping": secs, "grouping/cached": 0})
        for k, v in timings.items():
            ctx.log({f"time/{k}": v})
        return grouping

    def _attribute(self) -> AttributionResult:
        ctx = self.ctx
        meta = {
            "model": ctx.keys["model"],
            "grouping": ctx.keys["grouping"],
            "method": ctx.attributor.config(),
            "property": vars(ctx.prop),
        }
        path = ctx.cache_dir / "scores" / f"{ctx.keys['scores']}.pt"
        cached = load_or_none(path, meta, what="attribution scores")
        if cached is not None:
            log.info("Reusing cached attribution scores %s", path.name)
            result = AttributionResult(cached["scores"], cached["timings"], cached["info"])
            ctx.log({"attribution/cached": 1})
        else:
            t0 = time.perf_counter()
            result = ctx.attributor.attribute(ctx.task)
            result.scores = result.scores.detach()
            result.timings["total"] = time.perf_counter() - t0
            save_artifact(
                path,
                {
                    "scores": result.scores.cpu(),
                    "timings": result.timings,
                    "info": result.info,
                },
                meta,
            )
            ctx.log({"attribution/cached": 0})
        ctx.log({"time/attribution": result.timings.get("total", float("nan"))})
        ctx.log({f"time/attribution/{k}": v for k, v in result.timings.items() if k != "total"})
        return result

    def _report(self, grouping: Grouping, result: AttributionResult) -> None:
        ctx = self.ctx
        s = result.scores.double().cpu()
        sizes = grouping.sizes()
        df = pd.DataFrame(
            {
                "group": range(grouping.k),
                "size": sizes.numpy(),
                "score_mean_over_queries": s.mean(1).numpy(),
                "score_abs_mean": s.abs().mean(1).numpy(),
            }
        )
        tracking.log_table(ctx.run_dir, ctx.loggers, "groups", df)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].hist(sizes.numpy(), bins=min(50, max(5, grouping.k)))
        axes[0].set_xlabel("group size")
        axes[0].set_ylabel("groups")
        axes[0].set_title(f"{ctx.grouper.name}: k={grouping.k}")
        axes[1].scatter(sizes.numpy(), s.mean(1).numpy(), s=8, alpha=0.6)
        axes[1].set_xlabel("group size")
        axes[1].set_ylabel("mean score over queries")
        axes[1].set_title(f"{ctx.attributor.name} scores")
        fig.tight_layout()
        tracking.log_figure(ctx.run_dir, ctx.loggers, "groups", fig)
