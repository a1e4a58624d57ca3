"""The shared primitive: summed gradients per group, batched; per-sample gradients for k = n.

For a grouping with k groups, row j of the result is grad_theta sum_{i in G_j} fn(z_i),
optionally randomly projected. Three paths compute the same thing:

- ``vmap`` (default): groups are padded to a common size inside a chunk of groups of
  similar size, and ``torch.func.vmap(grad)`` runs one batched forward/backward per chunk.
  With singleton groups this *is* the chunked per-sample path.
- ``loop``: one plain autograd backward per group; the simple reference the tests use.
- ``factored``: the fast path. One ordinary batched forward/backward over a chunk of
  group-aligned points captures each layer's factors (:mod:`ggda.gradients.layers`:
  Linear over any positions, Conv2d, Embedding/EmbeddingBag, BatchNorm, LayerNorm); a
  group's weight gradient is the segment sum sum_{i in G, t} g_it a_it^T, one ``bmm`` over
  the chunk's groups (embedding: an ``index_add`` by token id; norm and bias: sums). Its
  flops are one forward/backward plus n x p for the segment sums, whatever k is, with no
  ``vmap`` overhead; the chunk's (c, p) result is written in place (with a Kronecker
  projector the factors are projected first and (c, p) never exists). Parameters no rule
  covers go through ``vmap`` (one warning per net; :func:`fallback_params` counts them).
  Like ``loop`` it differentiates the model's live weights, so ``params`` must be the
  model's own (as :func:`select_params` returns them).

:func:`ggda.gradients.inner.per_sample_inner_products` goes one step further for inner
products with query gradients (TracIn without projection).

Results stream chunk by chunk (:func:`iter_group_gradients`) so that callers can reduce
each chunk (dot products with query gradients) without ever holding k x p, in particular
n x p for the per-sample baseline.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ggda.errors import check_choice
from ggda.gradients.layers import Fn, capture_factors, group_layer_gradients, split_params
from ggda.gradients.projection import KroneckerProjector

log = logging.getLogger(__name__)

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
    """Total number of scalar entries p of the selected parameters."""
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


# -- fallback bookkeeping ---------------------------------------------------------------

_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fallback_params(model: nn.Module, params: dict[str, torch.Tensor]) -> int:
    """How many of the selected parameter entries no layer rule covers (vmap fallback).

    0 for every net in :mod:`ggda.models.nets`; recorded as ``attribution/fallback_params``.
    """
    return sum(params[nm].numel() for nm in split_params(model, params))


def warn_fallback(model: nn.Module, names: list[str]) -> None:
    """Log one warning per net naming the layer types without a rule and their sizes."""
    if not names:
        return
    owner = {}
    for mname, mod in model.named_modules():
        for pn, p in mod.named_parameters(recurse=False):
            owner[f"{mname}.{pn}" if mname else pn] = (type(mod).__name__, p.numel())
    per_type: dict[str, int] = {}
    for nm in names:
        t, c = owner.get(nm, ("?", 0))
        per_type[t] = per_type.get(t, 0) + c
    key = tuple(sorted(per_type.items()))
    try:
        done = _WARNED.setdefault(model, set())
    except TypeError:  # not weak-referenceable: warn every time
        done = set()
    if key in done:
        return
    done.add(key)
    what = ", ".join(f"{t} ({c} parameters)" for t, c in per_type.items())
    log.warning(
        "backend=factored has no layer rule for %s: those parameters are differentiated by "
        "the vmap fallback (slower, more memory)",
        what,
    )


# -- memory bounds ---------------------------------------------------------------------------
# Elements of captured factors / vmap activations held per batched pass. The vmap path keeps
# every intermediate activation for its backward (about 3x their count in memory), so
# 32M entries is some 0.4 GB in float32 whatever max_points says.
FACTOR_ELEMS = 32_000_000
VMAP_ACT_ELEMS = 32_000_000


@torch.no_grad()
def activation_elems(model: nn.Module, x1: torch.Tensor) -> int:
    """Entries of all leaf-module outputs for one input x1 (1, ...): the vmap footprint."""
    total = [0]

    def count(mod, inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    hs = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model(x1)
    finally:
        for h in hs:
            h.remove()
    return max(total[0], 1)


def factor_elems(
    model: nn.Module, params: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor, fn: Fn
) -> int:
    """Entries of the captured factors (a and g) for one point."""
    fs, _ = capture_factors(model, params, x1, y1, fn)
    return max(1, sum(f.a_numel + f.g.numel() for f in fs))


def _vmap_group_fn(model: nn.Module, fn: Fn):
    buffers = {k_: v.detach() for k_, v in model.named_buffers()}

    def group_sum(prm, xg, yg, mg):
        logits = functional_call(model, (prm, buffers), (xg,))
        return (fn(logits, yg) * mg).sum()

    return vmap(grad(group_sum), in_dims=(None, 0, 0, 0))


def _vmap_chunk(per_group, params, x, y, members: torch.Tensor, budget: int) -> torch.Tensor:
    """(c, p) summed gradients of the c groups in members (c, s) by vmap.

    A chunk of one group larger than ``budget`` points is split into pieces of at most
    ``budget`` points whose gradients are added, so memory stays bounded by the budget.
    """
    p0 = next(iter(params.values()))
    device = p0.device
    c, s = members.shape
    pieces = [members] if c > 1 or s <= budget else members.split(budget, dim=1)
    total = None
    for mem in pieces:
        valid = mem >= 0
        safe = mem.clamp_min(0)
        xg = x[safe].to(device)
        yg = y[safe].to(device)
        mg = valid.to(device=device, dtype=p0.dtype)
        flat = _flat(per_group(params, xg, yg, mg), c)
        total = flat if total is None else total + flat
    return total


def _factored_pieces(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    members: torch.Tensor,
    fn: Fn,
    budget: int,
    vmap_budget: int,
    piece_rows: int,
    projector=None,
    weight_fn: Fn | None = None,
) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Summed gradients [or Kronecker-projected ones] of the groups in members, in pieces.

    The chunk's real points go through batched capture passes of at most ``budget``
    points (:func:`capture_factors`, :func:`capture_batches`); each layer's group
    gradients are segment sums of its factors (:func:`group_layer_gradients`), written in
    place into a (rows, p) buffer of at most ``piece_rows`` groups (with a
    :class:`KroneckerProjector` the factors are projected first and the buffer is
    (rows, d)). So the capture batch is as large as the factors' memory allows while the
    output stays small: on the CNN, per-sample gradients in capture batches of 9 points
    (the output bound) were 4x slower than one pass. Parameters no rule covers come from
    the vmap path over the same groups.

    With ``weight_fn`` (w_i = weight_fn(logits_i, y_i), taken as constants), also the
    weighted sums grad sum_{i in G} w_i fn(z_i) from the same capture pass (the factors'
    output gradients times w_i). Needs every selected parameter covered by a layer rule.

    Yields:
        (r0, r1, outs): rows [r0, r1) of members; outs = [plain (r1 - r0, width)] or
        [plain, weighted].
    """
    p0 = next(iter(params.values()))
    kron = isinstance(projector, KroneckerProjector)
    if kron:
        width = projector.d
        offsets = {}
    else:
        offsets, off = {}, 0
        for nm, v in params.items():
            offsets[nm] = off
            off += v.numel()
        width = off
    sizes = (members >= 0).sum(1).tolist()
    n_out = 1 if weight_fn is None else 2

    def new(rows: int) -> list[torch.Tensor]:
        return [torch.zeros(rows, width, dtype=p0.dtype, device=p0.device) for _ in range(n_out)]

    def add(outs, factors, w, slot, rows) -> None:
        for f in factors:
            _add_layer(outs[0], f, slot, rows, projector, offsets)
            if w is not None:
                _add_layer(outs[1], f.scaled(w), slot, rows, projector, offsets)

    def add_rest(outs, rest, r0, r1) -> None:
        if not rest:
            return
        sub_params = {nm: params[nm] for nm in rest}
        g = _vmap_chunk(_vmap_group_fn(model, fn), sub_params, x, y, members[r0:r1], vmap_budget)
        if kron:
            bi = projector.name_block[rest[0]]
            o = projector.starts[bi]
            outs[0][:, o : o + projector.blocks[bi].dim] += projector.project_dense(bi, g)
            return
        o = 0
        for nm in rest:
            nmel = params[nm].numel()
            outs[0][:, offsets[nm] : offsets[nm] + nmel] += g[:, o : o + nmel]
            o += nmel

    split: list = []  # [row, outs, points seen, rest] of a group split over batches
    for sub, lo, rows, slot in capture_batches(members, budget, p0.device):
        xs, ys = x[sub].to(p0.device), y[sub].to(p0.device)
        logits: list[torch.Tensor] = []
        factors, rest = capture_factors(
            model, params, xs, ys, fn, logits.append if weight_fn is not None else None
        )
        if weight_fn is not None and rest:  # an input layout no rule takes (capture time)
            raise UncoveredParams(rest)
        w = weight_fn(logits[0], ys) if weight_fn is not None else None
        if sizes[lo] > budget:  # one group over several batches: accumulate, then emit
            if not split:
                split = [lo, new(1), 0, rest]
            add(split[1], factors, w, slot, 1)
            split[2] += sub.numel()
            if split[2] == sizes[lo]:
                add_rest(split[1], split[3], lo, lo + 1)
                yield lo, lo + 1, split[1]
                split = []
            continue
        for r0 in range(0, rows, piece_rows):
            r1 = min(rows, r0 + piece_rows)
            if r0 == 0 and r1 == rows:
                fs, ws, sl = factors, w, slot
            else:  # slot is sorted: the piece's points are one contiguous range
                q0, q1 = torch.searchsorted(slot, torch.tensor([r0, r1], device=slot.device))
                q0, q1 = int(q0), int(q1)
                fs = [f.select(q0, q1) for f in factors]
                ws = w[q0:q1] if w is not None else None
                sl = slot[q0:q1] - r0
            outs = new(r1 - r0)
            add(outs, fs, ws, sl, r1 - r0)
            add_rest(outs, rest, lo + r0, lo + r1)
            yield lo + r0, lo + r1, outs


def capture_batches(
    members: torch.Tensor, budget: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, int, int, torch.Tensor]]:
    """Split a chunk's real points into capture batches of at most ``budget`` points.

    Args:
        members: (c, s) point indices of the chunk's groups, -1 padded.
        budget: points per capture pass.
        device: where the local slots go.

    Yields:
        (points (b,), lo, rows, slot (b,)): the batch touches only the chunk's rows
        [lo, lo + rows), and slot in [0, rows) is each point's row among them. A batch
        holds whole groups whenever a group fits the budget, points group-major, so that
        the segment sums work on ``rows`` groups (not all c) and, for equal-size groups,
        pad nothing (:func:`~ggda.gradients.layers._pad_by_group`'s free case). Padding
        every batch to all c groups of the chunk cost 5x on the text net (k = n/10).
    """
    c = members.shape[0]
    sizes = (members >= 0).sum(1).tolist()
    r = 0
    while r < c:
        if sizes[r] > budget:  # a group larger than the budget: its points in several batches
            row = members[r][members[r] >= 0]
            for st in range(0, row.numel(), budget):
                sub = row[st : st + budget]
                yield sub, r, 1, torch.zeros(sub.numel(), dtype=torch.long, device=device)
            r += 1
            continue
        end, total = r, 0
        while end < c and sizes[end] <= budget - total:  # greedy: whole groups that fit
            total += sizes[end]
            end += 1
        mem = members[r:end]
        valid = mem >= 0
        if total:
            slot = torch.arange(end - r)[:, None].expand_as(mem)[valid]
            yield mem[valid], r, end - r, slot.to(device)
        r = end


class UncoveredParams(ValueError):
    """Weighted group gradients need a layer rule for every selected parameter."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            f"weighted group gradients need a layer rule for every parameter; no rule "
            f"covers {names[:3]}"
        )


def _add_layer(out: torch.Tensor, f, slot: torch.Tensor, c: int, projector, offsets) -> None:
    """Add one layer's group gradients (or their Kronecker projection) into ``out`` (c, .)."""
    if isinstance(projector, KroneckerProjector):
        bi = projector.layer_block.get(f.name)
        if bi is not None:
            o = projector.starts[bi]
            out[:, o : o + projector.blocks[bi].dim] += projector.project_factors(f, slot, c)
            return
        grads = group_layer_gradients(f, slot, c)
        bi = projector.name_block[next(iter(grads))]
        flat = torch.cat([grads[nm].reshape(c, -1) for nm in projector.blocks[bi].names], 1)
        o = projector.starts[bi]
        out[:, o : o + projector.blocks[bi].dim] += projector.project_dense(bi, flat)
        return
    for nm, gr in group_layer_gradients(f, slot, c).items():
        o = offsets[nm]
        out[:, o : o + gr[0].numel()] += gr.reshape(c, -1)


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
        projector: optional map (c, p) -> (c, d) applied to each chunk; a
            :class:`KroneckerProjector` is applied to the factors on the factored path.
        backend: ``vmap`` (batched), ``loop`` (one backward per group, reference) or
            ``factored`` (one backward per chunk plus per-layer segment sums through the
            layer rules of :mod:`ggda.gradients.layers`; ``vmap`` for parameters no rule
            covers, with one warning).
        max_points: padded points per batched chunk; the vmap path also keeps a chunk's
            activations within ``VMAP_ACT_ELEMS`` and the factored path its factors within
            ``FACTOR_ELEMS`` (measured on one point), whatever max_points says.
        max_elems: bound on the chunk's gradient entries (c * p) held at once.

    Yields:
        (groups (c,) long, grads (c, d)) with grads[r] = [P^T] grad sum_{i in G_groups[r]} fn(z_i).
    """
    check_choice("method.backend", backend, BACKENDS)
    if params is None:
        params = select_params(model)
    device = next(iter(params.values())).device
    p = num_params(params)
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

    if backend == "factored":
        warn_fallback(model, split_params(model, params))
        yield from _iter_factored(
            model, x, y, group_ids, k, fn, params, projector, max_points, max_elems, None
        )
        return

    x1 = x[:1].to(device)
    vmap_budget = max(1, min(max_points, VMAP_ACT_ELEMS // activation_elems(model, x1)))
    per_group = _vmap_group_fn(model, fn)
    for groups, members in _chunks_by_size(group_ids, k, vmap_budget, max_groups):
        flat = _vmap_chunk(per_group, params, x, y, members, vmap_budget)
        yield groups, projector(flat) if projector else flat


def _iter_factored(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    group_ids: torch.Tensor,
    k: int,
    fn: Fn,
    params: dict[str, torch.Tensor],
    projector,
    max_points: int,
    max_elems: int,
    weight_fn: Fn | None,
) -> Iterator[tuple]:
    """The factored backend's chunks, projected (see :func:`_factored_pieces`).

    Yields (groups, grads), or (groups, grads, weighted grads) with ``weight_fn``.
    """
    device = next(iter(params.values())).device
    p = num_params(params)
    x1, y1 = x[:1].to(device), y[:1].to(device)
    vmap_budget = max(1, min(max_points, VMAP_ACT_ELEMS // activation_elems(model, x1)))
    budget = max(1, FACTOR_ELEMS // factor_elems(model, params, x1, y1, fn))
    kron = isinstance(projector, KroneckerProjector)
    if kron:
        # nothing (c, p) is formed: the chunk is bounded by its (c, d) output
        f_groups = max(1, max_elems // max(projector.d, 1))
    elif projector is not None:
        # big chunks amortise reading the (p, d) matrix once per chunk
        f_groups = max(1, max_elems // max(p, 1))
    else:
        # the chunk's (c, p) output is written fresh each chunk; a few MB stays in the
        # caches' reach while 100+ MB chunks pay page faults
        f_groups = max(1, min(max_elems, FACTORED_CHUNK_ELEMS) // max(p, 1))
    if weight_fn is not None:
        f_groups = max(1, f_groups // 2)  # two outputs per chunk
    dense = projector is not None and not kron
    # chunks as large as one capture batch; the output comes in pieces of f_groups rows
    for groups, members in _chunks_by_size(group_ids, k, max(max_points, budget), k):
        for r0, r1, outs in _factored_pieces(
            model, params, x, y, members, fn, budget, vmap_budget, f_groups, projector, weight_fn
        ):
            yield (groups[r0:r1], *(projector(o) if dense else o for o in outs))


def iter_weighted_group_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    group_ids: torch.Tensor,
    k: int,
    fn: Fn,
    weight_fn: Fn,
    *,
    params: dict[str, torch.Tensor] | None = None,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_points: int = 2048,
    max_elems: int = 32_000_000,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stream two group gradients from one factored forward/backward per chunk.

    With w_i = weight_fn(logits_i, y_i) held constant (computed from the same forward pass):

        plain_G    = [P^T] grad sum_{i in G} fn(z_i)
        weighted_G = [P^T] sum_{i in G} w_i grad fn(z_i)

    TRAK's group kernel needs both for fn = margin: the group margin features and, with
    w_i = -(1 - p_i), the group loss gradient (grad loss_i = -(1 - p_i) grad margin_i for
    cross-entropy), so one capture pass replaces two. Factored backend only.

    Raises:
        UncoveredParams: (a ValueError, before the first chunk is yielded) a selected
            parameter has no layer rule, or an input layout its rule does not take; use two
            :func:`iter_group_gradients` passes instead.

    Yields:
        (groups (c,) long, plain (c, d), weighted (c, d)).
    """
    if params is None:
        params = select_params(model)
    rest = split_params(model, params)
    if rest:
        raise UncoveredParams(rest)
    yield from _iter_factored(
        model, x, y, group_ids, k, fn, params, projector, max_points, max_elems, weight_fn
    )


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
