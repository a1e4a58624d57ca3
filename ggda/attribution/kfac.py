"""K-FAC and EK-FAC approximations of the Gauss-Newton matrix of the mean training loss.

Per layer with weight W (out, in) (conv: ``weight.reshape(C_out, -1)``; a selected bias is
an extra input column, a~ = [a, 1]), the block of the Gauss-Newton matrix of the **mean**
loss (1/n) sum_i l(z_i) is approximated, in the row-major vectorisation of [W, b], by

    G_layer ~= S (x) A,   A = (1/n) sum_i sum_t a~_it a~_it^T,
                          S = (1/(n T)) sum_i sum_t g_it g_it^T,

with a_it the layer input and g_it the gradient of the loss w.r.t. the layer output at
position t of point i (T = 1 for plain rows; tokens or conv positions otherwise). Summing A
and averaging S over positions is the KFC convention of Grosse & Martens (2016) for
convolutions (spatially homogeneous, uncorrelated output gradients: sum_t E[a a^T] (x)
E[g g^T] = T Omega (x) Gamma), the "expand" setting of Eschenhagen et al. (2023) for tokens.
Embedding (V, D): weight gradient sum_t onehot(x_t) g_t^T, so A = diag(token counts) / n
is diagonal, S = sum g g^T / (number of non-padding tokens), and the block is A (x) S.

Which gradients g enter S (``fisher``):

- ``true``: labels sampled from the model's predictive distribution softmax(logits), one
  per point by inverse-CDF with seeded uniforms (independent of chunking and device), so
  S estimates the Fisher = Gauss-Newton of the cross-entropy (the pipeline's loss);
- ``empirical``: the true training labels (the empirical Fisher);
- ``exact``: the expectation over labels in closed form, E_y[g g^T] = J^T Lambda J with
  Lambda the Hessian of the loss w.r.t. the logits (any loss), through its square root
  L L^T = Lambda: C backward passes per chunk instead of one (the exact Gauss-Newton
  factor; for a squared loss on one linear layer K-FAC then *is* the Gauss-Newton matrix).

Eigendecompositions A = Q_A diag(l_A) Q_A^T and S = Q_S diag(l_S) Q_S^T give the K-FAC
inverse (G + lambda I)^{-1} v = Q_S [(Q_S^T V Q_A) / (l_S l_A^T + lambda)] Q_A^T for
V the (out, in~) matrix of v. EK-FAC (George et al. 2018) refits the eigenvalues in the
Kronecker eigenbasis from a second pass, Lambda[o, j] = (1/n) sum_i (Q_S^T G_i Q_A)[o, j]^2
with G_i point i's weight gradient (summed over positions), and divides by Lambda + lambda.

Parameters no Kronecker rule covers (norm affine parameters; anything the factor capture
reports as uncovered) get a **diagonal Fisher** preconditioner (1/n) sum_i g_i^2 + lambda,
with g_i the per-example gradient under the same labels (sampled, true or the exact
expectation) as the Kronecker factors.

Damping: ``absolute`` adds lambda; ``relative`` adds lambda x the mean eigenvalue of the
block (per layer, per diagonal parameter), as in Grosse et al. (2023).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from ggda.errors import ConfigError, GGDAError
from ggda.gradients.layers import capture_factors, token_segments
from ggda.models.functional import per_example_loss

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FISHERS = ("true", "empirical", "exact")
DAMPING_MODES = ("absolute", "relative")
# Entries of one per-example gradient block (chunk x out x in) formed at once by the EK-FAC
# eigenvalue fit when a layer has several positions.
_EK_ELEMS = 16_000_000


@dataclass
class Block:
    """One layer's factors.

    Attributes:
        name: module name; kind: ``linear`` | ``conv2d`` | ``embedding``.
        weight, bias: parameter names (None when not selected).
        out_dim: rows of the layer matrix (linear/conv: out; embedding: V).
        in_dim: columns (linear/conv: in (+1 with bias); embedding: D).
        qa, la: eigenvectors (in~, in~) and eigenvalues (in~,) of A (embedding: qa None,
            la = token counts / n, (V,)).
        qs, ls: eigenvectors (out, out) and eigenvalues (out,) of S (embedding: (D, D)).
        ev: EK-FAC eigenvalues in the Kronecker basis, (out_dim, in_dim), or None.
    """

    name: str
    kind: str
    weight: str | None
    bias: str | None
    out_dim: int
    in_dim: int
    qa: torch.Tensor | None = None
    la: torch.Tensor | None = None
    qs: torch.Tensor | None = None
    ls: torch.Tensor | None = None
    ev: torch.Tensor | None = None

    def eigenvalues(self, ekfac: bool) -> torch.Tensor:
        """(out_dim, in_dim) eigenvalues of the block in its Kronecker eigenbasis."""
        if ekfac:
            if self.ev is None:
                raise GGDAError(f"layer {self.name}: no EK-FAC eigenvalues were fitted")
            return self.ev
        if self.kind == "embedding":
            return self.la[:, None] * self.ls[None, :]
        return self.ls[:, None] * self.la[None, :]


@dataclass
class KroneckerFactors:
    """Kronecker factors of every covered layer plus the diagonal of the rest.

    Attributes:
        names, shapes: the selected parameters in order (the flat layout of gradients).
        blocks: the layers' factors.
        diag: parameter name -> (1/n) sum_i g_i^2 (parameter shape) for uncovered params.
        n: training points; fisher: the label mode; ekfac: whether ``ev`` was fitted.
        seconds: time the factors took to compute.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    blocks: list[Block]
    diag: dict[str, torch.Tensor]
    n: int
    fisher: str
    ekfac: bool
    seconds: dict[str, float] = field(default_factory=dict)

    # -- storage --------------------------------------------------------------------------
    def state(self) -> dict:
        """A torch.save-able dict of CPU tensors."""
        cpu = {k: v.cpu() for k, v in self.diag.items()}
        blocks = [
            {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(b).items()}
            for b in self.blocks
        ]
        return {
            "names": self.names,
            "shapes": [list(s) for s in self.shapes],
            "blocks": blocks,
            "diag": cpu,
            "n": self.n,
            "fisher": self.fisher,
            "ekfac": self.ekfac,
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, st: dict, device: torch.device | str = "cpu") -> KroneckerFactors:
        """Rebuild the factors from :meth:`state` (the inverse of that method).

        Args:
            st: the dict :meth:`state` returned (e.g. read back with ``torch.load``).
            device: where to put the factor tensors.

        Returns:
            The factors, with every tensor on ``device``.
        """

        def mv(v):
            return v.to(device) if isinstance(v, torch.Tensor) else v

        blocks = [Block(**{k: mv(v) for k, v in b.items()}) for b in st["blocks"]]
        return cls(
            list(st["names"]),
            [tuple(s) for s in st["shapes"]],
            blocks,
            {k: v.to(device) for k, v in st["diag"].items()},
            int(st["n"]),
            st["fisher"],
            bool(st["ekfac"]),
            dict(st.get("seconds", {})),
        )

    # -- application ----------------------------------------------------------------------
    def precondition(
        self, v: torch.Tensor, damping: float, mode: str = "absolute", ekfac: bool = False
    ) -> torch.Tensor:
        """(G~ + lambda I)^{-1} v_r for each row: (r, p) -> (r, p), layer by layer.

        Args:
            v: (r, p) vectors in the flat layout of ``names`` (as gradients are laid out).
            damping: lambda (absolute) or its factor on the block's mean eigenvalue.
            mode: ``absolute`` | ``relative``.
            ekfac: divide by the EK-FAC eigenvalues instead of l_S l_A^T.
        """
        r = v.shape[0]
        sizes = [math.prod(s) for s in self.shapes]
        if v.shape[1] != sum(sizes):
            raise GGDAError(f"vectors have {v.shape[1]} entries, the factors {sum(sizes)}")
        dev = self.blocks[0].ls.device if self.blocks else v.device
        # The factors are fitted and eigendecomposed in float64; applying them (orthogonal
        # rotations and a division) in the vectors' own dtype keeps float32 precision and
        # halves the cost (on the text net it was 85 % of IF's time at m = 400).
        dt = v.dtype
        parts = dict(zip(self.names, torch.split(v.to(dev), sizes, 1), strict=True))
        out: dict[str, torch.Tensor] = {}
        for b in self.blocks:
            lam = self._lambda(b.eigenvalues(ekfac), damping, mode)
            ev = (b.eigenvalues(ekfac) + lam).to(dt)
            qs = b.qs.to(dt)
            if b.kind == "embedding":  # (r, V, D); Q_A = I
                m = parts[b.weight].reshape(r, b.out_dim, b.in_dim)
                out[b.weight] = ((m @ qs) / ev) @ qs.T
                continue
            qa = b.qa.to(dt)
            cols = []
            if b.weight is not None:
                cols.append(parts[b.weight].reshape(r, b.out_dim, -1))
            if b.bias is not None:
                cols.append(parts[b.bias].reshape(r, b.out_dim, 1))
            m = torch.cat(cols, 2)  # (r, out, in~)
            m = qs @ ((qs.T @ m @ qa) / ev) @ qa.T
            if b.weight is not None:
                w_in = b.in_dim - (b.bias is not None)
                out[b.weight] = m[:, :, :w_in]
            if b.bias is not None:
                out[b.bias] = m[:, :, -1]
        for name, d in self.diag.items():
            dd = d.reshape(1, -1)
            out[name] = parts[name] / (dd + self._lambda(dd, damping, mode)).to(dt)
        missing = [k for k in self.names if k not in out]
        if missing:
            raise GGDAError(f"no preconditioner for parameters {missing}")
        res = torch.cat([out[k].reshape(r, -1) for k in self.names], 1)
        return res.to(v.device, v.dtype)

    @staticmethod
    def _lambda(ev: torch.Tensor, damping: float, mode: str) -> float:
        if mode == "relative":
            return damping * float(ev.mean())
        return damping


# -- fitting ------------------------------------------------------------------------------


def _chunks(n: int, chunk: int) -> Iterator[torch.Tensor]:
    for s in range(0, n, chunk):
        yield torch.arange(s, min(n, s + chunk))


@dataclass
class _Column:
    """One backward of a chunk: the loss under ``y`` (labels), or <logits, t> (exact)."""

    y: torch.Tensor  # (B,) long labels, or (B, C) weights of the logits
    exact: bool

    def fn(self, loss_fn: Fn) -> Fn:
        if not self.exact:
            return loss_fn
        t = self.y

        def lin(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return (logits * t[idx]).sum(-1)

        return lin

    def capture_y(self) -> torch.Tensor:
        return torch.arange(self.y.shape[0], device=self.y.device) if self.exact else self.y


class FactorFitter:
    """Streams the training set once (twice for EK-FAC) to build :class:`KroneckerFactors`.

    Args:
        model: the net in eval mode with the final weights loaded.
        params: the parameters to precondition (``select_params``), the model's own.
        x, y: (n, ...) and (n,) training data (moved to the device chunk by chunk).
        fisher: ``true`` | ``empirical`` | ``exact`` (see the module docstring).
        seed: seed of the label sampling (``true``).
        chunk: points per streamed chunk.
        max_factor_dim: refuse a dense factor larger than this (in~ or out).
        loss_fn: per-example loss (B, C), (B,) -> (B,); ``true`` assumes cross-entropy.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        fisher: str = "true",
        seed: int = 0,
        chunk: int = 256,
        max_factor_dim: int = 8192,
        loss_fn: Fn = per_example_loss,
    ) -> None:
        self.model, self.params = model, params
        self.x, self.y = x, y
        self.n = int(y.shape[0])
        self.fisher, self.seed, self.chunk = fisher, int(seed), int(chunk)
        self.max_factor_dim = int(max_factor_dim)
        self.loss_fn = loss_fn
        p0 = next(iter(params.values()))
        self.device, self.dtype = p0.device, p0.dtype
        g = torch.Generator().manual_seed(self.seed)
        self.uniforms = torch.rand(self.n, generator=g, dtype=torch.float64)

    # -- labels ---------------------------------------------------------------------------
    def _columns(self, idx: torch.Tensor, xb: torch.Tensor) -> list[_Column]:
        yb = self.y[idx].to(self.device)
        if self.fisher == "empirical":
            return [_Column(yb, False)]
        with torch.no_grad():
            logits = self.model(xb).detach()
        if self.fisher == "true":
            cdf = torch.softmax(logits.double(), -1).cumsum(-1)
            u = self.uniforms[idx].to(self.device)[:, None]
            lab = (cdf < u).sum(-1).clamp_max(logits.shape[-1] - 1)
            return [_Column(lab, False)]
        # exact: Lambda_i = hess of the loss w.r.t. the logits; columns of its square root
        loss = self.loss_fn

        def one(lg: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return loss(lg[None], yy[None])[0]

        lam = vmap(hessian(one))(logits, yb)  # (B, C, C)
        w, v = torch.linalg.eigh((lam + lam.transpose(1, 2)) / 2)
        root = v * w.clamp_min(0).sqrt()[:, None, :]  # L with L L^T = Lambda
        return [_Column(root[:, :, c].to(logits.dtype), True) for c in range(root.shape[-1])]

    def _xb(self, idx: torch.Tensor) -> torch.Tensor:
        xb = self.x[idx].to(self.device)
        return xb.to(self.dtype) if xb.is_floating_point() else xb

    # -- pass 1 ---------------------------------------------------------------------------
    def _check(self, lf) -> None:
        if lf.kind == "norm":
            return
        w_in = lf.a.shape[-1] if lf.kind != "embedding" else None
        dims = (
            {"out": lf.g.shape[-1]}
            if lf.kind == "embedding"
            else {"in": w_in + (lf.bias is not None), "out": lf.g.shape[-1]}
        )
        for side, d in dims.items():
            if d > self.max_factor_dim:
                raise ConfigError(
                    "method.max_factor_dim",
                    self.max_factor_dim,
                    f"at least {d} for layer `{lf.name}` ({lf.kind}, dense {side} factor "
                    f"{d} x {d})",
                    "Precondition fewer layers with `method.last_layer=true`, or raise "
                    f"`method.max_factor_dim` to {d} if {d}^2 floats fit in memory.",
                )

    @staticmethod
    def _tilde(lf) -> torch.Tensor:
        """(N, T, in~): inputs with a ones column when the bias is selected."""
        cols = []
        if lf.weight is not None:
            cols.append(lf.a)
        if lf.bias is not None:
            cols.append(torch.ones_like(lf.a[..., :1]))
        return torch.cat(cols, -1)

    def _uncovered_sq(self, names: list[str], xb: torch.Tensor, col: _Column) -> dict:
        """sum_i (per-example gradient)^2 of the uncovered params under one column."""
        live = dict(self.model.named_parameters())
        fixed = {k: v.detach() for k, v in live.items() if k not in names}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        sel = {k: self.params[k].detach() for k in names}
        loss = self.loss_fn

        def h(prm, xi, ti):
            logits = functional_call(self.model, (fixed | prm, buffers), (xi[None],))
            if col.exact:
                return (logits * ti).sum()
            return loss(logits, ti[None]).sum()

        gs = vmap(grad(h), in_dims=(None, 0, 0))(sel, xb, col.y)
        return {k: (v.double() ** 2).sum(0) for k, v in gs.items()}

    def fit(self, ekfac: bool = False) -> KroneckerFactors:
        """Both passes; returns the factors (float64, on the params' device)."""
        t0 = time.perf_counter()
        acc: dict[str, dict] = {}
        diag: dict[str, torch.Tensor] = {}
        order: list[str] = []
        uncovered: list[str] = []
        f64 = torch.float64
        for idx in _chunks(self.n, self.chunk):
            xb = self._xb(idx)
            for ci, col in enumerate(self._columns(idx, xb)):
                lfs, uncovered = capture_factors(
                    self.model, self.params, xb, col.capture_y(), col.fn(self.loss_fn)
                )
                for lf in lfs:
                    if lf.name not in acc:
                        self._check(lf)
                        acc[lf.name] = {"lf": lf, "A": None, "S": None, "cnt": 0.0}
                        order.append(lf.name)
                    st = acc[lf.name]
                    # products in the net's dtype, sums over chunks in float64 (the
                    # float64 products were half the fit's time on the CNN)
                    g = lf.g.detach()
                    if lf.kind == "norm":  # diagonal: per-example gradients from the factors
                        if lf.weight is not None:
                            gw = (g * lf.a.to(g)).sum(1)
                            diag[lf.weight] = diag.get(lf.weight, 0) + (gw**2).sum(0).to(f64)
                        if lf.bias is not None:
                            sq = (g.sum(1) ** 2).sum(0).to(f64)
                            diag[lf.bias] = diag.get(lf.bias, 0) + sq
                        continue
                    if lf.kind == "embedding":
                        ids = lf.a.reshape(-1)
                        pad = lf.module.padding_idx
                        ok = ids != pad if pad is not None else torch.ones_like(ids, dtype=bool)
                        if ci == 0:
                            cnt = torch.bincount(ids[ok], minlength=lf.module.num_embeddings)
                            st["A"] = cnt.to(f64) + (0 if st["A"] is None else st["A"])
                            st["cnt"] += float(ok.sum())
                        gg = g.reshape(-1, g.shape[-1])[ok]
                        st["S"] = (gg.T @ gg).to(f64) + (0 if st["S"] is None else st["S"])
                        continue
                    gg = g.reshape(-1, g.shape[-1])
                    st["S"] = (gg.T @ gg).to(f64) + (0 if st["S"] is None else st["S"])
                    if ci == 0:
                        at = self._tilde(lf).to(g)
                        at = at.reshape(-1, at.shape[-1])
                        st["A"] = (at.T @ at).to(f64) + (0 if st["A"] is None else st["A"])
                        st["cnt"] += float(lf.g.shape[0] * lf.g.shape[1])
                if uncovered:
                    for k, v in self._uncovered_sq(uncovered, xb, col).items():
                        diag[k] = diag.get(k, 0) + v
        t1 = time.perf_counter()
        blocks = []
        for name in order:
            st = acc[name]
            lf = st["lf"]
            if lf.kind == "norm":
                continue
            cnt = max(st["cnt"], 1.0)
            s = st["S"] / cnt
            ls, qs = torch.linalg.eigh((s + s.T) / 2)
            if lf.kind == "embedding":
                blocks.append(
                    Block(
                        name, "embedding", lf.weight, None, lf.module.num_embeddings,
                        lf.g.shape[-1], None, st["A"] / self.n, qs, ls.clamp_min(0),
                    )
                )  # fmt: skip
                continue
            a = st["A"] / self.n
            la, qa = torch.linalg.eigh((a + a.T) / 2)
            blocks.append(
                Block(
                    name, lf.kind, lf.weight, lf.bias, lf.g.shape[-1], a.shape[0],
                    qa, la.clamp_min(0), qs, ls.clamp_min(0),
                )
            )  # fmt: skip
        diag = {k: (v / self.n).reshape(self.params[k].shape) for k, v in diag.items()}
        t2 = time.perf_counter()
        seconds = {"factors_pass": t1 - t0, "factors_eigh": t2 - t1}
        if ekfac:
            self._fit_eigenvalues(blocks)
            seconds["factors_ekfac_pass"] = time.perf_counter() - t2
        names = list(self.params)
        return KroneckerFactors(
            names,
            [tuple(self.params[k].shape) for k in names],
            blocks,
            diag,
            self.n,
            self.fisher,
            ekfac,
            seconds,
        )

    # -- pass 2 (EK-FAC) ------------------------------------------------------------------
    def _fit_eigenvalues(self, blocks: list[Block]) -> None:
        """Lambda[o, j] = (1/n) sum_i (Q_S^T G_i Q_A)[o, j]^2, G_i summed over positions."""
        by_name = {b.name: b for b in blocks}
        ev = {b.name: torch.zeros(b.out_dim, b.in_dim, dtype=torch.float64) for b in blocks}
        ev = {k: v.to(by_name[k].ls.device) for k, v in ev.items()}
        for idx in _chunks(self.n, self.chunk):
            xb = self._xb(idx)
            for col in self._columns(idx, xb):
                lfs, _ = capture_factors(
                    self.model, self.params, xb, col.capture_y(), col.fn(self.loss_fn)
                )
                for lf in lfs:
                    b = by_name.get(lf.name)
                    if b is None:
                        continue
                    g = lf.g.detach()  # rotations in the net's dtype, sums in float64
                    gs = g @ b.qs.to(g)  # (N, T, out) in S's basis
                    if b.kind == "embedding":
                        ev[b.name] += _embedding_sq(lf, gs, b.out_dim).to(torch.float64)
                        continue
                    at = self._tilde(lf).to(g) @ b.qa.to(g)  # (N, T, in~)
                    if at.shape[1] == 1:  # sum_i (gs_i as_i^T)^2 = (gs^2)^T (as^2)
                        ev[b.name] += ((gs[:, 0] ** 2).T @ (at[:, 0] ** 2)).to(torch.float64)
                        continue
                    step = max(1, _EK_ELEMS // (b.out_dim * b.in_dim))
                    for s in range(0, gs.shape[0], step):
                        gi = torch.einsum("nto,nti->noi", gs[s : s + step], at[s : s + step])
                        ev[b.name] += (gi**2).sum(0).to(torch.float64)
        for b in blocks:
            b.ev = ev[b.name] / self.n


def _embedding_sq(lf, gs: torch.Tensor, vocab: int) -> torch.Tensor:
    """sum_i (sum_{t: ids_it = v} gs_it)^2 for every (v, d): (V, D), without (N, V, D).

    The per-(point, token) sums are the layer's sparse per-point gradient in S's basis
    (:func:`~ggda.gradients.layers.token_segments` with one row per point).
    """
    n = gs.shape[0]
    _, tok, per = token_segments(lf, torch.arange(n, device=gs.device), gs)
    return gs.new_zeros(vocab, gs.shape[-1]).index_add_(0, tok, per**2)
