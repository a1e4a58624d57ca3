"""Properties: class means, index lists, user functions; every method accepts any property."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from factory import ROOT, tiny_bundle, tiny_net
from ggda.attribution.base import AttributionTask
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.loop import query_gradients
from ggda.attribution.properties import (
    FunctionProperty,
    QueryProperty,
    mean_true_class_probability,
)
from ggda.attribution.tracin import TracIn
from ggda.attribution.trak import TRAK
from ggda.errors import ConfigError, GGDAError
from ggda.gradients import select_params
from ggda.grouping.base import Grouping
from ggda.models.functional import neg_loss
from ggda.pipeline import build


def _bundle():
    b = tiny_bundle(n=30, seed=2)
    for s in ("train", "val", "test"):
        setattr(b, f"x_{s}", getattr(b, f"x_{s}").double())
    return b


def test_class_mean_rows_equal_loop():
    b = _bundle()
    prop = QueryProperty(split="test", indices="all", classes=[0, 2], reduce="mean", per_class=True)
    logits = torch.randn(len(b.y_test), 3, dtype=torch.float64)
    got = prop.values(logits, b)
    for r, c in enumerate([0, 2]):
        vals = [
            float(neg_loss(logits[i : i + 1], b.y_test[i : i + 1]))
            for i in range(len(b.y_test))
            if b.y_test[i] == c
        ]
        assert abs(float(got[r]) - sum(vals) / len(vals)) < 1e-12
    ex = prop.examples(b)
    assert ex.m == 2 and torch.allclose(ex.values(logits[prop.point_indices(b)]), got)


def test_index_list_rows():
    b = _bundle()
    prop = QueryProperty(split="test", indices=[3, 1, 4], measurement="margin")
    logits = torch.randn(2, len(b.y_test), 3, dtype=torch.float64)  # leading dims kept
    got = prop.values(logits, b)
    assert got.shape == (2, 3)
    from ggda.models.functional import margin

    assert torch.allclose(got[1, 2], margin(logits[1, 4:5], b.y_test[4:5])[0])
    with pytest.raises(ConfigError, match="property.indices"):
        QueryProperty(split="test", indices=[0, 10_000]).examples(b)


def test_function_property_values_and_gradients_match_autograd():
    b = _bundle()
    prop = FunctionProperty(
        {"_target_": "ggda.attribution.properties.mean_true_class_probability", "classes": [0, 1]},
        split="val",
    )
    ex = prop.examples(b)
    assert ex.m == 2
    net = tiny_net("mlp", 5, 3)
    params = select_params(net)
    got = query_gradients(net, ex, params)
    for r in range(2):
        net.zero_grad()
        mean_true_class_probability(net(b.x_val), b.y_val, [0, 1])[r].backward()
        want = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        assert torch.allclose(got[r], want, atol=1e-12)
    logits = net(b.x_val).detach()
    assert torch.allclose(prop.values(logits[None], b)[0], ex.values(logits))


def test_function_property_config_is_hashable():
    """The pipeline hashes vars(property) into cache keys: it must stay JSON."""
    import functools

    from ggda.io import stable_hash

    spec = {"_target_": "ggda.attribution.properties.mean_true_class_probability"}
    built = functools.partial(mean_true_class_probability, classes=[1])  # Hydra-built node
    keys = [stable_hash(vars(FunctionProperty(f))) for f in (spec, built)]
    assert keys[0] != keys[1]
    b = _bundle()
    ex = FunctionProperty(built).examples(b)
    logits = torch.randn(len(b.y_val), 3, dtype=torch.float64)
    want = mean_true_class_probability(logits, b.y_val, classes=[1])
    assert ex.m == 1 and torch.allclose(ex.values(logits), want)


def test_function_property_errors():
    with pytest.raises(ConfigError, match="property.fn"):
        FunctionProperty("no.such.module.fn")
    b = _bundle()
    bad = FunctionProperty(lambda logits, y: logits)  # (N, C): not a row vector
    with pytest.raises(GGDAError, match="1-d"):
        bad.examples(b)


def _task(prop, b, k=5):
    net = tiny_net("logreg", 5, 3)
    from ggda.attribution.base import Checkpoint

    ck = Checkpoint({n: v.clone() for n, v in net.state_dict().items()}, 0.1, 1)
    return AttributionTask(
        net, [ck], b.x_train, b.y_train, Grouping(torch.arange(30) % k, k), prop.examples(b)
    )


@pytest.mark.parametrize(
    "method",
    [InfluenceFunction(damping=0.1), TRAK(proj_dim=8, kernel="points"), TracIn()],
    ids=["influence", "trak", "tracin"],
)
def test_methods_accept_a_user_function_property(method):
    """A user function equal to the mean -loss over val gives the built-in property's scores."""
    b = _bundle()
    builtin = QueryProperty(split="val", indices="all", reduce="mean", measurement="loss")
    user = FunctionProperty(lambda logits, y: neg_loss(logits, y).mean().reshape(1), split="val")
    s_builtin = method.attribute(_task(builtin, b)).scores
    s_user = method.attribute(_task(user, b)).scores
    assert s_user.shape == (5, 1)
    assert torch.allclose(s_user, s_builtin, atol=1e-10)
    assert s_user.abs().max() > 1e-6


@pytest.mark.parametrize(
    "name", ["test_points", "val_loss", "class_mean", "index_list", "function"]
)
def test_property_configs_build(name):
    with initialize_config_dir(config_dir=str(Path(ROOT) / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"property={name}", "experiment=smoke"])
    prop = build(cfg.property)
    b = tiny_bundle(n=30, seed=2)
    ex = prop.examples(b)
    assert ex.m >= 1
    logits = torch.randn(len(b.split(prop.split)[1]), 3)
    assert prop.values(logits, b).shape == (ex.m,)


def test_loo_accepts_a_user_function_property(tmp_path):
    from factory import tiny_recipe
    from ggda.attribution.loo import GroupLOO
    from ggda.evaluation.retrain import RetrainService

    b = tiny_bundle(n=20, seed=2)
    svc = RetrainService(tmp_path, backend="sequential").bind(tiny_recipe(2), b, "prop-loo")
    builtin = QueryProperty(split="val", indices="all", reduce="mean", measurement="loss")
    user = FunctionProperty(lambda logits, y: neg_loss(logits, y).mean().reshape(1), split="val")
    out = []
    for prop in (builtin, user):
        task = AttributionTask(
            None, [], b.x_train, b.y_train, Grouping(torch.arange(20) % 4, 4), prop.examples(b)
        )
        task.retrain, task.prop, task.bundle = svc, prop, b
        out.append(GroupLOO(max_retrains=10).attribute(task).scores)
    assert out[1].shape == (4, 1)
    assert torch.allclose(out[0], out[1], atol=1e-6) and out[0].abs().max() > 1e-5
