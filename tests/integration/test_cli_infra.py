"""`streamscore infra ...` and `streamscore query` as an operator runs them."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import CACHE_DIR, free_port_pair
from streamscore.services.cli import app
from streamscore.clickhouse.store import MIGRATIONS
from streamscore.kafka.topics import topic_names

runner = CliRunner()


def cli_env(settings) -> dict[str, str | None]:
    """Environment that makes the CLI's own Settings() point at this test's infrastructure."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CLICKHOUSE_URL": settings.clickhouse_url,
        "STREAMSCORE_DATA_DIR": str(settings.data_dir),
        "STREAMSCORE_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMSCORE_PARTITIONS": str(settings.partitions),
    }


@pytest.mark.parametrize("command", [[], ["infra"], ["infra", "install"], ["infra", "up"], ["infra", "down"],
                                     ["infra", "status"], ["query"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.mark.integration
def test_query_prints_a_table(settings):
    result = runner.invoke(app, ["query", "SELECT 1 AS one, 'x' AS letter"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert "one" in result.output and "letter" in result.output and "x" in result.output


@pytest.mark.integration
def test_query_csv_and_json_read_the_settings_database(settings, store):
    store.insert("labels", [["e1", "card-1", 1, datetime(2024, 1, 1, tzinfo=timezone.utc)]],
                 ["event_id", "entity_id", "label", "label_time"])
    sql = "SELECT event_id, label, nan AS missing FROM labels"

    as_csv = runner.invoke(app, ["query", "--format", "csv", sql], env=cli_env(settings))
    assert as_csv.exit_code == 0, as_csv.output
    assert list(csv.reader(io.StringIO(as_csv.output))) == [["event_id", "label", "missing"], ["e1", "1.0", "nan"]]

    as_json = runner.invoke(app, ["query", "-f", "json", sql], env=cli_env(settings))
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == [{"event_id": "e1", "label": 1, "missing": None}]


@pytest.mark.integration
def test_query_passes_the_sqls_own_format_clause_through(settings):
    result = runner.invoke(app, ["query", "SELECT 1 AS one, 'x' AS letter FORMAT TSVWithNames"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert result.output == "one\tletter\n1\tx\n"

    both = runner.invoke(app, ["query", "-f", "csv", "SELECT 1 FORMAT TSV"], env=cli_env(settings))
    assert both.exit_code == 1
    assert "FORMAT TSV" in both.output and "--format csv" in both.output


@pytest.mark.integration
def test_query_with_bad_sql_fails_with_clickhouse_message(settings):
    result = runner.invoke(app, ["query", "SELECT * FROM no_such_table"], env=cli_env(settings))
    assert result.exit_code == 1
    assert "no_such_table" in result.output


@pytest.mark.integration
def test_infra_status_reports_topics_and_schema(settings):
    result = runner.invoke(app, ["infra", "status"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    n = len(topic_names(settings))
    assert f"{n}/{n} present" in result.output
    latest = MIGRATIONS[-1][0]
    assert f"schema version {latest} of {latest}" in " ".join(result.output.split())


def java_processes_using(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "java" in cmdline and str(path) in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_infra_up_then_down_leaves_no_broker_process(tmp_path):
    # Its own data dir and port, in child processes: its chDB path differs from this process's.
    data_dir = tmp_path / "data"
    env = {key: value for key, value in os.environ.items() if key not in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")}
    env.update(STREAMSCORE_DATA_DIR=str(data_dir), STREAMSCORE_KAFKA_PORT=str(free_port_pair()),
               STREAMSCORE_CACHE_DIR=str(CACHE_DIR), STREAMSCORE_CLICKHOUSE_DATABASE=f"cli_{uuid.uuid4().hex[:8]}")
    cli = [sys.executable, "-c", "from streamscore.services.cli import main; main()"]

    def run(*args: str) -> str:
        result = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        return " ".join(result.stdout.split())

    try:
        up = run("infra", "up")
        assert "started" in up and "created" in up and "applied 1, 2" in up
        assert len(java_processes_using(data_dir)) == 1

        again = run("infra", "up")
        assert "already running" in again and "all present" in again and "up to date" in again
        assert "running, pid" in run("infra", "status")

        assert "stopped" in run("infra", "down")
        assert java_processes_using(data_dir) == []
        assert "was not running" in run("infra", "down")
    finally:
        subprocess.run([*cli, "infra", "down"], env=env, capture_output=True, timeout=60)


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_infra_up_after_a_broker_crash_says_restarted_and_store_busy_with_its_own_exit_code(tmp_path):
    """The drill's case: the broker died while `streamscore run` holds the embedded store. `infra up`
    restarts the broker and says so; the busy store is not a failure to fix (exit 3, not 1)."""
    import signal
    import time

    from streamscore.dev.kafka_broker import LocalKafkaBroker
    from streamscore.services.cli import EXIT_STORE_BUSY
    from streamscore.settings import Settings

    data_dir, port = tmp_path / "data", free_port_pair()
    env = {key: value for key, value in os.environ.items() if key not in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")
           and not key.startswith("STREAMSCORE_")}
    env.update(STREAMSCORE_DATA_DIR=str(data_dir), STREAMSCORE_KAFKA_PORT=str(port),
               STREAMSCORE_CACHE_DIR=str(CACHE_DIR), STREAMSCORE_CLICKHOUSE_DATABASE=f"cli_{uuid.uuid4().hex[:8]}")
    cli = [sys.executable, "-c", "from streamscore.services.cli import main; main()"]
    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, kafka_port=port, data_dir=data_dir,
                                       cache_dir=CACHE_DIR))

    def up() -> tuple[int, str]:
        result = subprocess.run([*cli, "infra", "up"], env=env, capture_output=True, text=True, timeout=180)
        return result.returncode, " ".join((result.stdout + result.stderr).split())

    service = None
    try:
        code, output = up()
        assert code == 0, output
        log = open(tmp_path / "run.log", "wb")
        service = subprocess.Popen([*cli, "run", "logger"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "service logger" not in (tmp_path / "run.log").read_text() and "logger" not in _group_states(port):
            assert service.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.5)
        assert broker.kill() is not None
        code, output = up()
        print(f"\ninfra up after kill -9 of the broker, store held by `run logger`: exit {code}: {output}")
        assert code == EXIT_STORE_BUSY, output
        assert "restarted" in output and "store busy" in output
        assert "Fix: stop the other" not in output and "failed" not in output
        assert service.poll() is None, "the running service must not be disturbed"
    finally:
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(60)
        subprocess.run([*cli, "infra", "down"], env=env, capture_output=True, timeout=60)


def _group_states(port: int) -> str:
    """Names of the consumer groups that have members on the broker at `port` ('' while none or down)."""
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
        groups = admin.list_consumer_groups(request_timeout=5).result(timeout=10)
        return " ".join(g.group_id for g in groups.valid)
    except Exception:  # noqa: BLE001 - broker not answering yet
        return ""
