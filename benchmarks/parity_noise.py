"""How much of an LDS gap is ground-truth noise: LDS against retrains averaged per subset.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/parity_noise.py     # writes docs/results/parity_noise.md

``benchmarks/parity.py`` measures each LDS subset with one retrain, so the "true" output
change it correlates with carries the retrain's own seed noise (SGD order, dropout).
This reruns the logistic-regression per-sample rows of parity.md on the same models and
the same 50 alpha = 0.5 subsets, with the subset's measurement averaged over R = 1, 2, 5
retrains of distinct seeds (``LDS(repeats=R)``); R = 1 is parity.md's value. Models and
retrains are the parity run's cache (``--cache``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parity as P


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--damping", type=float, default=0.1, help="IF damping (parity's best)")
    ap.add_argument("--cache", default=str(P.ROOT / "outputs" / "parity"))
    ap.add_argument("--out", default=str(P.ROOT / "docs" / "results" / "parity_noise.md"))
    args = ap.parse_args()
    P.pipeline.configure_threads()
    load0 = P.uptime()
    t0 = time.perf_counter()
    bundle = P.MNIST5k(num_train=4490, num_val=10, num_test=500, num_queries=100).load()
    prop = P.QueryProperty(measurement="loss")
    recipe, key = P.recipe_of(P.MODELS["lr"])
    cache = Path(args.cache)
    base = P.train_checkpoints(recipe, bundle, 0, cache, key)
    net = recipe.build_net(bundle.input_shape, bundle.num_classes)
    net.load_state_dict(base[-1].state_dict)
    members: dict = {}

    def ensemble(count: int, fraction: float = 1.0):
        for s in range(1, count + 1):
            if (s, fraction) not in members:
                members[s, fraction] = P.train_checkpoints(recipe, bundle, s, cache, key, fraction)
        return [members[s, fraction] for s in range(1, count + 1)]

    svc = P.RetrainService(cache, backend="sequential").bind(recipe, bundle, f"parity-lr-{key}")
    n = bundle.n_train
    gr = P.Grouping(torch.arange(n), n)
    task = P._task(net, base, bundle, gr, prop.examples(bundle), ensemble, svc, prop)
    methods = P.methods("lr", [10], 10, {"cg": args.damping, "explicit": args.damping})
    ensemble(10, 0.5)  # TRAK-10's members, trained outside the attribution
    rows = []
    for name, method in methods.items():
        scores = method.attribute(task).scores
        vals = []
        for r in args.repeats:
            lds = P.LDS(levels=["point"], num_subsets=50, alpha=0.5, repeats=r)
            ev = lds.evaluate(P.EvalContext(bundle, gr, scores, prop, svc))
            vals.append(ev.metrics["point/mean"])
            print(f"[lr] {name} repeats {r}: LDS {vals[-1]:.3f}", flush=True)
        rows.append((name, P.REFERENCE.get(("lr", name)), vals))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=P.ROOT
    ).stdout.strip()
    head = " | ".join(f"R = {r}" for r in args.repeats)
    lines = [
        "# LDS against averaged retrains: how much of a gap is ground-truth noise",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
        f"benchmarks/parity_noise.py {' '.join(sys.argv[1:])}` at commit {commit} "
        f"({(time.perf_counter() - t0) / 60:.1f} min).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"{load0} at the start, {P.uptime()} at the end.",
        "",
        "Logistic regression, parity.md's models, 100 queries and 50 subsets of alpha = 0.5; "
        "each subset's measurement (the queries' losses) averaged over R retrains of "
        f"distinct seeds. IF at damping {args.damping:g} (parity's best), CG with 10 steps, "
        "TRAK-10 with dattri's recipe. R = 1 is parity.md's protocol.",
        "",
        f"| method | dattri | {head} |",
        "|---|---|" + "---|" * len(args.repeats),
    ]
    for name, ref, vals in rows:
        cells = " | ".join(f"{v:.3f}" for v in vals)
        lines.append(f"| {name} | {'' if ref is None else f'{ref:.3f}'} | {cells} |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
