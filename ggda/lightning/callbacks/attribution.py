"""Groups the training set and computes group attributions once training has finished."""

from __future__ import annotations

import logging
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytorch_lightning as pl
import torch

from ggda import tracking
from ggda.attribution.base import AttributionResult, AttributionTask, check_finite_scores
from ggda.errors import GGDAError
from ggda.faults import maybe_fail
from ggda.grouping.base import Grouping, GroupingInputs
from ggda.io import atomic_torch_save, load_or_none, save_artifact
from ggda.lightning.callbacks.base import GGDACallback

log = logging.getLogger(__name__)


class GroupAttributionCallback(GGDACallback):
    """on_fit_end: grouping (cached), then attribution (cached), logged and saved.

    Writes ``grouping.pt``, ``scores.pt`` and ``queries.pt`` into the run directory and
    logs ``grouping/...``, ``time/...``, a table of group sizes and scores, and figures.
    """

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
        ctx.log({f"grouping/{k}": v for k, v in grouping.summary().items()})
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
        atomic_torch_save(ctx.run_dir / "scores.pt", result.scores.cpu())
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
        self._report(grouping, result)

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
