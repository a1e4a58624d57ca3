"""TRAK in group form.

For one model (one checkpoint), with P a seeded random projection (p, d) and F the margin
(logit of the label minus logsumexp of the others):

    phi(z)   = P^T grad F(z)                                   (d,)   train features
    phi_q    = P^T grad f_q                                    (d,)   property row q
    num_j    = sum_{i in G_j} (1 - p_i) phi(z_i) = -P^T grad L_{G_j}   (cross-entropy)
    tau_{jq} = phi_q^T (K + lambda I)^{-1} num_j

and the scores are averaged over an ensemble of independently trained models (and over the
chosen checkpoints of each). The kernel K (d, d) is

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

import logging

import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Checkpoint
from ggda.attribution.loop import GradientAttributor, Step
from ggda.errors import check_choice, check_float, check_int
from ggda.gradients import (
    BACKENDS,
    PROJ_STRUCTURES,
    PROJ_TYPES,
    fallback_params,
    iter_weighted_group_gradients,
)
from ggda.gradients.group import UncoveredParams
from ggda.models.functional import margin, per_example_loss

log = logging.getLogger(__name__)

KERNELS = ("points", "groups")


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

    # -- models ---------------------------------------------------------------------------
    def models(self, task: AttributionTask) -> list[list[Checkpoint]]:
        """Checkpoint lists of the ensemble: the base model first."""
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
        return models

    def features(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel K (d, d) and group numerators num (k, d) at one checkpoint.

        ``points``: K = sum_i phi_i phi_i^T and num_j = sum_{i in G_j} (1 - p_i) phi_i from
        one stream of per-sample margin features; ``groups``: K = sum_j phi_{G_j}
        phi_{G_j}^T / |G_j| from the group margin features, num_j = -P^T grad L_{G_j} from
        the group loss gradients: on the factored path both from one capture pass
        (:func:`~ggda.gradients.iter_weighted_group_gradients`), else two streams.
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
        # With singleton groups the group kernel *is* the points kernel, and the points
        # path needs one gradient pass instead of two (margin and loss).
        if self.kernel == "points" or k == n:
            for idx, phi in step.gradients(margin, torch.arange(n), n):
                phi = phi.detach()
                kern += phi.T @ phi
                logits = net(task.x_train[idx].to(device))
                q = 1 - torch.sigmoid(margin(logits, task.y_train[idx].to(device)))
                num.index_add_(0, gid[idx].to(device), q.detach().to(phi)[:, None] * phi)
            return kern, num
        sizes = task.grouping.sizes().to(device=device, dtype=dtype)
        if self.backend == "factored":
            # One capture pass for both: grad loss_i = -(1 - p_i) grad margin_i.
            pairs = iter_weighted_group_gradients(
                net,
                task.x_train,
                task.y_train,
                gid,
                k,
                margin,
                loss_weight,
                params=step.params,
                projector=step.projector,
                max_points=step.max_points,
            )
            try:
                for groups, phi, g in pairs:
                    rows = groups.to(device)
                    phi = phi.detach()
                    kern += phi.T @ (phi / sizes[rows][:, None])
                    num[rows] = -g.detach()
                return kern, num
            except UncoveredParams:
                pass  # a parameter without a layer rule, raised before the first chunk
        for groups, phi in step.gradients(margin, gid, k):
            phi = phi.detach()
            kern += phi.T @ (phi / sizes[groups.to(device)][:, None])
        for groups, g in step.gradients(per_example_loss, gid, k):
            num[groups.to(device)] = -g.detach()
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
        return super().attribute(task)

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """tau_jj = num_j^T (K + lambda I)^{-1} num_j: scores (k, 1).

        The group's own property is -L_{G_j}, whose projected gradient is
        -P^T grad L_{G_j} = num_j, so the query feature is the group's numerator.
        """
        return super().self_attribute(task)
