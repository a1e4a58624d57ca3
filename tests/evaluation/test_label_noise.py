"""Label noise (dataset.label_noise) and the end-to-end noisy-label + pruning run."""

import json
import math

import pandas as pd
import pytest
import torch

from factory import run_cli
from ggda.data.base import flip_labels
from ggda.data.bundled import Synthetic
from ggda.errors import ConfigError


@pytest.mark.parametrize("n, r, c", [(100, 0.1, 10), (64, 0.1, 3), (50, 0.25, 2), (7, 0.5, 4)])
def test_flips_exactly_round_rn_never_to_the_original_class(n, r, c):
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(n))
    noisy, mask = flip_labels(y, c, r, seed=3)
    assert int(mask.sum()) == round(r * n)
    assert (noisy[mask] != y[mask]).all()  # every flipped label changed class
    assert torch.equal(noisy[~mask], y[~mask])  # nothing else changed
    assert int(noisy.min()) >= 0 and int(noisy.max()) < c


def test_flips_are_deterministic_per_seed():
    y = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a, ma = flip_labels(y, 10, 0.1, seed=5)
    b, mb = flip_labels(y, 10, 0.1, seed=5)
    c, mc = flip_labels(y, 10, 0.1, seed=6)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)
    assert torch.equal(flip_labels(y, 10, 0.0, seed=5)[0], y)


def test_dataset_keeps_mask_and_clean_labels():
    clean = Synthetic(num_train=80, num_classes=4).load()
    noisy = Synthetic(num_train=80, num_classes=4, label_noise=0.1, noise_seed=1).load()
    assert clean.noise_mask is None and clean.clean_y_train is None
    assert int(noisy.noise_mask.sum()) == 8
    assert torch.equal(noisy.clean_y_train, clean.y_train)
    assert torch.equal(noisy.y_train != clean.y_train, noisy.noise_mask)
    assert torch.equal(noisy.x_train, clean.x_train)  # noise changes labels only


def test_label_noise_out_of_range_names_the_key():
    with pytest.raises(ConfigError) as e:
        Synthetic(label_noise=1.5)
    assert e.value.key == "dataset.label_noise"


@pytest.mark.slow
def test_cli_lds_pruning_noisy_labels_end_to_end(tmp_path):
    args = [
        "experiment=smoke",
        "logger=none",
        "evaluation=[lds,pruning,noisy_labels]",
        "dataset.label_noise=0.1",
    ]
    p = run_cli(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (metrics_path,) = tmp_path.glob("runs/**/metrics.json")
    m = json.loads(metrics_path.read_text())
    run = metrics_path.parent
    for key in ("lds/point/mean", "pruning/full/acc_mean", "noisy_labels/auc"):
        assert key in m
    sizes = torch.bincount(torch.load(run / "grouping.pt"))
    for f in (0.1, 0.2, 0.3, 0.5):
        budget = math.ceil(f * 64)
        for order in ("harmful", "helpful", "random"):
            # whole groups are removed: at least the budget, overshooting by less than a group
            removed = m[f"pruning/{order}/{f:g}/points_removed"]
            assert budget <= removed < budget + int(sizes.max())
    flipped = m["noisy_labels/num_flipped"]
    assert flipped == round(0.1 * 64)
    fractions = (0.05, 0.1, 0.2, 0.3)
    recall = [m[f"noisy_labels/recall/{f:g}"] for f in fractions]
    assert recall == sorted(recall)  # inspecting more never finds fewer flipped labels
    for f, r in zip(fractions, recall, strict=True):
        assert r <= min(1.0, f * 64 / flipped) + 1e-9  # cannot find more than was inspected
    table = pd.read_csv(run / "tables" / "noisy_labels_recall.csv")
    assert table["recall"].tolist() == pytest.approx(recall)
    assert (run / "tables" / "pruning_curve.csv").exists()
    assert (run / "tables" / "noisy_labels_recall.csv").exists()
    assert (run / "figures" / "pruning_curve.png").exists()
    assert (run / "figures" / "noisy_labels_recall_curve.png").exists()


@pytest.mark.slow
def test_cli_noisy_labels_without_noise_says_to_set_it(tmp_path):
    p = run_cli(["experiment=smoke", "logger=none", "evaluation=[noisy_labels]"], tmp_path)
    assert p.returncode != 0
    assert "dataset.label_noise=0.1" in p.stdout + p.stderr
