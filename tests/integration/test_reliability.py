"""Reliability against real Kafka and ClickHouse: the promise is that every event that
reaches Kafka ends up exactly once in `predictions` (read with FINAL), or in the
dead-letter topic and `rejected_events` with a reason — through crashes (kill -9),
a broker restart, ClickHouse insert failures, poison input, rebalances and SIGTERM.

Services that must be killed run as `streamscore run ...` subprocesses with their own
STREAMSCORE_DATA_DIR (embedded chDB allows one process per data dir); their ClickHouse
is read by a `streamscore query` subprocess once they exited. The others run as
threads of this process on the session store. Every fault's figures are printed
(run with -s) as `FAULT | produced | rows | duplicates` lines for the README table.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.config import admin_config, client_config, reader_config
from streamscore.kafka.io import admin_result, is_retriable
from streamscore.dev.generators import generator_ending_now
from streamscore.services.tools.simulate import SimulationReport, produce_simulation
from streamscore.settings import TOPIC_DEAD_LETTER, TOPIC_PREDICTIONS, Settings
from streamscore.kafka.topics import ensure_topics
from conftest import environment_without_settings
from conftest import example_spec, prepare, spec_codec
from conftest import wait_until as wait_for
from streamscore.learning.training_set import LoggedEvents, offline_features

pytestmark = pytest.mark.integration

STREAMSCORE = str(Path(sys.executable).with_name("streamscore"))
PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)


# --- waiting and Kafka positions ------------------------------------------------------
def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    return wait_for(condition, what, timeout_s=timeout_s, interval_s=interval_s)


def positions(settings: Settings, group: str, topic: str) -> tuple[list[int], list[int]]:
    """(committed offset, end offset) per partition of `topic` for consumer group `group`
    (a never-committed partition counts as 0)."""
    reader = Consumer(reader_config(settings, **{"group.id": group}))
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
                tps = [TopicPartition(topic, p) for p in sorted(partitions)]
                committed = [max(tp.offset, 0) for tp in reader.committed(tps, timeout=10)]
                ends = [reader.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
                return committed, ends
            except KafkaException as error:  # coordinator loading / moving just after a broker restart
                if not is_retriable(error.args[0]) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        reader.close()


def scorer_position(settings: Settings, spec=PAYMENTS) -> tuple[int, int]:
    committed, ends = positions(settings, settings.group("scorer"), settings.topic(spec.event.topic))
    return sum(committed), sum(ends)


def wait_services_ready(settings: Settings, services=("scorer", "logger"), timeout_s: float = 90.0) -> None:
    """Until each service's consumer group is stable with a member, i.e. the service consumes."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(admin_config(settings))

    def ready() -> bool:
        groups = [settings.group(service) for service in services]
        try:
            descriptions = [admin_result(f) for f in admin.describe_consumer_groups(groups, request_timeout=10).values()]
        except Exception:  # noqa: BLE001 - group not known yet
            return False
        return all(d.state == ConsumerGroupState.STABLE and d.members for d in descriptions)

    wait_until(ready, timeout_s, f"consumer groups of {', '.join(services)} to be stable", interval_s=0.5)


def logged_predictions(settings: Settings) -> int:
    return sum(positions(settings, settings.group("logger"), settings.topic(TOPIC_PREDICTIONS))[0])


def drained(settings: Settings, spec=PAYMENTS) -> bool:
    """Scorer and logger committed everything there is (their outputs are acknowledged / written)."""
    checks = [(settings.group("scorer"), spec.event.topic)] + [
        (settings.group("logger"), t) for t in (TOPIC_PREDICTIONS, TOPIC_DEAD_LETTER, spec.label.topic)]
    for group, topic in checks:
        committed, ends = positions(settings, group, settings.topic(topic))
        if committed != ends:
            return False
    return True


def wait_drained(settings: Settings, timeout_s: float = 120.0, spec=PAYMENTS) -> None:
    wait_until(lambda: drained(settings, spec), timeout_s, "scorer and logger to commit every message", interval_s=0.5)


# --- producing ----------------------------------------------------------------------------
class BackgroundProducer:
    """produce_simulation in a thread, so faults can be injected while events flow."""

    def __init__(self, settings: Settings, n_events: int, rate: float | None, seed: int = 1, poison_every: int = 0,
                 spec=PAYMENTS):
        self.report: SimulationReport | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set: the stream ends early (its report counts what was produced)
        simulator = generator_ending_now(spec, seed, 500, n_events)
        codec = CODEC if spec is PAYMENTS else spec_codec(spec)

        def produce() -> None:
            try:
                self.report = produce_simulation(settings, spec, codec, simulator, n_events, rate=rate,
                                                 label_delay_s=0.2, poison_every=poison_every, stop=self.stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self.error = exc

        self.thread = threading.Thread(target=produce, name="test-producer", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout_s: float = 300.0) -> SimulationReport:
        self.thread.join(timeout_s)
        if self.error:
            raise self.error
        assert self.report is not None, "producer did not finish"
        return self.report


# --- services as subprocesses -----------------------------------------------------------------
def service_env(settings: Settings, data_dir: Path, **extra: str) -> dict[str, str]:
    env = environment_without_settings()
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "STREAMSCORE_DATA_DIR": str(data_dir),
        "STREAMSCORE_CACHE_DIR": str(settings.cache_dir),
        "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMSCORE_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMSCORE_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "STREAMSCORE_MODEL_DIR": str(settings.registry_dir),
        "STREAMSCORE_PARTITIONS": str(settings.partitions),
    })
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    env.update(extra)
    return env


class ServiceProcess:
    """`streamscore run <names>` as a child process; its output goes to a log file shown on failure."""

    started: list["ServiceProcess"] = []  # killed by the autouse fixture below if a test fails midway

    def __init__(self, env: dict[str, str], names: list[str], log_path: Path):
        self.names = names
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen([STREAMSCORE, "run", *names], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ServiceProcess.started.append(self)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def terminate(self, timeout_s: float = 60.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"`streamscore run {' '.join(self.names)}` ignored SIGTERM for {timeout_s} s:\n"
                                 + self.log_tail())
        finally:
            self._log.close()
        return code, time.monotonic() - started

    def assert_alive(self) -> None:
        assert self.process.poll() is None, (f"`streamscore run {' '.join(self.names)}` exited with "
                                             f"{self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(autouse=True)
def no_service_process_outlives_its_test():
    yield
    while ServiceProcess.started:
        leftover = ServiceProcess.started.pop()
        if leftover.process.poll() is None:
            leftover.process.kill()
            leftover.process.wait(30)


def query_json(env: dict[str, str], sql: str) -> list[dict]:
    done = subprocess.run([STREAMSCORE, "query", sql, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"streamscore query failed: {done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Counts:
    rows: int  # rows in predictions FINAL
    unique: int  # distinct event_id there
    raw_rows: int  # rows before deduplication (replays since the last merge)
    rejected: int  # rows in rejected_events FINAL
    labels: int  # rows in labels FINAL

    @property
    def duplicates(self) -> int:
        return self.rows - self.unique


def subprocess_counts(env: dict[str, str]) -> Counts:
    row = query_json(env, "SELECT (SELECT count() FROM predictions FINAL) AS rows, "
                          "(SELECT uniqExact(event_id) FROM predictions FINAL) AS uniq, "
                          "(SELECT count() FROM predictions) AS raw, "
                          "(SELECT count() FROM rejected_events FINAL) AS rejected, "
                          "(SELECT count() FROM labels FINAL) AS labels")[0]
    return Counts(int(row["rows"]), int(row["uniq"]), int(row["raw"]), int(row["rejected"]), int(row["labels"]))


def store_counts(store) -> Counts:
    row = store.query("SELECT (SELECT count() FROM predictions FINAL), (SELECT uniqExact(event_id) FROM predictions FINAL), "
                      "(SELECT count() FROM predictions), (SELECT count() FROM rejected_events FINAL), "
                      "(SELECT count() FROM labels FINAL)").rows[0]
    return Counts(*(int(v) for v in row))


def report_fault(fault: str, settings: Settings, produced: int, counts: Counts, note: str = "") -> None:
    """One line of the README's fault table. `in Kafka` counts prediction messages: above
    `produced` by the events the scorer scored twice (at-least-once); FINAL collapses them."""
    in_kafka = sum(positions(settings, settings.group("logger"), settings.topic(TOPIC_PREDICTIONS))[1])
    print(f"\nFAULT | {fault} | produced {produced} | rows {counts.rows} | duplicates {counts.duplicates} "
          f"| predictions in Kafka {in_kafka} | raw rows before FINAL {counts.raw_rows} "
          f"| rejected {counts.rejected} {note}", flush=True)


def logged_features_sql(spec=PAYMENTS) -> str:
    """Every logged input column of `spec`'s predictions table, the source position and the features."""
    reserved = ("event_id", "entity_id", "event_time")
    inputs = "".join(f"`{name}`, " for name in spec.event.layout.names if name not in reserved)
    return ("SELECT event_id, entity_id, toUnixTimestamp64Milli(event_time) AS event_time, "
            f"{inputs}event_partition, event_offset, features FROM predictions FINAL "
            "ORDER BY event_partition, event_offset")


LOGGED_FEATURES_SQL = logged_features_sql()


def assert_features_match_offline(rows: list[dict], spec=PAYMENTS) -> None:
    """The features logged by the scorer equal, bit for bit, a replay of the logged events (in arrival order)
    through the offline path: entity state survived the fault intact."""
    names = spec.feature_names
    logged = np.array([[math.nan if r["features"].get(n) is None else r["features"][n] for n in names]
                       for r in rows], dtype=np.float64)
    columns = {f.name: [r.get(f.name) for r in rows] for f in spec.event.layout.fields}
    offline = offline_features(spec, LoggedEvents(
        columns=columns, partitions=np.array([r["event_partition"] for r in rows], dtype=np.int64),
        offsets=np.array([r["event_offset"] for r in rows], dtype=np.int64),
        times=np.array([r["event_time"] for r in rows], dtype=np.int64), event_ids=[r["event_id"] for r in rows]))
    mismatched = ~((logged == offline) | (np.isnan(logged) & np.isnan(offline)))
    bad_rows = np.flatnonzero(mismatched.any(axis=1))
    assert len(bad_rows) == 0, (
        f"{len(bad_rows)} of {len(rows)} events have features different from the offline recomputation, e.g. "
        f"{rows[bad_rows[0]]['event_id']}: "
        + ", ".join(f"{names[j]} logged {logged[bad_rows[0], j]} offline {offline[bad_rows[0], j]}"
                    for j in np.flatnonzero(mismatched[bad_rows[0]])))


@pytest.fixture
def topic_settings(make_settings) -> Settings:
    return prepare(make_settings())


# --- 1. crash: kill -9 mid-stream -----------------------------------------------------------------
@pytest.mark.slow
def test_kill9_mid_stream_then_restart_loses_and_duplicates_nothing(spec_settings, tmp_path):
    settings, spec = spec_settings
    env = service_env(settings, tmp_path / "svc", STREAMSCORE_SPEC=str(spec.path))
    n_events, poison_every = 20_000, 200  # 10 s of stream: the kill lands mid-stream also on a loaded machine
    # All four services in one process, as `streamscore run all` and the demo run them.
    services = ServiceProcess(env, ["all"], tmp_path / "services.log")
    wait_services_ready(settings)
    producer = BackgroundProducer(settings, n_events, rate=2_000, poison_every=poison_every, spec=spec)

    # Kill once predictions are being logged and events are still arriving.
    wait_until(lambda: services.assert_alive() or logged_predictions(settings) >= 1_000, 90,
               "the logger to commit 1000 predictions")
    assert producer.running, "the stream ended before the kill; lower the rate"
    services.kill9()
    killed_at = scorer_position(settings, spec)
    print(f"\nkill -9 with the scorer at {killed_at[0]} of {killed_at[1]} events produced so far")

    services = ServiceProcess(env, ["all"], tmp_path / "services.log")
    report = producer.result()
    wait_drained(settings, spec=spec)
    code, seconds = services.terminate()
    assert code == 0, services.log_tail()

    counts = subprocess_counts(env)
    report_fault(f"kill -9 of `run all` (scorer, logger, drift, trainer) mid-stream, restart ({spec.name})",
                 settings, report.events, counts, f"(+{report.poison} poison)")
    assert counts.rows == report.events and counts.unique == report.events
    assert counts.rejected == report.poison
    assert counts.labels == report.labels
    assert_features_match_offline(query_json(env, logged_features_sql(spec)), spec)


@pytest.mark.slow
def test_kill9_scorer_and_logger_separately(topic_settings, tmp_path):
    """With the embedded store only the logger opens chDB, so scorer and logger can be separate
    processes; each is killed mid-stream and restarted on its own."""
    settings = topic_settings
    # the scorer's commits mark the progress below: every 0.5 s (not the 5 s default) so they follow the stream
    env = service_env(settings, tmp_path / "svc", STREAMSCORE_SCORER_CHECKPOINT_INTERVAL_MS="500")
    # 12 s at 2,000/s: the logger's first 1,500 committed rows took 4.8-5.9 s after the stream started (a
    # loaded CI machine once needed more than the 7.5 s of the 15,000 events used before)
    n_events = 24_000
    scorer = ServiceProcess(env, ["scorer"], tmp_path / "scorer.log")
    logger = ServiceProcess(env, ["logger"], tmp_path / "logger.log")
    wait_services_ready(settings)
    producer = BackgroundProducer(settings, n_events, rate=2_000, seed=2)

    def logged() -> int:
        logger.assert_alive()
        return logged_predictions(settings)

    wait_until(lambda: logged() >= 1_500, 90, "the logger to commit 1500 predictions")
    assert producer.running
    logger.kill9()
    logger = ServiceProcess(env, ["logger"], tmp_path / "logger.log")

    wait_until(lambda: scorer.assert_alive() or scorer_position(settings)[0] >= 6_000, 90,
               "the scorer to commit 6000 events")
    assert producer.running
    scorer.kill9()
    scorer = ServiceProcess(env, ["scorer"], tmp_path / "scorer.log")

    report = producer.result()
    wait_drained(settings)
    for process in (scorer, logger):
        code, _ = process.terminate()
        assert code == 0, process.log_tail()

    counts = subprocess_counts(env)
    report_fault("kill -9 of the logger process, later of the scorer process, each restarted", settings,
                 report.events, counts)
    assert counts.rows == report.events and counts.unique == report.events
    assert counts.labels == report.labels
    assert_features_match_offline(query_json(env, LOGGED_FEATURES_SQL))


# --- 2. broker restart mid-stream ---------------------------------------------------------------------
@pytest.fixture
def own_broker(tmp_path):
    """A LocalKafkaBroker of this test only (own port and data dir), so it can be stopped and started."""
    from conftest import CACHE_DIR, free_port_pair
    from streamscore.dev.kafka_broker import LocalKafkaBroker

    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, kafka_port=free_port_pair(),
                                       data_dir=tmp_path / "broker", cache_dir=CACHE_DIR))
    broker.start(die_with_parent=True)
    try:
        yield broker
    finally:
        broker.stop()


def migrated_store(settings: Settings):
    from streamscore.clickhouse.store import open_store
    from streamscore.clickhouse.tables import ensure_spec_tables

    store = open_store(settings)
    store.migrate()
    ensure_spec_tables(store, PAYMENTS)
    return store


def scorer_and_logger_through(settings: Settings, n_events: int, seed: int, fault) -> tuple[SimulationReport, Counts]:
    """The scorer and logger (threads) on a fresh database, a stream of `n_events` at 1,000/s, `fault(group,
    producer)` once 1,000 predictions are logged; the producer's report and the store's counts once every
    message is committed."""
    from streamscore.services.runner import ServiceGroup

    ensure_topics(settings)
    store = migrated_store(settings)
    try:
        group = ServiceGroup(settings, ["scorer", "logger"], store=store).start()
        wait_services_ready(settings)
        producer = BackgroundProducer(settings, n_events, rate=1_000, seed=seed)
        wait_until(lambda: group.failures or logged_predictions(settings) >= 1_000, 90,
                   "the logger to commit 1000 predictions")
        assert not group.failures, group.failures
        assert producer.running
        fault(group, producer)
        report = producer.result()
        wait_drained(settings, timeout_s=150)
        assert not group.failures, group.failures
        group.shutdown()
        return report, store_counts(store)
    finally:
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()


@pytest.mark.slow
def test_broker_restart_mid_stream_services_reconnect_and_lose_nothing(make_settings, own_broker):
    def restart_the_broker(group, producer):
        stopping_at = time.monotonic()
        own_broker.stop()
        down_at = time.monotonic()
        time.sleep(3)  # the outage itself: services and producer must ride it out
        own_broker.start(die_with_parent=True)
        print(f"\nbroker stop took {down_at - stopping_at:.1f} s, then down for {time.monotonic() - down_at:.1f} s "
              "(3 s outage + restart)")

    settings = make_settings(kafka_bootstrap_servers=own_broker.bootstrap)
    report, counts = scorer_and_logger_through(settings, 10_000, 3, restart_the_broker)
    report_fault("Kafka broker stopped and restarted mid-stream", settings, report.events, counts)
    assert counts.rows == report.events and counts.unique == report.events
    assert counts.labels == report.labels


def test_a_fenced_scorer_restarts_with_a_new_consumer_and_loses_nothing(make_settings):
    """A static member fenced by another consumer presenting its group.instance.id gets a fatal error: its
    consumer can no longer be used. (CI saw the scorer fenced by its own rejoin after its session timed out
    while the broker restarted, librdkafka issue #3437; it then consumed nothing more.) The scorer must
    restart with a new consumer and take its partitions back, and every event is logged exactly once."""
    from streamscore.kafka.membership import InstanceSlot

    def fence_the_scorer(group, producer):
        events_topic = settings.topic(group.spec.event.topic)
        impostor_slot = InstanceSlot(settings, settings.group("scorer"), [events_topic])
        impostor_slot.slot = 0  # the scorer's slot (the only scorer of this data dir and topic)
        impostor = Consumer(client_config(settings, **{
            "group.id": settings.group("scorer"), "group.instance.id": impostor_slot.instance_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest"}))
        impostor.subscribe([events_topic])
        wait_until(lambda: impostor.poll(0.2) is not None or impostor.assignment(), 60,
                   "the impostor to join with the scorer's instance id")
        impostor.close()  # a static member does not leave the group: the scorer's restart fences it in turn
        scorer_stats = group.services["scorer"].stats
        wait_until(lambda: group.failures or scorer_stats.restarts >= 1, 60, "the fenced scorer to restart")

    settings = make_settings()
    report, counts = scorer_and_logger_through(settings, 6_000, 5, fence_the_scorer)
    report_fault("scorer fenced by a consumer with its group.instance.id", settings, report.events, counts)
    assert counts.rows == report.events and counts.unique == report.events


@pytest.mark.slow
def test_broker_kill9_five_times_mid_stream_run_all_stays_up_and_loses_nothing(make_settings, own_broker):
    """kill -9 of the broker JVM (no controlled shutdown: no flush, no leader handover), 5 times while
    events flow, with all four services running as `run all` runs them: none may end, and every event
    is in predictions FINAL exactly once. Each kill comes once the logger committed 1000 more
    predictions since the broker came back (so it lands mid-stream, with commits in flight)."""
    from streamscore.services.runner import ServiceGroup

    kills = 5
    settings = make_settings(kafka_bootstrap_servers=own_broker.bootstrap)
    ensure_topics(settings)
    store = migrated_store(settings)
    rows: list[str] = []
    group = None
    try:
        group = ServiceGroup(settings, ["scorer", "logger", "drift", "trainer"], store=store).start()
        wait_services_ready(settings)
        producer = BackgroundProducer(settings, 300_000, rate=500, seed=9)  # stopped after the last kill
        started_at = time.monotonic()
        for kill in range(1, kills + 1):
            mark = logged_predictions(settings)
            wait_until(lambda: group.failures or logged_predictions(settings) >= mark + 1_000, 120,
                       f"the logger to commit 1000 more predictions before kill {kill}")
            assert not group.failures, group.failures
            assert producer.running, f"the stream ended before kill {kill} ({producer.error!r}); raise n_events"
            killed_at = time.monotonic()
            pid = own_broker.kill()
            assert pid is not None
            time.sleep(1.0)  # the outage: clients see connection refused
            own_broker.start(die_with_parent=True)
            ready_at = time.monotonic()
            before = logged_predictions(settings)
            wait_until(lambda: group.failures or logged_predictions(settings) > before, 120,
                       f"the logger to commit again after kill {kill}")
            resumed_at = time.monotonic()
            rows.append(f"kill {kill} at {killed_at - started_at:.0f} s: broker pid {pid} killed, answering again "
                        f"after {ready_at - killed_at:.1f} s, logger committing again {resumed_at - ready_at:.1f} s later")
            print(rows[-1], flush=True)
            assert all(thread.is_alive() for thread in group._threads), "a service thread ended"
        time.sleep(3)  # events after the last recovery, then the stream ends
        producer.stop.set()
        report = producer.result()
        wait_drained(settings, timeout_s=180)
        assert not group.failures, group.failures
        drained_at = time.monotonic()
        restarts = {name: getattr(service.stats, "restarts", 0) for name, service in group.services.items()}
        group.shutdown()
        counts = store_counts(store)
    finally:
        if group is not None and not group.stop.is_set():  # a failed assertion: stop the threads first
            group.stop.set()
            for thread in group._threads:
                thread.join(30)
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()
    print("\n" + "\n".join(rows) + f"\nservice restarts by the runner: {restarts}; {report.events} events at 500/s "
          f"drained {drained_at - started_at:.0f} s after the stream started")
    report_fault(f"Kafka broker JVM kill -9 x{kills} mid-stream, `run all` services", settings, report.events,
                 counts, f"(restarts {restarts})")
    assert counts.rows == report.events and counts.unique == report.events
    assert counts.labels == report.labels


# --- in-process services on the session store --------------------------------------------------
class ServiceThread:
    """One service's run(stop) in a thread with its own stop event (so one can stop while others run)."""

    def __init__(self, service, name: str):
        self.service = service
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                service.run(self.stop)
            except BaseException as exc:  # noqa: BLE001 - checked by the test
                self.error = exc

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def check(self) -> None:
        assert self.error is None, f"{self.thread.name} crashed: {self.error!r}"

    def shutdown(self, timeout_s: float = 60.0) -> None:
        self.stop.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"{self.thread.name} did not stop within {timeout_s} s"
        self.check()


@pytest.fixture
def settings_and_store(make_settings):
    """A factory of (settings, migrated session store) pairs; databases dropped afterwards."""
    opened = []

    def make(**overrides):
        settings = prepare(make_settings(**overrides))
        store = migrated_store(settings)
        opened.append((settings, store))
        return settings, store

    yield make
    for settings, store in opened:
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()


# --- 3. ClickHouse insert failures ------------------------------------------------------------------
class FailingInserts:
    """The real Store, except that inserts number `fail_from`..`fail_from + failures - 1` raise
    (fault injection in our own code: the rows still go to ClickHouse through the real Store)."""

    def __init__(self, store, failures: int, fail_from: int = 1):
        self.store = store
        self.failures = failures
        self.fail_from = fail_from
        self.calls: list[tuple[float, str, bool]] = []  # (monotonic time, table, failed)

    def _count(self, table: str) -> None:
        number = len(self.calls) + 1
        failing = self.fail_from <= number < self.fail_from + self.failures
        self.calls.append((time.monotonic(), table, failing))
        if failing:
            raise ConnectionError(f"injected failure of insert #{number} into {table}")

    def insert(self, table, rows, column_names, dedup_token=None):
        self._count(table)
        return self.store.insert(table, rows, column_names, dedup_token=dedup_token)

    def insert_native(self, table, block, rows, dedup_token=None):
        self._count(table)
        return self.store.insert_native(table, block, rows, dedup_token=dedup_token)

    @property
    def failing(self) -> bool:
        return sum(failed for _, _, failed in self.calls) < self.failures

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.slow
def test_store_failures_are_retried_with_backoff_without_committing(settings_and_store):
    from streamscore.services.logger.service import LoggerService
    from streamscore.services.scorer.service import ScorerService

    settings, store = settings_and_store()
    # Insert #1 (the first table of the first flush) succeeds and #2..#6 fail: the retry
    # writes the first table again under the same dedup token.
    flaky = FailingInserts(store, failures=5, fail_from=2)
    report = BackgroundProducer(settings, 4_000, rate=None, seed=4).result()
    scorer = ServiceThread(ScorerService(settings), "scorer")
    logger = ServiceThread(LoggerService(settings, store=flaky), "logger")
    try:
        wait_until(lambda: len(flaky.calls) >= 2, 60, "the logger's first failing insert")
        while flaky.failing:
            logger.check()
            assert logged_predictions(settings) == 0, "offsets committed while inserts fail"
            time.sleep(0.2)
        wait_drained(settings)
    finally:
        scorer.shutdown()
        logger.shutdown()

    failed_at = [t for t, _, failed in flaky.calls if failed]
    gaps = np.diff(failed_at + [next(t for t, _, failed in flaky.calls[len(failed_at) + 1:] if not failed)])
    print(f"\ninsert retry gaps (s): {', '.join(f'{g:.2f}' for g in gaps)}")
    assert all(later > earlier * 1.5 for earlier, later in zip(gaps, gaps[1:])), f"no exponential backoff: {gaps}"
    counts = store_counts(store)
    report_fault("5 failing ClickHouse inserts (after 1 that succeeded)", settings, report.events, counts)
    assert counts.rows == report.events and counts.unique == report.events
    assert counts.labels == report.labels


def test_stop_during_a_store_outage_is_prompt_and_commits_nothing(settings_and_store):
    """SIGTERM while ClickHouse is down must not hang in the retry loop, nor commit unwritten rows."""
    from streamscore.services.logger.service import LoggerService

    settings, store = settings_and_store()
    report = BackgroundProducer(settings, 500, rate=None, seed=5).result()
    down = FailingInserts(store, failures=10**9)
    logger = ServiceThread(LoggerService(settings, store=down), "logger")
    wait_until(lambda: logger.check() or len(down.calls) >= 2, 60, "the logger to retry a failing insert")
    started = time.monotonic()
    logger.shutdown(timeout_s=15)
    print(f"\nlogger stopped {time.monotonic() - started:.1f} s after stop, during the outage")
    committed, ends = positions(settings, settings.group("logger"), settings.topic(PAYMENTS.label.topic))
    assert sum(committed) == 0 and sum(ends) == report.labels, "labels committed without being written"

    logger = ServiceThread(LoggerService(settings, store=store), "logger")  # the store is back
    try:
        wait_until(lambda: logger.check() or positions(
            settings, settings.group("logger"), settings.topic(PAYMENTS.label.topic))[0] == ends, 60, "labels logged")
    finally:
        logger.shutdown()
    assert store_counts(store).labels == report.labels


# --- 4. poison input ----------------------------------------------------------------------------------
def poison_messages(settings: Settings) -> list[tuple[bytes | None, str]]:
    """(value, expected error.reason) for every kind of bad input we know of."""
    from streamscore.dev.simulator import Simulator

    cases = [(bad.value, bad.reason) for bad in Simulator(9, n_entities=10).bad_events(CODEC.encoder("event"))]
    label = CODEC.encoder("label")({"event_id": "e-1", "entity_id": "card-1", "label": 1, "label_time": 1})
    rng = np.random.default_rng(5)
    cases += [
        (label, "wrong_schema"),  # a valid record of another schema on the events topic
        (rng.bytes(40), "undecodable"),
        (b"\xc3\x01" + rng.bytes(30), "unknown_schema"),  # single-object magic, unknown fingerprint
        (b"", "undecodable"),
        (None, "undecodable"),  # a tombstone
    ]
    return cases


def produce_backlog(settings: Settings, n_good: int, poison_every: int, seed: int) -> tuple[int, list]:
    """n_good simulated events, a poison message after every `poison_every`-th; returns (good, poison sent)."""
    producer = Producer(client_config(settings, **{"linger.ms": 5}))
    encode = CODEC.encoder("event")
    topic = settings.topic(PAYMENTS.event.topic)
    cases = poison_messages(settings)
    sent_poison = []
    for i, (event, _) in enumerate(generator_ending_now(PAYMENTS, seed, 500, n_good).events(n_good)):
        producer.produce(topic, key=event["entity_id"].encode(), value=encode(event))
        if poison_every and i % poison_every == poison_every - 1:
            value, reason = cases[len(sent_poison) % len(cases)]
            producer.produce(topic, key=f"poison-{len(sent_poison)}".encode(), value=value)
            sent_poison.append((value, reason))
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return n_good, sent_poison


def scorer_rate(settings: Settings, n_messages: int, n_good: int) -> float:
    """Good events per second a ScorerService sustains on a backlog, from its first batch to its last."""
    from streamscore.services.scorer.service import ScorerService

    service = ScorerService(settings)
    thread = ServiceThread(service, "scorer")
    try:
        wait_until(lambda: thread.check() or service.stats.events_in > 0, 60, "the scorer's first batch", 0.01)
        started = time.monotonic()
        wait_until(lambda: thread.check() or service.stats.events_in >= n_messages, 120,
                   f"the scorer to consume {n_messages} messages", 0.01)
        seconds = time.monotonic() - started
    finally:
        thread.shutdown()
    return n_good / seconds


@pytest.mark.slow
def test_poison_is_dead_lettered_with_reasons_and_does_not_slow_good_events(make_settings, settings_and_store):
    from streamscore.kafka.io import headers_dict
    from streamscore.services.logger.service import LoggerService

    # The machine is shared and noisy: alternate clean and poisoned backlogs and keep each kind's best rate.
    n_good, rates = 8_000, {"clean": [], "poisoned": []}
    for round_ in range(2):
        clean = make_settings()
        ensure_topics(clean)
        produce_backlog(clean, n_good, poison_every=0, seed=6)
        rates["clean"].append(scorer_rate(clean, n_good, n_good))
        poisoned, store = settings_and_store()
        _, poison = produce_backlog(poisoned, n_good, poison_every=9, seed=6)  # 10% of messages are poison
        rates["poisoned"].append(scorer_rate(poisoned, n_good + len(poison), n_good))
    clean_rate, poisoned_rate = max(rates["clean"]), max(rates["poisoned"])
    print(f"\ngood events/s (best of {len(rates['clean'])}): {clean_rate:,.0f} clean, {poisoned_rate:,.0f} with "
          f"{len(poison)} poison messages ({len(poison) / (n_good + len(poison)):.0%}) mixed in: "
          f"{poisoned_rate / clean_rate:.0%}; all rounds: {rates}")
    # Quiet machine: 75-108 %. The bound is loose because CI shares 2 cores with the broker; a real per-poison
    # cost (a flush or retry per dead letter, an exception storm) drops the ratio far below it.
    assert poisoned_rate > 0.35 * clean_rate

    # Every poison message is in the dead-letter topic with its reason and original bytes ...
    dlq = Consumer(reader_config(poisoned, **{"group.id": "test-dlq-reader", "auto.offset.reset": "earliest"}))
    dlq.subscribe([poisoned.topic(TOPIC_DEAD_LETTER)])
    dead: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + 60
    while len(dead) < len(poison) and time.monotonic() < deadline:
        dead += [(m.value() or b"", headers_dict(m)) for m in dlq.consume(1000, 0.5) if not m.error()]
    dlq.close()
    assert sorted((value or b"", reason) for value, reason in poison) == sorted(
        (value, headers["error.reason"]) for value, headers in dead)
    for _, headers in dead:
        assert headers["error.detail"] and headers["error.service"] == "scorer"
        assert headers["source.topic"] == poisoned.topic(PAYMENTS.event.topic) and int(headers["source.offset"]) >= 0

    # ... and, through the logger, in rejected_events, while every good event is in predictions.
    logger = ServiceThread(LoggerService(poisoned, store=store), "logger")
    try:
        wait_until(lambda: logger.check() or drained(poisoned), 120, "the logger to write everything")
    finally:
        logger.shutdown()
    rejected = store.query("SELECT raw, reason FROM rejected_events FINAL", column_formats={"raw": "bytes"}).rows
    assert sorted((value or b"", reason) for value, reason in poison) == sorted((bytes(r), why) for r, why in rejected)
    counts = store_counts(store)
    report_fault(f"{len(poison)} poison messages among {n_good} good events", poisoned, n_good, counts)
    assert counts.rows == n_good and counts.unique == n_good and counts.rejected == len(poison)


# --- 5. rebalance ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rebalance_between_two_scorers_keeps_counts_and_entity_state(settings_and_store):
    from streamscore.services.logger.service import LoggerService
    from streamscore.services.scorer.service import ScorerService

    # progress is read from the scorers' commits: every 0.5 s, so they follow this 8 s stream (at the 5 s
    # default the stream would end between two of them)
    settings, store = settings_and_store(scorer_checkpoint_interval_ms=500)
    first = ServiceThread(ScorerService(settings), "scorer-a")
    second = ServiceThread(ScorerService(settings), "scorer-b")
    logger = ServiceThread(LoggerService(settings, store=store), "logger")
    wait_services_ready(settings)
    producer = BackgroundProducer(settings, 12_000, rate=1_500, seed=7)
    try:
        def scored() -> int:
            for thread in (first, second, logger):
                thread.check()
            return scorer_position(settings)[0]

        wait_until(lambda: scored() >= 3_000, 90, "3000 events scored by the two scorers")
        assert second.service.pipeline.states, "scorer-b got no partition: no rebalance to test"
        second.shutdown()  # its partitions move to scorer-a
        mark = scored()
        wait_until(lambda: scored() >= mark + 2_000, 90, "2000 more events scored by scorer-a alone")
        assert producer.running
        second = ServiceThread(ScorerService(settings), "scorer-b2")  # partitions move back
        report = producer.result()
        wait_drained(settings)
        assert second.service.pipeline.states, "scorer-b2 got no partition"
    finally:
        for thread in (first, second, logger):
            thread.shutdown()
    counts = store_counts(store)
    report_fault("2 scorers in a group, one stopped and a new one started mid-stream", settings, report.events, counts)
    assert counts.rows == report.events and counts.unique == report.events

    result = store.query(LOGGED_FEATURES_SQL)
    assert_features_match_offline([dict(zip(result.column_names, row)) for row in result.rows])


# --- 6. graceful shutdown ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_exits_promptly_after_flushing_and_committing(topic_settings, tmp_path):
    settings = topic_settings
    env = service_env(settings, tmp_path / "svc")
    services = ServiceProcess(env, ["scorer", "logger"], tmp_path / "services.log")
    wait_services_ready(settings)
    producer = BackgroundProducer(settings, 15_000, rate=1_500, seed=8)  # 10 s: still flowing at the SIGTERM on a loaded machine
    wait_until(lambda: services.assert_alive() or logged_predictions(settings) >= 1_000, 90,
               "the logger to commit 1000 predictions")
    assert producer.running

    # SIGTERM while events flow.
    code, seconds = services.terminate()
    print(f"\nSIGTERM mid-stream: exit code {code} after {seconds:.1f} s")
    assert code == 0, services.log_tail()
    assert seconds < 15
    # The scorer produced exactly what it committed: a restart re-scores nothing.
    scorer_committed = scorer_position(settings)[0]
    predictions_committed, predictions_end = positions(settings, settings.group("logger"),
                                                       settings.topic(TOPIC_PREDICTIONS))
    assert sum(predictions_end) == scorer_committed
    # The logger wrote exactly what it committed: every committed message is in ClickHouse once.
    written = subprocess_counts(env)
    assert written.raw_rows == written.rows == sum(predictions_committed)

    # Restart, finish the stream, stop when idle: everything committed, nothing written twice.
    services = ServiceProcess(env, ["scorer", "logger"], tmp_path / "services.log")
    report = producer.result()
    wait_drained(settings)
    code, seconds = services.terminate()
    print(f"SIGTERM when idle: exit code {code} after {seconds:.1f} s")
    assert code == 0 and seconds < 15
    assert drained(settings), "offsets committed at shutdown differ from the end offsets"
    counts = subprocess_counts(env)
    report_fault("SIGTERM mid-stream, restart, SIGTERM when idle", settings, report.events, counts)
    assert counts.rows == counts.unique == report.events
    assert counts.raw_rows == report.events, "a restart after SIGTERM re-inserted rows"
