"""Prediction records as Avro bytes, assembled per batch instead of per record.

The generic encoder (`AvroCodec.encoder("prediction")`, fastavro) costs ~17 us a
record, most of it walking the 17-entry features map and re-encoding the nested
Event. This writer produces THE SAME BYTES (tests/test_prediction_encoding.py
compares them with the generic encoder) at a few us per record because:

- the features map has fixed keys in a fixed order, so a whole batch's maps are
  one numpy structured array (key bytes + little-endian double, packed) turned
  into bytes once;
- the nested `event` is the source message's own Avro body when that message was
  written with the current Event schema (the Avro encoding of a record is just its
  fields in order, so the bytes are identical); otherwise the decoded event is
  encoded with fastavro;
- fields constant within a batch (scored_at, model, feature set) are encoded once.

Field order follows schemas/prediction.avsc; a schema change must change this file
(the equality test fails first).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO

import numpy as np
from fastavro import schemaless_writer

from streamscore import features
from streamscore.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError

_DOUBLE = struct.Struct("<d")
_NULL_SCORE = b"\x00"  # union branch 0: null
_SCORE_BRANCH = b"\x02"  # union branch 1: double


_SMALL_LONGS = [bytes(((v << 1) ^ (v >> 63),)) for v in range(64)]  # 0..63 encode to one byte


def avro_long(value: int) -> bytes:
    """Zig-zag varint, the Avro binary encoding of int and long."""
    if 0 <= value < 64:
        return _SMALL_LONGS[value]
    value = (value << 1) ^ (value >> 63)
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def avro_string(value: str) -> bytes:
    data = value.encode()
    size = len(data)
    return (_SMALL_LONGS[size] if size < 64 else avro_long(size)) + data


def _features_map_dtype(names: Sequence[str]) -> tuple[np.dtype, bytes, bytes]:
    """Packed record dtype for one encoded map: count, then (key, value) pairs, then the end marker."""
    fields: list[tuple[str, str]] = []
    for i, name in enumerate(names):
        fields.append((f"k{i}", f"S{len(avro_string(name))}"))
        fields.append((f"v{i}", "<f8"))
    return np.dtype(fields), avro_long(len(names)), avro_long(0)


class PredictionWriter:
    """Encodes a batch of predictions of one model to framed Avro bytes (see module docstring)."""

    def __init__(self, codec: AvroCodec, topic: str | None = None):
        self.codec = codec
        self.header = codec.encoder("prediction", topic).header
        self.feature_set = avro_string(features.FEATURE_SET_HASH)
        self._map_dtype, self._map_start, self._map_end = _features_map_dtype(features.FEATURE_NAMES)
        self._map_keys = [avro_string(name) for name in features.FEATURE_NAMES]
        event_schema = codec.catalog.current("event")
        self._event_parsed = event_schema.parsed
        self._event_fingerprint = event_schema.fingerprint
        self._body_reusable: dict[bytes, int] = {}  # framing header -> body offset (0: not reusable)

    def _event_body_offset(self, message: bytes) -> int:
        """Where the Avro body starts if `message` was written with the current Event schema, else 0."""
        framing = SINGLE_OBJECT_HEADER_LEN if message[0] == 0xC3 else CONFLUENT_HEADER_LEN
        header = message[:framing]
        offset = self._body_reusable.get(header)
        if offset is None:
            try:
                writer = self.codec.writer_of(message)
            except DecodeError:
                writer = None
            offset = framing if writer is not None and writer.fingerprint == self._event_fingerprint else 0
            if len(self._body_reusable) < 1000:
                self._body_reusable[header] = offset
        return offset

    def _event_body(self, event: dict) -> bytes:
        buf = BytesIO()
        schemaless_writer(buf, self._event_parsed, event, strict_allow_default=True)
        return buf.getvalue()

    def encode_batch(self, events: Sequence[dict], raw_events: Sequence[bytes], matrix: np.ndarray,
                     scores: np.ndarray | None, scored_at: int, model_name: str, model_version: int,
                     partitions: Sequence[int], offsets: Sequence[int]) -> list[bytes]:
        """One framed Prediction per row; `raw_events[i]` is the message `events[i]` was decoded from."""
        n = len(events)
        if n == 0:
            return []
        maps = np.empty(n, dtype=self._map_dtype)
        for i, key in enumerate(self._map_keys):
            maps[f"k{i}"] = key
            maps[f"v{i}"] = matrix[:, i]
        map_bytes = maps.tobytes()
        width = self._map_dtype.itemsize
        middle = (avro_long(scored_at) + avro_string(model_name) + avro_long(model_version))
        map_start, map_end, feature_set, header = self._map_start, self._map_end, self.feature_set, self.header
        score_list = None if scores is None else scores.tolist()
        pack_double = _DOUBLE.pack
        out = []
        append = out.append
        for i in range(n):
            event = events[i]
            raw = raw_events[i]
            start = self._event_body_offset(raw)
            body = raw[start:] if start else self._event_body(event)
            score = _NULL_SCORE if score_list is None else _SCORE_BRANCH + pack_double(score_list[i])
            append(b"".join((
                header, avro_string(event["event_id"]), avro_string(event["entity_id"]),
                avro_long(event["event_time"]), middle, score, feature_set,
                map_start, map_bytes[i * width:(i + 1) * width], map_end,
                body, avro_long(partitions[i]), avro_long(offsets[i]),
            )))
        return out
