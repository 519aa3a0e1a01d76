"""The ClickHouse Store: migrations, the contract's tables, dedup tokens, the chDB one-process rule."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timezone

import pytest

from streamscore.clickhouse.store import MIGRATIONS, open_store

pytestmark = pytest.mark.integration

# The contract's columns (name -> type), written out independently of the DDL in store.py and tables.py;
# predictions is the payments example's (the `settings` fixture's spec).
EXPECTED_COLUMNS = {
    "predictions": {
        "event_id": "String", "entity_id": "String", "event_time": "DateTime64(3, 'UTC')",
        "scored_at": "DateTime64(3, 'UTC')", "logged_at": "DateTime64(3, 'UTC')",
        "model_name": "LowCardinality(String)", "model_version": "UInt32", "score": "Nullable(Float64)",
        "amount": "Float64", "currency": "LowCardinality(String)",
        "merchant_category": "LowCardinality(Nullable(String))",
        "channel": "LowCardinality(Nullable(String))", "country": "LowCardinality(Nullable(String))",
        "device_id": "Nullable(String)", "features": "Map(LowCardinality(String), Float64)",
        "feature_set": "LowCardinality(String)", "event_partition": "UInt32", "event_offset": "UInt64",
    },
    "labels": {
        "event_id": "String", "entity_id": "String", "label": "Float64",
        "label_time": "DateTime64(3, 'UTC')", "logged_at": "DateTime64(3, 'UTC')",
    },
    "rejected_events": {
        "source_topic": "LowCardinality(String)", "source_partition": "UInt32", "source_offset": "UInt64",
        "service": "LowCardinality(String)", "reason": "LowCardinality(String)", "field": "Nullable(String)",
        "detail": "String", "raw": "String", "event_id": "Nullable(String)", "rejected_at": "DateTime64(3, 'UTC')",
    },
    "drift_events": {
        "detected_at": "DateTime64(3, 'UTC')", "model_name": "LowCardinality(String)", "model_version": "UInt32",
        "kind": "LowCardinality(String)", "detector": "LowCardinality(String)", "feature": "String",
        "statistic": "LowCardinality(String)", "value": "Float64", "baseline": "Nullable(Float64)",
        "threshold": "Nullable(Float64)", "window": "UInt32", "retrain_requested": "UInt8",
        "request_id": "Nullable(String)",
    },
    "model_versions": {
        "model_name": "LowCardinality(String)", "version": "UInt32", "action": "LowCardinality(String)",
        "stage": "LowCardinality(String)", "parent_version": "Nullable(UInt32)", "feature_set": "String",
        "created_at": "DateTime64(3, 'UTC')", "recorded_at": "DateTime64(3, 'UTC')",
        "train_start": "Nullable(DateTime64(3, 'UTC'))", "train_end": "Nullable(DateTime64(3, 'UTC'))",
        "train_rows": "UInt64", "metrics": "Map(String, Float64)", "reason": "String",
    },
    "schema_migrations": {"version": "UInt32", "name": "String", "applied_at": "DateTime64(3, 'UTC')"},
    "shadow_predictions": {
        "event_id": "String", "entity_id": "String", "event_time": "DateTime64(3, 'UTC')",
        "model_name": "LowCardinality(String)", "model_version": "UInt32", "score": "Float64",
        "scored_at": "DateTime64(3, 'UTC')", "event_partition": "UInt32", "event_offset": "UInt64",
        "logged_at": "DateTime64(3, 'UTC')",
    },
    "feature_sets": {"feature_set": "String", "spec_name": "LowCardinality(String)", "spec_version": "UInt32",
                     "feature_names": "Array(String)", "description": "String",
                     "registered_at": "DateTime64(3, 'UTC')"},
}

LABEL_COLUMNS = ["event_id", "entity_id", "label", "label_time"]


def label_rows(*event_ids: str) -> list[list]:
    now = datetime.now(timezone.utc)
    return [[event_id, "card-1", 1, now] for event_id in event_ids]


def test_migrations_apply_once_in_a_fresh_database(make_settings):
    settings = make_settings()
    store = open_store(settings)
    try:
        assert store.applied_migrations() == []
        assert store.migrate() == [version for version, _, _ in MIGRATIONS]
        assert store.migrate() == []
        assert store.applied_migrations() == [(version, name) for version, name, _ in MIGRATIONS]
        recorded = store.query("SELECT count() FROM schema_migrations").rows[0][0]
        assert recorded == len(MIGRATIONS)  # the second run recorded nothing
    finally:
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()


def test_contract_tables_have_the_contract_columns(store):
    for table, expected in EXPECTED_COLUMNS.items():
        described = store.query(f"DESCRIBE TABLE {table}")
        name_at, type_at = described.column_names.index("name"), described.column_names.index("type")
        assert {row[name_at]: row[type_at] for row in described.rows} == expected, table


def test_tables_use_the_contract_engines_and_keys(store):
    rows = store.query(
        "SELECT name, engine, sorting_key, partition_key FROM system.tables WHERE database = currentDatabase()"
    ).rows
    tables = {name: (engine, sorting_key, partition_key) for name, engine, sorting_key, partition_key in rows}
    assert tables["predictions"] == ("ReplacingMergeTree", "event_time, event_id", "toYYYYMM(event_time)")
    assert tables["labels"][:2] == ("ReplacingMergeTree", "event_id")
    assert tables["rejected_events"][:2] == ("ReplacingMergeTree", "source_topic, source_partition, source_offset")
    assert tables["drift_events"][:2] == ("MergeTree", "model_name, detected_at")
    assert tables["model_versions"][:2] == ("MergeTree", "model_name, version, recorded_at")


def test_a_repeated_dedup_token_drops_the_retried_insert(store):
    assert store.insert("labels", label_rows("e1", "e2"), LABEL_COLUMNS, dedup_token="batch-1") == 2
    store.insert("labels", label_rows("e1", "e2"), LABEL_COLUMNS, dedup_token="batch-1")  # a retry after a crash
    assert store.query("SELECT count() FROM labels").rows == [(2,)]

    store.insert("labels", label_rows("e3"), LABEL_COLUMNS, dedup_token="batch-2")
    store.insert("labels", label_rows("e3"), LABEL_COLUMNS)  # no token: stored again, collapsed by FINAL
    assert store.query("SELECT count() FROM labels").rows == [(4,)]
    assert store.query("SELECT count() FROM labels FINAL").rows == [(3,)]


def test_raw_bytes_of_rejected_events_round_trip(store):
    raw = b"\x00\xc3\x28not-avro\xff"
    now = datetime.now(timezone.utc)
    store.insert(
        "rejected_events",
        [["events", 2, 41, "scorer", "undecodable", None, "bad magic byte", raw, None, now]],
        ["source_topic", "source_partition", "source_offset", "service", "reason", "field", "detail", "raw",
         "event_id", "rejected_at"],
    )
    rows = store.query("SELECT raw, reason FROM rejected_events", column_formats={"raw": "bytes"}).rows
    assert rows == [(raw, "undecodable")]


def test_threads_can_share_one_store(store):
    def write(worker: int) -> None:
        for batch in range(5):
            store.insert("labels", label_rows(*(f"w{worker}-b{batch}-{i}" for i in range(20))), LABEL_COLUMNS)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.query("SELECT count(), uniqExact(event_id) FROM labels").rows == [(400, 400)]


def test_a_second_process_on_the_embedded_data_dir_gets_a_clear_error(settings, store):
    if not settings.is_embedded_store:
        pytest.skip("only embedded chDB locks its data dir")
    script = textwrap.dedent(f"""
        from streamscore.settings import Settings
        from streamscore.clickhouse.store import StoreLockedError, open_store
        try:
            open_store(Settings(data_dir={str(settings.data_dir)!r}, clickhouse_url=None))
        except StoreLockedError as error:
            print(error)
            raise SystemExit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert str((settings.data_dir / "clickhouse").resolve()) in message
    assert "streamscore run" in message
    assert "CLICKHOUSE_URL" in message



# --- the spec's tables ---------------------------------------------------------------------------------
def test_the_rides_table_has_typed_columns_named_after_its_schema_and_alias_key_columns(make_settings):
    from conftest import drop_database, example_spec, prepare
    from streamscore.clickhouse.store import open_store

    rides = example_spec("rides")
    settings = prepare(make_settings(spec=rides.path))
    store = open_store(settings)
    try:
        described = {name: (kind, default_kind) for name, kind, default_kind, *_ in
                     store.query("DESCRIBE TABLE predictions").rows}
        assert described["distance_km"] == ("Float64", "") and described["passengers"] == ("Int32", "")
        assert described["surge"] == ("Float32", "") and described["is_airport"] == ("Bool", "")
        assert described["rider_rating"] == ("Nullable(Float64)", "")
        assert described["pickup_zone"] == ("LowCardinality(String)", "")  # encoded: a few distinct values
        assert described["vehicle"] == ("LowCardinality(Nullable(String))", "")
        assert described["trip_id"] == ("String", "ALIAS") and described["driver_id"] == ("String", "ALIAS")
        assert described["requested_at"] == ("Int64", "ALIAS")
        assert store.query("SELECT spec_name, feature_names FROM feature_sets FINAL").rows == [
            ("rides", list(rides.feature_names))]
    finally:
        store.close()
        drop_database(settings)


def test_a_new_spec_version_adds_its_new_fields_and_a_changed_type_or_another_spec_is_refused(store, tmp_path):
    import json
    import shutil

    from conftest import EXAMPLES, example_spec
    from streamscore.clickhouse.tables import SpecTableError, ensure_spec_tables
    from streamscore.spec import load_spec

    folder = tmp_path / "payments"
    shutil.copytree(EXAMPLES / "payments", folder, ignore=shutil.ignore_patterns("__pycache__"))
    schema = json.loads((folder / "event.avsc").read_text())
    schema["fields"].append({"name": "terminal", "type": ["null", "string"], "default": None})
    (folder / "event.avsc").write_text(json.dumps(schema))
    (folder / "spec.yaml").write_text((folder / "spec.yaml").read_text().replace("version: 1", "version: 2"))
    evolved = load_spec(folder)
    done = ensure_spec_tables(store, evolved)
    assert any("added column predictions.terminal" in line for line in done), done
    assert "terminal" in {row[0] for row in store.query("DESCRIBE TABLE predictions").rows}
    assert {fs for (fs,) in store.query("SELECT feature_set FROM feature_sets FINAL").rows} == {
        example_spec("payments").feature_set, evolved.feature_set}
    assert ensure_spec_tables(store, evolved) == []  # idempotent

    for field in schema["fields"]:
        if field["name"] == "amount":
            field["type"] = "long"
    (folder / "event.avsc").write_text(json.dumps(schema))
    with pytest.raises(SpecTableError, match="column 'amount' is Float64 but spec 'payments'.*needs Int64"):
        ensure_spec_tables(store, load_spec(folder))

    with pytest.raises(SpecTableError, match="holds the predictions of spec 'payments'; spec 'rides' needs a "
                                             "database of its own: set STREAMSCORE_CLICKHOUSE_DATABASE"):
        ensure_spec_tables(store, example_spec("rides"))
