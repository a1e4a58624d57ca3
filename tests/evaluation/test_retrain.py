"""The retraining service: backends agree, the cache is shared and safe under concurrency."""

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from factory import tiny_bundle, tiny_recipe
from ggda.errors import ConfigError, GGDAError
from ggda.evaluation import retrain as rt
from ggda.evaluation.retrain import RetrainService, compute_entry, entry_lock
from ggda.io import load_artifact, save_artifact
from ggda.models.training import train_lean


def _service(cache: Path, **kw) -> RetrainService:
    return RetrainService(cache, **kw).bind(tiny_recipe(), tiny_bundle(), "tinykey")


def _masks(n: int = 40, count: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, n, generator=g) < 0.6


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "retrain" / "tinykey").glob("*.pt"))


def test_sequential_matches_a_direct_retrain_and_is_cached(tmp_path):
    torch.set_num_threads(1)
    svc = _service(tmp_path, backend="sequential")
    masks = _masks()
    out = svc.run(masks, [0, 1])
    assert out["val"].shape == (3, 2, 20, 3) and out["test"].shape == (3, 2, 20, 3)
    b = tiny_bundle()
    idx = masks[1].nonzero().squeeze(1)
    net = train_lean(tiny_recipe(), b.x_train[idx], b.y_train[idx], b.num_classes, 1)
    with torch.no_grad():
        torch.testing.assert_close(out["test"][1, 1], net(b.x_test).float())
    assert svc.stats["retrains_run"] == 6 and len(_entries(tmp_path)) == 6
    again = _service(tmp_path, backend="sequential")
    torch.testing.assert_close(again.run(masks, [0, 1])["val"], out["val"])
    assert again.stats == again.stats | {"retrains_run": 0, "retrains_cached": 6}


def test_repeated_subset_is_trained_once(tmp_path):
    svc = _service(tmp_path, backend="sequential")
    m = _masks(count=2)
    masks = torch.stack([m[0], m[1], m[0]])
    out = svc.run(masks, [0])
    assert svc.stats["retrains_run"] == 2 and len(_entries(tmp_path)) == 2
    torch.testing.assert_close(out["val"][0], out["val"][2])


@pytest.mark.slow
def test_submitit_local_backend_matches_sequential(tmp_path):
    torch.set_num_threads(1)
    masks = _masks(count=3)
    ref = _service(tmp_path / "a", backend="sequential").run(masks, [0])
    svc = _service(tmp_path / "b", backend="submitit", executor="local", workers=2)
    out = svc.run(masks, [0])
    # Same recipe, seed and subset: the same model, trained in another process.
    torch.testing.assert_close(out["val"], ref["val"], rtol=1e-4, atol=1e-5)
    assert svc.stats["retrains_run"] == 3 and len(_entries(tmp_path / "b")) == 3
    assert any((tmp_path / "b" / "submitit").rglob("*_log.out"))  # submitit's job logs


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="retrain.backend"):
        RetrainService(tmp_path, backend="threads")
    with pytest.raises(ConfigError, match="retrain.executor"):
        RetrainService(tmp_path, backend="submitit", executor="pbs")
    with pytest.raises(GGDAError, match="unknown keys"):
        RetrainService(tmp_path, slurm={"partion": "gpu"})
    svc = _service(tmp_path, backend="sequential")
    with pytest.raises(GGDAError, match="empty subset"):
        svc.run(torch.zeros(1, 40, dtype=torch.bool), [0])


def test_auto_workers_uses_the_job_share(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert rt.auto_workers() >= 1  # a plain run: every visible CPU, whatever OMP says
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert rt.auto_workers() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    assert rt.auto_workers() == 5


def _race(cache: str, barrier, queue) -> None:
    """One of two processes asking for the same subset at the same moment."""
    torch.set_num_threads(1)
    svc = _service(Path(cache), backend="sequential")
    barrier.wait()
    out = svc.run(_masks(count=1), [7])
    queue.put((svc.stats["retrains_run"], out["test"].tolist()))


@pytest.mark.slow
def test_two_processes_retraining_the_same_subset_leave_one_valid_entry(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    entries = _entries(tmp_path)
    assert len(entries) == 1  # one entry, no stray temp files
    assert not list((tmp_path / "retrain" / "tinykey").glob("*.tmp"))
    svc = _service(tmp_path, backend="sequential")
    path, meta = svc.entry(_masks(count=1)[0], 7)
    stored = load_artifact(entries[0], meta)  # checksum and config verified
    assert path == entries[0]
    # The per-entry lock: exactly one process trained, the other read its result.
    assert sorted(n for n, _ in got) == [0, 1]
    torch.testing.assert_close(torch.tensor(got[0][1])[0, 0], stored["test"])
    assert got[1][1] == got[0][1]


def _compute(path: str, meta: dict, idx: torch.Tensor, queue) -> None:
    _, computed = compute_entry(tiny_recipe(), tiny_bundle(), path, meta, idx, 0)
    queue.put(computed)


@pytest.mark.slow
def test_entry_lock_makes_a_second_process_wait_and_reuse(tmp_path):
    """While one process holds an entry's lock (it is training), another waits, then
    reads the entry instead of training it again."""
    svc = _service(tmp_path, backend="sequential")
    mask = _masks(count=1)[0]
    idx = mask.nonzero().squeeze(1)
    path, meta = svc.entry(mask, 0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with entry_lock(path):
        p = ctx.Process(target=_compute, args=(str(path), meta, idx, queue))
        p.start()
        p.join(timeout=5)
        assert p.is_alive()  # blocked on the lock
        out = rt._train_and_measure(tiny_recipe(), tiny_bundle(), idx, 0, "cpu")
        save_artifact(path, out, meta)
        stamp = path.stat().st_mtime_ns
    assert queue.get(timeout=120) is False  # it found the entry: nothing trained
    p.join(timeout=60)
    assert p.exitcode == 0
    assert path.stat().st_mtime_ns == stamp


def test_busy_entries_are_done_last_so_concurrent_jobs_share_the_work(tmp_path):
    """An entry another job is computing (its lock held) is skipped first and read from the
    cache at the end, instead of blocking the other retrains."""
    import threading

    svc = _service(tmp_path, backend="sequential")
    masks = _masks(count=3)
    items = []
    for m in masks:
        path, meta = svc.entry(m, 0)
        items.append((str(path), meta, m.nonzero().squeeze(1), 0))
    got = {}

    def job():
        got["out"], got["computed"] = rt.compute_entries(tiny_recipe(), tiny_bundle(), items)

    with entry_lock(items[0][0]):  # "another job" is computing the first entry
        t = threading.Thread(target=job)
        t.start()
        for _ in range(600):
            if all(Path(p).exists() for p, *_ in items[1:]):
                break
            t.join(timeout=0.05)
        assert all(Path(p).exists() for p, *_ in items[1:])  # the others did not wait
        assert not Path(items[0][0]).exists() and t.is_alive()  # now waiting for the first
        p0, meta0, idx0, _ = items[0]
        save_artifact(
            p0, rt._train_and_measure(tiny_recipe(), tiny_bundle(), idx0, 0, "cpu"), meta0
        )
    t.join(timeout=60)
    assert got["computed"] == 2 and set(got["out"]) == {p for p, *_ in items}


@pytest.mark.slow
def test_process_backend_matches_sequential(tmp_path):
    torch.set_num_threads(1)
    masks = _masks(count=4)
    ref = _service(tmp_path / "a", backend="sequential").run(masks, [0])
    svc = _service(tmp_path / "b", backend="process", workers=2, min_parallel=1)
    out = svc.run(masks, [0])
    torch.testing.assert_close(out["val"], ref["val"], rtol=1e-4, atol=1e-5)
    assert svc.stats["retrains_run"] == 4 and len(_entries(tmp_path / "b")) == 4
