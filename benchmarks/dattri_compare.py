"""ggda versus dattri on identical checkpoints: time and score agreement.

    pip install -e '.[bench]'        # dattri==0.3.0 (pure Python; keeps the installed torch)
    python benchmarks/dattri_compare.py --out docs/results/benchmark_dattri

Same model, data and checkpoints as ``benchmarks/attribution.py`` (MNIST 5k MLP,
``--n`` training points, ``--queries`` test points, one checkpoint per epoch). For each
method it runs dattri's per-sample attributor and ggda's per-sample and grouped ones and
reports the wall time and, for the per-sample pairs, the Pearson and Spearman correlation
of the (n, m) score matrices (flattened, and the mean over queries of the per-query
correlation).

Conventions (why the scales differ; correlations are scale-free):

- TracIn: dattri computes sum_t eta_t <P^T grad L_i, P^T grad L_q> and always projects
  (its TracIn has no unprojected mode; proj_dim 512 by default); ggda's
  tau = -sum_t eta_t <grad f_q, grad L_i> with f = -loss is the same quantity without P.
  ggda is run exact and with its own proj_dim 512 (a different random P, so agreement is
  up to the projection's distortion).
- IF (head only, explicit Hessian): dattri g_i^T (H + r I)^{-1} g_q with H the Hessian of
  the loss function as given (here the mean cross-entropy over the full batch); ggda
  (1/n) g_q^T (H + lambda I)^{-1} g_i with H the mean-loss Hessian: same up to the 1/n.
- TRAK: dattri is given the (negated) margin as its loss/target function, so both use
  features phi = P^T grad margin, the points kernel Phi^T Phi (no damping; n > d), and
  weights 1 - p_i. Remaining differences: different random P (dattri also scales by
  1/sqrt(p), which cancels), and dattri multiplies the checkpoint-summed scores by the
  checkpoint-averaged (1 - p_i) while ggda averages per-checkpoint products. Agreement is
  therefore high but not exact.

Writes ``<out>.csv`` and ``<out>.md``. If dattri is missing or fails, the markdown says
exactly why and the ggda side is still reported.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import load_avg, mnist5k, point_queries, random_grouping, train

from ggda.attribution.base import AttributionTask
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.tracin import TracIn
from ggda.attribution.trak import TRAK
from ggda.gradients import per_sample_inner_products
from ggda.models.functional import margin, neg_loss, per_example_loss


def corr(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman on the flattened matrices and the mean per-query Pearson."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()

    def pearson(u, v):
        u, v = u - u.mean(0), v - v.mean(0)
        return (u * v).sum(0) / (u.norm(dim=0) * v.norm(dim=0)).clamp_min(1e-300)

    def ranks(u):
        return u.argsort(0).argsort(0).double()

    fa, fb = a.reshape(-1, 1), b.reshape(-1, 1)
    return {
        "pearson": float(pearson(fa, fb)),
        "spearman": float(pearson(ranks(fa), ranks(fb))),
        "per_query_pearson": float(pearson(a, b).mean()),
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def dattri_runs(net, cks, x, y, qx, qy, args) -> dict[str, tuple[torch.Tensor, float]]:
    """dattri's TracIn, IF (explicit, head) and TRAK on the same checkpoints."""
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask as DTask
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset

    def logits(params, xb):
        if xb.dim() == len(x.shape) - 1:  # one example (inside dattri's vmap)
            xb = xb.unsqueeze(0)
        return functional_call(net, params, xb)

    def loss_func(params, data):
        xb, yb = data
        return per_example_loss(logits(params, xb), yb.reshape(-1)).mean()

    def neg_margin(params, data):  # TRAK's output function (sign cancels in the score)
        xb, yb = data
        return -margin(logits(params, xb), yb.reshape(-1)).sum()

    def correct_prob(params, data):
        xb, yb = data
        return torch.exp(-per_example_loss(logits(params, xb), yb.reshape(-1))).squeeze()

    sds = [ck.state_dict for ck in cks]
    train_dl = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False)
    full_dl = DataLoader(TensorDataset(x, y), batch_size=len(y), shuffle=False)
    test_dl = DataLoader(TensorDataset(qx, qy), batch_size=args.batch, shuffle=False)
    out = {}

    task = DTask(loss_func=loss_func, model=net, checkpoints=sds)
    att = TracInAttributor(
        task,
        weight_list=torch.tensor([ck.lr for ck in cks]),
        normalized_grad=False,
        projector_kwargs={"proj_dim": args.proj_dim, "device": "cpu"},
    )
    out["tracin"] = timed(lambda: att.attribute(train_dl, test_dl))

    task = DTask(loss_func=loss_func, model=net, checkpoints=sds[-1])
    att = IFAttributorExplicit(task, layer_name=["fc.weight", "fc.bias"], regularization=1e-3)

    def run_if():
        att.cache(full_dl)
        return att.attribute(train_dl, test_dl)

    out["influence"] = timed(run_if)

    task = DTask(loss_func=neg_margin, model=net, checkpoints=sds)
    att = TRAKAttributor(
        task,
        correct_probability_func=correct_prob,
        projector_kwargs={"proj_dim": args.proj_dim, "device": "cpu"},
        regularization=0.0,
    )

    def run_trak():
        att.cache(train_dl)
        return att.attribute(test_dl)

    out["trak"] = timed(run_trak)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/benchmark_dattri")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="dattri's data-loader batch size")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = load_avg()
    device = torch.device("cpu")  # dattri's projector runs on the CPU here
    x, y, qx, qy = mnist5k(args.n, args.queries)
    net, cks, ep = train(x, y, args.epochs, device)
    n, m = len(y), len(qy)
    k = max(1, n // 100)

    def task(kk: int, measurement: str) -> AttributionTask:
        return AttributionTask(
            net, cks, x, y, random_grouping(n, kk), point_queries(qx, qy, measurement)
        )

    ggda: dict[str, dict[str, tuple[torch.Tensor, float]]] = {}

    def scores(method, kk, meas):
        return method.attribute(task(kk, meas)).scores

    ggda["tracin"] = {
        "per-sample exact (vmap)": timed(lambda: scores(TracIn(), n, "loss")),
        "per-sample proj 512 (vmap)": timed(
            lambda: scores(TracIn(proj_dim=args.proj_dim), n, "loss")
        ),
        f"group k={k} exact (factored)": timed(
            lambda: scores(TracIn(backend="factored"), k, "loss")
        ),
    }

    def ghost():
        s = 0
        for ck in cks:
            net.load_state_dict(ck.state_dict)
            s = s - ck.lr * per_sample_inner_products(net, x, y, per_example_loss, qx, qy, neg_loss)
        return s

    ggda["tracin"]["per-sample exact (factorised)"] = timed(ghost)
    inf = dict(solver="explicit", damping=1e-3, last_layer=True)
    ggda["influence"] = {
        "per-sample (vmap)": timed(lambda: scores(InfluenceFunction(**inf), n, "loss")),
        f"group k={k} (factored)": timed(
            lambda: scores(InfluenceFunction(**inf, backend="factored"), k, "loss")
        ),
    }
    trk = dict(proj_dim=args.proj_dim, checkpoints="all", damping=0.0)
    ggda["trak"] = {
        "per-sample points kernel (vmap)": timed(
            lambda: scores(TRAK(**trk, kernel="points"), n, "margin")
        ),
        f"group k={k} groups kernel (factored)": timed(
            lambda: scores(TRAK(**trk | {"damping": 0.01}, backend="factored"), k, "margin")
        ),
    }
    # Noise floors: how far two exact-definition runs that differ only in the random
    # projection agree. dattri cannot share ggda's P, so this is the best agreement to expect.
    trak_seed1, _ = timed(lambda: scores(TRAK(**trk, kernel="points", proj_seed=1), n, "margin"))
    floors = {
        "tracin": (
            "ggda proj 512 vs ggda exact",
            corr(
                ggda["tracin"]["per-sample proj 512 (vmap)"][0],
                ggda["tracin"]["per-sample exact (vmap)"][0],
            ),
        ),
        "trak": (
            "ggda proj_seed 1 vs proj_seed 0",
            corr(trak_seed1, ggda["trak"]["per-sample points kernel (vmap)"][0]),
        ),
    }

    why = None
    try:
        from importlib.metadata import version

        import dattri

        dver = getattr(dattri, "__version__", None) or version("dattri")
        d = dattri_runs(net, cks, x, y, qx, qy, args)
    except Exception as e:  # report, do not hide: the ggda side is still useful
        why = f"{type(e).__name__}: {e}\n\n```\n{traceback.format_exc(limit=4)}\n```"
        d, dver = {}, "not run"
    after = load_avg()

    rows = []
    L = [
        "# ggda versus dattri on identical checkpoints",
        "",
        f"Command: `python benchmarks/dattri_compare.py {' '.join(sys.argv[1:] if argv is None else argv)}`",  # noqa: E501
        "",
        f"MNIST 5k MLP 784-128-10, n = {n}, m = {m} queries, {len(cks)} checkpoints; CPU, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), dattri {dver}. "
        f"One training epoch = {min(ep):.3f} s. Load average before: {before}, after: {after} "
        "(shared machine: absolute times are upper bounds, ratios are taken in one run).",
        "",
        "Correlations are between ggda's per-sample scores and dattri's (n x m, flattened; and "
        "the mean over queries of each query's Pearson). Sign and scale conventions: see the "
        "script's docstring; a positive correlation means the signs agree.",
        "",
        "| method | implementation | time s | dattri time / this | Pearson | Spearman | "
        "per-query Pearson |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for meth in ("tracin", "influence", "trak"):
        dscore, dtime = d.get(meth, (None, None))
        if dscore is not None:
            L.append(f"| {meth} | dattri per-sample | {dtime:.2f} | 1.0 | | | |")
            rows.append({"method": meth, "impl": "dattri", "seconds": dtime})
        for name, (s, t) in ggda[meth].items():
            c = {}
            if dscore is not None and s.shape == dscore.shape:
                c = corr(s, dscore)
            ratio = f"{dtime / t:.1f}" if dtime else "-"
            cells = [
                f"{c[key]:.3f}" if c else "" for key in ("pearson", "spearman", "per_query_pearson")
            ]
            L.append(f"| {meth} | ggda {name} | {t:.2f} | {ratio} | " + " | ".join(cells) + " |")
            rows.append({"method": meth, "impl": f"ggda {name}", "seconds": t} | c)
        if meth in floors:
            label, c = floors[meth]
            cells = [f"{c[key]:.3f}" for key in ("pearson", "spearman", "per_query_pearson")]
            L.append(f"| {meth} | noise floor: {label} | | | " + " | ".join(cells) + " |")
            rows.append({"method": meth, "impl": f"noise floor: {label}"} | c)
    if why:
        L += ["", f"**dattri could not be run**: {why}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["method", "impl", "seconds", "pearson", "spearman", "per_query_pearson"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in keys})
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
