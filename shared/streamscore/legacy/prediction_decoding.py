"""Prediction records from Avro bytes, faster than the generic decoder: the mirror of prediction_encoding.

The logger decodes every Prediction; fastavro's generic reader costs ~20 us a record,
most of it walking the 17-entry features map key by key. `PredictionReader` reads the
layout of the CURRENT Prediction writer schema directly (field order of
schemas/prediction.avsc) and reads the whole features map with one struct unpack when
its keys are the ones `features.FEATURE_NAMES` gives, in that order (what every scorer
writes). It returns THE SAME DICT as `AvroCodec.decoder("prediction")`
(tests/test_prediction_decoding.py compares them).

Anything else goes to the generic decoder, which stays the single source of
`DecodeError`s: messages of another writer schema (history, registry, wrong record),
maps with other keys or several blocks, and any message the fast path cannot read
to its exact end (garbage, truncation, bad union branch, invalid UTF-8 ...). So a bad
message raises exactly the error, with the same reason and field, as before.
"""
from __future__ import annotations

import struct

from streamscore.legacy import features
from streamscore.avro.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError
from streamscore.legacy.prediction_encoding import avro_long, avro_string
from streamscore.clickhouse.rows import checked_ms
from streamscore.legacy.rows import prediction_row

_DOUBLE = struct.Struct("<d")


class _NotFastPath(Exception):
    """The fast path cannot read this message; the generic decoder decides."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Zig-zag varint at `pos` -> (value, position after it)."""
    byte = data[pos]
    if byte < 0x80:
        return (byte >> 1) ^ -(byte & 1), pos + 1
    value = byte & 0x7F
    shift = 7
    pos += 1
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
        if shift > 63:  # longer than a 64-bit long
            raise _NotFastPath


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = _read_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise _NotFastPath
    return data[pos:end].decode(), end


class PredictionReader:
    """Callable `bytes -> dict` equal to codec.decoder("prediction"), fast for current-schema messages."""

    def __init__(self, codec: AvroCodec):
        self.codec = codec
        self.generic = codec.decoder("prediction")
        self._fingerprint = codec.catalog.current("prediction").fingerprint
        self._fast_headers: dict[bytes, bool] = {}
        names = tuple(features.FEATURE_NAMES)
        self._feature_names = names
        # The map as every scorer writes it: one block of len(names) entries, keys in
        # FEATURE_NAMES order, each (string key, double); then the end-of-map marker.
        self._map_count = avro_long(len(names))
        self._map_struct = struct.Struct("<" + "".join(
            f"{len(avro_string(name))}sd" for name in names))
        self._map_key_bytes = tuple(avro_string(name) for name in names)
        # Field kinds in schemas/prediction.avsc order, the nested Event flattened in place:
        # 0 string, 1 int/long, 2 ["null","string"], 3 double, 4 ["null","double"], 5 the features map.
        self._layout = (0, 0, 1, 1, 0, 1, 4, 0, 5,  # event_id .. features
                        0, 0, 1, 3, 0, 2, 2, 2, 2,  # event
                        1, 1)  # event_partition, event_offset

    def _is_fast(self, data: bytes) -> bool:
        framing = SINGLE_OBJECT_HEADER_LEN if data[0] == 0xC3 else CONFLUENT_HEADER_LEN
        header = bytes(data[:framing])
        fast = self._fast_headers.get(header)
        if fast is None:
            try:
                fast = self.codec.writer_of(data).fingerprint == self._fingerprint
            except DecodeError:
                fast = False
            if len(self._fast_headers) < 1000:  # garbage headers must not grow this without bound
                self._fast_headers[header] = fast
        return fast

    def _fields(self, data: bytes) -> tuple | None:
        """The record's fields in writer order (the event's flattened), or None when only the generic
        decoder may read `data` (other writer schema, unusual map, or not readable to its exact end)."""
        if not data or data[0] not in (0xC3, 0x00) or len(data) < SINGLE_OBJECT_HEADER_LEN \
                or not self._is_fast(data):
            return None
        try:
            return self._read(data, SINGLE_OBJECT_HEADER_LEN if data[0] == 0xC3 else CONFLUENT_HEADER_LEN)
        except (_NotFastPath, IndexError, struct.error, UnicodeDecodeError):
            return None

    def __call__(self, data: bytes) -> dict:
        fields = self._fields(data)
        if fields is None:
            return self.generic(data)  # decodes, or raises the DecodeError naming the reason and field
        (event_id, entity_id, event_time, scored_at, model_name, model_version, score, feature_set, feature_map,
         ev_event_id, ev_entity_id, ev_event_time, amount, currency, merchant_category, channel, country,
         device_id, event_partition, event_offset) = fields
        return {
            "event_id": event_id, "entity_id": entity_id, "event_time": event_time, "scored_at": scored_at,
            "model_name": model_name, "model_version": model_version, "score": score,
            "feature_set": feature_set, "features": feature_map,
            "event": {
                "event_id": ev_event_id, "entity_id": ev_entity_id, "event_time": ev_event_time,
                "amount": amount, "currency": currency, "merchant_category": merchant_category,
                "channel": channel, "country": country, "device_id": device_id,
            },
            "event_partition": event_partition, "event_offset": event_offset,
        }

    def row(self, data: bytes) -> list:
        """The `predictions` row of a message, equal to sink_rows.prediction_row(self(data)) without the dicts."""
        fields = self._fields(data)
        if fields is None:
            return prediction_row(self.generic(data))
        (event_id, entity_id, event_time, scored_at, model_name, model_version, score, feature_set, feature_map,
         _, _, _, amount, currency, merchant_category, channel, country,
         device_id, event_partition, event_offset) = fields
        return [event_id, entity_id, checked_ms(event_time, "event_time"), checked_ms(scored_at, "scored_at"),
                model_name, model_version, score, amount, currency, merchant_category, channel, country, device_id,
                feature_map, feature_set, event_partition, event_offset]

    def _read(self, data: bytes, pos: int) -> tuple:
        # Strings shorter than 64 bytes (ids, codes, names) have a one-byte length: read inline,
        # the rest through _read_string. A slice running past the end leaves pos > len(data),
        # which the final check (or the next index) turns into the generic decoder's error.
        read_long, read_string = _read_long, _read_string
        out = []
        append = out.append
        for kind in self._layout:
            if kind == 0:  # string
                size = data[pos]
                if size < 0x80 and not size & 1:
                    end = pos + 1 + (size >> 1)
                    append(data[pos + 1:end].decode())
                    pos = end
                else:
                    value, pos = read_string(data, pos)
                    append(value)
            elif kind == 1:  # long / int
                byte = data[pos]
                if byte < 0x80:
                    append((byte >> 1) ^ -(byte & 1))
                    pos += 1
                else:
                    value, pos = read_long(data, pos)
                    append(value)
            elif kind == 2:  # ["null", "string"]
                branch = data[pos]
                if branch == 0:
                    append(None)
                    pos += 1
                elif branch == 2:
                    size = data[pos + 1]
                    if size < 0x80 and not size & 1:
                        end = pos + 2 + (size >> 1)
                        append(data[pos + 2:end].decode())
                        pos = end
                    else:
                        value, pos = read_string(data, pos + 1)
                        append(value)
                else:
                    raise _NotFastPath
            elif kind == 3:  # double
                append(_DOUBLE.unpack_from(data, pos)[0])
                pos += 8
            elif kind == 4:  # ["null", "double"]
                branch = data[pos]
                if branch == 0:
                    append(None)
                    pos += 1
                elif branch == 2:
                    append(_DOUBLE.unpack_from(data, pos + 1)[0])
                    pos += 9
                else:
                    raise _NotFastPath
            else:  # the features map
                count = self._map_count
                if data[pos:pos + len(count)] != count:
                    raise _NotFastPath
                pos += len(count)
                fields = self._map_struct.unpack_from(data, pos)
                if fields[0::2] != self._map_key_bytes:
                    raise _NotFastPath
                pos += self._map_struct.size
                if data[pos] != 0:  # one block only, then the end marker
                    raise _NotFastPath
                pos += 1
                append(dict(zip(self._feature_names, fields[1::2])))
        if pos != len(data):
            raise _NotFastPath
        return out
