"""Per-sample versus group attribution, per method: time and point-level LDS, one run.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python benchmarks/methods.py                 # default MNIST 5k setup
    python benchmarks/methods.py --quick                            # seconds (synthetic data)

For each method (tracin, influence, trak) and each k in {n (singleton), n/10, n/100}
(Grad-K-Means groups, the default grouping), the script runs the ordinary pipeline
(``ggda.pipeline.run`` on a Hydra-composed config: the cached base model, grouping,
attribution, point-level LDS) and collects from its metrics the attribution time, the
grouping time and the point-level LDS. The point-level LDS retrains depend only on the data,
the recipe and the LDS seed, so the first job trains them and every other job reuses them
from the cache: every row is scored against the same retrained models. TRAK is also run with
``kernel=points`` at group level (faithful kernel, O(n) features) beside the default
``kernel=groups``.

Writes ``docs/results/methods.md`` and ``docs/results/methods.csv`` (``--out`` to change).
Timings are wall-clock seconds on whatever machine runs the script; they are only comparable
within one run of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggda import pipeline, stages  # noqa: E402
from ggda.attribution.base import AttributionTask  # noqa: E402
from ggda.grouping.base import GroupingInputs  # noqa: E402

METHODS = ("tracin", "influence", "trak")


def jobs(n: int) -> list[tuple[str, str, int, list[str]]]:
    """(method, variant, k, extra overrides) for every row of the table."""
    out = []
    ks = [n, max(2, n // 10), max(2, n // 100)]
    for method in METHODS:
        for k in ks:
            grouping = ["grouping=singleton"] if k == n else ["grouping=grad_kmeans", f"groups={k}"]
            out.append((method, "default", k, grouping))
        if method == "trak":
            for k in ks[1:]:
                out.append(
                    (
                        method,
                        "kernel=points",
                        k,
                        ["grouping=grad_kmeans", f"groups={k}", "method.kernel=points"],
                    )
                )
    return out


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def time_attribution(cfg, repeats: int) -> tuple[float, float]:
    """Re-time the run's attribution alone: (min wall seconds, min CPU seconds) of repeats.

    The grouping stage (``ggda.stages.group``) returns the grouping the run cached; the
    attribution stage is then called without a cache, so every repeat recomputes the
    scores. CPU time (all threads of this process) is less sensitive than wall time to
    other jobs on a shared machine.
    """
    bundle = pipeline.load_data(cfg)  # with the data fingerprint the cache keys need
    recipe = pipeline.build_recipe(cfg.model)
    grouper, method, prop = (pipeline.build(c) for c in (cfg.grouping, cfg.method, cfg.property))
    keys = pipeline.cache_keys(
        cfg,
        grouper.config(),
        grouper.uses_model,
        method.config(),
        vars(prop),
        bundle.meta["fingerprint"],
    )
    checkpoints = pipeline.model_store(cfg, keys, int(cfg.seed), recipe).checkpoints()
    net = recipe.build_net(bundle.input_shape, bundle.num_classes)
    net.load_state_dict(checkpoints[-1].state_dict)
    cache = stages.ArtifactCache(Path(cfg.paths.cache_dir), keys["data"], keys["model"])
    inputs = GroupingInputs(bundle.x_train, bundle.y_train, bundle.num_classes, net.eval())
    grouped = stages.group(grouper, inputs, cache)
    if not grouped.cached:
        raise RuntimeError(f"the run did not cache its grouping under {cache.dir}")
    task = AttributionTask(
        net=net,
        checkpoints=checkpoints,
        x_train=bundle.x_train,
        y_train=bundle.y_train,
        grouping=grouped.grouping,
        queries=prop.examples(bundle),
    )
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        stages.attribute(method, task)  # no cache: computed every time
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="synthetic smoke setup (seconds)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="output folder")
    ap.add_argument(
        "--output-dir",
        default=os.environ.get("GGDA_OUTPUT_DIR", str(ROOT / "outputs")),
        help="run/cache root (the shared cache lives under it)",
    )
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets M")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per row (min)")
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the markdown from the saved CSV"
    )
    args = ap.parse_args()
    pipeline.configure_threads()

    base = ["logger=none", "overwrite=true", f"paths.output_dir={args.output_dir}"]
    base += [
        "evaluation=lds",
        "evaluation.lds.levels=[point]",
        f"evaluation.lds.num_subsets={args.subsets}",
    ]
    if args.quick:
        base += ["experiment=smoke"]
    n = int(compose_cfg(base).dataset.num_train)

    out = Path(args.out)
    name = "methods_quick" if args.quick else "methods"
    if args.render:
        write_markdown(pd.read_csv(out / f"{name}.csv"), out / f"{name}.md", args, base, n)
        return
    rows = []
    for method, variant, k, extra in jobs(n):
        cfg = compose_cfg([*base, f"method={method}", *extra])
        print(f"== {method} ({variant}) k={k}", flush=True)
        t0 = time.perf_counter()
        m = pipeline.run(cfg)
        wall, cpu = time_attribution(cfg, args.repeats)
        rows.append(
            {
                "method": method,
                "variant": variant,
                "k": k,
                "grouping": "singleton" if k == n else "grad_kmeans",
                "attribution_s": m.get("time/attribution"),
                "attribution_wall_min_s": wall,
                "attribution_cpu_s": cpu,
                "grouping_s": m.get("time/grouping"),
                "lds_point_mean": m.get("lds/point/mean"),
                "lds_point_std": m.get("lds/point/std"),
                "lds_point_nan": m.get("lds/point/nan_count"),
                "job_wall_s": time.perf_counter() - t0,
            }
        )
        print(rows[-1], flush=True)

    df = pd.DataFrame(rows)
    ps = df[df.k == n].set_index("method")
    df["speedup_wall"] = [
        ps.attribution_wall_min_s[r.method] / r.attribution_wall_min_s for r in df.itertuples()
    ]
    df["speedup_cpu"] = [
        ps.attribution_cpu_s[r.method] / r.attribution_cpu_s for r in df.itertuples()
    ]
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=False)
    print(write_markdown(df, out / f"{name}.md", args, base, n))


def write_markdown(df: pd.DataFrame, path: Path, args: argparse.Namespace, base, n: int) -> str:
    """Write the results table with the setup it was measured on; return the table."""
    cfg = compose_cfg(base)
    header = [
        "# Per-sample vs group attribution: time and point-level LDS",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
        f"benchmarks/methods.py{' --quick' if args.quick else ''}` "
        f"(dataset `{cfg.dataset.name}`, n = {n} training points, model `{cfg.model.name}`, "
        f"{cfg.dataset.get('num_queries', '?')} query test points, f = -loss; "
        f"point-level LDS over {args.subsets} half-size subsets, 1 retrain each, the same "
        "retrained models for every row).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. **The machine was shared "
        "with other jobs while this ran, so the timings are noisy; compare ratios within "
        "the table, not absolute seconds across machines.**",
        "",
        "Method settings are the defaults of `conf/method/*.yaml`: TracIn over all 3 saved "
        "checkpoints, exact gradients; influence functions on the head (last layer, "
        "explicit damped Hessian); TRAK with a 512-d Rademacher projection of all "
        "parameters, one model. Group rows use Grad-K-Means (grouping time listed "
        "separately; it is not in the attribution time). `attribution_s` is the pipeline's "
        "own timing of the run; `attribution_wall_min_s` and `attribution_cpu_s` re-time "
        "the method alone (min of --repeats calls; CPU time of all this process's threads, "
        "the less load-sensitive number). `speedup_*` = the k = n value / the row's value, "
        "same method.",
        "",
        "Point-level LDS broadcasts group scores with `share` (every member of a group gets "
        "tau_j / |G_j|), so a group row ranks n points with only k distinct values: it is "
        "expected to fall as k shrinks; group-level LDS (not measured here) is the fidelity "
        "measure of the group scores themselves.",
        "",
        "",
    ]
    table = df.copy()
    for c in (
        "attribution_s",
        "attribution_wall_min_s",
        "attribution_cpu_s",
        "grouping_s",
        "job_wall_s",
    ):
        table[c] = table[c].map(lambda v: f"{v:.2f}")
    for c in ("lds_point_mean", "lds_point_std"):
        table[c] = table[c].map(lambda v: f"{v:.3f}")
    for c in ("speedup_wall", "speedup_cpu"):
        table[c] = table[c].map(lambda v: f"{v:.1f}x")
    path.write_text("\n".join(header) + markdown(table) + "\n")
    return markdown(table)


if __name__ == "__main__":
    main()
