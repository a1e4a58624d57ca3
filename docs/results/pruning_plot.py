"""Figure and Markdown table of docs/results/pruning.md from finished pruning runs.

Usage:
    python docs/results/pruning_plot.py OUT.png LABEL@RUN_DIR [LABEL@RUN_DIR ...]

Each RUN_DIR is a run directory holding ``tables/pruning_curve.csv`` (written by
``evaluation=pruning``). One panel per run; the table is printed as Markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from ggda.evaluation.pruning import draw_curve


def main(out: str, runs: list[str]) -> None:
    tables = []
    for arg in runs:
        label, run_dir = arg.split("@", 1)
        t = pd.read_csv(Path(run_dir) / "tables" / "pruning_curve.csv")
        t.insert(0, "attribution", label)
        tables.append(t)
    ymin = min(float((t.test_acc_mean - t.test_acc_std).min()) for t in tables) - 0.01
    ymax = max(float((t.test_acc_mean + t.test_acc_std).max()) for t in tables) + 0.01
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tables, strict=True):
        draw_curve(ax, t)
        ax.set_title(t.attribution.iloc[0])
        ax.set_xlabel("fraction of training points removed")
        ax.set_ylim(ymin, ymax)
    axes[0][0].set_ylabel("test accuracy (retrained, mean ± std)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    both = pd.concat(tables)
    cols = [
        "attribution",
        "order",
        "target_fraction",
        "groups_removed",
        "points_removed",
        "test_acc_mean",
        "test_acc_std",
        "runs",
    ]
    print(markdown(both[cols]))


def markdown(df: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the optional tabulate package)."""

    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
