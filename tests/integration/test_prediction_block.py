"""PredictionBlockWriter (the logger's batch path) must write exactly the rows the per-message path
(PredictionReader.row -> Store.insert) writes, and leave over every message it cannot read that way.

Rows are compared through ClickHouse itself: the Native block goes into one table, the per-message
rows of the same messages into another (both MergeTree ORDER BY tuple(): one insert = one part in
insertion order), and the two are read back and compared value by value (NaN equal to NaN)."""
from __future__ import annotations

import random
import uuid

import pytest

from streamscore.avro.codec import AvroCodec, DecodeError
from streamscore.legacy.prediction_block import PredictionBlockWriter
from streamscore.legacy.prediction_decoding import PredictionReader
from streamscore.settings import Settings
from streamscore.clickhouse.rows import PREDICTION_COLUMNS
from streamscore.clickhouse.store import open_store
from streamscore.scoring.validation import InvalidEvent
from unit.legacy.test_prediction_decoding import same, simulated_predictions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


@pytest.fixture
def store(clickhouse_dsn, session_data_dir):
    """A migrated Store in a database of its own (no Kafka needed)."""
    settings = Settings(clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
                        clickhouse_database=f"test_block_{uuid.uuid4().hex[:12]}", data_dir=session_data_dir)
    opened = open_store(settings)
    opened.migrate()
    yield opened
    opened.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    opened.close()


def ascii_predictions(codec: AvroCodec, n: int, seed: int) -> list[bytes]:
    """The decoding tests' predictions, all readable by the batch path (ASCII strings)."""
    return simulated_predictions(codec, n, seed, ascii_only=True)


def rows_through_clickhouse(store, messages: list[bytes], codec: AvroCodec) -> tuple[list, list, list[int]]:
    """(rows the block wrote, rows the per-message path wrote for the same messages, leftovers)."""
    for table in ("via_block", "via_rows"):
        store.command(f"CREATE TABLE {table} AS predictions ENGINE = MergeTree ORDER BY tuple()")
    block, rows, leftovers = PredictionBlockWriter(codec).encode(messages)
    taken = [data for i, data in enumerate(messages) if i not in set(leftovers)]
    assert rows == len(taken)
    if rows:
        store.insert_native("via_block", block, rows)
        reader = PredictionReader(codec)
        store.insert("via_rows", [reader.row(data) for data in taken], PREDICTION_COLUMNS)
    read = "SELECT * EXCEPT logged_at FROM {} SETTINGS max_threads = 1"
    return store.query(read.format("via_block")).rows, store.query(read.format("via_rows")).rows, leftovers


def test_block_rows_equal_the_per_message_rows(store, codec):
    messages = ascii_predictions(codec, 3_000, seed=4)
    via_block, via_rows, leftovers = rows_through_clickhouse(store, messages, codec)
    assert leftovers == []
    assert len(via_block) == len(messages)
    assert all(same(list(a), list(b)) for a, b in zip(via_block, via_rows))
    assert store.query("SELECT toTypeName(features), toTypeName(channel) FROM via_block LIMIT 1").rows == [
        ("Map(LowCardinality(String), Float64)", "LowCardinality(Nullable(String))")]


def test_confluent_framing_is_read_too(store):
    codec = AvroCodec(registry_url="mock://prediction-block")
    messages = ascii_predictions(codec, 200, seed=6)
    assert messages[0][0] == 0x00
    via_block, via_rows, leftovers = rows_through_clickhouse(store, messages, codec)
    assert leftovers == [] and len(via_block) == 200
    assert all(same(list(a), list(b)) for a, b in zip(via_block, via_rows))


def test_what_the_batch_path_cannot_take_is_left_over(store, codec):
    """Non-ASCII strings, other map keys, another record, bad times, negative ints, garbage and truncations
    are leftovers, each at its own index; the rest of the batch is still written (long strings too)."""
    good = ascii_predictions(codec, 40, seed=9)
    generic = codec.decoder("prediction")
    record = generic(good[1])
    for i, length in enumerate((63, 64, 300, 20_000)):  # string lengths of one, two and three varint bytes
        good[5 + i] = codec.encode("prediction", {**record, "event_offset": 10_000 + i,
                                                  "event": {**record["event"], "device_id": "d" * length}})
    bad = {
        "unicode event id": codec.encode("prediction", {**record, "event_id": "évé-1"}),
        "unicode in the event": codec.encode("prediction", {**record, "event": {**record["event"], "country": "Ü"}}),
        "reordered map": codec.encode("prediction", {**record, "features": dict(reversed(record["features"].items()))}),
        "extra map key": codec.encode("prediction", {**record, "features": {**record["features"], "x": 1.0}}),
        "scored_at past 2299": codec.encode("prediction", {**record, "scored_at": 10**14}),
        "negative offset": codec.encode("prediction", {**record, "event_offset": -1}),
        "negative model version": codec.encode("prediction", {**record, "model_version": -2}),
        "a label": codec.encode("label", {"event_id": "e", "entity_id": "c", "label": 1, "label_time": 0}),
        "garbage": b"garbage",
        "empty": b"",
        "trailing byte": good[2] + b"\x00",
    }
    messages = list(good)
    positions = {}
    for i, (name, data) in enumerate(bad.items()):
        positions[name] = 3 * i + 1
        messages.insert(3 * i + 1, data)
    for cut in range(0, len(good[3]), 5):  # truncations (the last message too: nothing to read past)
        messages.append(good[3][:cut])
    via_block, via_rows, leftovers = rows_through_clickhouse(store, messages, codec)
    expected = sorted(list(positions.values()) + list(range(len(good) + len(bad), len(messages))))
    assert leftovers == expected
    assert len(via_block) == len(good)
    assert all(same(list(a), list(b)) for a, b in zip(via_block, via_rows))


def test_corrupted_bytes_are_read_exactly_or_left_over(store, codec):
    """Random byte corruption: whatever the batch path takes, it writes exactly as the per-message path
    does; whatever it leaves over, the per-message path reads or rejects."""
    rng = random.Random(7)
    good = ascii_predictions(codec, 300, seed=10)
    messages = []
    for data in good:
        pos = rng.randrange(1, len(data))
        messages.append(data[:pos] + bytes((rng.randrange(256),)) + data[pos + 1:])
    via_block, via_rows, leftovers = rows_through_clickhouse(store, messages, codec)
    assert all(same(list(a), list(b)) for a, b in zip(via_block, via_rows))
    reader = PredictionReader(codec)
    for i in leftovers:
        try:
            reader.row(messages[i])
        except (DecodeError, InvalidEvent):
            pass
    assert 0 < len(leftovers) < len(messages)  # some corruptions hit structure, many only values


def test_the_per_message_generator_agrees_where_the_block_takes_it(store, codec):
    """The decoding tests' own stream (unicode, long strings): ASCII messages are taken, the rest left over."""
    messages = simulated_predictions(codec, 200, seed=5)
    via_block, via_rows, leftovers = rows_through_clickhouse(store, messages, codec)
    assert all(same(list(a), list(b)) for a, b in zip(via_block, via_rows))
    assert leftovers and len(via_block) + len(leftovers) == len(messages)


def test_a_writer_reused_across_batches_writes_what_a_fresh_one_writes(codec):
    """Its buffers are kept from batch to batch: nothing of an earlier (larger) batch may leak into a later one."""
    reused = PredictionBlockWriter(codec)
    large, small = ascii_predictions(codec, 2_000, seed=11), ascii_predictions(codec, 300, seed=12)
    assert reused.encode(large) == PredictionBlockWriter(codec).encode(large)
    block, rows, leftovers = reused.encode(small)
    assert (block, rows, leftovers) == PredictionBlockWriter(codec).encode(small)
    assert rows == 300 and leftovers == []
    # and a batch longer than any before (the buffers grow)
    larger = ascii_predictions(codec, 5_000, seed=13)
    assert reused.encode(larger) == PredictionBlockWriter(codec).encode(larger)
