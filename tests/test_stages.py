"""The run stages as a library module: no frameworks, cached results, unchanged cache keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ggda import stages
from ggda.attribution.properties import QueryProperty
from ggda.attribution.tracin import TracIn
from ggda.evaluation.base import EvalResult
from ggda.grouping import GroupingInputs, KMeansGrouper
from ggda.grouping.base import Grouping
from tests.factory import ROOT, tiny_bundle, tiny_task


def test_stages_load_without_lightning_hydra_or_omegaconf():
    code = (
        "import sys, ggda.stages; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric', 'hydra', 'omegaconf')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"ggda.stages imported {res.stdout.strip()} {res.stderr[-2000:]}"


# -- the cache keys: byte-identical to the keys of ggda.pipeline.cache_keys before the
# stages module existed (computed with that code and written down here) --------------------

CASES = {
    "plain": dict(
        cfg={
            "dataset": {"name": "synthetic", "num_train": 100, "num_queries": 7, "noise": 0.1},
            "model": {
                "name": "mlp",
                "net": {"_target_": "ggda.models.MLP", "hidden": [8]},
                "epochs": 2,
                "optim": {"_target_": "torch.optim.SGD", "lr": 0.05},
            },
            "seed": 0,
            "trainer": {"accelerator": "cpu", "deterministic": True, "enable_progress_bar": False},
        },
        grouper={"groups": 10, "seed": 0, "name": "random"},
        uses_model=False,
        method={"name": "tracin", "proj_dim": None},
        prop={"split": "test", "indices": "queries", "measurement": "loss"},
        fp=None,
    ),
    "model64": dict(
        cfg={
            "dataset": {"name": "mnist5k", "num_train": 5000, "num_queries": 200},
            "model": {"name": "mlp", "epochs": 5, "batch_size": 64, "save_epochs": [1, 3, 5]},
            "seed": 3,
            "trainer": {
                "precision": "64-true",
                "deterministic": True,
                "gradient_clip_val": None,
                "devices": 1,
            },
        },
        grouper={"groups": 100, "seed": 0, "features": "gradients", "name": "grad_kmeans"},
        uses_model=True,
        method={"name": "trak", "proj_dim": 512, "kernel": "groups", "damping": 0.1},
        prop={"split": "test", "indices": [1, 2]},
        fp={"train.npz": "abc123", "pkg": {"torch": "2.0"}},
    ),
    "noqueries_32": dict(
        cfg={
            "dataset": {"name": "cifar", "num_train": 50},
            "model": {"name": "cnn", "epochs": 1},
            "seed": 11,
            "trainer": {"precision": "32-true", "max_time": None},
        },
        grouper={"groups": None, "seed": 0, "name": "singleton"},
        uses_model=False,
        method={"name": "influence", "damping": 0.01},
        prop={},
        fp={"a": "b"},
    ),
}
EXPECTED = {
    "plain": {
        "data": "703f983f760c66ab",
        "recipe": "b3df16a1a968bd4c",
        "retrain": "b3df16a1a968bd4c",
        "model": "f02000d61e10298d",
        "grouping": "2bd35e497e8d638d",
        "scores": "bafa8bbcb0eca1f2",
        "member_seed_plus_1": "3caaee1fc24ce359",
    },
    "model64": {
        "data": "e0054a763de3624f",
        "recipe": "9e4b2700b0107ca4",
        "retrain": "d5cf3ede4fb84756",
        "model": "e177743dcebd26e1",
        "grouping": "0c18772d73150980",
        "scores": "492f0f50f864edc1",
        "member_seed_plus_1": "54ee5af970dea759",
    },
    "noqueries_32": {
        "data": "ba0718874f8f8f3a",
        "recipe": "311eed20e6230909",
        "retrain": "311eed20e6230909",
        "model": "fdef843c69e09d1f",
        "grouping": "abfab7ab27845b7f",
        "scores": "1f062e02e8cb873a",
        "member_seed_plus_1": "23854a3baa523564",
    },
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cache_keys_are_the_old_keys(name):
    from ggda import pipeline

    c, want = CASES[name], EXPECTED[name]
    cfg = OmegaConf.create(c["cfg"])
    args = (c["grouper"], c["uses_model"], c["method"], c["prop"], c["fp"])
    old_form = pipeline.cache_keys(cfg, *args)
    old_form["member_seed_plus_1"] = pipeline.base_model_key(
        old_form["recipe"], c["cfg"]["seed"] + 1, cfg
    )
    assert old_form == want
    trainer = pipeline.trainer_results(cfg)
    keys = stages.cache_keys(
        data=c["cfg"]["dataset"],
        model=c["cfg"]["model"],
        seed=c["cfg"]["seed"],
        trainer=trainer,
        grouper=c["grouper"],
        uses_model=c["uses_model"],
        method=c["method"],
        prop=c["prop"],
        fingerprint=c["fp"],
    )
    assert keys == {k: v for k, v in want.items() if k != "member_seed_plus_1"}
    assert (
        stages.model_key(keys["recipe"], c["cfg"]["seed"] + 1, trainer)
        == want["member_seed_plus_1"]
    )


def test_cache_keys_from_plain_dicts_alone():
    """No OmegaConf: the trainer's result keys written out by hand give the same keys."""
    c = CASES["plain"]
    keys = stages.cache_keys(
        data=c["cfg"]["dataset"],
        model=c["cfg"]["model"],
        seed=0,
        trainer={"deterministic": True, "precision": "32-true"},
        grouper=c["grouper"],
        uses_model=False,
        method=c["method"],
        prop=c["prop"],
    )
    assert keys["scores"] == EXPECTED["plain"]["scores"]
    cache = stages.ArtifactCache.for_setup(
        "unused",
        data=c["cfg"]["dataset"],
        model=c["cfg"]["model"],
        seed=0,
        trainer={"deterministic": True},
    )
    assert (cache.data_key, cache.model_key) == (keys["data"], keys["model"])


# -- the stages on tiny problems ------------------------------------------------------------


def _cache(tmp_path) -> stages.ArtifactCache:
    return stages.ArtifactCache.for_setup(
        tmp_path / "cache", data={"name": "tiny"}, model={"name": "tiny"}, seed=0
    )


def test_grouping_stage_caches(tmp_path):
    b = tiny_bundle(n=40)
    inputs = GroupingInputs(b.x_train, b.y_train, b.num_classes)
    cache = _cache(tmp_path)
    first = stages.group(KMeansGrouper(groups=5), inputs, cache)
    again = stages.group(KMeansGrouper(groups=5), inputs, cache)
    assert (first.cached, again.cached) == (False, True)
    assert first.key == again.key == cache.grouping_key(KMeansGrouper(groups=5))
    assert (cache.dir / "groupings" / f"{first.key}.pt").exists()
    assert torch.equal(first.grouping.group_ids, again.grouping.group_ids)
    assert (first.grouping.k, first.seconds, first.timings) == (
        again.grouping.k,
        again.seconds,
        again.timings,
    )
    assert again.metrics()["grouping/cached"] == 1
    other = stages.group(KMeansGrouper(groups=4), inputs, cache)
    assert not other.cached and other.grouping.k == 4
    assert stages.group(KMeansGrouper(groups=5), inputs).key is None  # no cache: no key


def _task(group_ids: torch.Tensor, k: int):
    task = tiny_task(group_ids, k, kind="mlp")
    task.prop = QueryProperty()  # what the scores attribute enters their key
    return task


def test_attribution_stage_caches_and_a_changed_method_misses(tmp_path):
    cache = _cache(tmp_path)
    ids = torch.randperm(24, generator=torch.Generator().manual_seed(0)) % 6
    task = _task(ids, 6)
    first = stages.attribute(TracIn(), task, cache, grouping_key="g0")
    again = stages.attribute(TracIn(), task, cache, grouping_key="g0")
    assert (first.cached, again.cached) == (False, True)
    assert first.key == again.key and (cache.dir / "scores" / f"{first.key}.pt").exists()
    assert torch.equal(first.scores, again.scores)
    assert first.result.timings == again.result.timings
    assert again.metrics()["attribution/cached"] == 1
    changed = stages.attribute(TracIn(last_layer=True), task, cache, grouping_key="g0")
    assert not changed.cached and changed.key != first.key
    assert not torch.equal(changed.scores, first.scores)
    regrouped = stages.attribute(TracIn(), task, cache, grouping_key="g1")
    assert not regrouped.cached and regrouped.key != first.key
    with pytest.raises(ValueError, match="grouping's key"):
        stages.attribute(TracIn(), task, cache)


def test_group_scores_are_sums_of_member_scores_through_the_stage():
    n, k = 24, 5
    ids = torch.arange(n) % k
    point = stages.attribute(TracIn(), _task(torch.arange(n), n)).scores
    grouped = stages.attribute(TracIn(), _task(ids, k)).scores
    members = Grouping(ids, k).membership().to(point.dtype)  # (n, k)
    assert grouped.dtype == torch.float64 and grouped.shape == (k, point.shape[1])
    torch.testing.assert_close(grouped, members.T @ point, rtol=1e-10, atol=1e-12)


class _Probe:
    """A duck-typed evaluator (a subclass would register its name for the whole session)."""

    name = "probe"

    def evaluate(self, ctx):
        return EvalResult(metrics={"k": ctx.grouping.k, "total": float(ctx.scores.sum())})


def test_evaluation_stage_reads_the_attribution():
    task = _task(torch.arange(24) % 3, 3)
    attributed = stages.attribute(TracIn(), task)
    res = stages.evaluate([_Probe()], attributed)
    assert [o.name for o in res.outcomes] == ["probe"]
    m = res.metrics()
    assert m["probe/k"] == 3 and m["probe/total"] == float(attributed.scores.sum())
    assert m["time/eval/probe"] >= 0


def test_callbacks_in_the_wrong_order_are_refused_before_training():
    from ggda.errors import ConfigError
    from ggda.lightning.callbacks import EpochCheckpoint, EvaluationCallback
    from ggda.lightning.callbacks import GroupAttributionCallback as Attr
    from ggda.pipeline import _check_callback_order

    node = {"_target_": "unused"}  # the check reads the names of the (non-empty) nodes
    good = OmegaConf.create(
        {"callbacks": dict.fromkeys(("checkpoint", "attribution", "evaluation"), node)}
    )
    _check_callback_order(good, [EpochCheckpoint(), Attr(), EvaluationCallback()])
    bad = OmegaConf.create({"callbacks": {"evaluation": node, "attribution": node}})
    with pytest.raises(
        ConfigError, match="`evaluation` evaluates what the GroupAttributionCallback"
    ):
        _check_callback_order(bad, [EvaluationCallback(), Attr()])
    with pytest.raises(ConfigError, match="callbacks"):
        _check_callback_order(OmegaConf.create({"callbacks": {"e": node}}), [EvaluationCallback()])


def test_member_model_keys():
    """A full-data member keeps its old key; a subset-trained one has its own per fraction."""
    trainer = {"deterministic": True, "precision": "32-true"}
    full = stages.model_key("r", 3, trainer)
    assert stages.model_key("r", 3, trainer, 1.0) == full
    half = stages.model_key("r", 3, trainer, 0.5)
    assert half not in (full, stages.model_key("r", 3, trainer, 0.25))
    assert half != stages.model_key("r", 4, trainer, 0.5)


def test_member_indices_are_seeded_sorted_subsets():
    a = stages.member_indices(101, 0.5, seed=1)
    assert torch.equal(a, stages.member_indices(101, 0.5, seed=1))
    assert a.numel() == 50 and torch.equal(a, a.sort().values) and a.unique().numel() == 50
    assert int(a.min()) >= 0 and int(a.max()) < 101
    b = stages.member_indices(101, 0.5, seed=2)
    assert not torch.equal(a, b)
    assert stages.member_indices(10, 1.0, seed=0).tolist() == list(range(10))
    assert stages.member_indices(10, 0.01, seed=0).numel() == 1
