"""The cache of trained base models: checkpoints keyed by the config that decides them.

``<cache_dir>/models/<key>/`` holds ``epoch_XXX.ckpt`` for the configured epochs,
``last.ckpt`` (resume point, rewritten every epoch) and ``manifest.json`` (the deciding
config, each file's SHA-256, epoch and learning rate, and whether training finished).
A second run with the same data/model/seed resumes the finished fit from ``last.ckpt``:
Lightning then skips training and runs the same callbacks. A killed training resumes from
its last epoch. A corrupt file is reported and the model retrained.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ggda.io import atomic_write_json, file_sha256
from ggda.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class ModelStore:
    """Checkpoints of one base model.

    Args:
        root: ``<cache_dir>/models``.
        key: hash of what decides the model.
        meta: the deciding config (recorded and compared).
        save_epochs: epochs (1-based) to keep checkpoints of.
    """

    def __init__(self, root: str | Path, key: str, meta: dict, save_epochs: list[int]) -> None:
        self.dir = Path(root) / key
        self.key = key
        self.meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
        self.save_epochs = list(save_epochs)
        self._lock_file: Any = None

    # -- manifest ---------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"meta": self.meta, "complete": False, "files": {}}

    def _write_manifest(self, man: dict) -> None:
        atomic_write_json(self.manifest_path, man)

    def verify(self) -> str:
        """``complete``, ``partial`` (resumable) or ``none``; wipes a corrupt store."""
        if not self.manifest_path.exists():
            return "none"
        man = self.manifest()
        problem = None
        if man.get("meta") != self.meta:
            problem = "it records a different config"
        else:
            for name, rec in man.get("files", {}).items():
                path = self.dir / name
                if not path.exists():
                    problem = f"{name} is missing"
                elif file_sha256(path) != rec["sha256"]:
                    problem = f"{name} fails its checksum"
                if problem:
                    break
        if problem:
            log.warning(
                "Cached base model %s is unusable (%s): training it again.", self.dir, problem
            )
            self.wipe()
            return "none"
        if man.get("complete"):
            return "complete"
        return "partial" if "last.ckpt" in man.get("files", {}) else "none"

    def wipe(self) -> None:
        for p in self.dir.glob("*"):
            if p.name != ".lock":
                p.unlink() if p.is_file() else shutil.rmtree(p)

    def resume_path(self) -> Path | None:
        """Checkpoint to pass as ``ckpt_path`` to ``trainer.fit`` (None: train anew)."""
        return self.dir / "last.ckpt" if self.verify() in ("complete", "partial") else None

    # -- writing (called by the EpochCheckpoint callback) -------------------------------
    def save(self, trainer: Any, epoch: int, lr: float) -> None:
        """Save ``last.ckpt`` and, if configured, ``epoch_XXX.ckpt`` after ``epoch``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        man = self.manifest()
        man["meta"] = self.meta
        names = ["last.ckpt"] + ([f"epoch_{epoch:03d}.ckpt"] if epoch in self.save_epochs else [])
        for name in names:
            tmp = self.dir / f".{name}.tmp"
            trainer.save_checkpoint(tmp)
            tmp.replace(self.dir / name)
            man["files"][name] = {"sha256": file_sha256(self.dir / name), "epoch": epoch, "lr": lr}
        self._write_manifest(man)

    def mark_complete(self) -> None:
        man = self.manifest()
        man["complete"] = True
        self._write_manifest(man)

    # -- reading ------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """The saved epochs, oldest first, with their learning rates (weights on CPU)."""
        man = self.manifest()
        out = []
        for name, rec in sorted(man["files"].items(), key=lambda kv: kv[1]["epoch"]):
            if name == "last.ckpt":
                continue
            ck = torch.load(self.dir / name, map_location="cpu", weights_only=False)
            state = {k.removeprefix("net."): v for k, v in ck["state_dict"].items()}
            out.append(Checkpoint(state, float(rec["lr"]), int(rec["epoch"])))
        return out

    # -- one trainer per model at a time ------------------------------------------------
    def lock(self) -> None:
        """Block until no other process trains this model (POSIX advisory lock)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.dir / ".lock", "w")  # noqa: SIM115 (held across calls)
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
