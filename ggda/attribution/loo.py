r"""Group leave-one-out by retraining: the gold standard for small k.

For each group j and seed s, a model is retrained on D \ G_j and one on D with the same
seed (paired, so seed noise partly cancels), through the shared cached retraining service:

    tau_{jq} = mean_s [ f_q(theta_s(D)) - f_q(theta_s(D \ G_j)) ].

This is the negated removal effect f(theta*(D \ G_j)) - f(theta*(D)),
oriented like every other method (positive = the group helps: removing it hurts f_q), so
that the scores plug into the same evaluations. Costs (k + 1) x R retrains, refused above
``max_retrains``.
"""

from __future__ import annotations

import time

import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Attributor
from ggda.errors import ConfigError, GGDAError, check_int
from ggda.models.functional import per_example_loss
from ggda.models.training import retrain_seeds, train_lean


class GroupLOO(Attributor):
    """Group leave-one-out retraining.

    Args:
        repeats: R retrains per subset (seeds averaged), >= 1.
        seed: seed of the retrains (seeds ``seed * 100003 + r``, as LDS uses, so the
            full-data retrains are shared through the cache).
        max_retrains: refuse when (k + 1) x R exceeds this budget.
    """

    name = "loo"

    def __init__(self, repeats: int = 1, seed: int = 0, max_retrains: int = 100) -> None:
        self.repeats = check_int("method.repeats", repeats, 1)
        self.seed = int(seed)
        self.max_retrains = check_int("method.max_retrains", max_retrains, 1)

    def seeds(self) -> list[int]:
        """The R retrain seeds (shared with LDS through the cache)."""
        return retrain_seeds(self.seed, self.repeats)

    def masks(self, task: AttributionTask) -> torch.Tensor:
        """(k + 1, n) bool: row 0 the full data, row 1 + j the data without G_j."""
        k = task.grouping.k
        need = (k + 1) * self.repeats
        if need > self.max_retrains:
            raise ConfigError(
                "method.max_retrains",
                self.max_retrains,
                f"at least (k + 1) x repeats = ({k} + 1) x {self.repeats} = {need} retrains",
                "Group leave-one-out retrains once per group: lower `groups`, lower "
                "`method.repeats`, or raise `method.max_retrains` if you can afford it.",
            )
        if k < 2:
            raise GGDAError(
                "group leave-one-out needs k >= 2 (removing the only group leaves no data)"
            )
        gid = task.grouping.group_ids
        full = torch.ones(1, gid.numel(), dtype=torch.bool)
        drop = gid[None, :] != torch.arange(k)[:, None]
        return torch.cat([full, drop])

    def _check(self, task: AttributionTask) -> None:
        if task.retrain is None or task.prop is None or task.bundle is None:
            raise GGDAError(
                "method=loo retrains models: the task needs `retrain` (a bound "
                "RetrainService), `prop` (the property object) and `bundle`; the pipeline "
                "sets them, in Python pass them to AttributionTask"
            )

    def attribute(self, task: AttributionTask) -> AttributionResult:
        r"""Scores (k, m): mean over seeds of f(D) - f(D \ G_j) for every property row."""
        self._check(task)
        masks = self.masks(task)
        t0 = time.perf_counter()
        before = dict(task.retrain.stats)
        logits = task.retrain.run(masks, self.seeds(), desc="group LOO retrains")
        vals = task.prop.values(logits[task.prop.split].double(), task.bundle).mean(1)  # (k+1, m)
        scores = vals[:1] - vals[1:]
        run = task.retrain.stats.get("retrains_run", 0) - before.get("retrains_run", 0)
        return AttributionResult(
            scores=scores,
            timings={"retrain": time.perf_counter() - t0},
            info={
                "retrains": int(masks.shape[0] * self.repeats),
                "retrains_run": int(run),
                "fallback_params": 0,  # no gradients: retraining only
            },
        )

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        r"""tau_jj = mean_s [ L_{G_j}(theta_s(D \ G_j)) - L_{G_j}(theta_s(D)) ]: (k, 1).

        The group's own property is -L_{G_j} on its training points (their possibly noisy
        labels). The retrain service returns val/test logits only, so these models are
        trained here with the same lean loop (not cached) unless it also returns ``train``.
        """
        self._check(task)
        masks = self.masks(task)
        t0 = time.perf_counter()
        svc, bundle = task.retrain, task.bundle
        seeds = self.seeds()
        logits = svc.run(masks, seeds, desc="group LOO retrains")
        if "train" in logits:
            train_logits = logits["train"].double()  # (k+1, R, n, C)
        else:
            train_logits = torch.stack(
                [
                    torch.stack([_train_logits(svc, bundle, mask, s) for s in seeds])
                    for mask in masks
                ]
            )
        x_loss = per_example_loss(
            train_logits.reshape(-1, train_logits.shape[-1]),
            bundle.y_train.repeat(train_logits.shape[0] * train_logits.shape[1]),
        ).reshape(train_logits.shape[:-1])  # (k+1, R, n)
        k = task.grouping.k
        gid = task.grouping.group_ids
        onehot = torch.nn.functional.one_hot(gid, k).double()  # (n, k)
        group_loss = (x_loss @ onehot).mean(1)  # (k+1, k): L_{G_j} under each model
        own = group_loss[1:].diagonal()  # L_{G_j}(theta(D \ G_j))
        scores = (own - group_loss[0]).unsqueeze(1)
        return AttributionResult(
            scores=scores,
            timings={"self_attribution": time.perf_counter() - t0},
            info={"retrains": int(masks.shape[0] * self.repeats), "fallback_params": 0},
        )


def _train_logits(svc, bundle, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Train on the masked data with the service's recipe; logits on the train split."""
    idx = mask.nonzero().squeeze(1)
    net = train_lean(svc.recipe, bundle.x_train[idx], bundle.y_train[idx], bundle.num_classes, seed)
    with torch.no_grad():
        return net(bundle.x_train).double()
