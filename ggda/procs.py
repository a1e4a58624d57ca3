"""Process hygiene: workers that die with their parent, Ctrl-C that stops promptly.

- :func:`exit_with_parent`: called in every worker process (retrain pool workers, a sweep
  job inside a joblib/loky worker). On Linux the kernel sends SIGKILL to the worker when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``); a daemon thread also polls the parent
  pid, which covers other systems and parents that die between fork and ``prctl``.
- :func:`install_interrupt_handler`: Ctrl-C (SIGINT) and SIGTERM raise
  :class:`Interrupted` instead of ``KeyboardInterrupt``, which Lightning would catch and
  turn into ``sys.exit(1)`` after a "graceful shutdown" that keeps working.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """The user pressed Ctrl-C (SIGINT) or the job was sent SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    # A second Ctrl-C during clean-up should not produce a traceback from the clean-up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(signum)


def install_interrupt_handler() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


def exit_with_parent(parent: int | None = None, poll_s: float = 1.0) -> None:
    """Make this process exit as soon as its parent process dies.

    Args:
        parent: pid of the parent (default: the multiprocessing parent, else getppid());
            if it is already gone, exit at once.
        poll_s: period of the parent-pid check of the watchdog thread.
    """
    if parent is None:
        mp_parent = multiprocessing.parent_process()
        parent = mp_parent.pid if mp_parent is not None else os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the death signal was armed

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="ggda-parent-watchdog", daemon=True).start()
