"""The base-model cache: reuse, resume, corruption, kills mid-save, concurrent readers."""

import contextlib
import json
import multiprocessing as mp
import os
import stat
import tempfile
import time

import pytest
import torch

from ggda.models.store import ModelStore


class FakeTrainer:
    def __init__(self, value):
        self.value = value

    def save_checkpoint(self, path):
        torch.save({"state_dict": {"net.w": torch.full((2,), float(self.value))}}, path)


def _store(tmp_path, meta=None, save_epochs=(1, 3)):
    return ModelStore(tmp_path, "key", meta or {"a": 1}, save_epochs=list(save_epochs))


def test_save_verify_and_load(tmp_path):
    s = _store(tmp_path)
    assert s.verify() == "none"
    for e in (1, 2, 3):
        s.save(FakeTrainer(e), e, lr=0.1 * e)
    assert s.verify() == "partial"
    assert s.resume_point() == s.dir / "epoch_003.ckpt"
    s.mark_complete()
    assert s.verify() == "complete"
    cks = s.checkpoints()
    assert [c.epoch for c in cks] == [1, 3]
    assert [round(c.lr, 6) for c in cks] == [0.1, 0.3]
    assert torch.equal(cks[1].state_dict["w"], torch.full((2,), 3.0))
    # the resume file of epoch 2 was replaced by epoch 3's (a kept epoch)
    assert (
        sorted(p.name for p in s.dir.iterdir())
        == [
            ".lock",
            "epoch_001.ckpt",
            "epoch_003.ckpt",
            "manifest.json",
        ]
        or not (s.dir / "last_002.ckpt").exists()
    )


def test_corrupt_checkpoint_wipes_store(tmp_path, caplog):
    s = _store(tmp_path, save_epochs=[1])
    s.save(FakeTrainer(1), 1, 0.1)
    s.mark_complete()
    (s.dir / "epoch_001.ckpt").write_bytes(b"garbage")
    assert s.status() == "none" and (s.dir / "manifest.json").exists()  # read-only check
    assert s.verify() == "none"
    assert "fails its checksum" in caplog.text
    assert not (s.dir / "manifest.json").exists()


def test_other_config_is_not_reused(tmp_path):
    s = _store(tmp_path, save_epochs=[1])
    s.save(FakeTrainer(1), 1, 0.1)
    s.mark_complete()
    other = ModelStore(tmp_path, "key", {"a": 2}, save_epochs=[1])
    assert other.verify() == "none"
    assert not (tmp_path / "key" / "manifest.json").exists()


def test_garbage_manifest_is_reported_and_retrained(tmp_path, caplog):
    s = _store(tmp_path)
    s.save(FakeTrainer(1), 1, 0.1)
    s.manifest_path.write_text("{not json")
    assert s.verify() == "none"
    assert "manifest.json is not valid JSON" not in caplog.text  # the path is the subject
    assert "unusable (is not valid JSON" in caplog.text


def test_complete_store_missing_a_saved_epoch_is_not_complete(tmp_path, caplog):
    s = _store(tmp_path, save_epochs=[1, 2, 3])
    for e in (1, 2, 3):
        s.save(FakeTrainer(e), e, 0.1)
    s.mark_complete()
    man = json.loads(s.manifest_path.read_text())
    del man["files"]["epoch_002.ckpt"]  # what the old verify-before-lock race produced
    s.manifest_path.write_text(json.dumps(man))
    assert s.status() == "none"
    assert s.verify() == "none"
    assert "epoch_002.ckpt is not recorded" in caplog.text


def test_kill_at_any_point_of_a_save_leaves_a_usable_store(tmp_path):
    """Simulate a kill after each step of save(): the store is always usable."""
    s = _store(tmp_path, save_epochs=[3])
    s.save(FakeTrainer(1), 1, 0.1)
    s.save(FakeTrainer(2), 2, 0.1)
    # killed while writing epoch 3: temp file only
    (s.dir / ".epoch_003.ckpt.tmp").write_bytes(b"half")
    assert s.status() == "partial"
    # killed after the rename, before the manifest names it
    FakeTrainer(3).save_checkpoint(s.dir / "epoch_003.ckpt")
    assert s.status() == "partial"
    assert s.resume_path() == s.dir / "last_002.ckpt"
    # the strays are gone, the recorded files stay
    assert sorted(p.name for p in s.dir.iterdir()) == ["last_002.ckpt", "manifest.json"]
    s.save(FakeTrainer(3), 3, 0.1)
    s.mark_complete()
    assert s.verify() == "complete"
    assert [c.epoch for c in s.checkpoints()] == [3]


def _slow_writer(root, ready, go):
    s = ModelStore(root, "key", {"a": 1}, save_epochs=[1, 2])
    s.lock()
    s.save(FakeTrainer(1), 1, 0.1)
    # mid-save of epoch 2: the new file is in place but not yet in the manifest
    FakeTrainer(2).save_checkpoint(s.dir / ".epoch_002.ckpt.tmp")
    (s.dir / "epoch_002.ckpt").write_bytes((s.dir / ".epoch_002.ckpt.tmp").read_bytes())
    ready.set()
    go.wait(30)
    s.save(FakeTrainer(2), 2, 0.2)
    s.mark_complete()
    s.unlock()


def test_reader_never_wipes_a_store_being_written(tmp_path):
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    w = ctx.Process(target=_slow_writer, args=(tmp_path, ready, go))
    w.start()
    assert ready.wait(60)
    reader = _store(tmp_path, save_epochs=[1, 2])
    assert reader.status() == "partial"  # lock-free look: changes nothing
    t0 = time.perf_counter()
    go.set()
    reader.lock()  # waits for the writer
    assert time.perf_counter() - t0 < 30
    assert reader.verify() == "complete"
    reader.unlock()
    w.join(30)
    assert w.exitcode == 0
    assert [c.epoch for c in reader.checkpoints()] == [1, 2]


def test_lock_file_is_shared_and_artifacts_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        s = _store(tmp_path)
        s.lock()
        s.save(FakeTrainer(1), 1, 0.1)
        s.unlock()
    finally:
        os.umask(old)
    assert stat.S_IMODE((s.dir / ".lock").stat().st_mode) == 0o666
    for p in s.dir.iterdir():
        if p.name != ".lock":
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_another_user_reads_a_store_and_is_told_about_unreadable_files(tmp_path):
    s = _store(tmp_path, save_epochs=[1])
    s.lock()
    s.save(FakeTrainer(1), 1, 0.1)
    s.mark_complete()
    s.unlock()
    os.chmod(s.dir / "epoch_001.ckpt", 0o600)  # as a pre-fix mkstemp write left it
    with traversable(tmp_path):
        out = _as_nobody(_read_store, tmp_path)
        assert out.startswith("denied:") and "permission denied" in out and "uid 0" in out, out
        assert (s.dir / "epoch_001.ckpt").exists() and not list(s.dir.glob("*.corrupt"))
        os.chmod(s.dir / "epoch_001.ckpt", 0o644)
        assert _as_nobody(_read_store, tmp_path) == "complete 1"


@contextlib.contextmanager
def traversable(path):
    """Let other users traverse the (0700) pytest temp directories above ``path``."""
    changed = []
    for d in [path, *path.parents]:
        if d == d.parent or not str(d).startswith(tempfile.gettempdir()):
            break
        mode = stat.S_IMODE(d.stat().st_mode)
        if mode & 0o011 != 0o011:
            changed.append((d, mode))
            os.chmod(d, mode | 0o011)
    try:
        yield
    finally:
        for d, mode in changed:
            os.chmod(d, mode)


def _read_store(root, q):
    from ggda.errors import GGDAError

    s = ModelStore(root, "key", {"a": 1}, save_epochs=[1])
    try:
        s.lock()  # an existing 0666 lock file: another user can lock it
        status = s.verify()
        s.unlock()
        q.put(f"{status} {len(s.checkpoints())}")
    except GGDAError as e:
        q.put(f"denied: {e}")


def _as_nobody_target(fn, root, q):
    os.setgid(65534)
    os.setuid(65534)
    fn(root, q)


def _as_nobody(fn, root):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_as_nobody_target, args=(fn, root, q))
    p.start()
    out = q.get(timeout=60)
    p.join(30)
    return out


def test_resuming_a_store_keeps_its_epoch_times(tmp_path):
    # epoch_seconds.json is not a checkpoint, but it is no stray either: time/epoch of
    # every later run that reuses the model reads it.
    from ggda.lightning.callbacks.checkpoint import median_epoch_seconds, record_epoch_seconds

    s = _store(tmp_path)
    for e in (1, 2, 3):
        s.save(FakeTrainer(e), e, lr=0.1)
        record_epoch_seconds(s.dir, e, 0.5 * e)
    s.mark_complete()
    (s.dir / "stray.tmp").write_text("left by a kill")
    assert s.resume_path() == s.dir / "epoch_003.ckpt"
    assert not (s.dir / "stray.tmp").exists()
    assert median_epoch_seconds(s.dir) == 1.0
