"""The scorer in a child process of its own (what `run all` and the demo do, settings.scorer_own_process), the
logger a thread of this process, on the real broker and ClickHouse: events are scored exactly once, the
parent sees the child's counters and model version, a killed child is restarted by the group's policy and
goes on from its committed offsets, and a stop ends the child cleanly."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import example_spec, spec_codec, wait_until
from streamscore.dev.generators import generator_ending_now
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.ops.metrics import MetricsServer
from streamscore.services.runner import ServiceGroup, own_processes
from streamscore.services.service_process import ServiceProcess
from streamscore.services.tools.simulate import produce_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)


def counts(store) -> tuple[int, int]:
    """(rows, distinct event ids) of predictions, without FINAL: a duplicate would show."""
    return tuple(store.query("SELECT count(), uniqExact(event_id) FROM predictions").rows[0])


def test_scorer_in_its_own_process_scores_swaps_restarts_and_stops_cleanly(settings, store):
    names = ["scorer", "logger"]
    assert own_processes(settings, names) == {"scorer"}  # the default of `run all` and the demo
    simulator = generator_ending_now(PAYMENTS, seed=3, n_entities=200, n_events=9_000)
    # (bulk_work_nice 0: this test process's threads keep their priority; test_shared_store checks it in `run all`)
    group = ServiceGroup(settings.model_copy(update={"service_restart_backoff_s": 0.2, "bulk_work_nice": 0}), names,
                         store=store, processes=own_processes(settings, names)).start()
    try:
        scorer = group.services["scorer"]
        assert isinstance(scorer, ServiceProcess)
        wait_until(lambda: scorer.stats.partitions_owned == settings.partitions, "the child owns every partition",
                   group)
        history = produce_simulation(settings, PAYMENTS, CODEC, simulator, 4_000)
        wait_until(lambda: counts(store)[1] >= 4_000, "4,000 predictions logged", group)
        assert scorer.stats.events_in >= 4_000 and scorer.stats.events_out >= 4_000

        # a model promoted in the registry reaches the child's pipeline (loaded off its scoring loop)
        wait_until(lambda: store.query("SELECT count() FROM labels FINAL").rows[0][0] >= history.labels, "labels",
                   group)
        outcome = train_and_register(store, ModelRegistry(settings.registry_dir), settings, PAYMENTS,
                                     reason="test: v1")
        publish_model_updates(settings, CODEC, outcome.events)
        if outcome.promoted:
            wait_until(lambda: scorer.stats.model_version == outcome.version.version, "the child serving v1", group)

        # the parent's metrics endpoint serves the child's counters
        with MetricsServer(settings, {n: s.stats for n, s in group.services.items()}, port=0) as metrics:
            families = {f.name: f for f in metrics.collector.collect()}
            served = [s for s in families["streamscore_events_in"].samples
                      if s.labels["service"] == "scorer" and s.name.endswith("_total")]
            assert served and served[0].value >= 4_000

        # kill -9 of the child: the group restarts it (a new handle, the same stats); it resumes from its
        # committed offsets
        old_pid = scorer.process.pid
        os.kill(old_pid, signal.SIGKILL)
        restarted = lambda: getattr(group.services["scorer"].process, "pid", old_pid) != old_pid  # noqa: E731
        wait_until(lambda: scorer.stats.restarts == 1 and restarted()
                   and scorer.stats.partitions_owned == settings.partitions, "a restarted scorer process", group)
        scorer = group.services["scorer"]
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 3_000)
        wait_until(lambda: counts(store)[1] >= 7_000, "7,000 distinct predictions", group)
        assert group.running_services() == {"scorer": True, "logger": True}
    finally:
        group.shutdown(60)
    assert scorer.process.exitcode == 0  # stopped when asked: flushed and committed
    assert not scorer.stats.running
    store.command("OPTIMIZE TABLE predictions FINAL")
    rows, distinct = counts(store)
    assert rows == distinct == 7_000, "after FINAL: every event exactly once"
