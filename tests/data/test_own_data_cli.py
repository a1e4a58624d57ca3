"""End to end through ``python run.py`` (train, group, attribute, LDS) on users' own files
written to tmp_path: a CSV, a Parquet file, an .npz, a .pt, an image folder, and a user's
network module; plus the synthetic image experiments."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from factory import run_cli

TINY = [
    "logger=none",
    "retrain.backend=sequential",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "groups=4",
    "model.epochs=2",
    "model.save_epochs=[1,2]",
    "model.batch_size=16",
    "evaluation.lds.num_subsets=4",
    "dataset.num_queries=4",
]


def _table(n=80, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 3)), columns=["age", "income", "debt"])
    df["plan"] = rng.choice(["basic", "pro"], n)
    df["churn"] = np.where(df.age - df.debt > 0, "yes", "no")
    return df


def _check(res, tmp_path):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "lds/point/mean" in res.stdout and "lds/group/mean" in res.stdout
    (metrics_path,) = list((tmp_path / "runs").rglob("metrics.json"))
    run = metrics_path.parent
    metrics = json.loads(metrics_path.read_text())
    assert metrics["data/num_queries"] == 4
    for level in ("point", "group"):
        v = metrics[f"lds/{level}/mean"]
        assert v != v or -1 <= v <= 1
    scores = torch.load(run / "scores.pt")
    assert scores.shape == (4, 4) and torch.isfinite(scores).all() and scores.abs().sum() > 0
    return run, metrics, json.loads((run / "data.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_file_end_to_end(tmp_path, suffix):
    p = tmp_path / f"customers{suffix}"
    df = _table()
    df.to_parquet(p) if suffix == ".parquet" else df.to_csv(p, index=False)
    args = ["dataset=csv", f"dataset.file={p}", "dataset.target=churn", "model=mlp"]
    res = run_cli([*args, "dataset.categorical=[plan]", *TINY], tmp_path)
    run, metrics, data = _check(res, tmp_path)
    assert run.parts[-3] == "customers"  # run directory named after the file
    assert data["classes"] == ["no", "yes"] and data["num_classes"] == 2
    assert data["features"] == ["age", "income", "debt", "plan=basic", "plan=pro"]
    assert metrics["data/n_train"] == 80 - 8 - 16


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "pt"])
def test_arrays_end_to_end(tmp_path, fmt):
    rng = np.random.default_rng(0)
    y = np.arange(70) % 3
    x = (rng.normal(size=(70, 1, 8, 8)) + y[:, None, None, None]).astype(np.float32)
    p = tmp_path / f"arr.{fmt}"
    if fmt == "npz":
        np.savez(p, x=x[:50], y=y[:50], x_test=x[50:], y_test=y[50:])
        extra = ["dataset.kind=images", "model=cnn", "model.net.channels=[4]", "model.net.hidden=8"]
    else:
        torch.save({"x": torch.from_numpy(x[:50]), "y": torch.from_numpy(y[:50])}, p)
        extra = ["model=logreg", "dataset.num_test=10"]
    res = run_cli(
        ["dataset=arrays", f"dataset.file={p}", "dataset.num_val=5", *extra, *TINY], tmp_path
    )
    _, metrics, data = _check(res, tmp_path)
    assert data["num_classes"] == 3 and data["input_shape"] == [1, 8, 8]
    assert data["n_test"] == (20 if fmt == "npz" else 10)


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for split, n in (("train", 20), ("test", 6)):
        for c, level in (("cat", 50), ("dog", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.clip(level + rng.integers(-40, 40, (12, 10, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.jpg")
    args = ["dataset=image_folder", f"dataset.root={root}", "dataset.size=8", "dataset.num_val=4"]
    res = run_cli(
        [*args, "model=cnn", "model.net.channels=[4]", "model.net.hidden=8", *TINY], tmp_path
    )
    _, metrics, data = _check(res, tmp_path)
    assert data["classes"] == ["cat", "dog"] and data["input_shape"] == [3, 8, 8]
    assert data["n_test"] == 12 and metrics["data/n_train"] == 36
    assert list((tmp_path / "cache" / "image_folder").glob("*.pt"))


USER_MODULE = """
import math
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, input_shape, num_classes, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def wrong_width(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))
"""


@pytest.mark.slow
def test_custom_model_end_to_end(tmp_path):
    (tmp_path / "my_nets.py").write_text(USER_MODULE)  # in the working directory of the run
    base = ["experiment=smoke", "model=custom", "model.epochs=2", "model.save_epochs=[1,2]"]
    res = run_cli(
        [*base, "model.net._target_=my_nets.TwoLayer", "+model.net.width=6", *TINY], tmp_path
    )
    _check(res, tmp_path)
    bad = run_cli([*base, "model.net._target_=my_nets.wrong_width", *TINY, "tag=_bad"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "model.net._target_" in bad.stderr and "num_classes=3" in bad.stderr
    missing = run_cli([*base, "model.net._target_=not_there.Net", *TINY, "tag=_m"], tmp_path)
    assert missing.returncode == 2 and "Importing not_there failed" in missing.stderr


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["synth_cnn", "synth_resnet9"])
def test_synthetic_image_experiments(tmp_path, experiment):
    small = ["dataset.num_train=60", "dataset.num_val=10", "dataset.num_test=20"]
    extra = ["model.net.width=4"] if experiment == "synth_resnet9" else []
    res = run_cli([f"experiment={experiment}", *TINY, *small, *extra], tmp_path)
    _, metrics, data = _check(res, tmp_path)
    assert data["input_shape"] == ([1, 28, 28] if experiment == "synth_cnn" else [3, 32, 32])


@pytest.mark.slow
def test_missing_files_say_what_to_put_where(tmp_path):
    # a relative path is looked up where the run starts, then under paths.data_dir; the
    # error names both places, the key, and what the file must be (before any training)
    data = tmp_path / "data"
    data.mkdir()
    cases = {
        ("dataset=csv", "dataset.file=customers.csv", "dataset.target=churn"): (
            "dataset.file=customers.csv",
            "a CSV, TSV or Parquet file",
        ),
        ("dataset=arrays", "dataset.file=my.npz"): ("dataset.file=my.npz", ".npz"),
        ("dataset=image_folder", "dataset.root=pets"): ("dataset.root=pets", "pets"),
    }
    for args, (key, what) in cases.items():
        res = run_cli([*args, f"paths.data_dir={data}", "logger=none"], tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "ggda: error:" in res.stderr and key in res.stderr and what in res.stderr
        assert str(data.resolve()) in res.stderr  # where else it looked: paths.data_dir
    # the same relative name is found once it is put under paths.data_dir
    _table(40).to_csv(data / "customers.csv", index=False)
    res = run_cli(
        ["dataset=csv", "dataset.file=customers.csv", "dataset.target=nope", "logger=none"]
        + [f"paths.data_dir={data}"],
        tmp_path,
    )
    assert res.returncode == 2 and "has no column 'nope' (dataset.target)" in res.stderr
    assert str(data / "customers.csv") in res.stderr and "churn" in res.stderr
