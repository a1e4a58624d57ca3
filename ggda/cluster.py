"""SLURM awareness: where this process runs, and following jobs on clusters without accounting.

Two facts decide how ggda uses a SLURM cluster:

* **Inside or outside an allocation.** A process started by ``sbatch``/``srun``/``salloc``
  (``SLURM_JOB_ID`` is set; every ``submitit_slurm`` sweep job is one) holds CPUs. If it
  submitted new jobs and waited for them, they could need exactly the CPUs it holds: on a
  full cluster, or under a per-user job limit, they stay pending forever while it waits
  (nested-submission deadlock). So ggda submits SLURM jobs only from a launching process
  outside any job; inside one, work runs within the job's own allocation
  (:func:`slurm_job_id`, used by :class:`ggda.evaluation.retrain.RetrainService`).
* **With or without accounting.** submitit follows its jobs with ``sacct``, which fails on
  clusters without accounting storage (small clusters, CI): it then warns at every poll
  and, worse, never learns that a job died without writing a result (``scancel``, OOM
  kill), so whoever waits on it waits forever. :func:`follow_jobs_without_accounting`
  makes submitit fall back to ``squeue`` there (it lists pending, running and recently
  finished jobs), notes that once, and treats a job ``squeue`` no longer knows as
  finished, so a missing result raises with the job's log paths instead of hanging.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import Any

log = logging.getLogger(__name__)

# State given to a job that squeue no longer lists (finished longer ago than MinJobAge).
GONE = "GONE"


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in (``SLURM_JOB_ID``), or None outside any job."""
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return job or None


def follow_jobs_without_accounting() -> bool:
    """Let submitit follow SLURM jobs with ``squeue`` where ``sacct`` fails (idempotent).

    Replaces ``submitit.slurm.slurm.SlurmJob.watcher`` (shared by every SLURM job of the
    process: Hydra's ``submitit_slurm`` launcher and ggda's retrain arrays) with a watcher
    that asks ``sacct`` first, as submitit does, and after its first failure asks
    ``squeue`` instead, with one log line saying so. A no-op where SLURM's client tools or
    submitit are missing.

    Returns:
        Whether the watcher is installed.
    """
    if shutil.which("squeue") is None:
        return False
    try:
        from submitit.slurm import slurm as ss
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    if isinstance(ss.SlurmJob.watcher, _watcher_class(ss)):
        return True
    old = ss.SlurmJob.watcher
    new = _watcher_class(ss)(delay_s=old._delay_s)
    # Jobs already registered with the old watcher (none, normally) keep being followed.
    new._registered |= old._registered
    ss.SlurmJob.watcher = new
    return True


_CLASS: dict[str, type] = {}


def _watcher_class(ss: Any) -> type:
    """A subclass of submitit's ``SlurmInfoWatcher``, made once (submitit imports lazily)."""
    if "watcher" in _CLASS:
        return _CLASS["watcher"]

    class SqueueFallbackWatcher(ss.SlurmInfoWatcher):
        """``sacct`` while it works, then ``squeue`` (see :mod:`ggda.cluster`)."""

        use_squeue = False

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            if not self.use_squeue:
                res = subprocess.run(command, capture_output=True)
                if res.returncode == 0:
                    self._info_dict.update(self.read_info(res.stdout))
                else:
                    self.use_squeue = True
                    why = res.stderr.decode(errors="replace").strip().splitlines()
                    log.warning(
                        "sacct does not answer here (%s): following SLURM jobs with squeue "
                        "instead (said once, in place of submitit's warning at every poll)",
                        why[-1] if why else f"exit status {res.returncode}",
                    )
            if self.use_squeue:
                self._info_dict.update(self._squeue_info())
            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

        def _squeue_info(self) -> dict[str, dict[str, str]]:
            """sacct-like info of the followed jobs; a job squeue does not list is GONE."""
            todo = self._registered - self._finished
            mains = sorted({j.split("_")[0] for j in todo})
            cmd = ["squeue", "-h", "--states=all", "-o", "%i|%T|%N", "-j", ",".join(mains)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.debug("squeue failed: %s", e)
                return {}
            if res.returncode != 0 and "Invalid job id" not in res.stderr:
                log.debug("squeue failed: %s", res.stderr.strip())
                return {}  # the controller did not answer: learn nothing this time
            info = self.read_info("JobID|State|NodeList\n" + res.stdout)
            for job_id in todo:
                if job_id not in info:  # finished, and purged from squeue (MinJobAge)
                    info[job_id] = {"JobID": job_id, "State": GONE, "NodeList": ""}
            return info

    _CLASS["watcher"] = SqueueFallbackWatcher
    return SqueueFallbackWatcher
