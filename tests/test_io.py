"""Atomic, checksummed artifacts: corrupt or mismatching entries are never used."""

import multiprocessing as mp
import os
import stat

import pytest
import torch

from ggda.io import (
    CorruptArtifact,
    LockBusy,
    atomic_write_json,
    file_lock,
    load_artifact,
    load_or_none,
    save_artifact,
    stable_hash,
    tensor_hash,
)


def test_roundtrip_and_meta_check(tmp_path):
    p = tmp_path / "a.pt"
    save_artifact(p, {"x": torch.arange(5)}, {"k": 1})
    assert torch.equal(load_artifact(p, {"k": 1})["x"], torch.arange(5))
    with pytest.raises(CorruptArtifact, match="different config"):
        load_artifact(p, {"k": 2})


def test_truncated_file_is_detected_and_moved_aside(tmp_path, caplog):
    p = tmp_path / "a.pt"
    save_artifact(p, {"x": torch.randn(100)}, {"k": 1})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifact):
        load_artifact(p)
    assert load_or_none(p, {"k": 1}, what="thing") is None
    assert "Ignoring bad cached thing" in caplog.text
    assert not p.exists() and (tmp_path / "a.pt.corrupt").exists()


def test_flipped_byte_fails_checksum(tmp_path):
    p = tmp_path / "a.pt"
    save_artifact(p, {"x": torch.zeros(1000)}, {})
    raw = bytearray(p.read_bytes())
    # flip a byte inside the payload blob (the zeros), keeping the container readable
    i = raw.find(bytes(64))
    raw[i + 10] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptArtifact):
        load_artifact(p)


def test_no_temp_files_left(tmp_path):
    save_artifact(tmp_path / "a.pt", {"x": 1}, {})
    assert [f.name for f in tmp_path.iterdir()] == ["a.pt"]


def test_hashes_are_stable_and_discriminating():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    m = torch.tensor([True, False, True])
    assert tensor_hash(m) == tensor_hash(m.clone()) != tensor_hash(~m)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_get_the_mode_of_ordinary_files(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_artifact(tmp_path / "a.pt", {"x": 1}, {})
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    for name in ("a.pt", "m.json", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_lock_files_are_lockable_by_everyone(tmp_path):
    lock = tmp_path / ".x.lock"
    with file_lock(lock), pytest.raises(LockBusy), file_lock(lock, blocking=False):
        pass
    assert stat.S_IMODE((tmp_path / ".x.lock").stat().st_mode) == 0o666


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_unreadable_artifact_is_reported_not_moved_aside(tmp_path):
    from test_store import traversable

    p = tmp_path / "a.pt"
    save_artifact(p, {"x": torch.arange(3)}, {"k": 1})
    os.chmod(p, 0o600)  # another user's private file
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    with traversable(tmp_path):
        proc = ctx.Process(target=_load_as_nobody, args=(p, q))
        proc.start()
        out = q.get(timeout=60)
        proc.join(30)
    assert out.startswith("UnreadableArtifact") and "permission denied" in out, out
    assert p.exists() and not (tmp_path / "a.pt.corrupt").exists()


def _load_as_nobody(p, q):
    os.setgid(65534)
    os.setuid(65534)
    try:
        load_or_none(p, {"k": 1}, what="thing")
        q.put("loaded")
    except Exception as e:
        q.put(f"{type(e).__name__}: {e}")
