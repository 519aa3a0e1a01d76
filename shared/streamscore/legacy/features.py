"""The one feature definition, used by the scorer (online) and the trainer (offline).

Every feature vector is computed by `_feature_vector` from an entity's state and
the event; the scorer calls it through `compute_batch`, the trainer through
`offline_features`, which replays logged events in arrival order with fresh
state. There is no second implementation, so there is no training/serving skew
as long as both paths see the same events in the same order.

Semantics (quoted by the README)
--------------------------------
* Point in time. The features of an event use only the entity's events that
  ARRIVED EARLIER (processing order: per entity, by Kafka offset), never the
  event itself or anything after it.
* Windows are anchored at the event's own event_time t and count prior events
  with ``t - W < time <= t`` (W = 1 h, 24 h, 7 d). A prior event whose event time
  is later than t (it arrived earlier but happened later) is not counted: an
  out-of-order event never sees its own future.
* ``secs_since_prev`` = t minus the latest prior event time <= t, in seconds
  (NaN if there is none).
* ``mean_7d`` / ``std_7d`` are over the amounts in the 7 d window; std is the
  sample standard deviation (ddof=1). ``amount_to_mean_7d`` = amount / mean_7d,
  ``amount_zscore_7d`` = (amount - mean_7d) / std_7d.
* Window sums, means and stds add the prior amounts rounded to 1e-6
  (AMOUNT_SCALE) in exact integer arithmetic: results do not depend on the
  order events were added, and identical amounts give a std of exactly 0.
* NaN where undefined: mean with 0 events, std with < 2 events, ratio when the
  mean is not > 0, z-score when the std is 0, secs_since_prev with no prior
  event. Counts and sums of empty windows are 0.
* ``distinct_mcc_24h`` counts distinct non-null merchant categories in the 24 h
  window.
* ``hour_of_day`` is the UTC hour of event_time.
* ``log_amount`` = ln(1 + amount).
* Categorical codes (``*_code``): 0 = null or empty string, 1 = a value not in
  the fixed vocabulary (exact, case-sensitive match), 2.. = vocabulary position.
* Watermark and lateness. An entity's watermark is the largest event time it
  has applied. An event is LATE when ``event_time < watermark - 7 d``
  (ALLOWED_LATENESS_MS). A late event is still scored, from whatever the state
  retains (its windows may be incomplete), but it is NOT added to the state:
  later events never count it.
* Retention. The state keeps events with ``time >= watermark - 14 d``
  (ALLOWED_LATENESS + the 7 d window). That is exactly what every non-late
  event's windows need, so features of non-late events are exact no matter how
  long the entity lives. For secs_since_prev across the retention edge the state
  also remembers the latest event time it dropped.
* Replays. `compute_and_update` with an offset <= the entity's last applied
  offset (a crash replay) does not apply the event again. It recomputes the
  vector from the retained events that arrived before that offset. That is the
  vector of the first scoring whenever the replayed event is not late against
  the entity's CURRENT watermark (retention then still holds everything the
  first scoring read); otherwise it is scored like a late event, from what is
  retained. Offsets are per Kafka partition, so keep one states dict per
  partition, as the scorer does; `offline_features` does the same.
* Re-sent events. An event whose event_id was already applied to its entity's
  state at ANOTHER offset (a producer re-send; found among the retained events
  by a 64-bit key of the event_id) is a duplicate: it is not applied again, and
  `compute_and_update` returns the vector of its first arrival (like a crash
  replay of that offset). The scorer does not score it but dead-letters it
  (`duplicate_event`); the offline replay applies the same rule. A late event
  is never applied, so its id is not remembered and a re-send of it is scored
  (as late, not applied) again.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from hashlib import blake2b
from itertools import accumulate
from operator import mul

import numpy as np

# Bump when the meaning of a feature changes without a visible change below
# (e.g. a formula); it is part of FEATURE_SET_HASH.
FEATURE_SET_VERSION = 1

FEATURE_NAMES: tuple[str, ...] = (
    "amount", "log_amount", "hour_of_day", "count_1h", "sum_1h", "count_24h", "sum_24h",
    "mean_7d", "std_7d", "secs_since_prev", "distinct_mcc_24h", "amount_to_mean_7d",
    "amount_zscore_7d", "currency_code", "mcc_code", "channel_code", "country_code",
)
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(name for name in FEATURE_NAMES if name.endswith("_code"))
N_FEATURES = len(FEATURE_NAMES)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WINDOW_1H_MS = HOUR_MS
WINDOW_24H_MS = DAY_MS
WINDOW_7D_MS = 7 * DAY_MS
ALLOWED_LATENESS_MS = 7 * DAY_MS
RETENTION_MS = ALLOWED_LATENESS_MS + WINDOW_7D_MS
# Window aggregates add amounts as integers in units of 1e-6 (exact sums, see EntityState).
AMOUNT_SCALE = 1_000_000

NULL_CODE = 0
UNKNOWN_CODE = 1
FIRST_VOCABULARY_CODE = 2

CURRENCIES: tuple[str, ...] = ("EUR", "USD", "GBP", "CHF", "JPY", "SEK", "NOK", "DKK", "PLN", "CAD")
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "5411",  # grocery stores, supermarkets
    "5812",  # restaurants
    "5814",  # fast food
    "5541",  # service stations
    "5542",  # automated fuel dispensers
    "5311",  # department stores
    "5912",  # drug stores, pharmacies
    "5999",  # miscellaneous retail
    "5732",  # electronics stores
    "5691",  # clothing stores
    "4111",  # commuter transport
    "4121",  # taxis, limousines
    "4814",  # telecommunication services
    "7011",  # hotels, lodging
    "4511",  # airlines
    "5967",  # direct marketing, inbound teleservices
    "7995",  # betting, casino gambling
    "6011",  # ATM cash disbursement
    "6051",  # quasi cash (crypto, money orders)
    "4829",  # wire transfers, money orders
)
CHANNELS: tuple[str, ...] = ("pos", "ecom", "atm", "moto")
COUNTRIES: tuple[str, ...] = (
    "DE", "FR", "NL", "BE", "ES", "IT", "PT", "AT", "CH", "GB",
    "IE", "SE", "NO", "DK", "PL", "FI", "LU", "US", "CA", "JP",
)


def _codes(vocabulary: Sequence[str]) -> dict[str, int]:
    return {value: FIRST_VOCABULARY_CODE + i for i, value in enumerate(vocabulary)}


CURRENCY_CODES = _codes(CURRENCIES)
MCC_CODES = _codes(MERCHANT_CATEGORIES)
CHANNEL_CODES = _codes(CHANNELS)
COUNTRY_CODES = _codes(COUNTRIES)
# The same codes as the floats a feature vector holds (one dict lookup per categorical, no float()).
_CURRENCY_VALUES = {value: float(code) for value, code in CURRENCY_CODES.items()}
_MCC_VALUES = {value: float(code) for value, code in MCC_CODES.items()}
_CHANNEL_VALUES = {value: float(code) for value, code in CHANNEL_CODES.items()}
_COUNTRY_VALUES = {value: float(code) for value, code in COUNTRY_CODES.items()}
_UNKNOWN_VALUE = float(UNKNOWN_CODE)
_NULL_VALUE = float(NULL_CODE)
# One str object per vocabulary category, kept by every state instead of each event's freshly decoded copy:
# a state's mccs then point at a few shared, cache-hot objects (distinct_mcc_24h's set() reads them), and
# an entity's retained events do not each hold a ~53-byte string.
_SHARED_MCCS = {value: value for value in MERCHANT_CATEGORIES}


def feature_set_description(
    *,
    version: int = FEATURE_SET_VERSION,
    names: Sequence[str] = FEATURE_NAMES,
    windows_ms: Mapping[str, int] | None = None,
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    allowed_lateness_ms: int = ALLOWED_LATENESS_MS,
    retention_ms: int = RETENTION_MS,
) -> str:
    """Canonical JSON of everything that defines the features (input of FEATURE_SET_HASH)."""
    description = {
        "version": version,
        "names": list(names),
        "categorical": [n for n in names if n.endswith("_code")],
        "windows_ms": dict(windows_ms or {"1h": WINDOW_1H_MS, "24h": WINDOW_24H_MS, "7d": WINDOW_7D_MS}),
        "vocabularies": {k: list(v) for k, v in (vocabularies or {
            "currency": CURRENCIES, "merchant_category": MERCHANT_CATEGORIES,
            "channel": CHANNELS, "country": COUNTRIES,
        }).items()},
        "codes": {"null": NULL_CODE, "unknown": UNKNOWN_CODE, "first": FIRST_VOCABULARY_CODE},
        "lateness": {"allowed_ms": allowed_lateness_ms, "late_events_update_state": False},
        "retention_ms": retention_ms,
        "std_ddof": 1,
        "amount_scale": AMOUNT_SCALE,
    }
    return json.dumps(description, sort_keys=True, separators=(",", ":"))


def feature_set_hash(description: str) -> str:
    return hashlib.sha256(description.encode()).hexdigest()[:16]


# The scorer refuses a model trained with a different hash.
FEATURE_SET_HASH = feature_set_hash(feature_set_description())


# --- per-entity state ------------------------------------------------------------------

_NO_VALUE = -(2**63)  # int64 sentinel for "none" in the serialised form
_HEADER = struct.Struct("<BIIqqq")  # format, n events, palette bytes, last offset, evicted time, evicted offset
_ROW = struct.Struct("<qqqqH")  # format 3, one per retained event: time, units, offset, key, palette index
_ROW_SIZE = _ROW.size
# 3 stores a row per event (appending an event appends a row, so a state's encoding is kept and extended,
# see EntityState.to_bytes); formats 1 and 2 (a column per field) are still read, see from_bytes
_STATE_FORMAT = 3
_COLUMNS_FORMAT = 2  # 2 added the event keys column
_OLD_STATE_FORMAT_WITHOUT_KEYS = 1
_BIG_ENDIAN = sys.byteorder == "big"
_unpack_key = struct.Struct("<q").unpack
UNKNOWN_EVENT_KEY = 0  # a retained event whose event_id is not known (state migrated from format 1)


def event_key(event_id: str) -> int:
    """The 64-bit key an entity state remembers for an event_id (stable across processes, never 0)."""
    # Python's hash() is salted per process; the key is stored in the changelog, so it must not be.
    return _unpack_key(blake2b(event_id.encode(), digest_size=8).digest())[0] or 1


def amount_units(amount: float) -> int:
    """An amount as an integer number of AMOUNT_SCALE units (what window aggregates add up)."""
    return round(amount * AMOUNT_SCALE)


class EntityState:
    """What one entity's features need: its retained events and a few scalars.

    Retained events are parallel lists sorted by event time (ties in arrival
    order): `times` (epoch ms), `units` (amount in AMOUNT_SCALE integer units),
    `mccs` (merchant category or None), `offsets` (source offset, -1 when none
    was given) and `keys` (`event_key` of the event_id, UNKNOWN_EVENT_KEY when
    not known). `key_offsets` maps each known key to its offset: the duplicate
    check is one dict lookup; it is a cache rebuilt from `keys` on load. `evicted_time` / `evicted_offset` describe the latest event that
    retention dropped (for secs_since_prev); `last_offset` is the last applied
    source offset.

    Window sums come from integer prefix sums of `units` and `units**2`
    (`sum_prefix[i]` = sum of the first i units plus an arbitrary base): a
    window is a difference of two entries, O(1) and exact. They are a cache
    rebuilt from `units` on load; only differences are ever read, so a restored
    state computes bit-identical features.

    The changelog encoding is kept between checkpoints (`to_bytes`): `_rows` holds the encoded rows,
    `_rows[_rows_skip:][:_rows_valid]` (in rows) being those of the first `_rows_valid` retained
    events; `_palette` lists the merchant categories the rows index (append-only between resets).
    `apply` only moves these marks, so writing a state costs the events applied since its last write.
    """

    __slots__ = ("times", "units", "mccs", "offsets", "keys", "last_offset", "evicted_time", "evicted_offset",
                 "sum_prefix", "square_prefix", "key_offsets", "_rows", "_rows_skip", "_rows_valid", "_palette",
                 "_palette_json")
    _CANONICAL = ("times", "units", "mccs", "offsets", "keys", "last_offset", "evicted_time", "evicted_offset")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.units: list[int] = []
        self.mccs: list[str | None] = []
        self.offsets: list[int] = []
        self.keys: list[int] = []
        self.last_offset: int | None = None
        self.evicted_time: int | None = None
        self.evicted_offset: int | None = None
        self.sum_prefix: list[int] = [0]
        self.square_prefix: list[int] = [0]
        self.key_offsets: dict[int, int] = {}
        self._rows = b""
        self._rows_skip = 0
        self._rows_valid = 0
        self._palette: list[str | None] | None = None  # None: not written yet
        self._palette_json = b""

    def _rebuild_caches(self) -> None:
        self.sum_prefix = list(accumulate(self.units, initial=0))
        self.square_prefix = list(accumulate(map(mul, self.units, self.units), initial=0))
        self.key_offsets = {key: offset for key, offset in zip(self.keys, self.offsets) if key != UNKNOWN_EVENT_KEY}

    @property
    def watermark(self) -> int | None:
        """Largest event time applied (the newest event is never evicted, so it is the last one)."""
        return self.times[-1] if self.times else None

    @property
    def amounts(self) -> list[float]:
        return [u / AMOUNT_SCALE for u in self.units]

    def __len__(self) -> int:
        return len(self.times)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EntityState):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._CANONICAL)

    def __repr__(self) -> str:
        return (f"EntityState(events={len(self.times)}, watermark={self.watermark}, "
                f"last_offset={self.last_offset}, evicted_time={self.evicted_time})")

    def is_late(self, event_time: int) -> bool:
        return bool(self.times) and event_time < self.times[-1] - ALLOWED_LATENESS_MS

    def first_offset_of(self, key: int, offset: int | None) -> int | None:
        """If the event with `key` arriving at `offset` re-sends a retained event: that event's offset (-1 if
        it had none). None for a new event, and for the same offset again (a crash replay, not a re-send)."""
        first = self.key_offsets.get(key)
        if first is None or first == offset:
            return None
        return first

    def apply(self, event_time: int, amount: float, mcc: str | None, offset: int | None,
              key: int = UNKNOWN_EVENT_KEY) -> None:
        """Add a (non-late) event, then drop what retention no longer needs. Late events only advance the offset.

        `key` is the event_key of its event_id (see compute_and_update: a re-sent key is never applied)."""
        if offset is not None:
            self.last_offset = offset
        times = self.times
        if times and event_time < times[-1] - ALLOWED_LATENESS_MS:  # late: see is_late
            return
        units = round(amount * AMOUNT_SCALE)  # amount_units, inlined (hot path)
        square = units * units
        mcc = _SHARED_MCCS.get(mcc, mcc)
        stored_offset = -1 if offset is None else offset
        sum_prefix, square_prefix = self.sum_prefix, self.square_prefix
        if not times or event_time >= times[-1]:
            times.append(event_time)
            self.units.append(units)
            self.mccs.append(mcc)
            self.offsets.append(stored_offset)
            self.keys.append(key)
            sum_prefix.append(sum_prefix[-1] + units)
            square_prefix.append(square_prefix[-1] + square)
        else:  # out of order: insert, and shift the prefixes after it (usually a few seconds' worth)
            at = bisect_right(times, event_time)
            times.insert(at, event_time)
            self.units.insert(at, units)
            self.mccs.insert(at, mcc)
            self.offsets.insert(at, stored_offset)
            self.keys.insert(at, key)
            sum_prefix.insert(at + 1, sum_prefix[at] + units)
            square_prefix.insert(at + 1, square_prefix[at] + square)
            for i in range(at + 2, len(sum_prefix)):
                sum_prefix[i] += units
                square_prefix[i] += square
            if at < self._rows_valid:  # the encoded rows from `at` on moved
                self._rows_valid = at
        if key:  # not UNKNOWN_EVENT_KEY (0)
            self.key_offsets[key] = stored_offset
        horizon = times[-1] - RETENTION_MS  # keep time >= watermark - retention
        if times[0] < horizon:  # something to drop (usually not: then no bisect)
            drop = bisect_left(times, horizon)
            self.evicted_time = times[drop - 1]
            self.evicted_offset = self.offsets[drop - 1]
            key_offsets, keys = self.key_offsets, self.keys
            for i in range(drop):
                key_offsets.pop(keys[i], None)
            del times[:drop], self.units[:drop], self.mccs[:drop], self.offsets[:drop], self.keys[:drop]
            del sum_prefix[:drop], square_prefix[:drop]
            if drop < self._rows_valid:
                self._rows_skip += drop
                self._rows_valid -= drop
            else:
                self._rows, self._rows_skip, self._rows_valid = b"", 0, 0

    def arrived_before(self, offset: int) -> EntityState:
        """A copy holding only the retained events with a smaller source offset (to score a replay)."""
        view = EntityState()
        for time, units, mcc, event_offset, key in zip(self.times, self.units, self.mccs, self.offsets, self.keys):
            if event_offset < offset:
                view.times.append(time)
                view.units.append(units)
                view.mccs.append(mcc)
                view.offsets.append(event_offset)
                view.keys.append(key)
        view._rebuild_caches()
        if self.evicted_offset is not None and self.evicted_offset < offset:
            view.evicted_time, view.evicted_offset = self.evicted_time, self.evicted_offset
        return view

    # --- serialisation (compacted changelog value) -------------------------------
    def to_bytes(self) -> bytes:
        """Compact little-endian binary form (format 3): header, one row per retained event (time, units,
        offset, key as int64, palette index as uint16), JSON palette of merchant categories.

        Written for every changed entity at every scorer checkpoint: the rows written last time are
        kept, so only events applied since are encoded (the rest is one copy in C). The palette may
        list categories no row uses any more (evicted); it is rebuilt once it outgrows the events."""
        times, n = self.times, len(self.times)
        palette = self._palette
        if palette is None or len(palette) > 2 * n + 8:
            palette = self._palette = []
            self._rows, self._rows_skip, self._rows_valid = b"", 0, 0
            self._palette_json = b""
        valid = self._rows_valid
        start = self._rows_skip * _ROW_SIZE
        rows = self._rows[start:start + valid * _ROW_SIZE]
        if valid < n:  # usually one or two rows: indexing beats slicing five lists
            pack, units, offsets, keys, mccs = _ROW.pack, self.units, self.offsets, self.keys, self.mccs
            new = [rows]
            for i in range(valid, n):
                mcc = mccs[i]
                try:
                    index = palette.index(mcc)
                except ValueError:
                    index = len(palette)
                    palette.append(mcc)
                    self._palette_json = b""
                new.append(pack(times[i], units[i], offsets[i], keys[i], index))
            rows = b"".join(new)
        self._rows, self._rows_skip, self._rows_valid = rows, 0, n
        palette_json = self._palette_json or _palette_bytes(palette)
        self._palette_json = palette_json
        header = _HEADER.pack(
            _STATE_FORMAT, n, len(palette_json),
            _NO_VALUE if self.last_offset is None else self.last_offset,
            _NO_VALUE if self.evicted_time is None else self.evicted_time,
            _NO_VALUE if self.evicted_offset is None else self.evicted_offset,
        )
        return b"".join((header, rows, palette_json))

    @classmethod
    def from_bytes(cls, data: bytes) -> EntityState:
        """The state `to_bytes` wrote; ValueError naming the problem for anything else.

        Formats 2 and 1 (a column per field, written before format 3) are read too; format 1 (before event
        keys existed) is migrated: its retained events get UNKNOWN_EVENT_KEY, so only re-sends of events
        applied after the upgrade are recognised."""
        if len(data) < _HEADER.size:
            raise ValueError(f"entity state is {len(data)} bytes, shorter than its {_HEADER.size}-byte header")
        fmt, n, palette_len, last_offset, evicted_time, evicted_offset = _HEADER.unpack_from(data)
        if fmt == _STATE_FORMAT:
            state = _read_rows(data, n, palette_len)
        elif fmt in (_COLUMNS_FORMAT, _OLD_STATE_FORMAT_WITHOUT_KEYS):
            state = _read_columns(data, fmt, n, palette_len)
        else:
            raise ValueError(f"entity state format {fmt} is not a supported format "
                             f"({_OLD_STATE_FORMAT_WITHOUT_KEYS} to {_STATE_FORMAT})")
        state.last_offset = None if last_offset == _NO_VALUE else last_offset
        state.evicted_time = None if evicted_time == _NO_VALUE else evicted_time
        state.evicted_offset = None if evicted_offset == _NO_VALUE else evicted_offset
        state._rebuild_caches()
        return state


def _palette_bytes(palette: list[str | None]) -> bytes:
    return json.dumps(palette, separators=(",", ":")).encode()


def _read_palette(data: bytes) -> list[str | None]:
    try:
        palette = json.loads(data)
    except ValueError:
        raise ValueError("entity state's merchant-category palette is not JSON") from None
    if type(palette) is not list or not all(mcc is None or type(mcc) is str for mcc in palette):
        raise ValueError("entity state's merchant-category palette is not a list of strings and nulls")
    return [_SHARED_MCCS.get(mcc, mcc) for mcc in palette]


def _read_rows(data: bytes, n: int, palette_len: int) -> EntityState:
    """A format-3 state's events (scalars are the caller's); its encoding is kept for the next to_bytes."""
    rows_end = _HEADER.size + n * _ROW_SIZE
    if len(data) != rows_end + palette_len:
        raise ValueError(f"entity state (format {_STATE_FORMAT}) with {n} events should be "
                         f"{rows_end + palette_len} bytes, got {len(data)}")
    palette = _read_palette(data[rows_end:])
    rows = data[_HEADER.size:rows_end]
    state = EntityState()
    if n:
        times, units, offsets, keys, indexes = zip(*_ROW.iter_unpack(rows))
        try:
            state.mccs = [palette[i] for i in indexes]
        except IndexError:
            raise ValueError("entity state references a merchant category outside its palette") from None
        state.times, state.units, state.offsets, state.keys = list(times), list(units), list(offsets), list(keys)
    if len(set(palette)) == len(palette):  # as to_bytes writes it: keep the encoding
        state._rows, state._rows_valid = rows, n
        state._palette, state._palette_json = palette, data[rows_end:]
    return state


def _read_columns(data: bytes, fmt: int, n: int, palette_len: int) -> EntityState:
    """A format-1 or format-2 state's events: int64 columns (times, units, offsets[, keys]), uint16 mcc
    indexes, JSON palette."""
    has_keys = fmt == _COLUMNS_FORMAT
    widths = (("q", 8), ("q", 8), ("q", 8)) + ((("q", 8),) if has_keys else ()) + (("H", 2),)
    expected = _HEADER.size + n * sum(width for _, width in widths) + palette_len
    if len(data) != expected:
        raise ValueError(f"entity state (format {fmt}) with {n} events should be {expected} bytes, "
                         f"got {len(data)}")
    pos = _HEADER.size
    columns = []
    for typecode, width in widths:
        column = array(typecode)
        column.frombytes(data[pos:pos + n * width])
        if _BIG_ENDIAN:
            column.byteswap()
        columns.append(column)
        pos += n * width
    palette = _read_palette(data[pos:pos + palette_len])
    times, units, offsets = columns[:3]
    state = EntityState()
    state.times = times.tolist()
    state.units = units.tolist()
    state.offsets = offsets.tolist()
    state.keys = columns[3].tolist() if has_keys else [UNKNOWN_EVENT_KEY] * n
    try:
        state.mccs = [palette[i] for i in columns[-1]]
    except IndexError:
        raise ValueError("entity state references a merchant category outside its palette") from None
    return state


# --- the features ----------------------------------------------------------------------

_NAN = math.nan
_log1p = math.log1p
_sqrt = math.sqrt
_SCALE_SQUARED = AMOUNT_SCALE * AMOUNT_SCALE


def _feature_vector(state: EntityState, event: Mapping) -> list[float]:
    """THE feature definition: the vector of `event` given the entity's prior `state` (not modified)."""
    t = event["event_time"]
    amount = float(event["amount"])
    times = state.times
    sum_prefix = state.sum_prefix

    hi = bisect_right(times, t)  # prior events with time <= t are times[:hi]
    lo_7d = bisect_right(times, t - WINDOW_7D_MS, 0, hi)
    lo_24h = bisect_right(times, t - WINDOW_24H_MS, lo_7d, hi)
    lo_1h = bisect_right(times, t - WINDOW_1H_MS, lo_24h, hi)
    top = sum_prefix[hi]

    count_1h = hi - lo_1h
    sum_1h = (top - sum_prefix[lo_1h]) / AMOUNT_SCALE
    count_24h = hi - lo_24h
    sum_24h = (top - sum_prefix[lo_24h]) / AMOUNT_SCALE

    n_7d = hi - lo_7d
    if n_7d:
        units_7d = top - sum_prefix[lo_7d]
        mean_7d = units_7d / (n_7d * AMOUNT_SCALE)
        if n_7d >= 2:
            squares_7d = state.square_prefix[hi] - state.square_prefix[lo_7d]
            # exact integer numerator: no cancellation, identical amounts give exactly 0
            std_7d = _sqrt((n_7d * squares_7d - units_7d * units_7d) / (n_7d * (n_7d - 1) * _SCALE_SQUARED))
        else:
            std_7d = _NAN
    else:
        mean_7d = std_7d = _NAN

    if hi:
        secs_since_prev = (t - times[hi - 1]) / 1000.0
    elif state.evicted_time is not None and state.evicted_time <= t:
        secs_since_prev = (t - state.evicted_time) / 1000.0
    else:
        secs_since_prev = _NAN

    if count_24h:
        mccs = set(state.mccs[lo_24h:hi])
        mccs.discard(None)
        distinct_mcc_24h = float(len(mccs))
    else:
        distinct_mcc_24h = 0.0

    amount_to_mean_7d = amount / mean_7d if mean_7d > 0 else _NAN  # NaN > 0 is False
    amount_zscore_7d = (amount - mean_7d) / std_7d if std_7d > 0 else _NAN

    currency = event.get("currency")
    mcc = event.get("merchant_category")
    channel = event.get("channel")
    country = event.get("country")
    return [
        amount,
        _log1p(amount),
        float(t // HOUR_MS % 24),
        float(count_1h),
        sum_1h,
        float(count_24h),
        sum_24h,
        mean_7d,
        std_7d,
        secs_since_prev,
        distinct_mcc_24h,
        amount_to_mean_7d,
        amount_zscore_7d,
        _CURRENCY_VALUES.get(currency, _UNKNOWN_VALUE) if currency else _NULL_VALUE,
        _MCC_VALUES.get(mcc, _UNKNOWN_VALUE) if mcc else _NULL_VALUE,
        _CHANNEL_VALUES.get(channel, _UNKNOWN_VALUE) if channel else _NULL_VALUE,
        _COUNTRY_VALUES.get(country, _UNKNOWN_VALUE) if country else _NULL_VALUE,
    ]


def is_duplicate(states: Mapping[str, EntityState], event: Mapping, offset: int | None = None) -> int | None:
    """If `event` re-sends an event_id already applied to its entity's state at another offset (a producer
    re-send): the offset of that first arrival (-1 if it came without one). None for a new event and for
    a crash replay of the same offset. `compute_and_update` applies this rule itself."""
    state = states.get(event["entity_id"])
    if state is None:
        return None
    return state.first_offset_of(event_key(event["event_id"]), offset)


def _compute_and_update(states: dict[str, EntityState], event: Mapping,
                        offset: int | None) -> tuple[list[float], int | None]:
    """`compute_and_update`, plus the first arrival's offset when the event is a re-send (else None)."""
    entity_id = event["entity_id"]
    state = states.get(entity_id)
    if state is None:
        state = states[entity_id] = EntityState()
    key = _unpack_key(blake2b(event["event_id"].encode(), digest_size=8).digest())[0] or 1  # event_key, inlined
    first = state.key_offsets.get(key)  # state.first_offset_of, inlined (hot path)
    if first is not None and first != offset:  # a re-send: never applied twice
        return _feature_vector(state.arrived_before(first) if first >= 0 else state, event), first
    if offset is not None and state.last_offset is not None and offset <= state.last_offset:
        return _feature_vector(state.arrived_before(offset), event), None
    vector = _feature_vector(state, event)
    state.apply(event["event_time"], float(event["amount"]), event.get("merchant_category") or None, offset, key)
    return vector, None


def compute_and_update(states: dict[str, EntityState], event: Mapping, offset: int | None = None) -> list[float]:
    """The event's feature vector from its entity's state BEFORE it, then the event applied to the state.

    `event` must have passed validation (streamscore.legacy.validation). A replay
    (offset <= the entity's last applied offset) is scored from the events that
    arrived before it and not applied again; so is a re-send of an applied
    event_id (see `is_duplicate`), which gets its first arrival's vector (see
    the module docstring; without offsets, the vector from the current state).
    """
    return _compute_and_update(states, event, offset)[0]


def compute_batch(states: dict[str, EntityState], events: Sequence[Mapping],
                  offsets: Sequence[int] | None = None,
                  duplicates: list[tuple[int, int]] | None = None) -> np.ndarray:
    """`compute_and_update` for each event in order; an (n, N_FEATURES) float64 matrix.

    If `duplicates` is a list, (position in `events`, offset of the first arrival) is appended to it for
    every re-sent event (see `is_duplicate`): the scorer dead-letters those instead of scoring them. The
    check runs in order with the updates, so a re-send in the same batch as its original is found too.
    """
    if offsets is None:
        offsets = [None] * len(events)
    elif len(offsets) != len(events):
        raise ValueError(f"compute_batch got {len(events)} events but {len(offsets)} offsets")
    compute = _compute_and_update
    values: list[float] = []  # the rows one after the other: one flat list converts faster than a list of rows
    extend = values.extend
    for position, (event, offset) in enumerate(zip(events, offsets)):
        vector, first = compute(states, event, offset)
        extend(vector)
        if first is not None and duplicates is not None:
            duplicates.append((position, first))
    return np.array(values, dtype=np.float64).reshape(len(events), N_FEATURES)


def offline_features(events_in_arrival_order: Iterable[Mapping]) -> np.ndarray:
    """Replay logged events through the scorer's code with fresh state: the training-time feature matrix.

    Events must be in the scorer's processing order (per entity by
    (event_partition, event_offset)). When an event carries `event_partition` /
    `event_offset` (as logged predictions do), states are kept per partition and
    the offset is passed on, exactly as the scorer does, so a logged duplicate
    is not counted twice; otherwise each event is applied in the given order.
    A re-sent event_id is not applied again either (the scorer's rule, see
    `is_duplicate`); its row is its first arrival's vector. Logged predictions
    never hold one (the scorer dead-letters re-sends), but raw event lists may.
    """
    partitions: dict[object, dict[str, EntityState]] = {}
    rows = []
    for event in events_in_arrival_order:
        states = partitions.get(event.get("event_partition"))
        if states is None:
            states = partitions[event.get("event_partition")] = {}
        rows.append(_compute_and_update(states, event, event.get("event_offset"))[0])
    if not rows:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    return np.array(rows, dtype=np.float64)
