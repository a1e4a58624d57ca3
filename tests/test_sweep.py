"""Sweeps end to end: the submitit launcher, resuming a killed sweep, the shared cache."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from factory import ROOT, run_cli
from ggda import report as rp
from ggda.io import load_artifact

SMOKE = ["experiment=smoke", "logger=none"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_submitit_local_sweep_then_report_and_shared_cache(tmp_path):
    """Two jobs through hydra/launcher=submitit_local (they run at the same time and ask
    for the same point-level LDS subsets), then the report over the sweep directory."""
    _ok(
        run_cli(
            ["-m", "hydra/launcher=submitit_local", *SMOKE, "groups=4,8"],
            tmp_path,
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    sweep = tmp_path / "multirun" / "sweep"
    runs = sorted(sweep.glob("*/metrics.json"))
    assert [p.parent.name for p in runs] == [
        "experiment=smoke,groups=4",
        "experiment=smoke,groups=8",
    ]
    assert list((sweep / ".submitit").rglob("*_log.out"))  # it went through submitit
    metrics = [json.loads(p.read_text()) for p in runs]

    # One valid cache entry per (subset, seed), whichever job trained it, and no subset
    # trained twice: the jobs' retrain counts add up to the number of entries.
    entries = sorted((tmp_path / "cache" / "retrain").rglob("*.pt"))
    assert entries and not list((tmp_path / "cache" / "retrain").rglob("*.tmp"))
    for e in entries:
        load_artifact(e)  # checksum verified
    assert sum(m["lds/retrains_run"] for m in metrics) == len(entries)
    # 8 point-level subsets shared by both jobs + 8 group-level subsets each (at most).
    assert len(entries) <= 8 + 8 + 8

    out = rp.report(sweep)
    df = out["runs"]
    assert sorted(df["k"]) == [4, 8]
    for m in metrics:
        row = df[df.k == m["attribution/k"]].iloc[0]
        assert row["lds/point/mean"] == pytest.approx(m["lds/point/mean"])
    assert (sweep / "report" / "lds_vs_k.png").exists()
    assert not df["has_baseline"].any()  # no k = n run in this sweep: said, not invented


def _sweep_cmd():
    # Retrains are made slower than the smoke default so a job lasts long enough to be
    # killed while it runs.
    return [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        *SMOKE,
        "groups=2,4,8",
        "model.epochs=30",
        "model.save_epochs=[30]",
        "evaluation.lds.num_subsets=12",
    ]


@pytest.mark.slow
def test_killed_sweep_resumes_with_only_the_missing_jobs(tmp_path):
    env = os.environ | {
        "GGDA_OUTPUT_DIR": str(tmp_path),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    sweep = tmp_path / "multirun" / "sweep"
    # Hydra names job directories by their sorted overrides.
    job = (
        "evaluation.lds.num_subsets=12,experiment=smoke,groups={},"
        "model.epochs=30,model.save_epochs=[30]"
    )
    first, second, third = (sweep / job.format(k) for k in (2, 4, 8))
    proc = subprocess.Popen(
        _sweep_cmd(),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill the whole sweep as soon as the second job has started (Hydra made its dir).
    deadline = time.time() + 240
    while not (second / ".hydra").exists():
        assert proc.poll() is None, "the sweep ended before it could be killed"
        assert time.time() < deadline, "the sweep did not reach its second job"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "metrics.json").exists()
    assert not (second / "metrics.json").exists() and not third.exists()
    done_before = (first / "metrics.json").stat().st_mtime_ns

    # The report sees one finished run and lists the killed one.
    df, unfinished = rp.collect(sweep)
    assert len(df) == 1 and unfinished == [second]

    res = _ok(
        subprocess.run(
            _sweep_cmd(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
    )
    # Only the missing jobs ran: the finished one was skipped, untouched.
    assert (first / "metrics.json").stat().st_mtime_ns == done_before
    assert (res.stdout + res.stderr).count("nothing to do") == 1
    assert "nothing to do" in (first / "run.log").read_text()
    for d in (second, third):
        assert (d / "metrics.json").exists()
        assert "nothing to do" not in (d / "run.log").read_text()
    df, unfinished = rp.collect(sweep)
    assert sorted(df["k"]) == [2, 4, 8] and unfinished == []
