"""Prediction messages -> one ClickHouse Native block of the spec's `predictions` table, a batch at a time.

Building rows in Python (a list per row, then clickhouse-connect's own Native encoder) costs ~50 us
a row. `PredictionBlockWriter.encode` reads the whole batch with the compiled scanner twice: the
Prediction records, then the source events they carry (`event`, the original framed message,
read with the spec's event layout), and writes the Native columns straight from those columns:

- Native strings are an unsigned LEB128 length + the bytes, copied from the messages (`_native_strings`);
- the features array becomes a Map(LowCardinality(String), Float64): the spec's feature names are
  a dictionary, an entry is a one-byte index; its values are copied as they are;
- string columns declared LowCardinality in the table are sent as plain String, which ClickHouse
  converts on insert (input_format_native_allow_types_conversion, on by default).

Messages the compiled scan cannot read go through the generic decoder inside the scanner, so older
writer schemas and registry framing still arrive as rows. What no path can read, or what the table
cannot hold (a time outside DateTime64, features of an unknown feature set, an event that does not
decode), comes back as a rejection naming the reason and field: the logger keeps it in
rejected_events, nothing is dropped.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from streamscore.avro.codec import AvroCodec
from streamscore.avro.scanner import ROW_FAILED, RecordReader, ScannedBatch, match_prefix
from streamscore.clickhouse.rows import DATETIME64_MAX_MS, DATETIME64_MIN_MS
from streamscore.clickhouse.tables import inserted_columns, input_columns
from streamscore.kafka.io import Rejection
from streamscore.spec.model import FeatureSpec

# Native types of the fixed columns as this block declares them
FIXED_TYPES = {
    "event_id": "String", "entity_id": "String", "event_time": "DateTime64(3, 'UTC')",
    "scored_at": "DateTime64(3, 'UTC')", "model_name": "String", "model_version": "UInt32",
    "score": "Nullable(Float64)", "features": "Map(LowCardinality(String), Float64)", "feature_set": "String",
    "event_partition": "UInt32", "event_offset": "UInt64",
}
_NUMPY = {"Bool": "u1", "Int32": "<i4", "Int64": "<i8", "Float32": "<f4", "Float64": "<f8"}


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


@njit(cache=True, nogil=True)
def _native_strings(buf, starts, lengths):
    """The Native String column of buf[starts[i]:starts[i] + lengths[i]]: per row its LEB128 length, its bytes."""
    total = 0
    for i in range(len(starts)):
        length = lengths[i]
        total += length + 1
        while length >= 0x80:
            total += 1
            length >>= 7
    out = np.empty(total, dtype=np.uint8)
    o = 0
    for i in range(len(starts)):
        start, length = starts[i], lengths[i]
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


@njit(cache=True, nogil=True)
def _gather_doubles(buf, starts, counts, out):
    """The arrays of doubles at buf[starts[i]:] (counts[i] each), one after the other, as bytes in `out`."""
    o = 0
    for i in range(len(starts)):
        size = 8 * counts[i]
        for k in range(size):
            out[o + k] = buf[starts[i] + k]
        o += size


@dataclass
class Block:
    """One Native block of `predictions` (None when no row made it) and what was rejected, by message index."""

    data: bytes | None
    rows: int
    rejected: list[tuple[int, Rejection]]
    generic_rows: int  # messages (Predictions or their events) the compiled scan left to the generic decoder


class PredictionBlockWriter:
    """Framed Prediction messages -> a Native block of the spec's `predictions` table (see module docstring).

    `names_of(feature_set)` gives the feature names of another feature set (an earlier spec version's,
    recorded in `feature_sets`), or None: then those predictions are rejected, not guessed at."""

    def __init__(self, spec: FeatureSpec, codec: AvroCodec,
                 names_of: Callable[[str], Sequence[str] | None] | None = None):
        self.spec = spec
        self.predictions = RecordReader(codec, "prediction")
        self.events = RecordReader(codec, "event")
        self.names_of = names_of or (lambda feature_set: None)
        self.columns = inserted_columns(spec)
        self._input = input_columns(spec)
        layout = self.predictions.layout
        self._p = {name: layout.index(name) for name in layout.names}
        self._e = spec.event.layout
        self._feature_names = list(spec.feature_names)
        self._known: dict[str, list[str] | None] = {spec.feature_set: self._feature_names}
        self._own_feature_set = np.frombuffer(spec.feature_set.encode(), dtype=np.uint8)

    def encode(self, messages: Sequence[bytes | None]) -> Block:
        n = len(messages)
        predictions = self.predictions.read_batch(messages)
        p = self._p
        rejected: dict[int, Rejection] = {}
        for i, error in predictions.errors.items():
            rejected[i] = (Rejection("undecodable", None, "empty message value") if error is None
                           else Rejection(error.reason, error.field, str(error)))
        ok = predictions.status != ROW_FAILED
        ints = predictions.ints
        for name in ("event_time", "scored_at"):  # what DateTime64(3) holds
            column = ints[:, p[name]]
            self._reject(rejected, ok & ((column < DATETIME64_MIN_MS) | (column > DATETIME64_MAX_MS)),
                         lambda i, name=name: Rejection("out_of_range", name,
                                                        f"{name} {int(ints[i, p[name]])} ms is outside the years "
                                                        "1900..2299"))
        for name in ("model_version", "event_partition"):  # UInt32 columns
            column = ints[:, p[name]]
            self._reject(rejected, ok & ((column < 0) | (column > 0xFFFFFFFF)),
                         lambda i, name=name: Rejection("out_of_range", name, f"{name} {int(ints[i, p[name]])} "
                                                                             "does not fit UInt32"))
        self._reject(rejected, ok & (ints[:, p["event_offset"]] < 0),
                     lambda i: Rejection("out_of_range", "event_offset", "event_offset is negative"))
        candidates = ok.copy()
        candidates[list(rejected)] = False
        rows = np.flatnonzero(candidates).tolist()
        names, looked_up = self._names(predictions, rows, rejected)
        if len(names) < len(rows):
            rows = [i for i in rows if i in names]
        at = np.asarray(rows, dtype=np.int64)
        events = self.events.read_spans(predictions.raw, predictions.ints[at, p["event"]],
                                        predictions.lengths[at, p["event"]])
        for k, error in events.errors.items():
            rejected[rows[k]] = (Rejection("undecodable", "event", "the prediction's event is empty") if error is None
                                 else Rejection(error.reason, f"event.{error.field}" if error.field else "event",
                                                f"the prediction's event: {error}"))
        keep = np.flatnonzero(events.status != ROW_FAILED)
        rows_kept = at[keep]
        generic = predictions.generic_rows + events.generic_rows
        if not len(rows_kept):
            return Block(None, 0, sorted(rejected.items()), generic)
        # None: every row has the spec's own names (the usual batch: no list of lists to build and check)
        own = all(names is self._feature_names for names in map(names.get, looked_up))
        row_names = None if own else [names[i] for i in rows_kept.tolist()]
        data = self._block(predictions, rows_kept, events, keep, row_names)
        return Block(data, len(rows_kept), sorted(rejected.items()), generic)

    @staticmethod
    def _reject(rejected: dict, mask: np.ndarray, make) -> None:
        for i in np.flatnonzero(mask).tolist():
            rejected.setdefault(i, make(i))

    def _names(self, predictions: ScannedBatch, rows: list[int],
               rejected: dict) -> tuple[dict[int, list[str]], list[int]]:
        """The feature names of each row's feature set (rows of an unknown one, or of the wrong length, are
        rejected), and the rows not of the spec's own feature set (looked up one by one)."""
        p = self._p
        # the spec's own feature set, with its feature count, checked for all rows in one compiled loop;
        # only the others (an earlier spec's, a corrupted one) are looked at one by one
        at = np.asarray(rows, dtype=np.int64)
        mine = self._own_feature_set
        starts, lengths = predictions.ints[at, p["feature_set"]], predictions.lengths[at, p["feature_set"]]
        matched = np.zeros(len(at), dtype=np.bool_)
        match_prefix(predictions.buffer, starts, lengths, mine, matched)
        own = matched & (lengths == len(mine)) & (predictions.lengths[at, p["features"]] == len(self._feature_names))
        out = dict.fromkeys(at[own].tolist(), self._feature_names)
        others = at[~own]
        for i, feature_set in zip(others.tolist(), predictions.texts(p["feature_set"], others)):
            key = feature_set.decode(errors="replace")
            if key not in self._known:
                names = self.names_of(key)
                self._known[key] = list(names) if names is not None else None
            names = self._known[key]
            count = int(predictions.lengths[i, p["features"]])
            if names is None:
                rejected[i] = Rejection("unknown_feature_set", "feature_set",
                                        f"feature set {key!r} is not recorded in feature_sets: its feature names "
                                        "are unknown")
            elif len(names) != count:
                rejected[i] = Rejection("invalid_value", "features",
                                        f"{count} features for feature set {key!r}, which has {len(names)}")
            else:
                out[i] = names
        return out, others.tolist()

    def _block(self, predictions: ScannedBatch, rows: np.ndarray, events: ScannedBatch, event_rows: np.ndarray,
               names: list[list[str]] | None) -> bytes:
        p = self._p
        n = len(rows)
        pbuf = predictions.buffer
        ints, floats, nulls = predictions.ints, predictions.floats, predictions.nulls
        columns: dict[str, tuple[str, bytes]] = {}

        def strings(batch: ScannedBatch, buf, column: int, which: np.ndarray) -> bytes:
            return _native_strings(buf, batch.ints[which, column], batch.lengths[which, column]).tobytes()

        for name in ("event_id", "entity_id", "model_name", "feature_set"):
            columns[name] = (FIXED_TYPES[name], strings(predictions, pbuf, p[name], rows))
        for name in ("event_time", "scored_at"):
            columns[name] = (FIXED_TYPES[name], ints[rows, p[name]].astype("<i8").tobytes())
        columns["model_version"] = ("UInt32", ints[rows, p["model_version"]].astype("<u4").tobytes())
        columns["event_partition"] = ("UInt32", ints[rows, p["event_partition"]].astype("<u4").tobytes())
        columns["event_offset"] = ("UInt64", ints[rows, p["event_offset"]].astype("<u8").tobytes())
        score_null = nulls[rows, p["score"]]
        scores = np.where(score_null.astype(bool), 0.0, floats[rows, p["score"]]).astype("<f8")
        columns["score"] = (FIXED_TYPES["score"], score_null.tobytes() + scores.tobytes())
        columns["features"] = (FIXED_TYPES["features"], self._features(predictions, rows, names))
        ebuf = events.buffer
        for name, _ in self._input:
            field = self._e.field(name)
            j = self._e.index(name)
            base = "String" if field.is_text else {"boolean": "Bool", "int": "Int32", "long": "Int64",
                                                   "float": "Float32", "double": "Float64"}[field.type]
            if field.is_text:
                values = strings(events, ebuf, j, event_rows)
            elif field.type in ("float", "double"):
                values = np.nan_to_num(events.floats[event_rows, j], nan=0.0) if field.nullable else \
                    events.floats[event_rows, j]
                values = np.asarray(values).astype(_NUMPY[base]).tobytes()
            else:
                values = events.ints[event_rows, j].astype(_NUMPY[base]).tobytes()
            if field.nullable:
                kind = f"Nullable({base})"
                values = events.nulls[event_rows, j].tobytes() + values
            else:
                kind = base
            columns[name] = (kind, values)
        block = [leb128(len(self.columns)), leb128(n)]
        for name in self.columns:
            kind, data = columns[name]
            block += [_native_name(name), _native_name(kind), data]
        return b"".join(block)

    def _features(self, predictions: ScannedBatch, rows: np.ndarray, names: list[list[str]] | None) -> bytes:
        """Map(LowCardinality(String), Float64): offsets, then the keys as a LowCardinality column (a dictionary
        of the names, one index per entry), then the values."""
        p = self._p
        counts = predictions.lengths[rows, p["features"]]
        total = int(counts.sum())
        values = np.empty(8 * total, dtype=np.uint8)
        _gather_doubles(predictions.buffer, predictions.ints[rows, p["features"]], counts, values)
        if names is None:
            dictionary = self._feature_names
            indexes = np.tile(np.arange(len(dictionary), dtype=np.uint16), len(rows))
        else:
            dictionary = sorted({name for entry in names for name in entry})
            position = {name: k for k, name in enumerate(dictionary)}
            indexes = np.array([position[name] for entry in names for name in entry], dtype=np.uint16)
        index_type, dtype = (0, np.uint8) if len(dictionary) < 256 else (1, np.uint16)
        # LowCardinality: version prefix (before the map's offsets), then flags (index width, has additional
        # keys, new dictionary), the dictionary, the index count and the indexes
        return b"".join((
            struct.pack("<Q", 1), np.cumsum(counts).astype("<u8").tobytes(),
            struct.pack("<QQ", index_type | (1 << 9) | (1 << 10), len(dictionary)),
            b"".join(_native_name(name) for name in dictionary), struct.pack("<Q", total),
            indexes.astype(dtype).tobytes(), values.tobytes()))
