"""Text hashing and vocabularies: the compiled and plain-Python hashes agree; codes are exact."""
from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from streamscore.spec.text import Vocabulary, hash_bytes, learn_vocabulary, text_hash


@given(st.binary(max_size=64))
def test_the_compiled_hash_is_the_plain_one(data):
    buf = np.frombuffer(b"xx" + data + b"yy", dtype=np.uint8)
    assert hash_bytes(buf, 2, len(data)) == text_hash(data) != 0


@given(st.lists(st.text(min_size=1, max_size=8), max_size=30, unique=True), st.lists(st.text(max_size=8), max_size=30))
def test_codes_are_exact_matches_of_the_vocabulary(values, probes):
    vocabulary = Vocabulary(values)
    data = [p.encode() for p in probes]
    buf = np.frombuffer(b"".join(data) or b"\0", dtype=np.uint8)
    lengths = np.array([len(d) for d in data], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    out = np.zeros((len(data), 1))
    vocabulary.encode_into(buf, starts, lengths, np.zeros(len(data), dtype=np.uint8), out, 0)
    assert out[:, 0].tolist() == [float(vocabulary.code(p)) for p in probes]


def test_a_learned_vocabulary_is_the_frequent_values_most_frequent_first():
    values = ["b", "a", "b", None, "", "c", "a", "b", "d"]
    assert learn_vocabulary(values, max_size=10, min_count=2) == ("b", "a")
    assert learn_vocabulary(values, max_size=3, min_count=1) == ("b", "a", "c")  # ties by value
