"""bound_native_heap: freed large blocks go back to the kernel instead of staying in malloc's arenas."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamscore.ops.native_heap import ARENA_MAX, MMAP_THRESHOLD_BYTES

# A thread allocates 150 blocks of 2 MiB, each followed by a small block that stays alive (what a service's
# threads do: a query result, then a little state), then frees the large ones. Prints the RSS kept (MiB).
RETAINED = """
import json, sys, threading
from pathlib import Path
from streamscore.ops.native_heap import bound_native_heap
applied = bound_native_heap() if sys.argv[1] == "bounded" else {}
def rss_mib():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1]) / 1024
kept, before = [], []
def work():
    for size in (2 << 20, 2 << 20):  # glibc raises its mmap threshold after such a block is freed
        block = bytearray(size)
        del block
    before.append(rss_mib())
    large = []
    for _ in range(150):
        large.append(bytearray(2 << 20))
        kept.append(bytearray(200))
    large.clear()
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"retained_mib": rss_mib() - before[0], "applied": applied}))
"""


def _retained(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", RETAINED, mode], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_large_blocks_are_returned_to_the_kernel():
    default, bounded = _retained("default"), _retained("bounded")
    assert default["retained_mib"] > 200  # glibc's default keeps the 300 MiB freed in the thread's arena
    assert bounded["retained_mib"] < 20
    assert bounded["applied"] == {"MALLOC_ARENA_MAX": ARENA_MAX, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_an_operators_glibc_variable_is_left_as_it_is():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, "MALLOC_ARENA_MAX": "4"}
    code = "import json; from streamscore.ops.native_heap import bound_native_heap; print(json.dumps(bound_native_heap()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD_BYTES}
