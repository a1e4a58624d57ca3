"""The shared primitive: summed gradients per group, batched; per-sample gradients for k = n.

For a grouping with k groups, row j of the result is grad_theta sum_{i in G_j} fn(z_i),
optionally randomly projected. Three paths compute the same thing:

- ``vmap`` (default): groups are padded to a common size inside a chunk of groups of
  similar size, and ``torch.func.vmap(grad)`` runs one batched forward/backward per chunk.
  With singleton groups this *is* the chunked per-sample path.
- ``loop``: one plain autograd backward per group; the simple reference the tests use.

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
BACKENDS = ("vmap", "loop")


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
        backend: ``vmap`` (batched) or ``loop`` (one backward per group, reference).
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
