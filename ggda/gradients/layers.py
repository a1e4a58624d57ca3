"""Per-layer factor capture: one batched forward/backward gives every per-example gradient.

In eval mode points do not interact, so for a layer with parameters the gradient of
sum_i fn(z_i) w.r.t. the layer's output at point i and position t, g_it, together with
what the layer saw, a_it, determines point i's parameter gradient exactly. One small
rule per layer type says what a is and how the gradient is formed from (a, g):

==========  ====================================  ======================================
kind        a (per point, per position t)          point i's gradient
==========  ====================================  ======================================
linear      input row (in,)                        W: sum_t g_it a_it^T, b: sum_t g_it
conv2d      unfolded input patch (C_in kh kw,)     W: sum_t g_it a_it^T (reshaped), b as above
embedding   token id                               W: sum_t onehot(a_it) g_it^T
norm        normalised input x_hat (C,)            gamma: sum_t g_it * a_it, beta: sum_t g_it
==========  ====================================  ======================================

T counts positions: 1 for plain rows, tokens for sequences, H_out W_out for a conv, and
a layer called twice contributes both calls' positions. A module type with no rule (or a
configuration a rule does not cover: grouped convs, training-mode batch-norm, ...) leaves
its parameters to the ``vmap`` fallback; :func:`split_params` says which.

Differentiating the live module, these rules need the layer's output to be used out of
place (an in-place op on it, e.g. ``ReLU(inplace=True)`` right after, would change the
tensor whose gradient is read).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("linear", "conv2d", "embedding", "norm")


class LayerFactors:
    """One supported layer's per-example factors from one batched forward/backward.

    Attributes:
        name: qualified module name in the net (``model.named_modules()``).
        module: the layer.
        kind: ``linear`` | ``conv2d`` | ``embedding`` | ``norm``.
        a: linear (N, T, in) inputs; conv2d (N, T, C_in kh kw) unfolded patches in the
            column order of ``weight.reshape(C_out, -1)``; embedding (N, T) long ids;
            norm (N, T, C) normalised inputs x_hat. For conv2d it is unfolded lazily, on
            first access: ``F.unfold`` costs far more than the layer's own backward, and
            the group gradient does not need it (see :func:`group_layer_gradients`).
        g: (N, T, out) gradient of sum_i fn(z_i) w.r.t. the layer output per position
            (embedding: zero where the id is ``padding_idx``).
        weight: the weight's name in ``params`` when selected, else None.
        bias: the bias's name in ``params`` when selected, else None.
        conv_uses: conv2d only: per use of the layer in the forward pass, its input
            (N, C_in, H, W) and output gradient (N, C_out, H', W'); ``a`` is their unfold.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        kind: str,
        a: torch.Tensor | None,
        g: torch.Tensor,
        weight: str | None,
        bias: str | None,
        conv_uses: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if a is None and not conv_uses:
            raise ValueError("LayerFactors needs `a` or, for conv2d, `conv_uses`")
        self.name, self.module, self.kind = name, module, kind
        self._a, self.g, self.weight, self.bias = a, g, weight, bias
        self.conv_uses = conv_uses

    def scaled(self, w: torch.Tensor) -> LayerFactors:
        """The factors of sum_i w_i fn(z_i), for w (N,) held constant.

        Each point's output gradient times w_i; the inputs are shared (a layer's gradient
        is linear in g).
        """
        uses = None
        if self.conv_uses:
            uses = [(x, gout * w.to(gout).reshape(-1, 1, 1, 1)) for x, gout in self.conv_uses]
        g = self.g * w.to(self.g)[:, None, None]
        return LayerFactors(
            self.name, self.module, self.kind, self._a, g, self.weight, self.bias, uses
        )

    def select(self, p0: int, p1: int) -> LayerFactors:
        """The factors of points [p0, p1) (views; conv patches stay lazy)."""
        uses = [(x[p0:p1], gout[p0:p1]) for x, gout in self.conv_uses] if self.conv_uses else None
        a = self._a[p0:p1] if self._a is not None else None
        return LayerFactors(
            self.name, self.module, self.kind, a, self.g[p0:p1], self.weight, self.bias, uses
        )

    @property
    def a(self) -> torch.Tensor:
        """The layer-input factor (see the class docstring); conv patches on first use."""
        if self._a is None:
            n = self.g.shape[0]
            self._a = torch.cat([_unfold(self.module, x, n) for x, _ in self.conv_uses], 1)
        return self._a

    def a_times(self, mat: torch.Tensor) -> torch.Tensor:
        """``a @ mat`` (N, T, r) for mat (a_width, r), without unfolding conv patches.

        For conv2d, unfold(x) @ mat is the convolution of x with mat^T as r filters of
        shape (C_in, kh, kw), which the conv kernel computes without the im2col copy
        (F.unfold dominated the Kronecker-projected pass of the CNN: 8.5 of 17.9 s).
        """
        if self.kind != "conv2d" or self._a is not None:
            return self.a @ mat
        mod = self.module
        w = mat.T.reshape(mat.shape[1], mod.in_channels, *mod.kernel_size)
        n = self.g.shape[0]
        outs = [
            F.conv2d(x if x.ndim == 4 else x[None], w, None, mod.stride, mod.padding, mod.dilation)
            .flatten(2)
            .transpose(1, 2)
            .reshape(n, -1, mat.shape[1])
            for x, _ in self.conv_uses
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    @property
    def a_width(self) -> int:
        """Last dimension of ``a`` without forming it (embedding: 1, the token id)."""
        if self.kind == "conv2d":
            return self.module.in_channels * math.prod(self.module.kernel_size)
        return 1 if self.kind == "embedding" else self._a.shape[-1]

    @property
    def a_numel(self) -> int:
        """Entries of ``a`` without forming it."""
        return self.g.shape[0] * self.g.shape[1] * self.a_width

    @property
    def positions(self) -> int:
        """T."""
        return self.a.shape[1]

    @property
    def rows(self) -> int:
        """Rows of the weight as a matrix (out; embedding: vocabulary size; norm: C)."""
        if self.kind == "embedding":
            return self.module.num_embeddings
        return self.g.shape[-1]

    @property
    def cols(self) -> int:
        """Columns of the weight as a matrix (in; conv: C_in kh kw; embedding: dim; norm: 1)."""
        if self.kind == "embedding":
            return self.g.shape[-1]
        if self.kind == "norm":
            return 1
        return self.a_width


# -- rules: what a layer saw (a) and how its output gradient is laid out (g) --------------
# Each rule: supports(module) -> bool, kind, factor(module, input, output, grad_output)
# -> (a (N, T, .), g (N, T, out)), and the widths of a zero stand-in for an unused layer.


def _lead(x: torch.Tensor, n: int, width: int) -> torch.Tensor:
    return x.reshape(n, -1, width)


class _Linear:
    kind = "linear"
    types = (nn.Linear,)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        return True

    @staticmethod
    def factor(mod, inp, out, gout, n):
        # any leading dims (tokens, ...) become positions
        return _lead(inp, n, mod.in_features), _lead(gout, n, mod.out_features)

    @staticmethod
    def widths(mod):
        return mod.in_features, mod.out_features


class _Conv2d:
    kind = "conv2d"
    types = (nn.Conv2d,)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        # F.unfold reproduces zero padding only; grouped convs have block-diagonal weights
        return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)

    @staticmethod
    def factor(mod, inp, out, gout, n):
        if inp.ndim == 3:  # unbatched (C, H, W) inside a caller's loop
            inp, gout = inp[None], gout[None]
        g = gout.flatten(2).transpose(1, 2).reshape(n, -1, mod.out_channels)
        return None, g, (inp, gout)

    @staticmethod
    def widths(mod):
        return mod.in_channels * math.prod(mod.kernel_size), mod.out_channels


def _unfold(mod: nn.Conv2d, inp: torch.Tensor, n: int) -> torch.Tensor:
    """Unfold conv inputs (N, C_in, H, W) into patches (N, L, C_in kh kw).

    Columns are channel-major: the order of ``weight.reshape(C_out, -1)``.
    """
    patches = F.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
    return patches.transpose(1, 2).reshape(n, -1, patches.shape[1])


class _Embedding:
    kind = "embedding"
    types = (nn.Embedding,)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        # max_norm renormalises the weight inside forward; scale_grad_by_freq couples points
        return mod.max_norm is None and not mod.scale_grad_by_freq

    @staticmethod
    def factor(mod, inp, out, gout, n):
        ids = inp.reshape(n, -1)
        g = gout.reshape(n, -1, mod.embedding_dim)
        if mod.padding_idx is not None:  # torch never updates the padding row
            g = g * (ids != mod.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    @staticmethod
    def widths(mod):
        return None, mod.embedding_dim


class _EmbeddingBag:
    """2-d input (N, L) (fixed-length bags), mode sum or mean, no per-sample weights.

    The bag's output gradient reaches each of its tokens, divided by the bag's count of
    non-padding tokens for ``mean``.
    """

    kind = "embedding"
    types = (nn.EmbeddingBag,)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        return mod.mode in ("sum", "mean") and mod.max_norm is None and not mod.scale_grad_by_freq

    @staticmethod
    def accepts(inp: tuple) -> bool:
        extra = [t for t in inp[1:] if t is not None]
        return inp[0].ndim == 2 and not extra

    @staticmethod
    def factor(mod, inp, out, gout, n):
        ids = inp.reshape(n, -1)
        keep = torch.ones_like(ids, dtype=gout.dtype)
        if mod.padding_idx is not None:
            keep = (ids != mod.padding_idx).to(gout.dtype)
        if mod.mode == "mean":
            keep = keep / keep.sum(1, keepdim=True).clamp_min(1.0)
        g = gout.reshape(n, 1, mod.embedding_dim) * keep.unsqueeze(-1)
        return ids, g

    @staticmethod
    def widths(mod):
        return None, mod.embedding_dim


class _BatchNorm:
    """Eval-mode batch-norm (running statistics), so points do not interact."""

    kind = "norm"
    types = (nn.BatchNorm1d, nn.BatchNorm2d)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        return mod.affine and mod.track_running_stats and mod.running_mean is not None

    @staticmethod
    def active(mod: nn.Module) -> bool:
        return not mod.training  # checked at capture time: the mode can change

    @staticmethod
    def factor(mod, inp, out, gout, n):
        shape = [1, -1] + [1] * (inp.ndim - 2)
        xhat = (inp - mod.running_mean.view(shape)) * torch.rsqrt(
            mod.running_var.view(shape) + mod.eps
        )
        c = mod.num_features
        if inp.ndim == 2:
            return xhat.reshape(n, 1, c), gout.reshape(n, 1, c)
        return (
            xhat.flatten(2).transpose(1, 2).reshape(n, -1, c),
            gout.flatten(2).transpose(1, 2).reshape(n, -1, c),
        )

    @staticmethod
    def widths(mod):
        return mod.num_features, mod.num_features


class _LayerNorm:
    kind = "norm"
    types = (nn.LayerNorm,)

    @staticmethod
    def supports(mod: nn.Module) -> bool:
        return mod.elementwise_affine

    @staticmethod
    def factor(mod, inp, out, gout, n):
        xhat = F.layer_norm(inp, mod.normalized_shape, None, None, mod.eps)
        c = math.prod(mod.normalized_shape)
        return xhat.reshape(n, -1, c), gout.reshape(n, -1, c)

    @staticmethod
    def widths(mod):
        c = math.prod(mod.normalized_shape)
        return c, c


RULES = (_Linear, _Conv2d, _Embedding, _EmbeddingBag, _BatchNorm, _LayerNorm)


def rule_for(mod: nn.Module):
    """The rule covering this module, or None (exact type match: a subclass may differ)."""
    for r in RULES:
        if type(mod) in r.types and r.supports(mod) and getattr(r, "active", lambda m: True)(mod):
            return r
    return None


def _qual(mname: str, pname: str) -> str:
    return f"{mname}.{pname}" if mname else pname


def supported_layers(
    model: nn.Module, params: dict[str, torch.Tensor]
) -> tuple[list[tuple[str, nn.Module, object, str | None, str | None]], list[str]]:
    """Split ``params`` into layers a rule covers and the rest.

    Returns:
        ([(module name, module, rule, weight name or None, bias name or None)] in module
        order, [names of the selected parameters no rule covers] in ``params`` order).
    """
    covered: set[str] = set()
    layers = []
    for mname, mod in model.named_modules():
        own = [_qual(mname, pn) for pn, _ in mod.named_parameters(recurse=False)]
        mine = [nm for nm in own if nm in params]
        if not mine:
            continue
        rule = rule_for(mod)
        if rule is None:
            continue
        w, b = _qual(mname, "weight"), _qual(mname, "bias")
        if not set(mine) <= {w, b}:
            continue  # a parameter the rule does not know: leave the module to the fallback
        layers.append((mname, mod, rule, w if w in params else None, b if b in params else None))
        covered.update(mine)
    return layers, [nm for nm in params if nm not in covered]


def split_params(model: nn.Module, params: dict[str, torch.Tensor]) -> list[str]:
    """Names of the selected parameters that no layer rule covers (the vmap fallback)."""
    return supported_layers(model, params)[1]


def capture_factors(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    fn: Fn,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> tuple[list[LayerFactors], list[str]]:
    """One ordinary batched forward/backward of sum_i fn(model(x)_i, y_i) with hooks.

    Returns the factors of every supported layer owning a parameter in ``params`` (module
    order) and the names of the selected parameters no rule covers (for the vmap
    fallback). T = 1 for plain rows; T > 1 for token positions, conv positions, or a layer
    used twice. Point i's weight gradient: linear/conv: sum_t g_it a_it^T (conv reshaped
    to weight.shape); embedding: sum_t onehot(a_it) g_it^T; norm: sum_t g_it * a_it;
    bias: sum_t g_it. No ``.grad`` is written on the model.

    Args:
        model: the net (eval mode); ``params`` must be its own parameters (detached views
            as :func:`ggda.gradients.select_params` returns them).
        params: the selected parameters by qualified name.
        x: (N, ...) inputs on the model's device.
        y: (N,) labels.
        fn: per-example scalar function ``(logits (N, C), y (N,)) -> (N,)``.
        on_logits: called with the forward pass's detached logits (N, C), for callers
            that weight the points by the model's output without a second forward.
    """
    layers, rest = supported_layers(model, params)
    n = y.shape[0]
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    bad: list[bool] = [False] * len(layers)

    def keeper(i: int, rule):
        def keep(mod, inp, out):
            if hasattr(rule, "accepts") and not rule.accepts(inp):
                bad[i] = True
                return
            seen[i].append((inp[0].detach(), out))

        return keep

    handles = [
        mod.register_forward_hook(keeper(i, rule)) for i, (_, mod, rule, _, _) in enumerate(layers)
    ]
    try:
        with torch.enable_grad():
            logits = model(x)
            if on_logits is not None:
                on_logits(logits.detach())
            total = fn(logits, y).sum()
            outs = [o for s in seen for _, o in s]
            grads = torch.autograd.grad(total, outs, allow_unused=True) if outs else ()
    finally:
        for h in handles:
            h.remove()
    if any(bad):  # an input layout the rule does not cover: those params go to the fallback
        moved = {nm for i, lay in enumerate(layers) if bad[i] for nm in lay[3:] if nm}
        keep_layers = [i for i in range(len(layers)) if not bad[i]]
        rest = [nm for nm in params if nm in set(rest) | moved]
    else:
        keep_layers = list(range(len(layers)))
    res: list[LayerFactors] = []
    gi = iter(grads)
    per_layer_grads = []
    for s in seen:
        per_layer_grads.append([next(gi) for _ in s])
    p0 = next(iter(params.values()))
    for i in keep_layers:
        mname, mod, rule, w, b = layers[i]
        a_parts, g_parts, uses = [], [], []
        for (inp, out), gout in zip(seen[i], per_layer_grads[i], strict=True):
            gout = torch.zeros_like(out) if gout is None else gout.detach()
            a_, g_, *raw = rule.factor(mod, inp, out.detach(), gout, n)
            a_parts.append(a_)
            g_parts.append(g_)
            uses += raw  # conv2d: (input, output gradient), unfolded only when asked
        if not a_parts:  # the layer took no part in the forward pass: zero gradient
            wa, wg = rule.widths(mod)
            if wa is None:
                a_parts = [torch.zeros(n, 1, dtype=torch.long, device=p0.device)]
            else:
                a_parts = [torch.zeros(n, 1, wa, dtype=p0.dtype, device=p0.device)]
            g_parts = [torch.zeros(n, 1, wg, dtype=p0.dtype, device=p0.device)]
            uses = []
        a = None if uses else _cat_positions(a_parts)
        res.append(
            LayerFactors(mname, mod, rule.kind, a, _cat_positions(g_parts), w, b, uses or None)
        )
    return res, rest


def _cat_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate a layer's uses along positions; one use is returned as is.

    That one is often a transposed view: copying the conv/norm output gradients cost 15 %
    of ResNet-9's pass.
    """
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


# -- per-layer gradients from factors ------------------------------------------------------


def layer_numel(f: LayerFactors) -> int:
    """Entries of the layer's selected parameters."""
    out = 0
    if f.weight is not None:
        out += f.module.weight.numel()
    if f.bias is not None:
        out += f.module.bias.numel()
    return out


def group_layer_gradients(f: LayerFactors, slot: torch.Tensor, c: int) -> dict[str, torch.Tensor]:
    """Per-group gradients of one layer's selected parameters, each (c, *param.shape).

    Args:
        f: the layer's factors over N points.
        slot: (N,) long in [0, c): the group (row of the result) of each point.
        c: number of groups.

    The segment sum runs over a group's points and positions: linear/conv as one bmm over
    group-padded factors, embedding as an ``index_add`` into (c, vocab, dim), norm and
    bias as sums. Nothing per point x parameter is formed.
    """
    out: dict[str, torch.Tensor] = {}
    g = f.g
    n, t = g.shape[:2]
    if f.weight is not None:
        wshape = f.module.weight.shape
        if f.conv_uses:
            out[f.weight] = _conv_group_weight_grad(f, slot, c)
        elif f.kind in ("linear", "conv2d"):
            gp, ap, _ = _pad_by_group(slot, c, g, f.a)
            w = torch.bmm(gp.transpose(1, 2), ap)  # (c, out, in')
            out[f.weight] = w.reshape(c, *wshape)
        elif f.kind == "embedding":
            vocab, dim = wshape
            w = g.new_zeros(c * vocab, dim)
            idx = (slot[:, None] * vocab + f.a).reshape(-1)
            w.index_add_(0, idx, g.reshape(-1, dim))
            out[f.weight] = w.reshape(c, vocab, dim)
        else:  # norm: sum_t g * x_hat
            per = (g * f.a).sum(1)
            out[f.weight] = per.new_zeros(c, per.shape[1]).index_add_(0, slot, per)
    if f.bias is not None:
        per = g.sum(1)
        out[f.bias] = per.new_zeros(c, per.shape[1]).index_add_(0, slot, per)
    return out


def token_segments(
    f: LayerFactors, slot: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum an embedding layer's per-position ``values`` over each (group, token) pair.

    A group's embedding gradient (and anything linear in it) has non-zero rows only for
    the tokens its points use; this is its sparse form.

    Args:
        f: embedding factors over N points (``f.a`` (N, T) token ids).
        slot: (N,) group (row) of each point.
        values: (N, T, w) per-position values, e.g. ``f.g`` or ``f.g @ P``.

    Returns:
        row (U,), tok (U,) in (row, tok) order, sums (U, w): one entry per distinct pair,
        padding positions dropped (their gradient is zero).
    """
    vocab = f.module.weight.shape[0]
    ids, vals = f.a.reshape(-1), values.reshape(-1, values.shape[-1])
    owner = slot[:, None].expand(f.a.shape).reshape(-1)
    pad = f.module.padding_idx
    if pad is not None:
        keep = ids != pad
        ids, vals, owner = ids[keep], vals[keep], owner[keep]
    uk, inv = torch.unique(owner * vocab + ids, return_inverse=True)  # sorted keys
    sums = vals.new_zeros(uk.numel(), vals.shape[1]).index_add_(0, inv, vals)
    return uk // vocab, uk % vocab, sums


def sparse_csr(
    row: torch.Tensor,
    col: torch.Tensor,
    vals: torch.Tensor,
    shape: tuple[int, int],
    ordered: bool = False,
) -> torch.Tensor:
    """The sparse matrix (shape) with entries S[row, col] = vals (distinct pairs), as CSR.

    CSR times dense runs at matmul speed on CPU and CUDA; ``ordered`` says the entries
    are already in (row, col) order.
    """
    if not ordered:
        order = torch.argsort(row * shape[1] + col)
        row, col, vals = row[order], col[order], vals[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=shape[0]), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, vals, size=shape, check_invariants=False)


def sparse_matmul(
    row: torch.Tensor,
    col: torch.Tensor,
    vals: torch.Tensor,
    shape: tuple[int, int],
    dense: torch.Tensor,
    ordered: bool = False,
) -> torch.Tensor:
    """S @ dense for S = :func:`sparse_csr` (row, col, vals, shape)."""
    return sparse_csr(row, col, vals, shape, ordered) @ dense


def _conv_group_weight_grad(f: LayerFactors, slot: torch.Tensor, c: int) -> torch.Tensor:
    """Per-group conv weight gradients (c, C_out, C_in, kh, kw) without unfolding.

    The points are laid out group-major and zero-padded to the largest group size s, then
    the c groups become the channel groups of one grouped convolution's weight gradient:
    input (s, c C_in, H, W), output gradient (s, c C_out, H', W'), ``groups = c`` gives
    sum over a group's points and positions of g_t a_t^T for each group at once, which is
    the layer's own (fast, im2col-free) weight backward. Zero padding adds nothing.
    """
    mod = f.module
    total = None
    for inp, gout in f.conv_uses:
        xp, gp, s = _pad_by_group(slot, c, inp.flatten(1)[:, None], gout.flatten(1)[:, None])
        xp = xp.reshape(c, s, *inp.shape[1:]).transpose(0, 1).reshape(s, -1, *inp.shape[2:])
        gp = gp.reshape(c, s, *gout.shape[1:]).transpose(0, 1).reshape(s, -1, *gout.shape[2:])
        w = torch.nn.grad.conv2d_weight(
            xp,
            (c * mod.out_channels, mod.in_channels, *mod.kernel_size),
            gp,
            stride=mod.stride,
            padding=mod.padding,
            dilation=mod.dilation,
            groups=c,
        )
        w = w.reshape(c, *mod.weight.shape)
        total = w if total is None else total + w
    return total


def _pad_by_group(slot: torch.Tensor, c: int, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Lay (N, T, w) tensors out per group as (c, s T, w), zero-padded; s = largest group.

    Returns the padded tensors and s. Free when the points are already group-major with
    equal group sizes.
    """
    n, t = ts[0].shape[:2]
    sizes = torch.bincount(slot, minlength=c)
    s = int(sizes.max()) if n else 0
    if c * s == n and bool(
        (slot == torch.arange(c, device=slot.device).repeat_interleave(s)).all()
    ):
        return (*(x.reshape(c, s * t, x.shape[-1]) for x in ts), s)
    order = torch.argsort(slot, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    sorted_slot = slot[order]
    pos = torch.arange(n, device=slot.device) - starts[sorted_slot]
    outs = []
    for x in ts:
        buf = x.new_zeros(c, s, t, x.shape[-1])
        buf[sorted_slot, pos] = x[order]
        outs.append(buf.reshape(c, s * t, x.shape[-1]))
    return (*outs, s)
