"""Runs every configured evaluation after attribution, logging under ``<name>/...``."""

from __future__ import annotations

import pytorch_lightning as pl

from ggda import tracking
from ggda.errors import GGDAError
from ggda.evaluation.base import EvalContext
from ggda.faults import maybe_fail
from ggda.lightning.callbacks.base import GGDACallback


class EvaluationCallback(GGDACallback):
    """on_fit_end (after :class:`GroupAttributionCallback`): each evaluator in turn."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = self.ctx
        if ctx.result is None or ctx.grouping is None:
            raise GGDAError(
                "EvaluationCallback needs attribution results: list `attribution` before "
                "`evaluation` under `callbacks`"
            )
        scores = ctx.result.scores
        ectx = EvalContext(
            bundle=ctx.bundle,
            grouping=ctx.grouping,
            scores=scores,
            prop=ctx.prop,
            retrain=ctx.retrain,
            attributor=ctx.attributor,
            task=ctx.task,
        )
        for ev in ctx.evaluators:
            before = dict(ctx.retrain.stats)
            with ctx.timed(f"eval/{ev.name}"):
                res = ev.evaluate(ectx)
            ctx.log({f"{ev.name}/{k}": v for k, v in res.metrics.items()})
            ctx.log({f"{ev.name}/{k}": ctx.retrain.stats[k] - before[k] for k in before})
            for name, df in res.tables.items():
                tracking.log_table(ctx.run_dir, ctx.loggers, f"{ev.name}_{name}", df)
            for name, fig in res.figures.items():
                tracking.log_figure(ctx.run_dir, ctx.loggers, f"{ev.name}_{name}", fig)
            maybe_fail(f"evaluated_{ev.name}")
