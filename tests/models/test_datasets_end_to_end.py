"""Every data set with its model: train, group, attribute (TracIn and TRAK) and evaluate
LDS, on tiny sizes, in process (Hydra compose + ``pipeline.run``). File-based sets read
tiny files in the real formats written to ``tmp_path``."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from factory import ROOT, run_cli
from ggda import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from data_formats import (
    heloc_rows,
    qnli_rows,
    write_cifar,
    write_heloc,
    write_mnist,
    write_qnli,
)

TINY = [
    "logger=none",
    "retrain.backend=sequential",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "groups=5",
    "model.epochs=2",
    "model.save_epochs=[1,2]",
    "model.batch_size=16",
    "evaluation.lds.num_subsets=5",
    "dataset.num_train=40",
    "dataset.num_val=10",
    "dataset.num_test=12",
    "dataset.num_queries=4",
]

# experiment -> extra overrides; the files each needs are written by _write_files.
CASES = {
    "credit_logreg": [],
    "credit_mlp": [],
    "heloc_logreg": [],
    "heloc_mlp": [],
    "text_bbc": ["dataset.max_vocab=300", "dataset.max_len=32"],
    "text_qnli": ["dataset.max_vocab=100", "dataset.min_freq=1", "dataset.max_len=24"],
    "mnist_cnn": [],
    "mnist60k_cnn": [],
    "cifar10_resnet9": ["model.net.width=4"],
}


def _write_files(data_dir: Path) -> None:
    write_heloc(data_dir / "heloc_dataset_v1.csv", heloc_rows(80))
    write_qnli(data_dir / "QNLI" / "train.tsv", qnli_rows(60, seed=0))
    write_qnli(data_dir / "QNLI" / "dev.tsv", qnli_rows(20, seed=1, offset=500))
    write_mnist(data_dir, n_train=60, n_test=20, gz=True)
    write_cifar(data_dir, per_batch=12, n_test=20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    _write_files(d)
    return d


def _run(overrides: list[str], out: Path) -> tuple[dict, Path]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[*overrides, f"paths.output_dir={out}"])
    metrics = pipeline.run(cfg)
    return metrics, out / "runs" / "api"


@pytest.mark.parametrize("method", ["tracin", "trak"])
@pytest.mark.parametrize("experiment", list(CASES))
def test_dataset_model_pipeline(experiment, method, data_dir, tmp_path):
    extra = ["method.proj_dim=32"] if method == "trak" else []
    overrides = [f"experiment={experiment}", f"method={method}", *TINY, *CASES[experiment]]
    metrics, run_dir = _run([*overrides, *extra, f"paths.data_dir={data_dir}"], tmp_path)
    assert metrics["data/n_train"] == 40 and metrics["data/num_queries"] == 4
    per_query = pd.read_csv(run_dir / "tables" / "lds_per_query.csv")
    for level in ("point", "group"):
        # the summary is the mean of the per-query correlations the run wrote, NaNs counted
        col = per_query[f"lds_{level}"].to_numpy(dtype=float)
        assert len(col) == 4 and np.all(np.abs(col[np.isfinite(col)]) <= 1)
        assert metrics[f"lds/{level}/nan_count"] == int(np.isnan(col).sum()) < 4
        assert metrics[f"lds/{level}/mean"] == pytest.approx(np.nanmean(col), abs=1e-12)
    scores = torch.load(run_dir / "scores.pt")
    ids = torch.load(run_dir / "grouping.pt")
    assert scores.shape == (5, 4) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    assert ids.shape == (40,) and sorted(set(ids.tolist())) == list(range(5))


@pytest.mark.slow
def test_cifar10_resnet9_cli_end_to_end(data_dir, tmp_path):
    """As a user runs it on a CPU: `python run.py experiment=cifar10_resnet9` on a subset."""
    args = ["experiment=cifar10_resnet9", *TINY, "model.net.width=4"]
    res = run_cli([*args, f"paths.data_dir={data_dir}"], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # result-deciding overrides (the subset) extend the directory name
    (run,) = [
        p.parent for p in tmp_path.glob("runs/cifar10/tracin/grad_kmeans_k5_s0,*/metrics.json")
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert "lds/point/mean" in metrics and "lds/point/mean" in res.stdout


@pytest.mark.slow
def test_missing_data_file_is_a_clear_cli_error(tmp_path):
    res = run_cli(
        ["experiment=heloc_logreg", "logger=none", f"paths.data_dir={tmp_path}"], tmp_path
    )
    assert res.returncode == 2
    assert "heloc_dataset_v1.csv" in res.stderr and f"paths.data_dir={tmp_path}" in res.stderr
    assert "Traceback" not in res.stderr
