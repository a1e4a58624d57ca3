"""Recall-curve figure of docs/results/noisy_labels.md from finished noisy-label runs.

Usage:
    python docs/results/noisy_labels_plot.py OUT.png LABEL@RUN_DIR [LABEL@RUN_DIR ...]

Each RUN_DIR holds ``tables/noisy_labels_curve.csv`` and ``metrics.json`` (written by
``evaluation=noisy_labels``); all curves go on one axis beside random and oracle inspection.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd


def main(out: str, runs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    rate = None
    for arg in runs:
        label, run_dir = arg.split("@", 1)
        t = pd.read_csv(Path(run_dir) / "tables" / "noisy_labels_curve.csv")
        m = json.loads((Path(run_dir) / "metrics.json").read_text())
        rate = m["noisy_labels/noise_rate"]
        ax.plot(t.fraction_inspected, t.recall, label=f"{label} (AUC {m['noisy_labels/auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="random inspection")
    if rate is not None:
        ax.plot([0, rate, 1], [0, 1, 1], color="k", ls="--", lw=1, label="oracle")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title("MNIST 5k, 10% flipped labels: TracIn self-influence")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
