"""Walk every option of every config group: it composes and its object builds.

New options are picked up automatically, so a broken config file fails here.
"""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationKeyError

from ggda.errors import ConfigError
from ggda.pipeline import build, build_recipe

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "dataset",
    "model",
    "grouping",
    "method",
    "property",
    "evaluation",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "experiment",
]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(tmp_path, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={tmp_path}"])


def _target_importable(node):
    target = node["_target_"]
    try:
        get_class(target)
    except Exception:
        get_method(target)


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_builds(tmp_path, group, option):
    cfg = _compose(tmp_path, [f"{group}={option}"])
    node = cfg.get(group)
    needs_user_value = {("dataset", "csv"): "dataset.target", ("model", "custom"): "model.net"}
    if (group, option) in needs_user_value:
        # bring-your-own options have no usable default: building must name the missing key
        with pytest.raises(ConfigError, match=needs_user_value[group, option]):
            build(node) if group == "dataset" else build_recipe(node)
        return
    if group == "dataset":
        build(node)  # constructing validates; file-based sets only read files on load()
    elif group == "model":
        try:
            recipe = build_recipe(node)
        except InterpolationKeyError as e:
            # a model tied to a kind of data (text: vocabulary size) builds in its experiment
            assert "dataset." in str(e)
            return
        assert callable(recipe.net_factory)
    elif group in ("grouping", "method", "property"):
        obj = build(node)
        # every setting reaches what decides the cache key, with the composed value
        deciding = obj.config() if hasattr(obj, "config") else vars(obj)
        for key, value in OmegaConf.to_container(node, resolve=True).items():
            if key in (
                "_target_",
                "_recursive_",
                "name",
                "warn_share",
            ):  # warn_share: a warning only
                continue
            assert key in deciding, f"{group}={option}: `{key}` does not reach the cache key"
            got = deciding[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, (key, got, value)
    elif group == "evaluation":
        for sub in (node or {}).values():
            build(sub)
    elif group == "trainer":
        kw = OmegaConf.to_container(node, resolve=True)
        if kw.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
            pytest.skip("needs a GPU")
        pl.Trainer(**kw, logger=False, default_root_dir=str(tmp_path))
    elif group == "callbacks":
        for sub in node.values():
            build(sub)
    elif group == "logger":
        for sub in (node or {}).values():
            _target_importable(sub)  # instantiating W&B would start a run
    elif group == "paths":
        # the cache and the data directory follow the output directory unless set
        assert Path(node.cache_dir) == Path(node.output_dir) / "cache"
    elif group == "experiment":
        # an experiment must leave a config whose parts all build
        build(cfg.dataset)
        build_recipe(cfg.model)
        build(cfg.grouping)
        build(cfg.method)
        build(cfg.property)
        for sub in (cfg.get("evaluation") or {}).values():
            build(sub)


def test_unknown_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(Exception, match="Available options in 'method'") as e:
        _compose(tmp_path, ["method=nosuch"])
    assert "tracin" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("groups=0", "groups"),
        ("grouping.iters=0", "grouping.iters"),
        ("method.proj_dim=-1", "method.proj_dim"),
        ("evaluation.lds.num_subsets=0", "evaluation.lds.num_subsets"),
        ("evaluation.lds.repeats=0", "evaluation.lds.repeats"),
        ("retrain.backend=gpuz", "retrain.backend"),
    ],
)
def test_bad_numbers_name_key_value_and_range(tmp_path, override, key):
    cfg = _compose(tmp_path, [override])
    node = {
        "groups": cfg.grouping,
        "grouping": cfg.grouping,
        "method": cfg.method,
        "evaluation": cfg.evaluation.lds,
        "retrain": cfg.retrain,
    }[override.split(".")[0].split("=")[0]]
    with pytest.raises(ConfigError) as e:
        build(node, **({"cache_dir": str(tmp_path)} if "retrain" in override else {}))
    assert f"`{key}`" in str(e.value) and "expected" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.optim.lr=-1", "model.optim.lr"),
        ("model.epochs=0", "model.epochs"),
        ("model.batch_size=0", "model.batch_size"),
        ("model.optim._target_=torch.optim.NoSuchOptimizer", "model.optim._target_"),
        ("model.optim.weight_decay=-1", "model.optim"),
        ("+model.optim.nesterov_typo=true", "model.optim"),
    ],
)
def test_bad_recipe_values(tmp_path, override, key):
    cfg = _compose(tmp_path, [override])
    with pytest.raises(ConfigError, match=f"`{key}`"):
        build_recipe(cfg.model)


def test_paths_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GGDA_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("GGDA_DATA_DIR", str(tmp_path / "files"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        paths = compose("config").paths
    assert Path(paths.output_dir) == tmp_path / "out"
    assert Path(paths.cache_dir) == tmp_path / "out" / "cache"
    assert Path(paths.data_dir) == tmp_path / "files"
