"""The Python API and the CLI have the same defaults: every ``conf/dataset/*.yaml`` equals
its class's constructor defaults, so ``MNIST5k()`` and ``python run.py dataset=mnist5k``
attribute the same queries."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

import ggda.config  # noqa: F401  (the config resolvers)

CONF = Path(__file__).resolve().parents[2] / "conf"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
BUNDLED = ("digits", "mnist5k", "synthetic")  # loadable without downloaded files
# Bring-your-own sets whose constructor refuses a key the conf leaves for the user to set
# (building without it must name the key: tests/test_config.py); both sides get this value.
USER_VALUES = {"csv": {"target": "label"}}


def _dataset_cfg(name, tmp_path):
    user = [f"dataset.{k}={v}" for k, v in USER_VALUES.get(name, {}).items()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={name}", f"paths.data_dir={tmp_path}", *user])
    return cfg.dataset


def _api_default(cls, tmp_path, user=None):
    """The object built with only the arguments that have no default (and ``user``)."""
    import inspect

    required = {
        p.name: str(tmp_path)
        for p in inspect.signature(cls).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    return cls(**required, **(user or {}))


@pytest.mark.parametrize("name", DATASETS)
def test_constructor_defaults_equal_the_composed_config(name, tmp_path):
    node = _dataset_cfg(name, tmp_path)
    obj = _api_default(get_class(node._target_), tmp_path, USER_VALUES.get(name))
    checked = 0
    for key, value in node.items():
        if key in ("_target_", "data_dir", "cache_dir"):
            continue  # the class and where files live (`paths.*`), not defaults
        assert hasattr(obj, key), f"{name}: {type(obj).__name__} has no attribute {key}"
        assert getattr(obj, key) == value, (
            f"dataset={name}: conf says {key}={value!r}, "
            f"{type(obj).__name__}() defaults to {getattr(obj, key)!r}"
        )
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("name", BUNDLED)
def test_api_and_cli_attribute_the_same_queries(name, tmp_path):
    node = _dataset_cfg(name, tmp_path)
    cli = instantiate(node).load()
    api = _api_default(get_class(node._target_), tmp_path).load()
    assert torch.equal(cli.query_idx, api.query_idx)
    assert torch.equal(cli.y_train, api.y_train) and torch.equal(cli.x_test, api.x_test)
