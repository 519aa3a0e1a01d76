"""The feature engine: a spec compiled into arrays, and one compiled loop that computes every feature.

There is one implementation of the features, used online (the scorer) and offline (the training
set): `FeatureEngine.compute` runs a batch of events of one partition, in arrival order, through
`process_events` (numba) against that partition's `PartitionState`. Training replays logged
events the same way with fresh states, so online and offline vectors are identical bit for bit
(tests compare them, and a naive reference interpreter of the spec, spec.oracle, over random
specs and streams).

Semantics (docs/spec-reference.md quotes these)
-----------------------------------------------
* Point in time: an event's features use only the entity's events that ARRIVED EARLIER (per entity,
  by Kafka offset within its partition), never the event itself or anything after it.
* A windowed aggregate over W, for an event at time t, covers the prior events with
  ``t - W < time <= t``; a prior event that happened later than t (it arrived earlier but is out
  of order) is not counted: an event never sees its own future.
* count: events (with a field: events where it is not null); sum, mean, std (sample, ddof=1), min,
  max, last (the latest non-null value): over the non-null values; distinct_count: distinct non-null,
  non-empty values; time_since_previous: seconds since the latest prior event in the window.
  NaN where undefined (mean/min/max/last of nothing, std of fewer than 2, no previous event); counts
  and sums of empty windows are 0. mean and std add the values' differences from the window's first
  value, in time order: identical values give exactly their value and a std of exactly 0.
* Transforms of the current event: log1p (NaN at or below -1), hour_of_day and day_of_week of the
  event time in UTC (Monday = 0), ratio = value / aggregate (NaN when the aggregate is 0 or NaN),
  zscore = (value - mean) / std over the window (NaN when the std is not > 0).
* Encodings: 0 = null or empty, 1 = unknown, 2.. = position in the vocabulary (fixed in the spec, or
  learned at training time and frozen into the model version).
* Lateness: an entity's watermark is the largest event time it has applied. An event with
  ``time < watermark - lateness`` is late: it is scored from what the state retains, but not added
  to it. The state retains ``lateness + the longest window`` behind the watermark: exactly what every
  non-late event's windows need, so their features are exact however long the entity lives.
* Replays: an event at an offset the entity already applied (a crash replay) is scored from the events
  that arrived before that offset and not applied again. A re-sent event (its event id already
  applied at another offset) is a duplicate: not applied, and the scorer dead-letters it
  (`duplicate_event`); its vector is its first arrival's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from streamscore.avro.scanner import ScannedBatch
from streamscore.spec.model import FeatureSpec
from streamscore.spec.text import Vocabulary, hash_column, text_hash
from streamscore.state.partition import (COL_KEY, COL_OFFSET, COL_TIME, FIRST_VALUE_COL, META_GARBAGE, META_TOP,
                                         META_WATERMARK, NO_OFFSET, PartitionState)

# aggregate codes (EnginePlan.aggregates[:, 0])
A_COUNT, A_SUM, A_MEAN, A_STD, A_MIN, A_MAX, A_DISTINCT, A_LAST, A_SINCE = range(9)
AGGREGATE_CODES = {"count": A_COUNT, "sum": A_SUM, "mean": A_MEAN, "std": A_STD, "min": A_MIN, "max": A_MAX,
                   "distinct_count": A_DISTINCT, "last": A_LAST, "time_since_previous": A_SINCE}
# feature codes (EnginePlan.features[:, 0])
F_FIELD, F_LOG1P, F_HOUR, F_DOW, F_AGGREGATE, F_RATIO, F_ZSCORE, F_ENCODE = range(8)
# what process_events did with each event (its `status` output)
APPLIED, REPLAYED, DUPLICATE, LATE = 0, 1, 2, 3
SOURCE_NUMERIC, SOURCE_TEXT = 0, 1

_EVERYTHING = np.int64(2 ** 63 - 1)
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


@njit(cache=True, nogil=True)
def _bisect_right(rows, lo, hi, t):
    """First row index in [lo, hi) whose time is > t (rows sorted by time)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if rows[mid, 0] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _bisect_left(rows, lo, hi, t):
    """First row index in [lo, hi) whose time is >= t."""
    while lo < hi:
        mid = (lo + hi) // 2
        if rows[mid, 0] < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _aggregate(fn, column, source, rows, frows, first, hi, window_ms, t, before, scratch):
    """One aggregate over the rows in [first, hi) with time > t - window_ms and source offset < `before`."""
    lo = _bisect_right(rows, first, hi, t - window_ms) if window_ms > 0 else first
    if fn == A_SINCE:
        for r in range(hi - 1, lo - 1, -1):
            if rows[r, COL_OFFSET] < before:
                return (t - rows[r, COL_TIME]) / 1000.0
        return np.nan
    if fn == A_COUNT:
        c = 0
        for r in range(lo, hi):
            if rows[r, COL_OFFSET] < before:
                if column < 0:
                    c += 1
                elif source == SOURCE_TEXT:
                    if rows[r, column] != 0:
                        c += 1
                elif not np.isnan(frows[r, column]):
                    c += 1
        return float(c)
    if fn == A_DISTINCT:
        k = 0
        for r in range(lo, hi):
            if rows[r, COL_OFFSET] < before:
                h = rows[r, column]
                if h != 0:
                    scratch[k] = h
                    k += 1
        if k == 0:
            return 0.0
        values = scratch[:k]
        values.sort()
        distinct = 1
        for j in range(1, k):
            if values[j] != values[j - 1]:
                distinct += 1
        return float(distinct)
    if fn == A_LAST:
        for r in range(hi - 1, lo - 1, -1):
            if rows[r, COL_OFFSET] < before:
                x = frows[r, column]
                if not np.isnan(x):
                    return x
        return np.nan
    # sum, mean, std, min, max over the non-null values, in time order
    m = 0
    total = 0.0
    shift = 0.0
    s1 = 0.0
    s2 = 0.0
    low = np.inf
    high = -np.inf
    for r in range(lo, hi):
        if rows[r, COL_OFFSET] >= before:
            continue
        x = frows[r, column]
        if np.isnan(x):
            continue
        if m == 0:
            shift = x
        m += 1
        total += x
        d = x - shift
        s1 += d
        s2 += d * d
        if x < low:
            low = x
        if x > high:
            high = x
    if fn == A_SUM:
        return total
    if m == 0:
        return np.nan
    if fn == A_MEAN:
        return shift + s1 / m
    if fn == A_STD:
        if m < 2:
            return np.nan
        variance = (s2 - s1 * s1 / m) / (m - 1)
        return math.sqrt(variance) if variance > 0.0 else 0.0
    if fn == A_MIN:
        return low
    return high


@njit(cache=True, nogil=True)
def process_events(begin, slots, times, offsets, keys, numeric, texts,
                   rows, frows, base, cap, start, count, last_offset, dirty, meta,
                   state_sources, state_columns, aggregates, features, lateness_ms, retention_ms,
                   out, status, first_offsets):
    """Features of events[begin:], each from its entity's state BEFORE it, then the event applied (see module
    docstring). Returns the index of the first event not processed: len(slots) when done, else the event that
    needs an arena region larger than what is free (the caller makes room and calls again from there)."""
    n_aggregates = aggregates.shape[0]
    values = np.empty(max(n_aggregates, 1), dtype=np.float64)
    scratch = np.empty(64, dtype=np.int64)
    arena_rows = rows.shape[0]
    n_state = state_sources.shape[0]
    for i in range(begin, len(slots)):
        s = slots[i]
        t = times[i]
        offset = offsets[i]
        key = keys[i]
        first = base[s] + start[s]
        n = count[s]
        end = first + n

        kind = APPLIED
        before = _EVERYTHING
        if key != 0:
            for r in range(first, end):
                if rows[r, COL_KEY] == key and rows[r, COL_OFFSET] != offset:
                    kind = DUPLICATE
                    first_offsets[i] = rows[r, COL_OFFSET]
                    if rows[r, COL_OFFSET] >= 0:
                        before = rows[r, COL_OFFSET]
                    break
        if kind == APPLIED and offset >= 0 and last_offset[s] >= 0 and offset <= last_offset[s]:
            kind = REPLAYED
            before = offset
        if kind == APPLIED and n > 0 and t < rows[end - 1, COL_TIME] - lateness_ms:
            kind = LATE
        if kind == APPLIED and start[s] + n >= cap[s] and start[s] == 0:  # full: the region must move
            new_cap = max(2, 2 * cap[s])
            if meta[META_TOP] + new_cap > arena_rows:
                return i  # no room: the caller grows the arena and calls again from this event
        if n > len(scratch):
            scratch = np.empty(2 * n, dtype=np.int64)

        hi = _bisect_right(rows, first, end, t)
        for a in range(n_aggregates):
            values[a] = _aggregate(aggregates[a, 0], aggregates[a, 2], aggregates[a, 3], rows, frows, first, hi,
                                   aggregates[a, 1], t, before, scratch)
        for f in range(features.shape[0]):
            code = features[f, 0]
            if code == F_FIELD:
                out[i, f] = numeric[i, features[f, 1]]
            elif code == F_LOG1P:
                x = numeric[i, features[f, 1]]
                out[i, f] = math.log1p(x) if x > -1.0 else np.nan
            elif code == F_HOUR:
                out[i, f] = float((t // HOUR_MS) % 24)
            elif code == F_DOW:
                out[i, f] = float((t // DAY_MS + 3) % 7)
            elif code == F_AGGREGATE:
                out[i, f] = values[features[f, 1]]
            elif code == F_RATIO:
                d = values[features[f, 2]]
                out[i, f] = numeric[i, features[f, 1]] / d if d != 0.0 and not np.isnan(d) else np.nan
            elif code == F_ZSCORE:
                sd = values[features[f, 3]]
                x = numeric[i, features[f, 1]]
                out[i, f] = (x - values[features[f, 2]]) / sd if sd > 0.0 else np.nan
        status[i] = kind
        if kind == DUPLICATE or kind == REPLAYED:
            continue
        if offset >= 0:
            last_offset[s] = offset
        dirty[s] = 1
        if kind == LATE:
            continue

        # apply: make room for one more row, insert in time order (ties: arrival order), evict
        if start[s] + n >= cap[s]:
            if start[s] > 0:  # slide the live rows to the front of the region
                b = base[s]
                for r in range(n):
                    rows[b + r, :] = rows[first + r, :]
                start[s] = 0
            else:  # move to a region twice the size at the arena's end
                new_cap = max(2, 2 * cap[s])
                top = meta[META_TOP]
                for r in range(n):
                    rows[top + r, :] = rows[first + r, :]
                meta[META_GARBAGE] += cap[s]
                base[s] = top
                cap[s] = new_cap
                start[s] = 0
                meta[META_TOP] = top + new_cap
            first = base[s]
            end = first + n
            hi = _bisect_right(rows, first, end, t)
        at = _bisect_right(rows, hi, end, t)  # after every retained event with time <= t
        for r in range(end, at, -1):
            rows[r, :] = rows[r - 1, :]
        rows[at, COL_TIME] = t
        rows[at, COL_OFFSET] = offset
        rows[at, COL_KEY] = key
        for c in range(n_state):
            if state_sources[c] == SOURCE_NUMERIC:
                frows[at, FIRST_VALUE_COL + c] = numeric[i, state_columns[c]]
            else:
                rows[at, FIRST_VALUE_COL + c] = texts[i, state_columns[c]]
        n += 1
        end += 1
        if t > meta[META_WATERMARK]:
            meta[META_WATERMARK] = t
        horizon = rows[end - 1, COL_TIME] - retention_ms
        if rows[first, COL_TIME] < horizon:
            drop = _bisect_left(rows, first, end, horizon) - first
            start[s] += drop
            n -= drop
        count[s] = n
    return len(slots)


@dataclass(frozen=True)
class EngineInputs:
    """One batch of events of one partition, in arrival order, as the kernel reads them."""

    entity_ids: list[bytes]
    times: np.ndarray  # int64 ms
    offsets: np.ndarray  # int64, NO_OFFSET when unknown
    keys: np.ndarray  # int64 hash of the event id
    numeric: np.ndarray  # (n, numeric inputs) float64, NaN for null
    texts: np.ndarray  # (n, text inputs) int64 hashes, 0 for null/empty
    batch: ScannedBatch  # the source columns (encodings read the text spans)
    rows: np.ndarray  # which rows of `batch` these events are

    def __len__(self) -> int:
        return len(self.times)


class EnginePlan:
    """A FeatureSpec compiled into the arrays `process_events` interprets (no Python per event)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        layout = spec.event.layout
        self.numeric_fields: list[str] = []
        self.text_fields: list[str] = []

        def numeric(name: str) -> int:
            if name not in self.numeric_fields:
                self.numeric_fields.append(name)
            return self.numeric_fields.index(name)

        def text(name: str) -> int:
            if name not in self.text_fields:
                self.text_fields.append(name)
            return self.text_fields.index(name)

        state: list[tuple[int, int]] = []  # (source, input column) per state column
        aggregates: list[tuple[int, int, int, int]] = []

        def aggregate(op: str, field: str | None, window_ms: int | None) -> int:
            column, source = -1, SOURCE_NUMERIC
            if field is not None:
                is_text = layout.field(field).is_text
                source = SOURCE_TEXT if is_text else SOURCE_NUMERIC
                pair = (source, text(field) if is_text else numeric(field))
                if pair not in state:
                    state.append(pair)
                column = FIRST_VALUE_COL + state.index(pair)
            entry = (AGGREGATE_CODES[op], window_ms or 0, column, source)
            if entry not in aggregates:
                aggregates.append(entry)
            return aggregates.index(entry)

        features = []
        self.encodings: list[tuple[int, int, object]] = []  # (feature column, text field index in layout, feature)
        for position, feature in enumerate(spec.features):
            if feature.kind == "field":
                features.append((F_FIELD, numeric(feature.field), 0, 0))
            elif feature.kind == "aggregate":
                features.append((F_AGGREGATE, aggregate(feature.op, feature.field, feature.window_ms), 0, 0))
            elif feature.op == "log1p":
                features.append((F_LOG1P, numeric(feature.field), 0, 0))
            elif feature.op == "hour_of_day":
                features.append((F_HOUR, 0, 0, 0))
            elif feature.op == "day_of_week":
                features.append((F_DOW, 0, 0, 0))
            elif feature.op == "ratio":
                features.append((F_RATIO, numeric(feature.field),
                                 aggregate(feature.of, feature.field, feature.window_ms), 0))
            elif feature.op == "zscore":
                features.append((F_ZSCORE, numeric(feature.field),
                                 aggregate("mean", feature.field, feature.window_ms),
                                 aggregate("std", feature.field, feature.window_ms)))
            else:  # an encoding: filled from the text spans after the kernel (it needs no state)
                features.append((F_ENCODE, 0, 0, 0))
                self.encodings.append((position, layout.index(feature.field), feature))
        self.features = np.array(features, dtype=np.int64).reshape(len(features), 4)
        self.aggregates = np.array(aggregates, dtype=np.int64).reshape(len(aggregates), 4)
        self.state_sources = np.array([source for source, _ in state], dtype=np.int64)
        self.state_columns = np.array([column for _, column in state], dtype=np.int64)
        self.width = FIRST_VALUE_COL + len(state)
        # the state layout: which fields the rows hold (a different layout's changelog is refused)
        described = [[("numeric", "text")[source], (self.numeric_fields, self.text_fields)[source][column]]
                     for source, column in state]
        self.layout_id = text_hash(json.dumps(described).encode())
        self._numeric_index = [layout.index(name) for name in self.numeric_fields]
        self._text_index = [layout.index(name) for name in self.text_fields]
        self._numeric_is_float = [layout.field(name).type in ("float", "double") for name in self.numeric_fields]
        self.id_index = layout.index(spec.event.id_field)
        self.entity_index = layout.index(spec.event.entity_field)
        self.time_index = layout.index(spec.event.time_field)

    def new_state(self) -> PartitionState:
        return PartitionState(self.width, self.layout_id)


class FeatureEngine:
    """Computes feature matrices of event batches against partition states (see module docstring)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.plan = EnginePlan(spec)
        self.fixed_vocabularies = {position: Vocabulary(feature.values)
                                   for position, _, feature in self.plan.encodings if feature.op == "vocabulary"}
        self.n_features = len(spec.features)

    def new_state(self) -> PartitionState:
        return self.plan.new_state()

    def inputs(self, batch: ScannedBatch, rows: np.ndarray, offsets: np.ndarray) -> EngineInputs:
        """The kernel's view of `batch`'s rows `rows` (accepted events of one partition, in arrival order)."""
        plan = self.plan
        rows = np.asarray(rows, dtype=np.int64)
        buf = batch.buffer
        n = len(rows)
        numeric = np.empty((n, len(plan.numeric_fields)), dtype=np.float64)
        for j, (field, is_float) in enumerate(zip(plan._numeric_index, plan._numeric_is_float)):
            column = batch.floats[rows, field] if is_float else batch.ints[rows, field].astype(np.float64)
            column[batch.nulls[rows, field].astype(bool)] = np.nan
            numeric[:, j] = column
        texts = np.empty((n, len(plan.text_fields)), dtype=np.int64)
        for j, field in enumerate(plan._text_index):
            hashed = np.empty(n, dtype=np.int64)
            hash_column(buf, batch.ints[rows, field], batch.lengths[rows, field], batch.nulls[rows, field], hashed)
            texts[:, j] = hashed
        keys = np.empty(n, dtype=np.int64)
        hash_column(buf, batch.ints[rows, plan.id_index], batch.lengths[rows, plan.id_index],
                    batch.nulls[rows, plan.id_index], keys)
        times = batch.ints[rows, plan.time_index]
        if self.spec.event.time_divisor != 1:
            times = times // self.spec.event.time_divisor
        return EngineInputs(entity_ids=batch.texts(plan.entity_index, rows), times=np.ascontiguousarray(times),
                            offsets=np.asarray(offsets, dtype=np.int64), keys=keys, numeric=numeric, texts=texts,
                            batch=batch, rows=rows)

    def compute(self, state: PartitionState, inputs: EngineInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features with encodings still 0, status per event, first offset of each duplicate); updates `state`."""
        n = len(inputs)
        plan = self.plan
        out = np.zeros((n, self.n_features), dtype=np.float64)
        status = np.zeros(n, dtype=np.int64)
        first_offsets = np.full(n, NO_OFFSET, dtype=np.int64)
        slots = state.slots_for(inputs.entity_ids)
        position = 0
        while position < n:
            position = process_events(
                position, slots, inputs.times, inputs.offsets, inputs.keys, inputs.numeric, inputs.texts,
                state.rows, state.rows.view(np.float64), state.base, state.cap, state.start, state.count,
                state.last_offset, state.dirty, state.meta, plan.state_sources, plan.state_columns,
                plan.aggregates, plan.features, self.spec.lateness_ms, self.spec.retention_ms,
                out, status, first_offsets)
            if position < n:
                state.ensure_rows(max(64, 2 * int(state.cap[slots[position]]) + 2))
        return out, status, first_offsets

    def encode(self, matrix: np.ndarray, inputs: EngineInputs, learned: dict[str, Vocabulary] | None = None) -> None:
        """Fill the encoded columns: fixed vocabularies from the spec, learned ones from `learned` (feature name
        -> the model version's vocabulary; none yet: every non-empty value is unknown)."""
        batch, rows = inputs.batch, inputs.rows
        buf = batch.buffer
        empty = Vocabulary(())
        for position, field, feature in self.plan.encodings:
            vocabulary = self.fixed_vocabularies.get(position)
            if vocabulary is None:
                vocabulary = (learned or {}).get(feature.name, empty)
            vocabulary.encode_into(buf, batch.ints[rows, field], batch.lengths[rows, field],
                                   batch.nulls[rows, field], matrix, position)
