"""`streamscore bench --recovery ROUNDS`: kill -9 of a scorer mid-stream, restarted at once (what a supervisor
does); how long until it scores again.

What it runs: `streamscore run scorer` as a subprocess in a namespace and data dir of its own on the local
broker, fed at `rate` events/s by the simulator (no model: predictions with score NULL cost the same path).
Each round waits `settle_s`, kills the scorer with SIGKILL and starts a new one at once. Recovery = the first
prediction produced after the kill (its CreateTime, set by the new scorer's producer) minus the kill time:
the interpreter starting and importing, the group join (static membership: the dead member's place, no
rebalance), the partitions' state restored from the changelog, the first batch scored. The restore time and
the entities restored are read from the scorer's log line.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.dev.generators import generator_ending_now
from streamscore.kafka.config import reader_config, schema_registry_config
from streamscore.settings import TOPIC_PREDICTIONS, Settings
from streamscore.spec import resolve

RESTORED = re.compile(r"assigned: (\d+) entities restored in ([0-9.]+) s")


@dataclass
class RecoveryRound:
    seconds: float  # kill -> first prediction of the new scorer
    restore_s: float  # the changelog restore of its partitions (its log line)
    entities: int  # entities it restored


class NewestPrediction:
    """Reads the predictions topic from its end; `first_after(ms)`: the earliest CreateTime seen above `ms`."""

    def __init__(self, settings: Settings):
        from confluent_kafka import Consumer, TopicPartition

        topic = settings.topic(TOPIC_PREDICTIONS)
        self.consumer = Consumer(reader_config(settings, **{"group.id": "recovery-watcher", "fetch.wait.max.ms": 5}))
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, -1) for p in partitions])
        self._stamps: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stamps = [m.timestamp()[1] for m in self.consumer.consume(1000, 0.05) if not m.error()]
            with self._lock:
                self._stamps = (self._stamps + stamps)[-50_000:]

    def first_after(self, ms: float) -> int | None:
        with self._lock:
            later = [stamp for stamp in self._stamps if stamp > ms]
        return min(later) if later else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


def run_recovery(base: Settings, rounds: int = 3, rate: float = 1_000.0, entities: int = 500,
                 settle_s: float = 15.0, seed: int = 5, progress=print) -> list[RecoveryRound]:
    from streamscore.kafka.topics import ensure_topics
    from streamscore.services.tools.simulate import produce_simulation
    from streamscore.services.tools.soak import _run_all, _wait, soak_settings

    settings, spec = resolve(soak_settings(base))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings, spec=spec)
    codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    log_path = settings.data_dir / "run-scorer.log"
    total = int(rate * (settle_s + 30) * (rounds + 1))
    simulator = generator_ending_now(spec, seed, entities, total)
    stop = threading.Event()
    producer = threading.Thread(target=produce_simulation, name="recovery-producer", daemon=True,
                                args=(settings, spec, codec, simulator, total), kwargs={"rate": rate, "stop": stop})
    watcher = NewestPrediction(settings)
    process = _run_all(settings, log_path, ("scorer",))
    results: list[RecoveryRound] = []
    try:
        producer.start()
        started_ms = time.time() * 1000
        _wait(lambda: watcher.first_after(started_ms), "the scorer's first prediction", 120, process)
        for round_number in range(1, rounds + 1):
            time.sleep(settle_s)
            logged = len(RESTORED.findall(log_path.read_text(errors="replace")))
            killed_ms = time.time() * 1000
            process.kill()
            process.wait(30)
            process = _run_all(settings, log_path, ("scorer",))
            first = _wait(lambda: watcher.first_after(killed_ms), "the restarted scorer's first prediction", 120,
                          process)
            restores = RESTORED.findall(log_path.read_text(errors="replace"))[logged:]
            entities_restored, restore_s = (int(restores[0][0]), float(restores[0][1])) if restores else (0, 0.0)
            results.append(RecoveryRound((first - killed_ms) / 1000, restore_s, entities_restored))
            progress(f"round {round_number}: scoring again {results[-1].seconds:.2f} s after kill -9 "
                     f"({entities_restored} entities restored in {restore_s:.2f} s)")
    finally:
        stop.set()
        process.terminate()
        process.wait(60)
        watcher.close()
    return results
