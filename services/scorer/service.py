"""Scorer: events -> features -> LightGBM -> predictions, at-least-once.

Loop: consume a batch -> ScoringPipeline.score (pure) -> produce predictions,
dead letters and the touched entities' state -> wait for acks -> commit.

Entity state lives in memory, grouped by partition, and is backed by the
compacted `scorer-state` topic (co-partitioned with `events`): when a partition
is assigned, its state is rebuilt from that changelog before any of its events
are scored. A replayed event (offset already applied) is scored again but not
double-counted in the state.
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamscore import features
from streamscore.codec import AvroCodec
from streamscore.kafka_io import DeliveryTracker, commit, dead_letter, flush_or_raise, make_consumer, make_producer
from streamscore.registry import ModelRegistry
from streamscore.scoring import InputMessage, ScoringPipeline, load_production_model
from streamscore.service_stats import ServiceStats
from streamscore.settings import TOPIC_EVENTS, TOPIC_PREDICTIONS, TOPIC_SCORER_STATE, Settings

log = logging.getLogger("streamscore.scorer")
SERVICE = "scorer"


def read_changelog(settings: Settings, partition: int, timeout_s: float = 60.0) -> dict[str, features.EntityState]:
    """Rebuild one partition's entity state from the compacted changelog."""
    topic = settings.topic(TOPIC_SCORER_STATE)
    reader = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "unused",
                       "enable.auto.commit": False, "enable.partition.eof": True})
    states: dict[str, features.EntityState] = {}
    try:
        low, high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        if high <= low:
            return states
        reader.assign([TopicPartition(topic, partition, low)])
        deadline = time.monotonic() + timeout_s
        position = low
        while position < high:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rebuilding state of {topic}[{partition}] took over {timeout_s} s")
            for msg in reader.consume(10_000, 0.5):
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reading {topic}[{partition}]: {msg.error()}")
                    continue
                position = msg.offset() + 1
                entity = msg.key().decode()
                if msg.value() is None:
                    states.pop(entity, None)
                else:
                    states[entity] = features.EntityState.from_bytes(msg.value())
    finally:
        reader.close()
    return states


class ModelWatcher:
    """Notices a changed production pointer (checked at most once per `interval_s`)."""

    def __init__(self, registry: ModelRegistry, model_name: str, interval_s: float = 0.5):
        self.registry = registry
        self.model_name = model_name
        self.interval_s = interval_s
        self._next_check = 0.0

    def changed(self, current_version: int) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.interval_s
        return (self.registry.read_production_version(self.model_name) or 0) != current_version


class ScorerService:
    def __init__(self, settings: Settings, codec: AvroCodec | None = None, stats: ServiceStats | None = None):
        self.settings = settings
        self.codec = codec or AvroCodec(registry_url=settings.schema_registry_url)
        self.registry = ModelRegistry(settings.registry_dir)
        self.pipeline = ScoringPipeline(settings, self.codec, load_production_model(self.registry, settings.model_name))
        self.watcher = ModelWatcher(self.registry, settings.model_name)
        self.stats = stats or ServiceStats(SERVICE)
        self.stats.model_version = self.pipeline.model.version
        self.encode_prediction = self.codec.encoder("prediction")
        # partitions assigned to us now (their state is loaded); see the filter in run()
        self._owned: set[int] = set()

    # --- rebalance callbacks: state follows partitions --------------------------
    def _on_assign(self, consumer, partitions) -> None:
        for tp in partitions:
            started = time.monotonic()
            states = read_changelog(self.settings, tp.partition)
            self.pipeline.load_partition_state(tp.partition, states)
            self._owned.add(tp.partition)
            log.info("partition %d assigned: %d entities restored in %.2f s",
                     tp.partition, len(states), time.monotonic() - started)

    def _on_revoke(self, consumer, partitions) -> None:
        for tp in partitions:
            self._owned.discard(tp.partition)
            self.pipeline.drop_partition_state(tp.partition)
        log.info("partitions revoked: %s", [tp.partition for tp in partitions])

    def _maybe_swap_model(self) -> None:
        if not self.watcher.changed(self.pipeline.model.version):
            return
        try:
            model = load_production_model(self.registry, self.settings.model_name)
        except Exception as exc:  # keep serving the current model; say why loudly
            log.error("not swapping model: %s", exc)
            self.stats.errors += 1
            return
        log.info("model swap: %s v%d -> v%d", model.name, self.pipeline.model.version, model.version,
                 extra={"model_name": model.name, "model_version": model.version,
                        "previous_version": self.pipeline.model.version})
        self.pipeline.swap_model(model)
        self.stats.model_version = model.version
        self.stats.model_swaps += 1

    def run(self, stop: threading.Event) -> None:
        settings = self.settings
        consumer = make_consumer(settings, settings.group(SERVICE))
        producer = make_producer(settings)
        tracker = DeliveryTracker()
        events_topic = settings.topic(TOPIC_EVENTS)
        predictions_topic = settings.topic(TOPIC_PREDICTIONS)
        state_topic = settings.topic(TOPIC_SCORER_STATE)
        consumer.subscribe([events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_revoke)
        wait_s = settings.scorer_batch_wait_ms / 1000
        self.stats.running = True
        try:
            while not stop.is_set():
                self._maybe_swap_model()
                batch = consumer.consume(settings.scorer_batch_size, max(wait_s, 0.05))
                # A rebalance runs inside consume(): messages fetched before it may belong to partitions
                # revoked meanwhile. Their new owner scores them with their entity state; scored here
                # they would see an empty state (wrong features) and pollute the changelog.
                messages = [m for m in batch if not m.error() and m.partition() in self._owned]
                for m in batch:
                    if m.error() and m.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", m.error())
                if not messages:
                    continue
                started = time.perf_counter()
                inputs = [InputMessage(m.value(), m.partition(), m.offset()) for m in messages]
                result = self.pipeline.score(inputs)
                tracker.reset()
                for prediction in result.predictions:
                    producer.produce(predictions_topic, key=prediction["entity_id"].encode(),
                                     value=self.encode_prediction(prediction), on_delivery=tracker)
                for index, rejection, event_id in result.rejected:
                    dead_letter(producer, settings, messages[index], rejection, SERVICE, event_id=event_id,
                                on_delivery=tracker)
                    self.stats.count_rejection(rejection.reason)
                for partition, entities in result.touched.items():
                    states = self.pipeline.states[partition]
                    for entity in entities:
                        producer.produce(state_topic, key=entity.encode(), value=states[entity].to_bytes(),
                                         partition=partition, on_delivery=tracker)
                flush_or_raise(producer, tracker)
                commit(consumer, messages)
                now_ms = time.time() * 1000
                self.stats.record_batch(
                    n_in=len(messages), n_out=len(result.predictions), seconds=time.perf_counter() - started,
                    latencies_ms=[now_ms - m.timestamp()[1] for m in messages if m.timestamp()[1] > 0])
        finally:
            self.stats.running = False
            consumer.close()
            producer.flush(10)
