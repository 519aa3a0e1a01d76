"""The legacy payments path's `predictions` row (hard-coded columns), kept with the legacy path for the bench."""
from __future__ import annotations

from streamscore.clickhouse.rows import checked_ms

PREDICTION_COLUMNS = [
    "event_id", "entity_id", "event_time", "scored_at", "model_name", "model_version", "score",
    "amount", "currency", "merchant_category", "channel", "country", "device_id",
    "features", "feature_set", "event_partition", "event_offset",
]


def prediction_row(record: dict) -> list:
    event = record["event"]
    return [
        record["event_id"], record["entity_id"], checked_ms(record["event_time"], "event_time"),
        checked_ms(record["scored_at"], "scored_at"), record["model_name"], record["model_version"], record["score"],
        event["amount"], event["currency"], event.get("merchant_category"), event.get("channel"),
        event.get("country"), event.get("device_id"),
        record["features"], record["feature_set"], record["event_partition"], record["event_offset"],
    ]
