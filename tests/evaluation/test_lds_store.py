"""The LDS store: datamodels layout, resumable, shared; export round trip.

The round trip: LDS with real retrains -> run directory as the pipeline writes it ->
``python -m ggda.lds export`` -> an independent Spearman (scipy) of masks @ point scores
against the exported measurements equals ggda's LDS.
"""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from factory import tiny_bundle, tiny_recipe
from ggda import lds as lds_cli
from ggda.attribution.properties import QueryProperty
from ggda.evaluation.base import EvalContext
from ggda.evaluation.lds import LDS, subset_seeds
from ggda.evaluation.lds_store import LDSStore, find_stores
from ggda.evaluation.retrain import RetrainService
from ggda.grouping.base import Grouping
from ggda.io import atomic_torch_save


def _service(cache, bundle=None):
    return RetrainService(cache, backend="sequential").bind(
        tiny_recipe(), bundle or tiny_bundle(n=40), "tinykey"
    )


def _masks(count=4, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, n, generator=g) < 0.5


def test_subset_seeds_are_distinct_per_subset_or_shared():
    per = subset_seeds(0, 5, 2, "per_subset")
    assert per.shape == (5, 2) and per.unique().numel() == 10
    shared = subset_seeds(3, 5, 2, "shared")
    assert (shared == torch.tensor([300009, 300010])).all()
    assert not set(per.flatten().tolist()) & set(subset_seeds(0, 5, 2, "shared").flatten().tolist())


def test_store_layout_and_manifest(tmp_path):
    svc = _service(tmp_path)
    masks, seeds = _masks(), subset_seeds(0, 4, 2)
    st = svc.store("point", masks, seeds, {"alpha": 0.5})
    out = svc.run(masks, seeds, store=st)
    man = json.loads((st.path / "manifest.json").read_text())
    assert man["n"] == 40 and man["recipe_key"] == "tinykey" and man["complete"] == [0, 1, 2, 3]
    assert man["sampler"] == {"alpha": 0.5} and set(man["arrays"]) >= {"masks", "seeds"}
    m = np.load(st.path / "masks.npy", mmap_mode="r")
    assert isinstance(m, np.memmap) and m.dtype == bool and np.array_equal(m, masks.numpy())
    assert np.array_equal(np.load(st.path / "seeds.npy"), seeds.numpy())
    lv = np.load(st.path / "logits_val.npy", mmap_mode="r")
    np.testing.assert_array_equal(lv, out["val"].numpy())
    # each row is the retrain of that subset with that row's seed
    b = tiny_bundle(n=40)
    from ggda.models.training import train_lean

    net = train_lean(tiny_recipe(), b.x_train[masks[2]], b.y_train[masks[2]], 3, int(seeds[2, 1]))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(np.array(lv[2, 1])), net(b.x_val).float())
    assert find_stores(tmp_path)[0].path == st.path


def test_complete_rows_are_read_and_lost_rows_recomputed(tmp_path):
    svc = _service(tmp_path)
    masks, seeds = _masks(), subset_seeds(0, 4, 1)
    ref = svc.run(masks, seeds, store=svc.store("point", masks, seeds))
    for p in (tmp_path / "retrain").rglob("*.pt"):
        p.unlink()  # only the store is left
    again = _service(tmp_path)
    st = again.store("point", masks, seeds)
    torch.testing.assert_close(again.run(masks, seeds, store=st)["test"], ref["test"])
    assert again.stats["retrains_run"] == 0
    # a run killed after rows 0 and 2 were recorded: the others are retrained, once
    man = st.manifest()
    man["complete"] = [0, 2]
    (st.path / "manifest.json").write_text(json.dumps(man))
    third = _service(tmp_path)
    torch.testing.assert_close(third.run(masks, seeds, store=st)["test"], ref["test"])
    assert third.stats["retrains_run"] == 2 and st.complete() == [0, 1, 2, 3]


def test_store_refuses_other_masks_under_its_name(tmp_path):
    svc = _service(tmp_path)
    masks, seeds = _masks(), subset_seeds(0, 4, 1)
    st = svc.store("point", masks, seeds)
    np.save(st.path / "masks.npy", ~masks.numpy())
    with pytest.raises(Exception, match="other subsets"):
        svc.store("point", masks, seeds)


def _run_dir(tmp_path, svc, bundle, grouping, scores, lds):
    """What the pipeline writes for an LDS run: scores, grouping and the LDS tables."""
    res = lds.evaluate(EvalContext(bundle, grouping, scores, QueryProperty(), svc))
    run = tmp_path / "run"
    atomic_torch_save(run / "scores.pt", scores)
    atomic_torch_save(run / "grouping.pt", grouping.group_ids)
    (run / "tables").mkdir(parents=True)
    for name, df in res.tables.items():
        df.to_csv(run / "tables" / f"lds_{name}.csv", index=False)
    return run, res


def test_export_round_trip_recomputes_ggda_lds_independently(tmp_path):
    bundle = tiny_bundle(n=40)
    svc = _service(tmp_path / "cache", bundle)
    grouping = Grouping(torch.arange(40) % 8, 8)
    scores = torch.randn(8, bundle.query_idx.numel(), generator=torch.Generator().manual_seed(1))
    run, res = _run_dir(tmp_path, svc, bundle, grouping, scores, LDS(num_subsets=6))
    assert lds_cli.main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    for level in ("point", "group"):
        with np.load(tmp_path / "exp" / f"lds_{level}.npz") as f:
            masks, meas, ps = f["masks"], f["measurements"], f["point_scores"]
            man = json.loads(str(f["manifest"]))
            assert masks.shape == (6, 40) and meas.shape == (6, scores.shape[1])
            assert len(np.unique(f["seeds"])) == 6  # a distinct seed per subset
            assert man["level"] == level and man["sampler"]["seed_mode"] == "per_subset"
        pred = masks.astype(float) @ ps
        rho = [spearmanr(pred[:, q], meas[:, q]).statistic for q in range(meas.shape[1])]
        rho = np.array(rho)
        assert np.nanmean(rho) == pytest.approx(res.metrics[f"{level}/mean"], abs=1e-12)
        np.testing.assert_allclose(
            lds_cli.lds_of_export(tmp_path / "exp" / f"lds_{level}.npz"), rho
        )
    # the measurements are the property on the stored logits (the cache export has both)
    files = lds_cli.export(tmp_path / "cache", tmp_path / "cache_exp")
    assert len(files) == 2
    with np.load(next(f for f in files if f.name.startswith("point"))) as f:
        vals = QueryProperty().values(torch.from_numpy(f["logits_test"]).double(), bundle)
        np.testing.assert_allclose(vals.mean(1).numpy(), f["measurements"], rtol=1e-6)
        assert f["complete"].all()


def test_export_errors_name_the_path(tmp_path, capsys):
    assert lds_cli.main(["export", str(tmp_path)]) == 2
    assert "ggda: error:" in capsys.readouterr().err


def _job(cache, queue):
    torch.set_num_threads(1)
    svc = _service(cache)
    masks, seeds = _masks(count=3), subset_seeds(0, 3, 1)
    out = svc.run(masks, seeds, store=svc.store("point", masks, seeds))
    queue.put((svc.stats["retrains_run"], out["test"].numpy()))


@pytest.mark.slow
def test_two_jobs_share_one_store(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_job, args=(tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(n for n, _ in got) == 3  # every subset trained by exactly one job
    np.testing.assert_array_equal(got[0][1], got[1][1])
    (st,) = find_stores(tmp_path)
    assert st.complete() == [0, 1, 2]
    np.testing.assert_array_equal(st.logits("test"), got[0][1])
    assert isinstance(st, LDSStore) and not list(st.path.glob("*.tmp"))
