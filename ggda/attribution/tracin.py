"""TracIn (TracInCP) in group form.

    tau_{jq} = sum_t eta_t < grad f_q(theta_t), -grad L_{G_j}(theta_t) >

f is the query measurement oriented so that higher is better (-loss or margin), L_G the
summed training loss of group j. A step on G_j changes f_q by about eta_t times this inner
product, so a positive score means the group helps the query. Group scores are exactly
M^T times the per-sample scores, because the group gradient is the sum of member gradients.
"""

from __future__ import annotations

import time

import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Attributor, Checkpoint
from ggda.attribution.properties import query_gradients
from ggda.errors import ConfigError, GGDAError, check_choice, check_int
from ggda.gradients import (
    BACKENDS,
    PROJ_STRUCTURES,
    PROJ_TYPES,
    fallback_params,
    make_projector,
    num_params,
    per_sample_inner_products,
    select_params,
)
from ggda.models.functional import measurement_fn, per_example_loss


def pick_checkpoints(checkpoints: list[Checkpoint], which: str | list[int]) -> list[Checkpoint]:
    """``all``, ``last``, or a list of saved epochs."""
    if which == "all":
        return checkpoints
    if which == "last":
        return checkpoints[-1:]
    saved = {c.epoch: c for c in checkpoints}
    missing = [e for e in which if e not in saved]
    if missing:
        raise ConfigError(
            "method.checkpoints",
            which,
            f"`all`, `last` or a subset of the saved epochs {sorted(saved)}",
            "Save more epochs with `model.save_epochs`.",
        )
    return [saved[e] for e in which]


class TracIn(Attributor):
    """Group TracInCP over saved checkpoints.

    Args:
        checkpoints: ``all`` | ``last`` | list of saved epochs to sum over.
        proj_dim: random projection size (None: exact inner products).
        proj_type: ``rademacher`` | ``gaussian``.
        proj_seed: projection seed.
        proj_structure: ``dense`` (one (p, d) matrix, the reference) | ``kronecker``
            (per-layer P_out^T G P_in formed from the layer factors; no (p, d) matrix).
        last_layer: differentiate only the head's parameters.
        backend: ``factored`` (default: per-layer factorised inner products when there is
            no projection, else segment-summed layer gradients; ``vmap`` only for
            parameters no layer rule covers), ``vmap`` (batched autograd) or ``loop``
            (one backward per group, the reference).
        max_points: padded points per batched chunk.
        query_batch: property rows whose unprojected gradients (rows x p) are held at
            once on the materialised path; more rows take more passes over the data.
    """

    name = "tracin"

    def __init__(
        self,
        checkpoints: str | list[int] = "all",
        proj_dim: int | None = None,
        proj_type: str = "rademacher",
        proj_seed: int = 0,
        last_layer: bool = False,
        backend: str = "factored",
        max_points: int = 2048,
        proj_structure: str = "dense",
        query_batch: int = 1024,
    ) -> None:
        if isinstance(checkpoints, str):
            check_choice("method.checkpoints", checkpoints, ("all", "last"))
        else:
            checkpoints = [check_int("method.checkpoints[]", e, 1) for e in checkpoints]
        self.checkpoints = checkpoints
        self.proj_dim = None if proj_dim is None else check_int("method.proj_dim", proj_dim, 1)
        self.proj_type = check_choice("method.proj_type", proj_type, PROJ_TYPES)
        self.proj_seed = int(proj_seed)
        self.last_layer = bool(last_layer)
        self.backend = check_choice("method.backend", backend, BACKENDS)
        self.max_points = check_int("method.max_points", max_points, 1)
        self.proj_structure = check_choice("method.proj_structure", proj_structure, PROJ_STRUCTURES)
        self.query_batch = check_int("method.query_batch", query_batch, 1)

    def _ghost(self, net, params, q) -> bool:
        """Whether to use factorised inner products.

        True for backend ``factored`` with no projection and a measurement property
        (parameters without a layer rule go through vmap there).
        """
        return self.backend == "factored" and self.proj_dim is None and q.fn is None

    def _projector(self, net, params: dict[str, torch.Tensor]):
        if not self.proj_dim:
            return None
        return make_projector(
            self.proj_structure, net, params, self.proj_dim, self.proj_seed, self.proj_type
        )

    def _row_batches(self, q, p: int) -> list[tuple[int, int]]:
        """Property-row ranges whose unprojected (rows, p) gradients are held at once."""
        if self.proj_dim or q.m * p <= 64_000_000:
            return [(0, q.m)]
        step = max(1, min(self.query_batch, 64_000_000 // max(p, 1)))
        return [(s, min(q.m, s + step)) for s in range(0, q.m, step)]

    def _train_grads(self, task: AttributionTask, net, params, proj):
        return task.train_gradients(
            net, params=params, projector=proj, backend=self.backend, max_points=self.max_points
        )

    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Scores (k, m) for the task's grouping and property rows."""
        net = task.net.to(task.device).eval()
        k = task.grouping.k
        q = task.queries
        scores: torch.Tensor | None = None
        proj = None
        t_train = t_query = 0.0
        for ck in pick_checkpoints(task.checkpoints, self.checkpoints):
            net.load_state_dict(ck.state_dict)
            params = select_params(net, self.last_layer)
            proj = proj or self._projector(net, params)  # one P for all checkpoints
            t0 = time.perf_counter()
            if scores is None:
                scores = torch.zeros(
                    k, q.m, dtype=next(iter(params.values())).dtype, device=task.device
                )
            if self._ghost(net, params, q):
                # <grad f_q, grad l_i> per layer as (g.g')(a.a'): no gradient is materialised
                # and the cost is one pass over the data whatever k is.
                ip = per_sample_inner_products(
                    net,
                    task.x_train,
                    task.y_train,
                    per_example_loss,
                    q.x,
                    q.y,
                    measurement_fn(q.measurement),
                    params=params,
                    group_ids=task.grouping.group_ids,
                    k=k,
                ).detach()  # (k, N_q)
                rows = torch.zeros(q.x.shape[0], q.m, dtype=ip.dtype, device=ip.device)
                rows[torch.arange(q.x.shape[0]), q.row_ids.to(ip.device)] = 1.0
                scores -= ck.lr * (ip @ (rows * q.weight.to(ip)[None, :]))
                t1 = t0
            else:
                # grad of each property row (measurement sums/means or a user function),
                # in row batches when m x p would be large (one data pass per batch)
                spent = 0.0  # query-side time, the rest is the training pass
                for r0, r1 in self._row_batches(q, num_params(params)):
                    tq = time.perf_counter()
                    qg = query_gradients(
                        net,
                        q.rows(r0, r1),
                        params,
                        proj,
                        backend=self.backend,
                        max_points=self.max_points,
                    ).detach()  # detach: with last_layer the frozen body still requires grad
                    spent += time.perf_counter() - tq
                    for groups, g in self._train_grads(task, net, params, proj):
                        scores[groups.to(scores.device), r0:r1] -= ck.lr * (g @ qg.T)
                t1 = t0 + spent
            t_query += t1 - t0
            t_train += time.perf_counter() - t1
        if scores is None:
            raise GGDAError("TracIn needs at least one checkpoint")
        return AttributionResult(
            scores=scores,
            timings={"query_gradients": t_query, "group_gradients": t_train},
            info={
                "num_checkpoints": len(pick_checkpoints(task.checkpoints, self.checkpoints)),
                "fallback_params": fallback_params(net, params),
                **({"proj_dim_used": proj.d} if proj is not None else {}),
            },
        )

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """tau_jj = sum_t eta_t ||grad L_{G_j}(theta_t)||^2 (f = -loss on the group itself).

        Returns scores (k, 1). With a projection, the norm is of the projected gradient.
        """
        net = task.net.to(task.device).eval()
        k = task.grouping.k
        scores: torch.Tensor | None = None
        proj = None
        t0 = time.perf_counter()
        cks = pick_checkpoints(task.checkpoints, self.checkpoints)
        for ck in cks:
            net.load_state_dict(ck.state_dict)
            params = select_params(net, self.last_layer)
            proj = proj or self._projector(net, params)  # one P for all checkpoints
            for groups, g in self._train_grads(task, net, params, proj):
                if scores is None:
                    scores = g.new_zeros(k, 1)
                # <grad(-L_G), -grad L_G> = ||grad L_G||^2
                scores[groups.to(g.device), 0] += ck.lr * (g * g).sum(1)
        if scores is None:
            raise GGDAError("TracIn needs at least one checkpoint")
        return AttributionResult(
            scores=scores,
            timings={"self_attribution": time.perf_counter() - t0},
            info={"num_checkpoints": len(cks), "fallback_params": fallback_params(net, params)},
        )
