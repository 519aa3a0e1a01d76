"""Prediction records as Avro bytes, assembled per batch instead of per record.

The generic encoder (`AvroCodec.encoder("prediction")`, fastavro) costs ~17 us a
record, most of it walking the 17-entry features map and re-encoding the nested
Event. This writer produces THE SAME BYTES (tests/test_prediction_encoding.py
compares them with the generic encoder) at a few us per record because:

- the features map has fixed keys in a fixed order, so a record's map is a constant
  template (key bytes, zeros for the doubles) with its little-endian doubles
  scattered in: one numpy copy and one scatter for the whole batch;
- the nested `event` is the source message's own Avro body when that message was
  written with the current Event schema (the Avro encoding of a record is just its
  fields in order, so the bytes are identical); otherwise the decoded event is
  encoded with fastavro;
- fields constant within a batch (scored_at, model, feature set) are encoded once;
- everything between model_version and the event (score, feature set, the map) has the
  same width for every record of a batch, so it is one packed row of that template;
- the varints of event_time, event_partition and event_offset are encoded for the
  whole batch in one compiled loop (`avro_longs`), not one Python loop per value.

Field order follows schemas/prediction.avsc; a schema change must change this file
(the equality test fails first).
"""
from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import numpy as np
from fastavro import schemaless_writer
from numba import njit

from streamscore.legacy import features
from streamscore.avro.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError

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


@njit(cache=True, nogil=True)
def _zigzag_varints(values, out, ends):
    """avro_long of each int64 of `values`, one after the other into `out`; ends[i] = end of the i-th."""
    pos = 0
    for i in range(len(values)):
        value = values[i]
        zigzag = np.uint64((value << 1) ^ (value >> 63))  # the bits of the int64, as unsigned
        while zigzag >= 0x80:
            out[pos] = (zigzag & 0x7F) | 0x80
            pos += 1
            zigzag >>= 7
        out[pos] = zigzag
        pos += 1
        ends[i] = pos


_VECTOR_MIN = 5  # below this many values the compiled loop's fixed cost (~6 us) exceeds the per-value loop's


def avro_longs(values: Sequence[int]) -> list[bytes]:
    """[avro_long(v) for v in values] for 64-bit values, encoded in one compiled loop (avro_long's Python
    loop costs ~1.5 us for a 41-bit event time)."""
    if len(values) < _VECTOR_MIN:
        return [avro_long(value) for value in values]
    try:
        signed = np.asarray(values, dtype=np.int64)
    except OverflowError:  # outside int64: not a valid Avro long anyway, keep the scalar encoding
        return [avro_long(value) for value in values]
    if signed.ndim != 1:
        return [avro_long(value) for value in values]
    out = np.empty(10 * len(signed), dtype=np.uint8)  # a 64-bit zig-zag value needs at most 10 bytes
    ends = np.empty(len(signed), dtype=np.int64)
    _zigzag_varints(signed, out, ends)
    ends_list = ends.tolist()
    packed = out[:ends_list[-1]].tobytes()
    return [packed[start:end] for start, end in zip([0] + ends_list[:-1], ends_list)]


def _fixed_block_dtype(names: Sequence[str], feature_set: bytes, scored: bool) -> np.dtype:
    """Packed dtype of one record's fixed-width middle: the score union, feature_set, then the features map
    (count, (key, value) pairs, end marker)."""
    fields: list[tuple[str, str]] = [("branch", "u1")] + ([("score", "<f8")] if scored else [])
    fields += [("feature_set", f"S{len(feature_set)}"), ("map_start", f"S{len(avro_long(len(names)))}")]
    for i, name in enumerate(names):
        fields.append((f"k{i}", f"S{len(avro_string(name))}"))
        fields.append((f"v{i}", "<f8"))
    fields.append(("map_end", "u1"))
    return np.dtype(fields)


class PredictionWriter:
    """Encodes a batch of predictions of one model to framed Avro bytes (see module docstring)."""

    def __init__(self, codec: AvroCodec, topic: str | None = None):
        self.codec = codec
        self.header = codec.encoder("prediction", topic).header
        self.feature_set = avro_string(features.FEATURE_SET_HASH)
        self._map_start = avro_long(len(features.FEATURE_NAMES))
        self._map_keys = [avro_string(name) for name in features.FEATURE_NAMES]
        self._block_layouts = {scored: self._block_layout(scored) for scored in (True, False)}
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
        block_bytes, width = self._fixed_blocks(matrix, scores)
        middle = (avro_long(scored_at) + avro_string(model_name) + avro_long(model_version))
        header = self.header
        times = avro_longs([event["event_time"] for event in events])
        partition_bytes = avro_longs(partitions)
        offset_bytes = avro_longs(offsets)
        body_offset = self._event_body_offset
        out = []
        append = out.append
        for i in range(n):
            event = events[i]
            raw = raw_events[i]
            start = body_offset(raw)
            body = raw[start:] if start else self._event_body(event)
            append(b"".join((
                header, avro_string(event["event_id"]), avro_string(event["entity_id"]), times[i], middle,
                block_bytes[i * width:(i + 1) * width], body, partition_bytes[i], offset_bytes[i],
            )))
        return out

    def _block_layout(self, scored: bool) -> tuple[np.ndarray, np.ndarray]:
        """The fixed-width middle of a record with zeros for its doubles (as bytes), and the positions of
        those doubles' bytes: the score first if `scored`, then the features in order."""
        dtype = _fixed_block_dtype(features.FEATURE_NAMES, self.feature_set, scored)
        template = np.zeros(1, dtype=dtype)
        template["branch"] = (_SCORE_BRANCH if scored else _NULL_SCORE)[0]
        template["feature_set"] = self.feature_set
        template["map_start"] = self._map_start
        for i, key in enumerate(self._map_keys):
            template[f"k{i}"] = key
        doubles = (["score"] if scored else []) + [f"v{i}" for i in range(len(self._map_keys))]
        positions = np.concatenate([dtype.fields[name][1] + np.arange(8) for name in doubles])
        return np.frombuffer(template.tobytes(), dtype=np.uint8), positions

    def _fixed_blocks(self, matrix: np.ndarray, scores: np.ndarray | None) -> tuple[bytes, int]:
        """The fixed-width middle of every record (score .. features map) as one bytes, and its width.

        One copy of the template per record and one scatter of all doubles' bytes: a field-by-field fill
        of a structured array cost ~65 us per batch whatever its size (35 numpy calls)."""
        template, positions = self._block_layouts[scores is not None]
        n = len(matrix)
        values = matrix if scores is None else np.column_stack((scores, matrix))
        blocks = np.empty((n, len(template)), dtype=np.uint8)
        blocks[:] = template
        blocks[:, positions] = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(n, len(positions))
        return blocks.tobytes(), len(template)
