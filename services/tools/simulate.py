"""`streamscore simulate`: produce simulated events (and their delayed labels) to Kafka.

Events go out at a fixed offered rate; each label is produced `label_delay_s`
of wall time after its event, the way ground truth (a chargeback, a review)
arrives after the decision. Optional poison messages exercise the dead-letter path.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer, produce
from streamscore.settings import Settings
from streamscore.spec.model import FeatureSpec


@dataclass
class SimulationReport:
    events: int = 0
    labels: int = 0
    poison: int = 0
    seconds: float = 0.0
    first_event_id: str | None = None
    event_ids: list[str] | None = None


def produce_simulation(settings: Settings, spec: FeatureSpec, codec: AvroCodec, simulator, n_events: int,
                       rate: float | None = None, label_delay_s: float = 1.0, poison_every: int = 0,
                       keep_ids: bool = False, progress: Callable[[int], None] | None = None,
                       stop: threading.Event | None = None, producer=None) -> SimulationReport:
    """Produce `n_events` from `simulator` (a streamscore.dev.generators generator of `spec`'s records) at
    `rate` events/s (None: as fast as possible), each label `label_delay_s` of wall time after its event;
    fewer when `stop` is set meanwhile (fault drills stop the stream when their faults are done).
    `producer`: reuse this one (its connection and idempotent producer id are ready) instead of a new one."""
    producer = producer or make_producer(settings)
    tracker = DeliveryTracker()
    encode_event = codec.encoder("event", settings.topic(spec.event.topic))
    encode_label = codec.encoder("label", settings.topic(spec.label.topic))
    events_topic, labels_topic = settings.topic(spec.event.topic), settings.topic(spec.label.topic)
    entity_field = spec.event.entity_field
    label_entity = spec.label.entity_field
    pending_labels: deque[tuple[float, bytes, dict]] = deque()
    poison = list(simulator.bad_events(encode_event)) if poison_every else []
    report = SimulationReport(event_ids=[] if keep_ids else None)
    started = time.monotonic()

    def send_due_labels(now: float, everything: bool = False) -> None:
        while pending_labels and (everything or pending_labels[0][0] <= now):
            _, key, label = pending_labels.popleft()
            produce(producer, labels_topic, encode_label(label), key, on_delivery=tracker)
            report.labels += 1

    for i, (event, label) in enumerate(simulator.events(n_events)):
        if stop is not None and stop.is_set():
            break
        if rate:
            # Pace against the schedule, not the previous send: no drift over long runs.
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        key = event[entity_field].encode()
        produce(producer, events_topic, encode_event(event), key, on_delivery=tracker)
        report.events += 1
        if keep_ids:
            report.event_ids.append(event[spec.event.id_field])
        now = time.monotonic()
        if label is not None:
            pending_labels.append((now + label_delay_s, label[label_entity].encode() if label_entity else key, label))
        send_due_labels(now)
        if poison_every and (i + 1) % poison_every == 0:
            bad = poison[(report.poison) % len(poison)]
            produce(producer, events_topic, bad.value, b"poison")
            report.poison += 1
        if i % 1000 == 0:
            producer.poll(0)
            if progress:
                progress(i)
    send_due_labels(time.monotonic(), everything=True)
    flush_or_raise(producer, tracker, timeout_s=120)
    if progress:
        progress(n_events)
    report.seconds = time.monotonic() - started
    return report


def _simulation_main(settings: Settings, spec_path, seed: int, entities: int, total: int, connection,
                     progress) -> None:
    """The simulation process: one generator for every request (history, then live continue the same stream)."""
    import signal

    from streamscore.avro.codec import SchemaCatalog
    from streamscore.dev.generators import generator_ending_now
    from streamscore.kafka.config import schema_registry_config
    from streamscore.spec import load_spec

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops it
    spec = load_spec(spec_path)
    codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    simulator = generator_ending_now(spec, seed, entities, total)
    # One producer for every request: a new one per phase held the live phase's first events ~0.5 s in its
    # queue (connecting, acquiring its idempotent producer id), which the demo counted as scoring latency.
    producer = make_producer(settings)
    producer.list_topics(timeout=10)
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        n, rate, poison_every = request
        try:
            report = produce_simulation(settings, spec, codec, simulator, n, rate=rate, poison_every=poison_every,
                                        progress=lambda i: setattr(progress, "value", i), producer=producer)
            connection.send(("ok", report))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            connection.send(("error", f"{type(exc).__name__}: {exc}"))


class SimulationProcess:
    """`produce_simulation` in a spawned process of its own (the demo's producer: events come from outside the
    services' processes, as in production, and generating and encoding them never holds their GIL). One
    generator serves every `produce` call, so the live phase continues the history's stream."""

    def __init__(self, settings: Settings, spec: FeatureSpec, seed: int, entities: int, total: int):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._progress = context.Value("q", 0, lock=False)
        self.process = context.Process(target=_simulation_main, name="streamscore-simulation", daemon=True,
                                       args=(settings, spec.path, seed, entities, total, child, self._progress))
        self.process.start()
        child.close()

    def produce(self, n_events: int, rate: float | None = None, poison_every: int = 0,
                progress: Callable[[int], None] | None = None) -> SimulationReport:
        self._progress.value = 0
        self._connection.send((n_events, rate, poison_every))
        while not self._connection.poll(0.1):
            if not self.process.is_alive():
                raise RuntimeError(f"the simulation process died (exit code {self.process.exitcode})")
            if progress:
                progress(self._progress.value)
        kind, value = self._connection.recv()
        if kind != "ok":
            raise RuntimeError(f"simulation failed: {value}")
        if progress:
            progress(n_events)
        return value

    def close(self) -> None:
        try:
            self._connection.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._connection.close()

    def __enter__(self) -> "SimulationProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
