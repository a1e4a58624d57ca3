"""A factory of tiny seeded problems (float64) shared by the tests."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import torch

from ggda.attribution.base import AttributionTask, Checkpoint
from ggda.attribution.properties import PropertyExamples
from ggda.data.base import DataBundle
from ggda.grouping.base import Grouping
from ggda.models.nets import MLP, LogisticRegression
from ggda.models.training import Recipe

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n: int = 24, d: int = 5, c: int = 3, m: int = 4, seed: int = 0):
    """Gaussian-blob train set (n, d) and m query points, float64."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n + m,), generator=g)
    x = means[y] + torch.randn(n + m, d, generator=g, dtype=torch.float64)
    return x[:n], y[:n], x[n:], y[n:]


def tiny_net(kind: str = "mlp", d: int = 5, c: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = MLP((d,), c, hidden=[4]) if kind == "mlp" else LogisticRegression((d,), c)
    return net.double().eval()


def perturbed_checkpoints(net: torch.nn.Module, lrs=(0.3, 0.1), seed: int = 0) -> list[Checkpoint]:
    """Checkpoints at random perturbations of the net (stand-ins for training epochs)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for e, lr in enumerate(lrs, start=1):
        sd = copy.deepcopy(net.state_dict())
        for v in sd.values():
            v.add_(0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype))
        out.append(Checkpoint(sd, lr, e))
    return out


def tiny_task(
    group_ids: torch.Tensor,
    k: int,
    kind: str = "mlp",
    measurement: str = "loss",
    seed: int = 0,
    n: int = 24,
) -> AttributionTask:
    """An AttributionTask on tiny data with m point queries and two checkpoints."""
    x, y, xq, yq = tiny_data(n=n, seed=seed)
    net = tiny_net(kind, x.shape[1], 3, seed)
    m = xq.shape[0]
    queries = PropertyExamples(
        xq, yq, torch.arange(m), m, torch.ones(m, dtype=torch.float64), measurement
    )
    return AttributionTask(
        net, perturbed_checkpoints(net, seed=seed), x, y, Grouping(group_ids, k), queries
    )


def tiny_bundle(n: int = 40, seed: int = 0, c: int = 3, d: int = 5) -> DataBundle:
    """A DataBundle of Gaussian blobs (float32, like real data)."""
    x, y, _, _ = tiny_data(n=n + 40, d=d, c=c, m=0, seed=seed)
    x = x.float()
    return DataBundle(
        "tiny",
        x[:n],
        y[:n],
        x[n : n + 20],
        y[n : n + 20],
        x[n + 20 :],
        y[n + 20 :],
        c,
        torch.arange(8),
    )


def tiny_recipe(epochs: int = 3, kind: str = "logreg") -> Recipe:
    factory = (
        functools.partial(LogisticRegression)
        if kind == "logreg"
        else functools.partial(MLP, hidden=[8])
    )
    opt = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.0)
    return Recipe(net_factory=factory, optimizer=opt, epochs=epochs, batch_size=8)


def run_cli(args: list[str], out: Path, timeout: int = 300, env: dict | None = None):
    """Run ``python run.py ARGS`` with outputs under ``out``; returns CompletedProcess."""
    e = os.environ | {
        "WANDB_MODE": "offline",
        "GGDA_OUTPUT_DIR": str(out),
        "WANDB_DIR": str(out),
        "WANDB_SILENT": "true",
    }
    if env:
        e |= env
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
    )
