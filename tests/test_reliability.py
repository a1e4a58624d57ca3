"""Faults, interruptions, determinism and concurrency, end to end through the CLI."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from factory import ROOT, run_cli
from ggda.config import _variant
from ggda.io import load_artifact
from ggda.report import COST

pytestmark = pytest.mark.slow

SMOKE = ["experiment=smoke", "logger=none"]
RUN = "runs/synthetic/tracin/kmeans_k8_s0"


def _run(args):
    """The run directory of CLI ``args`` under the output directory.

    Named as conf/hydra/default.yaml names it: ``RUN``, the tag, then every result-deciding
    override that is not already in the name (``,evaluation=none,model.epochs=40``).
    """
    tag = next((a.split("=", 1)[1] for a in args if a.startswith("tag=")), "")
    return RUN + tag + _variant(args)


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
    # Retrain results live twice: per (subset, seed) entry and as rows of the LDS stores,
    # which are read first. Damage every entry and one store row: exactly that row is
    # retrained (its entry is bad too); every other row comes from its store.
    retrains = sorted((tmp_path / "cache" / "retrain").rglob("*.pt"))
    scores = next((tmp_path / "cache" / "scores").glob("*.pt"))
    for p in (*retrains, scores):
        p.write_bytes(p.read_bytes()[:100])  # truncated, as by a kill mid-write elsewhere
    (store,) = (tmp_path / "cache" / "lds").glob("*/point-*")
    logits = np.load(store / "logits_val.npy", mmap_mode="r+")
    logits[0] += 1.0  # a flipped row: a valid file with wrong numbers
    logits.flush()
    del logits
    res = _ok(run_cli([*SMOKE, "tag=_again"], tmp_path))
    log = res.stdout + res.stderr
    assert f"row 0 of LDS store {store}: its logits fail their checksum" in log
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


# -- exact resume ---------------------------------------------------------------------------
# 40 short epochs with momentum and a cosine schedule: optimizer and scheduler state matter.
TRAIN = [
    *SMOKE,
    "evaluation=none",
    "model.epochs=40",
    "model.save_epochs=[10,20,30,40]",
    "model.scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,T_max:40}",
]


def _env(out, **extra):
    return os.environ | {
        "WANDB_MODE": "offline",
        "GGDA_OUTPUT_DIR": str(out),
        "WANDB_DIR": str(out),
        "WANDB_SILENT": "true",
        **extra,
    }


def _popen(args, out, **env):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=out,
        env=_env(out, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a job started from a shell
    )


def _store_dir(out):
    (d,) = (out / "cache" / "models").iterdir()
    return d


def _last_epoch(out):
    try:
        man = json.loads((_store_dir(out) / "manifest.json").read_text())
        return man["files"][man["last"]]["epoch"]
    except (ValueError, OSError, KeyError):
        return 0


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    _ok(run_cli(TRAIN, out))
    return out


def _assert_same_training(a, b, run_b=None):
    run_a = _run(TRAIN)
    run_b = run_b or run_a
    da, db = _store_dir(a), _store_dir(b)
    names = sorted(p.name for p in da.glob("epoch_*.ckpt"))
    assert names == ["epoch_010.ckpt", "epoch_020.ckpt", "epoch_030.ckpt", "epoch_040.ckpt"]
    assert sorted(p.name for p in db.glob("epoch_*.ckpt")) == names
    for name in names:
        ca, cb = (torch.load(d / name, weights_only=False) for d in (da, db))
        for k, v in ca["state_dict"].items():
            assert torch.equal(v, cb["state_dict"][k]), (name, k)
        sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k, v in sa[i].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[i][k])), (name, i, k)
        assert ca["lr_schedulers"] == cb["lr_schedulers"], name
        assert ca["epoch"] == cb["epoch"], name
    # the learning rate in force at each checkpoint (TracIn's weights) is in the manifest
    man_a, man_b = (json.loads((d / "manifest.json").read_text()) for d in (da, db))
    for name in names:
        assert man_a["files"][name]["lr"] == man_b["files"][name]["lr"], name
        assert man_a["files"][name]["epoch"] == man_b["files"][name]["epoch"], name
    sa, sb = torch.load(a / run_a / "scores.pt"), torch.load(b / run_b / "scores.pt")
    assert torch.equal(sa, sb)
    ma, mb = _metrics(a, run_a), _metrics(b, run_b)
    for key in ma:  # results, not how they were obtained (cache hits, timings, run cost)
        cost = key.startswith("time/") or key in COST
        if not cost and "cached" not in key and "retrains_" not in key:
            assert ma[key] == mb[key], key


def _kill(mode, out):
    """Interrupt a training of TRAIN in ``out``; return the interrupted process's log."""
    if mode.startswith("fault:"):
        res = run_cli(TRAIN, out, env={"GGDA_FAULT": mode.removeprefix("fault:")})
        assert res.returncode == 137, res.stderr[-2000:]
        return res.stderr
    proc = _popen(TRAIN, out)
    t0 = time.monotonic()
    while _last_epoch(out) < 5 and proc.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL if mode == "sigkill" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    expected = -signal.SIGKILL if mode == "sigkill" else 130
    assert proc.returncode == expected, err[-3000:]
    assert _last_epoch(out) < 40, "the kill came too late to test a resume"
    return err


@pytest.mark.parametrize(
    "mode", ["fault:train_epoch_13", "fault:train_epoch_17_batch_3", "sigkill", "sigint"]
)
def test_killed_training_resumes_bit_identically(tmp_path, clean_run, mode):
    err = _kill(mode, tmp_path)
    if mode == "sigint":
        lines = [ln for ln in err.splitlines() if ln.startswith("ggda:")]
        assert len(lines) == 1 and "interrupted (SIGINT)" in lines[0], err[-2000:]
        assert "run the same command again to resume" in lines[0]
        assert "Traceback" not in err
    assert not (tmp_path / _run(TRAIN) / "metrics.json").exists()
    res = _ok(run_cli(TRAIN, tmp_path))
    assert "Resuming the interrupted training" in res.stderr + res.stdout
    _assert_same_training(clean_run, tmp_path)


# -- concurrency ----------------------------------------------------------------------------
def test_concurrent_starts_of_one_config_keep_every_epoch(tmp_path, clean_run):
    first = _popen([*TRAIN, "tag=_0"], tmp_path)
    t0 = time.monotonic()
    while _last_epoch(tmp_path) < 1 and first.poll() is None and time.monotonic() - t0 < 240:
        time.sleep(0.01)
    assert first.poll() is None, "training finished before the others started"
    procs = [first]
    for i in range(1, 8):  # eight starts in all, as a sweep's jobs sharing one cache would
        procs.append(_popen([*TRAIN, f"tag=_{i}"], tmp_path))
        time.sleep(0.3)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-2000:] + e[-2000:]
        assert "unusable" not in e and "Ignoring bad" not in e, e[-2000:]
    man = json.loads((_store_dir(tmp_path) / "manifest.json").read_text())
    assert man["complete"]
    assert sorted(n for n in man["files"] if n.startswith("epoch_")) == [
        f"epoch_{e:03d}.ckpt" for e in (10, 20, 30, 40)
    ]
    for i in range(8):  # every start's checkpoints, scores and metrics are the serial run's
        _assert_same_training(clean_run, tmp_path, _run([*TRAIN, f"tag=_{i}"]))


def test_two_configs_into_one_run_directory_at_once(tmp_path):
    # Different overrides name different run directories; one directory for two configs
    # happens when a run's directory is set by hand (or by an edited experiment preset).
    same_dir = f"hydra.run.dir={tmp_path / RUN}"
    configs = [
        [*SMOKE, "evaluation=none", same_dir],
        [*SMOKE, "evaluation=none", "model.epochs=6", same_dir],
    ]
    procs = [_popen(args, tmp_path) for args in configs]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(e for p, (_, e) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert "ggda: error:" in loser and "model.epochs" in loser, loser[-2000:]
    assert (
        "is in use by another ggda run" in loser
        or "already holds finished results of a different config" in loser
    )
    winner = configs[[p.returncode for p in procs].index(0)]
    cfg = json.loads((tmp_path / RUN / "config.json").read_text())
    assert cfg["resolved"]["model"]["epochs"] == (6 if "model.epochs=6" in winner else 4)
    # no mixed files: the run directory's scores are those its config.json's keys name
    cached = load_artifact(tmp_path / "cache" / "scores" / f"{cfg['keys']['scores']}.pt")
    assert torch.equal(torch.load(tmp_path / RUN / "scores.pt"), cached["scores"].cpu())


# -- changed data ---------------------------------------------------------------------------
def _write_idx(path, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(head + arr.tobytes())


def _tiny_mnist(d, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", 160), ("t10k", 60)):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 40, (n, 28, 28)) + (y[:, None, None] * 20)
        _write_idx(d / f"{split}-images-idx3-ubyte", x)
        _write_idx(d / f"{split}-labels-idx1-ubyte", y)


def test_a_changed_data_file_retrains_an_unchanged_one_reuses(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _tiny_mnist(data)
    args = [
        *SMOKE,
        "dataset=mnist",
        f"paths.data_dir={data}",
        "dataset.num_val=20",
        "dataset.num_test=40",
        "dataset.num_queries=8",
        "groups=4",
        "evaluation=none",
    ]
    run = "runs/mnist/tracin/kmeans_k4_s0"
    _ok(run_cli(args, tmp_path))
    _ok(run_cli([*args, "tag=_same"], tmp_path))
    same = _metrics(tmp_path, run + "_same" + _variant(args))
    assert same["model/cached"] == 1 and same["attribution/cached"] == 1
    f = data / "train-images-idx3-ubyte"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x7F  # one pixel of the last training image
    f.write_bytes(bytes(raw))
    log = _ok(run_cli([*args, "tag=_changed"], tmp_path))
    changed = _metrics(tmp_path, run + "_changed" + _variant(args))
    assert changed["model/cached"] == 0 and changed["attribution/cached"] == 0, log.stderr
    assert changed["grouping/cached"] == 0
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


# -- precision, devices ---------------------------------------------------------------------
def test_precision_64_runs_end_to_end_with_retrains(tmp_path):
    _ok(run_cli([*SMOKE, "trainer.precision=64-true", "evaluation.lds.num_subsets=4"], tmp_path))
    run = _run(["trainer.precision=64-true", "evaluation.lds.num_subsets=4"])
    assert torch.load(tmp_path / run / "scores.pt").dtype == torch.float64
    m = _metrics(tmp_path, run)
    assert np.isfinite(m["lds/point/mean"])


def test_precision_64_after_a_32_bit_run_is_not_nothing_to_do(tmp_path):
    _ok(run_cli([*SMOKE, "evaluation=none"], tmp_path))
    res = run_cli([*SMOKE, "evaluation=none", "trainer.precision=64-true"], tmp_path)
    log = res.stdout + res.stderr
    assert "nothing to do" not in log
    assert res.returncode == 0 or "trainer.precision" in res.stderr


def test_several_devices_are_refused_at_once(tmp_path):
    t0 = time.monotonic()
    res = run_cli([*SMOKE, "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path, timeout=60)
    assert time.monotonic() - t0 < 60
    assert res.returncode == 2
    assert "ggda: error:" in res.stderr and "`trainer.devices` = 2" in res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


# -- shared caches --------------------------------------------------------------------------
def test_every_artifact_is_created_like_an_ordinary_file(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *SMOKE, "evaluation.lds.num_subsets=4"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o022),
    )
    _ok(res)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    for p in files:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o666 if p.name.endswith(".lock") else 0o644
        assert mode == want, f"{p.relative_to(tmp_path)}: {mode:04o}"


# -- interrupts, dead parents ---------------------------------------------------------------
POOL = [
    *SMOKE,
    "retrain.backend=process",
    "retrain.workers=2",
    "retrain.min_parallel=1",
    "evaluation.lds.num_subsets=40",
]


def _children(pid):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid):
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_pool_run(out):
    """Start POOL; return (process, its stderr lines so far, worker pids) once retraining."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *POOL],
        cwd=out,
        env=_env(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the log (stdout) and the error line (stderr) in order
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    t0 = time.monotonic()
    while not any("retrains to run" in ln for ln in lines) and time.monotonic() - t0 < 300:
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.05)
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() - t0 < 300:
        workers = [c for c in _children(proc.pid) if _alive(c)]
        time.sleep(0.2)
    time.sleep(2)  # the workers are importing / training
    return proc, lines, workers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_during_retrains_stops_within_seconds(tmp_path):
    proc, lines, workers = _start_pool_run(tmp_path)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert elapsed < 15, elapsed
    # (progress bars end in "\r", so the line may follow one on the same text line)
    assert err.count("ggda: ") == 1 and "ggda: interrupted (SIGINT)" in err, err[-3000:]
    assert "Traceback" not in err
    assert not [w for w in workers if _alive(w)], "pool workers outlived the run"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_pool_workers_exit_when_their_parent_is_killed(tmp_path):
    proc, _, workers = _start_pool_run(tmp_path)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers are orphaned
    proc.wait(timeout=30)
    t0 = time.monotonic()
    # A worker still importing torch when its parent dies sets its death signal only once
    # the import is done, which takes well over 10 s on a loaded 2-core machine; an orphan
    # that "kept running" would run its retrains for minutes, so 60 s still tells them apart.
    while [w for w in workers if _alive(w)] and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "orphaned pool workers kept running"


# -- one-line errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["seed=-1"], "`seed` = -1"),
        (["seed=abc"], "`seed` = 'abc'"),
        (["retrain.workers=abc"], "`retrain.workers` = 'abc'"),
        (["retrain.workers=-5"], "`retrain.workers` = -5"),
        (["groups=1"], "LDS needs at least 3 groups"),
        (["paths.output_dir=FILE/out"], "set `paths.output_dir=DIR`"),
        (["paths.cache_dir=FILE/cache"], "set `paths.cache_dir=DIR`"),
        pytest.param(
            ["trainer.accelerator=gpu"],
            "`trainer.accelerator` = 'gpu'",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, args, expected):
    (tmp_path / "FILE").write_text("not a directory")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    res = run_cli([*SMOKE, *args], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    said = [ln for ln in res.stderr.splitlines() if ln.startswith("ggda: error:")]
    assert len(said) == 1 and expected in said[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_too_many_workers_are_capped_with_a_warning(tmp_path):
    res = _ok(run_cli([*SMOKE, "evaluation=none", "retrain.workers=1000"], tmp_path))
    assert "retrain.workers=1000 is more than the" in res.stdout + res.stderr


def test_damaged_run_and_store_files_are_named(tmp_path):
    args = [*SMOKE, "evaluation=none"]
    _ok(run_cli(args, tmp_path))
    for name in ("metrics.json", "config.json"):
        path = tmp_path / _run(args) / name
        good = path.read_text()
        path.write_text("{garbage")
        res = run_cli(args, tmp_path)
        assert res.returncode == 2
        assert f"{path} is damaged (not valid JSON" in res.stderr, res.stderr[-2000:]
        path.write_text(good)
    man = _store_dir(tmp_path) / "manifest.json"
    man.write_text("{garbage")
    res = _ok(run_cli([*args, "tag=_again"], tmp_path))
    assert "unusable (is not valid JSON" in res.stdout + res.stderr, res.stdout[-2000:]
    assert _metrics(tmp_path, _run([*args, "tag=_again"]))["model/cached"] == 0
