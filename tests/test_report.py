"""The sweep report: collecting run directories, speedups, tables and figures."""

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from factory import run_cli
from ggda import report as rp

N = 16
METHODS = {"tracin": 1.0, "influence": 3.0}  # per-sample (k = n) attribution seconds


def _time(method: str, k: int, seed: int) -> float:
    """Synthetic attribution time: linear in k, plus a seed wobble."""
    return METHODS[method] * (0.1 + 0.9 * k / N) * (1 + 0.1 * seed)


def _lds(method: str, k: int, seed: int) -> float:
    return 0.2 + 0.5 * np.log2(k) / np.log2(N) + (0.05 if method == "tracin" else 0) + 0.01 * seed


def _write_run(
    root: Path,
    method: str,
    grouping: str,
    k: int,
    seed: int,
    extra_method: dict | None = None,
    name: str | None = None,
) -> Path:
    d = root / (name or f"method={method},grouping={grouping},groups={k},seed={seed}")
    d.mkdir(parents=True)
    grouping_cfg = {"name": grouping, "groups": k, "seed": seed}
    if grouping == "kmeans":
        grouping_cfg |= {"features": "inputs", "iters": 50}
    method_cfg = {"name": method, "proj_seed": seed} | (extra_method or {})
    resolved = {
        "dataset": {"name": "synthetic", "num_train": N},
        "model": {"name": "logreg", "epochs": 4},
        "method": method_cfg,
        "grouping": grouping_cfg,
        "groups": k,
        "seed": seed,
        "sweep_name": "unit",
        "tag": "",
        "logger": {},
    }
    results = {k_: v for k_, v in resolved.items() if k_ != "logger"}
    metrics = {
        "attribution/k": k,
        "data/n_train": N,
        "lds/point/mean": _lds(method, k, seed),
        "lds/group/mean": _lds(method, k, seed) - 0.1,
        "time/attribution": _time(method, k, seed),
        "time/grouping": 0.0 if grouping == "singleton" else 0.01 * k,
        "time/total": 5.0,
        "seed": seed,
    }
    (d / "config.json").write_text(
        json.dumps({"results_config": results, "resolved": resolved, "keys": {}})
    )
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _sweep(root: Path, singleton: bool = True, seeds=(0, 1)) -> None:
    for method in METHODS:
        for seed in seeds:
            for k in (2, 4, 8):
                _write_run(root, method, "kmeans", k, seed)
            if singleton:
                _write_run(root, method, "singleton", N, seed)


def test_table_speedups_and_seed_averages(tmp_path):
    _sweep(tmp_path)
    res = rp.report(tmp_path, tmp_path / "rep")
    df = res["runs"]
    assert len(df) == 16 and set(df["method"]) == set(METHODS)
    assert set(df["variant"]) == {""}  # grouping options and seeds are not variants
    # speedup = seed-averaged k = n time of the same method / this run's time
    row = df[(df.method == "influence") & (df.k == 4) & (df.seed == 1)].iloc[0]
    base = np.mean([_time("influence", N, s) for s in (0, 1)])
    assert row["speedup/attribution"] == pytest.approx(base / _time("influence", 4, 1))
    base_g = base + 0.0
    assert row["speedup/with_grouping"] == pytest.approx(base_g / (_time("influence", 4, 1) + 0.04))
    assert df["has_baseline"].all()
    s = res["summary"]
    one = s[(s.method == "tracin") & (s.k == 8)].iloc[0]
    assert one["runs"] == 2
    vals = [_lds("tracin", 8, seed) for seed in (0, 1)]
    assert one["lds/point/mean"] == pytest.approx(np.mean(vals))
    assert one["lds/point/mean std"] == pytest.approx(np.std(vals))
    # the CSVs on disk hold the same table
    on_disk = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert len(on_disk) == 16
    np.testing.assert_allclose(on_disk["speedup/attribution"], df["speedup/attribution"])
    assert len(pd.read_csv(tmp_path / "rep" / "summary.csv")) == len(s) == 8
    for name in ("lds_vs_k", "time_vs_k", "speedup_vs_k", "frontier"):
        img = mpimg.imread(tmp_path / "rep" / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "16 finished runs" in md and "![frontier](frontier.png)" in md


def test_figures_are_labelled_log_k_with_one_line_per_configuration(tmp_path):
    _sweep(tmp_path)
    df, _ = rp.collect(tmp_path)
    fig = rp.plot_lds(df)
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and "k" in ax.get_xlabel()
        assert "LDS" in ax.get_ylabel() and ax.get_title()
        labels = ax.get_legend_handles_labels()[1]
        assert sorted(labels) == sorted(
            ["tracin / kmeans", "tracin / singleton", "influence / kmeans", "influence / singleton"]
        )
    assert fig.legends  # one shared legend
    fig = rp.plot_speedup(df)
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    fig = rp.plot_frontier(df)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "time" in ax.get_xlabel()
    assert "Pareto front" in ax.get_legend_handles_labels()[1]


def test_without_a_k_equals_n_run_the_report_says_so(tmp_path):
    _sweep(tmp_path, singleton=False)
    res = rp.report(tmp_path)
    df = res["runs"]
    assert not df["has_baseline"].any() and df["speedup/attribution"].isna().all()
    assert "no k = n" in (tmp_path / "report" / "report.md").read_text()
    fig = rp.plot_speedup(df)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("no k = n" in t for t in texts)


def test_variants_duplicates_and_unfinished_runs(tmp_path):
    _sweep(tmp_path, seeds=(0,))
    # A method option varied within the sweep makes a separate configuration (line).
    for k in (2, 4, 8, N):
        _write_run(
            tmp_path,
            "tracin",
            "singleton" if k == N else "kmeans",
            k,
            0,
            {"proj_dim": 32},
            name=f"proj/k{k}",
        )
    # The same run copied elsewhere (e.g. runs/ and multirun/) is counted once.
    shutil.copytree(tmp_path / "method=tracin,grouping=kmeans,groups=2,seed=0", tmp_path / "copy")
    # A killed job: Hydra made its directory, no metrics.json.
    (tmp_path / "killed" / ".hydra").mkdir(parents=True)
    # submitit's folder is never read as runs.
    (tmp_path / ".submitit" / "1").mkdir(parents=True)
    (tmp_path / ".submitit" / "1" / "metrics.json").write_text("{}")
    # `-m groups=4,8 grouping=singleton`: k = n both times, one run (not two seeds).
    for groups in (4, 8):
        d = _write_run(tmp_path, "influence", "singleton", N, 0, name=f"single/groups={groups}")
        cfg = json.loads((d / "config.json").read_text())
        cfg["results_config"]["groups"] = cfg["resolved"]["groups"] = groups
        (d / "config.json").write_text(json.dumps(cfg))
    df, unfinished = rp.collect(tmp_path)
    assert len(df) == 8 + 4
    assert len(df[(df.method == "influence") & (df.k == N)]) == 1
    assert unfinished == [tmp_path / "killed"]
    assert set(df.loc[df.method == "tracin", "variant"]) == {"", "method.proj_dim=32"}
    assert set(df.loc[df.method == "influence", "variant"]) == {""}
    # Speedups are taken against the k = n run of the same variant.
    proj = df[(df.variant == "method.proj_dim=32") & (df.k == 2)].iloc[0]
    assert proj["speedup/attribution"] == pytest.approx(
        _time("tracin", N, 0) / _time("tracin", 2, 0)
    )
    labels = rp.plot_lds(df).axes[0].get_legend_handles_labels()[1]
    assert "tracin / kmeans [method.proj_dim=32]" in labels


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t, f = rng.random(15), rng.random(15)
        front = set(rp.pareto_front(t, f).tolist())
        brute = {
            i
            for i in range(15)
            if not any(
                (t[j] <= t[i] and f[j] >= f[i]) and (t[j], f[j]) != (t[i], f[i]) for j in range(15)
            )
        }
        assert front == brute


def test_cli_errors_and_output(tmp_path, capsys):
    assert rp.main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err
    _sweep(tmp_path)
    assert rp.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "16 runs" in out and str(tmp_path / "o" / "frontier.png") in out


@pytest.mark.slow
def test_wandb_summary_run_is_logged_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _sweep(tmp_path, seeds=(0,))
    res = rp.report(tmp_path, tmp_path / "rep", wandb=True)
    runs = list((tmp_path / "rep" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and str(runs[0]) in res["wandb_dir"]
    assert list(runs[0].glob("*.wandb"))  # the run's log, to `wandb sync` later


@pytest.mark.slow
def test_report_over_a_real_tiny_sweep(tmp_path):
    res = run_cli(["-m", "experiment=smoke", "logger=none", "groups=4,8"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["-m", "experiment=smoke", "logger=none", "grouping=singleton"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "multirun" / "sweep"
    out = rp.report(sweep)
    df = out["runs"]
    assert sorted(df["k"]) == [4, 8, 64] and set(df["grouping"]) == {"kmeans", "singleton"}
    for _, row in df.iterrows():
        m = json.loads((sweep / row["run"] / "metrics.json").read_text())
        assert row["lds/point/mean"] == pytest.approx(m["lds/point/mean"])
        assert row["time/attribution+grouping"] == pytest.approx(
            m["time/attribution"] + m["time/grouping"]
        )
    assert df["has_baseline"].all()
    single = df[df.grouping == "singleton"].iloc[0]
    assert single["speedup/attribution"] == pytest.approx(1.0)
    # a figure is drawn only when the sweep measured what it shows: the smoke sweep has LDS
    # and timings, but no noisy-label or pruning evaluation
    drawn = {"lds_vs_k", "time_vs_k", "speedup_vs_k", "frontier"}
    assert drawn < set(rp.FIGURES)
    assert {p.stem for p in (sweep / "report").glob("*.png")} == drawn
