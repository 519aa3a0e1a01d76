"""The scorer's batch step as plain code: decode -> validate -> features -> predict -> records.

`ScoringPipeline` owns the per-entity feature state (grouped by Kafka partition,
because a partition is the unit that moves between scorer instances) and the
model currently served. It never touches Kafka, so it is unit-testable and
benchmarkable in process; services/scorer wraps it in a consume/produce/commit loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from streamscore.legacy import features
from streamscore.avro.codec import AvroCodec
from streamscore.legacy.event_decoding import EventReader
from streamscore.kafka.io import Rejection
from streamscore.legacy.prediction_encoding import PredictionWriter
from streamscore.learning.registry import ModelRegistry, ModelVersion, check_feature_set
from streamscore.settings import Settings
from streamscore.scoring.tree_kernel import TreeKernel
from streamscore.legacy.validation import DUPLICATE_EVENT, InvalidEvent, batch_validator


@dataclass(frozen=True)
class ServedModel:
    """A model version ready to predict, or the explicit 'no model yet' state (version 0).

    `kernel` (a TreeKernel, see load_production_model) predicts exactly like the booster in one
    compiled loop; without one the booster predicts. Either way on one thread."""

    name: str
    version: int
    booster: object | None = None
    threshold: float | None = None
    kernel: TreeKernel | None = field(default=None, compare=False, repr=False)

    def predict(self, matrix: np.ndarray) -> np.ndarray | None:
        if self.booster is None or len(matrix) == 0:
            return None
        if self.kernel is not None:
            return self.kernel.predict(matrix)
        return self.booster.predict(matrix, num_threads=1)


def load_production_model(registry: ModelRegistry, model_name: str) -> ServedModel:
    """The registry's production version, refusing one built for other feature definitions."""
    version: ModelVersion | None = registry.production(model_name)
    if version is None:
        return ServedModel(name=model_name, version=0)
    check_feature_set(version, features.FEATURE_SET_HASH)
    booster = registry.load_booster(model_name, version.version)
    # ~0.1 s (first model of a process ~0.5 s: numba loads the compiled loop); None when unsupported or not exact
    kernel = TreeKernel.for_booster(booster)
    return ServedModel(name=model_name, version=version.version, booster=booster, threshold=version.threshold,
                       kernel=kernel)


class InputMessage(NamedTuple):
    """One consumed message as the pipeline reads it (a tuple: built per message on the hot path)."""

    value: bytes | None
    partition: int
    offset: int


class BatchResult:
    """What one batch produced, in input order.

    `encoded[i]` is the framed Avro Prediction of the i-th scored event and `keys[i]` its
    Kafka key; `predictions` gives the same records as dicts (built on first access: the
    scorer only needs the bytes, tests and tools read the dicts).
    """

    def __init__(self) -> None:
        self.encoded: list[bytes] = []
        self.keys: list[bytes] = []
        # one per prediction, same order: (partition, offset) of the source event
        self.sources: list[tuple[int, int]] = []
        self.rejected: list[tuple[int, Rejection, str | None]] = []  # (index, why, event_id)
        self.touched: dict[int, set[str]] = {}  # partition -> entity ids updated
        self._records: tuple | None = None  # (events, matrix, scores, scored_at, model) for `predictions`
        self._predictions: list[dict] | None = None

    @property
    def predictions(self) -> list[dict]:
        if self._predictions is None:
            self._predictions = []
            if self._records is not None:
                events, matrix, scores, scored_at, model = self._records
                names = features.FEATURE_NAMES
                for i, (event, (partition, offset)) in enumerate(zip(events, self.sources)):
                    self._predictions.append({
                        "event_id": event["event_id"],
                        "entity_id": event["entity_id"],
                        "event_time": event["event_time"],
                        "scored_at": scored_at,
                        "model_name": model.name,
                        "model_version": model.version,
                        "score": None if scores is None else float(scores[i]),
                        "feature_set": features.FEATURE_SET_HASH,
                        "features": dict(zip(names, matrix[i].tolist())),
                        "event": event,
                        "event_partition": partition,
                        "event_offset": offset,
                    })
        return self._predictions


class ScoringPipeline:
    def __init__(self, settings: Settings, codec: AvroCodec, model: ServedModel):
        self.settings = settings
        self.codec = codec
        self.model = model
        self.states: dict[int, dict[str, features.EntityState]] = {}
        self.writer = PredictionWriter(codec)
        self._event_reader = EventReader(codec)  # == codec.decoder("event"), faster for the current schema

    # --- state ownership follows partition assignment ------------------------
    def load_partition_state(self, partition: int, states: dict[str, features.EntityState]) -> None:
        self.states[partition] = states

    def drop_partition_state(self, partition: int) -> None:
        self.states.pop(partition, None)

    def entity_count(self) -> int:
        return sum(len(s) for s in self.states.values())

    def swap_model(self, model: ServedModel) -> None:
        self.model = model

    # --- the batch step ----------------------------------------------------------
    def score(self, messages: list[InputMessage], now_ms: int | None = None) -> BatchResult:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult()
        events, raws, indexes, by_partition = self._read_events(messages, now_ms, result)
        sources = result.sources
        duplicates: list[tuple[int, int]] = []  # (position in `events`, offset of the first arrival)
        if len(by_partition) == 1:
            partition = next(iter(by_partition))
            matrix = features.compute_batch(self.states.setdefault(partition, {}), events,
                                            [offset for _, offset in sources], duplicates)
            result.touched[partition] = {e["entity_id"] for e in events}
        else:
            matrix = np.empty((len(events), features.N_FEATURES), dtype=np.float64)
            for partition, positions in by_partition.items():
                part_events = [events[i] for i in positions]
                part_duplicates: list[tuple[int, int]] = []
                matrix[positions] = features.compute_batch(self.states.setdefault(partition, {}), part_events,
                                                           [sources[i][1] for i in positions], part_duplicates)
                duplicates.extend((positions[i], first) for i, first in part_duplicates)
                result.touched[partition] = {e["entity_id"] for e in part_events}
        if duplicates:
            events, raws, matrix = _reject_duplicates(result, duplicates, events, raws, matrix, indexes)
            sources = result.sources
        model = self.model
        scores = model.predict(matrix)
        scored_at = int(time.time() * 1000)
        result.encoded = self.writer.encode_batch(
            events, raws, matrix, scores, scored_at, model.name, model.version,
            [partition for partition, _ in sources], [offset for _, offset in sources])
        result.keys = [event["entity_id"].encode() for event in events]
        result._records = (events, matrix, scores, scored_at, model)
        return result

    def _read_events(self, messages: list[InputMessage], now_ms: int, result: BatchResult):
        """Decode (the whole batch at once) and validate each message; rejections go to `result.rejected`,
        accepted events' sources to `result.sources`. Returns (events, their raw bytes, their message indexes,
        partition -> positions). One loop without a call per message besides validate: it runs for every event."""
        decoded = self._event_reader.read_batch([msg.value for msg in messages])
        validate = batch_validator(self.settings, now_ms)
        rejected = result.rejected
        sources = result.sources
        events: list[dict] = []  # accepted events, input order
        raws: list[bytes] = []
        indexes: list[int] = []  # position in `events` -> index in `messages`
        by_partition: dict[int, list[int]] = {}  # partition -> positions in `events`
        for index, (msg, event) in enumerate(zip(messages, decoded)):
            if type(event) is not dict:
                if event is None:
                    rejected.append((index, Rejection("undecodable", None, "empty message value"), None))
                else:  # the DecodeError naming the reason and field
                    rejected.append((index, Rejection(event.reason, event.field, str(event)), None))
                continue
            value = msg.value
            try:
                validate(event)
            except InvalidEvent as exc:
                rejected.append((index, Rejection(exc.reason, exc.field, exc.detail), event.get("event_id")))
                continue
            positions = by_partition.get(msg.partition)
            if positions is None:
                positions = by_partition[msg.partition] = []
            positions.append(len(events))
            events.append(event)
            raws.append(value)
            indexes.append(index)
            sources.append((msg.partition, msg.offset))
        return events, raws, indexes, by_partition


def _reject_duplicates(result: BatchResult, duplicates: list[tuple[int, int]], events: list[dict],
                       raws: list[bytes], matrix: np.ndarray, indexes: list[int]):
    """Re-sent events (features.is_duplicate: state already has their event_id) become rejections, not
    predictions: predictions are keyed by event_id, and the feature state did not count them again."""
    dropped = set()
    for position, first in duplicates:
        event = events[position]
        partition, offset = result.sources[position]
        where = f"offset {first}" if first >= 0 else "an unknown offset"
        detail = (f"event_id {event['event_id']!r} of entity {event['entity_id']!r} was already applied at "
                  f"{where} of partition {partition}; this re-send at offset {offset} is not scored again")
        result.rejected.append((indexes[position], Rejection(DUPLICATE_EVENT, "event_id", detail), event["event_id"]))
        dropped.add(position)
    result.rejected.sort(key=lambda rejected: rejected[0])  # input order
    keep = [i for i in range(len(events)) if i not in dropped]
    result.sources = [result.sources[i] for i in keep]
    return [events[i] for i in keep], [raws[i] for i in keep], matrix[keep]
