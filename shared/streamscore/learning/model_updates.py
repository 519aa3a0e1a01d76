"""Publishing registry actions to the `model-updates` topic.

The logger turns them into rows of the ClickHouse `model_versions` log, and
other consumers (dashboards, audit) can follow deployments here. Scorers do not
need them: they poll the registry's production pointer every 0.5 s, which
works even when an update was never published.
"""
from __future__ import annotations

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer, produce
from streamscore.settings import TOPIC_MODEL_UPDATES, Settings


def publish_model_updates(settings: Settings, codec: AvroCodec, events: list[dict], timeout_s: float = 60.0) -> None:
    """Produce ModelUpdate records and wait until the broker acknowledged them."""
    if not events:
        return
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    encode = codec.encoder("model_update")
    for event in events:
        produce(producer, settings.topic(TOPIC_MODEL_UPDATES), encode(event), event["model_name"].encode(),
                on_delivery=tracker)
    flush_or_raise(producer, tracker, timeout_s=timeout_s)
