"""Seeded random projections that never hold a whole (p, d) matrix when it is large.

``dense`` (:class:`RandomProjector`): one (p, d) matrix over the flattened gradient, the
reference. ``kronecker`` (:class:`KroneckerProjector`): per layer P_r^T G P_c with two
small matrices, applied to the layer's factors before the segment sum.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ggda.errors import ConfigError, check_choice, check_int

PROJ_TYPES = ("rademacher", "gaussian")


class RandomProjector:
    """x (b, p) -> x P (b, d), P a seeded random (p, d) matrix scaled by 1/sqrt(d).

    P is generated in row blocks of ``block`` rows from a per-block seed, so it is the same
    matrix on every call and on every device, and is held whole only when it is small
    (``p * d <= cache_elems``); otherwise each block is regenerated on use.

    Args:
        p: input dimension.
        d: output dimension (``proj_dim``).
        seed: projection seed.
        kind: ``rademacher`` (+-1) or ``gaussian``.
        block: rows of P generated at a time.
        cache_elems: hold P in memory when it has at most this many entries (256M:
            1 GB in float32, e.g. ResNet-9 at width 16 with d = 512). Regenerating P costs
            far more than the product, so callers keep one projector per model.
    """

    def __init__(
        self,
        p: int,
        d: int,
        seed: int = 0,
        kind: str = "rademacher",
        block: int = 8192,
        cache_elems: int = 256_000_000,
    ) -> None:
        self.p = check_int("projection input dim", p, 1)
        self.d = check_int("method.proj_dim", d, 1)
        self.kind = check_choice("method.proj_type", kind, PROJ_TYPES)
        self.seed = int(seed)
        self.block = int(block)
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._cacheable = p * d <= cache_elems

    def _fill(self, i: int, m: torch.Tensor) -> torch.Tensor:
        """Draw block ``i`` into ``m`` (rows, d), a float32 CPU tensor, in place."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.kind == "gaussian":
            torch.randn(m.shape, generator=g, out=m)
        else:
            torch.randint(0, 2, m.shape, generator=g, out=m).mul_(2).sub_(1)
        return m.mul_(1.0 / math.sqrt(self.d))

    def _block(self, i: int, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._fill(i, torch.empty(rows, self.d)).to(device=device, dtype=dtype)

    def matrix(self, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
        """The whole P (p, d), drawn on the CPU and moved to ``device`` once.

        Each block has its own seeded generator, so the blocks are drawn on parallel
        threads (torch releases the GIL while drawing) into one buffer: the same values as
        drawing them one after another, in about 1/threads of the time (drawing a
        100k x 512 P is otherwise a fixed 0.5-0.7 s of every TRAK call on a CPU).
        """
        out = torch.empty(self.p, self.d)
        starts = list(range(0, self.p, self.block))

        def fill(i: int) -> None:
            s = starts[i]
            self._fill(i, out[s : s + min(self.block, self.p - s)])

        workers = max(1, min(torch.get_num_threads(), len(starts)))
        if workers == 1:
            for i in range(len(starts)):
                fill(i)
        else:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(fill, range(len(starts))))
        return out.to(device=torch.device(device), dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows: (b, p) -> (b, d)."""
        if x.shape[-1] != self.p:
            raise ValueError(f"projector expects {self.p} features, got {x.shape[-1]}")
        key = (x.device, x.dtype)
        if self._cacheable:
            if key not in self._cache:
                self._cache[key] = self.matrix(x.device, x.dtype)
            return x @ self._cache[key]
        out = x.new_zeros(x.shape[0], self.d)
        for i, s in enumerate(range(0, self.p, self.block)):
            rows = min(self.block, self.p - s)
            out += x[:, s : s + rows] @ self._block(i, rows, x.device, x.dtype)
        return out


# -- structured (Kronecker) projections -----------------------------------------------------

PROJ_STRUCTURES = ("dense", "kronecker")


def random_matrix(
    rows: int, d: int, seed: int, kind: str, device=None, dtype=torch.float32
) -> torch.Tensor:
    """A seeded (rows, d) matrix of +-1 (rademacher) or N(0, 1) entries scaled by 1/sqrt(d).

    E[P P^T] = I_rows, so <P^T u, P^T v> is an unbiased estimate of <u, v>.
    """
    g = torch.Generator().manual_seed(int(seed))
    if kind == "gaussian":
        m = torch.randn(rows, d, generator=g)
    else:
        m = torch.randint(0, 2, (rows, d), generator=g).float().mul_(2).sub_(1)
    return m.mul_(1.0 / math.sqrt(d)).to(device=device, dtype=dtype)


def kron_dims(rows: int, cols: int, budget: int) -> tuple[int, int]:
    """(d_rows, d_cols) with d_rows * d_cols <= budget, split in the ratio of rows to cols.

    d_rows ~ sqrt(budget * rows / cols) (clamped to [1, rows]), d_cols = budget // d_rows
    (clamped to [1, cols]): each side is compressed by about the same factor.
    """
    budget = max(1, int(budget))
    dr = int(round(math.sqrt(budget * rows / max(cols, 1))))
    dr = max(1, min(rows, dr, budget))
    dc = max(1, min(cols, budget // dr))
    return dr, dc


def split_budget(sizes: list[int], d: int) -> list[int]:
    """Split d output dimensions over blocks in proportion to their sizes (>= 1 each).

    Every block gets 1, the remaining d - B go by largest remainder in proportion to the
    sizes, and no block gets more than its size. Raises when d < number of blocks.
    """
    b = len(sizes)
    if d < b:
        raise ValueError(f"method.proj_dim={d} is below the number of projected blocks ({b})")
    total = float(sum(sizes))
    extra = d - b
    share = [extra * s / total for s in sizes]
    out = [1 + int(x) for x in share]
    left = d - sum(out)
    for i in sorted(range(b), key=lambda i: share[i] - int(share[i]), reverse=True)[:left]:
        out[i] += 1
    return [min(o, s) for o, s in zip(out, sizes, strict=True)]


@dataclass
class KronBlock:
    """One layer's two-sided projection: feature = P_r^T G P_c, flattened (d_r, d_c).

    G is the layer's gradient as a (rows, cols) matrix: linear/conv weight
    (out, in [kh kw]) with the bias as one extra column when selected; embedding
    (vocab, dim). Row-major flattening: feature = (P_r kron P_c)^T vec_row(G).
    """

    layer: str
    kind: str
    weight: str | None
    bias: str | None
    rows: int
    cols: int
    d_rows: int
    d_cols: int
    seed: int

    @property
    def dim(self) -> int:
        """Projected dimension of the block, d_rows * d_cols."""
        return self.d_rows * self.d_cols


@dataclass
class DenseBlock:
    """A dense projection of a few parameters' gradients (norm layers, the fallback)."""

    names: list[str]
    size: int
    dim: int
    seed: int


class KroneckerProjector:
    """Per-layer Kronecker projections of the gradient of ``params`` (``proj_structure=kronecker``).

    For a linear/conv/embedding layer with gradient matrix G (rows, cols), the feature is
    P_r^T G P_c with seeded P_r (rows, d_r), P_c (cols, d_c); from factors it is formed
    per position as (P_r^T g_t)(P_c^T a_t)^T before the segment sum, so no (p, d) matrix
    and no per-point gradient is ever built. Norm layers' small gradients (and the
    parameters no layer rule covers) get dense projections. The proj_dim budget d is split
    over the blocks in proportion to their parameter counts (:func:`split_budget`) and
    each layer's share b_l into d_r d_c <= b_l (:func:`kron_dims`), so the feature size
    :attr:`d` is at most proj_dim (equal when the shares factor exactly).

    Args:
        model: the net (its module structure decides the blocks).
        params: the selected parameters, in the order of the flat gradient.
        d: proj_dim.
        seed, kind: projection seed and ``rademacher`` | ``gaussian``.
    """

    structure = "kronecker"

    def __init__(
        self,
        model,
        params: dict[str, torch.Tensor],
        d: int,
        seed: int = 0,
        kind: str = "rademacher",
    ) -> None:
        from ggda.gradients.layers import supported_layers

        self.kind = check_choice("method.proj_type", kind, PROJ_TYPES)
        self.seed = int(seed)
        check_int("method.proj_dim", d, 1)
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.p = sum(v.numel() for v in params.values())
        layers, rest = supported_layers(model, params)
        plans: list[tuple] = []
        for mname, mod, rule, w, b in layers:
            if rule.kind in ("linear", "conv2d"):
                out_f = mod.weight.shape[0]
                in_f = mod.weight[0].numel() if w else 0
                plans.append(("kron", mname, rule.kind, w, b, out_f, in_f + (1 if b else 0)))
            elif rule.kind == "embedding":
                plans.append(("kron", mname, rule.kind, w, b, *mod.weight.shape))
            else:
                names = [nm for nm in (w, b) if nm]
                plans.append(("dense", names, sum(params[nm].numel() for nm in names)))
        if rest:
            plans.append(("dense", list(rest), sum(params[nm].numel() for nm in rest)))
        sizes = [pl[5] * pl[6] if pl[0] == "kron" else pl[2] for pl in plans]
        try:
            budgets = split_budget(sizes, int(d))
        except ValueError as e:
            raise ConfigError(
                "method.proj_dim", d, f">= {len(plans)} (one per projected block)"
            ) from e
        self.blocks: list[KronBlock | DenseBlock] = []
        for i, (pl, bud) in enumerate(zip(plans, budgets, strict=True)):
            bseed = self.seed * 1_000_003 + 7919 * (i + 1)
            if pl[0] == "kron":
                dr, dc = kron_dims(pl[5], pl[6], bud)
                self.blocks.append(
                    KronBlock(pl[1], pl[2], pl[3], pl[4], pl[5], pl[6], dr, dc, bseed)
                )
            else:
                self.blocks.append(DenseBlock(pl[1], pl[2], bud, bseed))
        self.d = sum(b.dim for b in self.blocks)
        self.fallback = list(rest)
        self._cache: dict = {}
        offs, o = {}, 0
        for k, v in params.items():
            offs[k] = (o, v.numel())
            o += v.numel()
        self.offsets = offs
        self.layer_block = {
            b.layer: i for i, b in enumerate(self.blocks) if isinstance(b, KronBlock)
        }
        self.name_block = {
            nm: i for i, b in enumerate(self.blocks) if isinstance(b, DenseBlock) for nm in b.names
        }
        starts, s = [], 0
        for b in self.blocks:
            starts.append(s)
            s += b.dim
        self.starts = starts

    # -- the random matrices (generated once per device/dtype, each small) -----------------
    def mats(self, i: int, device, dtype) -> tuple[torch.Tensor, ...]:
        """The random matrices of block i on ``device``/``dtype`` (generated once, cached).

        A Kronecker block gives (P_rows (rows, d_rows), P_cols (cols, d_cols)); a dense
        block gives (P (size, dim),).
        """
        key = (i, torch.device(device), dtype)
        if key not in self._cache:
            b = self.blocks[i]
            if isinstance(b, KronBlock):
                self._cache[key] = (
                    random_matrix(b.rows, b.d_rows, b.seed, self.kind, device, dtype),
                    random_matrix(b.cols, b.d_cols, b.seed + 1, self.kind, device, dtype),
                )
            else:
                self._cache[key] = (random_matrix(b.size, b.dim, b.seed, self.kind, device, dtype),)
        return self._cache[key]

    def matrix(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """The equivalent (p, d) matrix (block diagonal up to the parameter order); tests only."""
        eye = torch.eye(self.p, dtype=dtype, device=device)
        return self(eye)

    # -- flat gradients (vmap / loop backends, query gradients) ------------------------------
    def _slice(self, x: torch.Tensor, name: str) -> torch.Tensor:
        o, n = self.offsets[name]
        return x[:, o : o + n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project flat gradients (b, p) -> (b, d), block by block."""
        if x.shape[-1] != self.p:
            raise ValueError(f"projector expects {self.p} features, got {x.shape[-1]}")
        b = x.shape[0]
        out = []
        for i, blk in enumerate(self.blocks):
            mats = self.mats(i, x.device, x.dtype)
            if isinstance(blk, DenseBlock):
                flat = torch.cat([self._slice(x, nm) for nm in blk.names], 1)
                out.append(flat @ mats[0])
                continue
            parts = []
            if blk.weight is not None:
                parts.append(self._slice(x, blk.weight).reshape(b, blk.rows, -1))
            if blk.bias is not None:
                parts.append(self._slice(x, blk.bias).reshape(b, blk.rows, 1))
            g = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
            pr, pc = mats
            out.append(torch.einsum("brc,rj,cl->bjl", g, pr, pc).reshape(b, -1))
        return torch.cat(out, 1)

    # -- factors (factored backend) -----------------------------------------------------------
    def project_factors(self, f, slot: torch.Tensor, c: int) -> torch.Tensor:
        """(c, d_block) projected group gradients of one kron layer from its factors.

        linear/conv: sum_{i in G, t} (P_r^T g_it)(P_c^T [a_it; 1])^T;
        embedding: sum_{i in G, t} P_r[a_it]^T (P_c^T g_it)^T, as a sparse product
        (:meth:`_project_embedding`).
        """
        from ggda.gradients.layers import _pad_by_group

        i = self.layer_block[f.name]
        blk = self.blocks[i]
        pr, pc = self.mats(i, f.g.device, f.g.dtype)
        if blk.kind == "embedding":
            return self._project_embedding(f, slot, c, pr, pc)
        left = f.g @ pr
        if f.weight is not None:
            in_f = f.a_width
            right = f.a_times(pc[:in_f])
            if f.bias is not None:
                right = right + pc[in_f]
        else:
            right = pc[0].expand(*f.g.shape[:2], -1)
        lp, rp, _ = _pad_by_group(slot, c, left, right)
        return torch.bmm(lp.transpose(1, 2), rp).reshape(c, -1)

    @staticmethod
    def _project_embedding(f, slot, c, pr, pc) -> torch.Tensor:
        """(c, d_r d_c) P_r^T G_j P_c of an embedding layer, G_j held sparse.

        R_j = G_j P_c has one row per (group, token) pair, (g @ P_c) summed over the
        pair's positions (:func:`~ggda.gradients.layers.token_segments`); then
        P_r^T R_j is one sparse (c d_c, vocab) times dense P_r (vocab, d_r) product:
        U d_r d_c flops for U distinct pairs, and no (N, T, d_r) gather of P_r's rows
        (which cost 5x per-sample on the text net, with P_r 5,000 x 281).
        """
        from ggda.gradients.layers import sparse_matmul, token_segments

        vocab = f.module.weight.shape[0]
        d_r, d_c = pr.shape[1], pc.shape[1]
        row, tok, vals = token_segments(f, slot, f.g @ pc)  # vals (U, d_c)
        lc = torch.arange(d_c, device=row.device)
        res = sparse_matmul(
            (row[:, None] * d_c + lc).reshape(-1),
            tok.repeat_interleave(d_c),
            vals.reshape(-1),
            (c * d_c, vocab),
            pr,
        )  # (c d_c, d_r): row j d_c + l holds (P_r^T R_j)[:, l]
        return res.reshape(c, d_c, d_r).transpose(1, 2).reshape(c, -1)

    def project_dense(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Project block i's flat gradients (B, p_i) with its dense matrix: (B, d_i)."""
        return flat @ self.mats(i, flat.device, flat.dtype)[0]


def make_projector(
    structure: str,
    model,
    params: dict[str, torch.Tensor],
    d: int,
    seed: int = 0,
    kind: str = "rademacher",
):
    """Build the projector of ``structure`` for ``params``.

    ``dense``: :class:`RandomProjector` over the flat gradient; ``kronecker``:
    :class:`KroneckerProjector` per layer.
    """
    check_choice("method.proj_structure", structure, PROJ_STRUCTURES)
    if structure == "kronecker":
        return KroneckerProjector(model, params, d, seed, kind)
    return RandomProjector(sum(v.numel() for v in params.values()), d, seed, kind)
