"""Every grouping strategy: exact partitions, balance, seeds, class purity, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factory import ROOT, tiny_bundle, tiny_net
from ggda.errors import ConfigError
from ggda.grouping import (
    ClassGrouper,
    GroupingInputs,
    KMeansGrouper,
    RandomGrouper,
    SingletonGrouper,
)

N, C = 90, 3


def inputs(n: int = N, seed: int = 0) -> GroupingInputs:
    b = tiny_bundle(n=n, seed=seed, c=C)
    torch.manual_seed(seed)
    net = tiny_net("mlp", d=5, c=C).float()
    return GroupingInputs(b.x_train, b.y_train, C, net, "cpu")


KMEANS = [
    dict(features=f, per_class=pc, balanced=bal, init=init)
    for f in ("inputs", "representations", "gradients")
    for pc in (False, True)
    for bal in (False, True)
    for init in ("k-means++", "random")
]
GRAD_KINDS = [dict(features="gradients", gradient_kind=g) for g in ("logits", "penultimate")]


def groupers(k: int, seed: int = 0):
    yield RandomGrouper(k, seed)
    yield ClassGrouper(k, seed)
    for kw in KMEANS + GRAD_KINDS:
        yield KMeansGrouper(k, seed=seed, **kw)


@pytest.mark.parametrize("k", [3, 7, 30, 89, N])
def test_exactly_k_nonempty_groups(k):
    inp = inputs()
    for g in groupers(k):
        grouping = g.group(inp)
        assert grouping.k == k and grouping.n == N, g.config()
        assert torch.unique(grouping.group_ids).numel() == k, g.config()
        assert int(grouping.sizes().min()) >= 1


def test_singleton():
    grouping = SingletonGrouper(5).group(inputs())
    assert grouping.k == N and torch.equal(grouping.group_ids, torch.arange(N))


def test_k_one_and_duplicate_points():
    """Many identical points: k-means must still make k non-empty groups."""
    x = torch.zeros(40, 4)
    x[:3] = torch.randn(3, 4)
    inp = GroupingInputs(x, torch.arange(40) % 2, 2)
    for kw in (dict(), dict(balanced=True), dict(per_class=True), dict(init="random")):
        for k in (1 if not kw.get("per_class") else 2, 10, 40):
            grouping = KMeansGrouper(k, **kw).group(inp)
            assert torch.unique(grouping.group_ids).numel() == k


@pytest.mark.parametrize("k", [3, 7, 13, 45])
def test_balanced_sizes_differ_by_at_most_one(k):
    inp = inputs()
    for f in ("inputs", "gradients"):
        s = KMeansGrouper(k, features=f, balanced=True).group(inp).sizes()
        assert int(s.max() - s.min()) <= 1
        assert int((s == N // k + 1).sum()) == N % k


def test_per_class_balanced_is_balanced_within_classes():
    inp = inputs()
    grouping = KMeansGrouper(12, per_class=True, balanced=True).group(inp)
    sizes = grouping.sizes()
    for cls in range(C):
        groups = torch.unique(grouping.group_ids[inp.y == cls])
        s = sizes[groups]
        assert int(s.max() - s.min()) <= 1 and int(s.sum()) == int((inp.y == cls).sum())


@pytest.mark.parametrize("k", [3, 10, 40])
def test_per_class_never_mixes_classes(k):
    inp = inputs()
    for g in [ClassGrouper(k)] + [
        KMeansGrouper(k, features=f, per_class=True)
        for f in ("inputs", "representations", "gradients")
    ]:
        grouping = g.group(inp)
        classes_per_group = torch.zeros(k, C)
        classes_per_group[grouping.group_ids, inp.y] = 1
        assert torch.all(classes_per_group.sum(1) == 1), g.config()


def test_per_class_needs_one_group_per_class():
    with pytest.raises(ConfigError, match="`groups`.*number of classes"):
        KMeansGrouper(2, per_class=True).group(inputs())
    with pytest.raises(ConfigError, match="`groups`"):
        ClassGrouper(2).group(inputs())


def test_same_seed_same_grouping_other_seed_differs():
    inp = inputs()
    for a, b, c in zip(groupers(10, 0), groupers(10, 0), groupers(10, 1), strict=True):
        ga, gb = a.group(inp).group_ids, b.group(inp).group_ids
        assert torch.equal(ga, gb), a.config()
        if isinstance(a, (RandomGrouper, ClassGrouper)):
            assert not torch.equal(ga, c.group(inp).group_ids)


def test_kmeans_groups_differ_by_feature_space():
    inp = inputs()
    ids = {
        f: KMeansGrouper(10, features=f).group(inp).group_ids
        for f in ("inputs", "representations", "gradients")
    }
    assert not torch.equal(ids["inputs"], ids["gradients"])


def test_timings_and_config():
    g = KMeansGrouper(10, features="gradients")
    before = g.config()
    g.group(inputs())
    assert set(g.timings) == {"grouping_features", "clustering"}
    assert all(v >= 0 for v in g.timings.values())
    assert g.config() == before  # timings do not enter the cache key
    assert g.uses_model and not KMeansGrouper(10).uses_model


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(features="pixels"), "grouping.features"),
        (dict(gradient_kind="hessian"), "grouping.gradient_kind"),
        (dict(proj_dim=0), "grouping.proj_dim"),
        (dict(iters=0), "grouping.iters"),
        (dict(init="kmeans++"), "grouping.init"),
        (dict(tol=-1.0), "grouping.tol"),
        (dict(per_class="yes"), "grouping.per_class"),
        (dict(balanced="no"), "grouping.balanced"),
        (dict(seed=-1), "grouping.seed"),
        (dict(seed=1.5), "grouping.seed"),
        (dict(groups=0), "groups"),
        (dict(groups=1.5), "groups"),
    ],
)
def test_config_values_are_validated(kw, key):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        KMeansGrouper(**({"groups": 10} | kw))


def test_groups_larger_than_n():
    with pytest.raises(ConfigError, match="`groups`"):
        RandomGrouper(N + 1).group(inputs())


@pytest.mark.parametrize(
    "name", ["singleton", "random", "class", "kmeans", "repr_kmeans", "grad_kmeans"]
)
def test_grouping_configs_build(name):
    from hydra import compose, initialize_config_dir

    from ggda.pipeline import build

    with initialize_config_dir(str(Path(ROOT) / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"grouping={name}", "groups=7", "seed=3"])
    assert cfg.grouping.name == name  # the run directory is named by it
    g = build(cfg.grouping)
    assert g.seed == 3
    grouping = g.group(inputs())
    assert grouping.k == (N if name == "singleton" else 7)
    if name in ("kmeans", "repr_kmeans", "grad_kmeans"):
        expected = {"kmeans": "inputs", "repr_kmeans": "representations"}
        assert g.features == expected.get(name, "gradients")


@pytest.mark.gpu
def test_kmeans_runs_on_the_model_device():
    inp = inputs()
    inp.model = inp.model.cuda()
    inp.device = "cuda"
    for f in ("inputs", "gradients"):
        cpu = KMeansGrouper(10, features=f, balanced=True).group(inputs())
        gpu = KMeansGrouper(10, features=f, balanced=True).group(inp)
        s = gpu.sizes()
        assert int(s.max() - s.min()) <= 1 and cpu.k == gpu.k
