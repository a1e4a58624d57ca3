"""Data fingerprints: a changed data file changes the cache keys, an untouched one does not."""

import os

from ggda.data.fingerprint import fingerprint, note_file, note_package, recording


def _fp(*paths, packages=()):
    with recording() as reads:
        for p in paths:
            note_file(p)
        for name in packages:
            note_package(name)
    return fingerprint(reads)


def test_content_decides_not_the_timestamp(tmp_path):
    f = tmp_path / "train.csv"
    f.write_bytes(b"a,b\n1,2\n")
    first = _fp(f)
    os.utime(f, (1, 1))  # touched (or copied without -p): same content
    assert _fp(f) == first
    f.write_bytes(b"a,b\n1,3\n")  # same size, other content
    assert _fp(f) != first


def test_large_files_use_size_mtime_and_edges(tmp_path, monkeypatch):
    import ggda.data.fingerprint as fpmod

    monkeypatch.setattr(fpmod, "FULL_HASH_BYTES", 10)
    monkeypatch.setattr(fpmod, "_EDGE", 4)
    f = tmp_path / "big.bin"
    f.write_bytes(bytes(range(40)))
    first = _fp(f)
    assert "edges_sha256" in first["files"][str(f.resolve())]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert _fp(f) != first  # a rewrite in place is caught by the timestamp


def test_directories_and_packages(tmp_path):
    d = tmp_path / "corpus"
    (d / "a").mkdir(parents=True)
    (d / "a" / "1.txt").write_text("x")
    first = _fp(d, packages=["sklearn"])
    assert first["packages"]["sklearn"]
    (d / "a" / "2.txt").write_text("y")
    assert _fp(d, packages=["sklearn"]) != first


def test_nothing_is_recorded_outside_a_recording(tmp_path):
    note_file(tmp_path)  # no active recording: a no-op
    with recording() as reads:
        pass
    assert reads.files == [] and fingerprint(reads) == {"files": {}, "packages": {}}
