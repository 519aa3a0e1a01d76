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
