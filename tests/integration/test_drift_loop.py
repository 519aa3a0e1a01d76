"""The drift -> retrain -> hot-swap loop end to end, on the real broker and ClickHouse.

scorer + logger + drift + trainer run as threads of this process (ServiceGroup,
sharing the test's store). History -> v1 trained and promoted -> a live stream
with the simulator's concept drift (card testing: v1's AUC falls to ~0.65) must
produce exactly one retrain request, kind='drift' rows, v2 registered and
promoted and the scorer serving v2; the same stream without drift must produce
no request and no drift rows. A restart test checks the drift checkpoint.

Sizes: 200 entities make ~2000 events a simulated day, so 16k history events
cover the 7-day feature windows (a younger stream drifts by itself as entity
histories fill up) and a 2000-event window is about a day.
The drift service runs with its default detectors and thresholds (only the
windows, cool-down and checkpoint interval are sized for the test): feature
drift is recorded in drift_events, and only evidence of harm (labels, the
label-free estimate, importance-weighted drift) requests a retrain.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from confluent_kafka import TopicPartition

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.io import make_consumer
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.services.tools.demo import wait_for_rows, wait_until_accounted
from streamscore.services.drift.service import DriftService
from streamscore.services.runner import ServiceGroup
from streamscore.dev.generators import Drift, generator_ending_now
from streamscore.services.tools.simulate import produce_simulation
from streamscore.settings import TOPIC_RETRAIN
from streamscore.learning.training import train_model
from conftest import example_spec, offline_matrix, spec_codec
from conftest import wait_until as wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)
WAIT_S = 120.0
ENTITIES = 200
HISTORY = 16_000
LIVE = 10_000
DRIFT_AT = 3_000  # live index of the first drifted event
LOOP_SETTINGS = dict(
    drift_window=2000, drift_min_events=2000, drift_perf_window=2000,
    drift_cooldown_events=100_000, drift_checkpoint_interval_s=1.0,
    logger_flush_interval_s=0.5, train_num_boost_round=100,
    # Retrain on ~2.5 simulated days (features still replay the whole history) once 2500 post-detection
    # labels are in: the candidate learns the new regime and the gate's holdout is mostly post-drift.
    trainer_window_days=2.5, trainer_min_new_labels=2500,
    # ...or after 20 s: labels arrive ~1 s (3,000 events) after their event, so a detection late in the live
    # phase may leave fewer than 2500 to come (the default 300 s wait outlasts the test)
    trainer_max_wait_s=20.0,
)


def wait_until(condition, what: str, group: ServiceGroup | None = None, timeout_s: float = WAIT_S):
    """conftest's wait_until that also says what the drift service saw."""
    return wait_for(condition, what, group, timeout_s=timeout_s,
                    describe=lambda: drift_status(group.services.get("drift")) if group is not None else "")


def drift_status(drift) -> str:
    if drift is None or drift.tracker.monitor is None:
        return "no drift monitor"
    t, m = drift.tracker, drift.tracker.monitor
    snapshot = {f"{s.feature or ''}.{s.statistic}": round(s.value, 4) for s in m.snapshot()
                if s.statistic in ("log_loss", "auc", "psi", "mean_shift_std")}
    return (f"drift monitor v{m.model_version}: {m.predictions_seen} predictions, {m.labels_seen} labels, "
            f"{m.windows_completed} windows, other-version predictions {t.predictions_other_version}, labels "
            f"{t.labels_other_version}, waiting {t.labels_waiting}, unmatched {t.labels_unmatched}; last {snapshot}")


def retrain_messages(settings) -> list[dict]:
    """Every record on the retrain topic (read from the start by a throwaway group)."""
    topic = settings.topic(TOPIC_RETRAIN)
    consumer = make_consumer(settings, f"{settings.consumer_group_prefix}-reader-{time.monotonic_ns()}")
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        if high <= low:
            return []
        consumer.assign([TopicPartition(topic, 0, low)])
        records = []
        deadline = time.monotonic() + 30
        while len(records) < high - low and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if not msg.error():
                    records.append(CODEC.decode(msg.value(), "retrain_request"))
        return records
    finally:
        consumer.close()


def drift_rows(store) -> int:
    return int(store.query("SELECT count() FROM drift_events WHERE kind = 'drift'").rows[0][0])


def requested_rows(store) -> int:
    return int(store.query("SELECT count() FROM drift_events WHERE retrain_requested = 1").rows[0][0])


def run_history_and_v1(settings, store, group, simulator):
    report = produce_simulation(settings, PAYMENTS, CODEC, simulator, HISTORY)
    assert wait_until_accounted(store, HISTORY, timeout_s=WAIT_S) >= HISTORY
    wait_for_rows(store, "labels", report.labels, timeout_s=WAIT_S)
    registry = ModelRegistry(settings.registry_dir)
    outcome = train_and_register(store, registry, settings, PAYMENTS, reason="test: v1")
    assert outcome.promoted, outcome.gate_reason
    publish_model_updates(settings, CODEC, outcome.events)
    wait_until(lambda: group.services["scorer"].pipeline.model.version == 1, "scorer serving v1", group)
    wait_until(lambda: group.services["drift"].tracker.model_version == 1, "drift monitor on v1", group)
    return registry


@pytest.fixture
def loop_settings(store, settings):
    return settings.model_copy(update=LOOP_SETTINGS)


def test_concept_drift_triggers_one_retrain_and_the_scorer_serves_v2(loop_settings, store):
    settings = loop_settings
    simulator = generator_ending_now(PAYMENTS, 11, ENTITIES, HISTORY + LIVE + 1000,
                                     drift=Drift("concept", at_event=HISTORY + DRIFT_AT))
    with ServiceGroup(settings, ["scorer", "logger", "drift", "trainer"], store=store) as group:
        registry = run_history_and_v1(settings, store, group, simulator)
        drift, trainer = group.services["drift"], group.services["trainer"]
        live_started = time.time()
        live = produce_simulation(settings, PAYMENTS, CODEC, simulator, LIVE, rate=3000, keep_ids=True)
        injected_wall = live_started + DRIFT_AT / 3000  # when the first drifted event was produced
        outcome = wait_until(lambda: next(iter(trainer.outcomes), None), "a retrain outcome", group)
        assert outcome.action == "promoted", outcome
        assert registry.read_production_version(settings.model_name) == 2
        wait_until(lambda: group.services["scorer"].pipeline.model.version == 2, "scorer serving v2", group)
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 1000)
        wait_until(lambda: store.query("SELECT count() FROM predictions WHERE model_version = 2").rows[0][0] > 0,
                   "predictions by v2", group)
        wait_until(lambda: drift.tracker.model_version == 2, "drift monitor on v2", group)
        detected_wall, request = drift.requests_sent[0]

    requests = retrain_messages(settings)
    assert len(requests) == 1, requests
    assert requests[0] == request and request["model_version"] == 1
    assert drift_rows(store) >= 1
    # ... and the detections and window statistics are exported as Prometheus metrics too.
    detections = drift.stats.registry.get_sample_value(
        "streamscore_drift_detections_total",
        {"service": "drift", "detector": request["detector"], "feature": request["feature"] or "(model)"})
    assert detections and detections >= 1
    assert any(metric.name == "streamscore_drift_statistic" and metric.samples
               for metric in drift.stats.registry.collect())
    cited = store.query("SELECT detector, request_id FROM drift_events WHERE retrain_requested = 1").rows
    assert cited == [(request["detector"], request["request_id"])]
    versions = store.query("SELECT version, action FROM model_versions ORDER BY recorded_at").rows
    assert (2, "register") in versions and (2, "promote") in versions
    v2 = registry.get(settings.model_name, 2)
    assert request["request_id"] in v2.reason and v2.parent_version == 1
    # how late: events scored by v1 from the first drifted event until the alarm (detected_at is the event
    # time of the prediction whose label completed the evidence, or of the newest prediction the monitor had
    # seen if later, so the ~1 s label delay is included)
    delay_events = int(store.query(
        "SELECT count() FROM predictions FINAL WHERE model_version = 1 AND event_time >= "
        "(SELECT any(event_time) FROM predictions FINAL WHERE event_id = {first:String}) "
        "AND event_time <= fromUnixTimestamp64Milli({at:Int64}, 'UTC')",
        {"first": live.event_ids[DRIFT_AT], "at": request["detected_at"]}).rows[0][0])
    first_drifted = store.query("SELECT any(toUnixTimestamp64Milli(event_time)), count() FROM predictions FINAL "
                                "WHERE event_id = {first:String}", {"first": live.event_ids[DRIFT_AT]}).rows[0]
    assert 0 < delay_events < LIVE - DRIFT_AT, (delay_events, first_drifted, request)
    print(f"\ndrift detected by {request['detector']} ({request['reason']}) {delay_events} events and "
          f"{detected_wall - injected_wall:.1f} s (wall) after the injection; training took {outcome.seconds:.1f} s "
          f"on {outcome.training_rows} rows; v2 promoted: {outcome.reason}")


def test_the_same_stream_without_drift_requests_no_retrain(loop_settings, store):
    settings = loop_settings
    simulator = generator_ending_now(PAYMENTS, 11, ENTITIES, HISTORY + LIVE)
    with ServiceGroup(settings, ["scorer", "logger", "drift", "trainer"], store=store) as group:
        run_history_and_v1(settings, store, group, simulator)
        drift = group.services["drift"]
        # counted before the stream: the checkpoint after its last messages may come before the wait below
        # notices they were all seen (then no further one comes, nothing being new); the statistic rows
        # are written by that checkpoint, or at the latest by the final one when the group stops
        checkpoints = drift.checkpoints
        report = produce_simulation(settings, PAYMENTS, CODEC, simulator, LIVE, rate=3000)
        monitor = drift.tracker.monitor
        wait_until(lambda: monitor.predictions_seen >= LIVE - 50 and monitor.labels_seen >= report.labels - 50,
                   "drift service saw the live predictions and labels", group)
        wait_until(lambda: drift.checkpoints > checkpoints, "a checkpoint during the stream", group)
        assert monitor.windows_completed >= LIVE // settings.drift_window - 1
        assert not drift.requests_sent
    assert retrain_messages(settings) == []
    assert requested_rows(store) == 0  # feature drift may be recorded (kind='drift'), never acted on
    statistics = int(store.query("SELECT count() FROM drift_events WHERE kind = 'statistic'").rows[0][0])
    assert statistics > 0
    assert ModelRegistry(settings.registry_dir).read_production_version(settings.model_name) == 1


LONG_HEALTHY = 200_000  # live events: 100 simulated days of daily cycles at 200 cards


def test_a_long_healthy_cycling_stream_requests_no_retrain(loop_settings, store):
    """200k live events (100 simulated days, each with its quiet night) through scorer, logger and drift with
    the drift defaults: feature drift may be recorded, but nothing is evidence of harm, so no request."""
    settings = loop_settings.model_copy(update={"trainer_window_days": 6.0, "drift_cooldown_events": 50_000,
                                                "drift_checkpoint_interval_s": 5.0})
    simulator = generator_ending_now(PAYMENTS, 13, ENTITIES, HISTORY + LONG_HEALTHY)
    with ServiceGroup(settings, ["scorer", "logger", "drift"], store=store) as group:
        run_history_and_v1(settings, store, group, simulator)
        drift = group.services["drift"]
        started = time.monotonic()
        produce_simulation(settings, PAYMENTS, CODEC, simulator, LONG_HEALTHY)  # as fast as the broker takes them
        monitor = drift.tracker.monitor
        wait_until(lambda: monitor.predictions_seen >= LONG_HEALTHY - 50, "drift service saw the live stream", group,
                   timeout_s=900)
        wait_until(lambda: monitor.labels_seen >= LONG_HEALTHY * 0.95, "labels joined", group, timeout_s=300)
        print(f"\n{LONG_HEALTHY} healthy events monitored in {time.monotonic() - started:.0f} s; "
              f"{monitor.windows_completed} windows; {drift_status(drift)}")
        assert monitor.windows_completed >= LONG_HEALTHY // settings.drift_window - 1
        assert not drift.requests_sent, drift.requests_sent
    assert retrain_messages(settings) == []
    assert requested_rows(store) == 0
    recorded = store.query("SELECT detector, count() FROM drift_events WHERE kind = 'drift' GROUP BY detector").rows
    print(f"recorded detections (no action): {sorted(recorded)}")


def register_offline_v1(settings, simulator, n: int) -> None:
    """A production v1 trained in process on simulator events (no history through Kafka needed)."""
    pairs = list(simulator.events(n))
    X = offline_matrix(PAYMENTS, [e for e, _ in pairs])
    y = np.array([label["label"] for _, label in pairs], dtype=float)
    trained = train_model(X, y, PAYMENTS.feature_names, PAYMENTS.categorical_features, num_boost_round=50)
    registry = ModelRegistry(settings.registry_dir)
    version = registry.register(settings.model_name, trained.booster, feature_set=PAYMENTS.feature_set,
                                feature_names=PAYMENTS.feature_names,
                                categorical_features=PAYMENTS.categorical_features,
                                train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
                                threshold=trained.threshold)
    registry.promote(settings.model_name, version.version)


def test_drift_state_survives_a_restart_without_reprocessing(loop_settings, store):
    settings = loop_settings.model_copy(update={"drift_window": 500, "drift_min_events": 500})
    simulator = generator_ending_now(PAYMENTS, 5, ENTITIES, 8000)
    register_offline_v1(settings, generator_ending_now(PAYMENTS, 5, ENTITIES, 8000), 4000)
    first_part, second_part = 1700, 1300

    with ServiceGroup(settings, ["scorer", "drift"], store=store) as group:
        drift = group.services["drift"]
        wait_until(lambda: drift.tracker.model_version == 1, "drift monitor on v1", group)
        produce_simulation(settings, PAYMENTS, CODEC, simulator, first_part, label_delay_s=0.0)
        wait_until(lambda: drift.tracker.monitor.predictions_seen >= first_part, "first part monitored", group)
    before = drift.tracker.monitor  # the group stopped: the final checkpoint is written
    assert not drift.restored
    assert before.predictions_seen == first_part and before.windows_completed == first_part // 500

    with ServiceGroup(settings, ["scorer", "drift"], store=store) as group:
        drift = group.services["drift"]
        wait_until(lambda: drift.tracker.monitor is not None, "drift state restored", group)
        assert drift.restored
        monitor = drift.tracker.monitor
        assert monitor.predictions_seen == first_part and monitor.labels_seen == before.labels_seen
        produce_simulation(settings, PAYMENTS, CODEC, simulator, second_part, label_delay_s=0.0)
        wait_until(lambda: monitor.predictions_seen >= first_part + second_part, "second part monitored", group)
        time.sleep(2 * settings.drift_checkpoint_interval_s)  # nothing replayed after the restart
        assert monitor.predictions_seen == first_part + second_part
        assert monitor.windows_completed == (first_part + second_part) // 500


class _ShellPayload:
    """A pickle that runs a shell command when unpickled (what a hostile drift-state record would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_checkpoint_on_the_topic_is_ignored_and_the_service_starts_fresh(loop_settings, store, tmp_path):
    import pickle

    from streamscore.kafka.io import flush_or_raise, make_producer, DeliveryTracker
    from streamscore.settings import TOPIC_DRIFT_STATE

    settings = loop_settings.model_copy(update={"drift_window": 500, "drift_min_events": 500})
    register_offline_v1(settings, generator_ending_now(PAYMENTS, 5, ENTITIES, 4000), 4000)
    marker = tmp_path / "exploit-ran"
    payload = pickle.dumps(_ShellPayload(marker))
    producer, delivered = make_producer(settings), DeliveryTracker()
    for value in (b"streamscore.drift.tracking.DriftTracker\n\x00\x01" + payload, payload):  # old layout, raw
        producer.produce(settings.topic(TOPIC_DRIFT_STATE), key=settings.model_name.encode(), value=value,
                         on_delivery=delivered)
    flush_or_raise(producer, delivered)
    simulator = generator_ending_now(PAYMENTS, 5, ENTITIES, 2000)
    with ServiceGroup(settings, ["scorer", "drift"], store=store) as group:
        drift = group.services["drift"]
        wait_until(lambda: drift.tracker.model_version == 1, "drift monitor on v1 (fresh)", group)
        assert not drift.restored and drift.stats.rejections["drift_checkpoint"] == 1
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 1000, label_delay_s=0.0)
        wait_until(lambda: drift.tracker.monitor.predictions_seen >= 1000, "a fresh monitor at work", group)
    assert not marker.exists(), "the pickle in the drift-state record was executed"
    # the fresh service wrote a valid checkpoint: the next start restores it
    with ServiceGroup(settings, ["drift"], store=store) as group:
        drift = group.services["drift"]
        wait_until(lambda: drift.tracker.monitor is not None, "drift state restored", group)
        assert drift.restored and drift.tracker.monitor.predictions_seen >= 1000


def test_trainer_records_a_failed_training_and_skips_duplicates_across_restarts(loop_settings, store):
    from streamscore.drift.monitor import DriftSignal
    from streamscore.learning.retrain_requests import retrain_reason, retrain_request
    from streamscore.services.trainer.service import TrainerService

    settings = loop_settings.model_copy(update={"trainer_min_new_labels": 0})
    register_offline_v1(settings, generator_ending_now(PAYMENTS, 5, ENTITIES, 4000), 4000)
    request = retrain_request(DriftSignal("psi", "amount", "psi", 0.4, 0.25, 2000, 1_000_000), settings.model_name,
                              1, predictions_seen=5000)
    trainer = TrainerService(settings, store=store)
    failed = trainer.handle(request)  # nothing logged in ClickHouse: no training set
    assert failed.action == "failed" and "empty" in failed.reason, failed
    assert trainer.handle(request).action == "duplicate"
    # After a restart the registry is the record: a version trained for the request makes it a duplicate,
    # and so does a replayed detection of the same drift with another id.
    registry = ModelRegistry(settings.registry_dir)
    v1 = registry.get(settings.model_name, 1)
    registry.register(settings.model_name, registry.model_text(settings.model_name, 1), feature_set=v1.feature_set,
                      feature_names=v1.feature_names, categorical_features=v1.categorical_features,
                      train_rows=1, metrics=v1.metrics, baseline=v1.baseline, threshold=v1.threshold,
                      reason=retrain_reason(request))
    restarted = TrainerService(settings, store=store)
    assert restarted.handle(request).action == "duplicate"
    replay = retrain_request(DriftSignal("psi", "amount", "psi", 0.4, 0.25, 2000, 1_004_000), settings.model_name,
                             1, predictions_seen=5020)
    assert restarted.handle(replay).action == "duplicate"
    stale = retrain_request(DriftSignal("psi", "amount", "psi", 0.4, 0.25, 2000, 9_000_000), settings.model_name,
                            7, predictions_seen=9000)
    assert restarted.handle(stale).action == "stale"
