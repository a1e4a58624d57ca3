"""Runs every configured evaluation after attribution, logging under ``<name>/...``."""

from __future__ import annotations

import pytorch_lightning as pl

from ggda import stages, tracking
from ggda.faults import maybe_fail
from ggda.lightning.callbacks.attribution import GroupAttributionCallback
from ggda.lightning.callbacks.base import GGDACallback


class EvaluationCallback(GGDACallback):
    """on_fit_end (after :class:`GroupAttributionCallback`): each evaluator in turn.

    Evaluates the attribution stage's result (``RunContext.attributed``); the pipeline
    refuses, before training, a callback list that does not put the attribution first.
    """

    after = (GroupAttributionCallback,)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = self.ctx
        if ctx.attributed is None:  # the pipeline's order check rules this out
            raise RuntimeError("EvaluationCallback ran before GroupAttributionCallback")
        for out in stages.iter_evaluate(ctx.objects.evaluators, ctx.attributed):
            ctx.log({f"time/eval/{out.name}": out.seconds})
            ctx.log({f"{out.name}/{k}": v for k, v in out.result.metrics.items()})
            ctx.log({f"{out.name}/{k}": v for k, v in out.retrains.items()})
            for name, df in out.result.tables.items():
                tracking.log_table(ctx.run_dir, ctx.loggers, f"{out.name}_{name}", df)
            for name, fig in out.result.figures.items():
                tracking.log_figure(ctx.run_dir, ctx.loggers, f"{out.name}_{name}", fig)
            maybe_fail(f"evaluated_{out.name}")
