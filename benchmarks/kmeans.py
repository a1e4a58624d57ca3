"""K-means grouping speed, and the attribution time a grouping saves.

    OMP_NUM_THREADS=2 python benchmarks/kmeans.py > docs/results/kmeans.md

Part 1: K-means on n x f synthetic features (default 50,000 x 256, a mixture of 2,000
Gaussian blobs, so that the clustering has structure) into k = 1,000 groups with the
grouping's defaults (batched k-means++, at most 50 Lloyd iterations, tol 1e-4), free and
balanced; beside it the exact sequential k-means++ seeding the batched one replaces.
Part 2: the default MNIST 5k MLP (trained here with the lean loop, one checkpoint):
Grad-K-Means grouping time (features + clustering) beside per-sample (k = n) and grouped
TracIn attribution time for the 200 query points.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import torch

from ggda.grouping import kmeans as K

CPU: list[float] = []  # process CPU seconds of each _t call, in order


def _t(fn):
    """(fn(), wall seconds); the process CPU seconds are appended to CPU.

    On a shared, loaded machine the wall time is inflated by waiting for a core; the CPU
    time (all threads) is what the work itself cost, and with one thread it is what the
    wall time would be on a quiet core.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    CPU.append(time.process_time() - c0)
    return out, time.perf_counter() - t0


def inertia(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    counts = torch.bincount(labels, minlength=k).clamp_min(1)[:, None].to(x.dtype)
    c = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts
    return float(((x - c[labels]) ** 2).sum())


def part_kmeans(n: int, dim: int, k: int, seed: int, sequential: bool) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    blobs = torch.randn(2000, dim, generator=g) * 2
    x = blobs[torch.randint(2000, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    rows = []

    c_pp, t_pp = _t(lambda: K.kmeans_pp(x, k, torch.Generator().manual_seed(seed)))
    cpu_pp = CPU[-1]
    seed_cost = float(K.assign(x, c_pp)[1].sum())
    info: dict = {}
    labels, t_all = _t(lambda: K.lloyd(x, k, 50, seed, info=info))
    iters, cpu_all = info["iterations"], CPU[-1]
    info = {}
    lab_b, t_bal = _t(lambda: K.lloyd(x, k, 50, seed, balanced=True, info=info))
    bal_rounds, cpu_bal = info["balanced_rounds"], CPU[-1]
    sizes = torch.bincount(labels, minlength=k)
    sb = torch.bincount(lab_b, minlength=k)
    rows += [
        f"| k-means (free): batched k-means++ + Lloyd | {t_all:.2f} | {cpu_all:.2f} |"
        f" {iters} Lloyd iterations;"
        f" inertia {inertia(x, labels, k):.4g}; sizes min/median/max "
        f"{int(sizes.min())}/{int(sizes.median())}/{int(sizes.max())} |",
        f"| k-means (balanced): + capacity-constrained assignment | {t_bal:.2f} | {cpu_bal:.2f} |"
        f" {bal_rounds} proposal rounds; inertia {inertia(x, lab_b, k):.4g};"
        f" sizes {int(sb.min())}..{int(sb.max())} |",
        f"| of which: batched k-means++ seeding ({K.PP_ROUNDS} rounds) | {t_pp:.2f} |"
        f" {cpu_pp:.2f} |"
        f" seeding cost (sum of D^2) {seed_cost:.4g} |",
    ]
    if sequential:
        c_seq, t_seq = _t(lambda: K.kmeans_pp(x, k, torch.Generator().manual_seed(seed), k))
        seq_cost = float(K.assign(x, c_seq)[1].sum())
        rows.append(
            f"| exact sequential k-means++ seeding ({k} rounds), for comparison | {t_seq:.2f} |"
            f" {CPU[-1]:.2f} |"
            f" seeding cost {seq_cost:.4g} |"
        )
    return rows


def part_mnist(seed: int, ks: list[int]) -> list[str]:
    from ggda.attribution.base import AttributionTask, Checkpoint
    from ggda.attribution.properties import QueryProperty
    from ggda.attribution.tracin import TracIn
    from ggda.data.bundled import MNIST5k
    from ggda.grouping import GroupingInputs, KMeansGrouper, SingletonGrouper
    from ggda.models.nets import MLP
    from ggda.models.training import Recipe, train_lean

    b = MNIST5k(name="mnist5k", num_train=4000, num_val=500, num_test=500, num_queries=200).load()
    recipe = Recipe(functools.partial(MLP, hidden=[128]), epochs=10)  # SGD lr 0.05, momentum 0.9
    net, t_train = _t(lambda: train_lean(recipe, b.x_train, b.y_train, b.num_classes, seed))
    ck = [Checkpoint({k: v.clone() for k, v in net.state_dict().items()}, 0.05, 10)]
    queries = QueryProperty().examples(b)
    rows = []

    def tracin_time(grouping) -> float:
        task = AttributionTask(net, ck, b.x_train, b.y_train, grouping, queries)
        return _t(lambda: TracIn().attribute(task))[1]

    inp = GroupingInputs(b.x_train, b.y_train, b.num_classes, net, "cpu")
    t_single = tracin_time(SingletonGrouper().group(inp))
    rows.append(f"| k = n = {b.n_train} (per-sample) | - | - | {t_single:.2f} | 1.0x |")
    for k in ks:
        gr = KMeansGrouper(k, features="gradients", seed=seed)
        grouping, t_group = _t(lambda gr=gr: gr.group(inp))
        t_attr = tracin_time(grouping)
        rows.append(
            f"| k = {k} (Grad-K-Means) | {gr.timings['grouping_features']:.2f} + "
            f"{gr.timings['clustering']:.2f} | {t_group:.2f} | {t_attr:.2f} | "
            f"{t_single / t_attr:.1f}x ({t_single / (t_attr + t_group):.1f}x with grouping) |"
        )
    return [f"(base model trained in {t_train:.1f} s with the lean loop)", ""] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sequential", action="store_true", help="skip exact k-means++")
    ap.add_argument("--no-mnist", action="store_true", help="skip the TracIn comparison")
    args = ap.parse_args()
    load0 = os.getloadavg()
    print("# K-means grouping benchmark (`python benchmarks/kmeans.py`)\n")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), CPU cores {os.cpu_count()}, "
        f"load average at start {load0[0]:.1f}\n"
    )
    print(f"## K-means on {args.n:,} x {args.dim} features, k = {args.k:,}\n")
    print("| what | wall s | CPU s | notes |\n|---|---:|---:|---|")
    print("\n".join(part_kmeans(args.n, args.dim, args.k, args.seed, not args.no_sequential)))
    if not args.no_mnist:
        print("\n## Grouping time vs the TracIn time it saves (MNIST 5k MLP, 1 checkpoint)\n")
        rows = part_mnist(args.seed, [40, 400])
        print(rows[0] + "\n")
        print(
            "| grouping | features + clustering (s) | grouping total (s) | TracIn (s) |"
            " speedup |\n|---|---:|---:|---:|---|"
        )
        print("\n".join(rows[2:]))
    load1 = os.getloadavg()
    print(f"\nload average at end {load1[0]:.1f} (the machine is shared: see the notes)")


if __name__ == "__main__":
    main()
