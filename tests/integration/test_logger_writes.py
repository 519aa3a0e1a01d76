"""The logger's writer thread: a batch's inserts run while the next batch is read, in order, and a
batch's messages are handed back for commit only once its inserts and all earlier ones succeeded."""
from __future__ import annotations

import threading
import uuid

import pytest
from confluent_kafka import Message

from conftest import example_spec, simulated_predictions, spec_codec
from streamscore.clickhouse.store import open_store
from streamscore.clickhouse.tables import ensure_spec_tables
from streamscore.services.logger.service import LoggerService
from streamscore.settings import TOPIC_PREDICTIONS, Settings

PAYMENTS = example_spec("payments")

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(clickhouse_dsn, session_data_dir, tmp_path) -> Settings:
    return Settings(clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
                    clickhouse_database=f"test_writes_{uuid.uuid4().hex[:12]}", data_dir=session_data_dir,
                    model_dir=tmp_path / "models")


@pytest.fixture
def store(settings):
    opened = open_store(settings)
    opened.migrate()
    ensure_spec_tables(opened, PAYMENTS)
    yield opened
    opened.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    opened.close()


class GatedInserts:
    """The real Store; each insert first records its thread, then waits for `gate` (or fails while `failing`)."""

    def __init__(self, store):
        self.store = store
        self.gate = threading.Event()
        self.gate.set()
        self.failing = False
        self.gate_was_open_in_time: list[bool] = []
        self.threads: list[str] = []

    def _enter(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.gate_was_open_in_time.append(self.gate.wait(30))
        if self.failing:
            raise ConnectionError("injected: store down")

    def insert(self, table, rows, column_names, dedup_token=None):
        self._enter()
        return self.store.insert(table, rows, column_names, dedup_token=dedup_token)

    def insert_native(self, table, block, rows, dedup_token=None):
        self._enter()
        return self.store.insert_native(table, block, rows, dedup_token=dedup_token)

    def __getattr__(self, name):
        return getattr(self.store, name)


def batches(settings: Settings, sizes: list[int]) -> list[list[Message]]:
    values = simulated_predictions(PAYMENTS, spec_codec(PAYMENTS), sum(sizes), seed=9)
    topic, out, start = settings.topic(TOPIC_PREDICTIONS), [], 0
    for size in sizes:
        out.append([Message(topic=topic, partition=0, offset=start + i, value=values[start + i])
                    for i in range(size)])
        start += size
    return out


def count(store) -> int:
    return int(store.query("SELECT count() FROM predictions").rows[0][0])


def test_a_batch_is_inserted_while_the_next_is_read_and_committed_after_its_insert(settings, store):
    gated = GatedInserts(store)
    logger = LoggerService(settings, store=gated)
    first, second = batches(settings, [300, 200])
    try:
        gated.gate.clear()  # the first insert waits until the second batch was read
        logger.handle_batch(first)
        assert logger.start_write() == []  # nothing was written before
        logger.handle_batch(second)  # read while the first insert is still waiting
        logger.seal()
        gated.gate.set()
        assert logger.start_write() == first  # the first batch's messages, once its insert finished
        assert logger.finish_write() == second
        assert logger.finish_write() == []
    finally:
        logger.close()
    assert gated.gate_was_open_in_time == [True, True], "the first insert blocked the reading of the next batch"
    assert set(gated.threads) == {"logger-insert_0"}  # one writer thread: inserts stay in order
    assert count(store) == 500


def test_after_a_write_given_up_nothing_is_committed_again(settings, store):
    gated = GatedInserts(store)
    logger = LoggerService(settings, store=gated)
    first, second = batches(settings, [100, 100])
    stop = threading.Event()
    stop.set()  # stopping: a failed insert is given up, not retried
    try:
        gated.failing = True
        logger.handle_batch(first)
        logger.start_write(stop)
        assert logger.finish_write() is None  # not written: its offsets must stay uncommitted
        gated.failing = False  # the store is back
        logger.handle_batch(second)
        logger.start_write(stop)
        # written, but committing its offsets would also commit the first batch's (cumulative per partition)
        assert logger.finish_write() is None
    finally:
        logger.close()
    assert count(store) == 100
