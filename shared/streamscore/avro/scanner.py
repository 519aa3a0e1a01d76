"""One compiled reader for flat Avro records of any layout: a whole batch of messages in one loop.

fastavro's generic reader costs several us a record (per-field dispatch, a BytesIO, a dict).
`RecordReader.read_batch` joins a batch's messages, and `scan_records` (numba) walks every
message field by field as its `RecordLayout` says, leaving columns: for text fields the position
and length of the bytes in the joined buffer (nothing is decoded: features hash the bytes, writers
copy them), integers and booleans as int64, floats and doubles as float64, a null flag per field.

The generic decoder (`AvroCodec.decoder`) stays the single source of truth and of `DecodeError`s:
a message the scan cannot read to its exact end exactly as fastavro would (another writer schema,
a varint over 9 bytes, an int outside int32, a boolean byte other than 0/1, invalid UTF-8 in a
string, a union branch out of range, truncation, trailing bytes) goes to it. What it decodes is
written into the same columns (its strings appended to the buffer), so every consumer reads one
shape; what it refuses comes back as that DecodeError. How many rows took the generic path is
counted (`ScannedBatch.generic_rows`), never a reason to refuse to start.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from streamscore.avro.codec import CONFLUENT_HEADER_LEN, SINGLE_OBJECT_HEADER_LEN, AvroCodec, DecodeError
from streamscore.avro.layout import (DOUBLE_ARRAY, KIND_BOOLEAN, KIND_BYTES, KIND_DOUBLE, KIND_DOUBLE_ARRAY, KIND_FLOAT, KIND_INT,
                                     KIND_LONG, KIND_STRING, RecordLayout, record_layout)

_MAX_CACHED_HEADERS = 1000  # garbage headers must not grow the header cache without bound
_LITTLE_ENDIAN = sys.byteorder == "little"  # the scan reads Avro's little-endian floats in machine order

ROW_FAILED, ROW_SCANNED, ROW_GENERIC = 0, 1, 2  # ScannedBatch.status


@njit(cache=True, nogil=True)
def read_varint(buf, pos, end):
    """Zig-zag varint at `pos` -> (value, position after it); position -1 when it runs past `end` or is longer
    than 9 bytes (63 bits: beyond that Python's and int64's arithmetic differ, so the generic decoder decides)."""
    value = 0
    shift = 0
    for _ in range(9):
        if pos >= end:
            return 0, -1
        byte = np.int64(buf[pos])
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos
        shift += 7
    return 0, -1


@njit(cache=True, nogil=True)
def utf8_valid(buf, start, end):
    """Whether buf[start:end] is well-formed UTF-8 (what Python's bytes.decode accepts, surrogates excluded)."""
    i = start
    while i < end:
        c = buf[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need, low, high = 1, 0x80, 0xBF
        elif c == 0xE0:
            need, low, high = 2, 0xA0, 0xBF
        elif 0xE1 <= c <= 0xEC or 0xEE <= c <= 0xEF:
            need, low, high = 2, 0x80, 0xBF
        elif c == 0xED:
            need, low, high = 2, 0x80, 0x9F
        elif c == 0xF0:
            need, low, high = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            need, low, high = 3, 0x80, 0xBF
        elif c == 0xF4:
            need, low, high = 3, 0x80, 0x8F
        else:
            return False
        if i + need >= end:
            return False
        second = buf[i + 1]
        if second < low or second > high:
            return False
        for k in range(2, need + 1):
            if buf[i + k] < 0x80 or buf[i + k] > 0xBF:
                return False
        i += need + 1
    return True


@njit(cache=True, nogil=True)
def scan_records(buf, starts, ends, kinds, null_branches, ints, lengths, floats, nulls, ok):
    """Read message i (its body is buf[starts[i]:ends[i]]; starts[i] < 0: not for the scan) field by field.

    For field j: text -> ints[i, j] = start in buf, lengths[i, j] = byte length; boolean/int/long ->
    ints[i, j]; float/double -> floats[i, j]; an array of doubles -> ints[i, j] = start of its doubles,
    lengths[i, j] = how many; nulls[i, j] = 1 for a null. ok[i] = 1 only when the message
    was read to its exact end with nothing the generic decoder would read differently."""
    n_fields = len(kinds)
    for i in range(len(starts)):
        ok[i] = 0
        pos = starts[i]
        end = ends[i]
        if pos < 0:
            continue
        good = True
        for j in range(n_fields):
            branch_null = null_branches[j]
            nulls[i, j] = 0
            if branch_null >= 0:  # a union of null and one primitive
                if pos >= end:
                    good = False
                    break
                branch = buf[pos]
                pos += 1
                if branch == 2 * branch_null:  # zig-zag of the branch index: 0 -> 0, 1 -> 2
                    nulls[i, j] = 1
                    ints[i, j] = 0
                    lengths[i, j] = 0
                    floats[i, j] = np.nan
                    continue
                if branch != 2 * (1 - branch_null):
                    good = False
                    break
            kind = kinds[j]
            if kind == KIND_STRING or kind == KIND_BYTES:
                size, pos = read_varint(buf, pos, end)
                if pos < 0 or size < 0 or pos + size > end:
                    good = False
                    break
                if kind == KIND_STRING and not utf8_valid(buf, pos, pos + size):
                    good = False
                    break
                ints[i, j] = pos
                lengths[i, j] = size
                pos += size
            elif kind == KIND_LONG or kind == KIND_INT:
                value, pos = read_varint(buf, pos, end)
                if pos < 0 or (kind == KIND_INT and (value < -2147483648 or value > 2147483647)):
                    good = False
                    break
                ints[i, j] = value
            elif kind == KIND_BOOLEAN:
                if pos >= end or buf[pos] > 1:
                    good = False
                    break
                ints[i, j] = buf[pos]
                pos += 1
            elif kind == KIND_DOUBLE_ARRAY:  # one block of doubles, then the end marker (as Avro writers write it)
                size, pos = read_varint(buf, pos, end)
                if pos < 0 or size < 0:
                    good = False
                    break
                ints[i, j] = pos
                lengths[i, j] = size
                if size > 0:
                    pos += 8 * size
                    if pos >= end or buf[pos] != 0:
                        good = False
                        break
                    pos += 1
            elif kind == KIND_DOUBLE:
                if pos + 8 > end:
                    good = False
                    break
                floats[i, j] = buf[pos:pos + 8].view(np.float64)[0]
                pos += 8
            else:  # KIND_FLOAT
                if pos + 4 > end:
                    good = False
                    break
                floats[i, j] = np.float64(buf[pos:pos + 4].view(np.float32)[0])
                pos += 4
        if good and pos == end:
            ok[i] = 1


@dataclass
class ScannedBatch:
    """A batch of records as columns (see scan_records); `status[i]` is ROW_SCANNED, ROW_GENERIC (decoded by the
    generic decoder, then written into the columns) or ROW_FAILED (`errors[i]` holds its DecodeError, or None
    for an empty value)."""

    layout: RecordLayout
    raw: bytes  # the joined messages, then the generic rows' text appended
    ints: np.ndarray  # (n, fields) int64: text start in `raw`, or the integer value
    lengths: np.ndarray  # (n, fields) int64: text length
    floats: np.ndarray  # (n, fields) float64
    nulls: np.ndarray  # (n, fields) uint8
    status: np.ndarray  # (n,) uint8
    errors: dict[int, DecodeError | None]
    generic_rows: int
    message_ends: np.ndarray | None = None  # (n,) int64: where message i ends in `raw`
    message_starts: np.ndarray | None = None  # (n,) int64: where it starts (None: where message i - 1 ends)

    def message_span(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each whole framed message in `raw` (what the Prediction carries as `event`)."""
        ends = self.message_ends
        starts = self.message_starts
        if starts is None:
            starts = np.concatenate(([0], ends[:-1])) if len(ends) else ends
        return starts, ends - starts

    def __len__(self) -> int:
        return len(self.status)

    @property
    def buffer(self) -> np.ndarray:
        return np.frombuffer(self.raw, dtype=np.uint8)

    def text(self, row: int, field: int) -> bytes | None:
        if self.nulls[row, field]:
            return None
        start = int(self.ints[row, field])
        return self.raw[start:start + int(self.lengths[row, field])]

    def texts(self, field: int, rows: Sequence[int] | np.ndarray | None = None) -> list[bytes]:
        """The bytes of a text field for `rows` (default all), b"" for nulls: one slice each, no decoding."""
        starts = self.ints[:, field] if rows is None else self.ints[rows, field]
        ends = starts + (self.lengths[:, field] if rows is None else self.lengths[rows, field])
        raw = self.raw
        return [raw[s:e] for s, e in zip(starts.tolist(), ends.tolist())]

    def value(self, row: int, field: int):
        """The Python value the generic decoder would give for one field (for messages and error details)."""
        spec = self.layout.fields[field]
        if self.nulls[row, field]:
            return None
        if spec.type == "string":
            return self.text(row, field).decode()
        if spec.type == "bytes":
            return self.text(row, field)
        if spec.type == DOUBLE_ARRAY:
            return np.frombuffer(self.raw, dtype="<f8", count=int(self.lengths[row, field]),
                                 offset=int(self.ints[row, field])).tolist()
        if spec.type == "boolean":
            return bool(self.ints[row, field])
        if spec.type in ("int", "long"):
            return int(self.ints[row, field])
        return float(self.floats[row, field])

    def record(self, row: int) -> dict:
        """Row `row` as the dict the generic decoder returns (same keys in schema order, same values)."""
        return {f.name: self.value(row, j) for j, f in enumerate(self.layout.fields)}


@njit(cache=True, nogil=True)
def match_prefix(buf, starts, sizes, prefix, out):
    """out[i] = message i (buf[starts[i]:starts[i] + sizes[i]]) starts with `prefix`."""
    m = len(prefix)
    for i in range(len(starts)):
        if sizes[i] < m:
            continue
        s = starts[i]
        same = True
        for k in range(m):
            if buf[s + k] != prefix[k]:
                same = False
                break
        out[i] = same


class RecordReader:
    """Reads framed messages of one record (`name` in the codec's catalog) into a ScannedBatch; see module doc."""

    def __init__(self, codec: AvroCodec, name: str):
        self.codec = codec
        self.name = name
        current = codec.catalog.current(name)
        self.layout = record_layout(current.expanded, double_arrays=True)
        self.generic = codec.decoder(name)
        self._fingerprint = current.fingerprint
        self._kinds, self._null_branches = self.layout.scanner_arrays()
        self._fast_headers: dict[bytes, bool] = {}  # framing header -> written with the current schema
        self.enabled = _LITTLE_ENDIAN

    def _header_is_current(self, header: bytes) -> bool:
        fast = self._fast_headers.get(header)
        if fast is not None:
            return fast
        try:
            fast = self.codec.writer_of(header).fingerprint == self._fingerprint
        except DecodeError:
            fast = False
        except Exception:  # e.g. the registry is unavailable: not cached; the generic decoder raises it
            return False
        if len(self._fast_headers) < _MAX_CACHED_HEADERS:
            self._fast_headers[header] = fast
        return fast

    def body_start(self, message) -> int:
        """Where the body of `message` starts when it was written with the current schema, else -1."""
        if type(message) is not bytes or not message:
            return -1
        header = message[:SINGLE_OBJECT_HEADER_LEN if message[0] == 0xC3 else CONFLUENT_HEADER_LEN]
        return len(header) if self._header_is_current(header) else -1

    def read_batch(self, values: Sequence[bytes | None]) -> ScannedBatch:
        n = len(values)
        if None in values:
            raw = b"".join([b"" if value is None else value for value in values])
            sizes = np.fromiter((0 if value is None else len(value) for value in values), dtype=np.int64, count=n)
        else:
            raw = b"".join(values)  # any bytes-like value
            sizes = np.fromiter(map(len, values), dtype=np.int64, count=n)
        ends = np.cumsum(sizes)
        return self.read_spans(raw, ends - sizes, sizes)

    def read_spans(self, raw: bytes, message_starts: np.ndarray, sizes: np.ndarray) -> ScannedBatch:
        """Like read_batch, for messages that already lie in one buffer: message i is
        raw[message_starts[i]:message_starts[i] + sizes[i]] (e.g. the events nested in a batch of Predictions,
        read where they are, without a slice and a join each). A size of 0 is an empty message."""
        n, n_fields = len(sizes), len(self.layout.fields)
        message_starts = np.asarray(message_starts, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        ends = message_starts + sizes
        buffer = np.frombuffer(raw, dtype=np.uint8)
        starts = np.full(n, -1, dtype=np.int64)
        if self.enabled and n:
            # A batch's messages usually share one framing header: check the first's in Python, then every
            # message's prefix against it in one compiled loop (a Python startswith per message cost ~0.4 us,
            # a fifth of the logger's block time); the others go through body_start one by one.
            present = np.flatnonzero(sizes > 0)
            header_len = -1
            if len(present):
                first = int(present[0])
                header_len = self.body_start(raw[message_starts[first]:ends[first]])
            matched = np.zeros(n, dtype=np.bool_)
            if header_len > 0:
                first = int(present[0])
                header = buffer[message_starts[first]:message_starts[first] + header_len]
                match_prefix(buffer, message_starts, sizes, header, matched)
                starts[matched] = message_starts[matched] + header_len
            for i in np.flatnonzero(~matched & (sizes > 0)).tolist():
                start = self.body_start(raw[message_starts[i]:ends[i]])
                if start >= 0:
                    starts[i] = message_starts[i] + start
        ints = np.zeros((n, n_fields), dtype=np.int64)
        lengths = np.zeros((n, n_fields), dtype=np.int64)
        floats = np.zeros((n, n_fields), dtype=np.float64)
        nulls = np.zeros((n, n_fields), dtype=np.uint8)
        status = np.zeros(n, dtype=np.uint8)
        if n:
            scan_records(buffer, starts, ends, self._kinds, self._null_branches, ints, lengths, floats, nulls, status)
        errors: dict[int, DecodeError | None] = {}
        side = bytearray()
        generic_rows = 0
        for i in np.flatnonzero(status == ROW_FAILED).tolist():
            if sizes[i] == 0:
                errors[i] = None
                continue
            generic_rows += 1
            try:  # decodes, or raises the DecodeError naming the reason and field
                record = self.generic(bytes(raw[message_starts[i]:ends[i]]))
            except DecodeError as exc:
                errors[i] = exc.with_traceback(None)  # a kept error holds no frames
                continue
            fill_row(self.layout, record, i, len(raw), side, ints, lengths, floats, nulls)
            status[i] = ROW_GENERIC
        if side:
            raw = bytes(raw) + bytes(side)
        return ScannedBatch(self.layout, raw, ints, lengths, floats, nulls, status, errors, generic_rows, ends,
                            message_starts)


def fill_row(layout: RecordLayout, record: dict, row: int, base: int, side: bytearray, ints, lengths, floats,
             nulls) -> None:
    """Write a decoded record into row `row` of the columns; its text goes to `side`, which starts at `base` of
    the final buffer (the shape scan_records writes)."""
    for j, field in enumerate(layout.fields):
        value = record.get(field.name)
        if value is None:
            nulls[row, j], ints[row, j], lengths[row, j], floats[row, j] = 1, 0, 0, np.nan
            continue
        nulls[row, j] = 0
        if field.is_text:
            data = value.encode() if isinstance(value, str) else bytes(value)
            ints[row, j] = base + len(side)
            lengths[row, j] = len(data)
            side += data
        elif field.type == DOUBLE_ARRAY:
            ints[row, j] = base + len(side)
            lengths[row, j] = len(value)
            side += np.asarray(value, dtype="<f8").tobytes()
        elif field.type in ("float", "double"):
            floats[row, j] = float(value)
        else:
            ints[row, j] = int(value)


def columns_from_records(layout: RecordLayout, records: Sequence[dict]) -> ScannedBatch:
    """Decoded records as a ScannedBatch (the online path's shape)."""
    return columns_from_values(layout, {f.name: [r.get(f.name) for r in records] for f in layout.fields},
                               len(records))


def columns_from_values(layout: RecordLayout, columns: dict[str, Sequence], n: int) -> ScannedBatch:
    """Columns of Python values (None for null), e.g. as read back from ClickHouse, as a ScannedBatch: the
    offline path's input has the online path's shape. Column-wise, so 600k rows cost numpy calls, not a
    Python call per value."""
    n_fields = len(layout.fields)
    ints = np.zeros((n, n_fields), dtype=np.int64)
    lengths = np.zeros((n, n_fields), dtype=np.int64)
    floats = np.zeros((n, n_fields), dtype=np.float64)
    nulls = np.zeros((n, n_fields), dtype=np.uint8)
    pieces: list[bytes] = []
    base = 0
    for j, field in enumerate(layout.fields):
        values = columns[field.name]
        null = np.fromiter((v is None for v in values), dtype=np.uint8, count=n)
        nulls[:, j] = null
        if field.is_text:
            data = [b"" if v is None else (v.encode() if isinstance(v, str) else bytes(v)) for v in values]
            sizes = np.fromiter(map(len, data), dtype=np.int64, count=n)
            lengths[:, j] = sizes
            ints[:, j] = base + np.cumsum(sizes) - sizes
            joined = b"".join(data)
            pieces.append(joined)
            base += len(joined)
        elif field.type in ("float", "double"):
            floats[:, j] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            ints[:, j] = np.array([0 if v is None else int(v) for v in values], dtype=np.int64)
    floats[nulls.astype(bool)] = np.nan  # as scan_records leaves a null of any type
    return ScannedBatch(layout, b"".join(pieces), ints, lengths, floats, nulls,
                        np.full(n, ROW_GENERIC, dtype=np.uint8), {}, n)
