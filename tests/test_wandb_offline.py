"""W&B as a dashboard sees it: the offline ``.wandb`` run files read back, no server.

A ``.wandb`` file is a LevelDB-style log (32 KiB blocks of CRC32C + length + type headed
records) of ``wandb.proto`` ``Record`` messages; the reader below follows that format.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from factory import run_cli

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768  # LevelDB log block size
HEADER = 7  # crc32c (4) + length (2) + type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every ``Record`` of an offline run file, in order."""
    buf = Path(path).read_bytes()
    assert buf[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""  # magic (4) + version (2) + reserved (1)
    while pos + HEADER <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        data = buf[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FIRST, MIDDLE):
            pending = data if kind == FIRST else pending + data
            continue
        rec = pb.Record()
        rec.ParseFromString(data if kind == FULL else pending + data)
        pending = b""
        yield rec


def read_run(path: Path) -> dict:
    """name, id, group, tags, config (key -> decoded JSON), summary, history keys, metrics."""
    out = {"config": {}, "summary": {}, "history": set(), "metrics": {}, "tags": []}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out |= {
                "name": r.run.display_name,
                "id": r.run.run_id,
                "group": r.run.run_group,
                "job_type": r.run.job_type,
                "tags": list(r.run.tags),
            }
            items = r.run.config.update
        elif kind == "config":
            items = r.config.update
        else:
            items = []
        for it in items:
            out["config"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        if kind == "summary":
            for it in r.summary.update:
                out["summary"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "history":
            out["history"] |= {it.key or "/".join(it.nested_key) for it in r.history.item}
        elif kind == "metric":
            out["metrics"][r.metric.name or r.metric.glob_name] = r.metric.step_metric
    return out


def run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/*.wandb"))
    assert len(files) == 1, files
    return files[0]


def _read_when_written(run_dir: Path, timeout: float = 60.0) -> dict:
    """read_run once the run record is on disk: ``run.finish()`` in this process can return
    before W&B's writer process has flushed the file (seen once on a loaded machine)."""
    deadline = time.time() + timeout
    while True:
        run = read_run(run_file(run_dir))
        if "id" in run or time.time() > deadline:
            return run
        time.sleep(0.5)


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_sweep_runs_and_the_report_run_read_back_from_offline_files(tmp_path, monkeypatch):
    from ggda import report as rp

    monkeypatch.setenv("WANDB_MODE", "offline")
    smoke = ["experiment=smoke", "logger=wandb", "evaluation.lds.levels=[point]"]
    _ok(run_cli(["-m", *smoke, "groups=4,8"], tmp_path))
    _ok(run_cli(["-m", *smoke, "grouping=singleton"], tmp_path))
    sweep = tmp_path / "multirun" / "sweep"
    job_dirs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(job_dirs) == 3
    for d in job_dirs:
        run = read_run(run_file(d))
        metrics = json.loads((d / "metrics.json").read_text())
        assert run["name"] == d.name  # display name = the run directory's name
        assert run["group"] == "sweep" and "sweep:sweep" in run["tags"]
        k = run["config"]["grouping/k"]
        assert isinstance(k, int) and k == metrics["grouping/k"] == metrics["attribution/k"]
        # `groups` as given: the job's override, else the smoke preset's 8
        asked = 4 if "groups=4" in d.name.split(",") else 8
        assert run["config"]["groups_requested"] == run["config"]["groups"] == asked
        for key in ("lds/point/mean", "time/attribution", "grouping/largest_share"):
            assert run["summary"][key] == pytest.approx(metrics[key]), key
        assert run["metrics"]["lds/*"] == run["metrics"]["time/*"] == "grouping/k"
    singleton = read_run(
        run_file(sweep / "evaluation.lds.levels=[point],experiment=smoke,grouping=singleton")
    )
    assert singleton["config"]["grouping/k"] == 64  # k = n, whatever `groups` said

    rp.report(sweep, wandb=True)
    second = rp.report(sweep, wandb=True)
    offline = sorted((sweep / "report" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and str(offline[0]) in second["wandb_dir"]  # updated, not added
    rep = _read_when_written(sweep / "report")
    assert rep["id"] == rp.wandb_run_id(sweep) and rep["name"] == "report-sweep"
    assert rep["job_type"] == "report" and {"sweep:sweep", "report"} <= set(rep["tags"])
    charts = {
        k.rsplit("/", 1)[1]: v["panel_config"]["panelDefId"]
        for k, v in rep["config"].items()
        if k.startswith("_wandb/visualize/")
    }
    assert charts == {
        "lds_point_vs_k": "wandb/line/v0",
        "lds_vs_time": "wandb/scatter/v0",
    }
    best = second["best"]["tracin"]
    assert rep["summary"]["best/tracin/k"] == best["k"] and best["k"] in (4, 8)
    assert rep["summary"]["best/tracin/grouping"] == "kmeans"
    assert rep["summary"]["best/rule"] == rp.BEST_RULE
    assert {"report/runs", "report/summary"} <= {k.rsplit("/", 1)[0] for k in rep["history"]}
