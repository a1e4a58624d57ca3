"""The shared gradient loop: a new method is its hooks; timing keys; shape guard."""

import pytest
import torch

from factory import tiny_task
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.loop import GradientAttributor, Step, pick_checkpoints
from ggda.attribution.tracin import TracIn
from ggda.attribution.tracin import pick_checkpoints as tracin_pick
from ggda.attribution.trak import TRAK
from ggda.errors import GGDAError
from ggda.models.functional import neg_loss, per_example_loss

GROUP_IDS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3] * 2)


class Scaled(GradientAttributor):
    """A toy method: A^{-1} = c I at every checkpoint, unit weights."""

    name = "scaled"

    def __init__(self, c: float = 2.0, backend: str = "vmap") -> None:
        self.c = c
        self.backend = backend
        self.max_points = 5
        self.last_layer = False

    def precondition(self, step: Step, qg: torch.Tensor) -> torch.Tensor:
        return self.c * qg


def _brute_force(task, c):
    """sum_t c <grad f_q, -grad L_{G_j}> and sum_t ||grad L_{G_j}||^2 by plain autograd."""
    net = task.net
    k, m = task.grouping.k, task.queries.m
    scores = torch.zeros(k, m, dtype=torch.float64)
    self_scores = torch.zeros(k, 1, dtype=torch.float64)

    def flat_grad(value):
        net.zero_grad()
        value.backward()
        return torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    for ck in task.checkpoints:
        net.load_state_dict(ck.state_dict)
        for j in range(k):
            sel = task.grouping.group_ids == j
            gj = flat_grad(per_example_loss(net(task.x_train[sel]), task.y_train[sel]).sum())
            self_scores[j, 0] += gj @ gj
            for q in range(m):
                qx, qy = task.queries.x[q : q + 1], task.queries.y[q : q + 1]
                gq = flat_grad(neg_loss(net(qx), qy).sum())
                scores[j, q] += c * (gq @ -gj)
    return scores, self_scores


@pytest.mark.parametrize("backend", ["factored", "vmap", "loop"])
def test_a_method_is_its_hooks(backend):
    """The defaults plus one precondition hook give the brute-force scores and self-scores."""
    task = tiny_task(GROUP_IDS, 4)
    want, want_self = _brute_force(task, 3.0)
    res = Scaled(3.0, backend).attribute(task)
    assert res.scores.shape == (4, task.queries.m)
    torch.testing.assert_close(res.scores, want, rtol=1e-10, atol=1e-12)
    # self-attribution keeps the default hook (A = I, w = 1): sum_t ||grad L_G||^2
    torch.testing.assert_close(
        Scaled(3.0, backend).self_attribute(task).scores, want_self, rtol=1e-10, atol=1e-12
    )


def test_unit_weight_tracin_is_the_default_loop():
    """TracIn differs from the bare loop only by w_t = eta_t."""
    task = tiny_task(GROUP_IDS, 4)
    for ck in task.checkpoints:
        ck.lr = 1.0
    torch.testing.assert_close(
        TracIn(backend="vmap").attribute(task).scores,
        Scaled(1.0, "vmap").attribute(task).scores,
        rtol=1e-12,
        atol=1e-14,
    )


@pytest.mark.parametrize(
    ("method", "keys", "self_keys"),
    [
        (TracIn(), {"query_gradients", "group_gradients"}, {"self_attribution"}),
        (TracIn(proj_dim=8), {"query_gradients", "group_gradients"}, {"self_attribution"}),
        (
            TRAK(proj_dim=8, kernel="groups"),
            {"features", "query_gradients", "kernel_solve"},
            {"self_attribution"},
        ),
        (
            TRAK(proj_dim=8, kernel="points"),
            {"features", "query_gradients", "kernel_solve"},
            {"self_attribution"},
        ),
        *[
            (
                InfluenceFunction(solver=s, iterations=5),
                {"query_gradients", "inverse_hvp", "group_gradients"},
                {"self_attribution"},
            )
            for s in ("explicit", "cg", "lissa")
        ],
        *[
            (
                InfluenceFunction(solver=s, last_layer=False),
                {"factors", "query_gradients", "inverse_hvp", "group_gradients"},
                {"factors", "self_attribution"},
            )
            for s in ("kfac", "ekfac")
        ],
    ],
    ids=lambda v: getattr(v, "name", None) and f"{v.name}-{getattr(v, 'solver', '')}",
)
def test_timing_keys_are_stable(method, keys, self_keys):
    """``time/attribution/<key>`` metrics are logged from these keys: they must not drift."""
    task = tiny_task(GROUP_IDS, 4)
    res = method.attribute(task)
    assert set(res.timings) == keys
    assert all(v >= 0 for v in res.timings.values())
    assert set(method.self_attribute(task).timings) == self_keys


def test_wrong_shaped_hook_output_is_an_error():
    class Bad(Scaled):
        def held_scores(self, step, u):
            return torch.zeros(step.task.grouping.k, 1, dtype=u.dtype)  # would broadcast

    with pytest.raises(GGDAError, match="produced scores of shape"):
        Bad().attribute(tiny_task(GROUP_IDS, 4))


def test_no_checkpoint_is_an_error():
    task = tiny_task(GROUP_IDS, 4)
    task.checkpoints = []
    with pytest.raises(GGDAError, match="TracIn needs at least one checkpoint"):
        TracIn().attribute(task)
    with pytest.raises(GGDAError, match="final checkpoint"):
        InfluenceFunction().attribute(task)


def test_pick_checkpoints_keeps_its_old_import():
    assert tracin_pick is pick_checkpoints
    cks = tiny_task(GROUP_IDS, 4).checkpoints
    assert pick_checkpoints(cks, "last") == cks[-1:]
    assert pick_checkpoints(cks, [2, 1]) == [cks[1], cks[0]]
