"""The scorer keeps its entity states out of the cyclic garbage collector's scans (freeze_survivors),
without keeping states alive that it dropped."""
from __future__ import annotations

import gc
import tracemalloc

from streamscore import features
from streamscore.services.scorer.service import freeze_survivors


def entity_states(n: int) -> dict[str, features.EntityState]:
    states: dict[str, features.EntityState] = {}
    events = [{"event_id": f"e{i}", "entity_id": f"card-{i % n}", "event_time": 1_700_000_000_000 + i,
               "amount": 10.0 + i % 7, "currency": "EUR", "merchant_category": "5411"} for i in range(3 * n)]
    features.compute_batch(states, events, list(range(len(events))))
    return states


def test_frozen_states_are_not_scanned_but_still_freed():
    tracemalloc.start()
    try:
        states = entity_states(20_000)
        freeze_survivors()
        # the collector no longer walks them: a full collection cannot stall on them
        assert not any(type(obj) is features.EntityState for obj in gc.get_objects())
        held = tracemalloc.get_traced_memory()[0]
        del states
        freed = held - tracemalloc.get_traced_memory()[0]
        # reference counting still frees dropped states (a revoked partition's, say)
        assert freed > 0.8 * 20_000 * 500, f"only {freed:,} bytes freed"
    finally:
        tracemalloc.stop()
        gc.unfreeze()


def test_states_created_after_a_freeze_are_scanned_until_the_next_one():
    freeze_survivors()
    try:
        states = entity_states(100)
        assert sum(type(obj) is features.EntityState for obj in gc.get_objects()) == len(states)
        freeze_survivors()
        assert not any(type(obj) is features.EntityState for obj in gc.get_objects())
    finally:
        gc.unfreeze()
