"""The shared primitive: summed gradients per group, batched; per-sample gradients for k = n.

For a grouping with k groups, row j of the result is grad_theta sum_{i in G_j} fn(z_i),
optionally randomly projected. Three paths compute the same thing:

- ``vmap`` (default): groups are padded to a common size inside a chunk of groups of
  similar size, and ``torch.func.vmap(grad)`` runs one batched forward/backward per chunk.
  With singleton groups this *is* the chunked per-sample path.
- ``loop``: one plain autograd backward per group; the simple reference the tests use.
- ``factored``: the fast path for parameters that all belong to ``nn.Linear``
  layers (any MLP; the head of any net with ``last_layer``). One ordinary batched
  forward/backward over a chunk of group-aligned points captures each layer's inputs
  a_i and output gradients g_i; a group's weight gradient is the segment sum
  sum_{i in G} g_i a_i^T, one ``bmm`` over the chunk's groups (bias: sum_{i in G} g_i).
  Its flops are one forward/backward plus n x p for the segment sums, whatever k is, and
  it carries no ``vmap`` overhead; the chunk's (c, p) result is written in place. Falls
  back to ``vmap`` for other parameters. Like ``loop`` it differentiates the model's live
  weights (``params`` selects which), so ``params`` must be the model's own (as
  :func:`select_params` returns them).

:func:`per_sample_inner_products` goes one step further for inner products with query
gradients (TracIn): per Linear layer <g_i a_i^T, g_q a_q^T> = (g_i . g_q)(a_i . a_q), so
neither per-sample nor group gradients are formed and the cost does not depend on k.

Results stream chunk by chunk (:func:`iter_group_gradients`) so that callers can reduce
each chunk (dot products with query gradients) without ever holding k x p, in particular
n x p for the per-sample baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ggda.errors import check_choice

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BACKENDS = ("vmap", "loop", "factored")
# The factored path's chunk output (c x p entries) is written fresh each chunk; a few MB
# stays in the allocator's and the caches' reach, while 100+ MB chunks pay page faults
# (measured on the MNIST MLP: k = n 2.6 s at 32M entries, 1.3 s at 1-2M).
FACTORED_CHUNK_ELEMS = 2_000_000


def select_params(model: nn.Module, last_layer: bool = False) -> dict[str, torch.Tensor]:
    """Parameters to differentiate: all trainable ones, or the head's only.

    The head is ``model.head`` when the net defines it, else the last module with params.
    """
    named = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if not last_layer:
        return {k: v.detach() for k, v in named.items()}
    head = getattr(model, "head", None)
    if head is None:
        mods = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        head = mods[-1]
    head_ids = {id(p) for p in head.parameters()}
    return {k: v.detach() for k, v in named.items() if id(v) in head_ids}


def num_params(params: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in params.values())


def _flat(g: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    return torch.cat([v.reshape(batch, -1) for v in g.values()], dim=1)


def linear_layers(
    model: nn.Module, params: dict[str, torch.Tensor]
) -> list[tuple[nn.Linear, str | None, str | None]] | None:
    """The ``nn.Linear`` layers owning ``params``, or None if some param is elsewhere.

    Returns:
        [(layer, weight name or None, bias name or None)] for the layers with a selected
        parameter, in module order.
    """
    out: list[tuple[nn.Linear, str | None, str | None]] = []
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = f"{mname}.weight" if mname else "weight"
        b = f"{mname}.bias" if mname else "bias"
        w, b = (w if w in params else None), (b if b in params else None)
        if w or b:
            out.append((mod, w, b))
            covered.update(n for n in (w, b) if n)
    return out if covered == set(params) else None


def _layer_factors(
    model: nn.Module,
    layers: list[tuple[nn.Linear, str | None, str | None]],
    x: torch.Tensor,
    y: torch.Tensor,
    fn: Fn,
    dtype: torch.dtype,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, inputs a (N, T, in) and output gradients g (N, T, out) of sum_i fn(z_i).

    One ordinary batched forward/backward. T counts the positions a row passes through the
    layer (1 for plain rows; tokens, or two uses of a shared layer, give more). Point i's
    gradient of that layer's weight is sum_t g_it a_it^T and of its bias sum_t g_it,
    because points do not interact in eval mode. No ``.grad`` is written on the model.
    """
    n = y.shape[0]
    acts: list[list[torch.Tensor]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]

    def keeper(i: int):
        def keep(mod, inp, out):
            acts[i].append(inp[0].detach())
            outs[i].append(out)

        return keep

    handles = [mod.register_forward_hook(keeper(i)) for i, (mod, _, _) in enumerate(layers)]
    try:
        with torch.enable_grad():
            total = fn(model(x), y).sum()
            flat_outs = [o for os_ in outs for o in os_]
            gflat = list(torch.autograd.grad(total, flat_outs, allow_unused=True))
    finally:
        for h in handles:
            h.remove()
    res = []
    for i, (mod, _, _) in enumerate(layers):
        a_parts, g_parts = [], []
        for a_, o_ in zip(acts[i], outs[i], strict=True):
            g_ = gflat.pop(0)
            a_parts.append(a_.reshape(n, -1, mod.in_features))
            g_parts.append(
                (torch.zeros_like(o_) if g_ is None else g_).reshape(n, -1, mod.out_features)
            )
        if not a_parts:  # the layer took no part in the forward pass: zero gradient
            a_parts = [torch.zeros(n, 1, mod.in_features, dtype=dtype, device=x.device)]
            g_parts = [torch.zeros(n, 1, mod.out_features, dtype=dtype, device=x.device)]
        res.append((torch.cat(a_parts, 1), torch.cat(g_parts, 1)))
    return res


def _factored_chunk(
    model: nn.Module,
    layers: list[tuple[nn.Linear, str | None, str | None]],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    members: torch.Tensor,
    fn: Fn,
) -> torch.Tensor:
    """Summed gradients (c, p) of the c groups in ``members`` (c, s), -1 = padding.

    One batched forward/backward over the chunk's real points (:func:`_layer_factors`);
    per layer the factors are laid out per group, zero-padded, and
    grad_W[j] = sum_{i in G_j, t} g_it a_it^T is one bmm over the chunk's groups.
    """
    c, s = members.shape
    valid = members >= 0
    idx = members[valid]
    p0 = next(iter(params.values()))
    factors = _layer_factors(
        model, layers, x[idx].to(p0.device), y[idx].to(p0.device), fn, p0.dtype
    )
    # The result is written in place into one (c, p) buffer (no per-parameter pieces and
    # concatenation: at small group sizes the cost is writing k x p, not the flops).
    offsets, off = {}, 0
    for nm, v in params.items():
        offsets[nm] = off
        off += v.numel()
    out = torch.empty(c, off, dtype=p0.dtype, device=p0.device)
    # equal-size groups (no padding): the rows are already group-major, reshape for free
    dense = bool(valid.all())
    for (mod, wname, bname), (a, g) in zip(layers, factors, strict=True):
        t = a.shape[1]
        if dense:
            a_pad = a.reshape(c, s * t, mod.in_features)
            g_pad = g.reshape(c, s * t, mod.out_features)
        else:
            a_pad = a.new_zeros(c, s, t, mod.in_features)
            a_pad[valid] = a
            a_pad = a_pad.reshape(c, s * t, -1)
            g_pad = g.new_zeros(c, s, t, mod.out_features)
            g_pad[valid] = g
            g_pad = g_pad.reshape(c, s * t, -1)
        if wname is not None:
            o = offsets[wname]
            view = out[:, o : o + mod.out_features * mod.in_features]
            torch.bmm(
                g_pad.transpose(1, 2), a_pad, out=view.view(c, mod.out_features, mod.in_features)
            )
        if bname is not None:
            o = offsets[bname]
            out[:, o : o + mod.out_features] = g_pad.sum(1)
    return out


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

    For a Linear layer with weight gradients g a^T (T = 1) the inner product factorises,

        <g_i a_i^T, g_r a_r^T> = (g_i . g_r) (a_i . a_r),   bias: g_i . g_r,

    so the cost per layer is n m (in + out) instead of n m in out, and nothing n x p or
    chunk x p exists (the "ghost" inner product). With T > 1 positions the sum runs over
    position pairs. Parameters outside Linear layers fall back to materialised per-sample
    gradients (the vmap path), chunk by chunk.

    Args:
        x, y: (n, ...) and (n,) training side; fn its per-example function (B, C),(B,) -> (B,).
        qx, qy: (m, ...) and (m,) query side; qfn its per-example function.
        params: parameters differentiated (default: all trainable).
        chunk: training points per batched pass.
        group_ids, k: optional (n,) grouping into k groups; then the rows are summed per
            group, giving <grad sum_{i in G_j} fn(z_i), grad qfn(q_r)> (k, m) at the same
            cost whatever k is (nothing k x p is formed either).

    Returns:
        (n, m), or (k, m) with a grouping, on the params' device.
    """
    if params is None:
        params = select_params(model)
    p0 = next(iter(params.values()))
    layers = linear_layers(model, params)
    if layers is None:
        q = per_sample_gradients(model, qx, qy, qfn, params=params)
        rows = [
            per_sample_gradients(model, x[s : s + chunk], y[s : s + chunk], fn, params=params) @ q.T
            for s in range(0, y.shape[0], chunk)
        ]
        return torch.cat(rows, 0)
    qf = _layer_factors(model, layers, qx.to(p0.device), qy.to(p0.device), qfn, p0.dtype)
    out = []
    for s in range(0, y.shape[0], chunk):
        tf = _layer_factors(
            model,
            layers,
            x[s : s + chunk].to(p0.device),
            y[s : s + chunk].to(p0.device),
            fn,
            p0.dtype,
        )
        acc = torch.zeros(tf[0][0].shape[0], qf[0][0].shape[0], dtype=p0.dtype, device=p0.device)
        for (_, wname, bname), (a, g), (qa, qg) in zip(layers, tf, qf, strict=True):
            if a.shape[1] == 1 and qa.shape[1] == 1:
                gg = g[:, 0] @ qg[:, 0].T
                if wname is not None:
                    acc += gg * (a[:, 0] @ qa[:, 0].T)
                if bname is not None:
                    acc += gg
            else:  # positions: sum over pairs (t, u) of (g_t . g'_u)(a_t . a'_u)
                gg = torch.einsum("ntc,muc->nmtu", g, qg)
                if wname is not None:
                    acc += (gg * torch.einsum("ntc,muc->nmtu", a, qa)).sum((2, 3))
                if bname is not None:
                    acc += gg.sum((2, 3))
        out.append(acc)
    full = torch.cat(out, 0)
    if group_ids is None:
        return full
    return full.new_zeros(int(k), full.shape[1]).index_add_(0, group_ids.to(full.device), full)


def _chunks_by_size(
    group_ids: torch.Tensor, k: int, max_points: int, max_groups: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (groups (c,), padded member index (c, s) with -1 padding) chunks.

    Groups are visited in order of decreasing size so that a chunk pads little.
    """
    order = torch.argsort(group_ids, stable=True)
    sizes = torch.bincount(group_ids, minlength=k)
    starts = torch.cumsum(sizes, 0) - sizes
    by_size = torch.argsort(sizes, descending=True, stable=True)
    i = 0
    while i < k:
        s = max(int(sizes[by_size[i]]), 1)
        c = max(1, min(max_groups, max_points // s, k - i))
        groups = by_size[i : i + c]
        gs, st = sizes[groups], starts[groups]
        ar = torch.arange(s)
        idx = st[:, None] + ar[None, :]
        valid = ar[None, :] < gs[:, None]
        members = torch.where(valid, order[idx.clamp_max(len(order) - 1)], -1)
        yield groups, members
        i += c


def iter_group_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    group_ids: torch.Tensor,
    k: int,
    fn: Fn,
    *,
    params: dict[str, torch.Tensor] | None = None,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str = "vmap",
    max_points: int = 2048,
    max_elems: int = 32_000_000,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream summed per-group gradients of ``fn``.

    Args:
        model: the net, in eval mode (so points do not interact through batch-norm).
        x: (n, *input_shape) inputs (moved to the params' device chunk by chunk).
        y: (n,) labels.
        group_ids: (n,) long in [0, k).
        k: number of groups.
        fn: per-example scalar function ``(logits (B, C), y (B,)) -> (B,)``.
        params: the parameters to differentiate (default: all trainable).
        projector: optional map (c, p) -> (c, d) applied to each chunk.
        backend: ``vmap`` (batched), ``loop`` (one backward per group, reference) or
            ``factored`` (one backward per chunk plus per-layer segment sums; Linear
            layers only, else ``vmap``).
        max_points: padded points per vmap chunk.
        max_elems: bound on the chunk's gradient entries (c * p) held at once.

    Yields:
        (groups (c,) long, grads (c, d)) with grads[r] = [P^T] grad sum_{i in G_groups[r]} fn(z_i).
    """
    check_choice("method.backend", backend, BACKENDS)
    if params is None:
        params = select_params(model)
    device = next(iter(params.values())).device
    p = num_params(params)
    buffers = {k_: v.detach() for k_, v in model.named_buffers()}
    max_groups = max(1, max_elems // max(p, 1))

    if backend == "loop":
        names = list(params)
        live = dict(model.named_parameters())
        for j in range(k):
            members = (group_ids == j).nonzero().squeeze(1)
            out = fn(model(x[members].to(device)), y[members].to(device)).sum()
            gs = torch.autograd.grad(out, [live[nm] for nm in names], allow_unused=True)
            flat = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(live[nm])).reshape(1, -1)
                    for g, nm in zip(gs, names, strict=True)
                ],
                dim=1,
            )
            yield torch.tensor([j]), projector(flat) if projector else flat
        return

    layers = linear_layers(model, params) if backend == "factored" else None
    if layers is not None:
        # With a projection, big chunks amortise reading the (p, d) matrix once per chunk
        # (a (c, p) @ (p, d) product is bound by reading P when c is small).
        small = max(1, min(max_elems, FACTORED_CHUNK_ELEMS) // max(p, 1))
        f_groups = max_groups if projector is not None else small
        for groups, members in _chunks_by_size(group_ids, k, max_points, f_groups):
            flat = _factored_chunk(model, layers, params, x, y, members, fn)
            yield groups, projector(flat) if projector else flat
        return

    def group_sum(prm, xg, yg, mg):
        logits = functional_call(model, (prm, buffers), (xg,))
        return (fn(logits, yg) * mg).sum()

    per_group = vmap(grad(group_sum), in_dims=(None, 0, 0, 0))
    for groups, members in _chunks_by_size(group_ids, k, max_points, max_groups):
        valid = members >= 0
        safe = members.clamp_min(0)
        xg = x[safe].to(device)
        yg = y[safe].to(device)
        mg = valid.to(device=device, dtype=next(iter(params.values())).dtype)
        g = per_group(params, xg, yg, mg)
        flat = _flat(g, len(groups))
        yield groups, projector(flat) if projector else flat


def group_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    group_ids: torch.Tensor,
    k: int,
    fn: Fn,
    **kw,
) -> torch.Tensor:
    """All summed group gradients at once: (k, d). See :func:`iter_group_gradients`."""
    if k < 1:
        raise ValueError(f"need at least one group, got k={k}")
    out: torch.Tensor | None = None
    for groups, g in iter_group_gradients(model, x, y, group_ids, k, fn, **kw):
        if out is None:
            out = g.new_zeros(k, g.shape[1])
        out[groups.to(g.device)] = g
    return out  # type: ignore[return-value]  (k >= 1 so the loop ran)


def per_sample_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fn: Fn, **kw
) -> torch.Tensor:
    """Per-example gradients (n, d) via the chunked vmap path (singleton groups)."""
    n = y.shape[0]
    return group_gradients(model, x, y, torch.arange(n), n, fn, **kw)
