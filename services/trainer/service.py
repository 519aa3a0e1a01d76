"""Trainer: retrain requests -> train, gate, register, promote or reject -> model updates.

Loop: consume one `retrain` request -> skip it if it is a duplicate or stale ->
wait until `trainer_min_new_labels` labelled events after the detection are
logged (at most `trainer_max_wait_s`) -> streamscore.learning.retraining.train_and_register (point-in-time training set from
ClickHouse over the last `trainer_window_days` before the newest logged
event; gated against production on the candidate's recent holdout) ->
publish the register + promote/reject ModelUpdate events (scorers hot-swap;
the logger records them in model_versions) -> commit.

Duplicates (see streamscore.learning.retrain_requests): the same request_id, or the
same (model version, detector, feature) inside the drift cool-down. The
record survives restarts because each candidate's registry `reason` names its
request. A request about a version that is no longer in production is stale
(someone already replaced it) and skipped.

A failed training (too few labels, one class only, ...) is logged, counted and
kept in `outcomes` with its reason; its offset is committed like any other, so
one bad request never becomes a crash loop.

Between requests, at most every `rollout_gate_interval_s`: the online gate
(streamscore.learning.rollout) judges the shadow and canary versions and
publishes its actions; with `retrain_every_hours` set, the schedule issues a
retrain request on the retrain topic when the newest logged event crosses its
next boundary (handled like a drift request, without waiting for new labels:
a schedule marks no new regime).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError

from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog
from streamscore.kafka.io import DeliveryTracker, commit, flush_or_raise, make_consumer, make_producer
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retrain_requests import (SCHEDULE_DETECTOR, HandledRequest, HandledRequests, RetrainSchedule,
                                                   retrain_reason, scheduled_request)
from streamscore.learning.retraining import train_and_register
from streamscore.learning.rollout import RolloutController
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import TOPIC_RETRAIN, Settings
from streamscore.clickhouse.store import Store, open_store
from streamscore.spec import FeatureSpec, resolve

log = logging.getLogger("streamscore.trainer")
SERVICE = "trainer"
DAY_MS = 86_400_000


@dataclass(frozen=True)
class RequestOutcome:
    """What the trainer did with one request (kept in memory for the demo, tests and logs)."""

    request_id: str
    action: str  # promoted | shadowed | rejected | failed | duplicate | stale
    reason: str
    version: int | None = None
    seconds: float = 0.0
    training_rows: int = 0
    handled_at: float = 0.0  # wall time s


class TrainerService:
    def __init__(self, settings: Settings, store: Store | None = None, codec: AvroCodec | None = None,
                 stats: ServiceStats | None = None, spec: FeatureSpec | None = None):
        if spec is None:
            settings, spec = resolve(settings)
        self.settings = settings
        self.spec = spec
        self.store = store or open_store(settings)
        self.codec = codec or AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url)
        self.registry = ModelRegistry(settings.registry_dir)
        self.stats = stats or ServiceStats(SERVICE)
        self.handled = HandledRequests.from_registry(self.registry, settings.model_name,
                                                     cooldown_ms=int(settings.drift_cooldown_s * 1000))
        self.outcomes: list[RequestOutcome] = []
        self.rollout = RolloutController(self.store, self.registry, settings, spec.objective)
        self.schedule = (RetrainSchedule.from_registry(settings.retrain_every_hours, self.registry, settings.model_name)
                         if settings.retrain_every_hours > 0 else None)
        self.scheduled: list[dict] = []  # the scheduled requests issued (for the demo, tests and logs)
        self._next_tick = 0.0
        self._stop = threading.Event()  # run() replaces it with the group's stop event

    def training_since_ms(self) -> int | None:
        """Start of the training window: `trainer_window_days` before the newest logged event
        (not the wall clock, so a replay or backfill trains on the data it has)."""
        newest = self.store.query("SELECT toUnixTimestamp64Milli(max(event_time)), count() FROM predictions").rows[0]
        if not newest[1]:
            return None
        return int(newest[0]) - int(self.settings.trainer_window_days * DAY_MS)

    def newest_event_ms(self) -> int | None:
        newest = self.store.query("SELECT toUnixTimestamp64Milli(max(event_time)), count() FROM predictions").rows[0]
        return int(newest[0]) if newest[1] else None

    def tick(self) -> None:
        """The online gate's step, then the schedule's: at most every rollout_gate_interval_s."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self.settings.rollout_gate_interval_s
        events = self.rollout.step()
        if events:
            publish_model_updates(self.settings, self.codec, events)
            self.stats.model_version = self.registry.read_production_version(self.settings.model_name) or 0
        if self.schedule is not None:
            boundary = self.schedule.due(self.newest_event_ms())
            if boundary is not None:
                self.request_scheduled_retrain(boundary)

    def request_scheduled_retrain(self, boundary_ms: int) -> dict:
        """Produce the schedule's retrain request for `boundary_ms` to the retrain topic (and wait for its ack)."""
        settings = self.settings
        production = self.registry.read_production_version(settings.model_name) or 0
        request = scheduled_request(settings.model_name, production, boundary_ms, settings.retrain_every_hours)
        producer = make_producer(settings)
        tracker = DeliveryTracker()
        producer.produce(settings.topic(TOPIC_RETRAIN), key=settings.model_name.encode(),
                         value=self.codec.encode("retrain_request", request), on_delivery=tracker)
        flush_or_raise(producer, tracker, timeout_s=30)
        self.scheduled.append(request)
        log.info("scheduled retrain requested for the boundary at %d ms (every %g h of event time)", boundary_ms,
                 settings.retrain_every_hours, extra={"request_id": request["request_id"]})
        return request

    def labelled_since(self, since_ms: int) -> int:
        return int(self.store.query(
            "SELECT count() FROM predictions AS p FINAL INNER JOIN labels AS l FINAL ON p.event_id = l.event_id "
            "WHERE p.event_time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')", {"since": since_ms}).rows[0][0])

    def wait_for_new_labels(self, since_ms: int) -> int:
        """Wait (up to trainer_max_wait_s) for trainer_min_new_labels labelled events after the
        detection: trained at once, the candidate would hardly see the new regime and the gate's
        holdout (the most recent rows) would still be mostly the old one."""
        settings = self.settings
        deadline = time.monotonic() + settings.trainer_max_wait_s
        while True:
            n = self.labelled_since(since_ms)
            if n >= settings.trainer_min_new_labels or time.monotonic() >= deadline or self._stop.is_set():
                if n < settings.trainer_min_new_labels:
                    log.warning("training with %d labelled events since the detection (wanted %d)",
                                n, settings.trainer_min_new_labels)
                return n
            self._stop.wait(1.0)

    def handle(self, request: dict) -> RequestOutcome:
        """Act on one decoded RetrainRequest; never raises for a training problem."""
        settings = self.settings
        key = HandledRequest.of(request)
        request_id = request["request_id"]
        duplicate = self.handled.duplicate_of(key)
        if duplicate:
            return self._outcome(request_id, "duplicate", duplicate)
        if request["model_name"] != settings.model_name:
            return self._outcome(request_id, "stale", f"request is for model {request['model_name']!r}, "
                                                     f"this trainer trains {settings.model_name!r}")
        production = self.registry.read_production_version(settings.model_name) or 0
        if production != request["model_version"]:
            self.handled.add(key)
            return self._outcome(request_id, "stale", f"request is about v{request['model_version']} but "
                                                     f"production is v{production} now")
        started = time.monotonic()
        new_labels = (self.labelled_since(int(request["detected_at"])) if request["detector"] == SCHEDULE_DETECTOR
                      else self.wait_for_new_labels(int(request["detected_at"])))
        log.info("retraining %s for request %s (%d labelled events since the detection): %s",
                 settings.model_name, request_id, new_labels, request["reason"])
        try:
            outcome = train_and_register(self.store, self.registry, settings, self.spec,
                                         reason=retrain_reason(request), since_ms=self.training_since_ms())
        except Exception as exc:  # noqa: BLE001 - a failed training must not crash-loop the service
            self.handled.add(key)
            self.stats.errors += 1
            self.stats.count_rejection("training_failed")
            log.exception("training for request %s failed", request_id)
            return self._outcome(request_id, "failed", f"{type(exc).__name__}: {exc}",
                                 seconds=time.monotonic() - started)
        self.handled.add(key)
        publish_model_updates(settings, self.codec, outcome.events)
        action = "shadowed" if outcome.shadowed else "promoted" if outcome.promoted else "rejected"
        return self._outcome(request_id, action, outcome.gate_reason, version=outcome.version.version,
                             seconds=outcome.seconds, training_rows=outcome.training_rows)

    def _outcome(self, request_id: str, action: str, reason: str, **fields) -> RequestOutcome:
        outcome = RequestOutcome(request_id, action, reason, handled_at=time.time(), **fields)
        if action in ("duplicate", "stale"):
            log.info("request %s skipped (%s): %s", request_id, action, reason)
        else:
            log.info("request %s: %s v%s (%s)", request_id, action, outcome.version, reason)
        self.outcomes.append(outcome)
        return outcome

    def run(self, stop: threading.Event) -> None:
        settings = self.settings
        self._stop = stop
        consumer = make_consumer(settings, settings.group(SERVICE))
        consumer.subscribe([settings.topic(TOPIC_RETRAIN)])
        self.stats.running = True
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - a store or broker hiccup: the gate runs again next tick
                    self.stats.errors += 1
                    log.exception("online gate / schedule step failed; trying again in %.0f s",
                                  settings.rollout_gate_interval_s)
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", msg.error())
                    continue
                started = time.perf_counter()
                try:
                    request = self.codec.decode(msg.value(), "retrain_request")
                except DecodeError as exc:
                    self.stats.count_rejection(exc.reason)
                    log.warning("skipping undecodable retrain request at offset %d: %s", msg.offset(), exc)
                else:
                    outcome = self.handle(request)
                    self.stats.model_version = self.registry.read_production_version(settings.model_name) or 0
                    if outcome.action == "promoted":
                        self.stats.model_swaps += 1
                commit(consumer, [msg])
                self.stats.record_batch(n_in=1, n_out=0, seconds=time.perf_counter() - started)
        finally:
            self.stats.running = False
            consumer.close()
