"""The cache of trained base models: checkpoints keyed by the config that decides them.

``<cache_dir>/models/<key>/`` holds ``epoch_XXX.ckpt`` for the configured epochs, the
resume point of the last finished epoch (that epoch's ``epoch_XXX.ckpt``, or a
``last_XXX.ckpt`` replaced every epoch) and ``manifest.json`` (the deciding config, each
file's SHA-256, epoch and learning rate, the resume point, and whether training
finished). Files are written before the manifest that names them and are never
overwritten in place, so a kill at any instant leaves a manifest whose every file is
intact.
A second run with the same data/model/seed resumes the finished fit from its resume point:
Lightning then skips training and runs the same callbacks. A killed training resumes from
its last epoch. A corrupt file is reported and the model retrained.

Concurrency: one process trains a model at a time (``.lock``, an ``flock``). Everything
that can change the store, including wiping a corrupt one, happens under that lock: a
process that finds the store mid-save waits for the writer instead of judging (and
wiping) files being written. A store is ``complete`` only when training finished and
every configured epoch's checkpoint is present and matches its checksum.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ggda.errors import GGDAError
from ggda.io import atomic_write_json, file_sha256, open_lock, permission_error
from ggda.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# Training wall seconds per epoch, kept beside the checkpoints (``time/epoch`` reads it).
EPOCH_TIMES = "epoch_seconds.json"


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
        """Path of the model's ``manifest.json``."""
        return self.dir / "manifest.json"

    def manifest(self) -> dict:
        """The manifest, or an empty one when there is none.

        Raises:
            GGDAError: the manifest exists but is not a valid one (the message says how);
                :meth:`verify` reports that and trains the model again.
        """
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            return {"meta": self.meta, "complete": False, "files": {}}
        except PermissionError as e:
            raise permission_error(self.manifest_path) from e
        try:
            man = json.loads(text)
        except json.JSONDecodeError as e:
            raise GGDAError(f"{self.manifest_path} is not valid JSON ({e})") from None
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise GGDAError(f"{self.manifest_path} lacks its `files` table")
        return man

    def _write_manifest(self, man: dict) -> None:
        atomic_write_json(self.manifest_path, man)

    def problem(self) -> str | None:
        """Why the stored files cannot be used (None if they can). Reads only."""
        try:
            man = self.manifest()
        except GGDAError as e:
            if "permission denied" in str(e):
                raise
            return str(e).removeprefix(f"{self.manifest_path} ")
        if man.get("meta") != self.meta:
            return "it records a different config"
        files = man["files"]
        for name, rec in files.items():
            path = self.dir / name
            if not path.exists():
                return f"{name} is missing"
            if not isinstance(rec, dict) or file_sha256(path) != rec.get("sha256"):
                return f"{name} fails its checksum"
        last_name = man.get("last")
        if last_name is not None and last_name not in files:
            return f"its resume point {last_name} is not recorded"
        last = int(files[last_name]["epoch"]) if last_name else 0
        # Every configured epoch up to the resume point must be there, else the store
        # would be resumed (or reported complete) without it.
        lost = [e for e in self.save_epochs if e <= last and f"epoch_{e:03d}.ckpt" not in files]
        if man.get("complete"):
            lost += [e for e in self.save_epochs if e > last]
        if lost:
            return f"epoch_{lost[0]:03d}.ckpt is not recorded"
        return None

    def verify(self) -> str:
        """``complete``, ``partial`` (resumable) or ``none``; wipes an unusable store.

        Call it only while holding :meth:`lock` (it may delete files another process is
        writing otherwise); :meth:`status` is the lock-free read-only check.
        """
        if not self.manifest_path.exists():
            return "none"
        problem = self.problem()
        if problem:
            log.warning(
                "Cached base model %s is unusable (%s): training it again.", self.dir, problem
            )
            self.wipe()
            return "none"
        return self._status(self.manifest())

    def status(self) -> str:
        """Like :meth:`verify` but never changes anything (``none`` when unusable)."""
        if not self.manifest_path.exists() or self.problem():
            return "none"
        return self._status(self.manifest())

    @staticmethod
    def _status(man: dict) -> str:
        if man.get("complete"):
            return "complete"
        return "partial" if man.get("last") else "none"

    def wipe(self) -> None:
        """Delete every file of this model but the lock (call under the lock)."""
        for p in self.dir.glob("*"):
            if p.name != ".lock":
                p.unlink() if p.is_file() else shutil.rmtree(p)

    def _remove_strays(self, man: dict) -> None:
        """Delete files the manifest does not name (left by a kill mid-save). Under the lock."""
        keep = {".lock", "manifest.json", EPOCH_TIMES, *man.get("files", {})}
        for p in self.dir.glob("*"):
            if p.name not in keep and p.is_file():
                p.unlink(missing_ok=True)

    def resume_path(self) -> Path | None:
        """Checkpoint to pass as ``ckpt_path`` to ``trainer.fit`` (None: train anew).

        Under the lock (it verifies, may wipe, and removes files left by a kill).
        """
        return self.resume_point() if self.verify() in ("complete", "partial") else None

    def resume_point(self) -> Path | None:
        """The recorded resume checkpoint, after :meth:`verify`; removes files a kill left."""
        man = self.manifest()
        if not man.get("last"):
            return None
        self._remove_strays(man)
        return self.dir / man["last"]

    # -- writing (called by the EpochCheckpoint callback) -------------------------------
    def save(self, trainer: Any, epoch: int, lr: float) -> None:
        """Checkpoint ``epoch`` (1-based) as the resume point; keep it if configured.

        Order: the new file (temp + rename), then the manifest naming it, then the old
        resume file is deleted. A kill at any point leaves a usable store.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        man = self.manifest()
        man["meta"] = self.meta
        keep = epoch in self.save_epochs
        name = f"epoch_{epoch:03d}.ckpt" if keep else f"last_{epoch:03d}.ckpt"
        tmp = self.dir / f".{name}.tmp"
        trainer.save_checkpoint(tmp)
        tmp.replace(self.dir / name)
        old = man.get("last")
        man["files"][name] = {"sha256": file_sha256(self.dir / name), "epoch": epoch, "lr": lr}
        man["last"] = name
        if old and old != name and old.startswith("last_"):
            del man["files"][old]
        self._write_manifest(man)
        if old and old != name and old.startswith("last_"):
            (self.dir / old).unlink(missing_ok=True)

    def mark_complete(self) -> None:
        """Record that training finished (no write when it is recorded already)."""
        man = self.manifest()
        if man.get("complete"):
            return  # a resumed finished fit: nothing changes (and nothing is written)
        man["complete"] = True
        self._write_manifest(man)

    # -- reading ------------------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """The saved epochs, oldest first, with their learning rates (weights on CPU)."""
        man = self.manifest()
        out = []
        for name, rec in sorted(man["files"].items(), key=lambda kv: kv[1]["epoch"]):
            if not name.startswith("epoch_"):
                continue
            ck = torch.load(self.dir / name, map_location="cpu", weights_only=False)
            state = {k.removeprefix("net."): v for k, v in ck["state_dict"].items()}
            out.append(Checkpoint(state, float(rec["lr"]), int(rec["epoch"])))
        return out

    # -- one trainer per model at a time ------------------------------------------------
    def lock(self) -> None:
        """Block until no other process trains this model (POSIX advisory lock)."""
        if self._lock_file is not None:
            return  # already held by this process
        fh = open_lock(self.dir / ".lock")
        fcntl.flock(fh, fcntl.LOCK_EX)
        self._lock_file = fh

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (a no-op when not held)."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
