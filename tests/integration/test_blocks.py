"""PredictionBlockWriter (the logger's batch path) must write exactly the rows a plain per-message path would:
each Prediction decoded by the generic decoder, its event decoded by the spec's schema, the row inserted by
clickhouse-connect. Both examples; registry framing, older writers, corruption included."""
from __future__ import annotations

import math
import uuid

import pytest

from conftest import example_spec, simulated_predictions, spec_codec
from streamscore.clickhouse.blocks import PredictionBlockWriter
from streamscore.clickhouse.store import open_store
from streamscore.clickhouse.tables import ensure_spec_tables, inserted_columns
from streamscore.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def store(clickhouse_dsn, session_data_dir, any_spec):
    settings = Settings(clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
                        clickhouse_database=f"test_blocks_{uuid.uuid4().hex[:12]}", data_dir=session_data_dir)
    opened = open_store(settings)
    opened.migrate()
    ensure_spec_tables(opened, any_spec)
    # a plain MergeTree: nothing collapses the repeated event ids of corrupted copies on insert
    opened.command(f"CREATE TABLE {settings.clickhouse_database}.reference AS {settings.clickhouse_database}.predictions "
                   "ENGINE = MergeTree ORDER BY event_id")
    yield opened
    opened.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    opened.close()


def reference_row(spec, codec, value: bytes) -> list | None:
    """The row of one message by the generic decoders (None where they refuse it)."""
    from streamscore.avro.codec import DecodeError

    try:
        prediction = codec.decode(value, "prediction")
        event = codec.decode(prediction["event"], "event")
    except DecodeError:
        return None
    from streamscore.clickhouse.rows import DATETIME64_MAX_MS, DATETIME64_MIN_MS

    if not all(DATETIME64_MIN_MS <= prediction[k] <= DATETIME64_MAX_MS for k in ("event_time", "scored_at")) or \
            not all(0 <= prediction[k] <= 0xFFFFFFFF for k in ("model_version", "event_partition")) or \
            prediction["event_offset"] < 0 or prediction["feature_set"] != spec.feature_set or \
            len(prediction["features"]) != len(spec.features):
        return None  # what the table cannot hold: the block writer rejects it with the reason
    # the key columns are the Prediction's own (the scorer's copy); the input fields the event's
    row = {**event, **{k: v for k, v in prediction.items() if k not in ("event", "features")},
           "features": dict(zip(spec.feature_names, prediction["features"]))}
    return [row[name] for name in inserted_columns(spec)]


def read(store, table: str) -> list[tuple]:
    # in Python: repeated event ids (corrupted copies) need a total order over every column
    return sorted(store.query(f"SELECT * EXCEPT logged_at FROM {table}").rows, key=repr)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def compare(store, spec, codec, messages: list[bytes]) -> tuple[int, list]:
    block = PredictionBlockWriter(spec, codec).encode(messages)
    if block.rows:
        store.insert_native("predictions", block.data, block.rows)
    rows = [r for r in (reference_row(spec, codec, m) for m in messages) if r is not None]
    if rows:
        store.insert("reference", rows, inserted_columns(spec))
    via_block, via_rows = read(store, "predictions"), read(store, "reference")
    assert len(via_block) == len(via_rows) == block.rows
    for a, b in zip(via_block, via_rows):
        diff = [(name, x, y) for name, x, y in zip(["event_id"] + inserted_columns(spec)[1:], a, b) if not same(x, y)]
        assert not diff, (a[0], b[0], diff)
    return block.rows, block.rejected


def test_block_rows_equal_the_per_message_rows(store, any_spec):
    codec = spec_codec(any_spec)
    rows, rejected = compare(store, any_spec, codec, simulated_predictions(any_spec, codec, 3000, seed=4, partitions=3))
    assert rows == 3000 and not rejected


def test_registry_framing_is_read_too(store, any_spec):
    codec = spec_codec(any_spec, "mock://blocks")
    rows, rejected = compare(store, any_spec, codec, simulated_predictions(any_spec, codec, 500, seed=5))
    assert rows == 500 and not rejected


def test_corrupted_bytes_are_read_exactly_or_rejected_with_a_reason(store, any_spec):
    codec = spec_codec(any_spec)
    good = simulated_predictions(any_spec, codec, 400, seed=6)
    corrupted = []
    for i, value in enumerate(good):
        position = (i * 7919) % len(value)
        corrupted.append(value[:position] + bytes([value[position] ^ (1 + i % 255)]) + value[position + 1:])
    messages = good[:100] + corrupted + [good[0][:20], b"", b"garbage"]
    rows, rejected = compare(store, any_spec, codec, messages)
    accepted = {i for i in range(len(messages))} - {i for i, _ in rejected}
    assert rows == len(accepted) and len(rejected) >= 3
    assert all(r.reason and r.detail for _, r in rejected)


def test_an_unknown_feature_set_is_rejected_not_guessed(store, any_spec):
    codec = spec_codec(any_spec)
    (value,) = simulated_predictions(any_spec, codec, 1, seed=7)
    record = codec.decode(value, "prediction")
    foreign = codec.encode("prediction", {**record, "feature_set": "0123456789abcdef"})
    block = PredictionBlockWriter(any_spec, codec).encode([value, foreign])
    assert block.rows == 1 and [(i, r.reason) for i, r in block.rejected] == [(1, "unknown_feature_set")]
    known = PredictionBlockWriter(any_spec, codec, names_of=lambda fs: any_spec.feature_names).encode([foreign])
    assert known.rows == 1 and not known.rejected  # an earlier spec version's, recorded in feature_sets
