"""Event records from Avro bytes, faster than the generic decoder (the scorer decodes every event).

fastavro's generic reader costs several us an event, most of it per-field dispatch
and the BytesIO it reads from. `EventReader` reads the layout of the CURRENT Event
writer schema (schemas/event.avsc: 3 strings, a long, a double, a string, 4 optional
strings) straight from the bytes and returns THE SAME DICT as
`AvroCodec.decoder("event")` (same keys in the same order, same values and types;
tests/test_event_decoding.py compares them). A batch is read at once: one compiled
loop (`_scan_events`) finds every field of every message in the batch's joined bytes,
then Python only slices and decodes the strings (~7 -> ~4 us an event at batch 500).

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

import sys
from collections.abc import Sequence

import numpy as np
from numba import njit

from streamscore.avro.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError

# The writer schema this reader is written for: (field name, Avro type) in schema order.
EVENT_LAYOUT = (
    ("event_id", "string"), ("entity_id", "string"), ("event_time", "long"), ("amount", "double"),
    ("currency", "string"), ("merchant_category", ["null", "string"]), ("channel", ["null", "string"]),
    ("country", ["null", "string"]), ("device_id", ["null", "string"]),
)
_MAX_CACHED_HEADERS = 1000  # garbage headers must not grow the cache without bound
_N_STRINGS = 7  # event_id, entity_id, currency, then the 4 optional strings: a (start, end) span each


@njit(cache=True, nogil=True)
def _scan_events(buf, starts, ends, spans, times, amounts, ok):
    """Message i's body is buf[starts[i]:ends[i]] (starts[i] < 0: not for the fast path). Where its
    fields are read to its exact end: ok[i] = 1, the strings' (start, end) in spans[i] (-1, -1 for a
    null), event_time in times[i], amount in amounts[i] (its 8 bytes as they are). Else ok[i] = 0: a string
    length that is multi-byte or negative, a varint over 9 bytes (63 bits, where Python and int64
    agree), a union branch other than null/string, truncation or trailing bytes."""
    for i in range(len(starts)):
        ok[i] = 0
        pos = starts[i]
        end = ends[i]
        if pos < 0:
            continue
        good = True
        for column in (0, 2):  # event_id, entity_id
            if pos >= end or buf[pos] >= 0x80 or buf[pos] & 1:
                good = False
                break
            spans[i, column] = pos + 1
            pos += 1 + (buf[pos] >> 1)
            spans[i, column + 1] = pos
        if not good:
            continue
        value = 0
        shift = 0
        terminated = False
        for _ in range(9):
            if pos >= end:
                break
            byte = np.int64(buf[pos])
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                terminated = True
                break
            shift += 7
        if not terminated:
            continue
        times[i] = (value >> 1) ^ -(value & 1)
        amount = pos
        pos += 8
        if pos >= end or buf[pos] >= 0x80 or buf[pos] & 1:  # currency
            continue
        spans[i, 4] = pos + 1
        pos += 1 + (buf[pos] >> 1)
        spans[i, 5] = pos
        for column in (6, 8, 10, 12):  # the optional strings
            if pos >= end:
                good = False
                break
            branch = buf[pos]
            if branch == 0:
                spans[i, column] = -1
                spans[i, column + 1] = -1
                pos += 1
            elif branch == 2 and pos + 1 < end and buf[pos + 1] < 0x80 and not buf[pos + 1] & 1:
                spans[i, column] = pos + 2
                pos += 2 + (buf[pos + 1] >> 1)
                spans[i, column + 1] = pos
            else:
                good = False
                break
        if good and pos == end:
            amounts[i] = buf[amount:amount + 8].view(np.float64)[0]
            ok[i] = 1


def _layout_of(schema: dict) -> tuple:
    return tuple((f["name"], f["type"]) for f in schema["fields"])


class EventReader:
    """Callable `bytes -> dict` equal to codec.decoder("event"), fast for current-schema messages."""

    def __init__(self, codec: AvroCodec):
        self.codec = codec
        self.generic = codec.decoder("event")
        current = codec.catalog.current("event")
        self._fingerprint = current.fingerprint
        # the compiled loop reads Avro's little-endian double in the machine's order
        self.fast_path_enabled = _layout_of(current.expanded) == EVENT_LAYOUT and sys.byteorder == "little"
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
        decoded = self.read_batch([data])[0]
        if isinstance(decoded, DecodeError):
            raise decoded
        return self.generic(data) if decoded is None else decoded  # empty: the generic decoder's error

    def _body_start(self, data) -> int:
        """Where the body of `data` starts if the fast path may read it (current-schema framing), else -1."""
        if type(data) is not bytes or not data:  # bytearray/memoryview: rare, generic
            return -1
        header = data[:SINGLE_OBJECT_HEADER_LEN if data[0] == 0xC3 else CONFLUENT_HEADER_LEN]
        fast = self._fast_headers.get(header)
        if fast or (fast is None and self._learn(header)):
            return len(header)
        return -1

    def read_batch(self, values: Sequence[bytes]) -> list:
        """Per value, in order: its event dict, the DecodeError the generic decoder raised for it (without a
        traceback, so a kept list holds no frames), or None for an empty value. Errors that are not the
        message's fault (e.g. SchemaRegistryUnavailable) propagate."""
        n = len(values)
        decoded: list = [None] * n
        body_starts, body_ends = [-1] * n, [0] * n
        position = 0
        if self.fast_path_enabled:
            body_start = self._body_start
            header, header_len = None, -1  # the last fast header: a batch's messages usually share it
            for i, value in enumerate(values):
                if value is None:  # a tombstone
                    body_ends[i] = position
                    continue
                if header is not None and type(value) is bytes and value.startswith(header):
                    body_starts[i] = position + header_len
                else:
                    start = body_start(value)
                    if start >= 0:
                        body_starts[i] = position + start
                        header, header_len = value[:start], start
                position += len(value)
                body_ends[i] = position
            joined = b"".join([b"" if value is None else value for value in values])
        else:
            joined = b""
        starts = np.array(body_starts, dtype=np.int64)
        ends = np.array(body_ends, dtype=np.int64)
        spans = np.empty((n, 2 * _N_STRINGS), dtype=np.int64)
        times = np.empty(n, dtype=np.int64)
        amounts = np.empty(n, dtype="<f8")
        ok = np.zeros(n, dtype=np.uint8)
        if self.fast_path_enabled:
            _scan_events(np.frombuffer(joined, dtype=np.uint8), starts, ends, spans, times, amounts, ok)
        for i, (fast, span, event_time, amount) in enumerate(zip(ok.tolist(), spans.tolist(), times.tolist(),
                                                                  amounts.tolist())):
            if fast:
                try:
                    decoded[i] = {
                        "event_id": joined[span[0]:span[1]].decode(), "entity_id": joined[span[2]:span[3]].decode(),
                        "event_time": event_time, "amount": amount, "currency": joined[span[4]:span[5]].decode(),
                        "merchant_category": None if span[6] < 0 else joined[span[6]:span[7]].decode(),
                        "channel": None if span[8] < 0 else joined[span[8]:span[9]].decode(),
                        "country": None if span[10] < 0 else joined[span[10]:span[11]].decode(),
                        "device_id": None if span[12] < 0 else joined[span[12]:span[13]].decode(),
                    }
                    continue
                except UnicodeDecodeError:
                    pass
            value = values[i]
            if value is None or len(value) == 0:
                continue
            try:
                decoded[i] = self.generic(value)  # decodes, or raises the DecodeError naming the reason and field
            except DecodeError as exc:
                decoded[i] = exc.with_traceback(None)
        return decoded
