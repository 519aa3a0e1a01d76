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
                       stop: threading.Event | None = None) -> SimulationReport:
    """Produce `n_events` from `simulator` (a streamscore.dev.generators generator of `spec`'s records) at
    `rate` events/s (None: as fast as possible), each label `label_delay_s` of wall time after its event;
    fewer when `stop` is set meanwhile (fault drills stop the stream when their faults are done)."""
    producer = make_producer(settings)
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
