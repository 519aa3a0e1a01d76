"""`streamscore bench --soak MINUTES`: `streamscore run all` at a steady rate for minutes, with retrains.

What it runs: the default a newcomer runs, `streamscore run all` (logger, drift, trainer in one process holding
the embedded ClickHouse, the scorer in a child process of its own) as a subprocess in a data dir of its own, on the local broker. History first (as fast as
possible, labelled) and v1 trained from it through the running process's store socket; then the live phase
at `rate` events/s (the simulator's defaults, 2,000 entities, labels 1 s after their events) for `minutes`,
with a retrain request every `retrain_every_s` (the trainer trains in its own process, promotes or rejects).

What it reports, per minute of the live phase: predictions received, event -> prediction latency p50 / p99 /
max (event id stamped with its send time; received by a consumer of the predictions topic), the memory (RSS,
MiB) and threads of the `run all` process and its long-lived descendants (the scorer's process; training
processes, which end with their training, are left out) and, of it, the scorer's process and what the
embedded ClickHouse tracks (its MemoryTracking metric), retrains finished so far. At the
end: memory growth per million events after the warm-up (first two minutes), and the exactly-once counts
(events produced vs predictions logged, distinct).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.dev.generators import generator_ending_now
from streamscore.kafka.config import schema_registry_config
from streamscore.ops.process_names import SCORER_PROCESS, TRAINING
from streamscore.settings import TOPIC_PREDICTIONS, TOPIC_RETRAIN, Settings
from streamscore.spec import FeatureSpec, resolve

WARM_UP_MINUTES = 2


@dataclass
class SoakMinute:
    minute: int
    predictions: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_mib: float
    threads: int
    retrains: int
    load: float = float("nan")  # the machine's 1-minute load average (other processes included)
    scorer_mib: float = float("nan")  # of rss_mib: the scorer's process
    clickhouse_mib: float = float("nan")  # of rss_mib: what the embedded ClickHouse tracks (MemoryTracking)


@dataclass
class SoakReport:
    rate: float
    minutes: float
    rows: list[SoakMinute] = field(default_factory=list)
    produced: int = 0
    logged_rows: int = 0
    logged_unique: int = 0
    retrains: list[tuple[int, str]] = field(default_factory=list)  # (version, action) from model_versions
    mib_per_million_after_warm_up: float = float("nan")
    history_events: int = 0
    retrain_seconds: list[float] = field(default_factory=list)


class StampedEvents:
    """The simulator's events with each event id stamped with its send time (ms): `<id>@<ms>`, labels alike,
    so the latency of a prediction is read off its event id."""

    def __init__(self, simulator, spec: FeatureSpec):
        self.simulator = simulator
        self.id_field = spec.event.id_field
        self.label_id = spec.label.id_field

    def events(self, n: int):
        for event, label in self.simulator.events(n):
            stamped = f"{event[self.id_field]}@{int(time.time() * 1000)}"
            event = dict(event, **{self.id_field: stamped})
            if label is not None:
                label = dict(label, **{self.label_id: stamped})
            yield event, label

    def bad_events(self, encode):
        return self.simulator.bad_events(encode)


class LatencyWatcher:
    """Consumes the predictions topic from its end; latencies (ms) per minute of receive time."""

    def __init__(self, settings: Settings, started: float):
        from confluent_kafka import Consumer, TopicPartition

        from streamscore.kafka.config import reader_config

        self.started = started
        self.by_minute: dict[int, list[float]] = {}
        self._stop = threading.Event()
        topic = settings.topic(TOPIC_PREDICTIONS)
        self.consumer = Consumer(reader_config(settings, **{"group.id": "soak-watcher", "fetch.wait.max.ms": 5}))
        metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, -1) for p in metadata.partitions])
        self._thread = threading.Thread(target=self._run, name="soak-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from streamscore.services.tools.bench import prediction_event_id

        while not self._stop.is_set():
            batch = self.consumer.consume(1, 0.05)
            if batch:
                batch += self.consumer.consume(5000, 0)
            now = time.time()
            minute = int((now - self.started) // 60)
            bucket = self.by_minute.setdefault(minute, [])
            for msg in batch:
                if msg.error():
                    continue
                event_id = prediction_event_id(msg.value())
                stamp = event_id.rpartition("@")[2]
                if stamp.isdigit():
                    bucket.append(now * 1000 - int(stamp))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants. /proc/<pid>/task/<tid>/children lists the children each thread started: the
    scorer's process is started by the runner's scorer thread, a training process by the trainer's."""
    tree, todo = [], [pid]
    while todo:
        one = todo.pop()
        tree.append(one)
        for children in Path(f"/proc/{one}/task").glob("*/children"):
            try:
                todo += [int(child) for child in children.read_text().split()]
            except OSError:
                continue
    return tree


def process_memory(pid: int, leave_out: tuple[str, ...] = (TRAINING,)) -> tuple[float, int]:
    """(RSS MiB, threads) of the process and its descendants (the scorer's process), from /proc; processes
    named in `leave_out` are not counted: a training process (550-690 MiB while it trains, then gone) would
    make the trend a saw of whether one happened to run at the sample."""
    rss_kib, threads = 0, 0
    for one in process_tree(pid):
        name, one_rss_kib, one_threads = _process_status(one)
        if name not in leave_out:
            rss_kib, threads = rss_kib + one_rss_kib, threads + one_threads
    return rss_kib / 1024, threads


def named_memory(pid: int, name: str) -> float:
    """RSS (MiB) of the processes named `name` in `pid`'s tree, each without its children."""
    statuses = [_process_status(one) for one in process_tree(pid)]
    return sum(rss_kib for comm, rss_kib, _ in statuses if comm == name) / 1024


def _process_status(pid: int) -> tuple[str, int, int]:
    """(name, RSS KiB, threads) of one process; ("", 0, 0) once it is gone."""
    rss_kib, threads = 0, 0
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    except OSError:
        return "", 0, 0
    return name, rss_kib, threads


def soak_settings(base: Settings) -> Settings:
    unique = f"{time.strftime('%H%M%S')}{uuid.uuid4().hex[:4]}"
    data_dir = (base.data_dir / "soak" / unique).resolve()
    return base.model_copy(update={
        "topic_prefix": f"soak-{unique}.", "consumer_group_prefix": f"soak-{unique}", "data_dir": data_dir,
        "model_dir": data_dir / "models", "clickhouse_database": "streamscore_soak", "spec": None,
        "model_name": None})


def _run_all(settings: Settings, log_path: Path, services: tuple[str, ...] = ("all",)) -> subprocess.Popen:
    """`streamscore run <services>` as a subprocess on `settings`' namespace, its output appended to `log_path`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMSCORE_")}
    env.update({
        "STREAMSCORE_DATA_DIR": str(settings.data_dir), "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMSCORE_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMSCORE_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "STREAMSCORE_KAFKA_PORT": str(settings.kafka_port), "STREAMSCORE_TRAINER_MIN_NEW_LABELS": "0",
        "STREAMSCORE_LOG_LEVEL": "INFO",
    })
    if settings.kafka_bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    code = "from streamscore.services.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "run", *services], env=env, stdout=open(log_path, "a"),
                            stderr=subprocess.STDOUT)


def _wait(condition, what: str, timeout_s: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"`run all` exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)
    return value


def run_soak(base: Settings, minutes: float, rate: float = 2_500.0, entities: int = 2_000,
             history_events: int = 30_000, retrain_every_s: float = 120.0, seed: int = 3,
             progress=print) -> SoakReport:
    from streamscore.clickhouse.shared_store import RemoteStore, socket_path
    from streamscore.kafka.io import make_producer
    from streamscore.kafka.topics import ensure_topics
    from streamscore.learning.model_updates import publish_model_updates
    from streamscore.learning.registry import ModelRegistry
    from streamscore.learning.retraining import train_and_register
    from streamscore.services.tools.simulate import produce_simulation

    settings, spec = resolve(soak_settings(base))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings, spec=spec)
    codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    live_events = int(rate * minutes * 60)
    progress(f"soak: {settings.data_dir}, {history_events:,} history events then {live_events:,} at {rate:,.0f}/s")
    simulator = StampedEvents(generator_ending_now(spec, seed, entities, history_events + live_events), spec)
    process = _run_all(settings, settings.data_dir / "run-all.log")
    report = SoakReport(rate=rate, minutes=minutes, history_events=history_events)
    store = None
    try:
        _wait(lambda: socket_path(settings).exists(), "`run all` to serve its store", 180, process)
        store = RemoteStore(settings, socket_path(settings))
        history = produce_simulation(settings, spec, codec, simulator, history_events)
        _wait(lambda: store.query("SELECT count() FROM predictions").rows[0][0] >= history_events,
              "the history to be logged", 300, process)
        _wait(lambda: store.query("SELECT count() FROM labels").rows[0][0] >= history.labels,
              "the history's labels", 300, process)
        registry = ModelRegistry(settings.registry_dir)
        progress("soak: training v1 from the history (through the running process's store socket)")
        v1 = train_and_register(store, registry, settings, spec, reason="soak: v1")
        events = v1.events if v1.promoted else [*v1.events, registry.promote(settings.model_name, 1,
                                                                             reason="soak: v1").event]
        publish_model_updates(settings, codec, events)
        time.sleep(2)  # the scorer swaps within 0.5 s
        started = time.time()
        watcher = LatencyWatcher(settings, started)
        produced = {}
        producer_thread = threading.Thread(
            target=lambda: produced.update(report=produce_simulation(settings, spec, codec, simulator, live_events,
                                                                     rate=rate)), name="soak-producer", daemon=True)
        producer_thread.start()
        requests = make_producer(settings)
        encode_request = codec.encoder("retrain_request")
        next_retrain = time.monotonic() + retrain_every_s / 2
        memory: list[tuple[float, float, int]] = []  # (minute end, MiB, threads)
        minute = 0
        progress(f"soak: live phase, {minutes:g} min at {rate:,.0f} events/s; a retrain request every "
                 f"{retrain_every_s:g} s")
        while producer_thread.is_alive():
            time.sleep(0.5)
            if process.poll() is not None:
                raise RuntimeError(f"`run all` exited ({process.returncode}) during the soak; see "
                                   f"{settings.data_dir / 'run-all.log'}")
            if time.monotonic() >= next_retrain:
                next_retrain += retrain_every_s
                production = registry.read_production_version(settings.model_name) or 0
                newest = int(store.query("SELECT toUnixTimestamp64Milli(max(event_time)) FROM predictions").rows[0][0])
                request = {"request_id": f"soak-{uuid.uuid4().hex[:8]}", "model_name": settings.model_name,
                           "model_version": production, "reason": "soak: scheduled retrain", "detector": "soak",
                           # a feature of its own: the trainer's duplicate check (same version, detector
                           # and feature within the cool-down) would skip a repeat after a rejection
                           "feature": f"schedule-{next_retrain:.0f}", "statistic": "schedule", "value": 0.0, "threshold": 0.0, "window": 0,
                           "detected_at": newest}
                requests.produce(settings.topic(TOPIC_RETRAIN), key=settings.model_name.encode(),
                                 value=encode_request(request))
                requests.flush(10)
            if time.time() - started >= (minute + 1) * 60:
                rss, threads = process_memory(process.pid)
                memory.append((minute, rss, threads))
                report.rows.append(_minute_row(minute, watcher, rss, threads, store, process.pid))
                progress(_format_row(report.rows[-1]))
                minute += 1
        report.produced = history_events + produced["report"].events
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rows, unique = store.query("SELECT count(), uniqExact(event_id) FROM predictions").rows[0]
            if unique >= report.produced:
                break
            time.sleep(1)
        rows, unique = store.query("SELECT count(), uniqExact(event_id) FROM predictions").rows[0]
        report.logged_rows, report.logged_unique = int(rows), int(unique)
        if time.time() - started > (minute + 0.5) * 60:
            rss, threads = process_memory(process.pid)
            report.rows.append(_minute_row(minute, watcher, rss, threads, store, process.pid))
        watcher.close()
        report.retrains = [(int(v), a) for v, a in store.query(
            "SELECT version, action FROM model_versions WHERE version > 1 AND action IN ('promote', 'reject') "
            "ORDER BY version").rows]
        report.retrain_seconds = _retrain_seconds(settings.data_dir / "run-all.log")
        after = [(m, rss) for m, rss, _ in memory if m >= WARM_UP_MINUTES]
        if len(after) >= 2:
            slope = np.polyfit([m for m, _ in after], [rss for _, rss in after], 1)[0]  # MiB per minute
            report.mib_per_million_after_warm_up = float(slope / (rate * 60 / 1e6))
    finally:
        if store is not None:
            store.close()
        process.terminate()
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
    return report


def _minute_row(minute: int, watcher: LatencyWatcher, rss: float, threads: int, store, pid: int) -> SoakMinute:
    values = np.asarray(watcher.by_minute.get(minute, []), dtype=np.float64)
    retrains = int(store.query("SELECT count() FROM model_versions WHERE version > 1 AND action IN "
                               "('promote', 'reject')").rows[0][0])
    tracked = store.query("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'").rows
    memory = dict(scorer_mib=named_memory(pid, SCORER_PROCESS), clickhouse_mib=int(tracked[0][0]) / 2**20
                  if tracked else float("nan"))
    if values.size == 0:
        return SoakMinute(minute + 1, 0, float("nan"), float("nan"), float("nan"), rss, threads, retrains,
                          os.getloadavg()[0], **memory)
    p50, p99 = np.percentile(values, (50, 99))
    return SoakMinute(minute + 1, int(values.size), float(p50), float(p99), float(values.max()), rss, threads,
                      retrains, os.getloadavg()[0], **memory)


def _format_row(row: SoakMinute) -> str:
    return (f"  minute {row.minute:>3}: {row.predictions:>7,} predictions, p50 {row.p50_ms:6.1f} ms, p99 "
            f"{row.p99_ms:7.1f} ms, max {row.max_ms:7.1f} ms, RSS {row.rss_mib:6.0f} MiB (scorer "
            f"{row.scorer_mib:.0f}, ClickHouse {row.clickhouse_mib:.0f}), {row.threads} threads, "
            f"{row.retrains} retrains, load {row.load:.1f}")


def _retrain_seconds(log_path: Path) -> list[float]:
    """Seconds of each retrain (registration to decision), from the `run all` log's retraining lines."""
    out = []
    try:
        for line in log_path.read_text().splitlines():
            if "streamscore.retraining" in line and "seconds=" in line:
                out.append(float(line.rsplit("seconds=", 1)[1].split()[0].strip(",)")))
    except (OSError, ValueError):
        pass
    return out


def print_soak(report: SoakReport, console) -> None:
    from rich import box
    from rich.table import Table

    table = Table("minute", "predictions", "p50 ms", "p99 ms", "max ms", "RSS MiB", "scorer MiB", "ClickHouse MiB",
                  "threads", "retrains", "load",
                  title=f"soak: `run all` at {report.rate:,.0f} events/s for {report.minutes:g} min",
                  box=box.SIMPLE_HEAD)
    for row in report.rows:
        table.add_row(str(row.minute), f"{row.predictions:,}", f"{row.p50_ms:.1f}", f"{row.p99_ms:.1f}",
                      f"{row.max_ms:.1f}", f"{row.rss_mib:.0f}", f"{row.scorer_mib:.0f}", f"{row.clickhouse_mib:.0f}",
                      str(row.threads), str(row.retrains),
                      f"{row.load:.1f}")
    console.print(table)
    p99s = [row.p99_ms for row in report.rows if row.predictions]
    console.print(f"worst minute p99 {max(p99s):.1f} ms, median minute p99 {statistics.median(p99s):.1f} ms"
                  if p99s else "no predictions received", highlight=False)
    console.print(f"memory after the {WARM_UP_MINUTES}-minute warm-up: {report.mib_per_million_after_warm_up:+.1f} "
                  "MiB per million events", highlight=False)
    console.print(f"retrains finished: {len(report.retrains)} ({', '.join(f'v{v} {a}' for v, a in report.retrains)})"
                  + (f"; {min(report.retrain_seconds):.1f}-{max(report.retrain_seconds):.1f} s each"
                     if report.retrain_seconds else ""), highlight=False)
    verdict = ("exactly once" if report.logged_rows == report.logged_unique == report.produced else "MISMATCH")
    console.print(f"events produced {report.produced:,}; predictions logged {report.logged_rows:,} rows, "
                  f"{report.logged_unique:,} distinct: {verdict}", highlight=False)
