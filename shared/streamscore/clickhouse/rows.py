"""Kafka records -> ClickHouse rows (labels, dead letters), and the batch identity used for deduplication.

Column lists here are the single source for what the logger writes into these tables; the DDL in
clickhouse/store.py is what they accept (tests/integration/test_store.py checks they agree).
Predictions are written as Native blocks instead (clickhouse/blocks.py, columns from the spec).
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone


class InvalidRow(ValueError):
    """A record the table cannot hold; `reason` / `field` / `detail` as for a dead letter."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


LABEL_COLUMNS = ["event_id", "entity_id", "label", "label_time"]
SHADOW_COLUMNS = ["event_id", "entity_id", "event_time", "model_name", "model_version", "score", "scored_at",
                  "event_partition", "event_offset"]
REJECTED_COLUMNS = [
    "source_topic", "source_partition", "source_offset", "service", "reason", "field", "detail", "raw",
    "event_id", "rejected_at",
]


# What DateTime64(3) columns hold: 1900-01-01 .. 2299-12-31 23:59:59.999 UTC.
DATETIME64_MIN_MS = -2_208_988_800_000
DATETIME64_MAX_MS = 10_413_791_999_999


def ms_to_datetime(ms: int, field: str = "time") -> datetime:
    """Epoch ms -> aware UTC datetime. Out of ClickHouse's range is a bad record (ValueError naming
    the field), not an OSError from the OS or a failing insert that would block the whole batch."""
    if not DATETIME64_MIN_MS <= ms <= DATETIME64_MAX_MS:
        raise InvalidRow("out_of_range", field, f"{field} {ms} ms is outside the years 1900..2299")
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def checked_ms(ms: int, field: str = "time") -> int:
    """Epoch ms as a DateTime64(3) column takes it (clickhouse-connect writes ints as the raw ticks,
    ~20% faster than datetime objects), after the same range check as ms_to_datetime."""
    if not DATETIME64_MIN_MS <= ms <= DATETIME64_MAX_MS:
        raise InvalidRow("out_of_range", field, f"{field} {ms} ms is outside the years 1900..2299")
    return ms


def label_row(record: dict, label, received_ms: int) -> list:
    """The `labels` row of a decoded label record, as the spec's label section maps its fields (`label` is a
    spec.model.LabelSpec). Labels come from outside the system: a binary label other than 0/1, or a numeric
    one that is not finite, is refused here, naming the field (it would fail or poison the whole insert).
    Without a label time field the label's time is when it was received."""
    import math

    value = record[label.value_field]
    event_id = record[label.id_field]
    if value is None:
        raise InvalidRow("missing_field", label.value_field, f"{label.value_field} is null (event {event_id!r})")
    if label.kind == "binary":
        if value not in (0, 1) or isinstance(value, float) and not value.is_integer():
            raise InvalidRow("invalid_value", label.value_field,
                             f"{label.value_field} must be 0 or 1 (a binary label), got {value!r} (event {event_id!r})")
    elif not math.isfinite(float(value)):
        raise InvalidRow("non_finite", label.value_field,
                         f"{label.value_field} must be a finite number, got {value!r} (event {event_id!r})")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidRow("missing_field", label.id_field, f"{label.id_field} must be a non-empty string")
    at = record[label.time_field] if label.time_field else received_ms
    entity = (record.get(label.entity_field) or "") if label.entity_field else ""
    return [event_id, entity, float(value), ms_to_datetime(at, label.time_field or "label_time")]


def rejected_row(headers: dict[str, str], raw: bytes, topic: str, partition: int, offset: int,
                 rejected_at_ms: int) -> list:
    """A dead letter, as the scorer described it in headers; the source position is
    the original event's (from headers), falling back to the DLQ message's own."""
    return [
        headers.get("source.topic", topic),
        int(headers.get("source.partition", partition)),
        int(headers.get("source.offset", offset)),
        headers.get("error.service", "unknown"),
        headers.get("error.reason", "unknown"),
        headers.get("error.field") or None,
        headers.get("error.detail", ""),
        raw,
        headers.get("event.id") or None,
        ms_to_datetime(rejected_at_ms),
    ]


def batch_token(table: str, ranges: dict[tuple[str, int], tuple[int, int]]) -> str:
    """Deduplication token of one insert: the table plus the exact Kafka offset
    ranges it covers. Replaying the same batch after a crash yields the same token,
    so ClickHouse drops the repeat (clickhouse-kafka-connect's scheme)."""
    parts = [f"{t}-{p}-{lo}-{hi}" for (t, p), (lo, hi) in sorted(ranges.items())]
    return table + ":" + hashlib.sha256(",".join(parts).encode()).hexdigest()[:32]


def shadow_rows(record: dict) -> list[list]:
    """The `shadow_predictions` rows (SHADOW_COLUMNS) of one decoded ShadowScores record: one per event.
    Arrays of different lengths, a non-finite score or a time out of range refuse the whole record."""
    import math

    columns = ("event_ids", "entity_ids", "event_times", "scores", "event_partitions", "event_offsets")
    n = len(record["event_ids"])
    for name in columns:
        if len(record[name]) != n:
            raise InvalidRow("invalid_record", name, f"ShadowScores.{name} has {len(record[name])} values, "
                                                     f"event_ids {n}")
    name, version = record["model_name"], record["model_version"]
    scored_at = checked_ms(record["scored_at"], "scored_at")
    rows = []
    for event_id, entity_id, event_time, score, partition, offset in zip(*(record[c] for c in columns)):
        if not math.isfinite(score):
            raise InvalidRow("invalid_value", "scores", f"score of event {event_id!r} is {score}")
        rows.append([event_id, entity_id, checked_ms(event_time, "event_times"), name, version, score, scored_at,
                     partition, offset])
    return rows
