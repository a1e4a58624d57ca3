"""Uniformly random groups of near-equal size."""

from __future__ import annotations

import torch

from ggda.grouping.base import Grouper, Grouping, GroupingInputs, equal_split


class RandomGrouper(Grouper):
    """Random partition into k groups whose sizes differ by at most one."""

    name = "random"

    def group(self, inputs: GroupingInputs) -> Grouping:
        """Seeded uniform assignment of the n points to k near-equal groups."""
        n = int(inputs.y.shape[0])
        k = self.k_for(n)
        return Grouping(equal_split(n, k, torch.Generator().manual_seed(self.seed)), k)
