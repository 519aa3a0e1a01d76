"""Queries while `streamscore run all` holds the embedded store: the running process answers them on its
store socket (clickhouse/shared_store.py), and `streamscore status` reports every service it runs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamscore.clickhouse.shared_store import RemoteStore, StoreServer, connect_store, socket_path
from streamscore.clickhouse.store import StoreError
from streamscore.kafka.topics import ensure_topics
from streamscore.services.tools.soak import process_tree
from streamscore.settings import Settings
from streamscore.spec import resolve

from conftest import CACHE_DIR

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-c", "from streamscore.services.cli import main; main()"]


def test_a_remote_store_answers_as_the_store_itself(store, settings):
    store.command("CREATE TABLE shared_probe (id String, at DateTime64(3, 'UTC'), m Map(String, Float64), "
                  "n Nullable(Float64), c LowCardinality(String)) ENGINE = MergeTree ORDER BY id")
    store.command("INSERT INTO shared_probe SELECT toString(number), fromUnixTimestamp64Milli(number * 1000, 'UTC'), "
                  "map('x', number / 2), if(number % 3 = 0, NULL, number), 'c' FROM numbers(5000)")
    server = StoreServer(store, socket_path(settings), services=lambda: {"scorer": True}).start()
    try:
        remote = connect_store(settings)
        assert isinstance(remote, RemoteStore)
        sql = "SELECT * FROM shared_probe WHERE id > {low:String} ORDER BY id"
        local_result, remote_result = store.query(sql, {"low": "2"}), remote.query(sql, {"low": "2"})
        assert remote_result.rows == local_result.rows and len(remote_result.rows) > 1000
        assert remote_result.column_names == local_result.column_names
        assert remote_result.read_rows == local_result.read_rows > 1000  # the summary travels too
        assert remote.raw_query("SELECT id, n FROM shared_probe ORDER BY id LIMIT 2 FORMAT JSONEachRow") == \
            b'{"id":"0","n":null}\n{"id":"1","n":1}\n'
        assert remote.services() == {"scorer": True}
        with pytest.raises(StoreError, match="UNKNOWN_IDENTIFIER|Unknown expression"):
            remote.query("SELECT no_such_column FROM shared_probe")
        assert remote.query("SELECT 1").rows == [(1,)]  # the connection survives a SQL error
        with pytest.raises(StoreError, match="read-only"):
            remote.insert("shared_probe", [("x",)], ["id"])
        remote.close()
    finally:
        server.stop()
    assert not socket_path(settings).exists()
    socket_path(settings).write_bytes(b"")  # what a killed holder leaves: nobody answers, the dir is free
    try:
        opened = connect_store(settings)
        assert not isinstance(opened, RemoteStore) and opened.query("SELECT count() FROM shared_probe").rows == [(5000,)]
        opened.close()
    finally:
        socket_path(settings).unlink()


def _cli(env: dict, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def thread_nice_values(pid: int) -> list[int]:
    """The nice value of each thread of process `pid` (/proc/<pid>/task/<tid>/stat, field 19)."""
    values = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            values.append(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
        except OSError:
            continue  # the thread ended
    return values


def test_query_and_status_are_answered_while_run_all_runs(kafka_bootstrap, tmp_path):
    """`streamscore run all` with the embedded store in its own data dir; `query` (with and without the SQL's
    own FORMAT) and `status` from other processes while it runs; SIGTERM then stops it cleanly."""
    unique = f"{os.getpid()}{int(time.time() * 1000) % 10**8}"
    data_dir = tmp_path / "data"
    settings, spec = resolve(Settings(kafka_bootstrap_servers=kafka_bootstrap, data_dir=data_dir, cache_dir=CACHE_DIR,
                                      topic_prefix=f"test-run{unique}.", consumer_group_prefix=f"test-run{unique}"))
    if not settings.is_embedded_store:
        pytest.skip("the shared store is for embedded ClickHouse")
    ensure_topics(settings, spec=spec)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("STREAMSCORE_") and key != "CLICKHOUSE_URL"}
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, STREAMSCORE_DATA_DIR=str(data_dir),
               STREAMSCORE_TOPIC_PREFIX=settings.topic_prefix,
               STREAMSCORE_CONSUMER_GROUP_PREFIX=settings.consumer_group_prefix, COLUMNS="200")
    process = subprocess.Popen([*CLI, "run", "all"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not socket_path(settings).exists():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "run all never served its store"
            time.sleep(0.2)
        counted = _cli(env, "query", "SELECT count() AS n, 'yes' AS answered FROM predictions", "--format", "csv")
        assert counted.returncode == 0, counted.stdout + counted.stderr
        assert counted.stdout.splitlines() == ["n,answered", "0,yes"]
        # the SQL's own FORMAT clause: passed through, ClickHouse's output printed as it is
        own = _cli(env, "query", "SELECT 1 AS a, 'x' AS b FORMAT JSONEachRow")
        assert own.returncode == 0, own.stdout + own.stderr
        assert own.stdout == '{"a":1,"b":"x"}\n'
        bad = _cli(env, "query", "SELECT no_such_column FROM predictions")
        assert bad.returncode == 1 and "no_such_column" in bad.stderr
        # every service up before asking status (the drift service joins no group: the process says it runs)
        deadline = time.monotonic() + 60
        while True:
            status = _cli(env, "status")
            text = " ".join(status.stdout.split())
            rows = {service: text.split(f" {service} {settings.group(service)} ")[1].split(" ")[0]
                    for service in ("scorer", "logger", "drift", "trainer")
                    if f" {service} {settings.group(service)} " in text}
            if all(state == "alive" for state in rows.values()) and len(rows) == 4 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert status.returncode == 0, status.stdout + status.stderr
        assert rows == dict.fromkeys(("scorer", "logger", "drift", "trainer"), "alive"), text
        assert "ClickHouse not read" not in text and "recent model registry events" in text
        # the scorer's process keeps its priority; the rest of `run all` yields to it (settings.bulk_work_nice:
        # all threads but the scorer's supervisor and the few it started)
        children = process_tree(process.pid)[1:]
        scorer = [pid for pid in children if Path(f"/proc/{pid}/comm").read_text() == "ss-scorer\n"]
        assert len(scorer) == 1 and set(thread_nice_values(scorer[0])) == {0}, thread_nice_values(scorer[0])
        nice = thread_nice_values(process.pid)
        assert nice.count(Settings().bulk_work_nice) >= len(nice) - 3 and len(nice) > 10, nice
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    assert not socket_path(settings).exists()
    # both long-lived processes (`run all`, its scorer's) bounded their C heap (ops/native_heap.py)
    heap_lines = [line for line in output.splitlines() if "native heap: MALLOC_ARENA_MAX=2" in line]
    assert len(heap_lines) == 2, output
