r"""The gradient-attribution loop that TracIn, TRAK and influence functions share.

Every gradient method scores group j against property row q as a sum over the models e
of an ensemble and the chosen checkpoints t of each,

    tau_{jq} = (1 / C) sum_{e, t} w_t < A_t^{-1} P_e^T grad f_q(theta_t),
                                         -P_e^T grad L_{G_j}(theta_t) >

with P_e an optional seeded random projection (p, d) (identity without one), A_t the
method's preconditioner at theta_t, w_t a per-checkpoint weight and C a normaliser
(TRAK's mean over the ensemble's checkpoints):

=========  ============================  ===============================  =========  ===========
method     checkpoints                   A_t                              w_t        C
=========  ============================  ===============================  =========  ===========
TracIn     ``all`` / ``last`` / epochs   I                                eta_t      1
TRAK       per model of the ensemble     K + lambda I (projected kernel)  1          checkpoints
IF         the final one                 n (H + lambda I), or K-FAC       1          1
=========  ============================  ===============================  =========  ===========

:class:`GradientAttributor` runs that loop once for all of them: per checkpoint it loads the
weights, selects the parameters, builds the projector (one per model, shared by the
model's checkpoints), lets the method ``prepare`` its train-side statistics (TRAK's kernel
and numerators, IF's Hessian operator or K-FAC factors), computes the projected query
gradients in row batches, ``precondition``\ s them, streams the train group gradients in
chunks (:meth:`ggda.attribution.base.AttributionTask.train_gradients`, the factored path
by default) and accumulates the (k, m) scores, timing each phase. A method is a subclass
that overrides only the hooks where it differs; the defaults are TracIn's plain inner
product. :meth:`GradientAttributor.self_attribute` runs the same loop with each group as
its own query.

The query-side helpers live here too: :func:`query_gradients` (the gradient of every
property row through the shared group-gradient primitive) and :func:`no_graph`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev

from ggda.attribution.base import AttributionResult, AttributionTask, Attributor, Checkpoint
from ggda.attribution.properties import PropertyExamples
from ggda.errors import ConfigError, GGDAError
from ggda.gradients import group_gradients, make_projector, select_params
from ggda.models.functional import measurement_fn, per_example_loss

Projector = Callable[[torch.Tensor], torch.Tensor]

# Entries of the (k, p) group gradients held to precondition the train side instead.
HELD_TRAIN_ELEMS = 64_000_000
# Entries of one batch of query gradients streamed past held group gradients.
QUERY_STREAM_ELEMS = 8_000_000

# The loop's phases; a method maps each to the key its ``result.timings`` reports it under.
PHASES = ("prepare", "query", "precondition", "train")


def pick_checkpoints(checkpoints: list[Checkpoint], which: str | list[int]) -> list[Checkpoint]:
    """The checkpoints a method sums over.

    Args:
        checkpoints: the saved states, oldest first.
        which: ``all``, ``last``, or a list of saved epochs.

    Returns:
        The chosen checkpoints, in the order given.

    Raises:
        ConfigError: an epoch in ``which`` was not saved.
    """
    if which == "all":
        return checkpoints
    if which == "last":
        return checkpoints[-1:]
    saved = {c.epoch: c for c in checkpoints}
    missing = [e for e in which if e not in saved]
    if missing:
        raise ConfigError(
            "method.checkpoints",
            which,
            f"`all`, `last` or a subset of the saved epochs {sorted(saved)}",
            "Save more epochs with `model.save_epochs`.",
        )
    return [saved[e] for e in which]


def no_graph(backend: str) -> contextlib.AbstractContextManager:
    """``torch.no_grad()`` for the torch.func (``vmap``) path, a no-op for ``loop``.

    torch.func transforms ignore an outer no_grad, which then only stops autograd from
    recording a graph to the live module's non-differentiated parameters (last-layer
    mode); the ``loop`` reference path needs autograd itself and detaches its results.
    """
    return torch.no_grad() if backend != "loop" else contextlib.nullcontext()


def query_gradients(
    net: nn.Module,
    q: PropertyExamples,
    params: dict[str, torch.Tensor],
    projector: Projector | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Gradients of the property rows, (m, d), d = p or the projection size.

    Row r is grad_theta of row r's value: weight_r * sum_{i in S_r} grad f(z_i) through the
    shared group-gradient primitive for measurement properties, or one reverse-mode
    Jacobian of ``q.fn`` over all examples for user functions.

    Args:
        net: the model (eval mode), weights loaded.
        q: the property's examples.
        params: parameters to differentiate (``select_params``).
        projector: optional (r, p) -> (r, d) map.
        **kw: forwarded to :func:`ggda.gradients.group_gradients`
            (``backend``, ``max_points``).

    Returns:
        (m, d) gradients on the params' device.
    """
    if q.fn is None:
        f = measurement_fn(q.measurement)
        g = group_gradients(
            net, q.x, q.y, q.row_ids, q.m, f, params=params, projector=projector, **kw
        )
        return g * q.weight.to(g)[:, None]
    device = next(iter(params.values())).device
    buffers = {k: v.detach() for k, v in net.named_buffers()}
    x = q.x.to(device)
    y = q.y.to(device)
    fn = q.fn

    def rows(prm: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(functional_call(net, (prm, buffers), (x,)), y).reshape(-1)

    jac = jacrev(rows)({k: v.detach() for k, v in params.items()})
    flat = torch.cat([jac[k].reshape(q.m, -1) for k in params], dim=1)
    return (projector(flat) if projector is not None else flat).detach()


@dataclass
class Step:
    """One checkpoint of one model, as the loop hands it to a method's hooks.

    Attributes:
        task: the attribution task.
        net: the net with the checkpoint's weights loaded (eval mode).
        checkpoint: the checkpoint (``lr`` is its learning rate, ``epoch`` its epoch).
        params: the selected parameters (``select_params``), p entries in all.
        projector: the model's projection (p -> d), or None.
        model: index of the model in the ensemble (0: the base model).
        backend: gradient backend (``factored`` | ``vmap`` | ``loop``).
        max_points: padded points per batched gradient chunk.
        state: what the method's :meth:`GradientAttributor.prepare` returned.
    """

    task: AttributionTask
    net: nn.Module
    checkpoint: Checkpoint
    params: dict[str, torch.Tensor]
    projector: Projector | None
    model: int
    backend: str
    max_points: int
    state: Any = None

    def gradients(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_example_loss,
        group_ids: torch.Tensor | None = None,
        k: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream (groups (c,), P^T grad sum_{i in G} fn(z_i) (c, d)) at this checkpoint.

        The task's grouping unless ``group_ids`` (n,) and ``k`` are given; the step's
        parameters, projector, backend and chunk size.
        """
        return self.task.train_gradients(
            self.net,
            fn,
            group_ids=group_ids,
            k=k,
            params=self.params,
            projector=self.projector,
            backend=self.backend,
            max_points=self.max_points,
        )

    def query_gradients(self, q: PropertyExamples) -> torch.Tensor:
        """(r, d) projected gradients of the property rows ``q`` at this checkpoint."""
        return query_gradients(
            self.net,
            q,
            self.params,
            self.projector,
            backend=self.backend,
            max_points=self.max_points,
        ).detach()  # detach: with last_layer the frozen body still requires grad


class _Clock:
    """Seconds per phase, reported under the method's timing keys.

    Args:
        keys: phase -> timing key.
        rest: the key of unmapped phases (self-attribution), or None to drop them.
    """

    def __init__(self, keys: dict[str, str], rest: str | None = None) -> None:
        self.keys, self.rest = keys, rest
        self.seconds = dict.fromkeys([*keys.values(), *([rest] if rest else [])], 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = self.keys.get(phase, self.rest)
            if key is not None:
                self.seconds[key] += time.perf_counter() - t0


class GradientAttributor(Attributor):
    """A gradient method: the shared loop, specialised by hooks (module docstring).

    Subclasses set ``backend``, ``max_points`` and ``last_layer`` (and, for a projection,
    ``proj_dim``, ``proj_type``, ``proj_seed``, ``proj_structure``) as instance attributes
    and override the hooks where they differ from the defaults:

    - which checkpoints: :meth:`models`, :meth:`pick`; the projection: :meth:`projector`;
    - train-side statistics per checkpoint: :meth:`prepare`;
    - the query side: :meth:`query_batches`, :meth:`precondition` (applied to the group
      side instead when A is symmetric and k < m: :meth:`train_side_preconditioned`);
    - the scores: :meth:`checkpoint_weight`, :meth:`train_scores` (per streamed chunk),
      :meth:`held_scores` (from statistics in hand), :meth:`fused_scores` (a path that does
      both sides at once), :meth:`finish`;
    - self-attribution: :meth:`self_train_scores`, :meth:`self_held_scores`;
    - reporting: :attr:`timing_keys` (phase -> key), :meth:`run_info`.

    Attributes:
        timing_keys: phase (``prepare``, ``query``, ``precondition``, ``train``) -> the key
            of ``result.timings`` it is reported under (metrics ``time/attribution/<key>``);
            unmapped phases are not reported.
        self_timing_keys: the same for self-attribution, where unmapped phases are
            reported as ``self_attribution``.
    """

    timing_keys: dict[str, str] = {"query": "query_gradients", "train": "group_gradients"}
    self_timing_keys: dict[str, str] = {}
    # True when A is symmetric, so that either side may be preconditioned
    symmetric_preconditioner: bool = False

    backend: str
    max_points: int
    last_layer: bool

    # -- hooks: checkpoints and projection ------------------------------------------------
    def models(self, task: AttributionTask) -> list[list[Checkpoint]]:
        """Checkpoint lists of the models scored (default: the base model only)."""
        return [task.checkpoints]

    def pick(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        """The checkpoints of one model that are scored (default: ``self.checkpoints``)."""
        return pick_checkpoints(checkpoints, getattr(self, "checkpoints", "all"))

    def projector(
        self, net: nn.Module, params: dict[str, torch.Tensor], model: int
    ) -> Projector | None:
        """The projection of model ``model`` (seed ``proj_seed + model``), or None.

        Built once per model at its first checkpoint; its checkpoints share it.
        """
        dim = getattr(self, "proj_dim", None)
        if not dim:
            return None
        return make_projector(
            self.proj_structure, net, params, dim, self.proj_seed + model, self.proj_type
        )

    # -- hooks: per-checkpoint statistics and the query side -------------------------------
    def prepare(self, step: Step) -> Any:
        """Train-side statistics of the checkpoint (kernel, Hessian, factors); default None."""
        return None

    def query_batches(self, step: Step) -> list[tuple[int, int]]:
        """Property-row ranges [r0, r1) whose gradients are held at once (default: all)."""
        return [(0, step.task.queries.m)]

    def precondition(self, step: Step, qg: torch.Tensor) -> torch.Tensor:
        """The preconditioned queries A^{-1} qg for qg (r, d); default the identity."""
        return qg

    # -- hooks: scores ---------------------------------------------------------------------
    def checkpoint_weight(self, step: Step) -> float:
        """w_t, the checkpoint's weight in the sum (default 1)."""
        return 1.0

    def fused_scores(self, step: Step) -> torch.Tensor | None:
        """(k, m) contribution of the checkpoint by a path that does both sides, or None."""
        return None

    def held_scores(self, step: Step, u: torch.Tensor) -> torch.Tensor | None:
        """(k, r) contribution from statistics in hand (no train stream), or None."""
        return None

    def train_scores(self, step: Step, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(c, r) contribution of one streamed chunk: w_t <u_q, -g_j>.

        Args:
            step: the checkpoint.
            g: (c, d) summed (projected) gradients of the chunk's groups.
            u: (r, d) preconditioned query gradients.
        """
        return -(self.checkpoint_weight(step) * (g.to(u) @ u.T))

    def finish(self, scores: torch.Tensor, count: int, self_mode: bool) -> torch.Tensor:
        """Final scores from the sum over ``count`` checkpoints (default: the sum)."""
        return scores

    # -- hooks: self-attribution -----------------------------------------------------------
    def self_held_scores(self, step: Step) -> torch.Tensor | None:
        """(k, 1) self-scores from statistics in hand, or None (stream the groups)."""
        return None

    def self_train_scores(self, step: Step, g: torch.Tensor) -> torch.Tensor:
        """(c,) self-scores of a streamed chunk g (c, d): w_t <-g_j, A^{-1} (-g_j)>.

        Default (A = I): w_t ||g_j||^2.
        """
        return self.checkpoint_weight(step) * (g * g).sum(1)

    # -- hooks: reporting ------------------------------------------------------------------
    def run_info(self, step: Step, models: int, count: int, self_mode: bool) -> dict:
        """``result.info`` of the run; ``step`` is the last checkpoint scored."""
        return {}

    # -- the loop --------------------------------------------------------------------------
    def attribute(self, task: AttributionTask) -> AttributionResult:
        """Scores (k, m) of the task's grouping against its m property rows."""
        with no_graph(self.backend):  # no graph to the live module's unselected params
            return self._run(task, self_mode=False)

    def self_attribute(self, task: AttributionTask) -> AttributionResult:
        """Each group scored against itself as the query: scores (k, 1).

        The property of group j is -L_{G_j} (its own summed loss, noisy labels included),
        whose gradient is -grad L_{G_j}, so tau_jj = w_t <-g_j, A^{-1} (-g_j)> summed as in
        :meth:`attribute`: large positive = hard to fit without itself (memorised).
        """
        with no_graph(self.backend):
            return self._run(task, self_mode=True)

    def _steps(self, task: AttributionTask, models: list[list[Checkpoint]]) -> Iterator[Step]:
        """Load each checkpoint of each model; one projector per model."""
        net = task.net.to(task.device).eval()
        for e, cks in enumerate(models):
            proj = None
            for ck in self.pick(cks):
                net.load_state_dict(ck.state_dict)
                params = select_params(net, self.last_layer)
                if proj is None:
                    proj = self.projector(net, params, e)
                yield Step(task, net, ck, params, proj, e, self.backend, self.max_points)

    def _run(self, task: AttributionTask, self_mode: bool) -> AttributionResult:
        k = task.grouping.k
        m = 1 if self_mode else task.queries.m
        clock = (
            _Clock(self.self_timing_keys, "self_attribution")
            if self_mode
            else _Clock(self.timing_keys)
        )
        scores: torch.Tensor | None = None

        def add(rows: slice, value: torch.Tensor, groups: torch.Tensor | None = None) -> None:
            nonlocal scores
            if scores is None:
                scores = value.new_zeros(k, m)
            want = (k if groups is None else groups.numel(), rows.stop - rows.start)
            if tuple(value.shape) != want:
                raise GGDAError(
                    f"{type(self).__name__} produced scores of shape {tuple(value.shape)}, "
                    f"not {want}"
                )
            if groups is None:
                scores[:, rows] += value
            else:
                scores[groups.to(scores.device), rows] += value

        models = self.models(task)
        step: Step | None = None
        count = 0
        for step in self._steps(task, models):
            with clock("prepare"):
                step.state = self.prepare(step)
            if self_mode:
                with clock("train"):
                    held = self.self_held_scores(step)
                    if held is not None:
                        add(slice(0, 1), held)
                    else:
                        for groups, g in step.gradients():
                            add(slice(0, 1), self.self_train_scores(step, g)[:, None], groups)
            else:
                with clock("train"):
                    fused = self.fused_scores(step)
                if fused is not None:
                    add(slice(0, m), fused)
                else:
                    self._score_queries(step, clock, add)
            count += 1
        if step is None:
            raise GGDAError(f"{type(self).__name__} needs at least one checkpoint")
        if scores is None:
            raise GGDAError("no groups to score")
        return AttributionResult(
            scores=self.finish(scores, count, self_mode),
            timings=clock.seconds,
            info=self.run_info(step, len(models), count, self_mode),
        )

    def train_side_preconditioned(self, step: Step) -> bool:
        """Whether to precondition the k group gradients instead of the m queries.

        Only for a symmetric A (then <A^{-1} q, g> = <q, A^{-1} g>), when there are fewer
        groups than queries and the (k, p) group gradients fit in ``HELD_TRAIN_ELEMS``:
        k solves instead of m (EK-FAC on the CNN: the preconditioning of 1,000 queries was
        70 % of IF's time, of 20 groups it is 2 %).
        """
        if not self.symmetric_preconditioner:
            return False
        k, m = step.task.grouping.k, step.task.queries.m
        p = sum(v.numel() for v in step.params.values())
        return k < m and k * p <= HELD_TRAIN_ELEMS

    def _score_queries(self, step: Step, clock: _Clock, add: Callable[..., None]) -> None:
        """Query gradients in row batches, preconditioned, against the train stream.

        With :meth:`train_side_preconditioned`, the group gradients are held and
        preconditioned once, and the query gradients stream past them.
        """
        q = step.task.queries
        if self.train_side_preconditioned(step):
            k = step.task.grouping.k
            with clock("train"):
                g_all: torch.Tensor | None = None
                for groups, g in step.gradients():
                    if g_all is None:
                        g_all = g.new_zeros(k, g.shape[1])
                    g_all[groups.to(g.device)] = g
            with clock("precondition"):
                ug = self.precondition(step, g_all)  # (k, d): A^{-1} g_j
            # the queries only stream past the held groups: small batches (a whole (m, p)
            # block of 1,000 CNN query gradients cost 5x their computation in memory traffic)
            rows = max(1, QUERY_STREAM_ELEMS // max(1, ug.shape[1]))
            for r0 in range(0, q.m, rows):
                r1 = min(q.m, r0 + rows)
                with clock("query"):
                    qg = step.query_gradients(q.rows(r0, r1))
                with clock("train"):  # train_scores is symmetric in its two sides
                    add(slice(r0, r1), self.train_scores(step, qg, ug).T)
            return
        for r0, r1 in self.query_batches(step):
            with clock("query"):
                qg = step.query_gradients(q.rows(r0, r1))
            with clock("precondition"):
                u = self.precondition(step, qg)
            with clock("train"):
                held = self.held_scores(step, u)
                if held is not None:
                    add(slice(r0, r1), held)
                    continue
                for groups, g in step.gradients():
                    add(slice(r0, r1), self.train_scores(step, g, u), groups)
