"""Text values as the engine sees them: 64-bit hashes of their UTF-8 bytes, and vocabulary codes.

Nothing on the hot path decodes a string. A text field's bytes are hashed where they lie in the
batch's buffer (`hash_column`): the hash is what an entity state keeps (distinct counts, the
event-id key that recognises re-sent events) and what a vocabulary is searched by. A vocabulary
match is then confirmed byte for byte (`encode_column`), so a code is exact; a distinct count
of two different values whose 64-bit hashes collide (odds ~2^-64 per pair) would count one.

The hash is FNV-1a over the bytes, finished with splitmix64's mixer (FNV alone spreads short
ids poorly); 0 is reserved for null and the empty string. `text_hash` is the same function in
plain Python, for the reference interpreter and for tests.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from streamscore.spec.model import FIRST_VOCABULARY_CODE, NULL_CODE, UNKNOWN_CODE

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


@njit(cache=True, nogil=True)
def hash_bytes(buf, start, length):
    """The 64-bit hash of buf[start:start+length] as an int64, never 0 (see module docstring)."""
    h = np.uint64(_FNV_OFFSET)
    prime = np.uint64(_FNV_PRIME)
    for k in range(start, start + length):
        h = (h ^ np.uint64(buf[k])) * prime
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h = h ^ (h >> np.uint64(31))
    value = np.int64(h)
    return value if value != 0 else np.int64(1)


def text_hash(data: bytes) -> int:
    """hash_bytes in plain Python (0 for b"" is the caller's rule, as in hash_column)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    h ^= h >> 31
    value = h - (1 << 64) if h >= 1 << 63 else h
    return value or 1


@njit(cache=True, nogil=True)
def hash_column(buf, starts, lengths, nulls, out):
    """out[i] = hash of text i, 0 where it is null or empty."""
    for i in range(len(starts)):
        if nulls[i] or lengths[i] == 0:
            out[i] = 0
        else:
            out[i] = hash_bytes(buf, starts[i], lengths[i])


@njit(cache=True, nogil=True)
def _encode_column(buf, starts, lengths, nulls, hashes, codes, values, value_starts, value_lengths, out, column):
    """out[i, column] = the code of text i: NULL_CODE for null/empty, the value's code when the vocabulary holds it
    (hash found, then the bytes compared), UNKNOWN_CODE otherwise."""
    n_values = len(hashes)
    for i in range(len(starts)):
        length = lengths[i]
        if nulls[i] or length == 0:
            out[i, column] = NULL_CODE
            continue
        start = starts[i]
        h = hash_bytes(buf, start, length)
        pos = np.searchsorted(hashes, h)
        code = UNKNOWN_CODE
        while pos < n_values and hashes[pos] == h:
            if value_lengths[pos] == length:
                same = True
                v = value_starts[pos]
                for k in range(length):
                    if values[v + k] != buf[start + k]:
                        same = False
                        break
                if same:
                    code = codes[pos]
                    break
            pos += 1
        out[i, column] = code


class Vocabulary:
    """Values with codes FIRST_VOCABULARY_CODE.. in the given order, searchable from compiled code."""

    def __init__(self, values: Sequence[str]):
        self.values = tuple(values)
        data = [v.encode() for v in self.values]
        hashes = np.array([text_hash(d) for d in data], dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        sizes = np.array([len(data[i]) for i in order], dtype=np.int64)
        self._hashes = hashes[order]
        self._codes = (order + FIRST_VOCABULARY_CODE).astype(np.float64)
        self._bytes = np.frombuffer(b"".join(data[i] for i in order) or b"\x00", dtype=np.uint8)
        self._starts = np.cumsum(sizes) - sizes
        self._lengths = sizes

    def __len__(self) -> int:
        return len(self.values)

    def code(self, value: str | None) -> int:
        """The code of one value (plain Python; the compiled path is encode_into)."""
        if not value:
            return NULL_CODE
        try:
            return FIRST_VOCABULARY_CODE + self.values.index(value)
        except ValueError:
            return UNKNOWN_CODE

    def encode_into(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, nulls: np.ndarray,
                    out: np.ndarray, column: int) -> None:
        """Codes of a text column (positions in `buf`) into out[:, column]."""
        _encode_column(buf, starts, lengths, nulls, self._hashes, self._codes, self._bytes, self._starts,
                       self._lengths, out, column)


def learn_vocabulary(values: Sequence[str | None], max_size: int, min_count: int) -> tuple[str, ...]:
    """The vocabulary a `learned` encoding freezes into a model version: the non-empty values seen at least
    `min_count` times, most frequent first (ties by value), at most `max_size`."""
    counts: dict[str, int] = {}
    for value in values:
        if value:
            counts[value] = counts.get(value, 0) + 1
    ranked = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return tuple(ranked[:max_size])
