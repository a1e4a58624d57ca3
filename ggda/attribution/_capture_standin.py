"""Local stand-in for ``ggda.gradients.layers.capture_factors`` (same signature and semantics).

Covers ``nn.Linear`` (plain rows and token positions), ``nn.Conv2d`` (groups = 1, zero
padding given as integers; patches by ``F.unfold``), ``nn.Embedding`` and ``nn.BatchNorm2d``
in eval mode (running statistics). Any other selected parameter is reported as uncovered.
To be replaced by the real module at merge time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LayerFactors:
    """One supported layer's per-example factors from one batched forward/backward.

    Attributes:
        name: qualified module name.
        module: the module.
        kind: ``linear`` | ``conv2d`` | ``embedding`` | ``norm``.
        a: linear (N, T, in); conv2d (N, T, C_in*kh*kw) patches; embedding (N, T) ids;
            norm (N, T, C) normalised inputs.
        g: (N, T, out) gradient of sum_i fn(z_i) w.r.t. the layer output per position
            (embedding: zero where the id is ``padding_idx``).
        weight, bias: the parameters' names in ``params`` when selected, else None.
    """

    name: str
    module: nn.Module
    kind: str
    a: torch.Tensor
    g: torch.Tensor
    weight: str | None
    bias: str | None


def _kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Conv2d):
        ok = mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
        return "conv2d" if ok else None
    if isinstance(mod, nn.Embedding):
        return "embedding" if mod.max_norm is None else None
    if isinstance(mod, nn.BatchNorm2d) and mod.affine and mod.track_running_stats:
        return "norm"
    return None


def _inputs(kind: str, mod: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    if kind == "linear":
        return x.reshape(n, -1, mod.in_features)
    if kind == "conv2d":
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        return cols.transpose(1, 2)  # (N, H_out*W_out, C_in*kh*kw)
    if kind == "embedding":
        return x.reshape(n, -1)
    # BatchNorm2d in eval mode: x_hat from the running statistics, channels last
    mean = mod.running_mean[None, :, None, None]
    var = mod.running_var[None, :, None, None]
    xh = (x - mean) / torch.sqrt(var + mod.eps)
    return xh.flatten(2).transpose(1, 2)


def _grads(kind: str, mod: nn.Module, g: torch.Tensor, a: torch.Tensor, n: int) -> torch.Tensor:
    if kind in ("conv2d", "norm"):
        return g.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C)
    out = g.reshape(n, -1, g.shape[-1])
    if kind == "embedding" and mod.padding_idx is not None:
        out = out * (a != mod.padding_idx).unsqueeze(-1).to(out.dtype)
    return out


def capture_factors(
    model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, fn: Fn
) -> tuple[list[LayerFactors], list[str]]:
    """One batched forward/backward of sum_i fn(model(x)_i, y_i) with hooks.

    Returns the factors of every supported layer owning a parameter in ``params`` (module
    order) and the names of the selected parameters no rule covers. Point i's gradients:
    linear/conv ``sum_t g_it a_it^T``; embedding ``sum_t onehot(a_it) g_it^T``; norm
    ``sum_t g_it * a_it``; bias ``sum_t g_it``.
    """
    n = y.shape[0]
    chosen = []
    covered: set[str] = set()
    for mname, mod in model.named_modules():
        kind = _kind(mod)
        if kind is None:
            continue
        pre = f"{mname}." if mname else ""
        w = f"{pre}weight" if f"{pre}weight" in params else None
        b = f"{pre}bias" if f"{pre}bias" in params else None
        if w or b:
            chosen.append((mname, mod, kind, w, b))
            covered.update(v for v in (w, b) if v)
    uncovered = [k for k in params if k not in covered]
    ins: list[list[torch.Tensor]] = [[] for _ in chosen]
    outs: list[list[torch.Tensor]] = [[] for _ in chosen]

    def keeper(i: int):
        def keep(mod, inp, out):
            ins[i].append(inp[0].detach())
            outs[i].append(out)

        return keep

    handles = [c[1].register_forward_hook(keeper(i)) for i, c in enumerate(chosen)]
    try:
        with torch.enable_grad():
            total = fn(model(x), y).sum()
            flat = [o for os_ in outs for o in os_]
            grads = list(torch.autograd.grad(total, flat, allow_unused=True)) if flat else []
    finally:
        for h in handles:
            h.remove()
    res = []
    for i, (mname, mod, kind, w, b) in enumerate(chosen):
        a_parts, g_parts = [], []
        for inp, out in zip(ins[i], outs[i], strict=True):
            gr = grads.pop(0)
            gr = torch.zeros_like(out) if gr is None else gr.detach()
            a = _inputs(kind, mod, inp, n)
            a_parts.append(a)
            g_parts.append(_grads(kind, mod, gr, a, n))
        if not a_parts:  # not used in the forward pass: one zero position
            p0 = next(mod.parameters())
            if kind == "embedding":
                a_parts = [torch.full((n, 1), 0, dtype=torch.long, device=x.device)]
                g_parts = [torch.zeros(n, 1, mod.embedding_dim, dtype=p0.dtype, device=x.device)]
            else:
                d_in = p0[0].numel() if kind != "norm" else p0.numel()
                d_out = p0.shape[0]
                a_parts = [torch.zeros(n, 1, d_in, dtype=p0.dtype, device=x.device)]
                g_parts = [torch.zeros(n, 1, d_out, dtype=p0.dtype, device=x.device)]
        res.append(
            LayerFactors(mname, mod, kind, torch.cat(a_parts, 1), torch.cat(g_parts, 1), w, b)
        )
    return res, uncovered
