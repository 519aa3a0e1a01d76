"""The entity states of one Kafka partition, as arrays the compiled feature engine reads and updates.

A partition is the unit that moves between scorer instances, so its entities' states live
together: one arena of int64 rows (one row per retained event: event time, source offset, the
event-id key, then the fields the spec's aggregates read, floats stored as their bits), and per
entity (a "slot") where its rows are. An entity's rows are contiguous and sorted by event time
(ties in arrival order): a region `[base, base + cap)` of the arena holding `count` live rows
from `base + start`. Eviction from the front only moves `start`; a full region moves (doubling)
to the arena's end, leaving garbage that `compact` reclaims when the arena is grown.

Why arrays and not an object per entity: the engine runs per batch in one compiled loop (no
Python per event), and a state of 4 events costs about 300 bytes (the old per-entity Python
lists cost 2,490); the measured figure is in `streamscore bench` (memory section).

The changelog value of one entity (`encode`) is versioned: format byte, the engine's state-layout
id (a different spec's state is refused, not misread), row count, last applied offset, the rows.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
from numba import njit

COL_TIME, COL_OFFSET, COL_KEY = 0, 1, 2
FIRST_VALUE_COL = 3
NO_OFFSET = -1
META_TOP, META_GARBAGE, META_WATERMARK = 0, 1, 2
NO_WATERMARK = -(2 ** 63)

STATE_FORMAT = 4  # formats 1-3 were the per-entity Python states of the hard-coded payments features
_HEADER = struct.Struct("<BqIq")  # format, state-layout id, rows, last offset
HEADER_SIZE = _HEADER.size


class StateFormatError(ValueError):
    """A changelog value this engine cannot restore (corrupt, or written for another state layout)."""


@njit(cache=True, nogil=True)
def _compact_into(rows, new_rows, base, cap, start, count, n_slots):
    """Copy every slot's live rows to the front of its region in `new_rows`, regions packed; returns the top."""
    top = 0
    for s in range(n_slots):
        c = cap[s]
        if c == 0:
            base[s] = top
            start[s] = 0
            continue
        b = base[s] + start[s]
        for r in range(count[s]):
            new_rows[top + r, :] = rows[b + r, :]
        base[s] = top
        start[s] = 0
        top += c
    return top


@njit(cache=True, nogil=True)
def _put(out, pos, value, size):
    """`value`'s low `size` bytes, little-endian, at out[pos:pos + size]."""
    for k in range(size):
        out[pos + k] = (value >> (8 * k)) & 0xFF


@njit(cache=True, nogil=True)
def _encode_slots(rows, base, start, count, last_offset, slots, layout_id, out, ends):
    """Changelog values of `slots`, one after the other in `out` (bytes); ends[i] = end of the i-th."""
    width = rows.shape[1]
    pos = 0
    for i in range(len(slots)):
        s = slots[i]
        n = count[s]
        out[pos] = STATE_FORMAT
        _put(out, pos + 1, layout_id, 8)
        _put(out, pos + 9, n, 4)
        _put(out, pos + 13, last_offset[s], 8)
        pos += HEADER_SIZE
        b = base[s] + start[s]
        for r in range(b, b + n):
            for c in range(width):
                _put(out, pos, rows[r, c], 8)
                pos += 8
        ends[i] = pos


class PartitionState:
    """Entity states of one partition (see module docstring). `width` = FIRST_VALUE_COL + state columns."""

    def __init__(self, width: int, layout_id: int, initial_rows: int = 1024, initial_slots: int = 256):
        self.width = width
        self.layout_id = layout_id
        self.slot_of: dict[bytes, int] = {}
        self.entity_ids: list[bytes | None] = []
        self._free: list[int] = []
        self.rows = np.zeros((initial_rows, width), dtype=np.int64)
        self.base = np.zeros(initial_slots, dtype=np.int64)
        self.cap = np.zeros(initial_slots, dtype=np.int64)
        self.start = np.zeros(initial_slots, dtype=np.int64)
        self.count = np.zeros(initial_slots, dtype=np.int64)
        self.last_offset = np.full(initial_slots, NO_OFFSET, dtype=np.int64)
        self.dirty = np.zeros(initial_slots, dtype=np.uint8)
        self.meta = np.array([0, 0, NO_WATERMARK], dtype=np.int64)  # top, garbage rows, watermark

    # --- entities ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, entity_id: bytes) -> bool:
        return entity_id in self.slot_of

    @property
    def watermark(self) -> int | None:
        """The largest event time applied in this partition (None before the first)."""
        value = int(self.meta[META_WATERMARK])
        return None if value == NO_WATERMARK else value

    def slots_for(self, entity_ids: Sequence[bytes]) -> np.ndarray:
        """The slot of each entity, new entities getting an empty one."""
        slot_of = self.slot_of
        out = np.empty(len(entity_ids), dtype=np.int64)
        for i, entity in enumerate(entity_ids):
            slot = slot_of.get(entity)
            if slot is None:
                slot = self._new_slot(entity)
            out[i] = slot
        return out

    def _new_slot(self, entity: bytes) -> int:
        if self._free:
            slot = self._free.pop()
            self.entity_ids[slot] = entity
        else:
            slot = len(self.entity_ids)
            self.entity_ids.append(entity)
            if slot >= len(self.base):
                self._grow_slots(2 * len(self.base))
        self.base[slot] = self.meta[META_TOP]
        self.cap[slot] = self.start[slot] = self.count[slot] = 0
        self.last_offset[slot] = NO_OFFSET
        self.dirty[slot] = 0
        self.slot_of[entity] = slot
        return slot

    def _grow_slots(self, size: int) -> None:
        for name, fill in (("base", 0), ("cap", 0), ("start", 0), ("count", 0), ("last_offset", NO_OFFSET),
                           ("dirty", 0)):
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def ensure_rows(self, needed: int) -> None:
        """Room for `needed` more rows at the arena's end: compacts (dropping garbage) and grows when short."""
        top, garbage = int(self.meta[META_TOP]), int(self.meta[META_GARBAGE])
        if top + needed <= len(self.rows):
            return
        live = top - garbage
        size = max(len(self.rows), 2 * (live + needed))
        new_rows = np.zeros((size, self.width), dtype=np.int64)
        n_slots = len(self.entity_ids)
        self.meta[META_TOP] = _compact_into(self.rows, new_rows, self.base, self.cap, self.start, self.count,
                                            n_slots)
        self.meta[META_GARBAGE] = 0
        self.rows = new_rows

    def events_of(self, entity_id: bytes) -> np.ndarray:
        """The retained rows of one entity (a copy), oldest first."""
        slot = self.slot_of[entity_id]
        b = int(self.base[slot] + self.start[slot])
        return self.rows[b:b + int(self.count[slot])].copy()

    def drop(self, entity_ids: Iterable[bytes]) -> None:
        for entity in entity_ids:
            slot = self.slot_of.pop(entity, None)
            if slot is None:
                continue
            self.meta[META_GARBAGE] += self.cap[slot]
            self.cap[slot] = self.count[slot] = self.start[slot] = 0
            self.dirty[slot] = 0
            self.entity_ids[slot] = None
            self._free.append(slot)

    def expired(self, horizon_ms: int) -> list[bytes]:
        """Entities whose newest event is older than `horizon_ms`: no future event's windows can reach them."""
        slots = np.flatnonzero(self.count[:len(self.entity_ids)] > 0)
        newest = self.rows[self.base[slots] + self.start[slots] + self.count[slots] - 1, COL_TIME]
        return [self.entity_ids[s] for s in slots[newest < horizon_ms].tolist()]

    # --- changelog ------------------------------------------------------------------
    def take_dirty(self) -> list[int]:
        """Slots changed since the last call (and clears their marks)."""
        n = len(self.entity_ids)
        slots = np.flatnonzero(self.dirty[:n]).tolist()
        self.dirty[:n] = 0
        return slots

    def encode(self, slots: Sequence[int]) -> list[tuple[bytes, bytes]]:
        """(entity id, changelog value) of each slot still holding an entity."""
        slots = [s for s in slots if self.entity_ids[s] is not None]
        if not slots:
            return []
        slot_array = np.array(slots, dtype=np.int64)
        size = int(len(slots) * HEADER_SIZE + self.count[slot_array].sum() * self.width * 8)
        out = np.empty(size, dtype=np.uint8)
        ends = np.empty(len(slots), dtype=np.int64)
        _encode_slots(self.rows, self.base, self.start, self.count, self.last_offset, slot_array, self.layout_id,
                      out, ends)
        data = out.tobytes()
        starts = [0] + ends[:-1].tolist()
        ids = self.entity_ids
        return [(ids[s], data[a:b]) for s, a, b in zip(slots, starts, ends.tolist())]

    def load(self, entity_id: bytes, value: bytes) -> None:
        """Restore one entity from its changelog value (replacing any state it has)."""
        rows, last_offset = decode_state(value, self.layout_id, self.width)
        self.drop([entity_id])
        slot = self._new_slot(entity_id)
        n = len(rows)
        if n:
            capacity = 1 << max(1, (n - 1).bit_length())
            self.ensure_rows(capacity)
            top = int(self.meta[META_TOP])
            self.rows[top:top + n] = rows
            self.base[slot], self.cap[slot], self.count[slot] = top, capacity, n
            self.meta[META_TOP] = top + capacity
            newest = int(rows[-1, COL_TIME])
            if newest > self.meta[META_WATERMARK]:
                self.meta[META_WATERMARK] = newest
        self.last_offset[slot] = last_offset

    def memory_bytes(self) -> int:
        """Bytes held by the arrays (not the dict of entity ids)."""
        return sum(a.nbytes for a in (self.rows, self.base, self.cap, self.start, self.count, self.last_offset,
                                      self.dirty))


def decode_state(value: bytes, layout_id: int, width: int) -> tuple[np.ndarray, int]:
    """(rows, last offset) of a changelog value; StateFormatError naming what is wrong."""
    if len(value) < HEADER_SIZE:
        raise StateFormatError(f"entity state is {len(value)} bytes, shorter than its {HEADER_SIZE}-byte header")
    fmt, written_layout, n, last_offset = _HEADER.unpack_from(value)
    if fmt != STATE_FORMAT:
        raise StateFormatError(f"entity state format {fmt} is not the engine's format {STATE_FORMAT} (formats 1-3 "
                               "were written by the hard-coded payments features before feature specs)")
    if written_layout != layout_id:
        raise StateFormatError(f"entity state was written for state layout {written_layout:#x}, this spec's is "
                               f"{layout_id:#x} (the spec's aggregated fields changed)")
    expected = HEADER_SIZE + n * width * 8
    if len(value) != expected:
        raise StateFormatError(f"entity state with {n} rows of {width} columns should be {expected} bytes, "
                               f"got {len(value)}")
    rows = np.frombuffer(value, dtype="<i8", offset=HEADER_SIZE, count=n * width).reshape(n, width)
    times = rows[:, COL_TIME]
    if n > 1 and np.any(times[1:] < times[:-1]):
        raise StateFormatError("entity state's events are not sorted by event time")
    return rows.astype(np.int64), int(last_offset)
