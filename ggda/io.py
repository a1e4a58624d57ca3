"""Atomic, checksummed artifact storage and config hashing.

Every expensive artifact (trained model, grouping, retrain result, scores) is stored with
the config that decided it and a SHA-256 of its payload. Writes go to a temporary file in
the same directory and are renamed into place, so a reader never sees half a file, and two
processes writing the same key leave one valid entry (the last rename wins; both are equal).

Shared caches: files are created with the process umask like any ordinary file (0644
under umask 022, 0664 under 002), so a cache written by one user can be read by another;
lock files are made writable by everyone who may share the cache (:func:`open_lock`), and
a file that cannot be read for lack of permission is reported as such, never taken for a
corrupt one (:class:`UnreadableArtifact`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

from ggda.errors import GGDAError

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


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + ``os.replace`` (atomic on POSIX).

    The file gets the mode an ordinary ``open()`` would give it (0666 minus the umask):
    ``mkstemp`` alone creates 0600 files, which no other user of a shared cache can read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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
    """SHA-256 of a file's bytes.

    Raises:
        UnreadableArtifact: the file may not be read (permissions).
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        if _is_permission(e):
            raise permission_error(path) from e
        raise
    return h.hexdigest()


class CorruptArtifact(RuntimeError):
    """A stored artifact failed its checksum, could not be read, or records another config."""


class UnreadableArtifact(GGDAError):
    """A stored file exists but this process may not read it (permissions): not corrupt."""


def permission_error(path: str | Path, action: str = "read") -> UnreadableArtifact:
    """A one-line error for a cache/output file this process may not ``action``."""
    path = Path(path)
    try:
        st = path.stat()
        who = f"owner uid {st.st_uid}, group gid {st.st_gid}, mode {st.st_mode & 0o777:04o}"
    except OSError:
        who = "its directory denies access"
    return UnreadableArtifact(
        f"{path}: permission denied ({action}; {who}; this process runs as uid {os.getuid()}). "
        "The file was left untouched. Ask its owner to share the cache (`chmod -R g+rwX` on "
        "`paths.cache_dir`, with a common group), or set `paths.cache_dir=DIR` to a directory "
        "of your own."
    )


def _is_permission(e: BaseException) -> bool:
    return isinstance(e, PermissionError) or (
        isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)
    )


def open_lock(path: str | Path) -> IO[Any]:
    """Open (creating if needed) a lock file that every user sharing the cache can lock.

    A new lock file is made 0666: it holds nothing, and a 0644 lock file of one user
    could not be opened for writing by another (``flock`` over NFS needs write access).
    An existing lock file this process may not write is opened read-only, which local
    ``flock`` accepts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "r+"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # past the umask, on purpose (see above)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            fd, mode = os.open(path, os.O_RDONLY), "r"
    except PermissionError as e:
        raise permission_error(path.parent, "create a lock file") from e
    return os.fdopen(fd, mode)


class LockBusy(Exception):
    """A non-blocking lock attempt found the lock held by another process."""


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True):
    """Hold an exclusive ``flock`` on ``path`` (see :func:`open_lock`).

    Raises:
        LockBusy: ``blocking`` is False and another process holds the lock.
    """
    fh = open_lock(path)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as e:
            raise LockBusy(str(path)) from e
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


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
        UnreadableArtifact: the file may not be read (permissions); it is not corrupt.
        CorruptArtifact: truncated/unparsable file, checksum mismatch or meta mismatch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        if _is_permission(e):
            raise permission_error(path) from e
        raise
    try:
        record = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
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
    ``<name>.corrupt`` so that it is recomputed, never silently used. A file this process
    may not read raises :class:`UnreadableArtifact` (it may be another user's valid entry).
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
