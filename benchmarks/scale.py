"""Where grouping pays: per-sample versus group attribution on the CNN, ResNet-9 and text nets.

    python benchmarks/scale.py --out docs/results/scale            # all three nets in one run
    python benchmarks/scale.py --device cuda --out docs/results/scale_cuda

The committed CPU figures are one run per net (``--models cnn`` / ``resnet9`` / ``text``
with ``--out docs/results/scale_<model>``; the exact commands head each file and
``docs/results/scale.md`` reads them together).

For each model (CNN on MNIST-shaped synthetic images, ResNet-9 on CIFAR-shaped synthetic
images, the bag-of-embeddings text net on the bundled BBC News), the script trains the
model, takes one training epoch as the unit of cost, and then times in ONE process, with
the repeats interleaved (repeat r runs every configuration before repeat r + 1 starts, and
the minimum over repeats is kept, so load spikes hit every row alike):

- the bare group-gradient pass (``iter_group_gradients``, factored backend) at k = n/10,
  n/100, n/1000 (target: <= 1.5 epochs per checkpoint);
- TracIn, TRAK and IF per-sample (k = n; ggda's fastest path, ``backend=factored``, and
  optionally the ``vmap`` path) and grouped at k = n/10, n/100, n/1000 (random equal-size
  groups), with each method's own stage timings and the peak memory of the run;
- the peak memory of grouped TracIn at k = n/100 as n and m grow (it must stay flat
  beyond the data and the k x m scores);
- for the CNN, point-level LDS (alpha = 0.5 subsets, ``--lds-subsets`` retrains) of TracIn
  at k = n, n/10, n/100, so the fidelity cost of each speed-up stands beside it.

Writes ``<out>.csv`` (one row per measurement) and ``<out>.md`` (tables and the issue's
targets, each marked met or missed and by how much).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import PeakMemory, load_avg, point_queries, random_grouping, sync

from ggda.attribution.base import AttributionTask, Checkpoint
from ggda.attribution.influence import InfluenceFunction
from ggda.attribution.tracin import TracIn
from ggda.attribution.trak import TRAK
from ggda.evaluation.lds import lds_from_predictions, random_subsets
from ggda.gradients import iter_group_gradients
from ggda.models.functional import neg_loss, per_example_loss
from ggda.models.nets import CNN, ResNet9, TextClassifier

TARGETS = {"tracin": 50.0, "trak": 50.0, "influence": 10.0}


# ---------------------------------------------------------------------------------------
# problems


def image_data(shape: tuple[int, int, int], n: int, m: int, seed: int):
    """Seeded synthetic images of the library's ``synthetic_images`` set: (x, y, qx, qy)."""
    from ggda.data.synthetic_images import SyntheticImages

    b = SyntheticImages(
        shape=list(shape), num_train=n, num_val=10, num_test=m, num_queries=m, data_seed=seed
    ).load()
    return b.x_train, b.y_train, b.x_test[:m], b.y_test[:m], b.num_classes


def text_data(m: int):
    """BBC News (bundled): all 1,625 training articles; queries from the test split."""
    from ggda.data.text import BBCNews

    b = BBCNews().load()
    m = min(m, len(b.y_test))
    return b.x_train, b.y_train, b.x_test[:m], b.y_test[:m], b.num_classes


def build(name: str, args: argparse.Namespace):
    """(net factory, optimizer factory, data) of one model."""
    if name == "cnn":
        data = image_data((1, 28, 28), args.n_cnn, args.queries, 0)
        return (lambda: CNN((1, 28, 28), data[4], channels=[16, 32], hidden=128)), "sgd", data
    if name == "resnet9":
        data = image_data((3, 32, 32), args.n_resnet, args.queries, 1)
        return (lambda: ResNet9((3, 32, 32), data[4], width=args.width)), "sgd", data
    if name == "text":
        data = text_data(args.queries)
        vocab = int(data[0].max()) + 1
        return (
            (
                lambda: TextClassifier(
                    (data[0].shape[1],), data[4], vocab, embed_dim=32, hidden=[32]
                )
            ),
            "adam",
            data,
        )
    raise SystemExit(f"unknown model {name!r}; choose from cnn, resnet9, text")


def train(
    factory, opt_name: str, x, y, epochs: int, device, batch: int = 64, seed: int = 0
) -> tuple[nn.Module, list[Checkpoint], list[float]]:
    """Plain minibatch training; returns the net (eval), one checkpoint, epoch times."""
    torch.manual_seed(seed)
    net = factory().to(device)
    if opt_name == "adam":
        lr = 0.003
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        lr = 0.05
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        net.train()
        sync(device)
        t0 = time.perf_counter()
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch):
            idx = perm[s : s + batch]
            loss = per_example_loss(net(x[idx].to(device)), y[idx].to(device)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return net.eval(), [Checkpoint(state_dict=sd, lr=lr, epoch=epochs)], times


def methods(args: argparse.Namespace, backend: str) -> dict[str, object]:
    """The three methods as benchmarked (see ``--help`` for the knobs)."""
    out: dict[str, object] = {}
    if "tracin" in args.methods:
        out["tracin"] = TracIn(checkpoints="last", backend=backend)
    if "trak" in args.methods:
        out["trak"] = TRAK(
            proj_dim=args.proj_dim,
            kernel="groups",
            checkpoints="last",
            backend=backend,
            proj_structure=args.trak_structure,
        )
    if "influence" in args.methods:
        out["influence"] = InfluenceFunction(
            solver=args.if_solver, last_layer=args.if_solver in ("explicit",), backend=backend
        )
    return out


# ---------------------------------------------------------------------------------------
# the run


def bench_model(
    name: str, args: argparse.Namespace, device, rows: list[dict], metas: list[dict], flush
) -> dict:
    """All measurements of one model; appends rows (and its meta to ``metas`` as soon as
    the model is trained), calling ``flush()`` after every finished cell."""
    factory, opt_name, (x, y, qx, qy, _) = build(name, args)
    n, m = len(y), len(qy)
    net, cks, ep_times = train(factory, opt_name, x, y, args.epochs, device)
    epoch = float(np.median(ep_times))
    meta = {
        "model": name,
        "n": n,
        "m": m,
        "params": sum(p.numel() for p in net.parameters()),
        "epoch_s": epoch,
        "epoch_times": ep_times,
    }
    metas.append(meta)
    print(f"== {name}: n={n} m={m} params={meta['params']:,} epoch={epoch:.2f}s", flush=True)
    ks = [n // d for d in (10, 100, 1000) if n // d >= 1]

    def add(**r):
        r |= {"model": name, "epochs_equiv": r["seconds"] / epoch}
        rows.append(r)
        print(
            f"  {r['what']:>10} {r['backend']:>8} k={r['k']:>6} {r['stage']:>16} "
            f"{r['seconds']:9.3f}s {r['epochs_equiv']:7.2f} ep  {r.get('peak_mb', 0):8.1f} MiB"
            f"  (repeat {r['repeat']})",
            flush=True,
        )
        flush()

    configs: list[tuple[str, str, int]] = []  # (method, backend, k)
    for mname in args.methods:
        configs.append((mname, "factored", n))
        if args.vmap and mname in args.vmap_methods:
            configs.append((mname, "vmap", n))
        configs += [(mname, "factored", k) for k in ks]
    net.load_state_dict(cks[-1].state_dict)
    for rep in range(args.repeats):
        for k in ks:  # the bare pass
            gr = random_grouping(n, k)
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                for _, g in iter_group_gradients(
                    net, x, y, gr.group_ids, k, per_example_loss, backend="factored"
                ):
                    del g
                sync(device)
                dt = time.perf_counter() - t0
            add(what="pass", backend="factored", k=k, stage="pass", seconds=dt,
                peak_mb=mem.peak_mb, repeat=rep)  # fmt: skip
        for mname, backend, k in configs:
            if backend == "vmap" and rep > 0:
                continue  # the slow reference path is timed once
            method = methods(args, backend)[mname]
            measurement = "margin" if mname == "trak" else "loss"
            task = AttributionTask(
                net=net,
                checkpoints=cks,
                x_train=x,
                y_train=y,
                grouping=random_grouping(n, k),
                queries=point_queries(qx, qy, measurement),
                device=device,
            )
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                res = method.attribute(task)  # type: ignore[attr-defined]
                sync(device)
                total = time.perf_counter() - t0
            for stage, sec in res.timings.items():
                add(what=mname, backend=backend, k=k, stage=stage, seconds=sec, repeat=rep)
            add(what=mname, backend=backend, k=k, stage="total", seconds=total,
                peak_mb=mem.peak_mb, repeat=rep,
                fallback_params=res.info.get("fallback_params", ""))  # fmt: skip
            del res
    if args.memory_scan and "tracin" in args.methods:
        for frac_n, frac_m in ((0.25, 1.0), (0.5, 1.0), (1.0, 1.0), (1.0, 0.25)):
            nn_, mm = max(100, int(n * frac_n)), max(1, int(m * frac_m))
            kk = max(1, nn_ // 100)
            task = AttributionTask(
                net=net,
                checkpoints=cks,
                x_train=x[:nn_],
                y_train=y[:nn_],
                grouping=random_grouping(nn_, kk),
                queries=point_queries(qx[:mm], qy[:mm], "loss"),
                device=device,
            )
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                TracIn(checkpoints="last").attribute(task)
                sync(device)
                dt = time.perf_counter() - t0
            add(what="memscan", backend="factored", k=kk, stage=f"n={nn_},m={mm}",
                seconds=dt, peak_mb=mem.peak_mb, repeat=0)  # fmt: skip
    if name == "cnn" and args.lds_subsets > 0:
        meta["lds"] = lds_cnn(factory, opt_name, net, cks, x, y, qx, qy, device, args)
        flush()
    return meta


def lds_cnn(factory, opt_name, net, cks, x, y, qx, qy, device, args) -> dict[str, float]:
    """Point-level LDS of TracIn at k = n, n/10, n/100 (alpha = 0.5, ``--lds-subsets``)."""
    n = len(y)
    masks = random_subsets(n, n // 2, args.lds_subsets, seed=17)
    actual = []
    t0 = time.perf_counter()
    for s, mask in enumerate(masks):
        idx = mask.nonzero().squeeze(1)
        sub, _, _ = train(factory, opt_name, x[idx], y[idx], args.epochs, device, seed=1000 + s)
        with torch.no_grad():
            out = torch.cat(
                [sub(qx[i : i + 512].to(device)) for i in range(0, len(qy), 512)]
            ).double()
        actual.append(neg_loss(out, qy.to(device)).cpu())
        print(f"  LDS retrain {s + 1}/{len(masks)}", flush=True)
    actual_t = torch.stack(actual)  # (S, m)
    res = {"retrain_s": time.perf_counter() - t0}
    for k in (n, n // 10, n // 100):
        gr = random_grouping(n, k)
        task = AttributionTask(net, cks, x, y, gr, point_queries(qx, qy, "loss"), device=device)
        scores = TracIn(checkpoints="last").attribute(task).scores.double().cpu()
        pred = masks.double() @ gr.broadcast(scores, "share")
        corr = lds_from_predictions(pred, actual_t)
        res[f"k={k}"] = float(np.nanmean(corr))
    return res


# ---------------------------------------------------------------------------------------
# report


def write(
    rows: list[dict], metas: list[dict], info: dict, out: Path, args, final: bool = True
) -> None:
    """Write ``<out>.csv`` and ``<out>.md`` from the rows so far, each atomically.

    Called after every finished cell (``final=False``: the run is still going, the md says
    so), so a run that is cut still leaves every figure it measured.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ["model", "what", "backend", "k", "stage", "repeat", "seconds", "epochs_equiv",
            "peak_mb", "fallback_params"]  # fmt: skip
    tmp = out.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in keys})
    os.replace(tmp, out.with_suffix(".csv"))  # a cut run leaves the last complete file

    def best(model, what, backend, k, stage="total"):
        rs = [
            r
            for r in rows
            if (r["model"], r["what"], r["backend"], r["k"], r["stage"])
            == (model, what, backend, k, stage)
        ]
        if not rs:
            return None, None
        r = min(rs, key=lambda r: r["seconds"])
        return r["seconds"], max((q.get("peak_mb") or 0) for q in rs)

    L = [
        "# Where grouping pays: scale benchmark",
        "",
        f"Command: `python benchmarks/scale.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"- Commit: {info['commit']}; machine: {info['device']}, {info['cpus']} CPUs, torch "
        f"threads {info['threads']}, torch {info['torch']}, Python {info['python']}.",
        f"- Host: {info['host']}; `uptime` before: {info['uptime_before']}; after: "
        f"{info.get('uptime_after', '(run in progress)')}.",
        f"- Load average (1/5/15 min) before: {info['load_before']}, after: "
        f"{info.get('load_after', '(run in progress)')}.",
        *(
            []
            if final
            else [
                "- **PARTIAL**: written while the run was in progress; cells "
                "not yet measured are absent."
            ]
        ),
        f"- Every time is the minimum of {args.repeats} interleaved repeats (the vmap rows: one "
        "run). Unit: one training epoch of the same model on the same n points (median of "
        f"{args.epochs} epochs, batch 64). One checkpoint (the final model).",
        "- Groups: random, equal size; k = n is per-sample. `factored` is ggda's fastest "
        "per-sample path (per-layer factor rules; TracIn's inner products never form n x p).",
        f"- TracIn exact gradients; TRAK proj_dim {args.proj_dim}, kernel groups, "
        f"proj_structure {args.trak_structure}; IF solver {args.if_solver}"
        f"{' (head only)' if args.if_solver == 'explicit' else ' (all parameters)'}.",
        "",
    ]
    verdicts = []
    for meta in metas:
        mdl, n = meta["model"], meta["n"]
        ks = [n // d for d in (10, 100, 1000) if n // d >= 1]
        L += [
            f"## {mdl}: n = {n:,}, m = {meta['m']:,} queries, {meta['params']:,} parameters, "
            f"epoch {meta['epoch_s']:.2f} s",
            "",
            "| row | k | seconds | epochs | speed-up vs fastest per-sample | peak MiB "
            "| stages (s) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for k in ks:
            s, mb = best(mdl, "pass", "factored", k, "pass")
            if s is not None:
                L.append(
                    f"| group-gradient pass | {k} | {s:.2f} | {s / meta['epoch_s']:.2f} | | "
                    f"{mb:.0f} | |"
                )
                e = s / meta["epoch_s"]
                if k <= n // 10:
                    verdicts.append(
                        f"- {mdl}: group pass at k = {k}: {e:.2f} epochs, target <= 1.5: **"
                        + ("met" if e <= 1.5 else f"MISSED by {e / 1.5:.1f}x")
                        + "**"
                    )
        for mname in args.methods:
            base, _ = best(mdl, mname, "factored", n)
            for backend, k in [("factored", n), ("vmap", n)] + [("factored", k) for k in ks]:
                s, mb = best(mdl, mname, backend, k)
                if s is None:
                    continue
                stages = ", ".join(
                    f"{st} {best(mdl, mname, backend, k, st)[0]:.2f}"
                    for st in dict.fromkeys(
                        r["stage"]
                        for r in rows
                        if r["model"] == mdl and r["what"] == mname and r["backend"] == backend
                        and r["k"] == k and r["stage"] != "total"
                    )
                )  # fmt: skip
                label = f"{mname} ({backend}{', per-sample' if k == n else ''})"
                L.append(
                    f"| {label} | {k} | {s:.2f} | {s / meta['epoch_s']:.2f} | "
                    f"{f'{base / s:.1f}x' if base else 'n/a'} | {mb:.0f} | {stages} |"
                )
            k100 = n // 100
            s100, _ = best(mdl, mname, "factored", k100)
            if base is not None and s100 is not None:
                ratio, need = base / s100, TARGETS[mname]
                pass_s, _ = best(mdl, "pass", "factored", k100, "pass")
                # no grouped method can beat per-sample by more than per-sample / one pass
                ceiling = (
                    f"; ceiling per-sample / one group pass: {base / pass_s:.1f}x"
                    if (pass_s)
                    else ""
                )
                verdicts.append(
                    f"- {mdl} {mname}: k = n/100 vs fastest per-sample: {ratio:.1f}x, target >= "
                    f"{need:.0f}x: **" + ("met" if ratio >= need else
                                          f"MISSED by {need / ratio:.1f}x") + f"**{ceiling}"
                )  # fmt: skip
                f_base = best(mdl, mname, "factored", n, "factors")[0]
                f_100 = best(mdl, mname, "factored", k100, "factors")[0]
                if f_base is not None and f_100 is not None and s100 > f_100:
                    # the fitted factors are a cached artifact: a groups sweep fits them once
                    r2 = (base - f_base) / (s100 - f_100)
                    verdicts.append(
                        f"- {mdl} {mname}, factors already fitted (cached, as in a sweep over "
                        f"groups): {r2:.1f}x, target >= {need:.0f}x: **"
                        + ("met" if r2 >= need else f"MISSED by {need / r2:.1f}x") + "**"
                    )  # fmt: skip
        scan = [r for r in rows if r["model"] == mdl and r["what"] == "memscan"]
        if scan:
            L += ["", "Peak memory of grouped TracIn at k = n/100 as n and m grow:", ""]
            L += ["| n, m | seconds | peak MiB |", "|---|---:|---:|"]
            L += [f"| {r['stage']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} |" for r in scan]
        if "lds" in meta:
            lds = meta["lds"]
            L += [
                "",
                f"Point-level LDS of TracIn ({args.lds_subsets} subsets, alpha 0.5, one "
                f"retrain each, {lds['retrain_s']:.0f} s of retraining):",
                "",
                "| k | LDS |",
                "|---:|---:|",
            ]
            L += [f"| {key[2:]} | {v:.3f} |" for key, v in lds.items() if key.startswith("k=")]
        L.append("")
    L += ["## Targets", ""] + verdicts + [""]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L) + "\n")
    os.replace(tmp, out.with_suffix(".md"))
    if final:
        print("\n".join(L))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/scale", help="output stem (.csv, .md)")
    p.add_argument("--models", default="cnn,resnet9,text")
    p.add_argument("--methods", default="tracin,trak,influence")
    p.add_argument("--n-cnn", type=int, default=20000, help="CNN training points")
    p.add_argument("--n-resnet", type=int, default=10000, help="ResNet-9 training points")
    p.add_argument("--width", type=int, default=16, help="ResNet-9 width (64 = original)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2, help="training epochs (unit: their median)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--trak-structure", default="kronecker", choices=["dense", "kronecker"])
    p.add_argument("--if-solver", default="ekfac", choices=["explicit", "kfac", "ekfac"])
    p.add_argument("--vmap", action="store_true", help="also time the per-sample vmap path")
    p.add_argument("--vmap-methods", default="tracin")
    p.add_argument("--memory-scan", action="store_true", help="peak memory vs n and m")
    p.add_argument("--lds-subsets", type=int, default=20, help="CNN LDS retrains (0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    a.models, a.methods = a.models.split(","), a.methods.split(",")
    a.vmap_methods = a.vmap_methods.split(",")
    return a


def uptime() -> str:
    """The ``uptime`` line (load of the shared machine), or n/a."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    import subprocess

    args = parse(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {
        "commit": commit,
        "load_before": load_avg(),
        "uptime_before": uptime(),
        "host": f"{platform.node()} ({platform.platform()}, {platform.processor() or 'cpu'})",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    rows: list[dict] = []
    metas: list[dict] = []
    out = Path(args.out)

    def flush() -> None:
        write(rows, metas, info, out, args, final=False)

    for mdl in args.models:
        bench_model(mdl, args, device, rows, metas, flush)
    info["load_after"] = load_avg()
    info["uptime_after"] = uptime()
    write(rows, metas, info, out, args)


if __name__ == "__main__":
    main()
