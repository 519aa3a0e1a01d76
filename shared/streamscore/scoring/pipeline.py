"""The scorer's batch step as plain code: decode -> validate -> features -> predict -> records.

`ScoringPipeline` owns the per-entity feature state (one `PartitionState` per Kafka partition,
because a partition is the unit that moves between scorer instances) and the model currently
served. It never touches Kafka, so it is unit-testable and benchmarkable in process;
services/scorer wraps it in a consume/produce/commit loop. Everything it does comes from the
feature spec: the event layout (the compiled scanner), the checks (EventValidator), the features
(FeatureEngine), and the Prediction it writes (PredictionWriter).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from streamscore.avro.codec import AvroCodec
from streamscore.avro.scanner import ROW_FAILED, RecordReader, ScannedBatch
from streamscore.kafka.io import Rejection
from streamscore.scoring.predictions import PredictionWriter
from streamscore.scoring.served_model import ServedModel
from streamscore.scoring.validation import DUPLICATE_EVENT, EventValidator
from streamscore.spec.engine import DUPLICATE, FeatureEngine
from streamscore.spec.model import FeatureSpec
from streamscore.state.partition import PartitionState


class InputMessage(NamedTuple):
    """One consumed message as the pipeline reads it (a tuple: built per message on the hot path)."""

    value: bytes | None
    partition: int
    offset: int


class BatchResult:
    """What one batch produced, in input order.

    `encoded[i]` is the framed Avro Prediction of the i-th scored event, `keys[i]` its Kafka key (the entity)
    and `sources[i]` its (partition, offset); `rejected` lists (message index, Rejection, event id or None).
    `matrix` and `scores` are the scored events' features and model outputs; `predictions` decodes `encoded`
    (for tests and tools: the scorer only needs the bytes)."""

    def __init__(self, codec: AvroCodec | None = None) -> None:
        self.encoded: list[bytes] = []
        self.keys: list[bytes] = []
        self.sources: list[tuple[int, int]] = []
        self.rejected: list[tuple[int, Rejection, str | None]] = []
        self.matrix = np.empty((0, 0))
        self.scores: np.ndarray | None = None
        self.generic_rows = 0  # messages the compiled scan left to the generic decoder
        self._codec = codec

    @property
    def predictions(self) -> list[dict]:
        decode = self._codec.decoder("prediction")
        return [decode(value) for value in self.encoded]


class ScoringPipeline:
    def __init__(self, spec: FeatureSpec, codec: AvroCodec, model: ServedModel, topic: str | None = None):
        self.spec = spec
        self.codec = codec
        self.model = model
        self.engine = FeatureEngine(spec)
        self.reader = RecordReader(codec, "event")
        self.validator = EventValidator(spec)
        self.writer = PredictionWriter(codec, spec.feature_set, topic)
        self.states: dict[int, PartitionState] = {}
        layout = spec.event.layout
        self._id = layout.index(spec.event.id_field)
        self._entity = layout.index(spec.event.entity_field)
        self._time = layout.index(spec.event.time_field)

    # --- state ownership follows partition assignment ------------------------
    def state(self, partition: int) -> PartitionState:
        state = self.states.get(partition)
        if state is None:
            state = self.states[partition] = self.engine.new_state()
        return state

    def load_partition_state(self, partition: int, state: PartitionState) -> None:
        self.states[partition] = state

    def drop_partition_state(self, partition: int) -> None:
        self.states.pop(partition, None)

    def entity_count(self) -> int:
        return sum(len(s) for s in self.states.values())

    def swap_model(self, model: ServedModel) -> None:
        self.model = model

    # --- the batch step ----------------------------------------------------------
    def score(self, messages: list[InputMessage], now_ms: int | None = None) -> BatchResult:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult(self.codec)
        batch = self.reader.read_batch([msg.value for msg in messages])
        result.generic_rows = batch.generic_rows
        for index, error in sorted(batch.errors.items()):
            if error is None:
                result.rejected.append((index, Rejection("undecodable", None, "empty message value"), None))
            else:  # the DecodeError naming the reason and field
                result.rejected.append((index, Rejection(error.reason, error.field, str(error)), None))
        decoded = np.flatnonzero(batch.status != ROW_FAILED)
        accepted, rejections = self.validator.check(batch, decoded, now_ms)
        result.rejected += rejections
        partitions = np.fromiter((msg.partition for msg in messages), dtype=np.int64, count=len(messages))
        offsets = np.fromiter((msg.offset for msg in messages), dtype=np.int64, count=len(messages))
        matrix = np.empty((len(accepted), self.engine.n_features), dtype=np.float64)
        keep = np.ones(len(accepted), dtype=bool)
        if len(accepted):
            of_accepted = partitions[accepted]
            for partition in np.unique(of_accepted).tolist():
                positions = np.flatnonzero(of_accepted == partition)
                rows = accepted[positions]
                inputs = self.engine.inputs(batch, rows, offsets[rows])
                part_matrix, status, first_offsets = self.engine.compute(self.state(partition), inputs)
                self.engine.encode(part_matrix, inputs, self.model.vocabularies)
                matrix[positions] = part_matrix
                for k in np.flatnonzero(status == DUPLICATE).tolist():
                    keep[positions[k]] = False
                    result.rejected.append(self._duplicate(batch, int(rows[k]), int(first_offsets[k]), partition,
                                                           int(offsets[rows[k]])))
        if not keep.all():
            accepted, matrix = accepted[keep], matrix[keep]
        result.rejected.sort(key=lambda rejected: rejected[0])  # input order
        model = self.model
        scores = model.predict(matrix)
        result.matrix, result.scores = matrix, scores
        result.sources = list(zip(partitions[accepted].tolist(), offsets[accepted].tolist()))
        result.keys = batch.texts(self._entity, accepted)
        message_starts, message_lengths = batch.message_span()
        result.encoded = self.writer.encode_batch(
            batch.raw,
            (batch.ints[accepted, self._id], batch.lengths[accepted, self._id]),
            (batch.ints[accepted, self._entity], batch.lengths[accepted, self._entity]),
            (message_starts[accepted], message_lengths[accepted]),
            batch.ints[accepted, self._time] // self.spec.event.time_divisor,
            int(time.time() * 1000), [(model.name, model.version)], np.zeros(len(accepted), dtype=np.int64),
            scores, matrix, partitions[accepted], offsets[accepted])
        return result

    def _duplicate(self, batch: ScannedBatch, row: int, first: int, partition: int, offset: int):
        """A re-sent event (its event id already applied to its entity's state) becomes a rejection, not a
        prediction: predictions are keyed by event id, and the state did not count it again."""
        event_id = batch.value(row, self._id)
        entity = batch.value(row, self._entity)
        where = f"offset {first}" if first >= 0 else "an unknown offset"
        detail = (f"{self.spec.event.id_field} {event_id!r} of entity {entity!r} was already applied at {where} "
                  f"of partition {partition}; this re-send at offset {offset} is not scored again")
        return row, Rejection(DUPLICATE_EVENT, self.spec.event.id_field, detail), event_id
