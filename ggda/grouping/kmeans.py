"""K-means groups, batched in torch, on inputs, representations or gradient features."""

from __future__ import annotations

import time

import torch

from ggda.errors import check_choice, check_float, check_int
from ggda.grouping.base import Grouper, Grouping, GroupingInputs
from ggda.grouping.features import FEATURES, GRADIENT_KINDS, compute_features


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (n, k) via ||x||^2 - 2 x.c + ||c||^2, clamped at 0."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return d.clamp_min_(0)


def assign(
    x: torch.Tensor, c: torch.Tensor, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre per row, in chunks: (labels (n,), squared distance (n,))."""
    labels, dists = [], []
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s : s + chunk], c)
        m, a = d.min(1)
        labels.append(a)
        dists.append(m)
    return torch.cat(labels), torch.cat(dists)


def kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling): (n, f) -> centres (k, f)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # all remaining points coincide with centres
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centres)


def lloyd(
    x: torch.Tensor, k: int, iters: int, seed: int, init: str = "k-means++", tol: float = 1e-4
) -> torch.Tensor:
    """Lloyd's k-means with exactly k non-empty clusters: (n, f) -> labels (n,).

    Empty clusters are re-seeded at the points farthest from their centres, and a final
    repair moves single points into any cluster still empty.
    """
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    if init == "k-means++":
        c = kmeans_pp(x, k, g)
    else:
        c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    prev = None
    for _ in range(iters):
        labels, d = assign(x, c)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        empty = (counts == 0).nonzero().squeeze(1)
        c = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        if len(empty):
            far = torch.argsort(d, descending=True)[: len(empty)]
            c[empty] = x[far]
        inertia = float(d.sum())
        if prev is not None and abs(prev - inertia) <= tol * max(prev, 1e-12) and not len(empty):
            break
        prev = inertia
    labels, d = assign(x, c)
    return _fill_empty(labels, d, k)


def _fill_empty(labels: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Move the worst-fitting points of multi-member clusters into empty clusters."""
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().squeeze(1).tolist()
    if not empty:
        return labels
    order = torch.argsort(d, descending=True).tolist()
    for i in order:
        if not empty:
            break
        if counts[labels[i]] > 1:
            counts[labels[i]] -= 1
            j = empty.pop()
            labels[i] = j
            counts[j] += 1
    return labels


class KMeansGrouper(Grouper):
    """K-means clustering of the training set in a chosen feature space.

    Args:
        groups: k (int) or a fraction of n.
        features: ``inputs`` | ``representations`` | ``gradients``.
        gradient_kind: for ``gradients``: ``last_layer`` | ``logits`` | ``penultimate``.
        proj_dim: projection size of last-layer gradient features.
        iters: maximum Lloyd iterations.
        init: ``k-means++`` or ``random``.
        tol: relative inertia change that stops the iterations.
        seed: initialisation seed.
    """

    name = "kmeans"

    def __init__(
        self,
        groups: int | float | None = None,
        features: str = "inputs",
        gradient_kind: str = "last_layer",
        proj_dim: int = 256,
        iters: int = 50,
        init: str = "k-means++",
        tol: float = 1e-4,
        seed: int = 0,
    ) -> None:
        super().__init__(groups, seed)
        self.features = check_choice("grouping.features", features, FEATURES)
        self.gradient_kind = check_choice("grouping.gradient_kind", gradient_kind, GRADIENT_KINDS)
        self.proj_dim = check_int("grouping.proj_dim", proj_dim, 1)
        self.iters = check_int("grouping.iters", iters, 1)
        self.init = check_choice("grouping.init", init, ("k-means++", "random"))
        self.tol = check_float("grouping.tol", tol, 0.0)
        self.timings: dict[str, float] = {}

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return self.features != "inputs"

    def group(self, inputs: GroupingInputs) -> Grouping:
        n = int(inputs.y.shape[0])
        k = self.k_for(n)
        t0 = time.perf_counter()
        f = compute_features(
            self.features,
            inputs.x,
            inputs.y,
            inputs.num_classes,
            inputs.model,
            gradient_kind=self.gradient_kind,
            proj_dim=self.proj_dim,
            seed=self.seed,
            device=inputs.device,
        )
        t1 = time.perf_counter()
        labels = lloyd(f, k, self.iters, self.seed, self.init, self.tol)
        t2 = time.perf_counter()
        self.timings = {"grouping_features": t1 - t0, "clustering": t2 - t1}
        return Grouping(labels.cpu(), k)
