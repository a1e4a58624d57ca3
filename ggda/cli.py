"""Hydra-side checks of the command line, before Hydra creates any directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _fail(message: str) -> None:
    print(f"ggda: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_output_dir(run_dir: Any) -> None:
    """Create the run (or sweep) directory, or stop with a one-line error naming the key."""
    if run_dir is None:
        return
    path = Path(str(run_dir))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(
            f"cannot create the output directory {path} ({e.strerror}): set "
            "`paths.output_dir=DIR` (or GGDA_OUTPUT_DIR) to a writable directory"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(
            f"the output directory {path} is not writable by this user: set "
            "`paths.output_dir=DIR` (or GGDA_OUTPUT_DIR) to a directory of your own"
        )


class OutputDirCheck(Callback):
    """Hydra callback: an unusable ``paths.output_dir`` is a one-line error, not a traceback."""

    # The run directory's name needs Hydra's overrides, which are not set yet when these
    # hooks run; what can be unusable is the output root it lies under.
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the output root before a single run starts.

        Args:
            config: the composed run config (``paths.output_dir`` is read).
            **kwargs: Hydra's other hook arguments (unused).
        """
        check_output_dir(OmegaConf.select(config, "paths.output_dir", throw_on_missing=False))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the output root before a sweep launches its jobs.

        Args:
            config: the composed sweep config (``paths.output_dir`` is read).
            **kwargs: Hydra's other hook arguments (unused).
        """
        check_output_dir(OmegaConf.select(config, "paths.output_dir", throw_on_missing=False))
