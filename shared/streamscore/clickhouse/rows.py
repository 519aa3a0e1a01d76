"""Kafka records -> ClickHouse rows, and the batch identity used for deduplication.

Column lists here are the single source for what the logger writes; the DDL
in store.py is what the tables accept (tests/test_logger.py checks they agree).
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from streamscore.scoring.validation import InvalidEvent

PREDICTION_COLUMNS = [
    "event_id", "entity_id", "event_time", "scored_at", "model_name", "model_version", "score",
    "amount", "currency", "merchant_category", "channel", "country", "device_id",
    "features", "feature_set", "event_partition", "event_offset",
]
LABEL_COLUMNS = ["event_id", "entity_id", "label", "label_time"]
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
        raise InvalidEvent("out_of_range", field, f"{field} {ms} ms is outside the years 1900..2299")
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def checked_ms(ms: int, field: str = "time") -> int:
    """Epoch ms as a DateTime64(3) column takes it (clickhouse-connect writes ints as the raw ticks,
    ~20% faster than datetime objects), after the same range check as ms_to_datetime."""
    if not DATETIME64_MIN_MS <= ms <= DATETIME64_MAX_MS:
        raise InvalidEvent("out_of_range", field, f"{field} {ms} ms is outside the years 1900..2299")
    return ms


def prediction_row(record: dict) -> list:
    event = record["event"]
    return [
        record["event_id"], record["entity_id"], checked_ms(record["event_time"], "event_time"),
        checked_ms(record["scored_at"], "scored_at"), record["model_name"], record["model_version"], record["score"],
        event["amount"], event["currency"], event.get("merchant_category"), event.get("channel"),
        event.get("country"), event.get("device_id"),
        record["features"], record["feature_set"], record["event_partition"], record["event_offset"],
    ]


def label_row(record: dict) -> list:
    """Labels come from outside the system: a label other than 0/1 (UInt8 column) would fail
    the insert of the whole batch, so it is rejected here, naming the field."""
    label = record["label"]
    if label not in (0, 1):
        raise InvalidEvent("invalid_value", "label", f"label must be 0 or 1, got {label!r} "
                                                     f"(event {record['event_id']!r})")
    return [record["event_id"], record["entity_id"], int(label), ms_to_datetime(record["label_time"], "label_time")]


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
