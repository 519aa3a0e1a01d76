"""`streamscore simulate`: produce simulated events (and their delayed labels) to Kafka.

Events go out at a fixed offered rate; each label is produced `label_delay_s`
of wall time after its event, the way ground truth (a chargeback, a review)
arrives after the decision. Optional poison messages exercise the dead-letter path.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer
from streamscore.settings import TOPIC_EVENTS, TOPIC_LABELS, Settings
from streamscore.dev.simulator import DriftSpec, Simulator


def simulator_ending_now(seed: int, n_entities: int, n_events: int, drift: DriftSpec | None = None,
                         now_ms: int | None = None) -> Simulator:
    """A simulator whose first `n_events` all lie at least a minute before now, so
    none is rejected for being in the future. The stream depends on the time of
    day, so a dry run (~10 us per event) measures the real end and the start is
    moved back by whole days, which shifts the same stream without changing it."""
    day_ms = 86_400_000
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    latest_allowed = now_ms - 60_000
    start_ms = latest_allowed - Simulator(seed, n_entities=n_entities).expected_span_ms(n_events)
    probe = Simulator(seed, n_entities=n_entities, start_ms=start_ms, drift=drift)
    last = max(event["event_time"] for event, _ in probe.events(n_events))
    if last > latest_allowed:
        start_ms -= -(-(last - latest_allowed) // day_ms) * day_ms
    return Simulator(seed, n_entities=n_entities, start_ms=start_ms, drift=drift)


@dataclass
class SimulationReport:
    events: int = 0
    labels: int = 0
    poison: int = 0
    seconds: float = 0.0
    first_event_id: str | None = None
    event_ids: list[str] | None = None


def produce_simulation(settings: Settings, codec: AvroCodec, simulator: Simulator, n_events: int,
                       rate: float | None = None, label_delay_s: float = 1.0, poison_every: int = 0,
                       keep_ids: bool = False, progress: Callable[[int], None] | None = None) -> SimulationReport:
    """Produce `n_events` from `simulator` at `rate` events/s (None: as fast as possible)."""
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    encode_event = codec.encoder("event")
    encode_label = codec.encoder("label")
    events_topic, labels_topic = settings.topic(TOPIC_EVENTS), settings.topic(TOPIC_LABELS)
    pending_labels: deque[tuple[float, dict]] = deque()
    poison = list(simulator.bad_events()) if poison_every else []
    report = SimulationReport(event_ids=[] if keep_ids else None)
    started = time.monotonic()

    def send_due_labels(now: float, everything: bool = False) -> None:
        while pending_labels and (everything or pending_labels[0][0] <= now):
            _, label = pending_labels.popleft()
            producer.produce(labels_topic, key=label["entity_id"].encode(), value=encode_label(label),
                             on_delivery=tracker)
            report.labels += 1

    for i, (event, label) in enumerate(simulator.events(n_events)):
        if rate:
            # Pace against the schedule, not the previous send: no drift over long runs.
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.produce(events_topic, key=event["entity_id"].encode(), value=encode_event(event),
                         on_delivery=tracker)
        report.events += 1
        if keep_ids:
            report.event_ids.append(event["event_id"])
        now = time.monotonic()
        pending_labels.append((now + label_delay_s, label))
        send_due_labels(now)
        if poison_every and (i + 1) % poison_every == 0:
            bad = poison[(report.poison) % len(poison)]
            producer.produce(events_topic, key=b"poison", value=bad.value)
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
