"""The scorer's batch step as plain code: decode -> validate -> features -> predict -> records.

`ScoringPipeline` owns the per-entity feature state (one `PartitionState` per Kafka partition,
because a partition is the unit that moves between scorer instances) and the model currently
served. It never touches Kafka, so it is unit-testable and benchmarkable in process;
services/scorer wraps it in a consume/produce/commit loop. Everything it does comes from the
feature spec: the event layout (the compiled scanner), the checks (EventValidator), the features
(FeatureEngine), and the Prediction it writes (PredictionWriter).

During a staged rollout (`set_serving`, scoring/rollout.py) the same feature matrix is also scored by the
canary and the shadow versions: the canary's score is served to its share of entities (the prediction
records the version that served it), and every score not served leaves as a ShadowScores record.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from streamscore.avro.codec import AvroCodec
from streamscore.avro.scanner import ROW_FAILED, RecordReader, ScannedBatch
from streamscore.kafka.io import Rejection
from streamscore.scoring.predictions import PredictionWriter
from streamscore.scoring.rollout import ServingModels, ShadowWriter, entity_positions, same_encoding
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
        self.shadow: list[bytes] = []  # ShadowScores records: the scores computed but not served
        self.served_by_canary = np.zeros(0, dtype=bool)  # per scored event
        self._codec = codec

    @property
    def predictions(self) -> list[dict]:
        decode = self._codec.decoder("prediction")
        return [decode(value) for value in self.encoded]


class ScoringPipeline:
    def __init__(self, spec: FeatureSpec, codec: AvroCodec, model: ServedModel, topic: str | None = None,
                 shadow_topic: str | None = None):
        self.spec = spec
        self.codec = codec
        self.model = model
        self.serving = ServingModels(model)
        self.engine = FeatureEngine(spec)
        self.reader = RecordReader(codec, "event")
        self.validator = EventValidator(spec)
        self.writer = PredictionWriter(codec, spec.feature_set, topic)
        self.shadow_writer = ShadowWriter(codec, shadow_topic)
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
        """Serve `model` alone (no canary, no shadows)."""
        self.set_serving(ServingModels(model))

    def set_serving(self, serving: ServingModels) -> None:
        """Serve production and the canary's share, score the shadows too (scoring/rollout.py)."""
        self.serving = serving
        self.model = serving.production

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
        groups = []  # (positions, engine inputs) per partition: to encode the matrix for another version
        if len(accepted):
            of_accepted = partitions[accepted]
            for partition in np.unique(of_accepted).tolist():
                positions = np.flatnonzero(of_accepted == partition)
                rows = accepted[positions]
                inputs = self.engine.inputs(batch, rows, offsets[rows])
                part_matrix, status, first_offsets = self.engine.compute(self.state(partition), inputs)
                self.engine.encode(part_matrix, inputs, self.model.vocabularies)
                matrix[positions] = part_matrix
                groups.append((positions, inputs))
                for k in np.flatnonzero(status == DUPLICATE).tolist():
                    keep[positions[k]] = False
                    result.rejected.append(self._duplicate(batch, int(rows[k]), int(first_offsets[k]), partition,
                                                           int(offsets[rows[k]])))
        full_matrix = matrix
        if not keep.all():
            accepted, matrix = accepted[keep], matrix[keep]
        result.rejected.sort(key=lambda rejected: rejected[0])  # input order
        model = self.model
        scores = model.predict(matrix)
        scored_at = int(time.time() * 1000)
        models = [(model.name, model.version)]
        model_of = np.zeros(len(accepted), dtype=np.int64)
        features = matrix
        serving = self.serving
        if (serving.canary is not None or serving.shadows) and len(accepted):
            scores, features = self._score_rollout(result, batch, accepted, groups, full_matrix, keep, matrix,
                                                   scores, partitions, offsets, scored_at, models, model_of)
        result.matrix, result.scores = features, scores
        result.sources = list(zip(partitions[accepted].tolist(), offsets[accepted].tolist()))
        result.keys = batch.texts(self._entity, accepted)
        message_starts, message_lengths = batch.message_span()
        result.encoded = self.writer.encode_batch(
            batch.raw,
            (batch.ints[accepted, self._id], batch.lengths[accepted, self._id]),
            (batch.ints[accepted, self._entity], batch.lengths[accepted, self._entity]),
            (message_starts[accepted], message_lengths[accepted]),
            batch.ints[accepted, self._time] // self.spec.event.time_divisor,
            scored_at, models, model_of, scores, features, partitions[accepted], offsets[accepted])
        return result

    def _score_rollout(self, result: BatchResult, batch: ScannedBatch, accepted: np.ndarray, groups: list,
                       full_matrix: np.ndarray, keep: np.ndarray, matrix: np.ndarray, scores: np.ndarray | None,
                       partitions: np.ndarray, offsets: np.ndarray, scored_at: int, models: list,
                       model_of: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Score the canary and the shadows on the batch's feature matrix; serve the canary's share (fills
        `models` / `model_of`), collect the unserved scores as ShadowScores records in `result.shadow`.
        Returns the served scores and the features they were computed from."""
        serving = self.serving
        production = serving.production
        n = len(accepted)
        src = batch.buffer
        id_spans = (batch.ints[accepted, self._id], batch.lengths[accepted, self._id])
        entity_spans = (batch.ints[accepted, self._entity], batch.lengths[accepted, self._entity])
        times = batch.ints[accepted, self._time] // self.spec.event.time_divisor
        where = (partitions[accepted], offsets[accepted])
        everyone = np.arange(n)

        def matrix_for(other: ServedModel) -> np.ndarray:
            if same_encoding(other, production):
                return matrix
            encoded = full_matrix.copy()
            for positions, inputs in groups:
                part = encoded[positions]
                self.engine.encode(part, inputs, other.vocabularies)
                encoded[positions] = part
            return encoded[keep]

        def unserved(other: ServedModel, rows: np.ndarray, other_scores: np.ndarray) -> None:
            record = self.shadow_writer.encode(other, rows, other_scores, scored_at, src, id_spans, entity_spans,
                                               times, *where)
            if record is not None:
                result.shadow.append(record)

        features = matrix
        canary = serving.canary
        if canary is not None and scores is not None:
            canary_matrix = matrix_for(canary)
            canary_scores = canary.predict(canary_matrix)
            positions = np.empty(n, dtype=np.float64)
            entity_positions(src, entity_spans[0].astype(np.int64), entity_spans[1].astype(np.int64), positions)
            chosen = positions < serving.canary_share
            result.served_by_canary = chosen
            unserved(canary, np.flatnonzero(~chosen), canary_scores)
            unserved(production, np.flatnonzero(chosen), scores)
            if chosen.any():
                served = scores.copy()
                served[chosen] = canary_scores[chosen]
                if canary_matrix is not matrix:
                    features = matrix.copy()
                    features[chosen] = canary_matrix[chosen]
                scores = served
                models.append((canary.name, canary.version))
                model_of[chosen] = 1
        for shadow in serving.shadows:
            unserved(shadow, everyone, shadow.predict(matrix_for(shadow)))
        return scores, features

    def _duplicate(self, batch: ScannedBatch, row: int, first: int, partition: int, offset: int):
        """A re-sent event (its event id already applied to its entity's state) becomes a rejection, not a
        prediction: predictions are keyed by event id, and the state did not count it again."""
        event_id = batch.value(row, self._id)
        entity = batch.value(row, self._entity)
        where = f"offset {first}" if first >= 0 else "an unknown offset"
        detail = (f"{self.spec.event.id_field} {event_id!r} of entity {entity!r} was already applied at {where} "
                  f"of partition {partition}; this re-send at offset {offset} is not scored again")
        return row, Rejection(DUPLICATE_EVENT, self.spec.event.id_field, detail), event_id
