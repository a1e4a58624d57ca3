import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Never reach the network from tests, whatever the developer's environment says.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def _slurm_missing() -> str | None:
    """Why tests marked `slurm` cannot run here (None: a cluster answers)."""
    if shutil.which("sinfo") is None:
        return "needs a SLURM cluster: sinfo is absent (as root: .ci/slurm-up starts one)"
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "needs a SLURM cluster: sinfo did not answer in 20 s"
    states = res.stdout.split()
    if res.returncode != 0 or not any(s in _UP for s in states):  # "idle*": not responding
        why = (res.stderr.strip() or "no node idle, mixed or allocated").splitlines()[-1]
        return f"needs a SLURM cluster: sinfo says {why}"
    return None


_UP = {"idle", "mixed", "allocated", "completing"}


def pytest_collection_modifyitems(config, items):
    if any("slurm" in item.keywords for item in items) and (why := _slurm_missing()):
        for item in items:
            if "slurm" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
