"""ggda on a real SLURM cluster (tests marked `slurm`; `.ci/slurm-up` starts a one-node one).

Every run is the seconds-long smoke experiment, into its own tmp_path (its own retrain
cache, so each path really retrains). Results are compared with the same work on the basic
launcher and the sequential retrain backend: where the work runs must not change a number.
The first test needs no cluster: it checks the routing inside a SLURM job by setting
SLURM_JOB_ID.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from factory import ROOT, tiny_bundle
from ggda.evaluation.retrain import RetrainService
from ggda.models.nets import LogisticRegression
from ggda.models.training import Recipe
from ggda.report import COST

SMOKE = ["experiment=smoke", "logger=none"]
# Small SLURM requests, so that both sweep jobs run at once on a small CI runner.
SLURM_LAUNCHER = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.mem_gb=1",
]
RETRAIN_SLURM = [
    "retrain.backend=submitit",
    "retrain.executor=slurm",
    "retrain.slurm.mem_gb=1",
    "retrain.slurm.timeout_min=10",
]


def _volatile(key: str) -> bool:
    """Metrics that say how the work was shared or what it cost, not what it found.

    ``COST`` (the report's run-cost metrics) holds ``attribution/epochs``: attribution time
    in base-model epochs, which differs between launchers like any timing.
    """
    return key.startswith(("time/", "lds/retrain")) or key.endswith("/cached") or key in COST


def _results(metrics_json: Path) -> dict:
    m = json.loads(metrics_json.read_text())
    return {k: v for k, v in m.items() if not _volatile(k)}


def _env(out: Path) -> dict:
    # Outside any SLURM job, whatever shell the tests run from: a launching process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return env | {
        "GGDA_OUTPUT_DIR": str(out),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(out),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }


def _cli(args: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=out,
        env=_env(out),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _squeue_ids() -> set[str]:
    res = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True)
    return set(res.stdout.split())


def _node_cpus() -> int:
    res = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[0].rstrip("+"))


@pytest.fixture
def cluster():
    """Cancel whatever jobs the test leaves behind (a failed or timed-out test)."""
    before = _squeue_ids()
    yield
    left = sorted(_squeue_ids() - before)
    if left:
        subprocess.run(["scancel", *left], check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    """The groups=5,10 smoke sweep on Hydra's basic launcher, sequential retrains."""
    out = tmp_path_factory.mktemp("reference")
    _cli(["-m", *SMOKE, "groups=5,10"], out)
    return {
        k: _results(out / "multirun" / "sweep" / f"experiment=smoke,groups={k}" / "metrics.json")
        for k in (5, 10)
    }


def _sweep_results(out: Path, ks=(5, 10)) -> dict[int, dict]:
    return {
        k: _results(out / "multirun" / "sweep" / f"experiment=smoke,groups={k}" / "metrics.json")
        for k in ks
    }


def test_inside_a_slurm_job_executor_slurm_retrains_in_the_allocation(
    tmp_path, monkeypatch, caplog
):
    """With SLURM_JOB_ID set, executor=slurm never submits (no sbatch needed here): the
    retrains run in this process (one CPU) or a pool, equal to the sequential backend."""
    bundle = tiny_bundle(n=40)
    recipe = Recipe(
        net_factory=LogisticRegression,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        epochs=3,
        batch_size=8,
    )
    masks = torch.rand(5, 40, generator=torch.Generator().manual_seed(0)) < 0.6
    ref = RetrainService(tmp_path / "a", backend="sequential").bind(recipe, bundle, "k")
    want = ref.run(masks, [0, 1])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    svc = RetrainService(tmp_path / "b", backend="submitit", executor="slurm")
    svc.bind(recipe, bundle, "k")
    with caplog.at_level("INFO", logger="ggda.evaluation.retrain"):
        got = svc.run(masks, [0, 1])
        svc.run(masks[:2] ^ True, [0])  # a second call: the route is not said again
    for split in ("val", "test"):
        torch.testing.assert_close(got[split], want[split], rtol=0, atol=0)
    said = [r.getMessage() for r in caplog.records if "inside SLURM job 4242" in r.getMessage()]
    assert len(said) == 1 and "this process" in said[0]
    assert svc.stats["retrains_run"] == 10 + 2
    assert not (tmp_path / "b" / "submitit").exists()  # nothing was submitted


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_slurm_sweep_equals_basic_launcher(tmp_path, reference, cluster):
    res = _cli(
        ["-m", *SLURM_LAUNCHER, "hydra.launcher.cpus_per_task=1", *SMOKE, "groups=5,10"], tmp_path
    )
    assert _sweep_results(tmp_path) == reference
    sweep = tmp_path / "multirun" / "sweep"
    assert len(list((sweep / ".submitit").rglob("*_result.pkl"))) == 2  # ran as SLURM jobs
    log = res.stdout + res.stderr
    # No accounting on this cluster: one note, not submitit's warning at every poll.
    assert "Bypassing sacct error" not in log
    assert log.count("following SLURM jobs with squeue") <= 1


@pytest.mark.slurm
@pytest.mark.slow
def test_lds_retrains_as_a_slurm_array_equal_local(tmp_path, reference, cluster):
    """From outside any job, executor=slurm fans the LDS retrains out as array jobs."""
    res = _cli([*SMOKE, "groups=5", *RETRAIN_SLURM, "retrain.retrains_per_job=4"], tmp_path)
    run = next(tmp_path.glob("runs/**/metrics.json"))
    assert _results(run) == reference[5]
    log = res.stdout + res.stderr
    # 8 point-level and 8 group-level subsets, 4 retrains per array task: 2 arrays of 2.
    assert log.count("submitted as 2 slurm submitit jobs (one array job") == 2, log[-3000:]
    tasks = list((tmp_path / "cache" / "submitit").rglob("*_result.pkl"))
    assert len(tasks) == 4
    # Every cache entry (16 draws, repeats trained once) was trained by the array tasks.
    entries = list((tmp_path / "cache" / "retrain").rglob("*.pt"))
    assert json.loads(run.read_text())["lds/retrains_run"] == len(entries) > 8
    assert "Bypassing sacct error" not in log


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_sweep_resubmitted_finishes_only_the_missing_jobs(tmp_path, cluster):
    name = f"ggda-test-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        *SLURM_LAUNCHER,
        "hydra.launcher.cpus_per_task=1",
        f"hydra.launcher.name={name}",
        *SMOKE,
        "groups=2,4,8",
    ]
    # The first submission runs one job at a time, for a clear "midway"; the resubmission
    # runs them together (launcher settings do not change the run directories).
    first_cmd = [*cmd, "hydra.launcher.array_parallelism=1"]
    sweep = tmp_path / "multirun" / "sweep"
    first, second, third = (sweep / f"experiment=smoke,groups={k}" for k in (2, 4, 8))
    proc = subprocess.Popen(
        first_cmd,
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Cancel the whole array as soon as the second job has started (Hydra made its dir).
        deadline = time.time() + 240
        while not (second / ".hydra").exists():
            assert proc.poll() is None, "the sweep ended before it could be cancelled"
            assert time.time() < deadline, "the sweep did not reach its second job"
            time.sleep(0.05)
        subprocess.run(["scancel", "--name", name], check=True)
        # The launcher learns of the cancelled job (from squeue: there is no accounting)
        # and stops with an error instead of waiting forever for its result.
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "has not produced any output" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # scancel sends SIGTERM, which submitit's job handler bypasses, and SIGKILL only after
    # SLURM's KillWait (5 s in .ci/slurm-up): a running job that needs less may still finish.
    # So the second job may or may not have finished; the third never started.
    assert (first / "metrics.json").exists()
    assert not third.exists()
    done_before = {
        d: (d / "metrics.json").stat().st_mtime_ns
        for d in (first, second)
        if (d / "metrics.json").exists()
    }

    res = subprocess.run(
        cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Only the missing jobs ran: the finished ones were skipped, their results untouched.
    for d, mtime in done_before.items():
        assert (d / "metrics.json").stat().st_mtime_ns == mtime
        assert "nothing to do" in (d / "run.log").read_text()
    for d in {second, third} - done_before.keys():
        assert (d / "metrics.json").exists()
        assert "nothing to do" not in (d / "run.log").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_jobs_holding_every_cpu_with_slurm_retrains_do_not_deadlock(
    tmp_path, reference, cluster
):
    """The nested-submission case: two sweep jobs hold every CPU of the node and each asks
    for retrains with executor=slurm. An array job submitted from inside them would stay
    pending (Resources) forever; they retrain within their own allocations instead."""
    cpus = max(1, _node_cpus() // 2)
    res = _cli(
        [
            "-m",
            *SLURM_LAUNCHER,
            f"hydra.launcher.cpus_per_task={cpus}",
            *SMOKE,
            "groups=5,10",
            *RETRAIN_SLURM,
        ],
        tmp_path,
        timeout=300,  # a deadlock fails here (and `cluster` cancels the stuck jobs)
    )
    assert _sweep_results(tmp_path) == reference
    sweep = tmp_path / "multirun" / "sweep"
    for k in (5, 10):
        log = (sweep / f"experiment=smoke,groups={k}" / "run.log").read_text()
        assert "retrain.executor=slurm inside SLURM job" in log
        assert "within this job's allocation" in log
    assert not (tmp_path / "cache" / "submitit").exists()  # no retrain array was submitted
    assert "Bypassing sacct error" not in res.stdout + res.stderr


def _fake_tools(bin_dir: Path, squeue_out: str, squeue_rc: int = 0) -> None:
    """sacct failing as it does without accounting, and an squeue with a canned answer."""
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        "#!/bin/sh\necho 'Slurm accounting storage is disabled' >&2\nexit 1\n"
    )
    (bin_dir / "squeue").write_text(
        f'#!/bin/sh\necho "$@" >> {bin_dir}/squeue.args\n'
        f"cat <<'OUT'\n{squeue_out}OUT\n"
        + ("echo 'slurm_load_jobs error: Invalid job id specified' >&2\n" if squeue_rc else "")
        + f"exit {squeue_rc}\n"
    )
    for f in ("sacct", "squeue"):
        (bin_dir / f).chmod(0o755)


def test_without_accounting_jobs_are_followed_with_squeue(tmp_path, monkeypatch, caplog):
    """No cluster needed: sacct fails (one note, no per-poll warning), squeue's states are
    read, and a job squeue no longer lists counts as finished instead of pending forever."""
    from submitit.slurm import slurm as ss

    from ggda import cluster

    _fake_tools(tmp_path / "bin", "7_0|RUNNING|vm\n7_1|CANCELLED|vm\n9_[0-1%1]|PENDING|\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(ss.SlurmJob, "watcher", ss.SlurmInfoWatcher(delay_s=600))
    assert cluster.follow_jobs_without_accounting()
    watcher = ss.SlurmJob.watcher
    assert isinstance(watcher, ss.SlurmInfoWatcher) and type(watcher) is not ss.SlurmInfoWatcher
    assert cluster.follow_jobs_without_accounting() and ss.SlurmJob.watcher is watcher
    for job in ("7_0", "7_1", "8", "9_0", "9_1"):
        watcher.register_job(job)
    with caplog.at_level("DEBUG"):
        watcher.update()
        watcher.update()
    states = {j: watcher.get_state(j, mode="cache") for j in ("7_0", "7_1", "8", "9_0", "9_1")}
    assert states == {
        "7_0": "RUNNING",
        "7_1": "CANCELLED",
        "8": cluster.GONE,  # finished and purged: done, so a missing result raises
        "9_0": "PENDING",
        "9_1": "PENDING",
    }
    assert watcher.is_done("7_1", mode="cache") and watcher.is_done("8", mode="cache")
    assert not watcher.is_done("7_0", mode="cache") and not watcher.is_done("9_1", mode="cache")
    notes = [r for r in caplog.records if "sacct does not answer" in r.getMessage()]
    assert len(notes) == 1 and "accounting storage is disabled" in notes[0].getMessage()
    assert not [r for r in caplog.records if "Bypassing sacct" in r.getMessage()]
    # The second poll asked squeue only about jobs not finished yet (7 and 9, not 8).
    asked = (tmp_path / "bin" / "squeue.args").read_text().splitlines()
    assert asked[0].endswith("-j 7,8,9") and asked[1].endswith("-j 7,9")


def test_squeue_knowing_none_of_the_jobs_means_they_are_gone(tmp_path, monkeypatch):
    from submitit.slurm import slurm as ss

    from ggda import cluster

    _fake_tools(tmp_path / "bin", "", squeue_rc=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(ss.SlurmJob, "watcher", ss.SlurmInfoWatcher(delay_s=600))
    cluster.follow_jobs_without_accounting()
    watcher = ss.SlurmJob.watcher
    watcher.register_job("5_0")
    watcher.update()
    assert watcher.get_state("5_0", mode="cache") == cluster.GONE
    assert watcher.is_done("5_0", mode="cache")
