"""The tables a feature spec defines: `predictions`, a typed column per input field, and its dedup view.

Columns, in order: event_id, entity_id, event_time, scored_at, logged_at, model_name, model_version,
score; then every input field of the spec's event schema except the three key fields, under its own
name and type (Nullable where the schema allows null; LowCardinality for encoded string fields);
then features (a Map name -> value), feature_set, event_partition, event_offset. The key fields
keep their schema names too, as ALIAS columns (e.g. `trip_id` for event_id), so analysts write
SQL in their own vocabulary.

One database holds the predictions of ONE spec (by name): `ensure_spec_tables` refuses another
spec's, naming the database to use instead, and evolves the table for a new version of the same
spec: a new input field becomes a new column; a field whose type changed is refused (old rows
would be misread); a field the schema dropped keeps its column (older rows have it). Every spec
version that wrote into the database is recorded in `feature_sets` (hash, names, definition).
"""
from __future__ import annotations

import json
import re

from streamscore.clickhouse.store import DEDUP_WINDOW, Store, StoreError
from streamscore.spec.model import FeatureSpec

HEAD_COLUMNS = (
    ("event_id", "String"), ("entity_id", "String"), ("event_time", "DateTime64(3, 'UTC')"),
    ("scored_at", "DateTime64(3, 'UTC')"), ("logged_at", "DateTime64(3, 'UTC') DEFAULT now64(3)"),
    ("model_name", "LowCardinality(String)"), ("model_version", "UInt32"), ("score", "Nullable(Float64)"),
)
TAIL_COLUMNS = (
    ("features", "Map(LowCardinality(String), Float64)"), ("feature_set", "LowCardinality(String)"),
    ("event_partition", "UInt32"), ("event_offset", "UInt64"),
)


class SpecTableError(StoreError):
    """The database's tables belong to another spec, or cannot take this spec's fields; says what to do."""


def input_columns(spec: FeatureSpec) -> list[tuple[str, str]]:
    """(name, ClickHouse type) of the input fields stored as their own columns, in schema order."""
    event = spec.event
    keys = {event.id_field, event.entity_field, event.time_field}
    encoded = {f.field for f in spec.features if f.kind == "encode"}
    columns = []
    for field in event.layout.fields:
        if field.name in keys:
            continue
        kind = field.clickhouse_type
        if field.name in encoded and field.type == "string":
            kind = f"LowCardinality({kind})"
        columns.append((field.name, kind))
    return columns


def alias_columns(spec: FeatureSpec) -> list[tuple[str, str]]:
    """(name, type + ALIAS expression) for the key fields whose schema names differ from the columns'."""
    event = spec.event
    aliases = []
    if event.id_field != "event_id":
        aliases.append((event.id_field, "String ALIAS event_id"))
    if event.entity_field != "entity_id":
        aliases.append((event.entity_field, "String ALIAS entity_id"))
    if event.time_field != "event_time":
        aliases.append((event.time_field, "Int64 ALIAS toUnixTimestamp64Milli(event_time)"))
    return aliases


def inserted_columns(spec: FeatureSpec) -> list[str]:
    """The columns a predictions insert writes, in order (logged_at is its default; aliases are computed)."""
    return [name for name, _ in HEAD_COLUMNS if name != "logged_at"] + [name for name, _ in input_columns(spec)] \
        + [name for name, _ in TAIL_COLUMNS]


def predictions_ddl(spec: FeatureSpec, database: str) -> str:
    columns = list(HEAD_COLUMNS) + input_columns(spec) + list(TAIL_COLUMNS) + alias_columns(spec)
    body = ",\n    ".join(f"`{name}` {kind}" for name, kind in columns)
    # A month's partition: the trainer's window query reads only the months it needs, whatever the table's
    # size. Not a day's: a block of backfilled history spanning days is a part per day (20k rows over 4 days
    # inserted at 144-338k rows/s by day, 765-975k by month, same block, three runs).
    # Sorted by event time (then id: an event's time never changes, so replays still collapse on the key):
    # the trainer's window, and the newest N events it is capped to, are read by the primary index, a few
    # granules beyond what they need, not every row of the months they touch. Lookups by event id (the drift
    # service's labels of older predictions) skip granules by a bloom filter instead.
    return (f"CREATE TABLE IF NOT EXISTS {database}.predictions (\n    {body},\n    "
            f"INDEX event_id_bloom event_id TYPE bloom_filter GRANULARITY 1\n) ENGINE = ReplacingMergeTree\n"
            f"PARTITION BY toYYYYMM(event_time)\nORDER BY (event_time, event_id)\nSETTINGS {DEDUP_WINDOW}")


def _plain(kind: str) -> str:
    """A column type without LowCardinality (storage, not meaning) and without a DEFAULT."""
    kind = kind.split(" DEFAULT ")[0].strip()
    match = re.fullmatch(r"LowCardinality\((.*)\)", kind)
    return match.group(1) if match else kind


def ensure_spec_tables(store: Store, spec: FeatureSpec) -> list[str]:
    """Create or evolve `predictions` (and `predictions_dedup`) for `spec`; returns what it did, for humans.

    Needs the static migrations applied (store.migrate()): it records the spec in `feature_sets`."""
    db = store.database
    done: list[str] = []
    owners = {name for (name,) in store.query(
        f"SELECT DISTINCT spec_name FROM {db}.feature_sets FINAL").rows}
    others = owners - {spec.name}
    if others:
        raise SpecTableError(
            f"ClickHouse database {db!r} holds the predictions of spec {sorted(others)[0]!r}; spec {spec.name!r} "
            f"needs a database of its own: set STREAMSCORE_CLICKHOUSE_DATABASE (e.g. {db}_{spec.name}) for its "
            "services and commands")
    existing = dict(store.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'predictions'",
        {"db": db}).rows)
    if not existing:
        store.command(predictions_ddl(spec, db))
        done.append(f"created {db}.predictions for spec {spec.name!r}")
    else:
        for name, kind in list(HEAD_COLUMNS) + input_columns(spec) + list(TAIL_COLUMNS):
            have = existing.get(name)
            if have is None:
                if name in dict(input_columns(spec)):
                    # rows logged before the field existed read as its type's default (or null)
                    store.command(f"ALTER TABLE {db}.predictions ADD COLUMN IF NOT EXISTS `{name}` {kind}")
                    done.append(f"added column predictions.{name} {kind} (new field of {spec.event.layout.full_name})")
                    continue
                raise SpecTableError(f"{db}.predictions has no column {name!r}: it was not created by streamscore; "
                                     "use another database (STREAMSCORE_CLICKHOUSE_DATABASE)")
            if _plain(have) != _plain(kind):
                raise SpecTableError(
                    f"{db}.predictions column {name!r} is {have} but spec {spec.name!r} (field {name!r} of "
                    f"{spec.event.layout.full_name}) needs {_plain(kind)}: a changed field type would misread the "
                    "rows already logged. Give the field a new name, or use a new database "
                    "(STREAMSCORE_CLICKHOUSE_DATABASE)")
        for name, kind in alias_columns(spec):
            if name not in existing:
                store.command(f"ALTER TABLE {db}.predictions ADD COLUMN IF NOT EXISTS `{name}` {kind}")
                done.append(f"added alias column predictions.{name}")
    store.command(f"CREATE VIEW IF NOT EXISTS {db}.predictions_dedup AS SELECT * FROM {db}.predictions FINAL")
    known = store.query(f"SELECT count() FROM {db}.feature_sets FINAL WHERE feature_set = {{fs:String}}",
                        {"fs": spec.feature_set}).rows[0][0]
    if not known:
        store.insert("feature_sets", [[spec.feature_set, spec.name, spec.version, list(spec.feature_names),
                                       spec.feature_set_description()]],
                     ["feature_set", "spec_name", "spec_version", "feature_names", "description"])
        done.append(f"recorded feature set {spec.feature_set} ({spec.name} v{spec.version}, "
                    f"{len(spec.feature_names)} features)")
    return done


def feature_names_of(store: Store, feature_set: str) -> list[str] | None:
    """The feature names of a feature set some spec version recorded in this database (None if unknown)."""
    rows = store.query(f"SELECT feature_names FROM {store.database}.feature_sets FINAL "
                       "WHERE feature_set = {fs:String}", {"fs": feature_set}).rows
    return list(rows[0][0]) if rows else None


def spec_description(store: Store, feature_set: str) -> dict | None:
    rows = store.query(f"SELECT description FROM {store.database}.feature_sets FINAL "
                       "WHERE feature_set = {fs:String}", {"fs": feature_set}).rows
    return json.loads(rows[0][0]) if rows else None
