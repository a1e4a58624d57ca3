"""The base-model cache: reuse, resume, corruption."""

import torch

from ggda.models.store import ModelStore


class FakeTrainer:
    def __init__(self, value):
        self.value = value

    def save_checkpoint(self, path):
        torch.save({"state_dict": {"net.w": torch.full((2,), float(self.value))}}, path)


def test_save_verify_and_load(tmp_path):
    s = ModelStore(tmp_path, "key", {"a": 1}, save_epochs=[1, 3])
    assert s.verify() == "none"
    for e in (1, 2, 3):
        s.save(FakeTrainer(e), e, lr=0.1 * e)
    assert s.verify() == "partial"
    s.mark_complete()
    assert s.verify() == "complete"
    cks = s.checkpoints()
    assert [c.epoch for c in cks] == [1, 3]
    assert [round(c.lr, 6) for c in cks] == [0.1, 0.3]
    assert torch.equal(cks[1].state_dict["w"], torch.full((2,), 3.0))


def test_corrupt_checkpoint_wipes_store(tmp_path, caplog):
    s = ModelStore(tmp_path, "key", {"a": 1}, save_epochs=[1])
    s.save(FakeTrainer(1), 1, 0.1)
    s.mark_complete()
    (s.dir / "epoch_001.ckpt").write_bytes(b"garbage")
    assert s.verify() == "none"
    assert "fails its checksum" in caplog.text
    assert not (s.dir / "manifest.json").exists()


def test_other_config_is_not_reused(tmp_path):
    s = ModelStore(tmp_path, "key", {"a": 1}, save_epochs=[1])
    s.save(FakeTrainer(1), 1, 0.1)
    s.mark_complete()
    other = ModelStore(tmp_path, "key", {"a": 2}, save_epochs=[1])
    assert other.verify() == "none"
    assert not (tmp_path / "key" / "manifest.json").exists()
