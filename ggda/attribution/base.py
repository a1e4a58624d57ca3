"""The Attributor interface and what every method receives and returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ggda.attribution.properties import PropertyExamples
from ggda.gradients import iter_group_gradients
from ggda.grouping.base import Grouping
from ggda.models.checkpoint import Checkpoint
from ggda.models.functional import per_example_loss

if TYPE_CHECKING:
    from ggda.data.base import DataBundle
    from ggda.models.training import Recipe


class Retrainer(Protocol):
    """What a retraining method needs of the retrain service (``ggda.evaluation.retrain``).

    Declared here, structurally, so that attribution does not import evaluation.

    Attributes:
        recipe: the base model's training recipe.
        stats: counters; ``retrains_run`` is the number of models trained (not cached).
    """

    recipe: Recipe
    stats: dict[str, int]

    def run(
        self, masks: torch.Tensor, seeds: list[int], desc: str = ...
    ) -> dict[str, torch.Tensor]:
        """Train on each mask (s, n) with each seed; logits per split (s, R, rows, C)."""
        ...


@dataclass
class AttributionTask:
    """Everything a method needs to score groups against a property.

    Attributes:
        net: a net of the right architecture (weights are loaded per checkpoint).
        checkpoints: saved states, oldest first; the last is the final model.
        x_train: (n, ...) inputs; y_train: (n,) labels.
        grouping: the partition of the training set.
        queries: the property's examples (m rows).
        device: where to compute.
        ensemble: ``ensemble(count)`` returns the checkpoint lists of ``count`` models
            trained independently with the base model's recipe (seeds seed+1..seed+count),
            trained and cached through the same Lightning path as the base model;
            ``ensemble(count, fraction)`` with fraction < 1 trains each on its seed's
            random subset of that fraction of the training set. None when the caller
            cannot train (plain Python use without a pipeline).
        retrain: the bound retraining service (group leave-one-out needs it), or None.
        prop: the property object behind ``queries`` (``values(logits, bundle)``), or None.
        bundle: the data bundle (splits the property reads), or None.
        cache_dir: root of the artifact cache (methods store reusable artifacts, e.g.
            K-FAC factors, under it), or None for no caching.
    """

    net: nn.Module
    checkpoints: list[Checkpoint]
    x_train: torch.Tensor
    y_train: torch.Tensor
    grouping: Grouping
    queries: PropertyExamples
    device: torch.device | str = "cpu"
    ensemble: Callable[..., list[list[Checkpoint]]] | None = None
    retrain: Retrainer | None = None
    prop: Any = None
    bundle: DataBundle | None = None
    cache_dir: Path | None = None

    def train_gradients(
        self,
        net: nn.Module,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_loss,
        *,
        group_ids: torch.Tensor | None = None,
        k: int | None = None,
        **kw: Any,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream (groups (c,), grad of sum_{i in G} fn(z_i) (c, d)) over the training side.

        The one train-side loop of every method: the task's grouping unless ``group_ids``
        and ``k`` are given; ``kw`` goes to :func:`iter_group_gradients` (``params``,
        ``projector``, ``backend``, ``max_points``). Gradients are detached (with
        ``last_layer`` the frozen body's parameters still require grad).
        """
        ids = self.grouping.group_ids if group_ids is None else group_ids
        kk = self.grouping.k if k is None else k
        for groups, g in iter_group_gradients(net, self.x_train, self.y_train, ids, kk, fn, **kw):
            yield groups, g.detach()


@dataclass
class AttributionResult:
    """What a method returns.

    Attributes:
        scores: (k, m) group scores tau_{jq}, oriented (train side, query side); a group's
            score is the sum of its members' contributions; positive = the group helps.
        timings: seconds per phase (``gradients``, ``solve``, ...).
        info: scalars describing the run (number of parameters, retrains, ...).
    """

    scores: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, float | int | str] = field(default_factory=dict)


def check_finite_scores(result: AttributionResult, method: str) -> None:
    """Raise a clear error when a method produced NaN or infinite scores."""
    bad = int((~torch.isfinite(result.scores)).sum())
    if bad:
        from ggda.errors import GGDAError

        raise GGDAError(
            f"attribution ({method}) produced {bad} NaN/infinite scores out of "
            f"{result.scores.numel()}. Check the model (did training diverge?) and the "
            "method's settings (`method.damping`, `method.proj_dim`)."
        )


class Attributor:
    """A data-attribution method in group form.

    Subclasses implement :meth:`attribute` (and :meth:`self_attribute`). Gradient methods
    (TracIn, TRAK, influence functions) subclass
    :class:`ggda.attribution.loop.GradientAttributor`, which runs the shared
    checkpoint / projector / query / train-stream loop and leaves them only its hooks
    (preconditioning, checkpoint weights, which checkpoints); retraining methods
    (:mod:`ggda.attribution.loo`) implement :meth:`attribute` directly.
    """

    name = "base"

    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Group scores (k, m) of the task's grouping against its m query rows."""
        raise NotImplementedError

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """Each group scored against itself as the query: scores (k, 1).

        The property of group j is the measurement summed over G_j's own training points
        (with their possibly noisy labels); noisy-label detection ranks groups by it.
        Convention: the score is the method's influence of G_j on -L_{G_j}, so a large
        positive value means the group is hard to fit without itself (memorised).
        """
        raise NotImplementedError(f"{type(self).__name__} has no self-attribution")

    def config(self) -> dict:
        """What decides this method's scores (for cache keys and logs)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")} | {"name": self.name}
