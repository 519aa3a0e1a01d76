"""The scorer keeps its long-lived objects out of the cyclic garbage collector's scans (freeze_survivors),
without keeping alive what it dropped or what was garbage.

Each check runs in a fresh interpreter: gc.freeze()/gc.unfreeze() act on the whole process, and
unfreezing the test process would hand everything earlier tests froze back to the collector at once.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

ENTITY_STATES = """
import gc
import tracemalloc

from streamscore.services.scorer.service import freeze_survivors


class Held:
    \"\"\"A long-lived object the collector tracks (a scorer holds ~215k such: modules, models, dicts).\"\"\"

    def __init__(self, i):
        self.values = [float(i)] * 60


def entity_states(n):
    return {f"card-{i}": Held(i) for i in range(n)}


def scanned_states():
    return sum(type(obj) is Held for obj in gc.get_objects())
"""


def run_isolated(check: str) -> None:
    result = subprocess.run([sys.executable, "-c", ENTITY_STATES + textwrap.dedent(check)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_frozen_states_are_not_scanned_but_still_freed():
    run_isolated("""
        tracemalloc.start()
        states = entity_states(20_000)
        freeze_survivors()
        # the collector no longer walks them: a full collection cannot stall on them
        assert scanned_states() == 0
        held = tracemalloc.get_traced_memory()[0]
        del states
        freed = held - tracemalloc.get_traced_memory()[0]
        # reference counting still frees dropped states (a revoked partition's, say)
        assert freed > 0.8 * 20_000 * 500, f"only {freed:,} bytes freed"
    """)


def test_states_created_after_a_freeze_are_scanned_until_the_next_one():
    run_isolated("""
        freeze_survivors()
        states = entity_states(100)
        assert scanned_states() == len(states) == 100
        freeze_survivors()
        assert scanned_states() == 0
    """)


def test_garbage_in_reference_cycles_is_freed_not_frozen():
    run_isolated("""
        import weakref

        class Node:
            pass

        gc.disable()  # as between two automatic collections
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b  # unreachable, kept alive only by their cycle
        freeze_survivors()
        assert gone() is None, "a garbage cycle was frozen: it would never be freed"
    """)
