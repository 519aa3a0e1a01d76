"""Avro's zig-zag varint (the binary encoding of int and long), once: in Python and for compiled writers."""
from __future__ import annotations

from numba import njit
import numpy as np

_SMALL = [bytes(((v << 1) ^ (v >> 63),)) for v in range(64)]  # 0..63 encode to one byte


def avro_long(value: int) -> bytes:
    """The Avro binary encoding of an int or long."""
    if 0 <= value < 64:
        return _SMALL[value]
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def avro_string(value: str | bytes) -> bytes:
    """The Avro binary encoding of a string (UTF-8) or bytes: length, then the bytes."""
    data = value.encode() if isinstance(value, str) else value
    return avro_long(len(data)) + data


@njit(cache=True, nogil=True)
def write_long(out, pos, value):
    """avro_long(value) into out[pos:]; returns the position after it."""
    zigzag = np.uint64((value << 1) ^ (value >> 63))  # the int64's bits, as unsigned
    while zigzag >= 0x80:
        out[pos] = (zigzag & 0x7F) | 0x80
        pos += 1
        zigzag >>= np.uint64(7)
    out[pos] = zigzag
    return pos + 1


@njit(cache=True, nogil=True)
def write_bytes(out, pos, src, start, length):
    """avro_string of src[start:start + length] into out[pos:]; returns the position after it."""
    pos = write_long(out, pos, length)
    for k in range(length):
        out[pos + k] = src[start + k]
    return pos + length
