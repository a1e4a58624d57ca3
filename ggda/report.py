"""Sweep reports: every run of a sweep in one table, and the fidelity-speed trade-off drawn.

Usage::

    python -m ggda.report outputs/multirun/sweep [--out DIR] [--wandb] [--project NAME]

Collects every finished run under the directory (a run is a directory holding
``metrics.json`` and ``config.json``, as written by :func:`ggda.pipeline.run`; unfinished
runs are listed and skipped) and writes to ``--out`` (default ``<dir>/report``):

- ``runs.csv``: one row per run: dataset, model, method, grouping, k, seed, the config keys
  that vary within the sweep, every metric, and the speedups;
- ``summary.csv``: runs of the same configuration averaged over seeds (mean and std);
- ``lds_vs_k.png``: point- and group-level LDS against k (log scale) per method and grouping;
- ``time_vs_k.png``: attribution time, and attribution + grouping time, against k;
- ``speedup_vs_k.png``: speedup against the k = n run of the same sweep and method
  (``grouping=singleton`` or ``groups`` = n); a sweep without one says so on the figure;
- ``frontier.png``: point LDS against attribution + grouping time, every configuration a
  point, the Pareto front (no other configuration is both faster and more faithful) drawn;
- ``report.md``: the summary table and the figures.

With ``--wandb`` the tables and figures are also logged as one W&B run (job type
``report``) in the sweep's group, offline unless ``WANDB_MODE`` says otherwise.

Speedup of a run = T(k = n) / T(run), with T measured in the same sweep, the same method,
dataset, model and variant (seeds averaged), both for the attribution time alone
(``speedup/attribution``) and including the grouping (``speedup/with_grouping``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ggda.errors import GGDAError
from ggda.evaluation.base import metric_namespaces
from ggda.io import atomic_write_bytes, stable_hash

log = logging.getLogger(__name__)

# Columns that identify a configuration (the variant columns are added per sweep).
BASE = ["dataset", "model", "method", "grouping"]
# Result config keys that never make two runs different configurations of the study.
_IGNORED = {"sweep_name", "seed", "groups"}
T_ATTR = "time/attribution"
T_GROUP = "time/grouping"
T_BOTH = "time/attribution+grouping"
LDS = {"point": "lds/point/mean", "group": "lds/group/mean"}
# 95 % interval half-width of the mean LDS over the queries (one seed: the error bar).
CI = {level: f"lds/{level}/ci95" for level in LDS}
SIZES = ("grouping/size_max", "grouping/largest_share")
COST = ("time/epoch", "attribution/epochs")
# A grouped run is a candidate answer when it keeps this share of the per-sample LDS.
KEEP = 0.9
BEST_RULE = (
    f"per method: the cheapest run (attribution + grouping time) whose point LDS is at least "
    f"{KEEP:.0%} of the per-sample (k = n) point LDS of the same method; without such a run, "
    "the grouped run with the highest point LDS"
)
NO_BASELINE = (
    "no k = n (per-sample) run in this sweep: add one, e.g. "
    "`grouping=singleton` with the same method, to get speedups"
)


# -- collecting --------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(d, list):
        return {prefix.rstrip("."): json.dumps(d)}
    return {prefix.rstrip("."): d}


def find_runs(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Finished and unfinished run directories under ``root``.

    Returns:
        (finished: directories with ``metrics.json`` and ``config.json``; unfinished:
        Hydra job directories, ``.hydra/`` present, without ``metrics.json``).
    """
    root = Path(root)
    finished, unfinished = [], []
    for hydra_or_metrics in sorted(root.rglob("*")):
        if any(part.startswith(".") and part != ".hydra" for part in hydra_or_metrics.parts):
            continue  # .submitit pickles and logs, hidden temp files
        if hydra_or_metrics.name == "metrics.json":
            d = hydra_or_metrics.parent
            if (d / "config.json").exists():
                finished.append(d)
        elif hydra_or_metrics.name == ".hydra" and hydra_or_metrics.is_dir():
            d = hydra_or_metrics.parent
            if not (d / "metrics.json").exists():
                unfinished.append(d)
    return finished, unfinished


def _read_run(d: Path, root: Path) -> dict[str, Any] | None:
    try:
        metrics = json.loads((d / "metrics.json").read_text())
        cfg = json.loads((d / "config.json").read_text())
        resolved, results = cfg["resolved"], cfg["results_config"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        log.warning("Skipping %s: unreadable metrics.json/config.json (%s)", d, e)
        return None
    n = metrics.get("data/n_train", math.nan)
    k = metrics.get("attribution/k", metrics.get("grouping/k", resolved.get("groups")))
    row: dict[str, Any] = {
        "run": str(d.relative_to(root)) if d != root else ".",
        "dataset": resolved.get("dataset", {}).get("name", "?"),
        "model": resolved.get("model", {}).get("name", "?"),
        "method": resolved.get("method", {}).get("name", "?"),
        "grouping": resolved.get("grouping", {}).get("name", "?"),
        "k": int(k) if k is not None else math.nan,
        "n_train": n,
        "seed": resolved.get("seed", metrics.get("seed")),
        "sweep_name": resolved.get("sweep_name", ""),
        "tag": resolved.get("tag", ""),
        "wandb_project": (resolved.get("logger") or {}).get("wandb", {}).get("project"),
    }
    row |= {m: v for m, v in metrics.items() if m not in row}
    if T_ATTR in row and T_BOTH not in metrics:
        row[T_BOTH] = float(row[T_ATTR]) + float(row.get(T_GROUP, 0.0) or 0.0)
    for level in LDS:
        std, m = metrics.get(f"lds/{level}/std"), metrics.get("attribution/m")
        if std is not None and m:
            q = max(1.0, float(m) - float(metrics.get(f"lds/{level}/nan_count", 0.0)))
            row[CI[level]] = 1.96 * float(std) / math.sqrt(q)
    row["_cfg"] = {k: v for k, v in _flatten(results).items() if k not in _IGNORED}
    # Same results config in two places (e.g. runs/ and multirun/): counted once. The
    # requested `groups` counts through the k it gave: `grouping=singleton` ignores it, so
    # `-m groups=10,100 grouping=singleton` makes one k = n run twice, not two seeds.
    ident = {k: v for k, v in results.items() if k not in ("sweep_name", "groups")}
    row["_id"] = stable_hash(ident | {"effective_k": row["k"]})
    row["_mtime"] = (d / "metrics.json").stat().st_mtime
    return row


def variant_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Config keys that make separate configurations (lines) of the study.

    These are the keys that vary between runs of the same dataset, model, method,
    grouping, k and seed.

    Keys that are functions of those (``grouping.seed``, a method's own options, the
    dataset's sizes) are not variants.
    """
    keys = sorted({k for r in rows for k in r["_cfg"]})
    out = []
    for key in keys:
        seen: dict[tuple, Any] = {}
        for r in rows:
            ident = (*(r[c] for c in BASE), r["k"], r["seed"])
            v = json.dumps(r["_cfg"].get(key), sort_keys=True, default=str)
            if seen.setdefault(ident, v) != v:
                out.append(key)
                break
    return out


def collect(root: str | Path) -> tuple[pd.DataFrame, list[Path]]:
    """Every finished run under ``root`` as a table (one row per run, with speedups).

    Returns:
        (the table, the unfinished run directories).

    Raises:
        GGDAError: no finished run under ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise GGDAError(f"{root} is not a directory; give a sweep or outputs directory")
    finished, unfinished = find_runs(root)
    rows = [r for r in (_read_run(d, root) for d in finished) if r is not None]
    if not rows:
        raise GGDAError(
            f"no finished runs under {root} (a run directory holds metrics.json and "
            "config.json); did the sweep write elsewhere (see paths.output_dir)?"
        )
    # Keep the newest copy of each configuration.
    rows = list({r["_id"]: r for r in sorted(rows, key=lambda r: r["_mtime"])}.values())
    vkeys = variant_keys(rows)
    for r in rows:
        for key in vkeys:
            r[f"cfg.{key}"] = r["_cfg"].get(key)
        # A key a run does not have (another grouping's option) is not part of its label.
        present = [key for key in vkeys if key in r["_cfg"]]
        r["variant"] = ",".join(f"{key}={r['_cfg'][key]}" for key in present)
        # The k = n baseline is shared by every grouping: matched without grouping options.
        r["_baseline_variant"] = ",".join(
            f"{key}={r['_cfg'][key]}" for key in present if not key.startswith("grouping.")
        )
        for key in ("_cfg", "_id", "_mtime"):
            r.pop(key)
    df = pd.DataFrame(rows)
    df = add_speedups(df).drop(columns=["_baseline_variant"])
    first = [*BASE, "variant", "k", "n_train", "seed"]
    df = df[first + [c for c in df.columns if c not in first]]
    df = df.sort_values([*BASE, "variant", "k", "seed"], kind="stable").reset_index(drop=True)
    return df, unfinished


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``speedup/attribution`` and ``speedup/with_grouping``: T(k = n) / T(run).

    T(k = n) is the seed-averaged time of the k = n run of the same method, dataset, model
    and variant (grouping options aside; NaN where the sweep has none).
    """
    df = df.copy()
    if "_baseline_variant" not in df:
        df["_baseline_variant"] = df.get("variant", "")
    df["is_baseline"] = df["k"] == df["n_train"]
    ident = ["dataset", "model", "method", "_baseline_variant"]
    for col, name in ((T_ATTR, "speedup/attribution"), (T_BOTH, "speedup/with_grouping")):
        if col not in df:
            df[name] = np.nan
            continue
        base = df[df["is_baseline"]].groupby(ident, dropna=False)[col].mean().rename("_base")
        merged = df.join(base, on=ident)
        df[name] = merged["_base"] / df[col]
    df["has_baseline"] = df["speedup/attribution"].notna()
    return df


def _eval_columns(df: pd.DataFrame) -> list[str]:
    """Headline columns of the noisy-label and pruning evaluations present in ``df``."""
    cols = [
        c for c in df.columns if c == "noisy_labels/auc" or c.startswith("noisy_labels/recall/")
    ]
    cols += [c for c in df.columns if c.startswith("pruning/") and c.endswith("/acc_mean")]
    cols += [
        c
        for c in df.columns
        if c.split("/")[0] in metric_namespaces() - {"lds"} and c.endswith("mean") and c not in cols
    ]
    return cols


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged table: mean and std of the headline metrics per configuration and k.

    It also has the group sizes, the cost in epochs and the 95 % query intervals.
    """
    cols = [
        c
        for c in (
            LDS["point"],
            LDS["group"],
            CI["point"],
            CI["group"],
            *SIZES,
            T_ATTR,
            T_GROUP,
            T_BOTH,
            *COST,
            "speedup/attribution",
            "speedup/with_grouping",
            "time/total",
        )
        if c in df
    ]
    cols += _eval_columns(df)
    keys = [*BASE, "variant", "k", "n_train"]
    g = df.groupby(keys, dropna=False, sort=True)
    out = g[cols].mean()
    std = g[cols].std(ddof=0).add_suffix(" std")
    out = out.join(std)
    out.insert(0, "runs", g.size())
    ordered = ["runs"] + [
        c for pair in zip(cols, [f"{c} std" for c in cols], strict=True) for c in pair
    ]
    return out[ordered].reset_index()


def choose_best(summary: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The answer per method under :data:`BEST_RULE`.

    Returns:
        {method: {"k", "grouping", "variant", "lds_point", "baseline_lds", "keeps"
        (share of the per-sample LDS), "speedup" (with grouping; NaN without a k = n run),
        "meets" (whether it keeps >= KEEP)}}; methods without point LDS are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    if LDS["point"] not in summary:
        return out
    for method, sub in summary.groupby("method", sort=True):
        sub = sub[sub[LDS["point"]].notna()]
        base = sub[sub["k"] == sub["n_train"]]
        grouped = sub[sub["k"] < sub["n_train"]]
        if grouped.empty:
            continue
        ref = float(base[LDS["point"]].max()) if len(base) else math.nan
        cost = T_BOTH if T_BOTH in grouped else "k"
        ok = grouped[grouped[LDS["point"]] >= KEEP * ref] if math.isfinite(ref) else grouped[:0]
        pick = (
            ok.sort_values([cost, "k"]).iloc[0]
            if len(ok)
            else grouped.sort_values(LDS["point"], ascending=False).iloc[0]
        )
        speed = pick.get("speedup/with_grouping", math.nan)
        out[str(method)] = {
            "k": int(pick["k"]),
            "grouping": str(pick["grouping"]),
            "variant": str(pick["variant"]),
            "lds_point": float(pick[LDS["point"]]),
            "baseline_lds": ref,
            "keeps": float(pick[LDS["point"]]) / ref if math.isfinite(ref) and ref else math.nan,
            "speedup": float(speed) if speed is not None else math.nan,
            "meets": bool(len(ok)),
        }
    return out


def answer_lines(best: dict[str, dict[str, Any]]) -> list[str]:
    """One line per method: "k = X keeps Y % of per-sample LDS at Z x the speed"."""
    lines = []
    for method, b in best.items():
        where = f"{b['grouping']}" + (f" [{b['variant']}]" if b["variant"] else "")
        if not math.isfinite(b["keeps"]):
            lines.append(
                f"- **{method}**: k = {b['k']} ({where}) has the best grouped point LDS "
                f"({b['lds_point']:.3f}); no per-sample run to compare with "
                "(add `grouping=singleton`)."
            )
            continue
        speed = f"{b['speedup']:.2f}x the speed" if math.isfinite(b["speedup"]) else "unknown speed"
        head = "" if b["meets"] else f"no grouped k keeps {KEEP:.0%}; the best, "
        lines.append(
            f"- **{method}**: {head}k = {b['k']} ({where}) keeps {100 * b['keeps']:.0f} % of "
            f"per-sample LDS ({b['lds_point']:.3f} of {b['baseline_lds']:.3f}) at {speed} "
            "(attribution + grouping)."
        )
    return lines


# -- plotting ----------------------------------------------------------------------------
def _lines(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, dict]]:
    """One line per configuration: (label, seed-averaged rows sorted by k, style)."""
    multi = {c: df[c].nunique() > 1 for c in ("dataset", "model")}
    methods = sorted(df["method"].unique())
    groupings = sorted(df["grouping"].unique())
    variants = sorted(df["variant"].unique())
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*X<>"
    styles = ["-", "--", ":", "-."]
    out = []
    for ident, sub in df.groupby([*BASE, "variant"], sort=True):
        dataset, model, method, grouping, variant = ident
        label = f"{method} / {grouping}"
        prefix = "/".join(
            x for x, on in ((dataset, multi["dataset"]), (model, multi["model"])) if on
        )
        if prefix:
            label = f"{prefix}: {label}"
        if variant:
            label += f" [{variant}]"
        ci = methods.index(method) + len(methods) * variants.index(variant)
        style = {
            "color": colors[ci % len(colors)],
            "marker": markers[groupings.index(grouping) % len(markers)],
            "linestyle": styles[groupings.index(grouping) % len(styles)],
        }
        num = sub.select_dtypes("number").drop(columns=["k"])
        agg = num.groupby(sub["k"]).agg(["mean", "std", "count"])
        out.append((label, agg, style))
    return out


def _col(agg: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if (col, "mean") not in agg:
        return None
    mean = agg[(col, "mean")]
    ok = mean.notna()
    if not ok.any():
        return None
    std = agg[(col, "std")].fillna(0.0)
    return agg.index[ok].to_numpy(), mean[ok].to_numpy(), std[ok].to_numpy()


def _lds_err(agg: pd.DataFrame, level: str):
    """(k, mean LDS, error bar, kind) of one LDS level, or None when it was not measured.

    The error bar is the std over seeds where every k has several seeds (kind ``seeds``),
    else the 95 % interval of the mean over queries (kind ``queries``).
    """
    got = _col(agg, LDS[level])
    if got is None:
        return None
    k, mean, std = got
    counts = agg[(LDS[level], "count")].loc[k].to_numpy()
    if (counts > 1).all():
        return k, mean, std, "seeds"
    ci = _col(agg, CI[level])
    err = pd.Series(ci[1], ci[0]).reindex(k).fillna(0.0).to_numpy() if ci else np.zeros_like(mean)
    return k, mean, np.where(counts > 1, std, err), "queries"


def _err_caption(kinds: set[str]) -> str:
    if kinds == {"seeds"}:
        return "error bars: std over seeds"
    if kinds == {"queries"}:
        return "error bars: 95 % interval of the mean over queries (one seed)"
    return "error bars: std over seeds; 95 % interval over queries where one seed"


def _plain_log(axis: Any, minor: bool = True) -> None:
    """Log axis labelled with plain numbers (0.02, 1, 5, 100).

    With ``minor`` also at 2x and 5x each power of ten, so that a range within one decade
    still has labels.
    """
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    if minor:
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_minor_formatter(plain)
    else:
        axis.set_minor_formatter(NullFormatter())


def _k_axis(ax: Any, df: pd.DataFrame) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("number of groups k (log scale)")
    ks = sorted({int(k) for k in df["k"].dropna()})
    if len(ks) <= 12:  # tick the k values of the sweep itself
        ax.set_xticks(ks)
    _plain_log(ax.xaxis, minor=False)
    ax.tick_params(axis="x", labelrotation=0)
    for n in sorted(df["n_train"].dropna().unique()):
        ax.axvline(n, color="0.6", lw=0.8, ls=":")
    ax.grid(True, which="both", alpha=0.3)


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    if handles:
        fig.legend(
            list(handles.values()),
            list(labels),
            loc="outside lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
            title="method / grouping (dotted line: k = n)",
            title_fontsize=8,
        )


def plot_lds(df: pd.DataFrame) -> Any:
    """LDS (point and group level) against k, one line per method and grouping.

    Error bars are from seeds, or 95 % intervals over queries with one seed (the title
    says which).
    """
    levels = [(lv, c) for lv, c in LDS.items() if c in df and df[c].notna().any()]
    fig, axes = plt.subplots(
        1, len(levels), figsize=(5.5 * len(levels) + 0.5, 4.8), sharey=True, layout="constrained"
    )
    axes = np.atleast_1d(axes)
    kinds: set[str] = set()
    for ax, (level, _) in zip(axes, levels, strict=True):
        for label, agg, style in _lines(df):
            got = _lds_err(agg, level)
            if got is None:
                continue
            k, mean, err, kind = got
            kinds.add(kind)
            ax.errorbar(k, mean, yerr=err, label=label, capsize=3, ms=5, **style)
        _k_axis(ax, df)
        ax.set_title(f"{level}-level LDS")
        ax.set_ylabel("LDS (mean Spearman over queries)")
    fig.suptitle(f"Fidelity vs number of groups ({_err_caption(kinds)})")
    _legend(fig, list(axes))
    return fig


def plot_time(df: pd.DataFrame) -> Any:
    """Attribution time, and attribution + grouping time, against k (log-log)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
    for ax, (col, title) in zip(
        axes, ((T_ATTR, "attribution"), (T_BOTH, "attribution + grouping")), strict=True
    ):
        for label, agg, style in _lines(df):
            got = _col(agg, col)
            if got is not None:
                ax.errorbar(got[0], got[1], yerr=got[2], label=label, capsize=3, ms=5, **style)
        _k_axis(ax, df)
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_title(f"{title} time")
        ax.set_ylabel("seconds (log scale)")
    fig.suptitle("Cost vs number of groups")
    _legend(fig, axes)
    return fig


def plot_speedup(df: pd.DataFrame) -> Any:
    """Speedup against the k = n run of the same sweep and method, against k.

    Drawn only when the sweep has such a run; methods without one are named on the figure.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True, layout="constrained")
    missing = sorted(df.loc[~df["has_baseline"], "method"].unique())
    for ax, (col, title) in zip(
        axes,
        (("speedup/attribution", "attribution"), ("speedup/with_grouping", "incl. grouping")),
        strict=True,
    ):
        for label, agg, style in _lines(df):
            got = _col(agg, col)
            if got is not None:
                ax.errorbar(got[0], got[1], yerr=got[2], label=label, capsize=3, ms=5, **style)
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        if missing:
            ax.text(
                0.5,
                0.05,
                f"no k = n run for: {', '.join(missing)}",
                ha="center",
                va="bottom",
                transform=ax.transAxes,
                fontsize=9,
                bbox={"boxstyle": "round", "fc": "lightyellow", "ec": "0.6"},
            )
        _k_axis(ax, df)
        ax.set_title(f"speedup, {title}")
        ax.set_ylabel("T(k = n) / T(k)  (log scale)")
    fig.suptitle("Speedup vs number of groups (against the k = n run of the same method)")
    _legend(fig, axes)
    return fig


def plot_noisy_labels(df: pd.DataFrame) -> Any:
    """Noisy-label detection against k: ROC-AUC, and recall at each inspected fraction."""
    recalls = sorted(
        (c for c in df.columns if c.startswith("noisy_labels/recall/") and c[20:] != "mean"),
        key=lambda c: float(c.rsplit("/", 1)[1]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    for label, agg, style in _lines(df):
        got = _col(agg, "noisy_labels/auc")
        if got is not None:
            axes[0].errorbar(got[0], got[1], yerr=got[2], label=label, capsize=3, ms=5, **style)
        for i, col in enumerate(recalls):
            got = _col(agg, col)
            if got is None:
                continue
            st = style | {"alpha": 0.35 + 0.65 * (i + 1) / len(recalls)}
            frac = col.rsplit("/", 1)[1]
            axes[1].plot(got[0], got[1], ms=5, **st, label=f"{label}, {frac} inspected")
    axes[0].axhline(0.5, color="0.5", lw=0.8, ls="--")
    axes[0].set_title("ROC-AUC of the point ranking (0.5 = random)")
    axes[0].set_ylabel("AUC")
    axes[1].set_title("recall of flipped labels at a fraction inspected")
    axes[1].set_ylabel("recall")
    for ax in axes:
        _k_axis(ax, df)
    axes[1].legend(fontsize=7)
    fig.suptitle("Noisy-label detection vs number of groups (error bars: std over seeds)")
    return fig


def _pruning_curves(df: pd.DataFrame) -> dict[str, list[tuple[float, str]]]:
    """{order: [(fraction, column)]} of the ``pruning/<order>/<fraction>/acc_mean`` columns."""
    out: dict[str, list[tuple[float, str]]] = {}
    for c in df.columns:
        parts = c.split("/")
        if len(parts) == 4 and parts[0] == "pruning" and parts[3] == "acc_mean":
            try:
                out.setdefault(parts[1], []).append((float(parts[2]), c))
            except ValueError:
                continue
    return {o: sorted(v) for o, v in sorted(out.items())}


def plot_pruning(df: pd.DataFrame) -> Any:
    """Test accuracy (retrained) against the fraction of training data removed.

    One panel per removal order, one line per method / grouping / k (random removal
    dashed grey).
    """
    curves = _pruning_curves(df)
    orders = [o for o in curves if o != "random"] or list(curves)
    fig, axes = plt.subplots(
        1, len(orders), figsize=(5.5 * len(orders) + 0.5, 4.8), sharey=True, layout="constrained"
    )
    axes = np.atleast_1d(axes)
    ks = sorted({int(k) for k in df["k"].dropna()})
    for ax, order in zip(axes, orders, strict=True):
        for label, agg, style in _lines(df):
            for j, k in enumerate(ks):
                if k not in agg.index:
                    continue
                pts = [(f, agg.loc[k, (c, "mean")]) for f, c in curves[order] if (c, "mean") in agg]
                pts = [(f, v) for f, v in pts if np.isfinite(v)]
                if not pts:
                    continue
                st = style | {"alpha": 0.4 + 0.6 * (j + 1) / len(ks)}
                ax.plot(*zip(*pts, strict=True), **st, ms=5, label=f"{label}, k={k}")
                if "random" in curves and order != "random":
                    rnd = [(f, agg.loc[k, (c, "mean")]) for f, c in curves["random"]]
                    rnd = [(f, v) for f, v in rnd if np.isfinite(v)]
                    if rnd:
                        ax.plot(*zip(*rnd, strict=True), color="0.6", ls="--", lw=0.8)
        ax.set_title(f"{order} groups removed first (grey dashed: random)")
        ax.set_xlabel("fraction of training points removed")
        ax.set_ylabel("test accuracy (retrained)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Dataset pruning: test accuracy vs fraction removed, per k")
    return fig


def pareto_front(time: np.ndarray, fidelity: np.ndarray) -> np.ndarray:
    """Indices of the Pareto front of (time, fidelity), sorted by time.

    These are the points no other point beats in both time (lower) and fidelity (higher).

    Args:
        time: (P,) cost of each point.
        fidelity: (P,) fidelity of each point (e.g. LDS).

    Returns:
        (F,) int indices into the P points.
    """
    order = np.lexsort((-fidelity, time))
    front, best = [], -np.inf
    for i in order:
        if fidelity[i] > best:
            front.append(i)
            best = fidelity[i]
    return np.asarray(front, dtype=int)


def plot_frontier(df: pd.DataFrame) -> Any:
    """Point LDS (group LDS if absent) against attribution + grouping time."""
    col = LDS["point"] if LDS["point"] in df and df[LDS["point"]].notna().any() else LDS["group"]
    fig, ax = plt.subplots(figsize=(8, 5.6), layout="constrained")
    pts_t, pts_f = [], []
    for label, agg, style in _lines(df):
        got_f, got_t = _col(agg, col), _col(agg, T_BOTH)
        if got_f is None or got_t is None:
            continue
        k = np.intersect1d(got_f[0], got_t[0])
        f = pd.Series(got_f[1], got_f[0])[k].to_numpy()
        t = pd.Series(got_t[1], got_t[0])[k].to_numpy()
        ax.plot(t, f, label=label, ms=6, lw=0.8, alpha=0.8, **style)
        for ki, ti, fi in zip(k, t, f, strict=True):
            ax.annotate(
                f"k={int(ki)}",
                (ti, fi),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=style["color"],
            )
        pts_t += list(t)
        pts_f += list(f)
    if pts_t:
        front = pareto_front(np.asarray(pts_t), np.asarray(pts_f))
        ft, ff = np.asarray(pts_t)[front], np.asarray(pts_f)[front]
        # Rings mark the front's points (a front of one point has no line to draw).
        ax.step(ft, ff, where="post", color="k", lw=2, alpha=0.3, zorder=0)
        ax.plot(
            ft,
            ff,
            ls="none",
            marker="o",
            ms=15,
            mfc="none",
            mec="k",
            mew=1.2,
            alpha=0.6,
            label="Pareto front",
            zorder=0,
        )
    else:
        ax.text(0.5, 0.5, "no runs with both LDS and timings", ha="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.margins(x=0.1)  # room for the k labels
    _plain_log(ax.xaxis)
    ax.set_xlabel("attribution + grouping time, seconds (log scale)")
    ax.set_ylabel(f"{col.split('/')[1]}-level LDS")
    ax.set_title("Fidelity-speed frontier (up and left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _has(df: pd.DataFrame, *cols: str) -> bool:
    return all(c in df and df[c].notna().any() for c in cols)


# name: (plot, whether the sweep has what it draws). A figure is written only when it has.
FIGURES = {
    "lds_vs_k": (plot_lds, lambda df: _has(df, LDS["point"]) or _has(df, LDS["group"])),
    "time_vs_k": (plot_time, lambda df: _has(df, T_ATTR)),
    "speedup_vs_k": (plot_speedup, lambda df: bool(df["has_baseline"].any())),
    "frontier": (
        plot_frontier,
        lambda df: (_has(df, LDS["point"]) or _has(df, LDS["group"])) and _has(df, T_BOTH),
    ),
    "noisy_labels_vs_k": (plot_noisy_labels, lambda df: _has(df, "noisy_labels/auc")),
    "pruning_vs_removed": (plot_pruning, lambda df: bool(_pruning_curves(df))),
}


# -- writing -----------------------------------------------------------------------------
def _save_fig(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=130)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def _fmt(v: Any, spec: str = ".3f") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "-" if not math.isfinite(v) else format(v, spec)


def _pm(row: pd.Series, col: str, spec: str = ".3f") -> str:
    if col not in row or not np.isfinite(row[col]):
        return "-"
    sd = row.get(f"{col} std", math.nan)
    return _fmt(row[col], spec) + (f" ± {_fmt(sd, spec)}" if row["runs"] > 1 and sd > 0 else "")


def compact_table(summary: pd.DataFrame) -> str:
    """A short markdown table: one row per configuration and k, the headline columns only.

    Every column is in ``summary.csv``.
    """
    cols = [
        ("point LDS", LDS["point"], ".3f"),
        ("group LDS", LDS["group"], ".3f"),
        ("largest group", "grouping/largest_share", ".0%"),
        ("attr+group s", T_BOTH, ".2f"),
        ("attr epochs", "attribution/epochs", ".2f"),
        ("speed-up", "speedup/with_grouping", ".2f"),
        ("AUC", "noisy_labels/auc", ".3f"),
    ]
    cols = [c for c in cols if c[1] in summary and summary[c[1]].notna().any()]
    head = ["method", "grouping", "k", "runs", *(c[0] for c in cols)]
    multi_variant = summary["variant"].astype(str).str.len().gt(0).any()
    if multi_variant:
        head.insert(2, "variant")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        k = f"{int(r['k'])}" + (" (= n)" if r["k"] == r["n_train"] else "")
        cells = [str(r["method"]), str(r["grouping"])]
        if multi_variant:
            cells.append(str(r["variant"]) or "-")
        cells += [k, str(int(r["runs"]))]
        cells += [_pm(r, col, spec) for _, col, spec in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(
    root: Path,
    df: pd.DataFrame,
    summary: pd.DataFrame,
    unfinished: list[Path],
    figures: dict[str, Path],
    best: dict[str, dict[str, Any]],
) -> str:
    seeds = int(summary["runs"].max()) if len(summary) else 0
    lines = [
        f"# ggda sweep report: {root}",
        "",
        f"{len(df)} finished runs"
        + (f", {len(unfinished)} unfinished (no metrics.json)" if unfinished else "")
        + (
            f"; ± is the std over seeds (up to {seeds} per row)."
            if seeds > 1
            else "; one seed per row (the figures' error bars: 95 % intervals over queries)."
        )
        + (" Speed-up: T(k = n) / T(k), attribution + grouping." if len(df) else ""),
    ]
    if best:
        lines += ["", "Which k? (" + BEST_RULE + ")", "", *answer_lines(best)]
    if not df["has_baseline"].any():
        lines += ["", f"Speedups: {NO_BASELINE}."]
    lines += ["", compact_table(summary), "", "All columns: `summary.csv`, `runs.csv`."]
    lines += [""] + [f"![{name}]({p.name})" for name, p in figures.items()]
    if unfinished:
        lines += ["", "Unfinished runs:"] + [f"- {d}" for d in unfinished]
    return "\n".join(lines) + "\n"


def wandb_run_id(root: Path) -> str:
    """The summary run's id: a hash of the sweep directory.

    A second report of the same sweep thus updates the same W&B run (``resume="allow"``)
    instead of adding one.
    """
    import hashlib

    return "report-" + hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


def log_to_wandb(
    df: pd.DataFrame,
    summary: pd.DataFrame,
    figures: dict[str, Path],
    out: Path,
    project: str,
    group: str,
    root: Path,
    best: dict[str, dict[str, Any]],
) -> str:
    """Log the sweep as one W&B run (job type ``report``) in ``group``, updated in place.

    The run (id :func:`wandb_run_id`, display name ``report-<group>``, tags: the sweep tag
    ``sweep:<group>``, ``report``, datasets and methods) holds the two tables, native charts
    (``wandb.plot.line`` of point and group LDS vs k, one line per method / grouping;
    ``wandb.plot.scatter`` of point LDS vs attribution + grouping time), the figures, and
    ``best/<method>/...`` summary entries chosen under :data:`BEST_RULE`. An earlier offline
    copy of the same run under ``out/wandb`` is replaced. Offline unless ``WANDB_MODE``
    says otherwise. Returns the run's local directory.
    """
    import shutil

    import wandb

    def table(frame: pd.DataFrame) -> Any:
        frame = frame.copy()
        for c in frame.columns:
            if frame[c].dtype == object:
                frame[c] = frame[c].astype(str)
        return wandb.Table(dataframe=frame)

    run_id = wandb_run_id(root)
    for old in (out / "wandb").glob(f"*-{run_id}"):  # the previous report's offline copy
        shutil.rmtree(old, ignore_errors=True)
    tags = sorted(
        {*df["dataset"].astype(str), *df["method"].astype(str), "report", f"sweep:{group}"}
    )
    run = wandb.init(
        project=project,
        group=group,
        job_type="report",
        name=f"report-{group}",
        id=run_id,
        resume="allow",
        tags=tags,
        dir=str(out),
        mode=os.environ.get("WANDB_MODE", "offline"),
        config={
            "num_runs": len(df),
            "methods": sorted(df["method"].unique()),
            "sweep_dir": str(root),
            "best_rule": BEST_RULE,
        },
        allow_val_change=True,
        reinit="finish_previous",
    )
    curves = summary.assign(
        config=summary["method"].astype(str) + " / " + summary["grouping"].astype(str)
    )
    charts: dict[str, Any] = {}
    for level, col in LDS.items():
        if col in curves and curves[col].notna().any():
            t = table(curves[["config", "k", col]].dropna().rename(columns={col: f"lds_{level}"}))
            charts[f"chart/lds_{level}_vs_k"] = wandb.plot.line(
                t, "k", f"lds_{level}", stroke="config", title=f"{level}-level LDS vs k"
            )
    if LDS["point"] in curves and T_BOTH in curves:
        pts = curves[["config", "k", T_BOTH, LDS["point"]]].dropna()
        pts = pts.rename(columns={T_BOTH: "seconds", LDS["point"]: "lds_point"})
        charts["chart/lds_vs_time"] = wandb.plot.scatter(
            table(pts), "seconds", "lds_point", title="point LDS vs attribution + grouping time"
        )
    run.log({"report/runs": table(df), "report/summary": table(summary), **charts})
    run.log({f"report/{name}": wandb.Image(str(p)) for name, p in figures.items()})
    run.summary["best/rule"] = BEST_RULE
    for method, b in best.items():
        for key in ("k", "grouping", "lds_point", "keeps", "speedup"):
            v = b[key]
            run.summary[f"best/{method}/{key}"] = (
                None if isinstance(v, float) and not math.isfinite(v) else v
            )
    local = str(run.dir)
    run.finish()
    return local


def report(
    root: str | Path,
    out: str | Path | None = None,
    wandb: bool = False,
    project: str | None = None,
) -> dict[str, Any]:
    """Write the sweep's tables and figures (and log them to W&B when asked).

    Args:
        root: a sweep directory (``outputs/multirun/<sweep_name>``) or any directory
            holding run directories (``outputs/``).
        out: where to write; default ``<root>/report``.
        wandb: also log a summary run to W&B.
        project: W&B project; default the runs' ``logger.wandb.project`` or ``ggda``.

    Returns:
        ``{"runs": DataFrame, "summary": DataFrame, "files": {name: Path}, "unfinished":
        [Path]}``.
    """
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    df, unfinished = collect(root)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(df)
    files: dict[str, Path] = {}
    files["runs.csv"] = out / "runs.csv"
    atomic_write_bytes(files["runs.csv"], df.to_csv(index=False).encode())
    files["summary.csv"] = out / "summary.csv"
    atomic_write_bytes(files["summary.csv"], summary.to_csv(index=False).encode())
    figures = {
        name: _save_fig(fn(df), out / f"{name}.png")
        for name, (fn, wanted) in FIGURES.items()
        if wanted(df)
    }
    for name in FIGURES:  # a stale figure of an earlier report of the same directory
        if name not in figures:
            (out / f"{name}.png").unlink(missing_ok=True)
    files |= {f"{n}.png": p for n, p in figures.items()}
    best = choose_best(summary)
    files["report.md"] = out / "report.md"
    atomic_write_bytes(
        files["report.md"], _markdown(root, df, summary, unfinished, figures, best).encode()
    )
    if unfinished:
        log.warning(
            "%d unfinished runs skipped (no metrics.json), e.g. %s", len(unfinished), unfinished[0]
        )
    if not df["has_baseline"].any():
        log.warning("Speedups: %s.", NO_BASELINE)
    result: dict[str, Any] = {
        "runs": df,
        "summary": summary,
        "files": files,
        "unfinished": unfinished,
        "best": best,
    }
    if wandb:
        sweeps = sorted(df["sweep_name"].dropna().astype(str).unique())
        group = sweeps[0] if len(sweeps) == 1 else root.name
        projects = df["wandb_project"].dropna().unique()
        proj = project or (str(projects[0]) if len(projects) else "ggda")
        result["wandb_dir"] = log_to_wandb(df, summary, figures, out, proj, group, root, best)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line ``python -m ggda.report ROOT [--out DIR] [--wandb] [--project P]``.

    Prints the summary table and the files written.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 after printing a ggda error.
    """
    parser = argparse.ArgumentParser(
        prog="python -m ggda.report",
        description="Tables and figures of a ggda sweep: LDS, time and speedup vs k, and "
        "the fidelity-speed frontier.",
    )
    parser.add_argument("root", help="sweep directory (outputs/multirun/NAME) or outputs dir")
    parser.add_argument("--out", default=None, help="output directory (default ROOT/report)")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log a W&B summary run (offline unless WANDB_MODE=online)",
    )
    parser.add_argument("--project", default=None, help="W&B project (default from the runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        res = report(args.root, args.out, wandb=args.wandb, project=args.project)
    except GGDAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = res["summary"]
    shown = [
        c
        for c in [
            *BASE,
            "variant",
            "k",
            "runs",
            LDS["point"],
            LDS["group"],
            T_BOTH,
            "speedup/with_grouping",
        ]
        if c in s
    ]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(s[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n{len(res['runs'])} runs; wrote:")
    for p in res["files"].values():
        print(f"  {p}")
    if "wandb_dir" in res:
        print(f"  W&B run: {res['wandb_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
