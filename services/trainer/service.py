"""Trainer: retrain requests -> train, gate, register, promote or reject -> model updates.

Loop: consume one `retrain` request -> skip it if it is a duplicate or stale ->
wait until `trainer_min_new_labels` labelled events after the detection are
logged (at most `trainer_max_wait_s`) -> train a candidate in a process of its
own (learning.training_process: the scorer's GIL and core stay free) on a
bounded window (the last `trainer_window_days` before the newest logged event,
at most `trainer_max_events` events plus at most `trainer_max_history_events`
of warm-up before them: training_set.training_window) and gate it against
production on its recent holdout -> register it, promote or reject
(retraining.register_candidate) -> publish the register + promote/reject
ModelUpdate events (scorers hot-swap; the logger records them in
model_versions) -> commit.

At a stop, a training in flight gets `trainer_shutdown_grace_s`: finished, it is
registered, published and committed like any other (the ServiceGroup stops the
logger only after the trainer, so model_versions records it too); unfinished, it
is abandoned before anything is registered and the request stays uncommitted.

Duplicates (see streamscore.learning.retrain_requests): the same request_id, or the
same (model version, detector, feature) inside the drift cool-down. The
record survives restarts because each candidate's registry `reason` names its
request. A request about a version that is no longer in production is stale
(someone already replaced it) and skipped.

A failed training (too few labels, one class only, ...) is logged, counted and
kept in `outcomes` with its reason; its offset is committed like any other, so
one bad request never becomes a crash loop.

Between requests (and while a training runs in its process), at most every
`rollout_gate_interval_s`: the online gate (streamscore.learning.rollout)
judges the shadow and canary versions and publishes its actions; with
`retrain_every_hours` set, the schedule issues a retrain request on the retrain
topic when the newest logged event crosses its next boundary (handled like a
drift request, without waiting for new labels: a schedule marks no new regime).
With `rollout_auto_shadow` a candidate that passes the offline gate goes into
shadow instead of production.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass


from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog
from streamscore.kafka.io import (BATCH_FETCH, DeliveryTracker, commit, data_messages, flush_or_raise, make_consumer,
                                  make_producer)
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retrain_requests import (SCHEDULE_DETECTOR, HandledRequest, HandledRequests, RetrainSchedule,
                                                   retrain_reason, scheduled_request)
from streamscore.clickhouse.shared_store import socket_path
from streamscore.learning.retraining import Candidate, register_candidate, train_candidate
from streamscore.learning.training_process import TrainingProcess
from streamscore.learning.rollout import RolloutController
from streamscore.learning.training_set import TrainingWindow, training_window
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import TOPIC_RETRAIN, Settings
from streamscore.clickhouse.store import Store, open_store
from streamscore.spec import FeatureSpec, resolve

log = logging.getLogger("streamscore.trainer")
SERVICE = "trainer"
ABANDONED = "abandoned"  # a request left uncommitted at shutdown: handled at the next start


class TrainingAbandoned(RuntimeError):
    """The service stopped and the training in flight did not finish within its grace period."""
DAY_MS = 86_400_000


@dataclass(frozen=True)
class RequestOutcome:
    """What the trainer did with one request (kept in memory for the demo, tests and logs)."""

    request_id: str
    action: str  # promoted | shadowed | rejected | failed | duplicate | stale | abandoned
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
        self.codec = codec or AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                                        registry_config=schema_registry_config(settings))
        self.registry = ModelRegistry(settings.registry_dir)
        self.stats = stats or ServiceStats(SERVICE)
        self.handled = HandledRequests.from_registry(self.registry, settings.model_name,
                                                     cooldown_ms=int(settings.drift_cooldown_s * 1000))
        self.outcomes: list[RequestOutcome] = []
        self.training: TrainingProcess | None = None  # the training process in flight
        self.rollout = RolloutController(self.store, self.registry, settings, spec.objective)
        self.schedule = (RetrainSchedule.from_registry(settings.retrain_every_hours, self.registry, settings.model_name)
                         if settings.retrain_every_hours > 0 else None)
        self.scheduled: list[dict] = []  # the scheduled requests issued (for the demo, tests and logs)
        self._next_tick = 0.0
        self._stop = threading.Event()  # run() replaces it with the group's stop event

    def training_window(self) -> TrainingWindow:
        """The training window: `trainer_window_days` before the newest logged event (not the wall clock, so
        a replay or backfill trains on the data it has), at most `trainer_max_events` events, replayed from
        at most `trainer_max_history_events` before it (training_set.training_window)."""
        settings = self.settings
        return training_window(self.store, self.spec, int(settings.trainer_window_days * DAY_MS),
                               settings.trainer_max_events, settings.trainer_max_history_events)

    def newest_event_ms(self) -> int | None:
        newest = self.store.query("SELECT toUnixTimestamp64Milli(max(event_time)), count() FROM predictions").rows[0]
        return int(newest[0]) if newest[1] else None

    def tick(self) -> None:
        """The online gate's step, then the schedule's: at most every rollout_gate_interval_s. A store or
        broker failure is logged and counted: it runs again next time."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + self.settings.rollout_gate_interval_s
        try:
            events = self.rollout.step()
            if events:
                publish_model_updates(self.settings, self.codec, events)
                self.stats.model_version = self.registry.read_production_version(self.settings.model_name) or 0
            if self.schedule is not None:
                boundary = self.schedule.due(self.newest_event_ms())
                if boundary is not None:
                    self.request_scheduled_retrain(boundary)
        except Exception:  # noqa: BLE001 - a store or broker hiccup: the gate runs again next tick
            self.stats.errors += 1
            log.exception("online gate / schedule step failed; trying again in %.0f s",
                          self.settings.rollout_gate_interval_s)

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
        if self._stop.is_set():
            return self._outcome(request_id, ABANDONED, "stopping before training began: consumed again at the "
                                 "next start")
        log.info("retraining %s for request %s (%d labelled events since the detection): %s",
                 settings.model_name, request_id, new_labels, request["reason"])
        try:
            candidate = self.train(self.training_window())
            outcome = register_candidate(self.registry, self.spec, candidate, reason=retrain_reason(request),
                                         started=started, auto_shadow=settings.rollout_auto_shadow)
        except TrainingAbandoned as exc:
            return self._outcome(request_id, ABANDONED, str(exc), seconds=time.monotonic() - started)
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

    def trains_in_a_process(self) -> bool:
        """A process of its own needs its own store access: a ClickHouse server, or the embedded store served
        on its socket by this process (a ServiceGroup serves it); a trainer without either trains here."""
        return not self.settings.is_embedded_store or socket_path(self.settings).exists()

    def train(self, window: TrainingWindow) -> Candidate:
        """Train a candidate on `window`, in a process of its own when it can (see trains_in_a_process). Once
        the service is told to stop, the training gets `trainer_shutdown_grace_s` to finish, then is abandoned
        (TrainingAbandoned): nothing registered, the request consumed again at the next start."""
        settings = self.settings
        if not self.trains_in_a_process():
            return train_candidate(self.store, self.registry, settings, self.spec, since_ms=window.since_ms,
                                   read_from_ms=window.read_from_ms)
        training = self.training = TrainingProcess(settings, window.since_ms, window.read_from_ms)
        deadline = None
        try:
            while True:
                candidate = training.result(timeout_s=0.2)
                if candidate is not None:
                    return candidate
                self.tick()  # the online gate keeps judging while the candidate trains
                if self._stop.is_set():
                    if deadline is None:
                        deadline = time.monotonic() + settings.trainer_shutdown_grace_s
                        log.info("stopping: the training in flight gets %.0f s to finish",
                                 settings.trainer_shutdown_grace_s)
                    elif time.monotonic() >= deadline:
                        raise TrainingAbandoned(
                            f"the training did not finish within trainer_shutdown_grace_s="
                            f"{settings.trainer_shutdown_grace_s:g} s of the stop: abandoned, nothing registered; "
                            "the request is consumed again at the next start")
        finally:
            training.abandon()
            self.training = None

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
        consumer = make_consumer(settings, settings.group(SERVICE), BATCH_FETCH)
        consumer.subscribe([settings.topic(TOPIC_RETRAIN)])
        self.stats.running = True
        try:
            while not stop.is_set():
                self.tick()
                msg = consumer.poll(0.2)
                if msg is None or not data_messages([msg]):
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
                    if outcome.action == ABANDONED:
                        break  # not committed: the request is handled at the next start
                commit(consumer, [msg])
                self.stats.record_batch(n_in=1, n_out=0, seconds=time.perf_counter() - started)
        finally:
            self.stats.running = False
            consumer.close()
