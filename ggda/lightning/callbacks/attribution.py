"""Groups the training set and computes group attributions once training has finished."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytorch_lightning as pl

from ggda import stages, tracking
from ggda.attribution.base import AttributionResult, AttributionTask
from ggda.errors import GGDAError, check_float, check_int
from ggda.faults import maybe_fail
from ggda.grouping.base import Grouping, GroupingInputs
from ggda.io import atomic_torch_save
from ggda.lightning.callbacks.base import GGDACallback
from ggda.lightning.callbacks.checkpoint import median_epoch_seconds

# The run-directory score files live with the stages; kept importable from here.
from ggda.stages import SCORES_NPY, SCORES_PT, load_scores, save_scores

__all__ = ["SCORES_NPY", "SCORES_PT", "GroupAttributionCallback", "load_scores", "save_scores"]

log = logging.getLogger(__name__)


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
        ctx, run = self.ctx, self.ctx.objects
        device = trainer.strategy.root_device
        net = pl_module.net.to(device).eval()
        checkpoints = run.store.checkpoints()
        if not checkpoints:
            raise GGDAError(f"no checkpoints found in {run.store.dir}; delete it and rerun")
        net.load_state_dict(checkpoints[-1].state_dict)
        b = run.bundle

        inputs = GroupingInputs(b.x_train, b.y_train, b.num_classes, net, device)
        grouped = stages.group(run.grouper, inputs, run.cache)
        self._grouped(grouped)

        task = AttributionTask(
            net=net,
            checkpoints=checkpoints,
            x_train=b.x_train,
            y_train=b.y_train,
            grouping=grouped.grouping,
            queries=run.prop.examples(b),
            device=device,
            ensemble=run.ensemble,
            retrain=run.retrain,
            prop=run.prop,
            bundle=b,
            cache_dir=run.cache.dir,
        )
        ctx.attributed = stages.attribute(run.attributor, task, run.cache, grouped.key)
        self._attributed(ctx.attributed)

    def _grouped(self, grouped: stages.GroupingStage) -> None:
        """Log the grouping stage (time, cache use, group sizes) and write ``grouping.pt``."""
        ctx = self.ctx
        ctx.log({"time/grouping": grouped.seconds, "grouping/cached": int(grouped.cached)})
        for k, v in grouped.timings.items():
            ctx.log({f"time/{k}": v})
        self._log_sizes(grouped.grouping)
        log.info(
            "grouped: %s, k=%d of n=%d, largest group %.1f %% of n (%.2f s)",
            _grouper_label(ctx.objects.grouper),
            grouped.grouping.k,
            grouped.grouping.n,
            100 * ctx.metrics["grouping/largest_share"],
            ctx.metrics.get("time/grouping", float("nan")),
        )
        atomic_torch_save(ctx.run_dir / "grouping.pt", grouped.grouping.group_ids)
        maybe_fail("grouped")

    def _attributed(self, attributed: stages.AttributionStage) -> None:
        """Log the attribution stage and write ``scores.pt`` and ``queries.pt``."""
        ctx, run = self.ctx, self.ctx.objects
        result, grouping, queries = (
            attributed.result,
            attributed.task.grouping,
            attributed.task.queries,
        )
        ctx.log({"attribution/cached": int(attributed.cached)})
        ctx.log({"time/attribution": result.timings.get("total", float("nan"))})
        ctx.log({f"time/attribution/{k}": v for k, v in result.timings.items() if k != "total"})
        ctx.metrics["attribution/scores_file"] = stages.save_scores(
            ctx.run_dir, result.scores, self.scores_mmap_bytes
        )
        maybe_fail("attributed")
        atomic_torch_save(
            ctx.run_dir / "queries.pt",
            {
                "split": run.prop.split,
                "indices": run.prop.point_indices(run.bundle),
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
            run.attributor.name,
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
                _grouper_label(ctx.objects.grouper),
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
        epoch = median_epoch_seconds(ctx.objects.store.dir)
        if epoch is not None and epoch > 0:
            ctx.log({"time/epoch": epoch, "attribution/epochs": t_attr / epoch})

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
        axes[0].set_title(f"{ctx.objects.grouper.name}: k={grouping.k}")
        axes[1].scatter(sizes.numpy(), s.mean(1).numpy(), s=8, alpha=0.6)
        axes[1].set_xlabel("group size")
        axes[1].set_ylabel("mean score over queries")
        axes[1].set_title(f"{ctx.objects.attributor.name} scores")
        fig.tight_layout()
        tracking.log_figure(ctx.run_dir, ctx.loggers, "groups", fig)
