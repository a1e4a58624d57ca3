"""Per-sample versus group attribution, per stage, on one model, data set and checkpoints.

    python benchmarks/attribution.py --out docs/results/benchmark

Trains (or loads from ``--cache``) the MNIST 5k MLP (784-128-10, 4,000 training points,
3 epochs, a checkpoint per epoch), then in one process times, for TracIn, influence
functions and TRAK, the per-sample run (singleton grouping, k = n) against group runs at
k = n/10, n/100, n/1000 (random equal-size groups), stage by stage (the methods' own
timings: query gradients, group gradients / features, inverse-HVP / kernel solve,
scoring), with one training epoch as the unit and the peak memory of each run. It also
times the bare group-gradient pass per checkpoint (no scoring) for each backend and k,
and ggda's factorised per-sample TracIn (``per_sample_inner_products``).

Writes ``<out>.csv`` (one row per run and stage) and ``<out>.md`` (ratios and the
targets, each marked met or missed and by how much).
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import torch

from ggda.attribution.base import AttributionTask, Checkpoint
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.properties import PropertyExamples
from ggda.attribution.tracin import TracIn
from ggda.attribution.trak import TRAK
from ggda.gradients import iter_group_gradients, per_sample_inner_products
from ggda.grouping.base import Grouping
from ggda.models.functional import neg_loss, per_example_loss
from ggda.models.nets import MLP

# ---------------------------------------------------------------------------------------
# measuring


class PeakMemory:
    """Peak memory above the level at entry, in MiB, while the block runs.

    CPU: the process's resident set size, sampled every ``every`` seconds from
    /proc/self/statm by a thread (torch's allocations are invisible to tracemalloc).
    CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
    """

    def __init__(self, device: torch.device, every: float = 0.002) -> None:
        self.device = device
        self.every = every
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: ru_maxrss is a lifetime peak, the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
            return self
        self._base = self._max = self.rss_mb()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self.rss_mb())
                time.sleep(self.every)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self.rss_mb())
        self.peak_mb = self._max - self._base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------
# problem


def mnist5k(n_train: int, n_queries: int) -> tuple[torch.Tensor, ...]:
    """MNIST 5k through the library: train (n, 1, 28, 28), queries from the test split."""
    from ggda.data.bundled import MNIST5k

    num_test = max(500, n_queries)
    b = MNIST5k(num_train=n_train, num_val=5000 - n_train - num_test, num_test=num_test).load()
    qi = torch.arange(n_queries)
    return b.x_train, b.y_train, b.x_test[qi], b.y_test[qi]


def synthetic(n_train: int, n_queries: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """MNIST-shaped Gaussian class blobs (for n beyond the 5k images)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train + n_queries,), generator=g)
    x = means[y] + 2.0 * torch.randn(n_train + n_queries, 1, 28, 28, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    device: torch.device,
    hidden: int = 128,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[torch.nn.Module, list[Checkpoint], list[float]]:
    """SGD (momentum 0.9) as ``ggda.models.training.train_lean``, a checkpoint per epoch.

    Returns the net (eval mode), the checkpoints and each epoch's wall time (the unit).
    """
    torch.manual_seed(seed)
    net = MLP(tuple(x.shape[1:]), 10, hidden=[hidden]).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x, y = x.to(device), y.to(device)
    cks, times = [], []
    for epoch in range(1, epochs + 1):
        net.train()
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(len(y), generator=g).to(device)
        for s in range(0, len(y), batch_size):
            idx = perm[s : s + batch_size]
            loss = per_example_loss(net(x[idx]), y[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        cks.append(Checkpoint(state_dict=sd, lr=lr, epoch=epoch))
    return net.eval(), cks, times


def random_grouping(n: int, k: int, seed: int = 0) -> Grouping:
    """k equal-size random groups (k = n: singletons in identity order)."""
    if k == n:
        return Grouping(torch.arange(n), n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ids = torch.empty(n, dtype=torch.long)
    ids[perm] = torch.arange(n) % k
    return Grouping(ids, k)


def point_queries(qx: torch.Tensor, qy: torch.Tensor, measurement: str) -> PropertyExamples:
    m = len(qy)
    return PropertyExamples(qx, qy, torch.arange(m), m, torch.ones(m), measurement)


def methods(backend: str, args: argparse.Namespace) -> dict[str, object]:
    """The three methods as configured for the benchmark (see the module docstring)."""
    return {
        "tracin": TracIn(checkpoints="all", backend=backend),
        "influence": InfluenceFunction(
            solver=args.if_solver,
            damping=0.001,
            iterations=args.if_iterations,
            last_layer=not args.if_full,
            backend=backend,
        ),
        "trak": TRAK(proj_dim=args.proj_dim, kernel="groups", checkpoints="all", backend=backend),
    }


# ---------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "load_before": load_avg(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if args.data == "mnist5k":
        x, y, qx, qy = mnist5k(args.n, args.queries)
    else:
        x, y, qx, qy = synthetic(args.n, args.queries)
    n = len(y)
    net, cks, epoch_times = train(x, y, args.epochs, device)
    epoch = min(epoch_times)  # least disturbed epoch of a loaded machine
    meta |= {"n": n, "queries": len(qy), "epochs": args.epochs, "epoch_s": epoch}
    meta["num_params"] = sum(p.numel() for p in net.parameters())
    rows: list[dict] = []

    def add(**r) -> None:
        r.setdefault("epochs_equiv", r["seconds"] / epoch)
        rows.append(r)
        print(
            f"{r['method']:>18} {r['backend']:>9} k={r['k']:>5} {r['stage']:>18} "
            f"{r['seconds']:9.3f}s {r['epochs_equiv']:8.2f} ep  mem {r.get('peak_mb', 0):8.1f} MiB",
            flush=True,
        )

    ks = [n] + [max(1, n // d) for d in (10, 100, 1000)]

    # 1. the bare group-gradient pass, last checkpoint (target: <= 1.5 epochs)
    net.load_state_dict(cks[-1].state_dict)
    for backend in args.backends:
        for k in ks:
            gr = random_grouping(n, k)
            sync(device)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                for _, g in iter_group_gradients(
                    net, x, y, gr.group_ids, k, per_example_loss, backend=backend
                ):
                    del g
                sync(device)
                dt = time.perf_counter() - t0
            add(method="gradient_pass", backend=backend, k=k, stage="pass", seconds=dt,
                peak_mb=mem.peak_mb)  # fmt: skip

    # 2. full methods, per stage
    refs: dict[int, torch.Tensor] = {}
    for backend in args.backends:
        for name, method in methods(backend, args).items():
            if name not in args.methods:
                continue
            measurement = "margin" if name == "trak" else "loss"
            for k in ks:
                if k == n and backend not in args.per_sample_backends:
                    continue
                task = AttributionTask(
                    net=net,
                    checkpoints=cks,
                    x_train=x,
                    y_train=y,
                    grouping=random_grouping(n, k),
                    queries=point_queries(qx, qy, measurement),
                    device=device,
                )
                sync(device)
                with PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    res = method.attribute(task)  # type: ignore[attr-defined]
                    sync(device)
                    total = time.perf_counter() - t0
                for stage, sec in res.timings.items():
                    add(method=name, backend=backend, k=k, stage=stage, seconds=sec)
                add(method=name, backend=backend, k=k, stage="total", seconds=total,
                    peak_mb=mem.peak_mb)  # fmt: skip
                if name == "tracin":
                    refs[k] = res.scores

    # 3. ggda's factorised TracIn (ghost inner products, then the segment sum over groups):
    # no per-sample or group gradient is materialised; what tracin.py could call.
    if "tracin" in args.methods:
        errs = []
        for k in ks:
            gr = random_grouping(n, k)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                scores = None
                for ck in cks:
                    net.load_state_dict(ck.state_dict)
                    s = -ck.lr * per_sample_inner_products(
                        net, x, y, per_example_loss, qx, qy, neg_loss, group_ids=gr.group_ids, k=k
                    )
                    scores = s if scores is None else scores + s
                sync(device)
                total = time.perf_counter() - t0
            ref = refs[k].to(scores)
            errs.append(float((scores - ref).abs().max() / ref.abs().max()))
            add(method="tracin_ghost", backend="factored", k=k, stage="total", seconds=total,
                peak_mb=mem.peak_mb)  # fmt: skip
        meta["ghost_rel_err"] = max(errs)
    meta["load_after"] = load_avg()
    return rows, meta


# ---------------------------------------------------------------------------------------
# report


def write(rows: list[dict], meta: dict, out: Path, args: argparse.Namespace) -> None:
    import csv

    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["method", "backend", "k", "stage", "seconds", "epochs_equiv", "peak_mb"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in keys})

    n = meta["n"]
    ks = [n] + [max(1, n // d) for d in (10, 100, 1000)]
    get = {(r["method"], r["backend"], r["k"], r["stage"]): r for r in rows}

    def sec(m, b, k, s="total"):
        r = get.get((m, b, k, s))
        return None if r is None else r["seconds"]

    def mem(m, b, k, s="total"):
        r = get.get((m, b, k, s))
        return None if r is None else r.get("peak_mb")

    L = [
        "# Attribution benchmark: per-sample versus group",
        "",
        f"Command: `python benchmarks/attribution.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"- Data: {args.data}, n = {n} training points, {meta['queries']} query points; "
        f"MLP 784-128-10 ({meta['num_params']:,} parameters), {meta['epochs']} checkpoints "
        "(one per epoch).",
        f"- Machine: {meta['device']}, {meta['cpus']} CPUs, torch threads "
        f"{meta['threads']}, torch {meta['torch']}, Python {meta['python']}.",
        f"- Load average (1/5/15 min) before: {meta['load_before']}, after: "
        f"{meta['load_after']}. The machine is shared: treat absolute times as upper bounds.",
        f"- Unit: one training epoch (SGD, batch 64, forward+backward+step over n points) "
        f"= {meta['epoch_s']:.3f} s (fastest of the {meta['epochs']} epochs).",
        "- Groups: random, equal size; k = n is the per-sample baseline (singleton groups). "
        "TracIn: 3 checkpoints, exact gradients; IF: final checkpoint, "
        f"{'all parameters' if args.if_full else 'head only'}, solver {args.if_solver}; "
        f"TRAK: 3 checkpoints, proj_dim {args.proj_dim}, `kernel: groups`.",
        "",
        "## Group-gradient pass per checkpoint (no scoring), in epochs",
        "",
        "| backend | " + " | ".join(f"k = {k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for b in args.backends:
        cells = []
        for k in ks:
            s = sec("gradient_pass", b, k, "pass")
            mb = mem("gradient_pass", b, k, "pass") or 0
            cells.append(
                f"{s:.3f} s ({s / meta['epoch_s']:.2f} ep, {mb:.0f} MiB)" if s is not None else "-"
            )
        L.append(f"| {b} | " + " | ".join(cells) + " |")
    L += ["", "## Methods: total time, speed-up over per-sample, peak memory", ""]
    L += [
        "| method | backend | k | total s | epochs | speed-up vs per-sample (vmap) | "
        "peak MiB | stages (s) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    base_b = "vmap" if "vmap" in args.backends else args.backends[0]
    for m in args.methods:
        base = sec(m, base_b, n)
        for b in args.backends:
            for k in ks:
                t = sec(m, b, k)
                if t is None:
                    continue
                stages = ", ".join(
                    f"{r['stage']} {r['seconds']:.2f}"
                    for r in rows
                    if r["method"] == m and r["backend"] == b and r["k"] == k
                    and r["stage"] != "total"
                )  # fmt: skip
                L.append(
                    f"| {m} | {b} | {k} | {t:.2f} | {t / meta['epoch_s']:.1f} | "
                    f"{base / t:.1f}x | {mem(m, b, k) or 0:.0f} | {stages} |"
                )
    tg = sec("tracin_ghost", "factored", n)
    for k in ks:
        t = sec("tracin_ghost", "factored", k)
        if t is None:
            continue
        L.append(
            f"| tracin (factorised inner products) | factored | {k} | {t:.2f} | "
            f"{t / meta['epoch_s']:.1f} | {sec('tracin', base_b, n) / t:.1f}x | "
            f"{mem('tracin_ghost', 'factored', k) or 0:.0f} | max rel. difference to the "
            f"vmap scores {meta['ghost_rel_err']:.1e} |"
        )

    # targets
    L += ["", "## Targets", ""]
    best_b = "factored" if "factored" in args.backends else base_b
    k100 = max(1, n // 100)
    for m, need in (("tracin", 50), ("trak", 50), ("influence", 10)):
        if m not in args.methods or sec(m, base_b, n) is None:
            continue
        ratio = sec(m, base_b, n) / sec(m, best_b, k100)
        verdict = "met" if ratio >= need else f"MISSED by {need / ratio:.1f}x"
        L.append(
            f"- {m}: k = n/100 ({best_b}) vs per-sample ({base_b}): {ratio:.1f}x, "
            f"target >= {need}x: **{verdict}**."
        )
        if m == "tracin" and tg is not None:
            r2 = tg / sec(m, best_b, k100)
            L.append(
                f"  - against ggda's fastest per-sample TracIn (factorised inner products, "
                f"{tg:.2f} s) the group run at k = n/100 is {r2:.2f}x as fast"
                + (" (slower: see the notes)." if r2 < 1 else ".")
            )
            tk = sec("tracin_ghost", "factored", k100)
            L.append(
                f"  - factorised TracIn at k = n/100 ({tk:.2f} s) vs per-sample ({base_b}): "
                f"{sec(m, base_b, n) / tk:.1f}x."
            )
    for k in ks[1:]:
        s = sec("gradient_pass", best_b, k, "pass")
        if s is None:
            continue
        e = s / meta["epoch_s"]
        verdict = "met" if e <= 1.5 else f"MISSED by {e / 1.5:.1f}x"
        L.append(
            f"- group-gradient pass at k = {k} ({best_b}): {e:.2f} epochs per checkpoint, "
            f"target <= 1.5: **{verdict}**."
        )
    L.append(
        "- per-sample path versus dattri and memory versus n: see `benchmark_dattri.md` and "
        "`benchmark_scaling.md`."
    )
    L += [
        "",
        "## Notes",
        "",
        "- `factored` is the fast path of `ggda.gradients` (one batched",
        "  forward/backward per chunk, per-layer segment sums g^T a written in place); `vmap`",
        "  is `vmap(grad)` over padded groups. Both give the same numbers (tests).",
        "- The factorised TracIn rows use `per_sample_inner_products`: per Linear layer",
        "  <g_i a_i^T, g_q a_q^T> = (g_i . g_q)(a_i . a_q), so no per-sample or group gradient",
        "  exists and the cost, n m (in + out) per layer, does not depend on k. On an MLP this",
        "  makes *per-sample* TracIn about as cheap as a training epoch, so there grouping",
        "  no longer buys TracIn much; grouping still pays where the cost is per group",
        "  (projections, TRAK's kernel, IF's train side, non-Linear layers).",
        "- IF's inverse-HVP (here the dense head Hessian) is paid once whatever k is, so",
        "  its speed-up is bounded by (per-sample total) / (inverse-HVP time).",
        "- TRAK at small k is dominated by generating the p x d random projection (once per",
        "  model, about 1 s here for 101,770 x 512) and by the query-side features.",
    ]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/benchmark", help="output stem (.csv, .md)")
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic"])
    p.add_argument("--n", type=int, default=4000, help="training points")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3, help="epochs = checkpoints")
    p.add_argument("--methods", default="tracin,influence,trak")
    p.add_argument("--backends", default="vmap,factored")
    p.add_argument(
        "--per-sample-backends",
        default="vmap",
        help="backends of the per-sample (k = n) method runs (the baseline; the bare pass "
        "table covers every backend)",
    )
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--if-solver", default="explicit", choices=["explicit", "cg", "lissa"])
    p.add_argument("--if-iterations", type=int, default=100)
    p.add_argument("--if-full", action="store_true", help="IF on all parameters (use cg)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = p.parse_args(argv)
    a.methods = a.methods.split(",")
    a.backends = a.backends.split(",")
    a.per_sample_backends = a.per_sample_backends.split(",")
    return a


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    rows, meta = run(args)
    write(rows, meta, Path(args.out), args)


if __name__ == "__main__":
    main()
