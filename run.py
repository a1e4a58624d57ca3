"""ggda entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra)."""

import logging
import multiprocessing
import sys

import hydra
from omegaconf import DictConfig

import ggda.config  # noqa: F401  (registers the config's resolvers)
from ggda.cluster import follow_jobs_without_accounting
from ggda.errors import GGDAError
from ggda.procs import Interrupted, exit_with_parent, install_interrupt_handler

follow_jobs_without_accounting()  # submitit_slurm sweeps: squeue where sacct fails


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ggda import pipeline

    if multiprocessing.current_process().name.startswith("LokyProcess"):
        exit_with_parent()  # a sweep job: do not outlive a killed sweep
    install_interrupt_handler()
    pipeline.configure_threads()
    try:
        metrics = pipeline.run(cfg)
    except GGDAError as e:  # the user's to fix: say how, without a traceback
        logging.getLogger("ggda").debug("stopped by a user error", exc_info=True)
        print(f"ggda: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as e:
        print(
            f"ggda: interrupted ({e}): finished work is kept in the cache "
            f"{cfg.paths.cache_dir} (model checkpoints of every finished epoch, groupings, "
            "scores, finished retrains); run the same command again to resume from there.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except PermissionError as e:  # a shared or read-only cache/output directory
        print(
            f"ggda: error: permission denied: {e.filename}: this user may not write there. "
            "Set `paths.cache_dir=DIR` (or `paths.output_dir=DIR`) to a directory of your "
            "own, or ask the owner to share it (`chmod -R g+rwX` with a common group).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
    return metrics.get("lds/point/mean")


if __name__ == "__main__":
    main()
