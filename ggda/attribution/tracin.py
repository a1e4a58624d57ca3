"""TracIn (TracInCP) in group form.

    tau_{jq} = sum_t eta_t < grad f_q(theta_t), -grad L_{G_j}(theta_t) >

f is the query measurement oriented so that higher is better (-loss or margin), L_G the
summed training loss of group j. A step on G_j changes f_q by about eta_t times this inner
product, so a positive score means the group helps the query. Group scores are exactly
M^T times the per-sample scores, because the group gradient is the sum of member gradients.
"""

from __future__ import annotations

import torch

from ggda.attribution.base import AttributionResult, AttributionTask
from ggda.attribution.loop import GradientAttributor, Step, pick_checkpoints
from ggda.errors import check_choice, check_int
from ggda.gradients import (
    BACKENDS,
    PROJ_STRUCTURES,
    PROJ_TYPES,
    fallback_params,
    num_params,
    per_sample_inner_products,
)
from ggda.models.functional import measurement_fn, per_example_loss

__all__ = ["TracIn", "pick_checkpoints"]


class TracIn(GradientAttributor):
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

    def _ghost(self, q) -> bool:
        """Whether to use factorised inner products.

        True for backend ``factored`` with no projection and a measurement property
        (parameters without a layer rule go through vmap there).
        """
        return self.backend == "factored" and self.proj_dim is None and q.fn is None

    # -- hooks of the shared loop (A = I, w_t = eta_t) ------------------------------------
    def checkpoint_weight(self, step: Step) -> float:
        """w_t = eta_t, the learning rate of the checkpoint's epoch."""
        return step.checkpoint.lr

    def query_batches(self, step: Step) -> list[tuple[int, int]]:
        """Property-row ranges whose unprojected (rows, p) gradients are held at once."""
        q = step.task.queries
        p = num_params(step.params)
        if self.proj_dim or q.m * p <= 64_000_000:
            return [(0, q.m)]
        step_rows = max(1, min(self.query_batch, 64_000_000 // max(p, 1)))
        return [(s, min(q.m, s + step_rows)) for s in range(0, q.m, step_rows)]

    def fused_scores(self, step: Step) -> torch.Tensor | None:
        """-eta_t <grad f_q, grad L_{G_j}> (k, m) by factorised inner products, or None.

        Per layer <grad f_q, grad l_i> = (g.g')(a.a') (or the cheaper materialised form):
        no gradient is materialised and the cost is one pass over the data whatever k is.
        """
        task, q = step.task, step.task.queries
        if not self._ghost(q):
            return None
        ip = per_sample_inner_products(
            step.net,
            task.x_train,
            task.y_train,
            per_example_loss,
            q.x,
            q.y,
            measurement_fn(q.measurement),
            params=step.params,
            group_ids=task.grouping.group_ids,
            k=task.grouping.k,
        ).detach()  # (k, N_q)
        rows = torch.zeros(q.x.shape[0], q.m, dtype=ip.dtype, device=ip.device)
        rows[torch.arange(q.x.shape[0]), q.row_ids.to(ip.device)] = 1.0
        return -(self.checkpoint_weight(step) * (ip @ (rows * q.weight.to(ip)[None, :])))

    def run_info(self, step: Step, models: int, count: int, self_mode: bool) -> dict:
        """Checkpoints summed, vmap-fallback parameters, the projection size used."""
        info = {
            "num_checkpoints": count,
            "fallback_params": fallback_params(step.net, step.params),
        }
        if not self_mode and step.projector is not None:
            info["proj_dim_used"] = step.projector.d
        return info

    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Scores (k, m) for the task's grouping and property rows."""
        return super().attribute(task)

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """tau_jj = sum_t eta_t ||grad L_{G_j}(theta_t)||^2 (f = -loss on the group itself).

        Returns scores (k, 1). With a projection, the norm is of the projected gradient.
        """
        return super().self_attribute(task)
