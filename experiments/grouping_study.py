"""Aggregate the grouping study (experiments/grouping_study.sh) into a markdown table.

    python experiments/grouping_study.py /tmp/gstudy > docs/results/grouping_study.md

Reads every ``metrics.json`` (with its ``config.json``) under OUT/multirun/grouping_study_*
and the per-sample runs under OUT/runs/*/*/singleton*; prints mean +- std over grouping
seeds of point- and group-level LDS per method, grouping and k, and the timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

LABELS = {
    "singleton": "per-sample (k = n)",
    "random": "random",
    "class": "class (random within class)",
    "kmeans": "K-means, inputs",
    "repr_kmeans": "K-means, representations",
    "grad_kmeans": "K-means, gradients (Grad-K-Means)",
    "grad_kmeans_balanced": "K-means, gradients, balanced",
}


def load(out: Path) -> pd.DataFrame:
    paths = list(out.glob("multirun/grouping_study_*/*/metrics.json"))
    paths += list(out.glob("runs/*/*/singleton*/metrics.json"))
    rows = []
    for p in paths:
        m = json.loads(p.read_text())
        cfg = json.loads((p.parent / "config.json").read_text())["resolved"]
        rows.append(
            {
                "method": cfg["method"]["name"],
                "grouping": cfg["grouping"]["name"],
                "k": int(m["attribution/k"]),
                "gseed": int(cfg["grouping"]["seed"]),
                "point": m.get("lds/point/mean"),
                "group": m.get("lds/group/mean"),
                "t_group": m.get("time/grouping"),
                "t_feat": m.get("time/grouping_features"),
                "t_clust": m.get("time/clustering"),
                "t_attr": m.get("time/attribution"),
                "grouping_cached": m.get("grouping/cached"),
                "size_min": m.get("grouping/size_min"),
                "size_max": m.get("grouping/size_max"),
            }
        )
    df = pd.DataFrame(rows)
    # A config finished twice (e.g. rerun with another retrain backend) counts once.
    return df.drop_duplicates(["method", "grouping", "k", "gseed"], keep="last")


def pm(s: pd.Series) -> str:
    s = s.dropna()
    if s.empty:
        return "-"
    if len(s) == 1:
        return f"{s.iloc[0]:.3f}"
    return f"{s.mean():.3f} ± {s.std():.3f}"


def main(out: Path) -> None:
    df = load(out)
    if df.empty:
        sys.exit(f"no finished runs under {out}")
    order = {g: i for i, g in enumerate(LABELS)}
    ks = sorted(df[df.grouping != "singleton"].k.unique())
    for method, dm in df.groupby("method"):
        print(f"### {method}\n")
        head = "| grouping | " + " | ".join(f"k={k} point | k={k} group" for k in ks) + " | seeds |"
        print(head)
        print("|---|" + "---:|" * (2 * len(ks)) + "---:|")
        for g in sorted(dm.grouping.unique(), key=lambda g: order.get(g, 99)):
            dg = dm[dm.grouping == g]
            if g == "singleton":
                r = dg.iloc[0]
                cells = [f"{r.point:.3f}", "-"] + ["", ""] * (len(ks) - 1)
                print(f"| {LABELS[g]} (k={r.k}) | " + " | ".join(cells) + " | 1 |")
                continue
            cells = []
            for k in ks:
                dk = dg[dg.k == k]
                cells += [pm(dk.point), pm(dk.group)]
            seeds = ",".join(str(s) for s in sorted(dg.gseed.unique()))
            print(f"| {LABELS.get(g, g)} | " + " | ".join(cells) + f" | {seeds} |")
        print()
    # group sizes (the LDS of a broadcast score depends on them)
    sizes = df[df.grouping != "singleton"].drop_duplicates(["grouping", "k", "gseed"])
    if not sizes.empty:
        print("### Group sizes (min-max, over seeds)\n")
        print("| grouping | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---|" + "---:|" * len(ks))
        for g in sorted(sizes.grouping.unique(), key=lambda g: order.get(g, 99)):
            cells = []
            for k in ks:
                d = sizes[(sizes.grouping == g) & (sizes.k == k)]
                cells.append(f"{int(d.size_min.min())}-{int(d.size_max.max())}" if len(d) else "-")
            print(f"| {LABELS.get(g, g)} | " + " | ".join(cells) + " |")
        print()
    # timings (grouping computed fresh, not reused from the cache)
    fresh = df[(df.grouping_cached == 0) & (df.grouping != "singleton")]
    if not fresh.empty:
        print("### Timings (wall s on the shared machine, grouping computed fresh)\n")
        print("| grouping | k | features | clustering | grouping total | attribution (method) |")
        print("|---|---:|---:|---:|---:|---|")
        for (g, k), d in fresh.groupby(["grouping", "k"]):
            attr = df[(df.grouping == g) & (df.k == k)].groupby("method").t_attr.mean()
            a = ", ".join(f"{v:.2f} ({m})" for m, v in attr.items())
            feat = d.t_feat.mean() if d.t_feat.notna().any() else float("nan")
            clus = d.t_clust.mean() if d.t_clust.notna().any() else float("nan")
            print(
                f"| {LABELS.get(g, g)} | {k} | {feat:.2f} | {clus:.2f} | {d.t_group.mean():.2f}"
                f" | {a} |"
            )
        single = df[df.grouping == "singleton"].groupby("method").t_attr.mean()
        for m, v in single.items():
            print(
                f"| per-sample | {int(df[df.grouping == 'singleton'].k.iloc[0])} | - | - | - |"
                f" {v:.2f} ({m}) |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gstudy"))
