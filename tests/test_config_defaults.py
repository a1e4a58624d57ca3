"""One source of truth per default: the constructor.

A YAML file of ``conf/method``, ``conf/grouping`` or ``conf/evaluation`` (and the
``retrain`` node of ``conf/config.yaml``) may list a constructor argument so that users see
it, but only with the constructor's default value, unless the key is listed below as an
intentional override. The values compared are the composed ones (Hydra ``defaults`` lists
applied); interpolations count as overrides and must be listed too.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
# `warn_share` sits in the grouping node but the attribution callback reads it.
META = {"_target_", "name", "_recursive_", "_partial_", "warn_share"}

# (config file, key) -> why the YAML deliberately differs from the constructor default.
INTENTIONAL = {
    **{(f"method/{m}", "proj_seed"): "projections follow the run seed" for m in ("tracin", "trak")},
    ("method/influence", "seed"): "LiSSA sampling follows the run seed",
    **{
        (f"grouping/{g}", key): why
        for g in ("class", "kmeans", "grad_kmeans", "repr_kmeans", "random", "singleton")
        for key, why in (("groups", "the top-level `groups` key"), ("seed", "the run seed"))
        if (g, key) != ("singleton", "groups")
    },
    ("grouping/grad_kmeans", "features"): "the Grad-K-Means variant of kmeans",
    ("grouping/repr_kmeans", "features"): "the representation variant of kmeans",
    ("grouping/grad_kmeans", "max_size_factor"): "the default grouping caps group sizes",
    ("config.retrain", "slurm"): "the SLURM resources, spelled out for the cluster user",
    **{
        (f"method/{m}", key): f"the {m} preset of influence"
        for m in ("kfac", "ekfac")
        for key in ("solver", "damping", "last_layer", "seed", "damping_mode")
    },
}


def _composed(rel: str) -> dict:
    """The node of ``conf/<rel>.yaml`` with its group-local ``defaults`` applied (raw)."""
    group = rel.split("/")[0]
    own = OmegaConf.to_container(OmegaConf.load(CONF / f"{rel}.yaml"), resolve=False)
    defaults = own.pop("defaults", [])
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]  # Hydra: the file's own keys win
    out: dict = {}
    for d in defaults:
        out |= own if d == "_self_" else _composed(f"{group}/{d}")
    return out


def _files() -> list[str]:
    return [
        f"{g}/{p.stem}"
        for g in ("method", "grouping", "evaluation")
        for p in sorted((CONF / g).glob("*.yaml"))
        if "_target_" in _composed(f"{g}/{p.stem}")
    ]


def _node(rel: str) -> dict:
    if rel == "config.retrain":
        cfg = OmegaConf.load(CONF / "config.yaml")
        return OmegaConf.to_container(cfg.retrain, resolve=False)
    return _composed(rel)


def _raw_mismatches(rel: str) -> list[str]:
    return _mismatches(rel, _node(rel), allow=set())


def _mismatches(rel: str, node: dict, allow: set | None = None) -> list[str]:
    allow = INTENTIONAL.keys() if allow is None else allow
    sig = inspect.signature(get_class(node["_target_"]))
    out = []
    for key, value in node.items():
        if key in META:
            continue
        param = sig.parameters.get(key)
        assert param is not None, f"conf/{rel}.yaml: `{key}` is no argument of {node['_target_']}"
        default = param.default
        same = value == (list(default) if isinstance(default, tuple) else default)
        if not same and (rel, key) not in allow:
            out.append(f"conf/{rel}.yaml: {key}={value!r}, constructor default {default!r}")
    return out


@pytest.mark.parametrize("rel", _files())
def test_yaml_repeats_only_constructor_defaults(rel):
    bad = _mismatches(rel, _composed(rel))
    assert not bad, "\n".join(bad) + "\n(change the constructor default, or list it in INTENTIONAL)"


def test_retrain_node_repeats_only_constructor_defaults():
    assert not _mismatches("config.retrain", _node("config.retrain"))


def test_intentional_overrides_still_exist():
    """A listed override that the YAML no longer sets is stale: delete it from INTENTIONAL."""
    stale = [
        (rel, key)
        for rel, key in INTENTIONAL
        if not any(m.startswith(f"conf/{rel}.yaml: {key}=") for m in _raw_mismatches(rel))
    ]
    assert not stale, stale


def test_the_check_catches_a_disagreement():
    node = _composed("method/trak") | {"backend": "loop"}
    assert _mismatches("method/trak", node) == [
        "conf/method/trak.yaml: backend='loop', constructor default 'factored'"
    ]
