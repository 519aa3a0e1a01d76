"""Micro-benchmark of the Avro codec: µs per message for Event and Prediction.

    .venv/bin/python bench/bench_codec.py
"""
from __future__ import annotations

import math
import timeit

from streamscore.avro.codec import AvroCodec, SchemaCatalog

EVENT = {
    "event_id": "0b7e6f7c-5d1c-4f7e-9a51-0c2f1d7d9e11",
    "entity_id": "card-000123",
    "event_time": 1_700_000_000_123,
    "amount": 42.17,
    "currency": "EUR",
    "merchant_category": "5411",
    "channel": "pos",
    "country": "DE",
    "device_id": None,
}
FEATURES = [
    "amount", "log_amount", "hour_of_day", "count_1h", "sum_1h", "count_24h", "sum_24h", "mean_7d", "std_7d",
    "secs_since_prev", "distinct_mcc_24h", "amount_to_mean_7d", "amount_zscore_7d", "currency_code", "mcc_code",
    "channel_code", "country_code",
]
PREDICTION = {
    "event_id": EVENT["event_id"],
    "entity_id": EVENT["entity_id"],
    "event_time": EVENT["event_time"],
    "scored_at": 1_700_000_000_200,
    "model_name": "fraud",
    "model_version": 3,
    "score": 0.0123,
    "feature_set": "3f9a0c1d2e4b",
    "features": {name: (math.nan if i % 5 == 4 else float(i)) for i, name in enumerate(FEATURES)},
    "event": EVENT,
    "event_partition": 2,
    "event_offset": 1_234_567,
}


def per_message_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main(number: int = 20_000) -> None:
    catalog = SchemaCatalog()
    for label, codec in (("single-object", AvroCodec(catalog)), ("confluent(mock)", AvroCodec(catalog, "mock://bench"))):
        for name, record in (("event", EVENT), ("prediction", PREDICTION)):
            encode, decode = codec.encoder(name), codec.decoder(name)
            data = encode(record)
            enc = per_message_us(lambda: encode(record), number)
            dec = per_message_us(lambda: decode(data), number)
            batch = [data] * 500
            many = per_message_us(lambda: codec.decode_many(batch, name), number // 500) / 500
            print(f"{label:16s} {name:10s} {len(data):4d} B  encode {enc:5.2f} us  decode {dec:5.2f} us  decode_many {many:5.2f} us/msg")


if __name__ == "__main__":
    main()
