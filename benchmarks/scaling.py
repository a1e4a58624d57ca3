"""How time and memory grow with n: per-sample versus grouped TracIn.

    python benchmarks/scaling.py --out docs/results/benchmark_scaling

MNIST-shaped synthetic data (10 Gaussian class blobs, 1 x 28 x 28), the 784-128-10 MLP
trained one epoch (one checkpoint), ``--queries`` query points. For each n in ``--ns``
(default 1k to 60k) it times, with the peak memory above the level before the run (the
data and model already in memory):

- ``per_sample_vmap``: TracIn with singleton groups through the vmap path (materialises
  chunk x p per-sample gradients, the classic baseline);
- ``per_sample_factorised``: ggda's factorised per-sample TracIn (no per-sample gradient);
- ``group_n/100``: TracIn at k = n/100, ``factored`` backend;
- ``epoch``: one training epoch (the unit).

Writes ``<out>.csv``, ``<out>.md`` and ``<out>.png`` (log-log time and memory versus n).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import (
    PeakMemory,
    load_avg,
    point_queries,
    random_grouping,
    sync,
    synthetic,
    train,
)

from ggda.attribution.base import AttributionTask
from ggda.attribution.tracin import TracIn
from ggda.gradients import per_sample_inner_products
from ggda.models.functional import neg_loss, per_example_loss


def measure(n: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    x, y, qx, qy = synthetic(n, args.queries, seed=1)
    net, cks, times = train(x, y, 1, device)
    rows = [{"n": n, "variant": "epoch", "seconds": times[0], "peak_mb": float("nan")}]
    q = point_queries(qx, qy, "loss")

    def tracin(k: int, backend: str) -> tuple[float, float]:
        task = AttributionTask(net, cks, x, y, random_grouping(n, k), q, device=device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            TracIn(backend=backend).attribute(task)
            sync(device)
            dt = time.perf_counter() - t0
        return dt, mem.peak_mb

    variants = {"group_n/100": lambda: tracin(max(1, n // 100), "factored")}
    if n <= args.max_vmap_n:
        variants["per_sample_vmap"] = lambda: tracin(n, "vmap")

    def ghost() -> tuple[float, float]:
        net.load_state_dict(cks[0].state_dict)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            per_sample_inner_products(net, x, y, per_example_loss, qx, qy, neg_loss)
            sync(device)
            dt = time.perf_counter() - t0
        return dt, mem.peak_mb

    variants["per_sample_factorised"] = ghost
    for name, fn in variants.items():
        dt, mb = fn()
        rows.append({"n": n, "variant": name, "seconds": dt, "peak_mb": mb})
        print(f"n={n:>6} {name:>22} {dt:9.3f}s {mb:8.1f} MiB", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = ["per_sample_vmap", "per_sample_factorised", "group_n/100", "epoch"]
    for name in names:
        pts = [r for r in rows if r["variant"] == name]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        axes[0].plot(ns, [r["seconds"] for r in pts], "o-", label=name)
        if name != "epoch":
            axes[1].plot(ns, [max(r["peak_mb"], 0.1) for r in pts], "o-", label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="training points n", ylabel="time (s)")
    axes[0].set_title("TracIn, 1 checkpoint: time")
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="training points n",
        ylabel="peak memory above data (MiB)",
    )
    axes[1].set_title("TracIn, 1 checkpoint: peak memory")
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/benchmark_scaling")
    p.add_argument("--ns", default="1000,2000,5000,10000,20000,60000")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--max-vmap-n", type=int, default=60000, help="skip per-sample vmap above")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    before = load_avg()
    rows: list[dict] = []
    for n in [int(v) for v in args.ns.split(",")]:
        rows += measure(n, args, device)
    after = load_avg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["n", "variant", "seconds", "peak_mb"])
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    ns = sorted({r["n"] for r in rows})
    names = ["epoch", "per_sample_vmap", "per_sample_factorised", "group_n/100"]
    get = {(r["n"], r["variant"]): r for r in rows}
    L = [
        "# Scaling in n: per-sample versus grouped TracIn",
        "",
        f"Command: `python benchmarks/scaling.py {' '.join(sys.argv[1:] if argv is None else argv)}`",  # noqa: E501
        "",
        f"MNIST-shaped synthetic data, MLP 784-128-10, 1 checkpoint, {args.queries} queries; "
        f"device {device}, torch threads {torch.get_num_threads()}. Load average before: "
        f"{before}, after: {after} (shared machine: absolute times are upper bounds). "
        "Memory: peak RSS above the level before the run (data and model already loaded).",
        "",
        "| n | " + " | ".join(f"{v} s (MiB)" for v in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for n in ns:
        cells = []
        for v in names:
            r = get.get((n, v))
            if r is None:
                cells.append("-")
            elif v == "epoch":
                cells.append(f"{r['seconds']:.2f}")
            else:
                cells.append(f"{r['seconds']:.2f} ({r['peak_mb']:.0f})")
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    grp = [get[(n, "group_n/100")]["peak_mb"] for n in ns if (n, "group_n/100") in get]
    data_mb = max(ns) * 784 * 4 / 2**20
    L += [
        "",
        f"Grouped peak memory over n = {ns[0]}..{ns[-1]}: {min(grp):.0f} to {max(grp):.0f} MiB "
        f"(the largest data set itself is {data_mb:.0f} MiB); target: independent of n beyond "
        "the data: **"
        + ("met" if max(grp) - min(grp) < 0.25 * data_mb + 50 else "check the table")
        + "**.",
        "",
        "Per-sample (vmap) memory is flat as well because that path streams chunks of at most "
        "`max_elems` gradient entries (never n x p); its time is what grows. 0 MiB means "
        "below what RSS sampling resolves (buffers reused from the allocator); the plot "
        "clamps it to 0.1 MiB for the log scale.",
        "",
        f"![scaling]({out.with_suffix('.png').name})",
    ]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
