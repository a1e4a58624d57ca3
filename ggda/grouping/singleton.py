"""Every point its own group: k = n, the per-sample baseline."""

from __future__ import annotations

import torch

from ggda.grouping.base import Grouper, Grouping, GroupingInputs


class SingletonGrouper(Grouper):
    """k = n; ``groups`` is ignored."""

    name = "singleton"

    def __init__(self, groups: int | float | None = None, seed: int = 0) -> None:
        super().__init__(None, seed)

    def group(self, inputs: GroupingInputs) -> Grouping:
        """One group per point: group_ids = 0..n-1."""
        n = int(inputs.y.shape[0])
        return Grouping(torch.arange(n), n)
