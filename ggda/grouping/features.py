"""Feature spaces for clustering the training set.

- ``inputs``: flattened inputs, standardised per feature.
- ``representations``: penultimate activations h of the trained model (``net.features``).
- ``gradients`` (Grad-K-Means): closed-form per-sample gradient features from one forward
  pass. ``last_layer``: the head's parameter gradient (softmax(o) - onehot(y)) outer [h; 1]
  (flattened, randomly projected when larger than ``proj_dim``); ``logits``: softmax(o) -
  onehot(y); ``penultimate``: the gradient w.r.t. h, W^T (softmax(o) - onehot(y)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ggda.errors import GGDAError, check_choice
from ggda.gradients.projection import (
    PROJ_STRUCTURES,
    RandomProjector,
    kron_dims,
    random_matrix,
)

FEATURES = ("inputs", "representations", "gradients")
GRADIENT_KINDS = ("last_layer", "logits", "penultimate")


def _need_model(model: nn.Module | None, what: str) -> nn.Module:
    if model is None:
        raise GGDAError(f"grouping features `{what}` need the trained model")
    if not hasattr(model, "features") or not hasattr(model, "head"):
        raise GGDAError(
            f"grouping features `{what}` need a net with `features(x)` and `head`; "
            f"{type(model).__name__} has not got them (use `grouping.features=inputs`)"
        )
    return model


@torch.no_grad()
def _forward_features(
    model: nn.Module, x: torch.Tensor, device, batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (n, H), logits (n, C)) in eval mode, batched."""
    dtype = next(model.parameters()).dtype
    hs, os_ = [], []
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch].to(device)
        if xb.is_floating_point():  # token ids stay integers
            xb = xb.to(dtype)
        h = model.features(xb)
        hs.append(h.flatten(1))
        os_.append(model.head(h))
    return torch.cat(hs), torch.cat(os_)


@torch.no_grad()
def compute_features(
    kind: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    model: nn.Module | None = None,
    *,
    gradient_kind: str = "last_layer",
    proj_dim: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    proj_structure: str = "dense",
) -> torch.Tensor:
    """Features (n, f) of the training set in the chosen space, in the model's dtype.

    For ``gradients`` with err = softmax(o) - onehot(y) (n, C), the gradient of the
    per-sample cross-entropy w.r.t. the logits o = W h + b:

    - ``logits``: err, (n, C);
    - ``penultimate``: err W, (n, H), the gradient w.r.t. h;
    - ``last_layer``: vec(err outer [h; 1]), (n, C (H + 1)): row c holds [dl/dW_c, dl/db_c].
      When C (H + 1) > ``proj_dim`` it is projected to (n, proj_dim) by the seeded
      :class:`RandomProjector` (p = C (H + 1)) without forming the (n, p) matrix;
      with ``proj_structure=kronecker`` it is (err P_out) outer ([h; 1] P_in) flattened,
      P_out (C, d_out), P_in (H + 1, d_in), d_out d_in <= proj_dim (split as in
      :func:`ggda.gradients.projection.kron_dims`), = (P_out kron P_in)^T vec(err outer [h; 1]).

    Args:
        kind: ``inputs`` | ``representations`` | ``gradients``.
        x: (n, *input_shape) inputs.
        y: (n,) labels.
        num_classes: C.
        model: a net with ``features(x) -> h`` and a linear ``head`` (model-based kinds).
        gradient_kind: see above.
        proj_dim: projection size for ``last_layer``.
        seed: projection seed.
        device: where to compute.
        proj_structure: ``dense`` | ``kronecker`` (last-layer projection).
    """
    check_choice("grouping.features", kind, FEATURES)
    check_choice("grouping.proj_structure", proj_structure, PROJ_STRUCTURES)
    if kind == "inputs" and not x.is_floating_point():
        raise GGDAError(
            "grouping.features=inputs clusters raw inputs, but these are integer token ids "
            "(meaningless as coordinates). Use `grouping.features=gradients` or "
            "`grouping.features=representations`."
        )
    if kind == "inputs":
        f = x.flatten(1).to(device)
        if not f.is_floating_point():
            f = f.float()
        # Constant features (e.g. MNIST border pixels) stay 0 instead of dividing by 0.
        return (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
    model = _need_model(model, kind)
    was_training = model.training
    model.eval()
    try:
        h, logits = _forward_features(model, x, device)
    finally:
        model.train(was_training)
    if kind == "representations":
        return h
    check_choice("grouping.gradient_kind", gradient_kind, GRADIENT_KINDS)
    err = torch.softmax(logits, -1) - F.one_hot(y.to(logits.device), num_classes).to(logits.dtype)
    if gradient_kind == "logits":
        return err
    if gradient_kind == "penultimate":
        # d loss / d h = W^T (softmax(o) - onehot(y)), rows: err (n, C) @ W (C, H).
        return err @ model.head.weight
    # d loss / d W = err outer h, d loss / d b = err: flatten err outer [h; 1].
    h1 = torch.cat([h, torch.ones_like(h[:, :1])], 1)
    p = err.shape[1] * h1.shape[1]
    if p <= proj_dim:
        return (err[:, :, None] * h1[:, None, :]).flatten(1)
    if proj_structure == "kronecker":
        d_out, d_in = kron_dims(err.shape[1], h1.shape[1], proj_dim)
        p_out = random_matrix(err.shape[1], d_out, seed * 2 + 1, "rademacher", h1.device, h1.dtype)
        p_in = random_matrix(h1.shape[1], d_in, seed * 2 + 2, "rademacher", h1.device, h1.dtype)
        return ((err @ p_out)[:, :, None] * (h1 @ p_in)[:, None, :]).flatten(1)
    # Project without forming (n, C*(H+1)): (err outer h1) P = sum_c err_c (h1 P_c),
    # with P reshaped to (C, H+1, d).
    P = RandomProjector(p, proj_dim, seed=seed).matrix(h1.device, h1.dtype)
    P = P.reshape(err.shape[1], h1.shape[1], proj_dim)
    return torch.einsum("nc,nh,chd->nd", err, h1, P)
