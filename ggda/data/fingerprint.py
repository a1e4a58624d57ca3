"""Fingerprints of the data files a loader read, for the cache keys.

Cache keys hash the config; the config names files, not their contents. A loader that
finds its files through :func:`ggda.data.loading.find_file` or
:func:`~ggda.data.loading.package_file` (or calls :func:`note_file` /
:func:`note_package` itself) has them recorded while :func:`recording` is active, and
:func:`fingerprint` summarises them: a replaced or edited data file changes the keys of
every artifact derived from it (model, grouping, scores, retrains), an untouched one
leaves them as they were.

Per file: its size and a SHA-256 of the whole content when the file is at most
``FULL_HASH_BYTES`` (cheap next to loading it), else its size, modification time and a
SHA-256 of its first and last MiB. A directory counts as all the files under it. Data
shipped inside a package also records the package's version.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FULL_HASH_BYTES = 256 << 20
_EDGE = 1 << 20


@dataclass
class Reads:
    """Files and packages a loader read."""

    files: list[Path] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)


_ACTIVE: list[Reads] = []


@contextlib.contextmanager
def recording() -> Iterator[Reads]:
    """Collect the files and packages noted while the block runs."""
    reads = Reads()
    _ACTIVE.append(reads)
    try:
        yield reads
    finally:
        _ACTIVE.remove(reads)


def note_file(path: str | Path) -> None:
    """Record that the current load reads ``path`` (a file or a directory of files)."""
    for r in _ACTIVE:
        r.files.append(Path(path))


def note_package(name: str) -> None:
    """Record that the current load reads data shipped inside package ``name``."""
    for r in _ACTIVE:
        r.packages.append(name)


def file_fingerprint(path: Path) -> dict:
    """``{"size", "sha256"}`` (whole file) or ``{"size", "mtime_ns", "edges_sha256"}``."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return {"size": st.st_size, "sha256": h.hexdigest()}
        h.update(f.read(_EDGE))
        f.seek(-_EDGE, 2)
        h.update(f.read(_EDGE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": h.hexdigest()}


def package_version(name: str) -> str | None:
    """Installed version of the distribution providing import package ``name``."""
    dists = importlib.metadata.packages_distributions().get(name, [name])
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def fingerprint(reads: Reads) -> dict:
    """A JSON-able summary of ``reads`` (equal iff the files' contents are, see above)."""
    files: dict[str, dict] = {}
    for p in sorted({p.resolve() for p in reads.files}):
        if p.is_dir():
            for q in sorted(x for x in p.rglob("*") if x.is_file()):
                files[str(q)] = file_fingerprint(q)
        elif p.is_file():
            files[str(p)] = file_fingerprint(p)
    packages = {name: package_version(name) for name in sorted(set(reads.packages))}
    return {"files": files, "packages": packages}
