"""Inner products of (group) training gradients with query gradients, per layer, factorised.

TracIn without projection needs S[j, r] = <grad sum_{i in G_j} fn(z_i), grad qfn(q_r)>.
Per layer there are three exact ways, and :func:`per_sample_inner_products` picks the cheaper
one for each layer from its shapes, n, k and m:

- ``ghost`` (linear, conv): <sum_t g_t a_t^T, sum_u g'_u a'_u^T> = sum_{t,u} (g_t.g'_u)(a_t.a'_u),
  per training point, then summed per group. Costs n m T T' (in + out): cheap for plain
  rows (T = T' = 1), ruinous for conv layers with hundreds of positions.
- ``materialise``: the layer's per-group gradient (c, p_l) from the factors (one bmm per
  chunk, n T p_l flops) dotted with the query gradients (m, p_l): k m p_l + n T p_l.
- ``sparse`` (embedding, always): a group's embedding gradient has non-zero rows only for
  the tokens its points use, so it is held as a sparse (c, vocab dim) matrix of
  deduplicated (group, token) rows and multiplied with the dense query gradients: at most
  min(n T, k vocab) dim m flops, never a dense vocab x dim gradient per point.

Norm layers and bias vectors are materialised (tiny). Parameters no layer rule covers use
vmap group gradients. Nothing n x p is held: training points stream in group-aligned
chunks, each layer's (c, p_l) exists only while it is dotted. The query side is held per
layer ((m, p_l) or its factors) and is split into batches when it exceeds
``QUERY_ELEMS``, each batch taking one more pass over the training data, unless the held
form is cheaper: the group gradients in blocks of ``HELD_ELEMS`` entries (one pass over
the training data in all), the query gradients streamed past each block.
"""

from __future__ import annotations

import torch
from torch import nn

from ggda.gradients.group import (
    FACTOR_ELEMS,
    VMAP_ACT_ELEMS,
    Fn,
    _chunks_by_size,
    _vmap_chunk,
    _vmap_group_fn,
    activation_elems,
    capture_batches,
    group_gradients,
    iter_group_gradients,
    select_params,
    warn_fallback,
)
from ggda.gradients.layers import (
    LayerFactors,
    capture_factors,
    group_layer_gradients,
    sparse_csr,
    sparse_matmul,
    token_segments,
)

# Entries of the query side held at once (per-layer gradients or factors), and of the
# (points x queries x T x T') position-pair tensors of the ghost form.
QUERY_ELEMS = 64_000_000
PAIR_ELEMS = 16_000_000
# Entries of one layer's (c, p_l) per-group gradient in a chunk.
GROUP_ELEMS = 16_000_000
# Entries of one block of (k_b, p) group gradients held when the queries need several
# batches (the held form of :func:`per_sample_inner_products`).
HELD_ELEMS = 64_000_000


def _weight_numel(f: LayerFactors) -> int:
    return f.module.weight.numel() if f.weight is not None else 0


def _plan(tf: LayerFactors, qf: LayerFactors, n: int, k: int, m: int) -> str:
    """The form of one layer's weight, by estimated work.

    Linear and conv: ``ghost`` | ``materialise``; embedding: ``sparse`` | ``dense_groups``.

    Embedding, with T, T' positions, vocab V and width D: ``sparse`` (sparse group
    gradients times the dense query gradients) costs n T D m + m V D (the dense query
    side), ``dense_groups`` (dense group gradients times the sparse query gradients)
    k V D + k m T' D: the first for many groups, the second for few.
    """
    if tf.weight is None or tf.kind == "norm":
        return "materialise"
    t, tq = tf.positions, qf.positions
    p_w = _weight_numel(tf)
    if tf.kind == "embedding":
        dim = tf.g.shape[-1]
        sparse = n * t * dim * m + m * p_w
        dense = k * p_w + k * m * tq * dim
        return "sparse" if sparse < dense else "dense_groups"
    ghost = n * m * t * tq * (tf.a_width + tf.g.shape[-1])
    mat = k * m * p_w + n * t * p_w
    return "ghost" if ghost < mat else "materialise"


def _flat_layer(grads: dict[str, torch.Tensor], names: list[str], c: int) -> torch.Tensor:
    return torch.cat([grads[nm].reshape(c, -1) for nm in names], 1)


class _QuerySide:
    """The query batch's per-layer representation for the chosen forms."""

    def __init__(self, factors: list[LayerFactors], plans: dict[str, str], mq: int) -> None:
        self.mat: dict[str, tuple[list[str], torch.Tensor]] = {}
        self.ghost: dict[str, LayerFactors] = {}
        self.bias: dict[str, torch.Tensor] = {}
        self.emb: dict[str, torch.Tensor] = {}
        self.emb_sparse: dict[str, torch.Tensor] = {}
        slot = torch.arange(mq, device=factors[0].g.device) if factors else None
        for f in factors:
            plan = plans[f.name]
            if plan == "materialise":
                names = [nm for nm in (f.weight, f.bias) if nm]
                self.mat[f.name] = (
                    names,
                    _flat_layer(group_layer_gradients(f, slot, mq), names, mq),
                )
                continue
            if plan == "sparse":  # (vocab dim, mq): the sparse product's right side,
                # written straight in that layout (a transposed copy cost 15 % of the pass)
                row, col, val = _embedding_entries(f, slot)
                qt = val.new_zeros(f.module.weight.numel(), mq)
                qt[col, row] = val  # distinct entries
                self.emb[f.name] = qt
            elif plan == "dense_groups":  # the query gradients as a sparse (mq, vocab dim)
                self.emb_sparse[f.name] = _embedding_csr(f, slot, mq)
            else:
                self.ghost[f.name] = f
            if f.bias is not None:
                self.bias[f.name] = f.g.sum(1)  # (mq, out)


def _ghost_weight(tf: LayerFactors, qf: LayerFactors) -> torch.Tensor:
    """(N, mq) sum_{t,u} (g_t . g'_u)(a_t . a'_u), in pieces bounded by PAIR_ELEMS."""
    n, t = tf.g.shape[:2]
    mq, tq = qf.g.shape[:2]
    if t == 1 and tq == 1:
        return (tf.g[:, 0] @ qf.g[:, 0].T) * (tf.a[:, 0] @ qf.a[:, 0].T)
    step = max(1, PAIR_ELEMS // max(1, mq * t * tq))
    rows = []
    for s in range(0, n, step):
        gg = torch.einsum("ntc,muc->nmtu", tf.g[s : s + step], qf.g)
        aa = torch.einsum("ntc,muc->nmtu", tf.a[s : s + step], qf.a)
        rows.append((gg * aa).sum((2, 3)))
    return torch.cat(rows, 0)


def _embedding_entries(
    f: LayerFactors, slot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major (row, column, value) entries of the group embedding gradients.

    The matrix is (rows, vocab dim); one entry per distinct (group, token) pair and
    embedding column.
    """
    dim = f.module.weight.shape[1]
    row, tok, vals = token_segments(f, slot, f.g)
    cols = torch.arange(dim, device=tok.device)
    return row.repeat_interleave(dim), (tok[:, None] * dim + cols).reshape(-1), vals.reshape(-1)


def _embedding_csr(f: LayerFactors, slot: torch.Tensor, rows: int) -> torch.Tensor:
    """The group embedding gradients as a CSR matrix (rows, vocab dim)."""
    row, col, val = _embedding_entries(f, slot)
    return sparse_csr(row, col, val, (rows, f.module.weight.numel()), ordered=True)


def _sparse_embedding(
    tf: LayerFactors, slot: torch.Tensor, rows: int, q: torch.Tensor
) -> torch.Tensor:
    """(rows, mq) <sum_{i in G_j, t} e_{a_it} g_it^T, Q_r>, the group gradients held sparse.

    A group's embedding gradient has a non-zero row only for the tokens its points use:
    the (group, token) pairs are deduplicated (their output gradients summed), laid out as
    a CSR matrix (rows, vocab dim) and multiplied with the dense query side q
    (vocab dim, mq). Flops: nnz x mq, nnz <= min(N T, rows vocab) dim, i.e. the ghost
    form's work with repeated tokens merged and padding dropped. On the BBC text net
    (n = 1,625, T = 256, m = 50) 0.26 s against 4.7 s for gathering Q's rows by token id
    and 0.6 s for dense per-point gradients.
    """
    row, col, val = _embedding_entries(tf, slot)
    return sparse_matmul(row, col, val, (rows, tf.module.weight.numel()), q, ordered=True)


def _dense_group_embedding(
    tf: LayerFactors, slot: torch.Tensor, rows: int, qs: torch.Tensor
) -> torch.Tensor:
    """(rows, mq) the same inner products for few groups: the group gradients dense.

    Each block of groups' embedding gradients (b, vocab dim) is written densely (at most
    ``GROUP_ELEMS`` entries) and multiplied by the sparse query gradients qs
    (mq, vocab dim): b vocab dim + nnz(qs) b, no dense query side (m vocab dim) at all.
    """
    p_w = tf.module.weight.numel()
    row, col, val = _embedding_entries(tf, slot)
    out = []
    step = max(1, GROUP_ELEMS // p_w)
    for b0 in range(0, rows, step):
        b = min(step, rows - b0)
        sel = (row >= b0) & (row < b0 + b)
        dense = val.new_zeros(b, p_w)
        dense[row[sel] - b0, col[sel]] = val[sel]  # distinct entries: assignment
        out.append((qs @ dense.T).T)
    return torch.cat(out, 0)


def per_sample_inner_products(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    fn: Fn,
    qx: torch.Tensor,
    qy: torch.Tensor,
    qfn: Fn,
    *,
    params: dict[str, torch.Tensor] | None = None,
    chunk: int = 1024,
    group_ids: torch.Tensor | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """All inner products <grad fn(z_i), grad qfn(q_r)>: (n, m), no per-sample gradient held.

    Per layer the cheaper exact form is used (module docstring): the ghost form
    (g_i . g_r)(a_i . a_r) summed over position pairs, or the layer's per-group gradient
    dotted with the query gradients. Parameters without a layer rule use vmap gradients.

    Args:
        model: the net (eval mode) whose parameters are differentiated.
        x: (n, ...) training inputs.
        y: (n,) training labels.
        fn: the training side's per-example function (B, C), (B,) -> (B,).
        qx: (m, ...) query inputs.
        qy: (m,) query labels.
        qfn: the query side's per-example function.
        params: parameters differentiated (default: all trainable).
        chunk: training points per batched pass (also bounded by the factors' memory).
        group_ids: optional (n,) group of each training point, in [0, k); then rows are summed per
            group, giving <grad sum_{i in G_j} fn(z_i), grad qfn(q_r)> (k, m). The cost is
            about one forward/backward over the training data plus k m p (nothing k x p
            or n x p is formed at once).
        k: the number of groups (with ``group_ids``).

    Returns:
        (n, m), or (k, m) with a grouping, on the params' device.
    """
    if params is None:
        params = select_params(model)
    p0 = next(iter(params.values()))
    dev, dtype = p0.device, p0.dtype
    n, m = y.shape[0], qy.shape[0]
    if group_ids is None:
        group_ids, kk = torch.arange(n), n
    else:
        kk = int(k) if k is not None else int(group_ids.max()) + 1
    group_ids = group_ids.cpu()
    # one-point probes: positions per layer and memory per point
    tprobe, rest = capture_factors(model, params, x[:1].to(dev), y[:1].to(dev), fn)
    qprobe, _ = capture_factors(model, params, qx[:1].to(dev), qy[:1].to(dev), qfn)
    warn_fallback(model, rest)
    plans = {tf.name: _plan(tf, qf, n, kk, m) for tf, qf in zip(tprobe, qprobe, strict=True)}
    per_point = max(1, sum(f.a_numel + f.g.numel() for f in tprobe))
    budget = max(1, min(chunk, FACTOR_ELEMS // per_point))
    vmap_budget = max(1, min(chunk, VMAP_ACT_ELEMS // activation_elems(model, x[:1].to(dev))))
    rest_params = {nm: params[nm] for nm in rest}
    p_rest = sum(v.numel() for v in rest_params.values())
    # query elements per query row, to size the query batches
    q_per = p_rest
    widest = max(
        [p_rest] + [tf.a_width * tf.g.shape[-1] for tf in tprobe if tf.kind != "embedding"]
    )
    for tf, qf in zip(tprobe, qprobe, strict=True):
        if plans[tf.name] == "dense_groups":  # sparse: (col, value) per non-zero
            q_per += 3 * qf.g.numel()
        elif plans[tf.name] in ("materialise", "sparse"):
            q_per += _weight_numel(tf) + (tf.g.shape[-1] if tf.bias else 0)
        else:
            q_per += qf.a_numel + qf.g.numel() * (2 if tf.bias else 1)
    mb = max(1, min(m, QUERY_ELEMS // max(1, q_per)))
    mb = -(-m // -(-m // mb))  # equal batches: 400 in 2 x 200, not 397 + 3
    max_groups = max(1, GROUP_ELEMS // max(1, widest))
    out = torch.zeros(kk, m, dtype=dtype, device=dev)
    p_all = sum(v.numel() for v in params.values())
    query_passes = -(-m // mb)  # training passes of the query-batch form
    blocks = -(-kk * p_all // HELD_ELEMS)  # group blocks of the held form
    # Held form: per block of groups, its (k_b, p) gradients from its own points (one
    # pass over the data in all), then the query gradients streamed past it (one query
    # pass per block; a per-sample query gradient costs ~3 training points' capture).
    if query_passes > 1 and n + blocks * 3 * m < query_passes * n:
        # ResNet-9, k = 1,000, m = 1,000: 7 training passes (274 s) -> 1 pass + 7 query
        # passes; the CNN at k = 2: 4 passes, 3.5x the per-sample time -> one each.
        per_block = -(-kk // blocks)
        order = torch.argsort(group_ids, stable=True)
        sizes = torch.bincount(group_ids, minlength=kk)
        ends = torch.cumsum(sizes, 0).tolist()
        for g0 in range(0, kk, per_block):
            g1 = min(kk, g0 + per_block)
            lo = ends[g0 - 1] if g0 else 0
            pts = order[lo : ends[g1 - 1]]
            held = group_gradients(
                model, x[pts], y[pts], group_ids[pts] - g0, g1 - g0, fn,
                params=params, backend="factored",
            )  # fmt: skip
            for rows, qg in iter_group_gradients(
                model, qx, qy, torch.arange(m), m, qfn, params=params, backend="factored"
            ):
                out[g0:g1, rows.to(dev)] = held @ qg.T
        return out
    vm_fn = _vmap_group_fn(model, fn) if rest else None
    for q0 in range(0, m, mb):
        qxb, qyb = qx[q0 : q0 + mb].to(dev), qy[q0 : q0 + mb].to(dev)
        mq = qyb.shape[0]
        qfactors, _ = capture_factors(model, params, qxb, qyb, qfn)
        qside = _QuerySide(qfactors, plans, mq)
        q_rest = None
        if rest:
            q_rest = _vmap_chunk(
                _vmap_group_fn(model, qfn),
                rest_params,
                qx[q0 : q0 + mb],
                qy[q0 : q0 + mb],
                torch.arange(mq)[:, None],
                vmap_budget,
            )
        for groups, members in _chunks_by_size(group_ids, kk, budget, max_groups):
            c = members.shape[0]
            acc = torch.zeros(c, mq, dtype=dtype, device=dev)
            for sub, lo, rows, slot in capture_batches(members, budget, dev):
                tfactors, _ = capture_factors(model, params, x[sub].to(dev), y[sub].to(dev), fn)
                part = acc[lo : lo + rows]
                for f in tfactors:
                    if f.name in qside.mat:
                        names, qmat = qside.mat[f.name]
                        gmat = _flat_layer(group_layer_gradients(f, slot, rows), names, rows)
                        part += gmat @ qmat.T
                        continue
                    if f.name in qside.emb:
                        part += _sparse_embedding(f, slot, rows, qside.emb[f.name])
                        continue
                    if f.name in qside.emb_sparse:
                        part += _dense_group_embedding(f, slot, rows, qside.emb_sparse[f.name])
                        continue
                    per = _ghost_weight(f, qside.ghost[f.name])
                    if f.bias is not None:
                        per = per + f.g.sum(1) @ qside.bias[f.name].T
                    part.index_add_(0, slot, per)
            if rest:
                g = _vmap_chunk(vm_fn, rest_params, x, y, members, vmap_budget)
                acc += g @ q_rest.T
            out[groups.to(dev), q0 : q0 + mq] = acc
    return out
