"""Faults, interruptions, determinism and concurrency, end to end through the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from factory import ROOT, run_cli

SMOKE = ["experiment=smoke", "logger=none"]
RUN = "runs/synthetic/tracin/kmeans_k8_s0"


def _metrics(out, run=RUN):
    return json.loads((out / run / "metrics.json").read_text())


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.parametrize(
    "stage, evidence",
    [
        ("train_epoch_2", lambda m, log: "Resuming the interrupted training" in log),
        ("grouped", lambda m, log: m["grouping/cached"] == 1 and m["model/cached"] == 1),
        ("attributed", lambda m, log: m["attribution/cached"] == 1),
        ("lds_point", lambda m, log: m["lds/retrains_cached"] == 8),
    ],
)
def test_killed_run_resumes_and_reuses_finished_work(tmp_path, stage, evidence):
    killed = run_cli(SMOKE, tmp_path, env={"GGDA_FAULT": stage})
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (tmp_path / RUN / "metrics.json").exists()
    res = _ok(run_cli(SMOKE, tmp_path))
    m = _metrics(tmp_path)
    assert evidence(m, res.stdout + res.stderr), m
    assert not list(tmp_path.rglob("*.corrupt"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_nan_loss_stops_with_stage_and_hint(tmp_path):
    res = run_cli([*SMOKE, "model.optim.lr=1e30"], tmp_path)
    assert res.returncode == 2
    assert "training the base model" in res.stderr and "`model.optim.lr`" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_same_config_and_seed_give_identical_outputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _ok(run_cli(SMOKE, a))
    _ok(run_cli(SMOKE, b))
    for name in ("scores.pt", "grouping.pt"):
        assert torch.equal(torch.load(a / RUN / name), torch.load(b / RUN / name)), name
    ma, mb = _metrics(a), _metrics(b)
    for key in ma:
        if key.startswith(("lds/point/", "lds/group/", "grouping/size")):
            assert ma[key] == mb[key], key
    assert ma["seed"] == 0
    assert json.loads((a / RUN / "config.json").read_text())["resolved"]["seed"] == 0


def test_corrupt_cache_entries_are_reported_and_recomputed(tmp_path):
    _ok(run_cli(SMOKE, tmp_path))
    first = _metrics(tmp_path)
    retrains = sorted((tmp_path / "cache" / "retrain").rglob("*.pt"))
    scores = next((tmp_path / "cache" / "scores").glob("*.pt"))
    for p in (retrains[0], scores):
        p.write_bytes(p.read_bytes()[:100])  # truncated, as by a kill mid-write elsewhere
    res = _ok(run_cli([*SMOKE, "tag=_again"], tmp_path))
    log = res.stdout + res.stderr
    assert "Ignoring bad cached retrain result" in log
    assert "Ignoring bad cached attribution scores" in log
    again = _metrics(tmp_path, RUN + "_again")
    assert again["lds/retrains_run"] == 1 and again["attribution/cached"] == 0
    assert again["lds/point/mean"] == first["lds/point/mean"]


def test_two_processes_sharing_the_cache(tmp_path):
    """Two runs of the same model at once: one trains, the other waits; no partial reads."""
    import os

    env = os.environ | {"WANDB_MODE": "offline", "GGDA_OUTPUT_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *SMOKE, f"tag=_{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
    m0, m1 = (_metrics(tmp_path, f"{RUN}_{i}") for i in range(2))
    assert sorted([m0["model/cached"], m1["model/cached"]]) == [0.0, 1.0]
    assert m0["lds/point/mean"] == m1["lds/point/mean"]
    s0, s1 = (torch.load(tmp_path / f"{RUN}_{i}" / "scores.pt") for i in range(2))
    assert torch.equal(s0, s1)
    assert "Ignoring bad cached" not in "".join(o + e for o, e in outs)
    assert not list(tmp_path.rglob("*.corrupt")) and not list(tmp_path.rglob("*.tmp"))
