"""End to end through the Hydra CLI, as a user runs it."""

import json

import pytest
import torch

from factory import run_cli

SMOKE = ["experiment=smoke", "logger=none"]
RUN = "runs/synthetic/tracin/kmeans_k8_s0"


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    return out, _ok(run_cli(SMOKE, out))


def test_run_directory_contract(smoke_run):
    out, res = smoke_run
    d = out / RUN
    metrics = json.loads((d / "metrics.json").read_text())
    for key in (
        "lds/point/mean",
        "lds/group/mean",
        "time/attribution",
        "time/grouping",
        "grouping/size_min",
        "time/total",
        "seed",
    ):
        assert key in metrics, key
    assert -1 <= metrics["lds/point/mean"] <= 1
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["resolved"]["groups"] == 8 and cfg["resolved"]["seed"] == 0
    scores = torch.load(d / "scores.pt")
    ids = torch.load(d / "grouping.pt")
    q = torch.load(d / "queries.pt")
    assert scores.shape == (8, 8) and torch.isfinite(scores).all()
    assert ids.shape == (64,) and set(ids.tolist()) == set(range(8))  # partition, none empty
    assert len(q["indices"]) == 8
    timings = json.loads((d / "timings.json").read_text())
    assert all(k.startswith("time/") for k in timings)
    assert (d / "figures" / "groups.png").exists()
    assert (d / "tables" / "lds_per_query.csv").exists()
    # printed summary: fidelity, groups, cost, and how to get the per-sample reference
    for key in ("lds/point/mean", "time/attribution", "time/attribution+grouping", "grouping/k"):
        assert key in res.stdout, key
    assert "grouping=singleton" in res.stdout  # no per-sample result cached yet
    assert metrics["attribution/epochs"] == pytest.approx(
        metrics["time/attribution"] / metrics["time/epoch"]
    )
    assert metrics["grouping/largest_share"] == pytest.approx(metrics["grouping/size_max"] / 64)
    assert metrics["attribution/scores_file"] == "scores.pt"


def test_rerun_is_a_no_op_and_different_config_is_refused(smoke_run):
    out, _ = smoke_run
    metrics = out / RUN / "metrics.json"
    before = metrics.read_bytes(), metrics.stat().st_mtime_ns
    res = _ok(run_cli(SMOKE, out))
    assert "nothing to do" in res.stdout + res.stderr
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before
    # another config forced into the same directory is refused, naming the key
    bad = run_cli([*SMOKE, "model.epochs=3", f"hydra.run.dir={out / RUN}"], out)
    assert bad.returncode == 2
    assert "already holds finished results" in bad.stderr and "model.epochs" in bad.stderr
    assert "overwrite=true" in bad.stderr and "Traceback" not in bad.stderr
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before
    # a result-deciding override names its own directory; the cached base model of the
    # first run is not reused (other epochs)
    _ok(run_cli([*SMOKE, "model.epochs=3"], out))
    m = json.loads((out / (RUN + ",model.epochs=3") / "metrics.json").read_text())
    assert m["model/cached"] == 0


def test_presentation_keys_share_a_directory_and_precision_trains_anew(smoke_run):
    out, _ = smoke_run
    metrics = out / RUN / "metrics.json"
    before = metrics.read_bytes()
    # progress bars, logger, workers: the same results, found in the same directory
    for extra in (
        ["trainer.enable_progress_bar=true"],
        ["trainer.enable_progress_bar=false", "retrain.workers=1", "logger=csv"],
    ):
        res = _ok(run_cli([*SMOKE, *extra], out))
        assert "nothing to do" in res.stdout + res.stderr, extra
    assert metrics.read_bytes() == before
    # precision decides results: a new directory, and the model trains anew
    _ok(run_cli([*SMOKE, "trainer.precision=bf16-mixed", "evaluation=none"], out))
    d = out / (RUN + ",evaluation=none,trainer.precision=bf16-mixed")
    m = json.loads((d / "metrics.json").read_text())
    assert m["model/cached"] == 0
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["results_config"]["trainer"]["precision"] == "bf16-mixed"
    assert "enable_progress_bar" not in cfg["results_config"]["trainer"]
    assert (
        "logger" not in cfg["results_config"] and "workers" not in cfg["results_config"]["retrain"]
    )


def test_sweep_directories_leave_presentation_overrides_out(tmp_path):
    args = ["-m", *SMOKE, "evaluation=none", "groups=4", "sweep_name=p"]
    _ok(run_cli([*args, "trainer.enable_progress_bar=false", "retrain.workers=1"], tmp_path))
    again = _ok(run_cli(args, tmp_path))
    assert "nothing to do" in again.stdout + again.stderr
    names = [p.parent.name for p in (tmp_path / "multirun" / "p").glob("*/metrics.json")]
    assert names == ["evaluation=none,experiment=smoke,groups=4"]


def test_second_run_reuses_base_model_grouping_and_retrains(smoke_run):
    out, _ = smoke_run
    # another method config (its own run dir: the tag, then the result-deciding override):
    # same model, grouping, point retrains
    _ok(run_cli([*SMOKE, "method.checkpoints=last", "tag=_last"], out))
    m = json.loads((out / (RUN + "_last,method.checkpoints=last") / "metrics.json").read_text())
    assert m["model/cached"] == 1.0
    assert m["grouping/cached"] == 1
    assert m["lds/retrains_run"] == 0 and m["lds/retrains_cached"] == 16


@pytest.mark.parametrize(
    "args, needle",
    [
        (["groups=0"], "`groups` = 0"),
        (["groups=100000"], "n=64"),
        (["groups=-3"], "`groups`"),
        (["method=nosuch"], "Could not find 'method/nosuch'"),
        (["grouping=nosuch"], "Available options in 'grouping'"),
        (["grups=10"], "Key 'grups' is not in struct"),
        (["method.proj_dim=0"], "`method.proj_dim`"),
        (["evaluation.lds.alpha=2"], "`evaluation.lds.alpha`"),
    ],
)
def test_bad_input_gets_a_clear_error(tmp_path, args, needle):
    res = run_cli([*SMOKE, *args], tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_multirun_shares_the_base_model_and_point_retrains(tmp_path):
    res = _ok(run_cli(["-m", *SMOKE, "groups=4,8", "sweep_name=t"], tmp_path))
    runs = sorted((tmp_path / "multirun" / "t").glob("*/metrics.json"))
    assert [p.parent.name for p in runs] == [
        "experiment=smoke,groups=4",
        "experiment=smoke,groups=8",
    ], res.stdout
    m4, m8 = (json.loads(p.read_text()) for p in runs)
    assert m4["model/cached"] == 0 and m8["model/cached"] == 1
    # 8 point-level subsets are shared; only group-level retrains differ
    assert m8["lds/retrains_cached"] == 8
    assert "Epoch 0" not in res.stdout + res.stderr  # no Lightning epoch bars in a multirun
    # rerunning the sweep finishes nothing new
    again = _ok(run_cli(["-m", *SMOKE, "groups=4,8", "sweep_name=t"], tmp_path))
    assert (again.stdout + again.stderr).count("nothing to do") == 2


def test_wandb_offline_and_csv_loggers(tmp_path):
    _ok(run_cli(["experiment=smoke", "logger=wandb", "evaluation=none"], tmp_path))
    d = tmp_path / "runs/synthetic/tracin/kmeans_k8_s0,evaluation=none"
    assert list((d / "wandb").glob("offline-run-*")), "no offline W&B run"
    _ok(run_cli(["experiment=smoke", "logger=csv", "evaluation=none", "tag=_csv"], tmp_path))
    assert list(
        (tmp_path / "runs/synthetic/tracin/kmeans_k8_s0_csv,evaluation=none").rglob("metrics.csv")
    )


def test_group_scores_are_sums_of_singleton_scores_end_to_end(tmp_path):
    """The core invariant through the CLI: same cached model, TracIn exact, k = n vs k = 16."""
    res = _ok(run_cli([*SMOKE, "grouping=singleton", "evaluation=none"], tmp_path))
    assert "per-sample run" in res.stdout
    s = torch.load(tmp_path / "runs/synthetic/tracin/singleton_kn_s0,evaluation=none/scores.pt")
    s = s.double()
    assert s.shape == (64, 8)
    # a grouped run of the same model and method now finds the cached per-sample result
    res = _ok(run_cli([*SMOKE, "evaluation=none"], tmp_path))
    assert "speed-up vs per-sample" in res.stdout and "x (cached per-sample" in res.stdout
    _ok(run_cli([*SMOKE, "grouping=random", "groups=0.25", "evaluation=none"], tmp_path))
    d = tmp_path / "runs/synthetic/tracin/random_k0.25_s0,evaluation=none"
    ids = torch.load(d / "grouping.pt")
    assert sorted(set(ids.tolist())) == list(range(16))  # k = 0.25 * 64, none empty
    groups = torch.load(d / "scores.pt").double()
    summed = torch.zeros(16, 8, dtype=torch.float64).index_add_(0, ids, s)  # M^T A
    assert torch.allclose(groups, summed, rtol=1e-4, atol=1e-6 * s.abs().max())
    assert not torch.allclose(groups, summed.roll(1, 0), rtol=1e-2)  # the check can fail
