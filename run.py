"""ggda entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

import ggda.config  # noqa: F401  (registers the config's resolvers)
from ggda.cluster import follow_jobs_without_accounting
from ggda.errors import GGDAError

follow_jobs_without_accounting()  # submitit_slurm sweeps: squeue where sacct fails


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ggda import pipeline

    pipeline.configure_threads()
    try:
        metrics = pipeline.run(cfg)
    except GGDAError as e:  # the user's to fix: say how, without a traceback
        logging.getLogger("ggda").debug("stopped by a user error", exc_info=True)
        print(f"ggda: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    return metrics.get("lds/point/mean")


if __name__ == "__main__":
    main()
