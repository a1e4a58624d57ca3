"""The partition of the training set into groups, and the Grouper interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ggda.errors import ConfigError, GGDAError, check_choice, check_float, check_int

BROADCAST_RULES = ("share", "inherit")


@dataclass
class Grouping:
    """A partition of n training points into k non-empty groups.

    Attributes:
        group_ids: (n,) long, values in [0, k).
        k: number of groups.
    """

    group_ids: torch.Tensor
    k: int

    def __post_init__(self) -> None:
        self.group_ids = torch.as_tensor(self.group_ids, dtype=torch.long).cpu()
        self.validate()

    @property
    def n(self) -> int:
        """Number of training points."""
        return int(self.group_ids.shape[0])

    def validate(self) -> None:
        """Raise unless every point has a group in [0, k) and no group is empty."""
        g = self.group_ids
        if g.ndim != 1 or g.numel() == 0:
            raise GGDAError(f"group_ids must be a non-empty 1-D tensor, got shape {tuple(g.shape)}")
        if int(g.min()) < 0 or int(g.max()) >= self.k:
            raise GGDAError(
                f"group ids must lie in [0, {self.k}), got [{int(g.min())}, {int(g.max())}]"
            )
        empty = int((self.sizes() == 0).sum())
        if empty:
            raise GGDAError(f"grouping has {empty} empty groups out of k={self.k}")

    def sizes(self) -> torch.Tensor:
        """(k,) number of members per group."""
        return torch.bincount(self.group_ids, minlength=self.k)

    def membership(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense membership matrix M (n, k), M[i, j] = 1 iff point i is in group j."""
        m = torch.zeros(self.n, self.k, dtype=dtype)
        m[torch.arange(self.n), self.group_ids] = 1
        return m

    def aggregate(self, point_scores: torch.Tensor) -> torch.Tensor:
        """Sum point scores over groups: (n, m) -> (k, m), i.e. M^T A."""
        out = point_scores.new_zeros(self.k, *point_scores.shape[1:])
        return out.index_add_(0, self.group_ids.to(point_scores.device), point_scores)

    def broadcast(self, scores: torch.Tensor, rule: str = "share") -> torch.Tensor:
        """Group scores back to points: (k, m) -> (n, m).

        ``share``: a_i = tau_{g(i)} / |G_{g(i)}| (group sums are preserved);
        ``inherit``: a_i = tau_{g(i)}.
        """
        check_choice("broadcast rule", rule, BROADCAST_RULES)
        ids = self.group_ids.to(scores.device)
        out = scores[ids]
        if rule == "share":
            sizes = self.sizes().to(scores.device, scores.dtype)
            out = out / sizes[ids].reshape(-1, *([1] * (scores.ndim - 1)))
        return out

    def summary(self) -> dict[str, float]:
        """Size distribution: k, min, median, mean, max group size."""
        s = self.sizes().double()
        return {
            "k": float(self.k),
            "size_min": float(s.min()),
            "size_median": float(s.median()),
            "size_mean": float(s.mean()),
            "size_max": float(s.max()),
        }


@dataclass
class GroupingInputs:
    """What a grouper may look at.

    Attributes:
        x: (n, *input_shape) training inputs.
        y: (n,) training labels.
        num_classes: C.
        model: the trained net (eval mode) for model-based features, or None.
        device: where to compute.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    model: nn.Module | None = None
    device: torch.device | str = "cpu"


def resolve_k(groups: int | float | None, n: int) -> int:
    """Turn the ``groups`` config value into a group count k for n points.

    An integer is taken as is; a float in (0, 1) is a fraction of n (``groups=0.01`` is
    k = n/100). Raises a :class:`ConfigError` naming ``groups`` when k is out of [1, n].
    """
    if groups is None:
        raise ConfigError("groups", groups, "an integer in [1, n] or a fraction in (0, 1)")
    if isinstance(groups, float) and not groups.is_integer():
        frac = check_float("groups", groups, 0.0, 1.0, lo_open=True, hi_open=True)
        return max(1, round(frac * n))
    k = check_int("groups", groups, 1)
    if k > n:
        raise ConfigError(
            "groups",
            groups,
            f"an integer in [1, {n}] (the training set has n={n} points)",
            "Lower `groups`, or use `grouping=singleton` for per-sample attribution.",
        )
    return k


class Grouper:
    """Makes a :class:`Grouping` of the training set.

    Subclasses set ``name`` and implement :meth:`group`. ``groups`` is the top-level config
    value (an int k or a fraction of n); ``seed`` makes the result reproducible.
    """

    name = "base"
    uses_model = False

    def __init__(self, groups: int | float | None = None, seed: int = 0) -> None:
        if groups is not None and not (isinstance(groups, float) and 0 < groups < 1):
            check_int("groups", groups, 1)
        self.groups = groups
        self.seed = check_int("grouping.seed", seed, 0)

    def k_for(self, n: int) -> int:
        """The group count k for n points (see :func:`resolve_k`)."""
        return resolve_k(self.groups, n)

    def group(self, inputs: GroupingInputs) -> Grouping:
        """Partition the n training points of ``inputs`` into k groups."""
        raise NotImplementedError

    def config(self) -> dict:
        """What decides this grouper's output (for the cache key)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")} | {"name": self.name}


def equal_split(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Random assignment of n points to k groups whose sizes differ by at most one."""
    perm = torch.randperm(n, generator=generator)
    ids = torch.empty(n, dtype=torch.long)
    ids[perm] = torch.arange(n) % k
    return ids
