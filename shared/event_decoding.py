"""Event records from Avro bytes, faster than the generic decoder (the scorer decodes every event).

fastavro's generic reader costs several us an event, most of it per-field dispatch
and the BytesIO it reads from. `EventReader` reads the layout of the CURRENT Event
writer schema (schemas/event.avsc: 3 strings, a long, a double, a string, 4 optional
strings) straight from the bytes and returns THE SAME DICT as
`AvroCodec.decoder("event")` (same keys in the same order, same values and types;
tests/test_event_decoding.py compares them).

Anything else goes to the generic decoder, which stays the single source of
`DecodeError`s: messages of another writer schema (history, registry, wrong record),
unusual encodings (multi-byte string lengths, varints longer than 9 bytes) and any
message the fast path cannot read to its exact end (garbage, truncation, bad union
branch, invalid UTF-8 ...). So a bad message raises exactly the error, with the same
reason and field, as before. If schemas/event.avsc changes shape, the fast path
switches itself off (everything goes to the generic decoder) until this file is
updated; a test fails first.
"""
from __future__ import annotations

import struct

from streamscore.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError

_unpack_double = struct.Struct("<d").unpack_from

# The writer schema this reader is written for: (field name, Avro type) in schema order.
EVENT_LAYOUT = (
    ("event_id", "string"), ("entity_id", "string"), ("event_time", "long"), ("amount", "double"),
    ("currency", "string"), ("merchant_category", ["null", "string"]), ("channel", ["null", "string"]),
    ("country", ["null", "string"]), ("device_id", ["null", "string"]),
)
_MAX_FAST_VARINT_BYTES = 9  # 63 bits: Python ints and fastavro's uint64 arithmetic agree up to here
_MAX_CACHED_HEADERS = 1000  # garbage headers must not grow the cache without bound


class _NotFastPath(Exception):
    """The fast path cannot read this message; the generic decoder decides."""


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """Zig-zag varint at `pos` -> (value, position after it); _NotFastPath past 9 bytes."""
    value = 0
    shift = 0
    for pos in range(pos, pos + _MAX_FAST_VARINT_BYTES):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos + 1
        shift += 7
    raise _NotFastPath


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    """Avro string at `pos`; only the common one-byte length (0..63 bytes) is read here."""
    size = data[pos]
    if size >= 0x80 or size & 1:  # multi-byte or negative length: rare, leave it to fastavro
        raise _NotFastPath
    end = pos + 1 + (size >> 1)
    return data[pos + 1:end].decode(), end


def _read_optional_string(data: bytes, pos: int) -> tuple[str | None, int]:
    """["null", "string"] union at `pos`: branch 0 is null, branch 1 (zig-zag 2) a string."""
    branch = data[pos]
    if branch == 0:
        return None, pos + 1
    size = data[pos + 1]
    if branch != 2 or size >= 0x80 or size & 1:  # _read_string, inlined: 4 of these per event
        raise _NotFastPath
    end = pos + 2 + (size >> 1)
    return data[pos + 2:end].decode(), end


def _read_event(data: bytes, pos: int) -> dict:
    """The Event body at `pos`, in EVENT_LAYOUT; raises (see EventReader.__call__) if not readable to the end."""
    event_id, pos = _read_string(data, pos)
    entity_id, pos = _read_string(data, pos)
    event_time, pos = _read_long(data, pos)
    (amount,) = _unpack_double(data, pos)
    currency, pos = _read_string(data, pos + 8)
    merchant_category, pos = _read_optional_string(data, pos)
    channel, pos = _read_optional_string(data, pos)
    country, pos = _read_optional_string(data, pos)
    device_id, pos = _read_optional_string(data, pos)
    if pos != len(data):  # truncated (a slice ran past the end) or trailing bytes
        raise _NotFastPath
    return {
        "event_id": event_id, "entity_id": entity_id, "event_time": event_time, "amount": amount,
        "currency": currency, "merchant_category": merchant_category, "channel": channel,
        "country": country, "device_id": device_id,
    }


def _layout_of(schema: dict) -> tuple:
    return tuple((f["name"], f["type"]) for f in schema["fields"])


class EventReader:
    """Callable `bytes -> dict` equal to codec.decoder("event"), fast for current-schema messages."""

    def __init__(self, codec: AvroCodec):
        self.codec = codec
        self.generic = codec.decoder("event")
        current = codec.catalog.current("event")
        self._fingerprint = current.fingerprint
        self.fast_path_enabled = _layout_of(current.expanded) == EVENT_LAYOUT
        self._fast_headers: dict[bytes, bool] = {}  # framing header -> written with the current schema

    def _learn(self, header: bytes) -> bool:
        """Whether messages with this framing header were written with the current Event schema."""
        if not self.fast_path_enabled:
            return False
        try:
            fast = self.codec.writer_of(header).fingerprint == self._fingerprint
        except DecodeError:
            fast = False
        except Exception:  # e.g. registry unavailable: not cached, the generic decoder raises it
            return False
        if len(self._fast_headers) < _MAX_CACHED_HEADERS:
            self._fast_headers[header] = fast
        return fast

    def __call__(self, data: bytes) -> dict:
        if type(data) is bytes:  # bytearray/memoryview: rare, generic
            try:
                header = data[:SINGLE_OBJECT_HEADER_LEN if data[0] == 0xC3 else CONFLUENT_HEADER_LEN]
                fast = self._fast_headers.get(header)
                if fast or (fast is None and self._learn(header)):
                    return _read_event(data, len(header))
            except (_NotFastPath, IndexError, struct.error, UnicodeDecodeError):
                pass
        return self.generic(data)  # decodes, or raises the DecodeError naming the reason and field
