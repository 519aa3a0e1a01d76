"""A naive reference interpreter of a feature spec: the oracle the compiled engine is tested against.

It reads the semantics in spec.engine's docstring as literally as possible: per (partition, entity)
a plain list of the applied events, and every feature recomputed by a loop over that list. No arrays,
no arena, no prefix tricks, no numba: slow and obviously right. Arithmetic is done in the same order
as the engine's, so the two agree bit for bit (tests/unit/spec/test_oracle.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from streamscore.spec.model import FIRST_VOCABULARY_CODE, NULL_CODE, UNKNOWN_CODE, FeatureSpec
from streamscore.spec.text import text_hash

HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def _text_key(value) -> int:
    if value is None or value == "" or value == b"":
        return 0
    return text_hash(value.encode() if isinstance(value, str) else bytes(value))


def _number(value) -> float:
    return math.nan if value is None else float(value)


class OracleEntity:
    def __init__(self) -> None:
        self.events: list[dict] = []  # applied events, kept sorted by time (ties in arrival order)
        self.last_offset: int | None = None


class Oracle:
    """`features(event, partition, offset)` for events in arrival order; learned vocabularies by feature name."""

    def __init__(self, spec: FeatureSpec, learned: Mapping[str, Sequence[str]] | None = None):
        self.spec = spec
        self.learned = dict(learned or {})
        self.entities: dict[tuple, OracleEntity] = {}
        self.statuses: list[str] = []

    def _time(self, event: Mapping) -> int:
        return event[self.spec.event.time_field] // self.spec.event.time_divisor

    def _window(self, entity: OracleEntity, t: int, window_ms: int | None, before: int | None) -> list[dict]:
        return [e for e in entity.events
                if e["t"] <= t and (not window_ms or e["t"] > t - window_ms)
                and (before is None or e["offset"] < before)]

    def _aggregate(self, op: str, field: str | None, window: list[dict], t: int) -> float:
        if op == "time_since_previous":
            return (t - window[-1]["t"]) / 1000.0 if window else math.nan
        if op == "count":
            if field is None:
                return float(len(window))
            return float(sum(1 for e in window if not _is_null(e["values"][field])))
        if op == "distinct_count":
            return float(len({_text_key(e["values"][field]) for e in window} - {0}))
        values = [_number(e["values"][field]) for e in window]
        values = [v for v in values if not math.isnan(v)]
        if op == "last":
            return values[-1] if values else math.nan
        if op == "sum":
            total = 0.0
            for v in values:
                total += v
            return total
        if not values:
            return math.nan
        shift = values[0]
        s1 = s2 = 0.0
        for v in values:
            s1 += v - shift
            s2 += (v - shift) * (v - shift)
        m = len(values)
        if op == "mean":
            return shift + s1 / m
        if op == "std":
            if m < 2:
                return math.nan
            variance = (s2 - s1 * s1 / m) / (m - 1)
            return math.sqrt(variance) if variance > 0.0 else 0.0
        if op == "min":
            return min(values)
        return max(values)

    def _code(self, feature, value) -> float:
        if value is None or value == "":
            return float(NULL_CODE)
        vocabulary = feature.values if feature.op == "vocabulary" else tuple(self.learned.get(feature.name, ()))
        return float(FIRST_VOCABULARY_CODE + vocabulary.index(value)) if value in vocabulary else float(UNKNOWN_CODE)

    def features(self, event: Mapping, partition: int = 0, offset: int | None = None) -> list[float]:
        spec = self.spec
        entity = self.entities.setdefault((partition, event[spec.event.entity_field]), OracleEntity())
        t = self._time(event)
        key = _text_key(event[spec.event.id_field])
        status, before = "applied", None
        for e in entity.events:
            if e["key"] == key and e["offset"] != (-1 if offset is None else offset):
                status, before = "duplicate", (e["offset"] if e["offset"] >= 0 else None)
                break
        if status == "applied" and offset is not None and entity.last_offset is not None \
                and offset <= entity.last_offset:
            status, before = "replayed", offset
        if status == "applied" and entity.events and t < max(e["t"] for e in entity.events) - spec.lateness_ms:
            status = "late"
        vector = []
        for feature in spec.features:
            x = _number(event.get(feature.field)) if feature.field and feature.kind in ("field", "transform") else math.nan
            if feature.kind == "field":
                vector.append(x)
            elif feature.kind == "aggregate":
                vector.append(self._aggregate(feature.op, feature.field,
                                              self._window(entity, t, feature.window_ms, before), t))
            elif feature.op == "log1p":
                vector.append(math.log1p(x) if x > -1.0 else math.nan)
            elif feature.op == "hour_of_day":
                vector.append(float((t // HOUR_MS) % 24))
            elif feature.op == "day_of_week":
                vector.append(float((t // DAY_MS + 3) % 7))
            elif feature.op == "ratio":
                d = self._aggregate(feature.of, feature.field, self._window(entity, t, feature.window_ms, before), t)
                vector.append(x / d if d != 0.0 and not math.isnan(d) else math.nan)
            elif feature.op == "zscore":
                window = self._window(entity, t, feature.window_ms, before)
                mean = self._aggregate("mean", feature.field, window, t)
                sd = self._aggregate("std", feature.field, window, t)
                vector.append((x - mean) / sd if sd > 0.0 else math.nan)
            else:
                vector.append(self._code(feature, event.get(feature.field)))
        self.statuses.append(status)
        if status in ("applied", "late") and offset is not None:
            entity.last_offset = offset
        if status == "applied":
            record = {"t": t, "offset": -1 if offset is None else offset, "key": key, "values": dict(event)}
            position = len([e for e in entity.events if e["t"] <= t])
            entity.events.insert(position, record)
            newest = entity.events[-1]["t"]
            entity.events = [e for e in entity.events if e["t"] >= newest - spec.retention_ms]
        return vector

    def run(self, events: Iterable[tuple[Mapping, int, int | None]]) -> list[list[float]]:
        """Vectors of (event, partition, offset) in arrival order."""
        return [self.features(event, partition, offset) for event, partition, offset in events]


def _is_null(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == "" or value == b""
