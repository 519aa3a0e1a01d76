"""Business checks on decoded events, as the spec declares them, before an event may touch feature state.

The Avro schema only guarantees types. `EventValidator` rejects what it cannot: an empty or blank
event id or entity, an event time too old or in the future, and each field check of the spec
(required, finite, min/max, allowed values, length, pattern). An event's first failing check, in
that order (the spec's field checks in the order written), becomes its dead-letter reason, naming
the field and the offending value.

A batch is checked column by column (one numpy operation per check over the whole batch), so a
clean batch costs a few numpy calls, not a Python call per event; only failures build a message.
Patterns run in Python, once per distinct value (memoised).
"""
from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from streamscore.avro.scanner import ScannedBatch
from streamscore.clickhouse.rows import DATETIME64_MAX_MS, DATETIME64_MIN_MS
from streamscore.kafka.io import Rejection
from streamscore.spec.model import FeatureSpec, FieldCheck
from streamscore.spec.text import Vocabulary

# Reason codes (dead-letter header `error.reason`); the codec's decode reasons are undecodable,
# unknown_schema, wrong_schema and missing_field.
MISSING_FIELD = "missing_field"
NULL_ENTITY = "null_entity"
INVALID_VALUE = "invalid_value"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
FUTURE_EVENT_TIME = "future_event_time"
STALE_EVENT_TIME = "stale_event_time"
# Not a validation failure: the scorer's feature state already applied this event id (spec.engine).
DUPLICATE_EVENT = "duplicate_event"
REASONS = (MISSING_FIELD, NULL_ENTITY, INVALID_VALUE, NON_FINITE, OUT_OF_RANGE, FUTURE_EVENT_TIME,
           STALE_EVENT_TIME, DUPLICATE_EVENT)

_MAX_MEMO = 10_000  # distinct values whose pattern verdict is remembered
_BLANK_FIRST_BYTES = np.zeros(256, dtype=bool)
_BLANK_FIRST_BYTES[list(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85")] = True
_BLANK_FIRST_BYTES[0x80:] = True  # a non-ASCII first byte may start Unicode whitespace: Python decides


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class EventValidator:
    """The spec's checks as a function of a batch: `check(batch, rows, now_ms)`."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        layout = spec.event.layout
        self.layout = layout
        self._id = layout.index(spec.event.id_field)
        self._entity = layout.index(spec.event.entity_field)
        self._time = layout.index(spec.event.time_field)
        self._divisor = spec.event.time_divisor
        self._checks = [(check, layout.index(check.field)) for check in spec.checks]
        self._allowed = {check.field: Vocabulary(check.allowed) for check in spec.checks if check.allowed}
        self._patterns = {check.field: re.compile(check.pattern) for check in spec.checks if check.pattern}
        self._memo: dict[tuple[str, bytes], bool] = {}

    def check(self, batch: ScannedBatch, rows: np.ndarray, now_ms: int) -> tuple[np.ndarray, list]:
        """(rows that pass, [(row, Rejection, event id or None)] for the others, in row order)."""
        rows = np.asarray(rows, dtype=np.int64)
        failed = np.zeros(len(rows), dtype=bool)
        rejections: list[tuple[int, Rejection]] = []

        def reject(mask: np.ndarray, make: Callable[[int], Rejection]) -> None:
            mask = mask & ~failed
            if not mask.any():
                return
            failed[mask] = True
            for k in np.flatnonzero(mask).tolist():
                rejections.append((int(rows[k]), make(int(rows[k]))))

        spec, layout = self.spec, self.layout
        id_name, entity_name, time_name = spec.event.id_field, spec.event.entity_field, spec.event.time_field
        reject(self._blank(batch, rows, self._id),
               lambda r: Rejection(MISSING_FIELD, id_name, f"{id_name} must be a non-empty string, got "
                                                           f"{_short(batch.value(r, self._id))}"))
        reject(self._blank(batch, rows, self._entity),
               lambda r: Rejection(NULL_ENTITY, entity_name,
                                   f"{entity_name} must be a non-empty string, got "
                                   f"{_short(batch.value(r, self._entity))} (event {self._event_id(batch, r)!r})"))
        times = batch.ints[rows, self._time] // self._divisor
        newest = now_ms + spec.max_event_future_ms
        oldest = now_ms - spec.max_event_age_ms
        reject((times > newest) | (times > DATETIME64_MAX_MS),
               lambda r: Rejection(FUTURE_EVENT_TIME, time_name,
                                   f"{time_name} {self._time_of(batch, r)} is "
                                   f"{(self._time_of(batch, r) - now_ms) / 1000:.0f} s in the future (limit "
                                   f"max_future {spec.max_event_future_ms / 1000:g} s)"))
        reject((times < oldest) | (times < DATETIME64_MIN_MS),
               lambda r: Rejection(STALE_EVENT_TIME, time_name,
                                   f"{time_name} {self._time_of(batch, r)} is "
                                   f"{(now_ms - self._time_of(batch, r)) / 86_400_000:.1f} days old (limit "
                                   f"max_age {spec.max_event_age_ms / 86_400_000:g} days)"))
        for check, column in self._checks:
            self._field_checks(batch, rows, check, column, layout.fields[column], reject)
        rejections.sort(key=lambda item: item[0])
        return rows[~failed], [(row, rejection, self._event_id(batch, row)) for row, rejection in rejections]

    # --- helpers ----------------------------------------------------------------------
    def _event_id(self, batch: ScannedBatch, row: int) -> str | None:
        value = batch.value(row, self._id)
        return value if isinstance(value, str) and value.strip() else None

    def _time_of(self, batch: ScannedBatch, row: int) -> int:
        return int(batch.ints[row, self._time]) // self._divisor

    def _blank(self, batch: ScannedBatch, rows: np.ndarray, column: int) -> np.ndarray:
        """Null, empty, or nothing but whitespace (Python's str.strip decides for the rare suspicious ones)."""
        lengths = batch.lengths[rows, column]
        blank = (lengths == 0) | batch.nulls[rows, column].astype(bool)
        buf = batch.buffer
        first = np.zeros(len(rows), dtype=np.uint8)
        present = ~blank
        first[present] = buf[batch.ints[rows[present], column]]
        for k in np.flatnonzero(present & _BLANK_FIRST_BYTES[first]).tolist():
            blank[k] = not batch.value(int(rows[k]), column).strip()
        return blank

    def _field_checks(self, batch: ScannedBatch, rows: np.ndarray, check: FieldCheck, column: int, field,
                      reject) -> None:
        null = batch.nulls[rows, column].astype(bool)
        name = check.field

        def got(r: int) -> str:
            return f"{name} = {_short(batch.value(r, column))} (event {self._event_id(batch, r)!r})"

        if check.required:
            reject(null, lambda r: Rejection(MISSING_FIELD, name, f"{name} is required but null "
                                                                  f"(event {self._event_id(batch, r)!r})"))
        if field.is_numeric:
            values = (batch.floats[rows, column] if field.type in ("float", "double")
                      else batch.ints[rows, column].astype(np.float64))
            if check.finite:
                reject(~null & ~np.isfinite(values), lambda r: Rejection(NON_FINITE, name, f"{got(r)} must be finite"))
            if check.min is not None:
                reject(~null & (values < check.min),
                       lambda r: Rejection(OUT_OF_RANGE, name, f"{got(r)} is below min {check.min:g}"))
            if check.max is not None:
                reject(~null & (values > check.max),
                       lambda r: Rejection(OUT_OF_RANGE, name, f"{got(r)} is above max {check.max:g}"))
            return
        lengths = batch.lengths[rows, column]
        if check.allowed is not None:
            codes = np.zeros((len(rows), 1), dtype=np.float64)
            self._allowed[name].encode_into(batch.buffer, batch.ints[rows, column], lengths,
                                            batch.nulls[rows, column], codes, 0)
            outside = ~null & (codes[:, 0] < 2)
            reject(outside, lambda r: Rejection(INVALID_VALUE, name, f"{got(r)} is not one of the allowed values "
                                                                     f"{_short(list(check.allowed), 120)}"))
        if check.min_length is not None or check.max_length is not None:
            low = check.min_length or 0
            high = check.max_length if check.max_length is not None else np.iinfo(np.int64).max
            # byte length bounds the character length from above; only the uncertain rows are decoded
            uncertain = ~null & (lengths >= low)
            chars = lengths.copy()
            for k in np.flatnonzero(uncertain & ((lengths > high) | (lengths >= low))).tolist():
                value = batch.text(int(rows[k]), column)
                if not value.isascii():
                    chars[k] = len(value.decode(errors="replace")) if field.type == "string" else len(value)
            reject(~null & ((chars < low) | (chars > high)),
                   lambda r: Rejection(INVALID_VALUE, name, f"{got(r)} has a length outside "
                                                            f"[{low}, {check.max_length if check.max_length is not None else 'inf'}]"))
        if check.pattern is not None:
            pattern = self._patterns[name]
            memo = self._memo
            bad = np.zeros(len(rows), dtype=bool)
            for k, value in enumerate(batch.texts(column, rows)):
                if null[k]:
                    continue
                verdict = memo.get((name, value))
                if verdict is None:
                    text = value.decode(errors="replace") if field.type == "string" else value.decode("latin-1")
                    verdict = pattern.fullmatch(text) is not None
                    if len(memo) < _MAX_MEMO:
                        memo[(name, value)] = verdict
                bad[k] = not verdict
            reject(bad, lambda r: Rejection(INVALID_VALUE, name, f"{got(r)} does not match the pattern "
                                                                 f"{check.pattern!r}"))
