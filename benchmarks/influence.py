"""Influence functions that scale: explicit / CG (head) versus K-FAC / EK-FAC (all params).

Usage (from the repository root; one command, parts cached and resumable)::

    OMP_NUM_THREADS=2 python benchmarks/influence.py             # all parts
    python benchmarks/influence.py --parts mlp,noisy --subsets 20

Parts:

- ``mlp``, ``cnn``: point-level LDS and time of IF with ``solver=explicit`` (head),
  ``cg`` (head), ``kfac`` and ``ekfac`` (all parameters, presets ``method=kfac|ekfac``) on
  the MNIST 5k MLP and CNN, per-sample (k = n) and Grad-K-Means k = n/10, n/100. Every row
  is one ordinary pipeline run (``ggda.pipeline.run``); the LDS retrains are shared by all
  rows of a model (cached). K-FAC factors are fitted in the k = n row and loaded from the
  factor cache by the others (``factors_cached``), their time reported apart.
- ``noisy``: noisy-label detection on MNIST 5k with 10 % flipped labels (MLP): EK-FAC
  self-influence beside TracIn's, per-sample and k = n/10 (AUC, recall at 10/20 %).
- ``resnet``: EK-FAC on ResNet-9 (width 16, all 0.4M parameters) on a seeded synthetic
  CIFAR-shaped set generated here (no synthetic image set ships with ggda; 10 classes,
  each a random smooth 3x32x32 template plus noise and a random shift): time per stage
  (factor pass, eigendecompositions, EK-FAC pass, query gradients, preconditioning, group
  gradients) for k = n and k = n/10 (random groups).

Writes ``docs/results/influence.md`` and ``influence_*.csv`` beside it (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ggda import pipeline  # noqa: E402

SOLVERS = {
    "explicit (head)": ["method=influence"],
    "cg (head)": ["method=influence", "method.solver=cg", "method.iterations=10"],
    "kfac (all)": ["method=kfac"],
    "ekfac (all)": ["method=ekfac"],
}
MODELS = {"mlp": [], "cnn": ["experiment=mnist_cnn"]}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def grouping(k: int, n: int, extra: list[str] = ()) -> list[str]:
    if k != n:
        return ["grouping=grad_kmeans", f"groups={k}"]
    # the CNN experiment tunes grad_kmeans (balanced); singleton groups take no such key
    return ["grouping=singleton", *(["~grouping.balanced"] if extra else [])]


def times(m: dict) -> dict:
    """The run's attribution timings (seconds) from its metrics."""
    out = {"attribution_s": m.get("time/attribution")}
    for key, v in m.items():
        if key.startswith("time/attribution/"):
            out[key.split("/", 2)[2] + "_s"] = v
    return out


def lds_part(model: str, base: list[str], args) -> pd.DataFrame:
    rows = []
    extra = MODELS[model]
    n = int(compose_cfg([*base, *extra]).dataset.num_train)
    for k in (n, n // 10, n // 100):
        for solver, over in SOLVERS.items():
            cfg = compose_cfg([*base, *extra, *over, *grouping(k, n, extra)])
            print(f"== {model} {solver} k={k} (load {load()})", flush=True)
            t0 = time.perf_counter()
            m = pipeline.run(cfg)
            rows.append(
                {
                    "model": model,
                    "solver": solver,
                    "k": k,
                    "lds_point": m.get("lds/point/mean"),
                    "lds_point_std": m.get("lds/point/std"),
                    **times(m),
                    "factors_cached": m.get("attribution/factors_cached"),
                    "cg_residual": m.get("attribution/cg_max_rel_residual"),
                    "num_params": m.get("attribution/num_params"),
                    "grouping_s": m.get("time/grouping"),
                    "job_wall_s": time.perf_counter() - t0,
                    "load": load(),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def noisy_part(base: list[str], args) -> pd.DataFrame:
    rows = []
    base = [b for b in base if not b.startswith("evaluation")]
    base += ["evaluation=noisy_labels", "dataset.label_noise=0.1"]
    n = int(compose_cfg(base).dataset.num_train)
    for method, over in {"ekfac (all)": ["method=ekfac"], "tracin": ["method=tracin"]}.items():
        for k in (n, n // 10):
            cfg = compose_cfg([*base, *over, *grouping(k, n)])
            print(f"== noisy {method} k={k} (load {load()})", flush=True)
            m = pipeline.run(cfg)
            get = {key.split("/", 1)[1]: v for key, v in m.items() if key.startswith("noisy")}
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "auc": get.get("auc"),
                    "recall@10%": get.get("recall/0.1"),
                    "recall@20%": get.get("recall/0.2"),
                    "score_s": get.get("score_seconds"),
                    "load": load(),
                }
            )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def synthetic_cifar(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded learnable CIFAR-shaped images (n, 3, 32, 32) and labels (n,), 10 classes.

    Each class is a smooth random template (8x8 noise upsampled); an image is its class
    template, shifted by up to 3 pixels, plus pixel noise.
    """
    g = torch.Generator().manual_seed(seed)
    tmpl = torch.nn.functional.interpolate(
        torch.randn(10, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear"
    )
    y = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    x = torch.stack(
        [
            torch.roll(tmpl[c], (int(s[0]), int(s[1])), (1, 2))
            for c, s in zip(y, shifts, strict=True)
        ]
    )
    return (x + 0.8 * torch.randn(x.shape, generator=g)).float(), y


def resnet_part(args) -> pd.DataFrame:
    from ggda.attribution.base import AttributionTask, Checkpoint
    from ggda.attribution.influence import InfluenceFunction
    from ggda.attribution.properties import PropertyExamples
    from ggda.grouping.base import Grouping
    from ggda.models.functional import accuracy
    from ggda.models.nets import ResNet9
    from ggda.models.training import Recipe, train_lean

    n, m = args.resnet_n, 50
    x, y = synthetic_cifar(n + 500)
    xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
    recipe = Recipe(
        net_factory=functools.partial(ResNet9, width=16),
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
        epochs=args.resnet_epochs,
        batch_size=128,
    )
    t0 = time.perf_counter()
    net = train_lean(recipe, xtr, ytr, 10, seed=0)
    t_train = time.perf_counter() - t0
    with torch.no_grad():
        acc = accuracy(net(xte), yte)
    q = PropertyExamples(xte[:m], yte[:m], torch.arange(m), m, torch.ones(m), "loss")
    rows = []
    for k in (n, n // 10):
        gid = (
            torch.arange(n)
            if k == n
            else torch.randperm(n, generator=torch.Generator().manual_seed(0)) % k
        )
        task = AttributionTask(
            net,
            [Checkpoint(net.state_dict(), 0.05, args.resnet_epochs)],
            xtr,
            ytr,
            Grouping(gid, k),
            q,
        )
        method = InfluenceFunction(
            solver="ekfac", last_layer=False, damping=0.1, damping_mode="relative",
            factor_chunk=64, max_points=512,
        )  # fmt: skip
        print(f"== resnet9 ekfac k={k} (load {load()})", flush=True)
        t1 = time.perf_counter()
        res = method.attribute(task)
        rows.append(
            {
                "k": k,
                "n": n,
                "num_params": res.info["num_params"],
                "kfac_layers": res.info["kfac_layers"],
                "diag_params": res.info["diag_params"],
                "train_s": t_train,
                "test_acc": acc,
                **{f"{key}_s": v for key, v in res.timings.items()},
                **{key: v for key, v in res.info.items() if key.endswith("_s")},
                "total_s": time.perf_counter() - t1,
                "finite": bool(torch.isfinite(res.scores).all()),
                "load": load(),
            }
        )
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def render(out: Path, args, started: str) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    parts = [
        "# Influence functions that scale: K-FAC and EK-FAC in group form",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
        f"benchmarks/influence.py --subsets {args.subsets}` at commit `{commit}` "
        f"(code of this branch; results of the run that started with load {started}).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, no GPU. **Shared machine** (load average per row "
        "below, often far above the 2 cores): timings are upper bounds, compare within a table.",
        "",
    ]
    lds = out / "influence_lds.csv"
    if lds.exists():
        df = pd.read_csv(lds)
        parts += [
            "## Point-level LDS and time, MNIST 5k (n = 4,000, 200 query test points)",
            "",
            f"LDS over {args.subsets} half-size subsets (1 retrain each), the same retrained "
            "models for every row of a model; group rows broadcast tau_j / |G_j| to members. "
            "`explicit`/`cg`: damping 0.001 absolute, head only (1,290 parameters); cg 10 "
            "iterations (the cost of 10 x 200 head HVPs; `cg_residual` is the largest relative "
            "residual left). `kfac`/`ekfac`: presets `method=kfac|ekfac` (all parameters, "
            "true Fisher with sampled labels, damping 0.1 x each layer's mean eigenvalue). "
            "`factors_s`: fitting (or, with `factors_cached` = 1, loading) the factors; "
            "the k = n row fits them, the others reuse them.",
            "",
            markdown(df),
            "",
        ]
    noisy = out / "influence_noisy.csv"
    if noisy.exists():
        parts += [
            "## Noisy-label detection, MNIST 5k MLP, 10 % flipped labels",
            "",
            "Groups ranked by self-influence (`evaluation=noisy_labels`, score `self`, rank by "
            "tau_jj / |G_j|^2); EK-FAC: k preconditioned quadratic forms g_G^T (G~ + lambda)^-1 "
            "g_G / n; TracIn: its default (3 checkpoints). Grad-K-Means k = n/10.",
            "",
            markdown(pd.read_csv(noisy)),
            "",
        ]
    res = out / "influence_resnet9.csv"
    if res.exists():
        parts += [
            "## EK-FAC on ResNet-9 (width 16), synthetic CIFAR-shaped data",
            "",
            f"Seeded synthetic set generated by the benchmark (n = {args.resnet_n} training "
            f"images 3x32x32, 10 classes, 50 query test points), {args.resnet_epochs} epochs "
            "SGD. All parameters: conv layers Kronecker-factored (KFC), BatchNorm affine "
            "parameters diagonal. Stages in seconds: factor pass, eigendecompositions, "
            "EK-FAC eigenvalue pass, query gradients, preconditioning (`inverse_hvp`), group "
            "gradients (vmap per chunk). k = n/10 uses random groups and loads the k = n row's "
            "factors from the cache (`factors_cached`). No GPU in this task.",
            "",
            markdown(pd.read_csv(res)),
            "",
        ]
    (out / "influence.md").write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", default="mlp,noisy,cnn,resnet")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument(
        "--output-dir", default=os.environ.get("GGDA_OUTPUT_DIR", str(ROOT / "outputs"))
    )
    ap.add_argument("--subsets", type=int, default=20, help="LDS subsets")
    ap.add_argument("--resnet-n", type=int, default=1000)
    ap.add_argument("--resnet-epochs", type=int, default=4)
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown")
    args = ap.parse_args()
    pipeline.configure_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = load()
    if args.render:
        render(out, args, started)
        return
    base = ["logger=none", "overwrite=true", f"paths.output_dir={args.output_dir}"]
    base += ["evaluation=lds", "evaluation.lds.levels=[point]"]
    base += [f"evaluation.lds.num_subsets={args.subsets}", "trainer.enable_progress_bar=false"]
    for part in args.parts.split(","):
        if part in MODELS:
            df = lds_part(part, base, args)
            path = out / "influence_lds.csv"
            if path.exists():
                old = pd.read_csv(path)
                df = pd.concat([old[old.model != part], df])
            df.to_csv(path, index=False)
        elif part == "noisy":
            noisy_part(base, args).to_csv(out / "influence_noisy.csv", index=False)
        elif part == "resnet":
            resnet_part(args).to_csv(out / "influence_resnet9.csv", index=False)
        else:
            raise SystemExit(f"unknown part {part!r}: mlp, cnn, noisy, resnet")
        render(out, args, started)


if __name__ == "__main__":
    main()
