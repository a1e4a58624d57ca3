"""TRAK in group form.

For one model (one checkpoint), with P a seeded random projection (p, d) and F the margin
(logit of the label minus logsumexp of the others):

    phi(z)   = P^T grad F(z)                                   (d,)   train features
    phi_q    = P^T grad f_q                                    (d,)   property row q
    num_j    = sum_{i in G_j} (1 - p_i) phi(z_i) = -P^T grad L_{G_j}   (cross-entropy)
    tau_{jq} = phi_q^T (K + lambda I)^{-1} num_j

and the scores are averaged over an ensemble of independently trained models (and over the
chosen checkpoints of each). Over an ensemble TRAK weights the points once, after the
average (``q_average: ensemble``, the paper's formula): tau = [mean_t phi_q^t
(K_t + lambda I)^{-1} Phi_t^T] Qbar with Qbar_i = mean_t (1 - p_i^t), i.e. the numerator at
checkpoint t is num_j^t = sum_{i in G_j} Qbar_i phi_i^t; with one checkpoint the two lines
above are that formula. The ensemble's models can be trained on random subsets
(``member_fraction``, TRAK's recipe: 0.5) and the query side can use the margin
(``query_output: margin``) instead of the property's measurement. The kernel K (d, d) is

- ``points``: K = sum_i phi(z_i) phi(z_i)^T over all n training points (faithful; needs n
  projected per-sample gradients, streamed, never held), or
- ``groups``: K = sum_j phi_{G_j} phi_{G_j}^T / |G_j| with phi_{G_j} = P^T grad sum_{i in G_j}
  F(z_i), one batched backward per group (O(k)). Its error is the within-group scatter of
  the projected gradients; with singleton groups it equals ``points``.

The damping is relative, lambda = damping * trace(K) / d, so one value fits models and
kernels of any scale (a rank-deficient group kernel, k < d, needs damping > 0).
With ``kernel: points`` the numerator is formed from the per-sample features already in
hand (segment sum of (1 - p_i) phi_i), so group scores are exactly M^T per-sample scores;
singleton groups (k = n) take that one-pass path whatever the kernel setting.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Checkpoint
from ggda.attribution.loop import GradientAttributor, Step
from ggda.errors import GGDAError, check_choice, check_float, check_int
from ggda.gradients import (
    BACKENDS,
    PROJ_STRUCTURES,
    PROJ_TYPES,
    fallback_params,
    iter_group_gradients,
    iter_weighted_group_gradients,
)
from ggda.gradients.group import UncoveredParams
from ggda.models.functional import margin, per_example_loss

log = logging.getLogger(__name__)

KERNELS = ("points", "groups")
Q_AVERAGES = ("ensemble", "model")
QUERY_OUTPUTS = ("property", "margin")


def loss_weight(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-(1 - p_i): (B, C), (B,) -> (B,), with grad loss_i = -(1 - p_i) grad margin_i.

    For cross-entropy, margin = log p_y - log(1 - p_y) has d margin / d logits =
    (e_y - p) / (1 - p_y), and d loss / d logits = p - e_y.
    """
    return -(1 - torch.sigmoid(margin(logits, y)))


def damped_inverse_apply(kernel: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(K + lambda I)^{-1} rhs with lambda = damping * trace(K) / d, solved in float64.

    Damping means damping: with lambda > 0 every direction is kept and gets
    1 / (e_i + lambda) (float64 keeps K + lambda I well conditioned whatever the spread of
    K's spectrum). With lambda = 0 this is the pseudo-inverse: directions whose eigenvalue
    of K itself (judged before any damping) is below max|e| * d * eps(kernel dtype), the
    noise floor of a kernel accumulated in that precision, are numerically null and dropped.

    (An earlier version judged the cutoff after adding lambda and in float32, which turned
    damping into spectral truncation: on a 1,290-parameter head it zeroed 368 directions
    that the damping keeps well conditioned.)

    Args:
        kernel: (d, d) symmetric PSD.
        rhs: (d, r).
        damping: lambda relative to the mean eigenvalue trace(K) / d; 0 = pseudo-inverse.

    Returns:
        (d, r), in the dtype of ``rhs``.
    """
    d = kernel.shape[0]
    k64 = kernel.double()
    lam = damping * float(k64.diagonal().sum()) / d
    evals, evecs = torch.linalg.eigh((k64 + k64.T) / 2)
    if lam > 0:
        inv = 1.0 / (evals + lam)
    else:
        eps = torch.finfo(kernel.dtype).eps if kernel.dtype.is_floating_point else 0.0
        cutoff = evals.abs().max().clamp_min(1e-300) * d * eps
        inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    out = evecs @ (inv[:, None] * (evecs.T @ rhs.double()))
    return out.to(rhs.dtype)


class TRAK(GradientAttributor):
    """Group TRAK with a points or groups kernel, averaged over an ensemble.

    Args:
        proj_dim: d >= 1.
        proj_type: ``rademacher`` | ``gaussian``.
        proj_seed: seed of the projection (model e uses proj_seed + e).
        kernel: ``points`` | ``groups``.
        damping: relative damping >= 0 (lambda = damping * trace(K) / d).
        ensemble_size: number of models (the base model plus ensemble_size - 1 trained
            with seeds seed+1..; outside the pipeline only the base model is available).
        checkpoints: ``last`` | ``all`` | list of saved epochs, per model.
        last_layer: differentiate the head's parameters only.
        backend: ``factored`` | ``vmap`` | ``loop`` (see :mod:`ggda.gradients.group`).
        max_points: padded points per batched gradient chunk.
        proj_structure: ``dense`` (one seeded (p, d) matrix, generated once per model and
            held when it fits the projector's cache, the reference) | ``kronecker``
            (per-layer two-sided projections of the layer factors; the feature size is
            at most proj_dim, recorded as ``proj_dim_used``).
        q_average: where the loss weights Q = diag(1 - p_i) enter. ``ensemble`` (TRAK's
            formula): tau = [mean_t phi_q^t (K_t + lambda I)^{-1} Phi_t^T] Qbar with
            Qbar_i = mean_t (1 - p_i^t) over the ensemble's checkpoints t, so the group
            numerator is num_j^t = sum_{i in G_j} Qbar_i phi_i^t; ``model``: each
            checkpoint's own (1 - p_i^t) (num_j^t = -P^T grad L_{G_j} at t). The two agree
            for one checkpoint; on an ensemble of well-fitted models the per-checkpoint
            weights differ by orders of magnitude between members, and one member's
            scores dominate each point.
        query_output: the query side's output function. ``property``: the property's own
            measurement (phi_q = P^T grad f_q); ``margin``: TRAK's margin of each
            property example, whatever the property measures (per checkpoint this rescales
            a loss query's gradient by 1 / (1 - p_q^t), which weights the ensemble's
            members per query).
        member_fraction: fraction of the training set each ensemble model is trained on,
            in (0, 1]. 1: the base model plus ensemble_size - 1 full-data models of
            further seeds; < 1 (TRAK's recipe uses 0.5): ensemble_size models, each trained
            on its own seeded random subset of that fraction (the full-data base model is
            not one of them).
    """

    name = "trak"
    # the solve and the (k, d) x (d, m) product are both the kernel step
    timing_keys = {
        "prepare": "features",
        "query": "query_gradients",
        "precondition": "kernel_solve",
        "train": "kernel_solve",
    }

    def __init__(
        self,
        proj_dim: int = 512,
        proj_type: str = "rademacher",
        proj_seed: int = 0,
        kernel: str = "groups",
        damping: float = 0.01,
        ensemble_size: int = 1,
        checkpoints: str | list[int] = "last",
        last_layer: bool = False,
        backend: str = "factored",
        max_points: int = 2048,
        proj_structure: str = "dense",
        q_average: str = "ensemble",
        query_output: str = "property",
        member_fraction: float = 1.0,
    ) -> None:
        self.proj_dim = check_int("method.proj_dim", proj_dim, 1)
        self.proj_type = check_choice("method.proj_type", proj_type, PROJ_TYPES)
        self.proj_seed = int(proj_seed)
        self.kernel = check_choice("method.kernel", kernel, KERNELS)
        self.damping = check_float("method.damping", damping, 0.0)
        self.ensemble_size = check_int("method.ensemble_size", ensemble_size, 1)
        if isinstance(checkpoints, str):
            check_choice("method.checkpoints", checkpoints, ("all", "last"))
        else:
            checkpoints = [check_int("method.checkpoints[]", e, 1) for e in checkpoints]
        self.checkpoints = checkpoints
        self.last_layer = bool(last_layer)
        self.backend = check_choice("method.backend", backend, BACKENDS)
        self.max_points = check_int("method.max_points", max_points, 1)
        self.proj_structure = check_choice("method.proj_structure", proj_structure, PROJ_STRUCTURES)
        self.q_average = check_choice("method.q_average", q_average, Q_AVERAGES)
        self.query_output = check_choice("method.query_output", query_output, QUERY_OUTPUTS)
        self.member_fraction = check_float(
            "method.member_fraction", member_fraction, 0.0, 1.0, lo_open=True
        )
        # Qbar (n,) of the current run (q_average=ensemble), set by models()
        self._qbar: torch.Tensor | None = None

    # -- models ---------------------------------------------------------------------------
    def models(self, task: AttributionTask) -> list[list[Checkpoint]]:
        """Checkpoint lists of the ensemble (the base model first when it is one of them).

        With ``q_average=ensemble`` and more than one checkpoint this also sets Qbar (n,),
        the mean of 1 - p_i over every checkpoint the run will use (one forward pass over
        n per checkpoint).
        """
        if self.member_fraction < 1:
            if task.ensemble is None:
                raise GGDAError(
                    f"TRAK: method.member_fraction={self.member_fraction:g} trains the "
                    "ensemble's models on subsets, but this task cannot train models (no "
                    "pipeline); run it through run.py, give the AttributionTask an "
                    "`ensemble(count, fraction)` callable, or set method.member_fraction=1"
                )
            models = task.ensemble(self.ensemble_size, self.member_fraction)
        else:
            models = [task.checkpoints]
            extra = self.ensemble_size - 1
            if extra > 0:
                if task.ensemble is None:
                    log.warning(
                        "TRAK: ensemble_size=%d but this task cannot train ensemble members "
                        "(no pipeline); using the base model only",
                        self.ensemble_size,
                    )
                else:
                    models += task.ensemble(extra)
        # with one checkpoint Qbar is that checkpoint's own 1 - p: no extra forward pass
        several = sum(len(self.pick(cks)) for cks in models) > 1
        self._qbar = (
            self._mean_q(task, models) if self.q_average == "ensemble" and several else None
        )
        return models

    def _mean_q(self, task: AttributionTask, models: list[list[Checkpoint]]) -> torch.Tensor:
        """Qbar_i = mean over the run's checkpoints t of 1 - p_i^t: (n,), float64 sums."""
        net = task.net.to(task.device).eval()
        n = task.y_train.shape[0]
        total = torch.zeros(n, dtype=torch.float64, device=task.device)
        count = 0
        with torch.no_grad():
            for cks in models:
                for ck in self.pick(cks):
                    net.load_state_dict(ck.state_dict)
                    for s in range(0, n, self.max_points):
                        logits = net(task.x_train[s : s + self.max_points].to(task.device))
                        y = task.y_train[s : s + self.max_points].to(task.device)
                        total[s : s + self.max_points] += -loss_weight(logits, y).double()
                    count += 1
        return (total / max(count, 1)).to(next(net.parameters()).dtype)

    def features(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel K (d, d) and group numerators num (k, d) at one checkpoint.

        num_j = sum_{i in G_j} q_i phi_i with q_i = Qbar_i (``q_average=ensemble``) or this
        checkpoint's 1 - p_i (``model``, then num_j = -P^T grad L_{G_j}).
        ``points``: K = sum_i phi_i phi_i^T and num from one stream of per-sample margin
        features; ``groups``: K = sum_j phi_{G_j} phi_{G_j}^T / |G_j| from the group
        margin features and num from a weighted group gradient: on the factored path both
        from one capture pass (:func:`~ggda.gradients.iter_weighted_group_gradients`),
        else two streams.
        """
        net, task = step.net, step.task
        k = task.grouping.k
        gid = task.grouping.group_ids
        d = step.projector.d
        dtype = next(iter(step.params.values())).dtype
        device = next(iter(step.params.values())).device
        kern = torch.zeros(d, d, dtype=dtype, device=device)
        num = torch.zeros(k, d, dtype=dtype, device=device)
        n = task.y_train.shape[0]
        qbar = None if self._qbar is None else self._qbar.to(device=device, dtype=dtype)
        # With singleton groups the group kernel *is* the points kernel, and the points
        # path needs one gradient pass instead of two (margin and loss).
        if self.kernel == "points" or k == n:
            for idx, phi in step.gradients(margin, torch.arange(n), n):
                phi = phi.detach()
                kern += phi.T @ phi
                if qbar is not None:
                    q = qbar[idx.to(device)]
                else:
                    logits = net(task.x_train[idx].to(device))
                    q = 1 - torch.sigmoid(margin(logits, task.y_train[idx].to(device)))
                num.index_add_(0, gid[idx].to(device), q.detach().to(phi)[:, None] * phi)
            return kern, num
        sizes = task.grouping.sizes().to(device=device, dtype=dtype)
        # Point indices stand in for the labels so that a weight can be looked up per
        # point: fn(logits, i) = margin(logits, y_i) and the weight w_i = Qbar_i.
        ids, labels = torch.arange(n), task.y_train.to(device)

        def margin_of(logits: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return margin(logits, labels[i])

        def qbar_of(logits: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return qbar[i]

        def weighted_margin(logits: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return qbar[i] * margin(logits, labels[i])

        if self.backend == "factored":
            # One capture pass for both: with q_average=model, grad loss_i =
            # -(1 - p_i) grad margin_i gives num_j = -(the weighted gradient).
            if qbar is None:
                y, fn, weight_fn, sign = task.y_train, margin, loss_weight, -1.0
            else:
                y, fn, weight_fn, sign = ids, margin_of, qbar_of, 1.0
            pairs = iter_weighted_group_gradients(
                net,
                task.x_train,
                y,
                gid,
                k,
                fn,
                weight_fn,
                params=step.params,
                projector=step.projector,
                max_points=step.max_points,
            )
            try:
                for groups, phi, g in pairs:
                    rows = groups.to(device)
                    phi = phi.detach()
                    kern += phi.T @ (phi / sizes[rows][:, None])
                    num[rows] = sign * g.detach()
                return kern, num
            except UncoveredParams:
                pass  # a parameter without a layer rule, raised before the first chunk
        for groups, phi in step.gradients(margin, gid, k):
            phi = phi.detach()
            kern += phi.T @ (phi / sizes[groups.to(device)][:, None])
        if qbar is None:
            for groups, g in step.gradients(per_example_loss, gid, k):
                num[groups.to(device)] = -g.detach()
        else:
            for groups, g in iter_group_gradients(
                net,
                task.x_train,
                ids,
                gid,
                k,
                weighted_margin,
                params=step.params,
                projector=step.projector,
                backend=step.backend,
                max_points=step.max_points,
            ):
                num[groups.to(device)] = g.detach()
        return kern, num

    # -- hooks of the shared loop (A = K + lambda I, mean over the checkpoints) -----------
    def prepare(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The checkpoint's kernel K (d, d) and group numerators num (k, d)."""
        return self.features(step)

    def precondition(self, step: Step, qg: torch.Tensor) -> torch.Tensor:
        """(K + lambda I)^{-1} phi_q^T: (d, r) for query features phi_q (r, d)."""
        kern, _ = step.state
        return damped_inverse_apply(kern, qg.T.to(kern), self.damping)

    def held_scores(self, step: Step, u: torch.Tensor) -> torch.Tensor:
        """num_j^T (K + lambda I)^{-1} phi_q: (k, r) from the numerators in hand."""
        _, num = step.state
        return num @ u

    def self_held_scores(self, step: Step) -> torch.Tensor:
        """num_j^T (K + lambda I)^{-1} num_j: (k, 1)."""
        kern, num = step.state
        return (num * damped_inverse_apply(kern, num.T, self.damping).T).sum(1, keepdim=True)

    def finish(self, scores: torch.Tensor, count: int, self_mode: bool) -> torch.Tensor:
        """The mean over the ensemble's checkpoints."""
        return scores / count

    def run_info(self, step: Step, models: int, count: int, self_mode: bool) -> dict:
        """Ensemble size, checkpoints averaged, vmap-fallback parameters, feature size."""
        return {
            "ensemble_models": models,
            "num_checkpoints": count,
            "fallback_params": fallback_params(step.net, step.params),
            "proj_dim_used": step.projector.d,
        }

    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Scores (k, m), averaged over the ensemble's checkpoints."""
        if self.query_output == "margin" and task.queries.measurement != "margin":
            if task.queries.fn is not None:
                raise GGDAError(
                    "TRAK: method.query_output=margin needs a property of per-example "
                    "measurements, but this property defines its rows by a function; set "
                    "method.query_output=property"
                )
            task = dataclasses.replace(
                task, queries=dataclasses.replace(task.queries, measurement="margin")
            )
        return super().attribute(task)

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """tau_jj = num_j^T (K + lambda I)^{-1} num_j: scores (k, 1).

        The group's own property is -L_{G_j}, whose projected gradient is
        -P^T grad L_{G_j} = num_j, so the query feature is the group's numerator.
        """
        return super().self_attribute(task)
