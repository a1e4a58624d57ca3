"""Random groups within each class; k split across classes in proportion to class size."""

from __future__ import annotations

import torch

from ggda.errors import ConfigError
from ggda.grouping.base import Grouper, Grouping, GroupingInputs, equal_split


def split_k_by_class(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Groups per class, proportional to ``counts`` (largest remainder).

    Each is >= 1 and <= its count, and they sum to k. Classes with count 0 get 0.

    Raises:
        ConfigError: k smaller than the number of present classes.
    """
    present = counts > 0
    c = int(present.sum())
    n = int(counts.sum())
    if k < c:
        raise ConfigError(
            "groups",
            k,
            f"at least the number of classes present ({c})",
            "Per-class grouping needs one group per class or more.",
        )
    if k > n:
        raise ConfigError("groups", k, f"at most n={n}")
    # Start with one per class, then hand out the rest by largest remainder, capped by size.
    alloc = present.long().clone()
    rest = k - c
    while rest > 0:
        room = counts - alloc
        ideal = counts.double() * k / n
        deficit = torch.where(room > 0, ideal - alloc.double(), torch.tensor(-float("inf")))
        j = int(torch.argmax(deficit))
        alloc[j] += 1
        rest -= 1
    return alloc


class ClassGrouper(Grouper):
    """Random near-equal groups inside each class."""

    name = "class"

    def group(self, inputs: GroupingInputs) -> Grouping:
        """Random groups inside each class, k split across classes by class size."""
        y = inputs.y.cpu()
        n = int(y.shape[0])
        k = self.k_for(n)
        counts = torch.bincount(y, minlength=inputs.num_classes)
        alloc = split_k_by_class(counts, k)
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.empty(n, dtype=torch.long)
        offset = 0
        for cls in range(len(counts)):
            members = (y == cls).nonzero().squeeze(1)
            if len(members) == 0:
                continue
            kc = int(alloc[cls])
            ids[members] = equal_split(len(members), kc, g) + offset
            offset += kc
        return Grouping(ids, k)
