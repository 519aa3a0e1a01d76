from __future__ import annotations

import math

from streamscore.ops.service_stats import ServiceStats


def test_latencies_are_the_newest_ones_in_a_fixed_ring():
    stats = ServiceStats("scorer", keep_latencies=10)
    stats.record_batch(3, 3, 0.01, [1.0, 2.0, 3.0])
    assert stats.latency_percentiles((0, 100)) == {0: 1.0, 100: 3.0}
    stats.record_batch(9, 9, 0.01, [float(v) for v in range(10, 19)])  # wraps: 1 and 2 fall out
    assert stats.latency_percentiles((0, 100)) == {0: 3.0, 100: 18.0}
    stats.record_batch(30, 30, 0.01, [float(v) for v in range(100, 130)])  # more than the ring: the newest 10
    assert stats.latency_percentiles((0, 100)) == {0: 120.0, 100: 129.0}
    assert stats._latencies_ms.nbytes == 80  # preallocated: memory does not grow with events
    stats.reset_latencies()
    assert math.isnan(stats.latency_percentiles((50,))[50])
