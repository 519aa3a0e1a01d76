"""`streamscore bench`: the performance figures of the scorer, the logger and the whole path, in one run.

Sections (each printed as a table; every figure also as a ratio to a baseline):

1. scorer in process, payments spec: raw Avro bytes (prepared up front) -> ScoringPipeline.score
   (scan, validate, compiled features, 200-tree LightGBM predict, Prediction encode), by batch
   size; events/s and per-batch latency p50/p99. The model is trained on the spec's offline features and registered in the bench's own registry, so it is
   exactly what a scorer would load.
2. naive baseline in the same run: per message json.loads -> validate -> features (the spec's
   reference interpreter, spec/oracle.py) -> predict one row -> json.dumps, no batching, no Avro.
3. end to end through the real broker: a scorer SUBPROCESS (`streamscore run scorer`, as deployed)
   consumes events this process produces at fixed offered rates; this process consumes the
   predictions. Latency = time this process RECEIVED the prediction minus the time it handed
   the event to its producer (both time.time() on this host), also given with the prediction
   message's CreateTime (when the scorer handed it to its producer) instead of receive time.
   Max sustained throughput = drain rate of a backlog produced as fast as possible.
4. logger: rows/s of real scored Prediction messages into `predictions` (embedded chDB; and the
   server when CLICKHOUSE_URL is set): the logger's batch path (one Native block per flush, inserted by
   the writer thread while the next batch is read) vs the per-message path (the generic decoder,
   clickhouse-connect encodes the rows) as its baseline.
5. memory: RSS growth of a fresh subprocess building N entity states.

The hard-coded payments path the spec engine replaced was measured beside it before it was deleted:
docs/performance.md, "Round 2".

Namespace: topics `bench.*`, database `streamscore_bench`, data dir <data_dir>/bench (its own
chDB dir, so it runs beside `streamscore run`), wiped at the start. The machine is shared and
noisy: each in-process figure is the median of `repeats` runs, and ratios compare figures
measured in the same run.
"""
from __future__ import annotations

import dataclasses

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.dev.generators import generator_ending_now, load_generator
from streamscore.learning import training
from streamscore.learning.registry import ModelRegistry
from streamscore.clickhouse.tables import inserted_columns
from streamscore.learning.training_set import LoggedEvents, offline_features
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline
from streamscore.scoring.served_model import ServedModel, load_production_model
from streamscore.scoring.validation import EventValidator
from streamscore.settings import TOPIC_PREDICTIONS, Settings
from streamscore.spec import default_spec_path, load_spec
from streamscore.spec.model import FeatureSpec
from streamscore.spec.oracle import Oracle

PAYMENTS = load_spec(default_spec_path())  # the bench measures the payments example

BENCH_TOPIC_PREFIX = "bench."
BENCH_DATABASE = "streamscore_bench"


@dataclass
class BenchOptions:
    quick: bool = False
    sections: tuple[str, ...] = ("scorer", "rollout", "e2e", "logger", "memory")
    batch_sizes: tuple[int, ...] = (1, 10, 100, 500, 2000)
    rates: tuple[float, ...] = (1_000.0, 5_000.0)
    repeats: int = 3
    seconds_per_rate: float = 10.0
    # untimed traffic at the top rate first: a freshly started broker JVM spends ~50 s JIT-compiling
    # (its C2 compiler thread busy; at 5k msgs/s the broker used ~100% of a core, 45-80% once compiled)
    warmup_s: float = 60.0
    backlog_events: int = 100_000
    memory_entities: tuple[int, ...] = (100_000, 1_000_000)
    events_per_entity: int = 4
    logger_rows: int = 200_000
    seed: int = 11

    @classmethod
    def quick_options(cls, **overrides) -> BenchOptions:
        values = dict(quick=True, repeats=2, seconds_per_rate=4.0, warmup_s=45.0, backlog_events=30_000,
                      memory_entities=(100_000, 300_000), logger_rows=60_000)
        values.update(overrides)
        return cls(**values)


def bench_settings(settings: Settings) -> Settings:
    """The bench's own namespace: topics, consumer groups, database, registry, chDB dir."""
    data_dir = settings.data_dir / "bench"
    return settings.model_copy(update={
        "topic_prefix": BENCH_TOPIC_PREFIX, "clickhouse_database": BENCH_DATABASE, "data_dir": data_dir,
        "model_dir": data_dir / "models", "consumer_group_prefix": "streamscore-bench",
        "model_name": PAYMENTS.model.name, "spec": default_spec_path()})


def percentiles(values, qs=(50, 99)) -> list[float]:
    if len(values) == 0:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), qs)]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --- the model and the streams ------------------------------------------------------------

def events_matrix(spec: FeatureSpec, events: list[dict]):
    """The spec's features of raw events, replayed offline as one partition in the given order."""
    columns = {f.name: [e.get(f.name) for e in events] for f in spec.event.layout.fields}
    logged = LoggedEvents(columns=columns, partitions=np.zeros(len(events), dtype=np.int64),
                          offsets=np.arange(len(events)), times=np.array([e[spec.event.time_field] for e in events]),
                          event_ids=[e[spec.event.id_field] for e in events])
    return offline_features(spec, logged)


def train_bench_model(settings: Settings, seed: int, history_events: int) -> tuple[ServedModel, float]:
    """A 200-tree model trained on the payments spec's offline features, registered and promoted in the bench
    registry."""
    shutil.rmtree(settings.registry_dir, ignore_errors=True)
    pairs = list(load_generator(PAYMENTS).make_generator(seed, 2_000).events(history_events))
    events = [event for event, _ in pairs]
    labels = np.array([label["label"] for _, label in pairs])
    matrix = events_matrix(PAYMENTS, events)
    started = time.perf_counter()
    trained = training.train_model(matrix, labels, PAYMENTS.feature_names, PAYMENTS.categorical_features,
                                   num_boost_round=200)
    seconds = time.perf_counter() - started
    registry = ModelRegistry(settings.registry_dir)
    version = registry.register(
        settings.model_name, trained.booster, feature_set=PAYMENTS.feature_set,
        feature_names=PAYMENTS.feature_names, categorical_features=PAYMENTS.categorical_features,
        train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
        threshold=trained.threshold, params=trained.params, reason="bench")
    registry.promote(settings.model_name, version.version, reason="bench")
    return load_production_model(registry, PAYMENTS, settings.model_name), seconds


def scoring_stream(seed: int, n_events: int, n_entities: int) -> list[dict]:
    return [event for event, _ in load_generator(PAYMENTS).make_generator(seed, n_entities).events(n_events)]


# --- 1. scorer in process -------------------------------------------------------------------

@dataclass
class InProcessFigure:
    batch_size: int
    events_per_s: float  # per wall-clock second
    batch_p50_ms: float
    batch_p99_ms: float
    events: int
    events_per_cpu_s: float = float("nan")  # per CPU second of this process (less sensitive to a loaded machine)


def _warm_pipeline(settings, codec, model, raw: list[bytes], now_ms: int) -> ScoringPipeline:
    pipeline = ScoringPipeline(PAYMENTS, codec, model)
    for start in range(0, len(raw), 2000):
        pipeline.score([InputMessage(value, 0, start + i) for i, value in enumerate(raw[start:start + 2000])],
                       now_ms=now_ms)
    return pipeline


def scorer_in_process(settings: Settings, codec: AvroCodec, model: ServedModel, warm: list[bytes],
                      timed: list[bytes], now_ms: int, batch_size: int, max_seconds: float) -> InProcessFigure:
    """Score `timed` (after `warm` built realistic state) in batches; the clock covers score() only,
    which includes decode, validation, features, predict and the Prediction bytes."""
    pipeline = _warm_pipeline(settings, codec, model, warm, now_ms)
    base = len(warm)
    batches = [[InputMessage(value, 0, base + start + i) for i, value in enumerate(timed[start:start + batch_size])]
               for start in range(0, len(timed), batch_size)]
    latencies = []
    scored = 0
    gc.collect()
    cpu_started = time.process_time()
    started = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        result = pipeline.score(batch, now_ms=now_ms)
        latencies.append(time.perf_counter() - t0)
        scored += len(result.encoded)
        if latencies[-1] and time.perf_counter() - started > max_seconds:
            break
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    p50, p99 = percentiles(latencies)
    return InProcessFigure(batch_size, scored / seconds, p50 * 1e3, p99 * 1e3, scored, scored / cpu_seconds)


ROLLOUT_BATCH = 500
ROLLOUT_CONFIGURATIONS = ("production only", "1 shadow", "2 shadows", "canary 5%")


def _rollout_pipeline(configuration: str):
    """A `make` for scorer_in_process serving `configuration` (the extra versions: the bench model's booster
    under other version numbers, so each costs what another 200-tree model of the spec costs)."""
    from streamscore.scoring.rollout import ServingModels

    def make(settings, codec, model) -> ScoringPipeline:
        pipeline = ScoringPipeline(PAYMENTS, codec, model)
        other = [dataclasses.replace(model, version=model.version + k) for k in (1, 2)]
        serving = {"production only": ServingModels(model), "1 shadow": ServingModels(model, shadows=(other[0],)),
                   "2 shadows": ServingModels(model, shadows=tuple(other)),
                   "canary 5%": ServingModels(model, canary=other[0], canary_share=0.05)}[configuration]
        pipeline.set_serving(serving)
        return pipeline

    return make


def rollout_cost(settings: Settings, codec: AvroCodec, model: ServedModel, warm: list[bytes], timed: list[bytes],
                 now_ms: int, repeats: int, max_seconds: float) -> list[dict]:
    """Scorer throughput (batch 500, in process) with each rollout configuration. Interleaved batch by batch:
    each repeat warms one pipeline per configuration on the same events, then scores every timed batch with
    each of them in turn (the order rotating), so a load swing of the shared machine hits all of them alike;
    the ratio to production only is per repeat, then its median."""
    base = len(warm)
    batches = [[InputMessage(value, 0, base + start + i) for i, value in enumerate(timed[start:start + ROLLOUT_BATCH])]
               for start in range(0, len(timed), ROLLOUT_BATCH)]
    wall: dict[str, list[float]] = {c: [] for c in ROLLOUT_CONFIGURATIONS}
    cpu: dict[str, list[float]] = {c: [] for c in ROLLOUT_CONFIGURATIONS}
    latencies: dict[str, list[float]] = {c: [] for c in ROLLOUT_CONFIGURATIONS}
    scored: dict[str, int] = {c: 0 for c in ROLLOUT_CONFIGURATIONS}
    for _ in range(repeats):
        pipelines = {c: _warm_pipeline(_rollout_pipeline(c), settings, codec, model, warm, now_ms)
                     for c in ROLLOUT_CONFIGURATIONS}
        spent = {c: [0.0, 0.0] for c in ROLLOUT_CONFIGURATIONS}
        gc.collect()
        for k, batch in enumerate(batches):
            order = ROLLOUT_CONFIGURATIONS[k % 4:] + ROLLOUT_CONFIGURATIONS[:k % 4]
            for configuration in order:
                c0, t0 = time.process_time(), time.perf_counter()
                result = pipelines[configuration].score(batch, now_ms=now_ms)
                seconds = time.perf_counter() - t0
                spent[configuration][0] += seconds
                spent[configuration][1] += time.process_time() - c0
                latencies[configuration].append(seconds)
                scored[configuration] += len(result.encoded)
        for configuration, (seconds, cpu_seconds) in spent.items():
            wall[configuration].append(seconds)
            cpu[configuration].append(cpu_seconds)
    n = len(timed)
    out = []
    for configuration in ROLLOUT_CONFIGURATIONS:
        ratios = [b / s for s, b in zip(wall[configuration], wall["production only"])]
        cpu_ratios = [b / s for s, b in zip(cpu[configuration], cpu["production only"])]
        out.append({"configuration": configuration, "events_per_s": n / float(np.median(wall[configuration])),
                    "events_per_cpu_s": n / float(np.median(cpu[configuration])),
                    "batch_p50_ms": percentiles(latencies[configuration])[0] * 1e3,
                    "ratio": float(np.median(ratios)), "cpu_ratio": float(np.median(cpu_ratios)),
                    "ratios": ratios, "scored": scored[configuration]})
    return out


# --- 2. naive baseline -----------------------------------------------------------------------

def naive_baseline(settings: Settings, model: ServedModel, warm: list[dict], timed: list[bytes],
                   now_ms: int, max_seconds: float) -> InProcessFigure:
    """Per message: JSON decode -> validate -> features (the spec's reference interpreter) -> predict one row
    -> JSON encode. No batching, no Avro, no compiled code of streamscore's."""
    from streamscore.avro.scanner import columns_from_records

    oracle = Oracle(PAYMENTS)
    for i, event in enumerate(warm):
        oracle.features(event, 0, i)
    validator = EventValidator(PAYMENTS)
    layout = PAYMENTS.event.layout
    booster = model.booster
    names = PAYMENTS.feature_names
    latencies = []
    cpu_started = time.process_time()
    started = time.perf_counter()
    for i, data in enumerate(timed):
        t0 = time.perf_counter()
        event = json.loads(data)
        passed, _ = validator.check(columns_from_records(layout, [event]), np.zeros(1, dtype=np.int64), now_ms)
        vector = oracle.features(event, 0, len(warm) + i)
        score = float(booster.predict(np.asarray([vector]), num_threads=1)[0])
        json.dumps({"event_id": event["event_id"], "entity_id": event["entity_id"],
                    "event_time": event["event_time"], "scored_at": int(time.time() * 1000),
                    "model_name": model.name, "model_version": model.version, "score": score,
                    "feature_set": PAYMENTS.feature_set, "features": dict(zip(names, vector)),
                    "event": event, "event_partition": 0, "event_offset": len(warm) + i})
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - started > max_seconds:
            break
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    p50, p99 = percentiles(latencies)
    return InProcessFigure(1, len(latencies) / seconds, p50 * 1e3, p99 * 1e3, len(latencies),
                           len(latencies) / cpu_seconds)


# --- 3. end to end through the broker ----------------------------------------------------------

def prediction_event_id(value: bytes) -> str:
    """The first field of a framed Prediction (event_id) without decoding the rest."""
    pos = 10 if value[0] == 0xC3 else 5
    shift = length = 0
    while True:
        byte = value[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    length = (length >> 1) ^ -(length & 1)
    return value[pos:pos + length].decode()


class PredictionWatcher:
    """Consumes the predictions topic from its end in a thread; notes when each event id arrived."""

    def __init__(self, settings: Settings):
        from confluent_kafka import Consumer, TopicPartition

        from streamscore.kafka.config import reader_config

        self.received: dict[str, tuple[float, int]] = {}  # event id -> (receive time s, CreateTime ms)
        self._stop = threading.Event()
        topic = settings.topic(TOPIC_PREDICTIONS)
        self.consumer = Consumer(reader_config(settings, **{"group.id": "bench-watcher", "fetch.wait.max.ms": 5}))
        metadata = self.consumer.list_topics(topic, timeout=10).topics[topic]
        self.consumer.assign([TopicPartition(topic, p, -1) for p in metadata.partitions])  # -1 = OFFSET_END
        self._thread = threading.Thread(target=self._run, name="bench-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        received = self.received
        while not self._stop.is_set():
            # consume(n, t) waits for n messages or t: wait for one, then take what is already there
            batch = self.consumer.consume(1, 0.05)
            if batch:
                batch += self.consumer.consume(1000, 0)
            for msg in batch:
                if msg.error():
                    continue
                received[prediction_event_id(msg.value())] = (time.time(), msg.timestamp()[1])

    def wait_for(self, event_ids: list[str], timeout_s: float) -> int:
        """How many of `event_ids` were still not received after waiting up to `timeout_s`.

        Each check looks only at the ids still missing: a check over all of 100k ids held the GIL
        for ~60 ms every 0.1 s, delaying the watcher thread's receive stamps it is waiting for."""
        deadline = time.monotonic() + timeout_s
        received = self.received
        missing = list(event_ids)
        while True:
            missing = [e for e in missing if e not in received]
            if not missing or time.monotonic() >= deadline:
                return len(missing)
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


@dataclass
class EndToEndFigure:
    label: str
    offered_per_s: float | None
    events: int
    achieved_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    create_p50_ms: float
    create_p99_ms: float
    lag_trend: str
    missing: int
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU cores used during the run


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU cores used by some processes between start() and stop() (processes that are gone are left out)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._started: dict[str, float] = {}
        self._wall = 0.0

    def _read(self) -> dict[str, float]:
        seconds = {}
        for name, pid in self.pids.items():
            try:
                seconds[name] = process_cpu_seconds(pid)
            except (OSError, IndexError, ValueError):
                pass
        return seconds

    def start(self) -> None:
        self._started, self._wall = self._read(), time.monotonic()

    def stop(self) -> dict[str, float]:
        ended, wall = self._read(), max(time.monotonic() - self._wall, 1e-9)
        return {name: (ended[name] - self._started[name]) / wall for name in ended if name in self._started}


def _produce_paced(producer, topic: str, messages: list[tuple[bytes, bytes, str]], rate: float | None,
                   sent_at: dict[str, float], on_tick=None) -> float:
    """Produce pre-encoded (key, value, event id) at `rate`/s (None: as fast as possible); returns seconds."""
    started = time.perf_counter()
    next_tick = started + 1.0
    for i, (key, value, event_id) in enumerate(messages):
        if rate:
            delay = started + i / rate - time.perf_counter()
            if delay > 0.0005:
                time.sleep(delay)
        while True:
            try:
                sent_at[event_id] = time.time()
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 500 == 0:
            producer.poll(0)
        if on_tick and time.perf_counter() >= next_tick:
            on_tick(i + 1)
            next_tick += 1.0
    producer.flush(60)
    return time.perf_counter() - started


def end_to_end_run(settings: Settings, producer, watcher: PredictionWatcher, messages, rate: float | None,
                   label: str, meter: CpuMeter | None = None) -> EndToEndFigure:
    topic = settings.topic(PAYMENTS.event.topic)
    sent_at: dict[str, float] = {}
    ids = [event_id for _, _, event_id in messages]
    lags: list[int] = []
    # produced ids not received at the last sample, and how many ids were produced then: a sample
    # costs the lag plus one second's ids. (Counting all produced ids each second stalled the
    # paced producer 50-100 ms a second at 5k/s, 80k ids in: bursts of 500 events, the p99 spikes.)
    unseen: list[str] = []
    sampled = 0

    def sample_lag(produced: int) -> None:
        nonlocal unseen, sampled
        received = watcher.received
        unseen = [e for e in unseen if e not in received]
        unseen += [e for e in ids[sampled:produced] if e not in received]
        sampled = produced
        lags.append(len(unseen))

    if meter:
        meter.start()
    seconds = _produce_paced(producer, topic, messages, rate, sent_at, on_tick=sample_lag if rate else None)
    missing = watcher.wait_for(ids, timeout_s=max(60.0, 3 * seconds))
    cpu = meter.stop() if meter else {}
    got = [(watcher.received[e], sent_at[e]) for e in ids if e in watcher.received]
    latency = [(recv - sent) * 1e3 for (recv, _), sent in got]
    create = [created - sent * 1e3 for (_, created), sent in got]
    p50, p99, p999 = percentiles(latency, (50, 99, 99.9))
    c50, c99 = percentiles(create)
    if rate:
        first = min(recv for (recv, _), _ in got) if got else 0
        last = max(recv for (recv, _), _ in got) if got else 1
        achieved = len(got) / max(last - first, 1e-9)
        half = len(lags) // 2
        trend = ("n/a" if len(lags) < 2 else
                 f"{statistics.mean(lags[:half] or lags):.0f} -> {statistics.mean(lags[half:]):.0f}")
    else:  # backlog: drain rate between the first and the last prediction
        times = sorted(recv for (recv, _), _ in got)
        achieved = (len(times) - 1) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else float("nan")
        trend = f"produced in {seconds:.1f} s"
    return EndToEndFigure(label, rate, len(messages), achieved, p50, p99, p999, c50, c99, trend, missing, cpu)


def _encoded_stream(codec: AvroCodec, events: list[dict], tag: str) -> list[tuple[bytes, bytes, str]]:
    encode = codec.encoder("event")
    out = []
    for event in events:
        event = dict(event, event_id=f"{tag}-{event['event_id']}")
        out.append((event["entity_id"].encode(), encode(event), event["event_id"]))
    return out


def _scorer_process(settings: Settings, services: str = "scorer") -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "STREAMSCORE_DATA_DIR": str(settings.data_dir.resolve() / "e2e"),
        "STREAMSCORE_TOPIC_PREFIX": settings.topic_prefix,
        "STREAMSCORE_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "STREAMSCORE_MODEL_DIR": str(settings.registry_dir.resolve()),
        "STREAMSCORE_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "STREAMSCORE_KAFKA_PORT": str(settings.kafka_port),
        "STREAMSCORE_LOG_LEVEL": "WARNING",
    })
    if settings.kafka_bootstrap_servers:
        env["KAFKA_BOOTSTRAP_SERVERS"] = settings.kafka_bootstrap_servers
    code = "from streamscore.services.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "run", *services.split()], env=env)


def end_to_end(settings: Settings, codec: AvroCodec, options: BenchOptions, services: str = "scorer",
               progress=print, broker_pid: int | None = None) -> list[EndToEndFigure]:
    from streamscore.kafka.io import make_producer

    per_rate = [int(rate * options.seconds_per_rate) for rate in options.rates]
    # warm-up, untimed: the scorer's assignment and state restore, and a freshly started broker JVM's JIT
    warmup_events = 500 + int(max(options.rates) * options.warmup_s)
    total = warmup_events + sum(per_rate) + options.backlog_events
    events = [e for e, _ in generator_ending_now(PAYMENTS, options.seed + 1, 20_000, total).events(total)]
    tag = f"{services.replace(' ', '+')}-{int(time.time())}"
    stream = _encoded_stream(codec, events, tag)
    producer = make_producer(settings)  # the event source batches like any producer (linger.ms 5)
    watcher = PredictionWatcher(settings)
    process = _scorer_process(settings, services)
    pids = {"scorer": process.pid, "bench": os.getpid()}
    if broker_pid:
        pids["broker"] = broker_pid
    meter = CpuMeter(pids)
    figures = []
    try:
        sent: dict[str, float] = {}
        _produce_paced(producer, settings.topic(PAYMENTS.event.topic), stream[:500], None, sent)
        missing = watcher.wait_for([e for _, _, e in stream[:500]], timeout_s=120)
        if missing:
            raise RuntimeError(f"the scorer subprocess did not score the warm-up events ({missing} missing)")
        progress(f"  e2e [{services}]: warm-up, {warmup_events - 500:,} events at {max(options.rates):,.0f}/s (untimed)")
        _produce_paced(producer, settings.topic(PAYMENTS.event.topic), stream[500:warmup_events], max(options.rates),
                       sent)
        watcher.wait_for([e for _, _, e in stream[500:warmup_events]], timeout_s=120)
        position = warmup_events
        for rate, n in zip(options.rates, per_rate):
            progress(f"  e2e [{services}]: offered {rate:,.0f}/s for {options.seconds_per_rate:g} s")
            figures.append(end_to_end_run(settings, producer, watcher, stream[position:position + n], rate,
                                          f"{services}: offered {rate:,.0f}/s", meter))
            position += n
        progress(f"  e2e [{services}]: backlog of {options.backlog_events:,} as fast as possible")
        figures.append(end_to_end_run(settings, producer, watcher, stream[position:], None,
                                      f"{services}: backlog, max drain", meter))
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        watcher.close()
    return figures


# --- 4. logger ---------------------------------------------------------------------------------

@dataclass
class LoggerFigure:
    store: str
    path: str
    rows: int
    rows_per_s: float
    rows_per_cpu_s: float = float("nan")


def _per_message_row(spec: FeatureSpec, codec: AvroCodec, value: bytes) -> list:
    """The baseline's row of one Prediction message: the generic decoders, a dict per row."""
    prediction = codec.decode(value, "prediction")
    event = codec.decode(prediction["event"], "event")
    row = {**event, **{k: v for k, v in prediction.items() if k not in ("event", "features")},
           "features": dict(zip(spec.feature_names, prediction["features"]))}
    return [row[name] for name in inserted_columns(spec)]


def logger_bench(settings: Settings, codec: AvroCodec, encoded: list[bytes], n_rows: int,
                 label: str) -> list[LoggerFigure]:
    """Rows/s of Prediction messages into `predictions`, in logger_batch_rows inserts, each path doing the
    logger's whole per-message work (everything but Kafka consume and commit):

    - 'batch': what the logger runs, LoggerService.handle_batch per consumed batch, then start_write: one
      Native block per flush (PredictionBlockWriter), inserted by the writer thread while the next batch
      is read (timed until the last insert finished);
    - 'per message' (the baseline): the generic decoders per message (Prediction, then its event) -> a row
      -> clickhouse-connect's Native encoding of the rows."""
    from confluent_kafka import Message

    from streamscore.clickhouse.store import open_store
    from streamscore.clickhouse.tables import ensure_spec_tables
    from streamscore.services.logger.service import LoggerService

    store = open_store(settings)
    store.migrate()
    ensure_spec_tables(store, PAYMENTS)
    store.command("TRUNCATE TABLE IF EXISTS predictions")
    topic = settings.topic(TOPIC_PREDICTIONS)
    service = LoggerService(settings, store=store, codec=codec, spec=PAYMENTS)
    columns = inserted_columns(PAYMENTS)
    batch_rows = settings.logger_batch_rows
    figures = []
    for path in ("per message", "batch"):
        offset = 0 if path == "batch" else n_rows  # distinct offsets: distinct dedup tokens
        written = 0
        seconds = cpu_seconds = 0.0
        while written < n_rows:
            take = min(batch_rows, n_rows - written)
            # real confluent-kafka Message objects, as consume() returns them (their accessors are C calls)
            messages = [Message(topic=topic, partition=0, offset=offset + written + i,
                                value=encoded[(written + i) % len(encoded)]) for i in range(take)]
            started, cpu_started = time.perf_counter(), time.process_time()
            if path == "batch":
                service.handle_batch(messages)
                service.start_write()  # inserts while the next batch is read (nothing to commit here)
                if written + take >= n_rows:
                    service.finish_write()
            else:
                rows = [_per_message_row(PAYMENTS, codec, msg.value()) for msg in messages]
                store.insert("predictions", rows, columns)
            seconds += time.perf_counter() - started
            cpu_seconds += time.process_time() - cpu_started
            written += take
        figures.append(LoggerFigure(label, path, written, written / seconds, written / cpu_seconds))
    service.close()
    store.close()
    return figures


# --- 5. memory -----------------------------------------------------------------------------------

def _memory_events(n_entities: int, events_per_entity: int):
    """Chunks of payments events: entity i gets events_per_entity events a few hours apart, interleaved."""
    rng = np.random.default_rng(0)
    start_ms = 1_700_000_000_000
    categories = ("grocery", "fuel", "restaurants", "travel", "electronics", "online_services")
    chunk = 50_000
    for round_ in range(events_per_entity):
        for lo in range(0, n_entities, chunk):
            ids = range(lo, min(lo + chunk, n_entities))
            amounts = np.round(rng.lognormal(3.5, 0.6, len(ids)), 2).tolist()
            codes = rng.integers(0, len(categories), len(ids)).tolist()
            yield [{"event_id": f"m{round_}-{i}", "entity_id": f"card-{i:07d}",
                    "event_time": start_ms + round_ * 3 * 3_600_000 + i, "amount": amounts[k],
                    "currency": "EUR", "merchant_category": categories[codes[k]], "channel": "pos",
                    "country": "DE", "device_id": None} for k, i in enumerate(ids)]


def memory_child(n_entities: int, events_per_entity: int) -> dict:
    """Runs in a fresh process: RSS growth from building `n_entities` states (one partition) and encoding each
    once (as a changelog write does)."""
    from streamscore.avro.scanner import RecordReader
    from streamscore.spec.engine import FeatureEngine

    codec = AvroCodec(SchemaCatalog.for_spec(PAYMENTS))
    encode = codec.encoder("event")
    reader = RecordReader(codec, "event")
    engine = FeatureEngine(PAYMENTS)
    state = engine.new_state()
    gc.collect()
    before = rss_bytes()
    offset = 0
    for batch in _memory_events(n_entities, events_per_entity):
        offsets = np.arange(offset, offset + len(batch))
        scanned = reader.read_batch([encode(e) for e in batch])
        engine.compute(state, engine.inputs(scanned, np.arange(len(batch)), offsets))
        offset += len(batch)
        del batch
    serialized = [len(value) for _, value in state.encode(list(state.slot_of.values()))]
    entities = len(state)
    gc.collect()
    after = rss_bytes()
    return {"entities": entities, "events_per_entity": events_per_entity, "rss_before": before,
            "rss_after": after, "bytes_per_entity": (after - before) / max(entities, 1),
            "serialized_bytes_per_entity": statistics.mean(serialized)}


def memory_bench(n_entities: int, events_per_entity: int) -> dict:
    code = ("import json, sys; from streamscore.services.tools.bench import memory_child; "
            "print(json.dumps(memory_child(int(sys.argv[1]), int(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, str(n_entities), str(events_per_entity)],
                         check=True, capture_output=True, text=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the whole run ----------------------------------------------------------------------------------

@dataclass
class BenchReport:
    machine: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    in_process: list[InProcessFigure] = field(default_factory=list)
    naive: InProcessFigure | None = None
    end_to_end: list[EndToEndFigure] = field(default_factory=list)
    logger: list[LoggerFigure] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    rollout: list[dict] = field(default_factory=list)  # scorer throughput with shadows / a canary vs none


def machine_description() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpus": os.cpu_count(), "cpu": cpu, "ram_gb": ram / 2**30, "load_1m": load,
            "python": sys.version.split()[0]}


def _median_figure(figures: list[InProcessFigure]) -> InProcessFigure:
    ordered = sorted(figures, key=lambda f: f.events_per_s)
    return ordered[len(ordered) // 2]


def run_bench(base: Settings, options: BenchOptions, progress=print,
              start_kafka: Callable[[], None] | None = None) -> BenchReport:
    """All chosen sections, in-process ones first. `start_kafka` (starting a local broker, say) is called
    only once Kafka is needed: a freshly started broker JVM compiles for a while at up to a core, which
    must not overlap the in-process figures."""
    settings = bench_settings(base)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    report = BenchReport(machine=machine_description())
    codec = AvroCodec(SchemaCatalog.for_spec(PAYMENTS), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    history = 30_000 if options.quick else 60_000
    progress(f"training the bench model (200 trees) on {history:,} simulated events ...")
    model, train_seconds = train_bench_model(settings, options.seed, history)
    report.model = {"version": model.version, "trees": model.booster.num_trees(), "train_seconds": train_seconds}

    n_stream = 20_000 if options.quick else 40_000
    events = scoring_stream(options.seed + 2, n_stream, 5_000)
    now_ms = max(e["event_time"] for e in events) + 1
    encode = codec.encoder("event")
    raw = [encode(e) for e in events]
    half = n_stream // 2
    warm, timed = raw[:half], raw[half:]
    max_seconds = 3.0 if options.quick else 6.0
    encoded_predictions: list[bytes] = []

    if "scorer" in options.sections:
        for batch_size in options.batch_sizes:
            progress(f"scorer in process: batch {batch_size} ...")
            runs = [scorer_in_process(settings, codec, model, warm, timed, now_ms, batch_size, max_seconds)
                    for _ in range(options.repeats)]
            report.in_process.append(_median_figure(runs))
        progress("naive baseline (JSON, per message) ...")
        json_timed = [json.dumps(e).encode() for e in events[half:]]
        runs = [naive_baseline(settings, model, events[:half], json_timed, now_ms, max_seconds)
                for _ in range(options.repeats)]
        report.naive = _median_figure(runs)

    if "rollout" in options.sections:
        progress(f"scorer in process with shadows / a canary (batch {ROLLOUT_BATCH}) ...")
        report.rollout = rollout_cost(settings, codec, model, warm, timed, now_ms, max(options.repeats, 3),
                                      max_seconds)

    if "logger" in options.sections or "e2e" in options.sections:
        from streamscore.services.tools.demo import reset_namespace
        from streamscore.clickhouse.store import open_store
        from streamscore.kafka.topics import ensure_topics

        if start_kafka is not None:
            start_kafka()
        progress("resetting the bench namespace (topics bench.*, database streamscore_bench) ...")
        store = open_store(settings)
        reset_namespace(settings, store, keep_models=True)  # the model trained above stays
        store.migrate()
        store.close()
        if "e2e" in options.sections:
            ensure_topics(settings)

    if "logger" in options.sections:
        pipeline = _warm_pipeline(settings, codec, model, warm, now_ms)
        encoded_predictions = pipeline.score([InputMessage(v, 0, half + i) for i, v in enumerate(timed)],
                                             now_ms=now_ms).encoded
        progress("logger: embedded chDB ...")
        embedded = settings.model_copy(update={"clickhouse_url": None})
        report.logger += logger_bench(embedded, codec, encoded_predictions, options.logger_rows, "embedded chDB")
        if settings.clickhouse_url:
            progress("logger: ClickHouse server ...")
            report.logger += logger_bench(settings, codec, encoded_predictions, options.logger_rows,
                                          "server (CLICKHOUSE_URL)")

    if "e2e" in options.sections:
        broker_pid = None
        if base.uses_local_broker:  # the local broker runs in the base data dir, not the bench's
            from streamscore.dev.kafka_broker import LocalKafkaBroker

            broker_pid = LocalKafkaBroker(base).status().pid
        report.end_to_end += end_to_end(settings, codec, options, "scorer", progress, broker_pid)

    if "memory" in options.sections:
        for n in options.memory_entities:
            progress(f"memory: {n:,} entities x {options.events_per_entity} events in a fresh process ...")
            report.memory.append(memory_bench(n, options.events_per_entity))
    return report


# --- printing -------------------------------------------------------------------------------------------

def print_report(report: BenchReport, options: BenchOptions, console) -> None:
    from rich.table import Table

    m = report.machine
    console.print(f"[bold]machine[/bold]: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gb']:.1f} GiB RAM, "
                  f"load {m['load_1m']:.2f} at start, Python {m['python']}; shared with the broker and "
                  "the other processes: figures are medians of "
                  f"{options.repeats} runs, compare ratios within this run", highlight=False)
    console.print(f"model: v{report.model['version']}, {report.model['trees']} trees "
                  f"(trained in {report.model['train_seconds']:.1f} s)", highlight=False)
    naive = report.naive
    if report.in_process:
        table = Table(title="1. scorer in process: Avro bytes -> decode, validate, features, predict, "
                            "Prediction bytes (1 thread)", title_justify="left")
        for column in ("batch", "events/s", "x naive", "events/CPU-s", "x naive", "CPU us/event", "batch p50 ms",
                       "batch p99 ms", "target 50k/s"):
            table.add_column(column, justify="right")
        for f in report.in_process:
            ratio = f"{f.events_per_s / naive.events_per_s:.1f}x" if naive else "-"
            cpu_ratio = f"{f.events_per_cpu_s / naive.events_per_cpu_s:.1f}x" if naive else "-"
            table.add_row(str(f.batch_size), f"{f.events_per_s:,.0f}", ratio, f"{f.events_per_cpu_s:,.0f}", cpu_ratio,
                          f"{1e6 / f.events_per_cpu_s:.1f}", f"{f.batch_p50_ms:.2f}", f"{f.batch_p99_ms:.2f}",
                          "ok" if f.events_per_s >= 50_000 else ("CPU ok" if f.events_per_cpu_s >= 50_000 else "miss"))
        if naive:
            table.add_row("naive", f"{naive.events_per_s:,.0f}", "1.0x", f"{naive.events_per_cpu_s:,.0f}", "1.0x",
                          f"{1e6 / naive.events_per_cpu_s:.1f}", f"{naive.batch_p50_ms:.3f}",
                          f"{naive.batch_p99_ms:.3f}", "baseline")
        console.print(table)
        console.print("naive = per message json.loads -> validate -> features -> predict 1 row -> json.dumps "
                      "(no batching, no Avro); batch latency = one ScoringPipeline.score call",
                      highlight=False)
    if report.rollout:
        table = Table(title=f"1b. staged rollouts: scorer in process at batch {ROLLOUT_BATCH} with versions scored "
                            "besides production (same run, interleaved batch by batch)", title_justify="left")
        for column in ("serving", "events/s", "x production only", "events/CPU-s", "x production only",
                       "batch p50 ms", "per-repeat ratios"):
            table.add_column(column, justify="right")
        for r in report.rollout:
            table.add_row(r["configuration"], f"{r['events_per_s']:,.0f}", f"{r['ratio']:.2f}x",
                          f"{r['events_per_cpu_s']:,.0f}", f"{r['cpu_ratio']:.2f}x", f"{r['batch_p50_ms']:.2f}",
                          " ".join(f"{x:.2f}" for x in r["ratios"]))
        console.print(table)
        console.print("a shadow = one more 200-tree prediction per event from the same feature matrix plus its "
                      "ShadowScores record (one per batch and version); the canary is scored on every event too "
                      "(its unserved scores and production's on its share are shadow rows)", highlight=False)
    if report.end_to_end:
        table = Table(title="2. end to end through the broker: event produced -> prediction received "
                            "(scorer in its own process)", title_justify="left")
        for column in ("run", "events", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "CreateTime p50/p99 ms",
                       "lag first->second half", "missing", "CPU broker/scorer/bench", "target"):
            table.add_column(column, justify="right")
        for f in report.end_to_end:
            target = "-"
            if f.offered_per_s == 5_000:
                target = "ok" if f.p99_ms <= 50 else "p99 > 50"
            cpu = " / ".join(f"{f.cpu[name]:.0%}" if name in f.cpu else "-" for name in ("broker", "scorer", "bench"))
            table.add_row(f.label, f"{f.events:,}", f"{f.achieved_per_s:,.0f}", f"{f.p50_ms:.1f}", f"{f.p99_ms:.1f}",
                          f"{f.p999_ms:.1f}", f"{f.create_p50_ms:.1f} / {f.create_p99_ms:.1f}", f.lag_trend,
                          str(f.missing), cpu, target)
        console.print(table)
        console.print("latency = bench consumer receive time - bench producer send time (same host clock); "
                      "CreateTime = the prediction message's timestamp (scorer handed it to its producer) - send "
                      "time; lag = events sent but not yet predicted, sampled each second (mean of the first vs "
                      "the second half: growing lag = rate not sustained); CPU = cores used by the broker, the "
                      f"scorer process and this bench process during the run, after {options.warmup_s:g} s of "
                      "untimed warm-up traffic", highlight=False)
    if report.logger:
        table = Table(title="3. logger: Prediction messages -> rows in ClickHouse `predictions` (decode + insert)",
                      title_justify="left")
        for column in ("store", "path", "rows", "rows/s", "x per message", "rows/CPU-s", "target 200k/s"):
            table.add_column(column, justify="right")
        baselines = {f.store: f.rows_per_s for f in report.logger if f.path == "per message"}
        for f in report.logger:
            base = baselines.get(f.store)
            table.add_row(f.store, f.path, f"{f.rows:,}", f"{f.rows_per_s:,.0f}",
                          f"{f.rows_per_s / base:.1f}x" if base else "-", f"{f.rows_per_cpu_s:,.0f}",
                          "ok" if f.rows_per_s >= 200_000 else "miss")
        console.print(table)
        console.print("batch = the logger's path: LoggerService.handle_batch, then one Native block per "
                      "flush (PredictionBlockWriter, a numba loop), inserted by the writer thread while the next "
                      "batch is read; per message = the generic decoders per message (Prediction, then its event) "
                      "and clickhouse-connect's Native encoding of the rows (the baseline). rows/CPU-s counts this "
                      "process's CPU, which includes the embedded ClickHouse engine.", highlight=False)
    if report.memory:
        table = Table(title="4. memory: RSS growth of a fresh process building entity states (the engine's arena)",
                      title_justify="left")
        for column in ("entities", "events/entity", "RSS delta MiB", "bytes/entity", "marginal bytes/entity",
                       "serialized bytes/entity"):
            table.add_column(column, justify="right")
        previous: tuple[int, int] | None = None
        for r in report.memory:
            delta = r["rss_after"] - r["rss_before"]
            marginal = "-"
            if previous is not None and r["entities"] > previous[0]:
                marginal = f"{(delta - previous[1]) / (r['entities'] - previous[0]):,.0f}"
            previous = (r["entities"], delta)
            table.add_row(f"{r['entities']:,}", str(r["events_per_entity"]), f"{delta / 2**20:,.0f}",
                          f"{r['bytes_per_entity']:,.0f}", marginal, f"{r['serialized_bytes_per_entity']:,.0f}")
        console.print(table)
        console.print("linear = the marginal bytes/entity (slope between rows) is what each further entity costs; "
                      "bytes/entity of the first row also carries fixed costs (interpreter arenas, event chunks). "
                      "State grows with retained events per entity (14 days of history at most)", highlight=False)


if __name__ == "__main__":  # python -m streamscore.services.tools.bench: same as `streamscore bench`
    from streamscore.services.cli import main

    sys.argv[1:1] = ["bench"]
    main()
