"""Session-wide real infrastructure for integration tests: one Kafka broker, one ClickHouse.

Where they come from, first match wins:
- Kafka: KAFKA_BOOTSTRAP_SERVERS; else a testcontainers Kafka when a Docker engine
  answers; else a LocalKafkaBroker (jars from .cache/, data in a session tmp dir).
- ClickHouse: CLICKHOUSE_URL; else a testcontainers ClickHouse when Docker answers;
  else embedded chDB in ONE session data dir (chDB allows one path per process).

Tests never share topics or tables: `make_settings` gives each test a unique
topic prefix and a unique ClickHouse database.
"""
from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from streamscore.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache"  # jars are reused across sessions and by `./run`


def docker_engine_reachable(timeout_s: float = 2.0) -> bool:
    """True when a Docker engine answers a ping within timeout_s (False quickly when there is none)."""
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def free_port_pair() -> int:
    """A port p with p and p+1 both free (the local broker's client and controller ports)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports found on 127.0.0.1")


@pytest.fixture(scope="session")
def environment_settings() -> Settings:
    """Settings from the environment, read once: tells whether external infrastructure is configured."""
    return Settings()


@pytest.fixture(scope="session")
def docker_available() -> bool:
    return docker_engine_reachable()


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """The data dir every Settings of this test process uses (chDB: one path per process)."""
    return tmp_path_factory.mktemp("streamscore-data")


@pytest.fixture(scope="session")
def kafka_bootstrap(environment_settings, docker_available, session_data_dir):
    """bootstrap.servers of a real Kafka cluster for the whole session."""
    if environment_settings.kafka_bootstrap_servers:
        yield environment_settings.kafka_bootstrap_servers
        return
    if docker_available:
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from streamscore.dev.kafka_broker import LocalKafkaBroker

    broker_settings = Settings(
        kafka_bootstrap_servers=None, kafka_port=free_port_pair(),
        data_dir=session_data_dir, cache_dir=CACHE_DIR,
    )
    broker = LocalKafkaBroker(broker_settings)
    broker.start(die_with_parent=True)  # a killed pytest must not leave a broker behind
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def clickhouse_dsn(environment_settings, docker_available, session_data_dir):
    """DSN of the session's ClickHouse: an http(s) URL for a server, chdb:///path for embedded."""
    if environment_settings.clickhouse_url:
        yield environment_settings.clickhouse_url
        return
    if docker_available:
        from testcontainers.community.clickhouse import ClickHouseContainer

        with ClickHouseContainer() as server:
            host, port = server.get_container_host_ip(), server.get_exposed_port(8123)
            yield f"http://{server.username}:{server.password}@{host}:{port}"
        return
    yield Settings(data_dir=session_data_dir, clickhouse_url=None).clickhouse_dsn


@pytest.fixture
def make_settings(kafka_bootstrap, clickhouse_dsn, session_data_dir, tmp_path):
    """Factory: a Settings isolated to one test (own topic prefix and database), **overrides on top."""

    def make(**overrides) -> Settings:
        unique = uuid.uuid4().hex[:12]
        values = dict(
            kafka_bootstrap_servers=kafka_bootstrap,
            clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
            clickhouse_database=f"test_{unique}",
            topic_prefix=f"test-{unique}.",
            consumer_group_prefix=f"test-{unique}",
            data_dir=session_data_dir,
            cache_dir=CACHE_DIR,
            model_dir=tmp_path / "models",
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings):
    """A per-test Settings whose topics exist and whose ClickHouse tables are migrated."""
    from streamscore.clickhouse.store import open_store
    from streamscore.kafka.topics import ensure_topics

    test_settings = make_settings()
    ensure_topics(test_settings)
    store = open_store(test_settings)
    try:
        store.migrate()
    finally:
        store.close()
    yield test_settings
    store = open_store(test_settings)
    try:
        store.command(f"DROP DATABASE IF EXISTS {test_settings.clickhouse_database}")
    finally:
        store.close()


@pytest.fixture
def store(settings):
    """An open, migrated Store for `settings` (closed after the test)."""
    from streamscore.clickhouse.store import open_store

    opened = open_store(settings)
    yield opened
    opened.close()
