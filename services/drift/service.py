"""Drift: predictions + labels -> DriftMonitor -> drift_events rows and ONE retrain request per drift.

Loop: consume predictions and labels -> DriftTracker (pure; see
streamscore.drift.tracking) -> every `drift_checkpoint_interval_s`, and at once
after a retrain request: insert drift_events rows -> produce retrain requests
-> save the checkpoint -> commit offsets.

State. The checkpoint is one record on the compacted `drift-state` topic, key
= model name: versioned, validated JSON (streamscore.drift.state; never pickle)
with the monitor's state, the next offset of every consumed partition and the
labels still waiting for their prediction. A record that is not a valid
checkpoint (damaged, older format, hostile) is logged and ignored: the service
starts fresh, from the group's committed offsets. On start the
service reads the latest record and seeks every partition to the saved offset,
so the monitor continues exactly where its state ends (the group's committed
offsets, written after the checkpoint, are used only for partitions the
checkpoint does not know). A crash after writing rows or a request but before
the checkpoint replays that stretch: statistic rows may repeat, and a repeated
request is recognised by the trainer (streamscore.learning.retrain_requests).

Run ONE drift service per model: it is assigned every partition of
predictions and labels (no consumer-group balancing) because one monitor must
see the whole stream.

Label join: labels carry no score. Recent predictions' scores are kept in
memory by event_id (`drift_label_join_size`); a label whose prediction is not
there is looked up in ClickHouse `predictions` (long label delays, restarts),
and retried for `drift_label_wait_s` while the logger has not written it yet.

The production pointer is polled every second; when it moves the monitor is
reset to the new version's baseline, validation metrics and threshold.
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog
from streamscore.drift.monitor import DriftConfig, IncompatibleDriftState
from streamscore.drift.tracking import DRIFT_EVENTS_COLUMNS, KIND_DRIFT, DriftOutputs, DriftTracker
from streamscore.kafka.io import (BATCH_FETCH, DeliveryTracker, commit_offsets, data_messages, flush_or_raise,
                                  make_consumer, make_producer, make_reader, produce)
from streamscore.learning.registry import ModelRegistry
from streamscore.ops.logs import RepeatedWarning
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import TOPIC_DRIFT_STATE, TOPIC_PREDICTIONS, TOPIC_RETRAIN, Settings
from streamscore.spec import FeatureSpec, resolve
from streamscore.clickhouse.store import Store, open_store
from streamscore.kafka.topics import DRIFT_STATE_MAX_BYTES

log = logging.getLogger("streamscore.drift")
SERVICE = "drift"
POINTER_POLL_S = 1.0
LABEL_LOOKUP_INTERVAL_S = 1.0
LABEL_LOOKUP_CHUNK = 10_000


def read_checkpoint(settings: Settings, model_name: str, timeout_s: float = 60.0) -> bytes | None:
    """The latest checkpoint of `model_name` on the drift-state topic, or None.

    Reads backwards from the end in growing steps: compaction only cleans closed
    segments, so the topic may hold many old checkpoints; the newest is last."""
    topic = settings.topic(TOPIC_DRIFT_STATE)
    reader = make_reader(settings, **{"enable.partition.eof": True})
    key = model_name.encode()
    deadline = time.monotonic() + timeout_s
    try:
        low, high = reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        step = 1
        while high > low:
            start = max(low, high - step)
            latest = None
            reader.assign([TopicPartition(topic, 0, start)])
            at_end = False
            while not at_end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading the drift checkpoint from {topic} took over {timeout_s} s")
                for msg in reader.consume(100, 0.5):
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            raise RuntimeError(f"reading {topic}: {msg.error()}")
                        at_end = True  # (compaction may leave holes: wait for EOF, not for offset high-1)
                        continue
                    if msg.offset() >= high:
                        at_end = True
                        continue
                    if msg.key() == key:
                        latest = msg.value()
            if latest is not None or start == low:
                return latest
            step *= 8
        return None
    finally:
        reader.close()


class DriftService:
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
        self.tracker = DriftTracker(DriftConfig.from_settings(settings), settings.model_name,
                                    label_join_size=settings.drift_label_join_size,
                                    label_wait_s=settings.drift_label_wait_s)
        self.outputs = DriftOutputs()
        self.requests_sent: list[tuple[float, dict]] = []  # (wall time s, request), for the demo and tests
        self.checkpoints = 0
        self.restored = False
        self.encode_request = self.codec.encoder("retrain_request")
        self._next_pointer_check = 0.0
        self._next_label_lookup = 0.0
        self._skipped = RepeatedWarning(log)

    # --- state -----------------------------------------------------------------------
    def _restore(self) -> None:
        data = read_checkpoint(self.settings, self.settings.model_name)
        if data is None:
            return
        try:
            self.tracker.restore(data)
        except IncompatibleDriftState as exc:
            # damaged, of an older format, or hostile: never executed (JSON), never half-restored
            self.stats.count_rejection("drift_checkpoint")
            log.warning("drift checkpoint ignored, starting fresh (an empty monitor; partitions resume from the "
                        "consumer group's committed offsets): %s", exc)
            return
        self.restored = True
        monitor = self.tracker.monitor
        log.info("drift state restored: model v%s, %s predictions and %s labels seen, %d windows",
                 monitor.model_version if monitor else "-", monitor.predictions_seen if monitor else 0,
                 monitor.labels_seen if monitor else 0, monitor.windows_completed if monitor else 0)

    def _assignment(self, consumer: Consumer, timeout_s: float = 60.0) -> list[TopicPartition]:
        """Every partition of predictions and labels, at the checkpoint's offset where it has one,
        else at the group's committed offset, else at the beginning."""
        partitions = []
        for logical in (TOPIC_PREDICTIONS, self.spec.label.topic):
            topic = self.settings.topic(logical)
            metadata = consumer.list_topics(topic, timeout=30).topics[topic]
            if metadata.error is not None:
                raise RuntimeError(f"topic {topic}: {metadata.error}")
            partitions += [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        # Asked explicitly (not OFFSET_STORED in assign): a group coordinator that is still
        # loading makes librdkafka give up on the fetch and the partition would never start.
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                committed = consumer.committed(partitions, timeout=10)
                failed = [tp for tp in committed if tp.error is not None]
                if failed:
                    raise KafkaException(failed[0].error)
                break
            except KafkaException as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("committed offsets not available yet (%s); retrying", exc)
                time.sleep(0.5)
        assignment = []
        for tp in committed:
            saved = self.tracker.offsets.get(tp.topic, {}).get(tp.partition)
            start = saved if saved is not None else (tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
            assignment.append(TopicPartition(tp.topic, tp.partition, start))
        return assignment

    def _maybe_follow_production(self) -> None:
        now = time.monotonic()
        if now < self._next_pointer_check:
            return
        self._next_pointer_check = now + POINTER_POLL_S
        production = self.registry.read_production_version(self.settings.model_name)
        if (production or 0) == self.tracker.model_version:
            return
        version = self.registry.get(self.settings.model_name, production) if production else None
        if self.tracker.set_model(version):
            log.info("drift monitor now follows %s v%s", self.settings.model_name, production)
            self.stats.model_version = production or 0
            self.stats.model_swaps += 1

    # --- the loop --------------------------------------------------------------------
    def _handle(self, msg) -> None:
        topic = msg.topic()
        try:
            if topic == self.predictions_topic:
                self.tracker.on_prediction(self._prediction(msg.value()), self.outputs)
            else:
                self.tracker.on_label(self._label(msg), self.outputs)
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            # The scorer and simulator write these topics; a bad record is skipped, not fatal.
            reason = getattr(exc, "reason", "undecodable")
            self.stats.count_rejection(reason)
            self._skipped.warn(f"{topic} {reason}", "skipping %s[%d]@%d: %s", topic, msg.partition(), msg.offset(), exc)
        self.tracker.record_offset(topic, msg.partition(), msg.offset())

    def _prediction(self, value: bytes) -> dict:
        """A Prediction with its features as a name -> value map (the names of its feature set)."""
        prediction = self.codec.decode(value, "prediction")
        if prediction["feature_set"] != self.spec.feature_set:
            raise ValueError(f"prediction of feature set {prediction['feature_set']!r}, this drift service "
                             f"monitors {self.spec.feature_set!r} (spec {self.spec.name!r})")
        prediction["features"] = dict(zip(self.spec.feature_names, prediction["features"]))
        return prediction

    def _label(self, msg) -> dict:
        """The spec's label record as the tracker reads labels: event_id, label, label_time."""
        label = self.spec.label
        record = self.codec.decode(msg.value(), "label")
        at = record[label.time_field] if label.time_field else (msg.timestamp()[1] or int(time.time() * 1000))
        return {"event_id": record[label.id_field], "label": record[label.value_field], "label_time": at}

    def _join_waiting_labels(self) -> None:
        """Labels whose prediction is not in memory: look it up in ClickHouse (at most once a second)."""
        now = time.monotonic()
        if now < self._next_label_lookup:
            return
        self._next_label_lookup = now + LABEL_LOOKUP_INTERVAL_S
        missing = self.tracker.take_unmatched()
        found = {}
        for start in range(0, len(missing), LABEL_LOOKUP_CHUNK):
            result = self.store.query(
                "SELECT event_id, model_version, score, toUnixTimestamp64Milli(event_time) FROM predictions FINAL "
                "WHERE event_id IN {ids:Array(String)}", {"ids": missing[start:start + LABEL_LOOKUP_CHUNK]})
            found.update({event_id: (int(version), score, int(event_time_ms))
                          for event_id, version, score, event_time_ms in result.rows})
        self.tracker.resolve_labels(found, self.outputs)

    def _export_metrics(self, rows: list[list]) -> None:
        """Mirror drift_events rows into Prometheus: latest value per statistic, count per detection."""
        column = {name: i for i, name in enumerate(DRIFT_EVENTS_COLUMNS)}
        for row in rows:
            feature = row[column["feature"]] or "(model)"
            if row[column["kind"]] == KIND_DRIFT:
                self.stats.count_drift(row[column["detector"]], feature)
            else:
                self.stats.record_drift_statistic(feature, row[column["statistic"]], float(row[column["value"]]))

    def _checkpoint(self, consumer: Consumer, producer) -> None:
        """Rows -> retrain requests -> state -> offsets, each step only after the previous one is durable."""
        started = time.perf_counter()
        outputs = self.outputs
        if outputs.rows:
            self.store.insert("drift_events", outputs.rows, DRIFT_EVENTS_COLUMNS)
            self._export_metrics(outputs.rows)
        tracker = DeliveryTracker()
        for request in outputs.requests:
            produce(producer, self.retrain_topic, self.encode_request(request), request["model_name"].encode(),
                    on_delivery=tracker)
        produce(producer, self.state_topic, self.tracker.to_bytes(), self.settings.model_name.encode(),
                on_delivery=tracker)
        flush_or_raise(producer, tracker)
        now = time.time()
        self.requests_sent += [(now, request) for request in outputs.requests]
        offsets = [TopicPartition(topic, partition, offset)
                   for topic, parts in self.tracker.offsets.items() for partition, offset in parts.items()]
        # The shared path: a coordinator loading after a broker restart is retried, and still failing it is
        # not fatal (the checkpoint just written holds these offsets; the group's are only a fallback).
        commit_offsets(consumer, offsets)
        self.stats.record_batch(n_in=0, n_out=len(outputs.rows) + len(outputs.requests),
                                seconds=time.perf_counter() - started)
        outputs.clear()
        self.checkpoints += 1

    def run(self, stop: threading.Event) -> None:
        settings = self.settings
        self.predictions_topic = settings.topic(TOPIC_PREDICTIONS)
        self.retrain_topic = settings.topic(TOPIC_RETRAIN)
        self.state_topic = settings.topic(TOPIC_DRIFT_STATE)
        self._restore()
        consumer = make_consumer(settings, settings.group(SERVICE), BATCH_FETCH)
        producer = make_producer(settings, **{"message.max.bytes": DRIFT_STATE_MAX_BYTES})
        consumer.assign(self._assignment(consumer))
        interval = settings.drift_checkpoint_interval_s
        next_checkpoint = time.monotonic() + interval
        dirty = False
        self.stats.running = True
        try:
            while not stop.is_set():
                self._maybe_follow_production()
                batch = consumer.consume(5_000, 0.1)
                handled = 0
                for msg in data_messages(batch):
                    self._handle(msg)
                    handled += 1
                if handled:
                    dirty = True
                    self.stats.events_in += handled
                if self.tracker.labels_waiting:
                    self._join_waiting_labels()
                    dirty = True  # labels may have been fed or dropped
                if dirty and (self.outputs.requests or time.monotonic() >= next_checkpoint):
                    self._checkpoint(consumer, producer)
                    dirty = False
                    next_checkpoint = time.monotonic() + interval
            if dirty:
                self._checkpoint(consumer, producer)
        finally:
            self.stats.running = False
            consumer.close()
            producer.flush(10)
