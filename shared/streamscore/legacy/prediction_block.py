"""Prediction messages -> one ClickHouse Native block of the `predictions` table, a whole batch at a time.

The logger's per-message path (PredictionReader.row, then clickhouse-connect building the
Native format from Python lists) costs ~50 us of CPU a row, nearly all of it Python work
per field and per map entry. Every scorer writes its Predictions with the same schema,
so `PredictionBlockWriter` reads a whole batch in one compiled loop (numba, `_read`: the
same field layout as PredictionReader) into arrays, and writes the Native columns from
them directly:

- Avro strings are a zig-zag length + bytes, Native strings an unsigned LEB128 length +
  bytes (`_native_strings`);
- the features map must have exactly the keys every scorer writes, in order: its values
  are copied as bytes, and its keys become a LowCardinality column (a 17-entry dictionary
  and one byte per entry);
- the other LowCardinality columns are sent as plain strings and converted by ClickHouse
  on insert (input_format_native_allow_types_conversion, on by default).

A message this reader cannot take exactly as the per-message path would is LEFT OVER,
never guessed at: another framing header (older schema, registry id), a non-ASCII string
(the per-message path checks its UTF-8), a map with other keys, a union branch other
than null/value, a negative or oversized int, a time outside DateTime64's range, or bytes
that do not end exactly where the record does. The logger sends leftovers through the
per-message path, which either reads them or rejects them with the reason and field
(tests/test_prediction_block.py compares both paths, byte corruption included).
"""
from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
from numba import njit

from streamscore.legacy import features
from streamscore.avro.codec import AvroCodec
from streamscore.legacy.prediction_encoding import avro_long, avro_string
from streamscore.clickhouse.rows import DATETIME64_MAX_MS, DATETIME64_MIN_MS
from streamscore.legacy.rows import PREDICTION_COLUMNS

# Native types this block declares per column; ClickHouse converts them to the table's types
# (String -> LowCardinality(String), Nullable(String) -> LowCardinality(Nullable(String))).
NATIVE_TYPES = {
    "event_id": "String", "entity_id": "String", "event_time": "DateTime64(3, 'UTC')",
    "scored_at": "DateTime64(3, 'UTC')", "model_name": "String", "model_version": "UInt32",
    "score": "Nullable(Float64)", "amount": "Float64", "currency": "String",
    "merchant_category": "Nullable(String)", "channel": "Nullable(String)", "country": "Nullable(String)",
    "device_id": "Nullable(String)", "features": "Map(LowCardinality(String), Float64)", "feature_set": "String",
    "event_partition": "UInt32", "event_offset": "UInt64",
}


def leb128(value: int) -> bytes:
    """Unsigned LEB128, how Native writes counts and string lengths."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _native_name(text: str) -> bytes:
    data = text.encode()
    return leb128(len(data)) + data


# Field kinds of schemas/prediction.avsc in order, the nested Event flattened in place (the same
# layout as prediction_decoding.PredictionReader): where each field's value goes in `_read`.
STRING, LONG, OPTIONAL_STRING, DOUBLE, OPTIONAL_DOUBLE, FEATURE_MAP = range(6)
LAYOUT = np.array([
    STRING, STRING, LONG, LONG, STRING, LONG, OPTIONAL_DOUBLE, STRING, FEATURE_MAP,  # event_id .. features
    STRING, STRING, LONG, DOUBLE, STRING, OPTIONAL_STRING, OPTIONAL_STRING, OPTIONAL_STRING, OPTIONAL_STRING,
    LONG, LONG,  # event_partition, event_offset
], dtype=np.int64)
# slots, in layout order, of each kind's outputs
STRINGS = ("event_id", "entity_id", "model_name", "feature_set", "event.event_id", "event.entity_id", "currency",
           "merchant_category", "channel", "country", "device_id")
LONGS = ("event_time", "scored_at", "model_version", "event.event_time", "event_partition", "event_offset")
DOUBLES = ("score", "amount")
NULLABLE = ("score", "merchant_category", "channel", "country", "device_id")
_OPTIONAL_STRINGS = NULLABLE[1:]
_MAX_VARINT = 10


@njit(cache=True, nogil=True)
def _varint(buf, p, end):
    """Zig-zag varint at p -> (value, position after it); position -1 if it runs past `end` or 10 bytes."""
    unsigned = 0
    shift = 0
    while p < end and shift < 7 * _MAX_VARINT:
        byte = buf[p]
        p += 1
        unsigned |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (unsigned >> 1) ^ -(unsigned & 1), p
        shift += 7
    return 0, -1


@njit(cache=True, nogil=True)
def _ascii_string(buf, p, end, strings, row, slot):
    """An Avro string at p, noted as (data position, length) in strings[row, slot]; returns the position
    after it, or -1 when it runs past `end` or is not ASCII (the per-message path checks its UTF-8)."""
    length, p = _varint(buf, p, end)
    if p < 0 or length < 0 or p + length > end:
        return -1
    for k in range(p, p + length):
        if buf[k] >= 0x80:
            return -1
    strings[row, slot, 0] = p
    strings[row, slot, 1] = length
    return p + length


@njit(cache=True, nogil=True)
def _double(buf, p, end, doubles, row, slot):
    """The 8 bytes of an Avro double at p copied to doubles[row, slot]; the position after it, or -1."""
    if p + 8 > end:
        return -1
    for k in range(8):
        doubles[row, slot, k] = buf[p + k]
    return p + 8


@njit(cache=True, nogil=True)
def _read(buf, starts, ends, header, layout, map_expected, map_checked, value_at,
          strings, longs, doubles, nulls, values, ok):
    """Read every message (buf[starts[i]:ends[i]]) field by field into the output arrays; ok[i] says whether
    message i was read to its exact end with nothing the per-message path would read differently."""
    for row in range(len(starts)):
        p, end = starts[row], ends[row]
        ok[row] = False
        if end - p < len(header):
            continue
        for k in range(len(header)):
            if buf[p + k] != header[k]:
                p = -1
                break
        if p < 0:
            continue
        p += len(header)
        n_string = n_long = n_double = n_null = 0
        for kind in layout:
            if kind == STRING:
                p = _ascii_string(buf, p, end, strings, row, n_string)
                n_string += 1
            elif kind == LONG:
                longs[row, n_long], p = _varint(buf, p, end)
                n_long += 1
            elif kind == OPTIONAL_STRING or kind == OPTIONAL_DOUBLE:
                branch, p = _varint(buf, p, end)
                if p < 0 or branch < 0 or branch > 1:
                    p = -1
                    break
                nulls[row, n_null] = branch == 0
                n_null += 1
                if kind == OPTIONAL_STRING:
                    if branch == 1:
                        p = _ascii_string(buf, p, end, strings, row, n_string)
                    else:
                        strings[row, n_string, 0] = p
                        strings[row, n_string, 1] = 0
                    n_string += 1
                else:
                    if branch == 1:
                        p = _double(buf, p, end, doubles, row, n_double)
                    n_double += 1  # a null leaves the slot's zeros
            elif kind == DOUBLE:
                p = _double(buf, p, end, doubles, row, n_double)
                n_double += 1
            else:  # FEATURE_MAP: exactly the keys every scorer writes, in order; the values are copied
                if p + len(map_expected) > end:
                    p = -1
                    break
                for k in map_checked:
                    if buf[p + k] != map_expected[k]:
                        p = -1
                        break
                if p < 0:
                    break
                for j in range(len(value_at)):
                    at = p + value_at[j]
                    for k in range(8):
                        values[row, 8 * j + k] = buf[at + k]
                p += len(map_expected)
            if p < 0:
                break
        ok[row] = p == end


@njit(cache=True, nogil=True)
def _native_strings(buf, strings, slot, keep):
    """The Native String column of strings[keep, slot]: per row its unsigned LEB128 length, then its bytes."""
    total = 0
    for row in keep:
        length = strings[row, slot, 1]
        total += length + 1
        while length >= 0x80:
            total += 1
            length >>= 7
    out = np.empty(total, dtype=np.uint8)
    o = 0
    for row in keep:
        start, length = strings[row, slot, 0], strings[row, slot, 1]
        rest = length
        while rest >= 0x80:
            out[o] = (rest & 0x7F) | 0x80
            rest >>= 7
            o += 1
        out[o] = rest
        o += 1
        for k in range(length):
            out[o + k] = buf[start + k]
        o += length
    return out


class PredictionBlockWriter:
    """Framed Prediction messages -> (Native block of the fast ones, indexes of the leftovers)."""

    columns = PREDICTION_COLUMNS

    def __init__(self, codec: AvroCodec, topic: str | None = None):
        # the framing every scorer of this deployment writes (same codec settings as PredictionWriter)
        self.header = codec.encoder("prediction", topic).header
        self._header = np.frombuffer(self.header, dtype=np.uint8)
        names = features.FEATURE_NAMES
        if len(names) > 255:
            raise ValueError(f"{len(names)} features do not fit the map keys' UInt8 LowCardinality indexes")
        self._n_features = len(names)
        # The features map as scorers write it: count, (key, 8-byte double) per feature, end-of-map
        # marker; `_map_checked` marks the bytes that must match (all but the values).
        expected, checked, value_at = bytearray(avro_long(len(names))), [True], []
        for name in names:
            key = avro_string(name)
            expected += key
            checked += [True] * len(key)
            value_at.append(len(expected))
            expected += bytes(8)
            checked += [False] * 8
        expected += avro_long(0)
        checked.append(True)
        self._map_expected = np.frombuffer(bytes(expected), dtype=np.uint8)
        self._map_checked = np.flatnonzero(checked)  # positions that must match
        self._value_at = np.array(value_at, dtype=np.int64)
        # The map keys as a LowCardinality column: version prefix (written before the map's offsets), then
        # a dictionary of the names (flags: UInt8 indexes, additional keys, new dictionary) and one index
        # per entry; 1 byte per entry instead of its whole string.
        self._keys_prefix = struct.pack("<Q", 1)
        self._keys_dictionary = struct.pack("<QQ", (1 << 9) | (1 << 10), len(names)) + b"".join(
            _native_name(n) for n in names)
        self._key_indexes = np.arange(len(names), dtype=np.uint8)
        self._joined = io.BytesIO()
        self._work: tuple[np.ndarray, ...] = (np.zeros(0),)
        # Load the compiled kernels now (numba caches them on disk; the first run compiles, ~10 s)
        # instead of in the first batch, with the argument types every batch has.
        event = {"event_id": "e", "entity_id": "c", "event_time": 0, "amount": 0.0, "currency": "EUR"}
        sample = codec.encode("prediction", {
            "event_id": "e", "entity_id": "c", "event_time": 0, "scored_at": 0, "model_name": "m", "model_version": 0, "score": None,
            "feature_set": features.FEATURE_SET_HASH, "features": dict.fromkeys(names, 0.0), "event": event,
            "event_partition": 0, "event_offset": 0}, topic)
        if self.encode([sample])[1] != 1:
            raise RuntimeError("PredictionBlockWriter cannot read a Prediction of the current schema")

    def accepts(self, message: bytes | None) -> bool:
        """Whether `message` has the framing this writer reads (the cheap check before buffering it)."""
        return bool(message) and message.startswith(self.header)

    def encode(self, messages: Sequence[bytes]) -> tuple[bytes | None, int, list[int]]:
        """(Native block or None, rows in it, leftover indexes in input order)."""
        n = len(messages)
        if not n:
            return None, 0, []
        sizes = np.fromiter(map(len, messages), dtype=np.int64, count=n)
        ends = np.cumsum(sizes)
        # The messages side by side, in a buffer kept from batch to batch (BytesIO reuses its storage):
        # a fresh 10+ MB buffer per flush cost a page fault per 4 KiB, ~a third of this method's time.
        self._joined.seek(0)
        self._joined.writelines(messages)
        with self._joined.getbuffer() as joined:
            buf = np.frombuffer(joined, dtype=np.uint8, count=int(ends[-1]))
            strings, longs, doubles, nulls, values, ok = self._work_arrays(n)
            _read(buf, ends - sizes, ends, self._header, LAYOUT, self._map_expected, self._map_checked,
                  self._value_at, strings, longs, doubles, nulls, values, ok)
            try:
                return self._block(buf, n, strings, longs, doubles, nulls, values, ok)
            finally:
                del buf  # the buffer's export must end before the next batch writes into it

    def _work_arrays(self, n: int) -> tuple[np.ndarray, ...]:
        """Zeroed (a null double is its slot's zeros) arrays for n messages, views of arrays kept across batches."""
        if len(self._work[0]) < n:
            n_max = max(n, 2 * len(self._work[0]))
            self._work = (np.zeros((n_max, len(STRINGS), 2), dtype=np.int64),  # (data position, length)
                          np.zeros((n_max, len(LONGS)), dtype=np.int64),
                          np.zeros((n_max, len(DOUBLES), 8), dtype=np.uint8),  # raw little-endian bytes
                          np.zeros((n_max, len(NULLABLE)), dtype=np.bool_),
                          np.zeros((n_max, 8 * self._n_features), dtype=np.uint8),
                          np.zeros(n_max, dtype=np.bool_))
        views = tuple(array[:n] for array in self._work)
        for view in views:
            view.fill(0)
        return views

    def _block(self, buf, n, strings, longs, doubles, nulls, values, ok) -> tuple[bytes | None, int, list[int]]:
        """The Native block of the rows `_read` took (ok), and the indexes of the others."""
        long_of = dict(zip(LONGS, longs.T))
        for name in ("event_time", "scored_at"):  # what DateTime64(3) holds, as sink_rows.checked_ms checks
            ok &= (long_of[name] >= DATETIME64_MIN_MS) & (long_of[name] <= DATETIME64_MAX_MS)
        for name in ("model_version", "event_partition"):  # UInt32 columns
            ok &= (long_of[name] >= 0) & (long_of[name] <= 0xFFFFFFFF)
        ok &= long_of["event_offset"] >= 0  # UInt64
        leftovers = np.flatnonzero(~ok).tolist()
        keep = np.flatnonzero(ok)
        rows = len(keep)
        if not rows:
            return None, 0, leftovers

        columns = {name: long_of[name][keep].astype("<i8").tobytes() for name in ("event_time", "scored_at")}
        columns["model_version"] = long_of["model_version"][keep].astype("<u4").tobytes()
        columns["event_partition"] = long_of["event_partition"][keep].astype("<u4").tobytes()
        columns["event_offset"] = long_of["event_offset"][keep].astype("<u8").tobytes()
        for slot, name in enumerate(STRINGS):
            if name in NATIVE_TYPES:
                columns[name] = _native_strings(buf, strings, slot, keep).tobytes()
        for slot, name in enumerate(DOUBLES):
            columns[name] = doubles[keep, slot].tobytes()
        for slot, name in enumerate(NULLABLE):  # a Nullable column: every row's null flag, then every value
            columns[name] = nulls[keep, slot].view(np.uint8).tobytes() + columns[name]
        columns["features"] = b"".join((
            self._keys_prefix, (np.arange(1, rows + 1, dtype="<u8") * self._n_features).tobytes(),
            self._keys_dictionary, struct.pack("<Q", rows * self._n_features),
            np.tile(self._key_indexes, rows).tobytes(), values[keep].tobytes()))
        block = [leb128(len(self.columns)), leb128(rows)]
        for name in self.columns:
            block += [_native_name(name), _native_name(NATIVE_TYPES[name]), columns[name]]
        return b"".join(block), rows, leftovers
