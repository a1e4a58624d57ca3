"""K-means groups, batched in torch, on inputs, representations or gradient features.

Everything runs as dense tensor ops on the features' device (the model's device): the
assignment step is one GEMM per chunk, k-means++ draws its centres in a few batched rounds
instead of k sequential steps, and the balanced (equal-size) assignment and the repair of
empty clusters are sorts and scatters, never a Python loop over points or clusters.
"""

from __future__ import annotations

import math
import time

import torch

from ggda.errors import check_choice, check_float, check_int
from ggda.grouping.base import Grouper, Grouping, GroupingInputs
from ggda.grouping.classwise import split_k_by_class
from ggda.grouping.features import FEATURES, GRADIENT_KINDS, compute_features

INITS = ("k-means++", "random")
# k-means++ draws its centres in at most this many rounds (exact k-means++ when k <= 33).
PP_ROUNDS = 32
# capacity_assign keeps the (n, k) distance matrix when it has at most this many entries.
DENSE_ASSIGN = 1 << 25


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances (n, k) via ||x||^2 - 2 x.c + ||c||^2, clamped at 0."""
    if c_sq is None:
        c_sq = (c * c).sum(1)
    d = torch.addmm(c_sq[None, :], x, c.T, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_min_(0)


def assign(
    x: torch.Tensor, c: torch.Tensor, chunk: int = 8192, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre per row, in chunks of rows.

    Args:
        x: (n, f) points.
        c: (k, f) centres.
        chunk: rows per GEMM (bounds memory at chunk * k floats).
        mask: optional (k,) bool, True for centres that may be chosen.

    Returns:
        labels (n,) long and squared distances (n,) to the chosen centre.
    """
    c_sq = (c * c).sum(1)
    if mask is not None:
        c_sq = torch.where(mask, c_sq, torch.full_like(c_sq, float("inf")))
    labels, dists = [], []
    for s in range(0, x.shape[0], chunk):
        m, a = _sq_dists(x[s : s + chunk], c, c_sq).min(1)
        labels.append(a)
        dists.append(m)
    return torch.cat(labels), torch.cat(dists)


def _nearest_sq(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(n,) squared distance of each row of x to its nearest row of c."""
    return assign(x, c, chunk)[1]


def kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator, rounds: int = PP_ROUNDS) -> torch.Tensor:
    """k-means++ seeding by D^2 sampling, batched: (n, f) -> centres (k, f).

    The first centre is uniform. The other k - 1 are drawn in at most ``rounds`` rounds of
    b = ceil((k - 1) / rounds) centres each, sampled without replacement with probability
    proportional to D(x)^2, the squared distance to the nearest centre chosen so far; D^2
    is then updated with one GEMM against the b new centres. With b = 1 this is exactly
    k-means++ (Arthur and Vassilvitskii, 2007); larger b is the greedy batched variant
    (as k-means||), which costs O(n k f) flops in ``rounds`` GEMMs instead of k passes of
    O(n f) memory traffic (k = 1000 on 50k x 256: ~30x faster, see benchmarks/kmeans.py).
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    chosen = [torch.tensor([first])]
    d2 = _nearest_sq(x, x[first : first + 1])
    b = max(1, math.ceil((k - 1) / rounds))
    have = 1
    while have < k:
        take = min(b, k - have)
        w = d2.double().cpu()
        pos = int((w > 0).sum())
        if pos >= take:
            idx = torch.multinomial(w, take, replacement=False, generator=g)
        else:  # fewer distinct points left than centres wanted: take them, fill uniformly
            rest = torch.randint(n, (take - pos,), generator=g)
            idx = torch.cat([(w > 0).nonzero().squeeze(1), rest])
        chosen.append(idx)
        have += take
        if have < k:
            d2 = torch.minimum(d2, _nearest_sq(x, x[idx.to(x.device)]))
    return x[torch.cat(chosen).to(x.device)].clone()


def rank_within(labels: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Rank of each point among the points of its own cluster, in the given order.

    Args:
        labels: (n,) cluster of each point.
        order: (n,) a permutation of the points (e.g. by distance).
        k: number of clusters.

    Returns:
        (n,) long: rank[i] = number of points of cluster labels[i] before i in ``order``.
    """
    n = labels.shape[0]
    lab = labels[order]
    s = torch.sort(lab, stable=True).indices  # groups ``order`` by cluster, keeping order
    counts = torch.bincount(lab, minlength=k)
    start = torch.cumsum(counts, 0) - counts
    ranks = torch.empty(n, dtype=torch.long, device=labels.device)
    ranks[order[s]] = torch.arange(n, device=labels.device) - start[lab[s]]
    return ranks


def fill_empty(labels: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster one point, so that exactly k clusters are non-empty.

    The e empty clusters take the e worst-fitting points (largest ``d``) among points whose
    cluster keeps at least one other member (the best-fitting one always stays), so no new
    cluster is emptied. Needs n >= k.

    Args:
        labels: (n,) cluster ids in [0, k).
        d: (n,) each point's squared distance to its centre.
        k: number of clusters.
    """
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel() == 0:
        return labels
    order = torch.argsort(d, descending=True)
    ranks = rank_within(labels, order, k)
    movable = ranks[order] < counts[labels[order]] - 1
    movers = order[movable][: empty.numel()]
    labels = labels.clone()
    labels[movers] = empty
    return labels


def capacity_assign(
    x: torch.Tensor,
    c: torch.Tensor,
    caps: tuple[int, ...],
    chunk: int = 8192,
    info: dict | None = None,
) -> torch.Tensor:
    """Assign n points to k centres, no centre taking more than its capacity.

    Greedy capacity-constrained assignment in batched rounds: every unassigned point
    proposes to its nearest centre that still has room; each centre keeps the closest
    proposals up to its remaining capacity (a sort and a per-cluster rank, no loop over
    points) and rejects the rest, which propose again next round with full centres masked
    out. Each round either places every point or fills at least one centre, so a phase
    ends within k rounds (in practice a few dozen). Phase j gives every centre ``caps[j]``
    more places; points left when all phases are done stay at -1.

    Args:
        x: (n, f) points.
        c: (k, f) centres.
        caps: places per centre added in each phase, e.g. ``(n // k, 1)`` (balanced) or
            ``(ceil(f n / k),)`` (sizes capped at f times the mean).
        chunk: rows per GEMM when distances are not precomputed (bounds memory).
        info: if given, ``info["capacity_rounds"]`` is set to the number of rounds.

    Returns:
        (n,) long labels in [0, k) (-1 for points no phase had room for).
    """
    n, k = x.shape[0], c.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long, device=x.device)
    # Distances are computed once when the (n, k) matrix is small; each round is then a
    # masked min instead of a GEMM (the rounds are many when one centre attracts most points).
    dmat = _sq_dists(x, c) if n * k <= DENSE_ASSIGN else None
    rounds = 0
    for cap in caps:
        room = torch.full((k,), cap, dtype=torch.long, device=x.device)
        while True:
            free = (labels < 0).nonzero().squeeze(1)
            if free.numel() == 0 or not bool((room > 0).any()):
                break
            rounds += 1
            if dmat is not None:
                dist, prop = dmat[free].masked_fill_(~(room > 0)[None, :], float("inf")).min(1)
            else:
                prop, dist = assign(x[free], c, chunk, mask=room > 0)
            order = torch.argsort(dist)
            rank = rank_within(prop, order, k)
            ok = rank < room[prop]
            labels[free[ok]] = prop[ok]
            room -= torch.bincount(prop[ok], minlength=k)
    if info is not None:
        info["capacity_rounds"] = info.get("capacity_rounds", 0) + rounds
    return labels


def balanced_assign(
    x: torch.Tensor, c: torch.Tensor, chunk: int = 8192, info: dict | None = None
) -> torch.Tensor:
    """Assign n points to k centres with sizes floor(n/k) or ceil(n/k) (differ by <= 1).

    :func:`capacity_assign` in two phases: every centre is filled to q = n // k, then the
    r = n - q k leftover points are placed with capacity one per centre.

    Returns:
        (n,) long labels; exactly n % k clusters have q + 1 members, the others q.
    """
    n, k = x.shape[0], c.shape[0]
    labels = capacity_assign(x, c, (n // k, 1), chunk, info)
    if info is not None:
        info["balanced_rounds"] = info.pop("capacity_rounds")
    return labels


def size_cap(n: int, k: int, factor: float) -> int:
    """Largest group allowed by ``max_size_factor``: ceil(factor * n / k).

    At least ceil(n / k), so that n points fit into k groups.
    """
    return max(math.ceil(n / k), math.ceil(factor * n / k - 1e-9))


def capped_lloyd(
    x: torch.Tensor,
    c: torch.Tensor,
    cap: int,
    iters: int = 5,
    info: dict | None = None,
) -> torch.Tensor:
    """Lloyd iterations whose assignment step is capacity-constrained (size <= ``cap``).

    Starts from the given centres (the free k-means solution), alternates
    :func:`capacity_assign` and the centre update until the labels stop changing or
    ``iters`` steps have run, and repairs empty clusters with :func:`fill_empty` (which
    gives an empty cluster one point, so the cap still holds).

    Returns:
        (n,) long labels in [0, k), every cluster non-empty and of size <= cap.
    """
    k = c.shape[0]
    labels = None
    for _ in range(max(1, iters)):
        new = capacity_assign(x, c, (cap,), info=info)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        keep = counts > 0
        c = torch.where(keep[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), c)
    d = ((x - c[labels]) ** 2).sum(1)
    return fill_empty(labels, d, k)


def lloyd(
    x: torch.Tensor,
    k: int,
    iters: int,
    seed: int,
    init: str = "k-means++",
    tol: float = 1e-4,
    balanced: bool = False,
    info: dict | None = None,
    max_size_factor: float | None = None,
) -> torch.Tensor:
    """Lloyd's k-means with exactly k non-empty clusters: (n, f) -> labels (n,).

    Minimises sum_i ||x_i - c_{g(i)}||^2. Empty clusters are re-seeded at the points
    farthest from their centres during the iterations, and :func:`fill_empty` repairs any
    still empty at the end. With ``balanced`` the converged centres are followed by
    :func:`balanced_assign` (sizes differ by at most one) instead of the free assignment;
    with ``max_size_factor`` = f by :func:`capped_lloyd`, no cluster larger than
    ceil(f n / k) (:func:`size_cap`). Stops when the relative change of the inertia is at
    most ``tol``. If ``info`` is
    given, it receives ``iterations`` (Lloyd steps run) and ``balanced_rounds``.

    Raises:
        ValueError: k > n.
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k-means: cannot make k={k} non-empty clusters of n={n} points")
    if k == n:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    g = torch.Generator().manual_seed(seed)
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    if init == "k-means++":
        c = kmeans_pp(x, k, g)
    else:
        c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    prev = None
    done = 0
    for _ in range(iters):
        done += 1
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
    if info is not None:
        info["iterations"] = done
    if balanced:
        return balanced_assign(x, c, info=info)
    if max_size_factor is not None:
        return capped_lloyd(x, c, size_cap(n, k, max_size_factor), info=info)
    labels, d = assign(x, c)
    return fill_empty(labels, d, k)


class KMeansGrouper(Grouper):
    """K-means clustering of the training set in a chosen feature space.

    Features are computed in one forward pass (see :mod:`ggda.grouping.features`) and
    clustered on the model's device.

    Args:
        groups: k (int) or a fraction of n.
        features: ``inputs`` | ``representations`` | ``gradients``.
        gradient_kind: for ``gradients``: ``last_layer`` | ``logits`` | ``penultimate``.
        proj_dim: projection size of last-layer gradient features (projected only when
            C * (H + 1) > proj_dim).
        iters: maximum Lloyd iterations.
        init: ``k-means++`` (batched D^2 seeding) or ``random`` (k distinct points).
        tol: relative inertia change that stops the iterations.
        per_class: cluster inside each class, k split across classes in proportion to
            class size (as the ``class`` grouping); groups never mix classes. Needs
            k >= the number of classes present.
        balanced: equal-size clusters (sizes differ by at most one; with ``per_class``,
            within each class).
        max_size_factor: cap every cluster at ceil(f n / k) points, f times the mean size
            (a size-controlled K-means; ``None`` = free sizes). Free Grad-K-Means puts the
            well-fit points (gradients near 0) into one giant group; the cap splits it.
        seed: initialisation (and projection) seed.
        proj_structure: ``dense`` | ``kronecker`` projection of last-layer gradients.
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
        per_class: bool = False,
        balanced: bool = False,
        max_size_factor: float | None = None,
        seed: int = 0,
        proj_structure: str = "dense",
    ) -> None:
        super().__init__(groups, seed)
        self.proj_structure = check_choice(
            "grouping.proj_structure", proj_structure, ("dense", "kronecker")
        )
        self.features = check_choice("grouping.features", features, FEATURES)
        self.gradient_kind = check_choice("grouping.gradient_kind", gradient_kind, GRADIENT_KINDS)
        self.proj_dim = check_int("grouping.proj_dim", proj_dim, 1)
        self.iters = check_int("grouping.iters", iters, 1)
        self.init = check_choice("grouping.init", init, INITS)
        self.tol = check_float("grouping.tol", tol, 0.0)
        self.per_class = check_choice("grouping.per_class", per_class, (False, True))
        self.balanced = check_choice("grouping.balanced", balanced, (False, True))
        self.max_size_factor = (
            None
            if max_size_factor is None
            else check_float("grouping.max_size_factor", max_size_factor, 1.0)
        )
        self._timings: dict[str, float] = {}

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        """True unless the features are the raw inputs (then no model is needed)."""
        return self.features != "inputs"

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of the last :meth:`group` call: ``grouping_features``, ``clustering``."""
        return dict(self._timings)

    def group(self, inputs: GroupingInputs) -> Grouping:
        """Cluster the training points' features into k groups.

        Args:
            inputs: the training data (x (n, ...), y (n,)), the model and the device.

        Returns:
            The grouping: (n,) long group ids in [0, k), k = ``self.k_for(n)``.
        """
        n = int(inputs.y.shape[0])
        k = self.k_for(n)
        device = torch.device(inputs.device)
        t0 = _now(device)
        f = compute_features(
            self.features,
            inputs.x,
            inputs.y,
            inputs.num_classes,
            inputs.model,
            gradient_kind=self.gradient_kind,
            proj_dim=self.proj_dim,
            seed=self.seed,
            device=device,
            proj_structure=self.proj_structure,
        ).float()
        t1 = _now(device)
        if self.per_class:
            labels = self._per_class(f, inputs.y.to(f.device), inputs.num_classes, k)
        else:
            labels = lloyd(
                f,
                k,
                self.iters,
                self.seed,
                self.init,
                self.tol,
                self.balanced,
                max_size_factor=self.max_size_factor,
            )
        t2 = _now(device)
        self._timings = {"grouping_features": t1 - t0, "clustering": t2 - t1}
        return Grouping(labels.cpu(), k)

    def _per_class(self, f: torch.Tensor, y: torch.Tensor, num_classes: int, k: int):
        """K-means inside each class with k_c groups (classwise.split_k_by_class)."""
        counts = torch.bincount(y.cpu(), minlength=num_classes)
        alloc = split_k_by_class(counts, k)
        labels = torch.empty(f.shape[0], dtype=torch.long, device=f.device)
        offset = 0
        for cls in range(len(counts)):  # a loop over classes, not points
            kc = int(alloc[cls])
            if kc == 0:
                continue
            members = (y == cls).nonzero().squeeze(1)
            sub = lloyd(
                f[members],
                kc,
                self.iters,
                self.seed + cls,
                self.init,
                self.tol,
                self.balanced,
                max_size_factor=self.max_size_factor,
            )
            labels[members] = sub + offset
            offset += kc
        return labels


def _now(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (honest GPU timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
