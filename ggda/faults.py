"""Fault injection for the interruption tests: die hard at a named stage.

Set ``GGDA_FAULT=<stage>`` (``train_epoch_<n>``, ``grouped``, ``attributed``,
``evaluated_<name>``, ``retrain_<i>``) and the process exits with status 137 (as if
SIGKILLed) right after that stage's outputs are written. Unset in normal use: one
environment lookup per stage boundary, nothing else.
"""

from __future__ import annotations

import os
import sys


def maybe_fail(stage: str) -> None:
    """Exit immediately (no cleanup, like a kill) if ``GGDA_FAULT`` names ``stage``."""
    if os.environ.get("GGDA_FAULT") == stage:
        sys.stderr.write(f"GGDA_FAULT: simulated kill after stage {stage}\n")
        sys.stderr.flush()
        os._exit(137)
