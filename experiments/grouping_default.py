"""Aggregate the grouping-default study (experiments/grouping_default.sh) into markdown.

    python experiments/grouping_default.py /tmp/gdefault

Reads every finished run under OUT/multirun/grouping_default and prints, per method, mean
± std over the grouping seeds of point- and group-level LDS for each Grad-K-Means variant
(free sizes, size cap f = 2 and 4, balanced) and k, the largest group's share of n, the
grouping time, and the per-sample (k = n) reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def variant(g: dict) -> str:
    if g.get("name") == "singleton":
        return "per-sample (k = n)"
    if g.get("balanced"):
        return "balanced"
    f = g.get("max_size_factor")
    return "free sizes" if f is None else f"cap f = {f:g}"


def load(out: Path) -> pd.DataFrame:
    rows = []
    for p in sorted(out.glob("multirun/grouping_default/*/metrics.json")):
        m = json.loads(p.read_text())
        cfg = json.loads((p.parent / "config.json").read_text())["resolved"]
        rows.append(
            {
                "method": cfg["method"]["name"],
                "variant": variant(cfg["grouping"]),
                "seed": cfg["grouping"]["seed"],
                "k": int(m["attribution/k"]),
                "point": m.get("lds/point/mean"),
                "group": m.get("lds/group/mean"),
                "share": m.get("grouping/largest_share"),
                "grouping_s": m.get("time/grouping", 0.0),
                "attribution_s": m.get("time/attribution"),
            }
        )
    return pd.DataFrame(rows)


def pm(s: pd.Series) -> str:
    s = s.dropna()
    if s.empty:
        return "-"
    return f"{s.mean():.3f}" + (f" ± {s.std(ddof=0):.3f}" if len(s) > 1 else "")


ORDER = ["free sizes", "cap f = 2", "cap f = 4", "balanced", "per-sample (k = n)"]


def main(out: Path) -> None:
    df = load(out)
    if df.empty:
        sys.exit(f"no finished runs under {out}/multirun/grouping_default")
    grouped = df[~df["variant"].str.startswith("per-sample")]
    ks = sorted(grouped["k"].unique())
    for method, sub in df.groupby("method"):
        print(f"\n### {method}\n")
        head = "| variant | " + " | ".join(f"k={k} point | k={k} group" for k in ks)
        print(head + " | largest group (share of n) | seeds |")
        print("|---|" + "---:|---:|" * len(ks) + "---|---:|")
        for v in [v for v in ORDER if v in set(sub["variant"])]:
            r = sub[sub["variant"] == v]
            if v.startswith("per-sample"):
                cells = [pm(r["point"]), "-"] + [""] * (2 * len(ks) - 2)
            else:
                cells = []
                for k in ks:
                    rk = r[r["k"] == k]
                    cells += [pm(rk["point"]), pm(rk["group"])]
            share = f"{r['share'].min():.1%}-{r['share'].max():.1%}"
            seeds = ",".join(str(s) for s in sorted(r["seed"].unique()))
            print(f"| {v} | " + " | ".join(cells) + f" | {share} | {seeds} |")
    print("\n### Grouping time (s, mean over seeds and methods; machine shared, see load)\n")
    t = grouped.groupby(["variant", "k"])["grouping_s"].mean().unstack()
    t = t.reindex([v for v in ORDER if v in t.index])
    print("| variant | " + " | ".join(f"k={k}" for k in t.columns) + " |")
    print("|---|" + "---:|" * len(t.columns))
    for v, r in t.iterrows():
        print(f"| {v} | " + " | ".join(f"{x:.2f}" for x in r) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gdefault"))
