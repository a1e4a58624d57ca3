"""Atomic, checksummed artifact storage and config hashing.

Every expensive artifact (trained model, grouping, retrain result, scores) is stored with
the config that decided it and a SHA-256 of its payload. Writes go to a temporary file in
the same directory and are renamed into place, so a reader never sees half a file, and two
processes writing the same key leave one valid entry (the last rename wins; both are equal).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def tensor_hash(t: torch.Tensor, n: int = 16) -> str:
    """Hex digest of a tensor's dtype, shape and bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bool else t.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:n]


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CorruptArtifact(RuntimeError):
    """A stored artifact failed its checksum, could not be read, or records another config."""


def save_artifact(path: str | Path, payload: Any, meta: dict[str, Any]) -> None:
    """Store ``payload`` with ``meta`` (the deciding config) and a checksum, atomically.

    Args:
        path: destination file.
        payload: anything ``torch.save`` accepts (tensors, dicts, lists).
        meta: JSON-serialisable description of what decided the payload.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    blob = buf.getvalue()
    record = {
        "format": FORMAT_VERSION,
        "meta": json.loads(json.dumps(meta, sort_keys=True, default=_json_default)),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "blob": blob,
    }
    atomic_torch_save(path, record)


def load_artifact(path: str | Path, meta: dict[str, Any] | None = None) -> Any:
    """Load a payload written by :func:`save_artifact`, verifying checksum and config.

    Args:
        path: the artifact file.
        meta: if given, the stored meta must equal it.

    Returns:
        The payload.

    Raises:
        FileNotFoundError: no such file.
        CorruptArtifact: truncated/unreadable file, checksum mismatch or meta mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
        blob = record["blob"]
        if hashlib.sha256(blob).hexdigest() != record["sha256"]:
            raise CorruptArtifact(f"{path}: checksum mismatch")
    except CorruptArtifact:
        raise
    except Exception as e:  # truncated zip, pickle error, missing keys
        raise CorruptArtifact(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if meta is not None:
        want = json.loads(json.dumps(meta, sort_keys=True, default=_json_default))
        if record["meta"] != want:
            raise CorruptArtifact(
                f"{path}: records a different config than the one asked for "
                f"(stored keys differ: {_diff_keys(record['meta'], want)})"
            )
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def load_or_none(path: str | Path, meta: dict[str, Any] | None = None, what: str = "") -> Any:
    """Like :func:`load_artifact` but returns None when missing or bad (and says so).

    A corrupt or mismatching entry is reported with a warning and moved aside to
    ``<name>.corrupt`` so that it is recomputed, never silently used.
    """
    path = Path(path)
    try:
        return load_artifact(path, meta)
    except FileNotFoundError:
        return None
    except CorruptArtifact as e:
        log.warning("Ignoring bad cached %s and recomputing it: %s", what or "artifact", e)
        # Another process may have moved or replaced it already; either way it is gone.
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
        return None


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<root>"]


diff_keys = _diff_keys
