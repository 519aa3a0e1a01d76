"""Logger: predictions, shadow scores, labels, dead letters and model updates -> ClickHouse.

Loop: consume -> decode into rows, buffered per table -> when the buffer holds
`logger_batch_rows` rows or is `logger_flush_interval_s` old, hand every table's
insert (each tagged with a token made of the exact offset ranges it covers) to a
writer thread, which inserts while the loop reads the next batch -> commit a
batch's offsets only after all its inserts succeeded. A failed insert is retried
with backoff and nothing is committed meanwhile, so nothing is lost; a replay
after a crash repeats identical batches, which ClickHouse deduplicates, and
the tables are ReplacingMergeTree keyed by event id for the rest (query FINAL).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Message

from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog
from streamscore.avro.example_records import example_record
from streamscore.clickhouse.blocks import PredictionBlockWriter
from streamscore.clickhouse.rows import (LABEL_COLUMNS, REJECTED_COLUMNS, SHADOW_COLUMNS, InvalidRow, batch_token,
                                         label_row, rejected_row, shadow_rows)
from streamscore.clickhouse.store import Store, open_store
from streamscore.clickhouse.tables import feature_names_of
from streamscore.kafka.io import BATCH_FETCH, commit, data_messages, headers_dict, make_consumer
from streamscore.learning.registry import ModelRegistry, RegistryError, model_versions_row
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import (TOPIC_DEAD_LETTER, TOPIC_MODEL_UPDATES, TOPIC_PREDICTIONS, TOPIC_SHADOW_PREDICTIONS,
                                  Settings)
from streamscore.spec import FeatureSpec, resolve

log = logging.getLogger("streamscore.logger")
SERVICE = "logger"


@dataclass
class TableBuffer:
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def add(self, row: list, msg: Message) -> None:
        self.rows.append(row)
        self.cover(msg)

    def cover(self, msg: Message) -> None:
        """Count `msg` in the offset ranges (the dedup token) of this table's next insert."""
        self._widen((msg.topic(), msg.partition()), msg.offset(), msg.offset())

    def cover_many(self, topic: str, messages: list[Message]) -> None:
        """`cover` for many messages of one topic (array operations instead of a dict update each)."""
        partitions = np.fromiter((m.partition() for m in messages), dtype=np.int64, count=len(messages))
        offsets = np.fromiter((m.offset() for m in messages), dtype=np.int64, count=len(messages))
        for partition in np.unique(partitions).tolist():
            of_partition = offsets[partitions == partition]
            self._widen((topic, partition), int(of_partition.min()), int(of_partition.max()))

    def _widen(self, key: tuple[str, int], low: int, high: int) -> None:
        lo, hi = self.ranges.get(key, (low, high))
        self.ranges[key] = (min(lo, low), max(hi, high))

    def clear(self) -> None:
        self.rows = []
        self.ranges = {}


class PredictionSink:
    """Buffers rows per table and writes them as one deduplicated insert each.

    Prediction messages are buffered as bytes (`add_encoded`) and become one Native block per flush
    (`seal`, PredictionBlockWriter); the ones it cannot write come back as rejections for rejected_events."""

    def __init__(self, store: Store, block_writer: PredictionBlockWriter | None = None):
        self.store = store
        self.block_writer = block_writer
        self.encoded: list[Message] = []  # Prediction messages waiting for `seal`
        self.blocks: list[tuple[bytes, int]] = []  # sealed Native blocks of `predictions`: (block, rows)
        self.tables: dict[str, TableBuffer] = {
            "labels": TableBuffer(LABEL_COLUMNS),
            "shadow_predictions": TableBuffer(SHADOW_COLUMNS),
            "rejected_events": TableBuffer(REJECTED_COLUMNS),
            "model_versions": TableBuffer([]),  # columns come with the first row
        }
        self.prediction_ranges = TableBuffer([])  # the offset ranges the blocks cover (their dedup token)
        self.messages: list[Message] = []
        self.opened_at = time.monotonic()

    def pending_rows(self) -> int:
        return (sum(len(b.rows) for b in self.tables.values()) + len(self.encoded)
                + sum(rows for _, rows in self.blocks))

    def add_encoded(self, topic: str, messages: list[Message]) -> None:
        """Prediction messages of `topic` for the next Native block."""
        self.encoded += messages
        self.prediction_ranges.cover_many(topic, messages)

    def seal(self) -> tuple[list[tuple[Message, InvalidRow]], int]:
        """Encode the buffered Prediction messages into a Native block; returns the messages it could not write,
        with why, in order (their offsets are already in the block's ranges), and how many messages took the
        generic decoder."""
        if not self.encoded:
            return [], 0
        messages, self.encoded = self.encoded, []
        block = self.block_writer.encode([m.value() for m in messages])
        if block.rows:
            self.blocks.append((block.data, block.rows))
        return [(messages[i], InvalidRow(r.reason, r.field, r.detail)) for i, r in block.rejected], block.generic_rows

    def add_rows(self, table: str, rows: list[list], msg: Message) -> None:
        """Several rows of one message (a ShadowScores record is a batch of events)."""
        buffer = self.tables[table]
        buffer.rows += rows
        buffer.cover(msg)

    def add(self, table: str, row: list, msg: Message, columns: list[str] | None = None) -> None:
        buffer = self.tables[table]
        if columns:
            buffer.columns = columns
        buffer.add(row, msg)

    def take(self) -> "SinkBatch":
        """Everything sealed and buffered (call `seal` first), handed over for writing; the sink is empty after."""
        batch = SinkBatch(self.blocks, [(table, buffer.rows, buffer.columns, dict(buffer.ranges))
                                        for table, buffer in self.tables.items() if buffer.rows],
                          dict(self.prediction_ranges.ranges))
        self.blocks = []
        for buffer in self.tables.values():
            buffer.clear()
        self.prediction_ranges.clear()
        self.opened_at = time.monotonic()
        return batch

    def flush(self) -> int:
        """Insert everything sealed and buffered (call `seal` first); returns the rows written."""
        return self.take().write(self.store)


@dataclass
class SinkBatch:
    """One flush's inserts: Native blocks of `predictions`, then row batches per table, each with the
    dedup token of the offset ranges it covers (a replay of the same messages gets the same tokens)."""

    blocks: list[tuple[bytes, int]]
    tables: list[tuple[str, list[list], list[str], dict]]  # (table, rows, columns, offset ranges)
    prediction_ranges: dict

    def write(self, store: Store) -> int:
        """Insert it all (again, after a failure: same tokens, deduplicated); returns the rows written."""
        written = 0
        for i, (block, rows) in enumerate(self.blocks):
            written += store.insert_native("predictions", block, rows,
                                           dedup_token=batch_token(f"predictions/native{i}", self.prediction_ranges))
        for table, rows, columns, ranges in self.tables:
            store.insert(table, rows, columns, dedup_token=batch_token(table, ranges))
            written += len(rows)
        return written


def flush_due(rows: int, age_s: float, quiet: bool, batch_rows: int, interval_s: float) -> bool:
    """Write the buffered rows now? At `batch_rows` (logger_batch_rows), after `interval_s`
    (logger_flush_interval_s), or once the topics went quiet (a consume returned nothing) and the rows are a
    quarter of the interval old: the tail of a burst then reaches ClickHouse at once instead of up to a whole
    interval later (the demo's 30,000-event history waited 0.8 s for it), while a steady trickle still makes
    at most four inserts a second."""
    return rows >= batch_rows or age_s >= interval_s or (quiet and age_s >= interval_s / 4)


class LoggerService:
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
        self.predictions_topic = settings.topic(TOPIC_PREDICTIONS)
        self.sink = PredictionSink(self.store, PredictionBlockWriter(
            spec, self.codec, lambda feature_set: feature_names_of(self.store, feature_set)))
        self.pending: list[Message] = []  # consumed, rows buffered, not handed to the writer yet
        self._writer: ThreadPoolExecutor | None = None  # one thread: writes stay in order
        self._writing = None  # (future of the rows written, its messages, started) of the write in flight
        self._gave_up = False
        self.topics = {
            settings.topic(TOPIC_PREDICTIONS): self._on_prediction,
            settings.topic(TOPIC_SHADOW_PREDICTIONS): self._on_shadow_scores,
            settings.topic(spec.label.topic): self._on_label,
            settings.topic(TOPIC_DEAD_LETTER): self._on_dead_letter,
            settings.topic(TOPIC_MODEL_UPDATES): self._on_model_update,
        }

    # --- decoding one message into rows -----------------------------------------
    def _on_prediction(self, msg: Message) -> None:
        self.sink.add_encoded(msg.topic(), [msg])  # decoded a batch at a time by `seal`

    def _on_shadow_scores(self, msg: Message) -> None:
        self.sink.add_rows("shadow_predictions", shadow_rows(self.codec.decode(msg.value(), "shadow_scores")), msg)

    def _on_label(self, msg: Message) -> None:
        row = label_row(self.codec.decode(msg.value(), "label"), self.spec.label,
                        msg.timestamp()[1] or int(time.time() * 1000))
        self.sink.add("labels", row, msg)

    def _on_dead_letter(self, msg: Message) -> None:
        row = rejected_row(headers_dict(msg), msg.value() or b"", msg.topic(), msg.partition(), msg.offset(),
                           msg.timestamp()[1] or int(time.time() * 1000))
        self.sink.add("rejected_events", row, msg)

    def _on_model_update(self, msg: Message) -> None:
        update = self.codec.decode(msg.value(), "model_update")
        # The registry holds the version's metadata (training range, metrics);
        # an unknown version raises and the update lands in rejected_events.
        version = self.registry.get(update["model_name"], update["version"])
        row = model_versions_row(version, update)
        self.sink.add("model_versions", list(row.values()), msg, columns=list(row.keys()))

    def _rejected_here(self, msg: Message, exc: Exception) -> None:
        """A message the logger cannot read is kept, with the reason, in rejected_events."""
        reason = getattr(exc, "reason", "undecodable")
        headers = {"error.service": SERVICE, "error.reason": reason,
                   "error.field": getattr(exc, "field", None) or "", "error.detail": str(exc)}
        row = rejected_row(headers, msg.value() or b"", msg.topic(), msg.partition(), msg.offset(),
                           int(time.time() * 1000))
        self.sink.add("rejected_events", row, msg)
        self.stats.count_rejection(reason)

    def _read_or_reject(self, msg: Message, read) -> None:
        try:
            read(msg)
        except (DecodeError, InvalidRow, RegistryError, KeyError, TypeError, ValueError) as exc:
            self._rejected_here(msg, exc)

    def handle(self, msg: Message) -> None:
        """Buffer the rows of one consumed message (or its rejection); written by the next flush."""
        self._read_or_reject(msg, lambda m: self.topics[m.topic()](m))
        self.pending.append(msg)

    def handle_batch(self, messages: list[Message]) -> None:
        """`handle` for each message, with the Prediction messages only buffered (their rows come from `seal`)."""
        topic = self.predictions_topic
        encoded = []
        for msg in messages:
            if msg.topic() == topic:
                encoded.append(msg)
            else:
                self.handle(msg)
        if encoded:
            self.sink.add_encoded(topic, encoded)
            self.pending += encoded

    def seal(self) -> None:
        """Turn the buffered Prediction messages into a Native block; what it cannot write is kept, with the
        reason and field, in rejected_events."""
        rejected, generic = self.sink.seal()
        self.stats.count_generic_decodes(generic)
        for msg, why in rejected:
            self._rejected_here(msg, why)

    # --- the loop: seal -> write in the background -> commit what was written ------------
    def start_write(self, stop: threading.Event | None = None) -> list[Message] | None:
        """Seal the buffered messages and hand their rows to the writer thread; returns the messages
        of the previous write once it finished, to commit (None: it gave up, commit nothing).

        The insert runs while this thread consumes and reads the next batch (chDB and the HTTP
        client release the GIL). One write at a time, in order: a batch's offsets are committed
        only after its own inserts and all earlier ones succeeded."""
        batch = None
        if self.pending:
            started = time.perf_counter()
            self.seal()
            batch, messages, self.pending = self.sink.take(), self.pending, []
        finished = self.finish_write()
        if batch is not None:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logger-insert")
            self._writing = (self._writer.submit(self._write_with_retry, batch, stop), messages, started)
        return finished

    def finish_write(self) -> list[Message] | None:
        """Wait for the write in flight; returns its messages to commit ([] if none, None if it gave up)."""
        if self._writing is None:
            return []
        future, messages, started = self._writing
        self._writing = None
        written = future.result()
        if written is None or self._gave_up:
            # Offsets commit cumulatively per partition: after a batch that was not written, no later
            # batch may commit either (stop is set: everything uncommitted is consumed again).
            self._gave_up = True
            return None
        self.stats.record_batch(n_in=len(messages), n_out=written, seconds=time.perf_counter() - started)
        return messages

    def _write_with_retry(self, batch: SinkBatch, stop: threading.Event | None) -> int | None:
        """Insert `batch`, retrying with backoff while the store fails; None once `stop` is set then
        (a SIGTERM must not hang on a dead store: the messages are consumed again at the next start,
        and the dedup tokens / FINAL absorb what was written twice)."""
        backoff = 0.2
        while True:
            try:
                return batch.write(self.store)
            except Exception as exc:  # store down: keep the batch, retry, commit nothing
                self.stats.errors += 1
                if stop is not None and stop.is_set():
                    log.error("insert failed while stopping (%s): its messages stay uncommitted and are "
                              "consumed again at the next start", exc)
                    return None
                log.warning("insert failed (%s); retrying in %.1f s", exc, backoff)
                if stop is not None:
                    stop.wait(backoff)
                else:
                    time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    @staticmethod
    def _commit(consumer, finished: list[Message] | None) -> None:
        if finished:
            commit(consumer, finished)

    def _flush_due(self, quiet: bool) -> bool:
        return flush_due(self.sink.pending_rows(), time.monotonic() - self.sink.opened_at, quiet,
                         self.settings.logger_batch_rows, self.settings.logger_flush_interval_s)

    def warm_up(self) -> None:
        """Load the block writer's compiled readers now, on an example Prediction of the spec: numba's first
        dispatch in a process (its target machinery, then each kernel's cache) took 2.1 s in the demo inside
        the logger's first write, while 30,000 predictions queued behind it. Called right after subscribing,
        it overlaps the group join instead."""
        now_ms = int(time.time() * 1000)
        catalog = self.codec.catalog
        try:  # a team's schema may hold what an example cannot fill (a decimal's logical type): then the
            # first real batch loads the readers, as before
            event = self.codec.encoder("event")(example_record(catalog.schema("event")))
            prediction = example_record(catalog.schema("prediction")) | {
                "event_time": now_ms, "scored_at": now_ms, "feature_set": self.spec.feature_set,
                "features": [0.0] * len(self.spec.feature_names), "event": event}
            block = self.sink.block_writer.encode([self.codec.encoder("prediction")(prediction)])
        except Exception as exc:  # noqa: BLE001 - an optimisation, never a reason not to start
            log.warning("block writer not warmed up (%s: %s); its first write loads it", type(exc).__name__, exc)
            return
        if block.rows != 1:
            log.warning("block writer warm-up: the example prediction was not written (%s)", block.rejected)

    def _on_assign(self, consumer, partitions) -> None:
        self.stats.partitions_owned = len(partitions)  # eager rebalancing: the whole new assignment

    def _on_revoke(self, consumer, partitions, stop: threading.Event) -> None:
        self._drain_and_commit(consumer, stop)
        self.stats.partitions_owned = 0

    def _drain_and_commit(self, consumer, stop: threading.Event) -> None:
        """Write everything buffered and wait for it; commit it all (before a revoke and at the end)."""
        self._commit(consumer, self.start_write(stop))
        self._commit(consumer, self.finish_write())

    def catch_up(self, consumer, topics: list[str], timeout_s: float = 5.0) -> None:
        """At a stop: consume the assigned partitions of `topics` up to their end (at most `timeout_s`), so what
        was published just before the stop (a retrain finishing in its grace period: its model updates) is
        recorded now, not at the next start. Whatever else arrives meanwhile is buffered and written too."""
        deadline = time.monotonic() + timeout_s
        try:
            wanted = [tp for tp in consumer.assignment() if tp.topic in topics]
            ends = {(tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=2)[1] for tp in wanted}
        except Exception as exc:  # noqa: BLE001 - a stop must not fail on a broker problem
            log.warning("not catching up on %s before stopping: %s", topics, exc)
            return
        committed = {}
        while time.monotonic() < deadline:
            behind = []
            for tp in consumer.position(wanted):
                key = (tp.topic, tp.partition)
                at = tp.offset
                if at < 0:  # nothing fetched from it in this session: it starts at the committed offset
                    if key not in committed:
                        committed.update({(c.topic, c.partition): c.offset for c in consumer.committed(wanted, 2)})
                    at = committed.get(key, -1)
                if ends[key] > 0 and at < ends[key]:
                    behind.append(key)
            if not behind:
                return
            batch = consumer.consume(5_000, 0.1)
            self.handle_batch([msg for msg in batch if not msg.error()])

    def close(self) -> None:
        """Wait for the write in flight (its messages stay uncommitted) and end the writer thread."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._writing = None

    def run(self, stop: threading.Event) -> None:
        settings = self.settings
        consumer = make_consumer(settings, settings.group(SERVICE), BATCH_FETCH)
        # consumer.close() revokes too: with `stop` passed, a dead store cannot hang the shutdown there.
        consumer.subscribe(list(self.topics), on_assign=self._on_assign, on_revoke=lambda c, parts: self._on_revoke(
            c, parts, stop))
        self.warm_up()  # while librdkafka joins the group in its own threads
        self.stats.running = True
        try:
            while not stop.is_set():
                batch = consumer.consume(5_000, 0.1)
                self.handle_batch(data_messages(batch))
                if self._writing is not None and self._writing[0].done():
                    self._commit(consumer, self.finish_write())  # written: commit now, not at the next flush
                if self.pending and self._flush_due(quiet=not batch):
                    self._commit(consumer, self.start_write(stop))
            self.catch_up(consumer, [settings.topic(TOPIC_MODEL_UPDATES)])
            self._drain_and_commit(consumer, stop)
        finally:
            self.stats.running = False
            consumer.close()
            self.close()
