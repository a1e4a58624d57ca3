"""Hessian-vector products of the training loss and damped inverse-HVP solvers.

The operator is the damped Hessian of the **mean** training loss at fixed parameters,

    A = H + lambda I,   H = (1/n) sum_i hess_theta l(z_i; theta),

so that ``lambda`` lives on the scale of a weight decay on the mean objective. Products
``H V`` for a block of r vectors are one batched ``jvp(grad)`` (forward-over-reverse, via
:mod:`torch.func`) per data chunk, summed over chunks: nothing n x p is ever held.

Solvers (all take a block B (r, p) of right-hand sides and return A^{-1} B row by row):

- ``explicit``: the dense p x p Hessian from p HVPs with the basis vectors, then one
  Cholesky (LU if A is indefinite) factorisation reused for every right-hand side.
- ``cg``: conjugate gradients, batched over the r right-hand sides, fixed iterations
  (stops early once every relative residual is below ``tol``). Needs A positive definite.
- ``lissa``: the Neumann recursion h_t = b + (I - A / s) h_{t-1}, A^{-1} b ~= h_T / s, with
  s above the largest eigenvalue of A (estimated by power iteration when not given);
  full-batch HVPs by default, seeded minibatch HVPs (the stochastic LiSSA of Agarwal et al.)
  when ``batch_size`` is set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ggda.errors import ConfigError, GGDAError

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SOLVERS = ("explicit", "cg", "lissa")


class TrainingHessian:
    """Products with the Hessian of the mean training loss w.r.t. selected parameters.

    Args:
        model: the net (eval mode); parameters not in ``params`` stay fixed.
        params: the parameters to differentiate (name -> tensor), e.g. from
            :func:`ggda.gradients.select_params`.
        x: (n, *input_shape) training inputs.
        y: (n,) labels.
        loss_fn: per-example loss ``(logits (B, C), y (B,)) -> (B,)``.
        chunk: data points per batched HVP.
        max_elems: rough bound on the tensor entries one batched HVP holds (vectors x
            (chunk x 256 + p)); larger blocks of vectors are split.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Fn,
        chunk: int = 1024,
        max_elems: int = 100_000_000,
    ) -> None:
        self.model = model
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        self.theta = torch.cat([params[k].reshape(-1) for k in self.names]).detach()
        self.p = self.theta.numel()
        self.device, self.dtype = self.theta.device, self.theta.dtype
        self.x, self.y = x, y
        self.n = int(y.shape[0])
        self.loss_fn = loss_fn
        self.chunk = max(1, int(chunk))
        self.max_elems = int(max_elems)
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}
        # the other parameters enter as constants (detached: no graph to the live module)
        self.fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
        self.num_hvps = 0

    def _unflat(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, self.sizes)
        return {k: t.reshape(s) for k, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def _loss(self, theta: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        prm = self.fixed | self._unflat(theta)
        logits = functional_call(self.model, (prm, self.buffers), (xb,))
        return self.loss_fn(logits, yb).sum()

    def _hvp_block(self, v: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """sum_{i in idx} hess l_i @ v_r for each row r of v (r, p)."""
        g = grad(self._loss)

        def one(vec: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return jvp(lambda t: g(t, xb, yb), (self.theta,), (vec,))[1]

        batched = vmap(one, in_dims=(0, None, None))
        out = torch.zeros_like(v)
        rows = idx if idx is not None else torch.arange(self.n)
        for s in range(0, rows.numel(), self.chunk):
            sel = rows[s : s + self.chunk]
            xb = self.x[sel].to(self.device)
            if xb.is_floating_point():  # token ids stay integers
                xb = xb.to(self.dtype)
            yb = self.y[sel].to(self.device)
            out += batched(v, xb, yb)
        return out

    def matvec(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """H v for a block of vectors.

        Args:
            v: (r, p) vectors.
            idx: optional (b,) subset of training points (minibatch Hessian); default all.

        Returns:
            (r, p): (1/|S|) sum_{i in S} hess l(z_i) v_r with S = idx or the training set.
        """
        v = v.to(self.device, self.dtype)
        count = self.n if idx is None else int(idx.numel())
        # vmap holds, per vector, the tangent (p) and the batched activations of a chunk
        # (about chunk x the layer widths; 256 is a rough width budget), not chunk x p.
        per = max(1, self.max_elems // (self.chunk * 256 + self.p))
        out = torch.cat([self._hvp_block(v[s : s + per], idx) for s in range(0, v.shape[0], per)])
        self.num_hvps += v.shape[0]
        return out / count

    def dense(self) -> torch.Tensor:
        """The whole (p, p) Hessian of the mean loss, symmetrised."""
        eye = torch.eye(self.p, device=self.device, dtype=self.dtype)
        h = self.matvec(eye)
        return (h + h.T) / 2


class InverseHVP:
    """Applies (H + damping I)^{-1} to blocks of vectors with the chosen solver.

    Args:
        hessian: the :class:`TrainingHessian`.
        solver: ``explicit`` | ``cg`` | ``lissa``.
        damping: lambda >= 0.
        iterations: CG or LiSSA iterations.
        tol: CG early-stop relative residual.
        lissa_scale: LiSSA's s (None: 1.1 x the power-iteration estimate of the top
            eigenvalue of H + damping I).
        lissa_batch: minibatch size of LiSSA's HVPs (None: full batch, deterministic).
        seed: LiSSA minibatch seed.
        max_explicit_params: refuse ``explicit`` above this many parameters.
    """

    def __init__(
        self,
        hessian: TrainingHessian,
        solver: str,
        damping: float,
        iterations: int = 100,
        tol: float = 1e-10,
        lissa_scale: float | None = None,
        lissa_batch: int | None = None,
        seed: int = 0,
        max_explicit_params: int = 20_000,
    ) -> None:
        self.h = hessian
        self.solver = solver
        self.damping = float(damping)
        self.iterations = int(iterations)
        self.tol = float(tol)
        self.lissa_batch = lissa_batch
        self.seed = int(seed)
        self.info: dict[str, float | int | str] = {}
        self._factor: tuple[str, torch.Tensor, torch.Tensor | None] | None = None
        self._scale = lissa_scale
        if solver == "explicit" and hessian.p > max_explicit_params:
            raise ConfigError(
                "method.solver",
                solver,
                f"`cg` or `lissa` for {hessian.p} parameters (explicit allows at most "
                f"method.max_explicit_params={max_explicit_params})",
                "Set `method.last_layer=true` (Hessian of the head only) or `method.solver=cg`.",
            )

    # -- explicit ---------------------------------------------------------------------------
    def _factorise(self) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        if self._factor is None:
            a = self.h.dense()
            a.diagonal().add_(self.damping)
            chol, bad = torch.linalg.cholesky_ex(a)
            if int(bad) == 0:
                self._factor = ("chol", chol, None)
                self.info["hessian_pd"] = 1
            else:  # indefinite (non-convex model, small damping): LU still inverts it
                lu, piv = torch.linalg.lu_factor(a)
                self._factor = ("lu", lu, piv)
                self.info["hessian_pd"] = 0
        return self._factor

    def _explicit(self, b: torch.Tensor) -> torch.Tensor:
        kind, f, piv = self._factorise()
        if kind == "chol":
            return torch.cholesky_solve(b.T, f).T
        return torch.linalg.lu_solve(f, piv, b.T).T

    # -- conjugate gradients ----------------------------------------------------------------
    def _op(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.h.matvec(v, idx) + self.damping * v

    def _cg(self, b: torch.Tensor) -> torch.Tensor:
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        rr = (r * r).sum(1)
        bb = rr.clone().clamp_min(1e-300)
        it = 0
        for it in range(1, self.iterations + 1):  # noqa: B007 (reported below)
            ad = self._op(d)
            dad = (d * ad).sum(1)
            if (dad <= 0).any():
                raise GGDAError(
                    "CG met a direction of non-positive curvature: H + damping I is not "
                    "positive definite at this checkpoint. Raise `method.damping` or use "
                    "`method.solver=explicit` (small models, handles indefinite matrices)."
                )
            alpha = rr / dad
            x += alpha[:, None] * d
            r -= alpha[:, None] * ad
            rr_new = (r * r).sum(1)
            if bool((rr_new / bb <= self.tol**2).all()):
                rr = rr_new
                break
            d = r + (rr_new / rr)[:, None] * d
            rr = rr_new
        self.info["cg_iterations"] = it
        self.info["cg_max_rel_residual"] = float((rr / bb).sqrt().max())
        return x

    # -- LiSSA ------------------------------------------------------------------------------
    def _top_eigenvalue(self, iters: int = 30) -> float:
        g = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, self.h.p, generator=g, dtype=torch.float64).to(
            self.h.device, self.h.dtype
        )
        lam = 0.0
        for _ in range(iters):
            w = self._op(v)
            lam = float(w.norm())
            v = w / max(lam, 1e-300)
        return lam

    def _lissa(self, b: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            self._scale = 1.1 * self._top_eigenvalue()
            self.info["lissa_scale"] = self._scale
        s = self._scale
        g = torch.Generator().manual_seed(self.seed)
        h = b.clone()
        for _ in range(self.iterations):
            idx = None
            if self.lissa_batch is not None:
                idx = torch.randint(0, self.h.n, (self.lissa_batch,), generator=g)
            h = b + h - self._op(h, idx) / s
            if not torch.isfinite(h).all():
                raise GGDAError(
                    "LiSSA diverged; set `method.lissa_scale` larger than the top "
                    "eigenvalue of H + damping I, or raise `method.damping`."
                )
        return h / s

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """(H + damping I)^{-1} b_r for each row: (r, p) -> (r, p)."""
        b = b.to(self.h.device, self.h.dtype)
        if b.shape[0] == 0:
            return b.clone()
        if self.solver == "explicit":
            return self._explicit(b)
        if self.solver == "cg":
            return self._cg(b)
        if self.solver == "lissa":
            return self._lissa(b)
        raise ConfigError("method.solver", self.solver, "one of " + ", ".join(SOLVERS))
