"""The worked example of docs/architecture.md: a grouping strategy is one module + one YAML.

The two code blocks are read out of the page itself (so the example cannot rot), written
into a scratch tree (the module joins ``ggda.grouping`` through its ``__path__``, the YAML a
copy of ``conf/``) and run through the real pipeline with ``grouping=contiguous``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import ggda.grouping

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", re.S)


def _example() -> dict[str, str]:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    blocks = dict(BLOCK.findall(doc))
    assert set(blocks) == {"ggda/grouping/contiguous.py", "conf/grouping/contiguous.yaml"}
    return blocks


@pytest.fixture
def example_tree(tmp_path, monkeypatch):
    """conf/ copy + ggda/grouping/contiguous.py, exactly as the page shows them."""
    blocks = _example()
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "grouping" / "contiguous.yaml").write_text(blocks["conf/grouping/contiguous.yaml"])
    pkg = tmp_path / "ggda" / "grouping"
    pkg.mkdir(parents=True)
    (pkg / "contiguous.py").write_text(blocks["ggda/grouping/contiguous.py"])
    monkeypatch.setattr(ggda.grouping, "__path__", [*ggda.grouping.__path__, str(pkg)])
    yield conf
    sys.modules.pop("ggda.grouping.contiguous", None)


def test_the_example_touches_one_module_and_one_yaml():
    blocks = _example()
    assert not (ROOT / "ggda/grouping/contiguous.py").exists(), "the example is not shipped"
    assert (
        "_target_: ggda.grouping.contiguous.ContiguousGrouper"
        in blocks["conf/grouping/contiguous.yaml"]
    )


def test_the_example_runs_end_to_end(example_tree, tmp_path):
    from ggda.pipeline import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(example_tree), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=smoke",
                "logger=none",
                "evaluation=none",
                "grouping=contiguous",
                "groups=5",
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ],
        )
    GlobalHydra.instance().clear()
    metrics = run(cfg)
    d = tmp_path / "out" / "runs" / "api"
    ids = torch.load(d / "grouping.pt")
    n = ids.numel()
    assert torch.equal(ids, torch.arange(n) * 5 // n)  # blocks of consecutive indices
    sizes = torch.bincount(ids)
    assert sizes.max() - sizes.min() <= 1
    scores = torch.load(d / "scores.pt")
    assert scores.shape[0] == 5 and torch.isfinite(scores).all()
    assert metrics["grouping/k"] == 5
    assert json.loads((d / "config.json").read_text())["resolved"]["grouping"]["name"] == (
        "contiguous"
    )
