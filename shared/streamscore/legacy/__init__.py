"""The hard-coded payments path (features, Event decoder, Prediction v1 writer/readers, validation) that the
feature-spec engine replaced. Kept, with the schemas it was written for (legacy/schemas/), only so the bench
can run old and new side by side in one run; it is deleted once the figures are recorded (docs/performance.md)."""
from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).parent / "schemas"


def legacy_codec(registry_url: str | None = None):
    """An AvroCodec of the schemas the legacy path was written for (Event, Prediction v1, ...)."""
    from streamscore.avro.codec import AvroCodec, SchemaCatalog

    return AvroCodec(SchemaCatalog(SCHEMA_DIR), registry_url=registry_url)


# The `predictions` table the legacy block writer was written for (migration 1 before the spec engine), created
# by the bench as `legacy_predictions` to time the old writer beside the new one.
LEGACY_PREDICTIONS_DDL = """CREATE TABLE IF NOT EXISTS {db}.legacy_predictions (
    event_id String, entity_id String, event_time DateTime64(3, 'UTC'), scored_at DateTime64(3, 'UTC'),
    logged_at DateTime64(3, 'UTC') DEFAULT now64(3), model_name LowCardinality(String), model_version UInt32,
    score Nullable(Float64), amount Float64, currency LowCardinality(String), merchant_category Nullable(String),
    channel LowCardinality(Nullable(String)), country LowCardinality(Nullable(String)), device_id Nullable(String),
    features Map(LowCardinality(String), Float64), feature_set LowCardinality(String), event_partition UInt32,
    event_offset UInt64
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(event_time) ORDER BY event_id
SETTINGS non_replicated_deduplication_window = 1000"""
