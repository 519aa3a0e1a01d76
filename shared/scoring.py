"""The scorer's batch step as plain code: decode -> validate -> features -> predict -> records.

`ScoringPipeline` owns the per-entity feature state (grouped by Kafka partition,
because a partition is the unit that moves between scorer instances) and the
model currently served. It never touches Kafka, so it is unit-testable and
benchmarkable in process; services/scorer wraps it in a consume/produce/commit loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from streamscore import features
from streamscore.codec import AvroCodec, DecodeError
from streamscore.kafka_io import Rejection
from streamscore.registry import ModelRegistry, ModelVersion, check_feature_set
from streamscore.settings import Settings
from streamscore.validation import InvalidEvent, validate_event


@dataclass(frozen=True)
class ServedModel:
    """A model version ready to predict, or the explicit 'no model yet' state (version 0)."""

    name: str
    version: int
    booster: object | None = None
    threshold: float | None = None

    def predict(self, matrix: np.ndarray) -> np.ndarray | None:
        if self.booster is None or len(matrix) == 0:
            return None
        return self.booster.predict(matrix, num_threads=1)


def load_production_model(registry: ModelRegistry, model_name: str) -> ServedModel:
    """The registry's production version, refusing one built for other feature definitions."""
    version: ModelVersion | None = registry.production(model_name)
    if version is None:
        return ServedModel(name=model_name, version=0)
    check_feature_set(version, features.FEATURE_SET_HASH)
    booster = registry.load_booster(model_name, version.version)
    return ServedModel(name=model_name, version=version.version, booster=booster, threshold=version.threshold)


@dataclass(frozen=True)
class InputMessage:
    value: bytes | None
    partition: int
    offset: int


@dataclass
class BatchResult:
    predictions: list[dict] = field(default_factory=list)
    # one per prediction, same order: (partition, offset) of the source event
    sources: list[tuple[int, int]] = field(default_factory=list)
    rejected: list[tuple[int, Rejection, str | None]] = field(default_factory=list)  # (index, why, event_id)
    touched: dict[int, set[str]] = field(default_factory=dict)  # partition -> entity ids updated


class ScoringPipeline:
    def __init__(self, settings: Settings, codec: AvroCodec, model: ServedModel):
        self.settings = settings
        self.codec = codec
        self.model = model
        self.states: dict[int, dict[str, features.EntityState]] = {}

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
        by_partition: dict[int, list[tuple[int, dict]]] = {}
        for index, msg in enumerate(messages):
            event, rejection = self._read_event(msg, now_ms)
            if rejection is not None:
                result.rejected.append((index, rejection, event.get("event_id") if event else None))
                continue
            by_partition.setdefault(msg.partition, []).append((index, event))

        rows: list[tuple[int, dict, list[float]]] = []
        for partition, items in by_partition.items():
            states = self.states.setdefault(partition, {})
            events = [event for _, event in items]
            offsets = [messages[index].offset for index, _ in items]
            matrix = features.compute_batch(states, events, offsets)
            result.touched.setdefault(partition, set()).update(e["entity_id"] for e in events)
            rows.extend((index, event, vector) for (index, event), vector in zip(items, matrix))

        rows.sort(key=lambda row: row[0])  # keep input order in the output
        matrix = np.asarray([vector for _, _, vector in rows], dtype=np.float64).reshape(len(rows), len(features.FEATURE_NAMES))
        scores = self.model.predict(matrix)
        scored_at = int(time.time() * 1000)
        names = features.FEATURE_NAMES
        for i, (index, event, _) in enumerate(rows):
            msg = messages[index]
            result.predictions.append({
                "event_id": event["event_id"],
                "entity_id": event["entity_id"],
                "event_time": event["event_time"],
                "scored_at": scored_at,
                "model_name": self.model.name,
                "model_version": self.model.version,
                "score": None if scores is None else float(scores[i]),
                "feature_set": features.FEATURE_SET_HASH,
                "features": dict(zip(names, matrix[i].tolist())),
                "event": event,
                "event_partition": msg.partition,
                "event_offset": msg.offset,
            })
            result.sources.append((msg.partition, msg.offset))
        return result

    def _read_event(self, msg: InputMessage, now_ms: int) -> tuple[dict | None, Rejection | None]:
        if not msg.value:
            return None, Rejection("undecodable", None, "empty message value")
        try:
            event = self.codec.decode(msg.value, "event")
        except DecodeError as exc:
            return None, Rejection(exc.reason, exc.field, str(exc))
        try:
            validate_event(event, self.settings, now_ms)
        except InvalidEvent as exc:
            return event, Rejection(exc.reason, exc.field, exc.detail)
        return event, None
