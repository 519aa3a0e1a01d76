"""Scorer: events -> features -> LightGBM -> predictions, at-least-once.

Loop: consume a batch -> ScoringPipeline.score (pure) -> produce predictions and
dead letters, never waiting for acks. Every `scorer_checkpoint_interval_ms` (at
once when the topic went quiet) a checkpoint starts: it notes the messages
consumed so far and the entities whose state changed, produces those states a
slice per loop turn (serialising them all at once would stall scoring for tens
of ms), then seals an `AckBatch` with those
messages. Their offsets are committed once every message produced up to the seal
(predictions, dead letters, states) is acknowledged: commit after acks, so
at-least-once, without flushing the producer or waiting for the commit's reply
on the hot loop. Before partitions are revoked and on a graceful stop the same is
done synchronously (flush, then commit). A crash replays about one interval plus
the acks and the commit still in flight.

Entity state lives in memory, one PartitionState per partition, and is backed by
the compacted `scorer-state` topic (co-partitioned with `events`): when partitions
are assigned, their state is rebuilt from that changelog (all of them at once)
before any of their events are scored. A replayed event (offset already applied)
is scored again but not double-counted in the state; a re-sent event (its event id
already applied at another offset) is dead-lettered as `duplicate_event`. An entity
whose newest event is older than the partition's watermark minus the spec's
retention can never be read again: its state is dropped and a tombstone written,
so memory follows the live entities, not every entity ever seen.

Staged rollouts: the registry's rollout (production, canary and its share, shadows) is re-read when
stages.json changes; every shadow and the canary score each event from the same feature matrix, the
canary's score is served to its share of entities, and the unserved scores go to `shadow-predictions`
(streamscore.scoring.rollout). A version that cannot be loaded is left out, loudly; production keeps
serving.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.avro.example_records import example_record
from streamscore.kafka.io import (AckBatch, DeliveryFailed, commit, data_messages, dead_letter, log_commit_errors,
                                  make_consumer, make_producer, make_reader, produce)
from streamscore.kafka.membership import InstanceSlot
from streamscore.learning.registry import ModelRegistry
from streamscore.ops.service_stats import ServiceStats
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline
from streamscore.scoring.rollout import ServingModels
from streamscore.scoring.served_model import ServedModel, load_production_model, served_model
from streamscore.settings import TOPIC_PREDICTIONS, TOPIC_SCORER_STATE, TOPIC_SHADOW_PREDICTIONS, Settings
from streamscore.spec import FeatureSpec, resolve
from streamscore.spec.engine import FeatureEngine
from streamscore.state.partition import PartitionState, StateFormatError

log = logging.getLogger("streamscore.scorer")
SERVICE = "scorer"
# Entity states produced per loop turn while a checkpoint is in progress and events keep coming (at least
# as many as the batch had events, so a checkpoint keeps up with the entities a backlog dirties); when no
# event came, all of them (an idle scorer's lag must reach 0 at once, not 128 states per 0.1 s turn).
STATE_SLICE = 512


def _watermarks(reader: Consumer, partition: TopicPartition, timeout_s: float = 30.0) -> tuple[int, int]:
    """(low, high) of a changelog partition, retried while its leadership settles: a topic just (re)created,
    as the demo does, answered NOT_LEADER_FOR_PARTITION to a scorer that joined quickly, and crashed it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return reader.get_watermark_offsets(partition, timeout=10)
        except KafkaException as exc:
            retriable = exc.args and getattr(exc.args[0], "retriable", lambda: False)()
            code = exc.args[0].code() if exc.args and hasattr(exc.args[0], "code") else None
            transient = code in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                                 KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT)
            if not (retriable or transient) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_changelogs(settings: Settings, engine: FeatureEngine, partitions: list[int],
                    timeout_s: float = 60.0) -> tuple[dict[int, PartitionState], int]:
    """Rebuild the entity state of `partitions` from the compacted changelog, all partitions at once (one
    reader assigned to every partition, not one partition after another). Returns the states and how many
    changelog values could not be restored (another state layout, or corrupt: logged, started cold)."""
    topic = settings.topic(TOPIC_SCORER_STATE)
    states = {partition: engine.new_state() for partition in partitions}
    if not partitions:
        return states, 0
    # fetch.wait.max.ms: the broker answers a fetch at once, not after 500 ms (librdkafka's default) when it has
    # little; consume() returns after 50 ms, not after waiting 0.5 s to fill 10,000: a restart restored 500
    # entities (a few thousand changelog values) in 1.4-3.5 s before, ~0.1-0.3 s now.
    reader = make_reader(settings, **{"enable.partition.eof": True, "fetch.wait.max.ms": 5})
    refused = 0
    # the newest value of each key (None: a tombstone), decoded once at the end: the changelog's uncompacted
    # tail holds a value per checkpoint that changed the entity (500 entities: ~10k values, 1.3-2 s to decode
    # them all one after another, ~0.1 s for the newest ones)
    newest: dict[int, dict[bytes, bytes | None]] = {partition: {} for partition in partitions}
    try:
        todo: dict[int, int] = {}  # partition -> high watermark still to reach
        assignment = []
        for partition in partitions:
            low, high = _watermarks(reader, TopicPartition(topic, partition))
            if high > low:
                todo[partition] = high
                assignment.append(TopicPartition(topic, partition, low))
        if not assignment:
            return states, 0
        reader.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rebuilding state of {topic} partitions {sorted(todo)} took over {timeout_s} s")
            for msg in reader.consume(10_000, 0.05):
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reading {topic}[{msg.partition()}]: {msg.error()}")
                    continue
                partition = msg.partition()
                if msg.offset() + 1 >= todo.get(partition, 0):
                    todo.pop(partition, None)
                newest[partition][msg.key()] = msg.value()
    finally:
        reader.close()
    for partition, values in newest.items():
        state = states[partition]
        for entity, value in values.items():
            if value is None:
                continue  # dropped past retention
            try:
                state.load(entity, value)
            except StateFormatError as exc:
                refused += 1
                if refused <= 3:
                    log.warning("entity %r of partition %d starts without state: %s", entity, partition, exc)
    return states, refused


def warm_up_state_kernels(engine: FeatureEngine) -> None:
    """Load the state arena's compiled kernels now: numba's first dispatch in a process imports its lowering
    machinery (~2 s here), which a restarted scorer otherwise paid inside the partition assignment, after
    joining the group; called right after subscribing, it overlaps the join instead."""
    state = engine.new_state()
    state.ensure_rows(len(state.rows) + 1)


class _AcceptEvery:
    """A validator that passes every decoded row: the warm-up's example event is typed right, but cannot
    know a spec's patterns or ranges."""

    def check(self, batch, rows, now_ms):
        return rows, []


def warm_up_scoring(pipeline: ScoringPipeline) -> None:
    """Load every compiled kernel of the scoring path now: the state arena's (above), then the reader's, the
    engine's, the encoder's and the model's, by scoring an example event of the spec in a throwaway pipeline
    (its own state: no entity of the real one is touched; the spec's validation rules are the one step left
    out). In a fresh clone numba's caches are empty: the demo's scorer compiled the engine inside its first
    history batch and scored nothing for 9 s while 30,000 events queued. Called right after subscribing, it
    overlaps the group join."""
    warm_up_state_kernels(pipeline.engine)
    now_ms = int(time.time() * 1000)
    codec, spec = pipeline.codec, pipeline.spec
    try:  # a team's schema may hold what an example cannot fill (a decimal's logical type): then the first
        # real batch compiles, as before
        event = example_record(codec.catalog.schema("event")) | {spec.event.time_field: now_ms}
        scratch = ScoringPipeline(spec, codec, pipeline.model)
        scratch.validator = _AcceptEvery()
        result = scratch.score([InputMessage(codec.encoder("event")(event), 0, 0)], now_ms)
    except Exception as exc:  # noqa: BLE001 - an optimisation, never a reason not to start
        log.warning("scoring not warmed up (%s: %s); the first batch compiles it", type(exc).__name__, exc)
        return
    if result.rejected:
        log.warning("scoring warm-up: the example event was rejected (%s); the first batch compiles the rest",
                    result.rejected[0][1])


def freeze_survivors() -> None:
    """Collect the garbage, then take every object still alive out of the collector's scans (gc.freeze).

    Entity states live in numpy arenas now (no Python object per entity), but a warmed scorer still holds
    ~215k objects the collector tracks (modules, numba dispatchers, the booster, the arenas' slot dicts):
    one full collection of them took 135 ms (0.0 ms once frozen), more than the end-to-end latency budget,
    and automatic ones come at arbitrary batches. Frozen objects are still freed by reference counting
    when dropped. The collection first matters: garbage frozen in a cycle would never be freed (a leak
    that grows with every checkpoint, and a Kafka client kept in one would live on with its threads).
    It scans only what was allocated since the last freeze. Called when partition state was restored and
    at every checkpoint."""
    gc.collect()
    gc.freeze()


class ModelWatcher:
    """Notices a changed rollout: production, canary (and its share) or shadows (checked at most once per
    `interval_s`: one small file read)."""

    def __init__(self, registry: ModelRegistry, model_name: str, interval_s: float = 0.5):
        self.registry = registry
        self.model_name = model_name
        self.interval_s = interval_s
        self._next_check = 0.0
        self._applied: tuple | None = None  # the rollout last applied (rollout_key)

    def changed(self) -> tuple | None:
        """The registry's rollout (rollout_key) when it differs from the one last `applied`, else None."""
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.interval_s
        key = rollout_key(self.registry.rollout(self.model_name))
        return key if key != self._applied else None

    def applied(self, key: tuple) -> None:
        """`key` is served now (a candidate left out of it is not retried until the rollout changes)."""
        self._applied = key


def rollout_key(rollout) -> tuple:
    """A registry Rollout in the form of ServingModels.key."""
    return (rollout.production or 0, rollout.canary, rollout.canary_share if rollout.canary else 0.0,
            tuple(rollout.shadows))


def load_serving(registry: ModelRegistry, spec: FeatureSpec, model_name: str,
                 loaded: dict[int, ServedModel] | None = None) -> tuple[ServingModels, list[str]]:
    """The registry's rollout loaded for serving (versions in `loaded` are reused), and what could not be
    loaded (a canary or shadow that fails is left out; production failing raises)."""
    loaded = loaded if loaded is not None else {}
    rollout = registry.rollout(model_name)
    production = load_production_model(registry, spec, model_name)
    problems = []

    def load(version: int) -> ServedModel | None:
        if version in loaded:
            return loaded[version]
        try:
            model = served_model(registry, spec, registry.get(model_name, version))
        except Exception as exc:  # noqa: BLE001 - one bad candidate must not stop production serving
            problems.append(f"v{version} left out: {exc}")
            return None
        loaded[version] = model
        return model

    canary = load(rollout.canary) if rollout.canary is not None and production.version else None
    shadows = tuple(m for m in (load(v) for v in rollout.shadows) if m is not None)
    return ServingModels(production, canary, rollout.canary_share if canary else 0.0, shadows), problems


class ScorerService:
    def __init__(self, settings: Settings, codec: AvroCodec | None = None, stats: ServiceStats | None = None,
                 spec: FeatureSpec | None = None):
        if spec is None:
            settings, spec = resolve(settings)
        self.settings = settings
        self.spec = spec
        self.codec = codec or AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                                        registry_config=schema_registry_config(settings))
        self.registry = ModelRegistry(settings.registry_dir)
        self.pipeline = ScoringPipeline(spec, self.codec,
                                        load_production_model(self.registry, spec, settings.model_name),
                                        topic=settings.topic(TOPIC_PREDICTIONS),
                                        shadow_topic=settings.topic(TOPIC_SHADOW_PREDICTIONS))
        self._loaded: dict[int, ServedModel] = {}  # candidate versions loaded, by version
        self.watcher = ModelWatcher(self.registry, settings.model_name)
        # a changed rollout loads here, off the scoring loop: (future, rollout key, its version cache)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer-model-load")
        self._loading: tuple | None = None
        self.stats = stats or ServiceStats(SERVICE)
        self.stats.model_version = self.pipeline.model.version
        # consumed since the last checkpoint started
        self._uncommitted: list = []
        # the checkpoint in progress: messages it covers and the entity states still to produce:
        # (partition, slot, entity id); slot None = a tombstone (the entity's state was dropped)
        self._checkpointing: list | None = None
        self._state_queue: list[tuple[int, int | None, bytes]] = []
        # outputs produced now count on `_acks`; sealed checkpoints wait (oldest first) for their acks
        self._acks = AckBatch()
        self._sealed: deque[AckBatch] = deque()
        self._producer = None
        # partitions assigned to us now (their state is loaded); see the filter in run()
        self._owned: set[int] = set()

    # --- rebalance callbacks: state follows partitions --------------------------
    def _on_assign(self, consumer, partitions) -> None:
        started = time.monotonic()
        numbers = [tp.partition for tp in partitions]
        states, refused = read_changelogs(self.settings, self.pipeline.engine, numbers)
        for partition, state in states.items():
            self.pipeline.load_partition_state(partition, state)
            self._owned.add(partition)
        self.stats.partitions_owned = len(self._owned)
        self.stats.errors += refused
        log.info("partitions %s assigned: %d entities restored in %.2f s%s", numbers,
                 sum(len(s) for s in states.values()), time.monotonic() - started,
                 f" ({refused} changelog values of another state layout or corrupt: those entities start cold)"
                 if refused else "")
        freeze_survivors()

    def _on_revoke(self, consumer, partitions) -> None:
        # Hand over cleanly: the next owner starts from our committed offsets and state.
        if self._producer is not None:
            self._checkpoint_now(consumer)
        for tp in partitions:
            self._owned.discard(tp.partition)
            self.pipeline.drop_partition_state(tp.partition)
        self.stats.partitions_owned = len(self._owned)
        log.info("partitions revoked: %s", [tp.partition for tp in partitions])

    def _on_lost(self, consumer, partitions) -> None:
        # Another consumer may own them already: never commit for them; they get replayed.
        lost = {tp.partition for tp in partitions}
        self._uncommitted = [m for m in self._uncommitted if m.partition() not in lost]
        if self._checkpointing is not None:
            self._checkpointing = [m for m in self._checkpointing if m.partition() not in lost]
        self._state_queue = [item for item in self._state_queue if item[0] not in lost]
        for batch in self._sealed:
            batch.covered = [m for m in batch.covered if m.partition() not in lost]
        for partition in lost:
            self._owned.discard(partition)
            self.pipeline.drop_partition_state(partition)
        self.stats.partitions_owned = len(self._owned)
        log.info("partitions lost: %s", sorted(lost))

    # --- checkpoints: state -> acks -> commit, off the hot loop ---------------------
    def _queue_changed_states(self) -> None:
        """Queue the states changed since the last checkpoint, and tombstones for the entities past retention."""
        retention = self.spec.retention_ms
        for partition, state in self.pipeline.states.items():
            ids = state.entity_ids
            self._state_queue += [(partition, slot, ids[slot]) for slot in state.take_dirty()]
            watermark = state.watermark
            if watermark is not None:
                expired = state.expired(watermark - retention)
                if expired:
                    state.drop(expired)
                    self._state_queue += [(partition, None, entity) for entity in expired]

    def _start_checkpoint(self) -> None:
        freeze_survivors()
        self._checkpointing, self._uncommitted = self._uncommitted, []
        self._queue_changed_states()

    def _produce_states(self, limit: int | None) -> None:
        """Produce up to `limit` (None: all) queued entity states; seal the checkpoint when none are left."""
        queue = self._state_queue
        if limit is None or limit >= len(queue):
            todo, self._state_queue = queue, []
        else:
            todo, self._state_queue = queue[-limit:], queue[:-limit]
        producer, acks = self._producer, self._acks
        state_topic = self.settings.topic(TOPIC_SCORER_STATE)
        by_partition: dict[int, list[int]] = {}
        for partition, slot, entity in todo:
            state = self.pipeline.states.get(partition)
            if state is None:
                continue
            if slot is None:  # dropped past retention: a tombstone compacts the changelog too
                produce(producer, state_topic, None, entity, partition=partition, on_delivery=acks)
                acks.produced += 1
            elif slot < len(state.entity_ids) and state.entity_ids[slot] == entity:  # (a dropped slot is reused)
                by_partition.setdefault(partition, []).append(slot)
        for partition, slots in by_partition.items():
            # the state now (maybe ahead of the checkpoint's offsets: replayed offsets are not re-applied)
            for entity, value in self.pipeline.states[partition].encode(slots):
                produce(producer, state_topic, value, entity, partition=partition, on_delivery=acks)
                acks.produced += 1
        if not self._state_queue:
            acks.seal(self._checkpointing)
            self._sealed.append(acks)
            self._acks = AckBatch()
            self._checkpointing = None

    def _commit_acknowledged(self, consumer, asynchronous: bool = True) -> None:
        """Commit the offsets of the oldest sealed checkpoints whose outputs are all acknowledged (from the
        loop without waiting for the coordinator; synchronously when handing over or stopping)."""
        covered: list = []
        sealed = self._sealed
        while sealed and sealed[0].acknowledged:
            batch = sealed.popleft()
            if batch.errors:
                raise DeliveryFailed(f"{len(batch.errors)} messages failed delivery, first: {batch.errors[0]}")
            covered.extend(batch.covered)
        if covered:
            commit(consumer, covered, asynchronous=asynchronous)

    def _checkpoint_now(self, consumer, timeout_s: float = 330.0) -> None:
        """Synchronously: state of every changed entity -> wait for acks of all outputs -> commit it all."""
        if self._checkpointing is None:
            self._start_checkpoint()
        else:  # a checkpoint in progress also takes what was consumed since it started
            self._checkpointing += self._uncommitted
            self._uncommitted = []
            self._queue_changed_states()
        self._produce_states(None)
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeliveryFailed(f"{remaining} messages still unacknowledged after {timeout_s:.0f} s")
        self._commit_acknowledged(consumer, asynchronous=False)
        if self._sealed:  # flushed, so every batch is acknowledged; anything left is a bug
            raise DeliveryFailed(f"{len(self._sealed)} checkpoints still unacknowledged after a flush")

    def _next_batch(self, consumer, wait_s: float) -> list:
        """Up to scorer_batch_size messages: waits (<= 0.1 s) for the first one only as long as it
        takes to arrive, then at most `wait_s` for more, so a quiet stream is not held back. With the
        default wait of 0 a batch is what arrived while the last one was scored: it grows with the rate
        (at 5k events/s offered, p50 / p99 end to end 15-29 / 99-109 ms against 33-37 / 150-265 ms
        with a 5 ms wait, two quick bench runs each)."""
        first = consumer.consume(1, 0.1)
        if not first:
            return first
        return first + consumer.consume(self.settings.scorer_batch_size - 1, wait_s)

    def _maybe_swap_model(self) -> None:
        """Start loading a changed rollout in the background; swap it in once loaded.

        Loading runs in a thread of its own: in the loop it stalled scoring 529-757 ms in the demo (the
        process's first model: LightGBM's parse, the tree kernel's build and probe, numba loading the
        compiled walk), while events queued behind it. The loop keeps scoring with the current models
        meanwhile and swaps between two batches."""
        if self._loading is None:
            key = self.watcher.changed()
            if key is not None:
                cache = dict(self._loaded)  # the loader adds to its own copy
                self._loading = (self._loader.submit(load_serving, self.registry, self.spec,
                                                     self.settings.model_name, cache), key, cache)
            return
        future, key, cache = self._loading
        if not future.done():
            return
        self._loading = None
        before = self.pipeline.serving
        try:
            serving, problems = future.result()
        except Exception as exc:  # keep serving the current model; say why loudly (retried at the next check)
            log.error("not swapping model: %s", exc)
            self.stats.errors += 1
            return
        self._loaded = cache
        self.watcher.applied(key)
        for problem in problems:
            log.error("rollout: %s", problem)
            self.stats.errors += 1
        if serving.key == before.key:
            return
        active = {serving.production.version, *(m.version for m in serving.shadows)}
        if serving.canary is not None:
            active.add(serving.canary.version)
        self._loaded = {v: m for v, m in self._loaded.items() if v in active}
        model = serving.production
        if model.version != before.production.version:
            log.info("model swap: %s v%d -> v%d", model.name, before.production.version, model.version,
                     extra={"model_name": model.name, "model_version": model.version,
                            "previous_version": before.production.version})
            self.stats.model_swaps += 1
        log.info("serving %s", serving.describe())
        self.pipeline.set_serving(serving)
        self.stats.model_version = model.version

    def run(self, stop: threading.Event) -> None:
        settings = self.settings
        events_topic = settings.topic(self.spec.event.topic)
        membership = {}
        slot = None
        if settings.scorer_static_membership:
            slot = InstanceSlot(settings, settings.group(SERVICE), [events_topic])
            membership = {"group.instance.id": slot.acquire()}
        consumer = make_consumer(settings, settings.group(SERVICE), on_commit=log_commit_errors, **membership)
        producer = self._producer = make_producer(settings)
        self._acks = AckBatch()
        self._sealed.clear()
        predictions_topic = settings.topic(TOPIC_PREDICTIONS)
        shadow_topic = settings.topic(TOPIC_SHADOW_PREDICTIONS)
        consumer.subscribe([events_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        warm_up_scoring(self.pipeline)  # while librdkafka joins the group in its own threads
        wait_s = settings.scorer_batch_wait_ms / 1000
        interval_s = settings.scorer_checkpoint_interval_ms / 1000
        next_checkpoint = time.monotonic() + interval_s
        self.stats.running = True
        try:
            while not stop.is_set():
                self._maybe_swap_model()
                batch = self._next_batch(consumer, wait_s)
                # A rebalance runs inside consume(): messages fetched before it may belong to partitions
                # revoked meanwhile. Their new owner scores them with their entity state; scored here
                # they would see an empty state (wrong features) and pollute the changelog.
                messages = [m for m in data_messages(batch) if m.partition() in self._owned]
                if messages:
                    started = time.perf_counter()
                    inputs = [InputMessage(m.value(), m.partition(), m.offset()) for m in messages]
                    result = self.pipeline.score(inputs)
                    acks = self._acks
                    for key, value in zip(result.keys, result.encoded):
                        try:  # the hot path calls the client directly; a full queue or a retriable error
                            producer.produce(predictions_topic, key=key, value=value, on_delivery=acks)
                        except (BufferError, KafkaException):  # ... goes through the shared produce path
                            produce(producer, predictions_topic, value, key, on_delivery=acks)
                    for value in result.shadow:
                        produce(producer, shadow_topic, value, on_delivery=acks)
                    for index, rejection, event_id in result.rejected:
                        dead_letter(producer, settings, messages[index], rejection, SERVICE, event_id=event_id,
                                    on_delivery=acks)
                        self.stats.count_rejection(rejection.reason)
                    acks.produced += len(result.encoded) + len(result.rejected) + len(result.shadow)
                    self.stats.count_generic_decodes(result.generic_rows)
                    self._uncommitted.extend(messages)
                    producer.poll(0)  # serve delivery callbacks
                    # latency here = event produced -> its prediction handed to the producer client
                    now_ms = time.time() * 1000
                    self.stats.record_batch(
                        n_in=len(messages), n_out=len(result.encoded), seconds=time.perf_counter() - started,
                        latencies_ms=[now_ms - m.timestamp()[1] for m in messages if m.timestamp()[1] > 0])
                # While events flow, a checkpoint every interval: each writes the entities changed since the
                # last, so a longer interval writes fewer states (the soak at 2,500 events/s: 0.5 s wrote
                # 7 MB/s of state, 35x the events' bytes). A quiet topic (no message for 0.1 s) checkpoints at
                # once: an idle scorer's lag reaches 0 without waiting for the interval.
                if self._checkpointing is None and self._uncommitted and (
                        not batch or time.monotonic() >= next_checkpoint):
                    self._start_checkpoint()
                    next_checkpoint = time.monotonic() + interval_s
                if self._checkpointing is not None:
                    self._produce_states(max(STATE_SLICE, len(messages)) if messages else None)
                if self._sealed:
                    producer.poll(0)
                    self._commit_acknowledged(consumer)
            self._checkpoint_now(consumer)  # graceful stop: everything acknowledged and committed
        finally:
            self.stats.running = False
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._producer = None  # close() revokes: after a failure, nothing more may be committed
            consumer.close()
            producer.flush(10)
            if slot is not None:
                slot.release()
