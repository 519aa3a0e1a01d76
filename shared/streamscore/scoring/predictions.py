"""Prediction records (schemas/prediction.avsc, version 2) as Avro bytes, a whole batch in one compiled loop.

The generic encoder (fastavro) costs ~15 us a record. `PredictionWriter.encode_batch` writes THE
SAME BYTES (tests/unit/scoring/test_predictions.py compares them with the generic encoder) in one
numba loop over the batch: the event id and entity are copied from the source message's bytes
(never decoded), the features are the matrix row's doubles, and the `event` field is the source
message itself, framing included, so nothing is re-encoded whatever the team's schema.

The field order is the schema's; `PREDICTION_FIELDS` states it once and the writer refuses to
start if schemas/prediction.avsc says otherwise.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from streamscore.avro.codec import AvroCodec
from streamscore.avro.layout import record_layout
from streamscore.avro.varint import write_bytes, write_long

# (name, type) of schemas/prediction.avsc, in order; `encode_batch`'s loop writes exactly these.
PREDICTION_FIELDS = (
    ("event_id", "string"), ("entity_id", "string"), ("event_time", "long"), ("scored_at", "long"),
    ("model_name", "string"), ("model_version", "int"), ("score", "double?"), ("feature_set", "string"),
    ("features", "double_array"), ("event", "bytes"), ("event_partition", "int"), ("event_offset", "long"),
)


def _declared_fields(codec: AvroCodec) -> tuple[tuple[str, str], ...]:
    layout = record_layout(codec.catalog.current("prediction").expanded, double_arrays=True)
    return tuple((f.name, f.type + ("?" if f.nullable else "")) for f in layout.fields)


@njit(cache=True, nogil=True)
def _assemble(src, id_starts, id_lengths, entity_starts, entity_lengths, message_starts, message_lengths, times,
              header, scored_at, names, name_starts, name_lengths, versions, model_of, score_bytes, scored,
              feature_set, feature_bytes, partitions, offsets, out, ends):
    """Record i = header + its fields (PREDICTION_FIELDS) into out; ends[i] = where it ends. `score_bytes` and
    `feature_bytes` are the little-endian doubles' bytes, a row per record."""
    pos = 0
    n_features = feature_bytes.shape[1] // 8
    for i in range(len(times)):
        for k in range(len(header)):
            out[pos + k] = header[k]
        pos += len(header)
        pos = write_bytes(out, pos, src, id_starts[i], id_lengths[i])
        pos = write_bytes(out, pos, src, entity_starts[i], entity_lengths[i])
        pos = write_long(out, pos, times[i])
        pos = write_long(out, pos, scored_at)
        m = model_of[i]
        pos = write_bytes(out, pos, names, name_starts[m], name_lengths[m])
        pos = write_long(out, pos, versions[m])
        if scored[i]:
            out[pos] = 2  # union branch 1: double
            for k in range(8):
                out[pos + 1 + k] = score_bytes[i, k]
            pos += 9
        else:
            out[pos] = 0  # union branch 0: null
            pos += 1
        pos = write_bytes(out, pos, feature_set, 0, len(feature_set))
        if n_features:
            pos = write_long(out, pos, n_features)
            for k in range(8 * n_features):
                out[pos + k] = feature_bytes[i, k]
            pos += 8 * n_features
        out[pos] = 0  # end of the array
        pos += 1
        pos = write_bytes(out, pos, src, message_starts[i], message_lengths[i])
        pos = write_long(out, pos, partitions[i])
        pos = write_long(out, pos, offsets[i])
        ends[i] = pos


class PredictionWriter:
    """Framed Prediction records of a batch (see module docstring)."""

    def __init__(self, codec: AvroCodec, feature_set: str, topic: str | None = None):
        declared = _declared_fields(codec)
        if declared != PREDICTION_FIELDS:
            raise RuntimeError(f"schemas/prediction.avsc declares {declared}, but this writer writes "
                               f"{PREDICTION_FIELDS}: update scoring/predictions.py with the schema")
        self.header = np.frombuffer(codec.encoder("prediction", topic).header, dtype=np.uint8)
        self.feature_set = np.frombuffer(feature_set.encode(), dtype=np.uint8)

    def encode_batch(self, src: bytes, id_spans: tuple[np.ndarray, np.ndarray],
                     entity_spans: tuple[np.ndarray, np.ndarray], message_spans: tuple[np.ndarray, np.ndarray],
                     times: np.ndarray, scored_at: int, models: Sequence[tuple[str, int]], model_of: np.ndarray,
                     scores: np.ndarray | None, features: np.ndarray, partitions: Sequence[int],
                     offsets: Sequence[int]) -> list[bytes]:
        """One framed Prediction per row. Spans are (starts, lengths) into `src`; `models` lists the (name,
        version) pairs that served, `model_of[i]` which one served row i; `scores` None: no model yet."""
        n = len(times)
        if n == 0:
            return []
        names_data = [name.encode() for name, _ in models]
        name_lengths = np.array([len(d) for d in names_data], dtype=np.int64)
        name_starts = np.cumsum(name_lengths) - name_lengths
        names = np.frombuffer(b"".join(names_data) or b"\0", dtype=np.uint8)
        versions = np.array([version for _, version in models], dtype=np.int64)
        scored = np.full(n, 0 if scores is None else 1, dtype=np.uint8)
        score_values = np.zeros(n, dtype="<f8") if scores is None else np.ascontiguousarray(scores, dtype="<f8")
        k = features.shape[1]
        varied = (int(id_spans[1].sum()) + int(entity_spans[1].sum()) + int(message_spans[1].sum())
                  + int(name_lengths.max(initial=0)) * n)
        out = np.empty(varied + n * (len(self.header) + len(self.feature_set) + 8 * k + 120), dtype=np.uint8)
        ends = np.empty(n, dtype=np.int64)
        _assemble(np.frombuffer(src, dtype=np.uint8), id_spans[0], id_spans[1], entity_spans[0], entity_spans[1],
                  message_spans[0], message_spans[1], np.asarray(times, dtype=np.int64), self.header,
                  np.int64(scored_at), names, name_starts, name_lengths, versions,
                  np.asarray(model_of, dtype=np.int64), score_values.view(np.uint8).reshape(n, 8), scored,
                  self.feature_set, np.ascontiguousarray(features, dtype="<f8").view(np.uint8).reshape(n, 8 * k),
                  np.asarray(partitions, dtype=np.int64),
                  np.asarray(offsets, dtype=np.int64), out, ends)
        data = out[:ends[-1]].tobytes()
        bounds = ends.tolist()
        return [data[a:b] for a, b in zip([0] + bounds[:-1], bounds)]
