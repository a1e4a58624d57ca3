r"""Influence Functions in group form.

At the final checkpoint theta*, with H the Hessian of the **mean** training loss
(1/n) sum_i l(z_i; theta) and lambda the damping,

    tau_{jq} = (1/n) grad f_q(theta*)^T (H + lambda I)^{-1} (-grad L_{G_j}(theta*)),

f_q the property row (-loss or margin, or a user function), L_G the summed loss of group
j. Up-weighting G_j by eps moves theta* by -eps (H_sum)^{-1} grad L_G with H_sum = n H, so
tau is the first-order change of f_q from *adding* the group to the data (equivalently
f(theta*(D)) - f(theta*(D \ G_j))): positive = the group helps, on the scale of a
leave-group-out retraining. lambda is on the scale of a weight decay on the mean loss.

The inverse-HVP is applied once per property row, u_q = (H + lambda I)^{-1} grad f_q
(m solves, never k), then every group costs one summed gradient and a dot product; group
scores are exactly M^T times the per-sample scores.

Solvers ``kfac`` and ``ekfac`` replace H by the K-FAC / EK-FAC approximation of the
Gauss-Newton matrix of the mean loss (:mod:`ggda.attribution.kfac`), on all parameters of
any shipped net: each query gradient is preconditioned once, layer by layer in the Kronecker
eigenbasis (m applications, never k or n), then every group is one summed gradient
(streamed in chunks, k x p never held) dotted with the preconditioned queries; self-influence
is k preconditioned quadratic forms. The factors are an artifact: with a cache directory in
the task they are stored under ``<cache_dir>/factors/<key>.pt``, keyed by the checkpoint,
the training data, the selected parameters, the Fisher type, the sampling seed and the
solver, and reused across groupings, k, damping and sweep jobs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ggda.attribution.base import AttributionResult, AttributionTask, Checkpoint
from ggda.attribution.hessian import SOLVERS, InverseHVP, TrainingHessian
from ggda.attribution.kfac import DAMPING_MODES, FISHERS, FactorFitter, KroneckerFactors
from ggda.attribution.loop import GradientAttributor, Step
from ggda.errors import GGDAError, check_choice, check_float, check_int
from ggda.gradients import BACKENDS, fallback_params
from ggda.io import load_or_none, save_artifact, stable_hash, tensor_hash
from ggda.models.functional import per_example_loss

log = logging.getLogger(__name__)

KFAC_SOLVERS = ("kfac", "ekfac")
ALL_SOLVERS = (*SOLVERS, *KFAC_SOLVERS)
# Bumped when the factor computation changes what a cached factor file holds.
FACTORS_VERSION = 1


class InfluenceFunction(GradientAttributor):
    """Group influence functions at the final checkpoint.

    Args:
        solver: ``explicit`` (dense damped Hessian; up to ``max_explicit_params``),
            ``cg`` (conjugate gradients on HVPs), ``lissa``, ``kfac`` or ``ekfac``
            (Kronecker-factored Gauss-Newton, see :mod:`ggda.attribution.kfac`).
        damping: lambda >= 0 added to the Hessian of the mean training loss (kfac/ekfac
            with ``damping_mode=relative``: the factor on each block's mean eigenvalue).
        iterations: CG / LiSSA iterations.
        tol: CG relative-residual early stop.
        lissa_scale: LiSSA scale s (> top eigenvalue of H + lambda I); None = estimated.
        lissa_batch: LiSSA minibatch size (None = full-batch HVPs, deterministic).
        last_layer: differentiate (and take the Hessian of) the head's parameters only.
        hvp_chunk: training points per batched HVP.
        max_explicit_params: the explicit solver's parameter limit.
        seed: LiSSA seed.
        backend: ``vmap`` | ``factored`` | ``loop`` for the gradients (see gradients.py).
        max_points: padded points per batched gradient chunk.
        fisher: kfac/ekfac: ``true`` (labels sampled from the model, seeded by ``seed``),
            ``empirical`` (the training labels) or ``exact`` (expectation over labels,
            C backward passes per chunk).
        damping_mode: kfac/ekfac: ``absolute`` | ``relative``.
        factor_chunk: kfac/ekfac: training points per streamed factor chunk.
        max_factor_dim: kfac/ekfac: largest dense Kronecker factor side (in+1 or out).
    """

    name = "influence"

    def __init__(
        self,
        solver: str = "explicit",
        damping: float = 0.001,
        iterations: int = 100,
        tol: float = 1e-8,
        lissa_scale: float | None = None,
        lissa_batch: int | None = None,
        last_layer: bool = True,
        hvp_chunk: int = 1024,
        max_explicit_params: int = 20_000,
        seed: int = 0,
        backend: str = "factored",
        max_points: int = 2048,
        fisher: str = "true",
        damping_mode: str = "absolute",
        factor_chunk: int = 256,
        max_factor_dim: int = 8192,
    ) -> None:
        self.solver = check_choice("method.solver", solver, ALL_SOLVERS)
        self.damping = check_float("method.damping", damping, 0.0)
        self.iterations = check_int("method.iterations", iterations, 1)
        self.tol = check_float("method.tol", tol, 0.0)
        self.lissa_scale = (
            None
            if lissa_scale is None
            else check_float("method.lissa_scale", lissa_scale, 0.0, lo_open=True)
        )
        self.lissa_batch = (
            None if lissa_batch is None else check_int("method.lissa_batch", lissa_batch, 1)
        )
        self.last_layer = bool(last_layer)
        self.hvp_chunk = check_int("method.hvp_chunk", hvp_chunk, 1)
        self.max_explicit_params = check_int("method.max_explicit_params", max_explicit_params, 1)
        self.seed = int(seed)
        self.backend = check_choice("method.backend", backend, BACKENDS)
        self.max_points = check_int("method.max_points", max_points, 1)
        # `method.fisher=true` on the command line arrives as a YAML boolean
        self.fisher = check_choice("method.fisher", "true" if fisher is True else fisher, FISHERS)
        self.damping_mode = check_choice("method.damping_mode", damping_mode, DAMPING_MODES)
        self.factor_chunk = check_int("method.factor_chunk", factor_chunk, 1)
        self.max_factor_dim = check_int("method.max_factor_dim", max_factor_dim, 1)

    # -- hooks of the shared loop (A = n (H + lambda I) at the final checkpoint) -----------
    @property
    def kfac(self) -> bool:
        """Whether the solver is the Kronecker-factored approximation (kfac / ekfac)."""
        return self.solver in KFAC_SOLVERS

    @property
    def symmetric_preconditioner(self) -> bool:  # type: ignore[override]
        """Whether the train side may be preconditioned instead of the queries.

        The damped Hessian is symmetric, but only a solver that is linear in its
        right-hand side gives the same scores either way: the explicit inverse and the
        (EK-)FAC ones, not a fixed number of CG steps (CG's iterates depend non-linearly on
        the right-hand side), nor LiSSA's (kept on the query side for one convention).
        """
        return self.solver in ("explicit", *KFAC_SOLVERS)

    @property
    def timing_keys(self) -> dict[str, str]:  # type: ignore[override]
        """The factors (kfac/ekfac) or the Hessian operator's setup, then the usual phases."""
        return {
            "prepare": "factors" if self.kfac else "inverse_hvp",
            "query": "query_gradients",
            "precondition": "inverse_hvp",
            "train": "group_gradients",
        }

    @property
    def self_timing_keys(self) -> dict[str, str]:  # type: ignore[override]
        """kfac/ekfac report the factors apart; everything else is ``self_attribution``."""
        return {"prepare": "factors"} if self.kfac else {}

    def pick(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        """The final checkpoint theta*."""
        if not checkpoints:
            raise GGDAError("influence functions need the final checkpoint; none given")
        return checkpoints[-1:]

    def prepare(self, step: Step) -> InverseHVP | tuple[KroneckerFactors, bool]:
        """The damped inverse-HVP operator, or the (EK-)FAC factors and whether cached."""
        if self.kfac:
            fac, _, cached = self.factors(step.task, step.net, step.params)
            return fac, cached
        task = step.task
        hess = TrainingHessian(
            step.net,
            step.params,
            task.x_train,
            task.y_train,
            per_example_loss,
            chunk=self.hvp_chunk,
        )
        return InverseHVP(
            hess,
            self.solver,
            self.damping,
            self.iterations,
            self.tol,
            self.lissa_scale,
            self.lissa_batch,
            self.seed,
            self.max_explicit_params,
        )

    def _inverse(self, step: Step, v: torch.Tensor) -> torch.Tensor:
        """(H + lambda I)^{-1} v (or its K-FAC approximation) for rows v (r, p)."""
        if self.kfac:
            return self._precondition(step.state[0], v)
        return step.state.solve(v)

    def precondition(self, step: Step, qg: torch.Tensor) -> torch.Tensor:
        """u_q = (1/n) (H + lambda I)^{-1} grad f_q: (r, p), min(k, m) solves in all.

        The damped Hessian (and its K-FAC forms) is symmetric, so with fewer groups than
        queries the loop applies this to the group gradients instead
        (:meth:`~ggda.attribution.loop.GradientAttributor.train_side_preconditioned`).
        """
        return self._inverse(step, qg) / step.task.y_train.shape[0]

    def self_train_scores(self, step: Step, g: torch.Tensor) -> torch.Tensor:
        """(1/n) g_j^T (H + lambda I)^{-1} g_j: (c,), one solve per group of the chunk."""
        n = step.task.y_train.shape[0]
        u = self._inverse(step, g)
        return (g * u.to(g)).sum(1) / n

    def run_info(self, step: Step, models: int, count: int, self_mode: bool) -> dict:
        """Parameters, HVPs and the solver's diagnostics (kfac: the factors' layout)."""
        if self.kfac:
            return self._kfac_info(*step.state)
        ihvp = step.state
        return {
            "num_params": ihvp.h.p,
            **({} if self_mode else {"num_hvps": ihvp.h.num_hvps}),
            "fallback_params": fallback_params(step.net, step.params),
            **ihvp.info,
        }

    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Scores (k, m) for the task's grouping and property rows."""
        return super().attribute(task)

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """tau_jj = (1/n) grad L_{G_j}^T (H + lambda I)^{-1} grad L_{G_j}: scores (k, 1).

        The group's own property is -L_{G_j}; its gradient is -grad L_{G_j}, so the
        influence of G_j on it is (1/n) <-g_j, (H + lambda I)^{-1} (-g_j)>. One solve per
        group (unavoidable: each group is its own query); the explicit solver factorises
        once, kfac/ekfac precondition layer by layer.
        """
        return super().self_attribute(task)

    # -- K-FAC / EK-FAC ---------------------------------------------------------------------
    def factor_meta(self, task: AttributionTask, params: dict) -> dict:
        """What decides the factors (their cache key): checkpoint, data, params, labels."""
        state = {k: tensor_hash(v) for k, v in task.checkpoints[-1].state_dict.items()}
        return {
            "version": FACTORS_VERSION,
            "state": stable_hash(state),
            "data": [tensor_hash(task.x_train), tensor_hash(task.y_train)],
            "params": list(params),
            "dtype": str(next(iter(params.values())).dtype),
            "fisher": self.fisher,
            "seed": self.seed if self.fisher == "true" else None,
            "solver": self.solver,
        }

    def factors(
        self, task: AttributionTask, net: torch.nn.Module, params: dict
    ) -> tuple[KroneckerFactors, float, bool]:
        """The (EK-)FAC factors, from ``<cache_dir>/factors`` or fitted (then stored).

        Returns:
            (factors on the params' device, seconds spent here, whether they were cached).
        """
        t0 = time.perf_counter()
        cache = getattr(task, "cache_dir", None)
        path = meta = None
        if cache is not None:
            meta = self.factor_meta(task, params)
            path = Path(cache) / "factors" / f"{stable_hash(meta)}.pt"
            st = load_or_none(path, meta, what="K-FAC factors")
            if st is not None:
                log.info("Reusing cached K-FAC factors %s", path.name)
                dev = next(iter(params.values())).device
                return KroneckerFactors.from_state(st, dev), time.perf_counter() - t0, True
        fitter = FactorFitter(
            net,
            params,
            task.x_train,
            task.y_train,
            fisher=self.fisher,
            seed=self.seed,
            chunk=self.factor_chunk,
            max_factor_dim=self.max_factor_dim,
            loss_fn=per_example_loss,
        )
        fac = fitter.fit(ekfac=self.solver == "ekfac")
        if path is not None:
            save_artifact(path, fac.state(), meta)
        return fac, time.perf_counter() - t0, False

    def _kfac_info(self, fac: KroneckerFactors, cached: bool) -> dict:
        return {
            "num_params": sum(int(torch.tensor(s).prod()) for s in fac.shapes),
            "factors_cached": int(cached),
            "kfac_layers": len(fac.blocks),
            "diag_params": sum(v.numel() for v in fac.diag.values()),
            **{f"{k}_s": v for k, v in fac.seconds.items()},
        }

    def _precondition(self, fac: KroneckerFactors, v: torch.Tensor) -> torch.Tensor:
        return fac.precondition(v, self.damping, self.damping_mode, self.solver == "ekfac")
