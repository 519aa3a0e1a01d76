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
EXAMPLES = REPO_ROOT / "examples"
EXAMPLE_NAMES = ("payments", "rides")


def example_spec(name: str):
    """A loaded example spec (examples/<name>/spec.yaml)."""
    from streamscore.spec import load_spec

    return load_spec(EXAMPLES / name)


def spec_codec(spec, registry_url: str | None = None):
    """An AvroCodec with streamscore's schemas and `spec`'s event and label records."""
    from streamscore.avro.codec import AvroCodec, SchemaCatalog

    return AvroCodec(SchemaCatalog.for_spec(spec), registry_url=registry_url)


@pytest.fixture(scope="session")
def payments_spec():
    return example_spec("payments")


@pytest.fixture(scope="session")
def rides_spec():
    return example_spec("rides")


@pytest.fixture(scope="session", params=EXAMPLE_NAMES)
def any_spec(request):
    """Each example spec in turn: tests of guarantees that must hold for every spec run on both."""
    return example_spec(request.param)


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


def free_port_pair(count: int = 2) -> int:
    """A port p with p .. p+count-1 all free (the local broker's client and controller ports, and with
    count=3 its SASL_SSL port)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count - 1 > 65535:
            continue
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found on 127.0.0.1")


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


def prepare(test_settings: Settings) -> Settings:
    """Create the topics and migrate the tables of `test_settings` (and its spec); returns the settings
    with the spec's model name filled in (streamscore.spec.resolve)."""
    from streamscore.clickhouse.store import open_store
    from streamscore.clickhouse.tables import ensure_spec_tables
    from streamscore.kafka.topics import ensure_topics
    from streamscore.spec import resolve

    resolved, spec = resolve(test_settings)
    ensure_topics(resolved, spec=spec)
    store = open_store(resolved)
    try:
        store.migrate()
        ensure_spec_tables(store, spec)
    finally:
        store.close()
    return resolved


def drop_database(test_settings: Settings) -> None:
    from streamscore.clickhouse.store import open_store

    store = open_store(test_settings)
    try:
        store.command(f"DROP DATABASE IF EXISTS {test_settings.clickhouse_database}")
    finally:
        store.close()


@pytest.fixture
def settings(make_settings):
    """A per-test Settings (the payments example's spec) whose topics exist and whose tables are migrated."""
    test_settings = prepare(make_settings())
    yield test_settings
    drop_database(test_settings)


@pytest.fixture
def spec_settings(make_settings, any_spec):
    """Like `settings`, for each example spec in turn: (settings, spec)."""
    test_settings = prepare(make_settings(spec=any_spec.path))
    yield test_settings, any_spec
    drop_database(test_settings)


@pytest.fixture
def store(settings):
    """An open, migrated Store for `settings` (closed after the test)."""
    from streamscore.clickhouse.store import open_store

    opened = open_store(settings)
    yield opened
    opened.close()


def simulated_predictions(spec, codec, n: int, seed: int = 0, partitions: int = 1) -> list[bytes]:
    """`n` framed Prediction messages as the scorer writes them (no model yet) for events of `spec`'s generator."""
    import time

    from streamscore.dev.generators import load_generator
    from streamscore.scoring.pipeline import InputMessage, ScoringPipeline
    from streamscore.scoring.served_model import ServedModel

    generator = load_generator(spec).make_generator(seed, 50)
    encode = codec.encoder("event")
    pipeline = ScoringPipeline(spec, codec, ServedModel(spec.model.name, 0))
    out: list[bytes] = []
    offset = 0
    while len(out) < n:
        pairs = list(generator.events(500))
        messages = [InputMessage(encode(e), (offset + i) % partitions, offset + i) for i, (e, _) in enumerate(pairs)]
        offset += len(pairs)
        last = max(e[spec.event.time_field] for e, _ in pairs) // spec.event.time_divisor
        out += pipeline.score(messages, now_ms=max(last + 60_000, int(time.time() * 1000))).encoded
    return out[:n]


@pytest.fixture
def store_for():
    """Factory: an open Store for given settings (e.g. spec_settings'), closed after the test."""
    from streamscore.clickhouse.store import open_store

    opened = []

    def open_for(test_settings):
        store = open_store(test_settings)
        opened.append(store)
        return store

    yield open_for
    for store in opened:
        store.close()


def offline_matrix(spec, events: list[dict]):
    """Features of raw events as one partition in the given order (the engine, offline)."""
    import numpy as np

    from streamscore.learning.training_set import LoggedEvents, offline_features

    columns = {f.name: [e.get(f.name) for e in events] for f in spec.event.layout.fields}
    logged = LoggedEvents(columns=columns, partitions=np.zeros(len(events), dtype=np.int64),
                          offsets=np.arange(len(events)), times=np.array([e[spec.event.time_field] for e in events]),
                          event_ids=[e[spec.event.id_field] for e in events])
    return offline_features(spec, logged)


def wait_until(condition, what: str, group=None, *, timeout_s: float = 120.0, interval_s: float = 0.2,
               describe=None):
    """Poll `condition` until it returns something truthy (returned); fail fast if a service of `group` (a
    ServiceGroup) crashed; on timeout, say what was last seen (and `describe()`, when given)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if group is not None and group.failures:
            name, exc = next(iter(group.failures.items()))
            raise AssertionError(f"service {name} crashed while waiting for {what}: {exc!r}") from exc
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            seen = f"; {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r}){seen}")
        time.sleep(interval_s)


def environment_without_settings() -> dict[str, str]:
    """This process's environment minus every variable Settings reads, for a `streamscore` subprocess that
    must see only what the test gives it."""
    import os

    return {k: v for k, v in os.environ.items()
            if not k.startswith("STREAMSCORE_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")}
