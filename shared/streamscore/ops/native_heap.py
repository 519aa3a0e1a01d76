"""Keep the C heap of a long-running service process bounded (glibc's malloc; elsewhere nothing happens).

Why: in a soak of `run all` the process holding the embedded ClickHouse had 622 MiB of anonymous memory at
minute 2 while its Python objects were under 60 MiB and ClickHouse tracked 12-44 MiB (MemoryTracking); 234-265
MiB of it sat in glibc's 17 thread arenas (glibc allows 8 per core), and malloc_trim(0) gave back 91 MiB that
came back within 5 s. Dozens of threads (librdkafka's, ClickHouse's, the services') allocate there, and a
freed block strands in the arena of the thread that freed it.

What it sets, once per process before its threads start (mallopt(3)), unless the glibc variable is set:
- MALLOC_ARENA_MAX 2: threads share two arenas, so a freed block is reused by the next allocation.
- MALLOC_MMAP_THRESHOLD_ 1 MiB, fixed: a block of 1 MiB or more (a query result, a column, a training
  set's read) is its own mapping, unmapped when freed; fixing it also stops glibc from raising the
  threshold after such a free (which puts the next large blocks into the arenas).

Measured (docs/performance.md): arenas 97 MiB in 5 mappings instead of 234-265 MiB, RSS at the soak's minute
10 1,231-1,255 MiB instead of 1,349; the growth per million events after the warm-up did not change
measurably (ClickHouse's thread pool grows in one step at minutes 4-6).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD_BYTES = 1 << 20

# mallopt parameter -> (the environment variable glibc reads at start-up, the value set here)
HEAP_LIMITS = {
    M_ARENA_MAX: ("MALLOC_ARENA_MAX", ARENA_MAX),
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD_BYTES),
}


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def bound_native_heap() -> dict[str, int]:
    """Apply HEAP_LIMITS to this process; returns what was set (variable -> value). A variable already in the
    environment is the operator's choice and glibc applied it at start-up: left as it is."""
    libc = _libc()
    if libc is None:
        return {}
    applied = {}
    for parameter, (variable, value) in HEAP_LIMITS.items():
        if variable not in os.environ and libc.mallopt(parameter, value) == 1:
            applied[variable] = value
    return applied


def describe_heap_limits(applied: dict[str, int]) -> str:
    """For the log: what bound_native_heap set, and what it left to the environment."""
    if not applied and _libc() is None:
        return "not bounded (not glibc)"
    left = [f"{variable}={os.environ[variable]} (environment)" for variable, _ in HEAP_LIMITS.values()
            if variable in os.environ]
    return ", ".join([f"{variable}={value}" for variable, value in applied.items()] + left)
