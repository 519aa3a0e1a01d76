"""The parent's view of a service in a child process (ProcessStats) against the child's answering loop, over a
real pipe: the same reads as ServiceStats, the child's metrics without the series the parent keeps, and a
broken pipe (the parent gone) stops the service."""
from __future__ import annotations

import math
import multiprocessing
import threading

import pytest

from streamscore.ops.service_stats import ServiceStats
from streamscore.services.service_process import ChildUnavailable, ProcessStats, _serve_requests


@pytest.fixture
def child():
    """(parent's ProcessStats, the child's ServiceStats, the child's stop event, its answering thread)."""
    mine, childs = multiprocessing.Pipe()
    stats = ServiceStats("scorer")
    stop = threading.Event()
    thread = threading.Thread(target=_serve_requests, args=(childs, stats, stop), daemon=True)
    thread.start()
    view = ProcessStats("scorer")
    view.attach(mine)
    yield view, stats, stop, thread
    view.detach()
    thread.join(5)


def test_the_parent_reads_what_the_child_counts(child):
    view, stats, _, _ = child
    assert view.running is False and view.events_in == 0
    stats.running, stats.model_version, stats.partitions_owned = True, 3, 4
    stats.record_batch(n_in=10, n_out=9, seconds=0.001, latencies_ms=[float(i) for i in range(1, 11)])
    stats.count_rejection("undecodable")
    assert (view.running, view.events_in, view.events_out, view.model_version, view.partitions_owned) == (
        True, 10, 9, 3, 4)
    assert view.rejections == {"undecodable": 1}
    assert view.latency_percentiles((50, 100)) == stats.latency_percentiles((50, 100)) == {50: 5.5, 100: 10.0}
    view.reset_latencies()
    assert math.isnan(stats.latency_percentiles((50,))[50])  # nothing kept


def test_metrics_come_from_the_child_except_the_series_the_parent_keeps(child):
    view, stats, _, _ = child
    stats.record_batch(n_in=5, n_out=5, seconds=0.001)
    view.count_restart()
    families = {family.name: family for family in view.registry.collect()}
    events_in = [s.value for s in families["streamscore_events_in"].samples if s.name.endswith("_total")]
    assert events_in == [5.0]
    # one restarts series (the parent's: a restarted child counts from 0) and the parent's lag gauge family
    restarts = [s.value for s in families["streamscore_service_restarts"].samples if s.name.endswith("_total")]
    assert restarts == [1.0]
    assert "streamscore_consumer_lag" in families


def test_stop_request_and_a_broken_pipe_both_stop_the_service(child):
    view, _, stop, thread = child
    view.tell("stop")
    assert stop.wait(5)
    stop.clear()
    view.detach()  # the parent's end closes, as when the parent process dies
    thread.join(5)
    assert stop.is_set() and not thread.is_alive()
    with pytest.raises(ChildUnavailable):
        view.ask("snapshot")
    assert view.running is False and view.events_in == 0  # no child: reads as not running


def test_a_late_reply_is_not_taken_for_the_next_request():
    mine, childs = multiprocessing.Pipe()
    view = ProcessStats("scorer")
    view.attach(mine)
    with pytest.raises(ChildUnavailable, match="did not answer"):
        view.ask("snapshot", timeout_s=0.1)  # nobody answers yet
    stats, stop = ServiceStats("scorer"), threading.Event()
    stats.model_version = 7
    thread = threading.Thread(target=_serve_requests, args=(childs, stats, stop), daemon=True)
    thread.start()  # the child answers the timed-out snapshot first, then this one
    try:
        assert list(view.latency_percentiles((50,))) == [50]  # not the stale snapshot's reply
        assert view.model_version == 7
    finally:
        view.detach()
        thread.join(5)
