"""Atomic, checksummed artifacts: corrupt or mismatching entries are never used."""

import pytest
import torch

from ggda.io import (
    CorruptArtifact,
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
