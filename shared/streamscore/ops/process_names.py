"""Names for streamscore's child processes, as `top`, `ps -o comm` and /proc/<pid>/comm show them.

A spawned child's command line is multiprocessing's (`python -c "from multiprocessing.spawn import ..."`) for
every child alike; the name tells the scorer's process from a training process at a glance, and lets the soak
bench leave the transient training processes out of its memory trend.
"""
from __future__ import annotations

import ctypes
import ctypes.util

TRAINING = "ss-training"
SCORER_PROCESS = "ss-scorer"  # a service in a process of its own is "ss-<service>" (services/service_process.py)
_PR_SET_NAME = 15  # prctl(2); the kernel keeps 15 bytes


def name_this_process(name: str) -> None:
    """Set this process's name (Linux; elsewhere, or without libc, nothing happens)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
