"""CPU priority (nice) per thread: on one host, `run all`'s bulk work yields to the scorer.

`run all` and the demo run the scorer in a child process of its own; the process that spawned it goes on
logging, monitoring drift, judging rollouts and serving the embedded ClickHouse (inserts, merges). None of
that is on an event's path to its prediction, but on a 2-core host it competes with the scorer and the
broker for the same cores. Linux keeps a nice value per thread and a new thread (or child process) inherits
its creator's, so raising the nice value of every thread of that process, except the threads that supervise
the child processes (a restarted scorer must not inherit it; an unprivileged process can never lower it
again), lowers everything it starts later too. Training processes go further, to nice 19
(learning/training_process.py).

"""
from __future__ import annotations

import os
from collections.abc import Iterable

MAX_NICE = 19


def thread_ids() -> list[int]:
    """The native ids of this process's threads (Linux /proc; elsewhere none)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return []


def niceness(native_id: int) -> int:
    """The nice value of one thread (or process) of this host."""
    return os.getpriority(os.PRIO_PROCESS, native_id)


def nice_at_least(native_ids: Iterable[int], nice: int) -> int:
    """Raise each thread's nice value to `nice` (at most 19) where it is lower; returns how many it changed.
    Idempotent, so a second pass catches a thread started while the first ran. A thread that ended meanwhile
    is skipped."""
    nice = min(MAX_NICE, nice)
    changed = 0
    for native_id in native_ids:
        try:
            if niceness(native_id) < nice:
                os.setpriority(os.PRIO_PROCESS, native_id, nice)
                changed += 1
        except (ProcessLookupError, PermissionError):
            continue
    return changed
