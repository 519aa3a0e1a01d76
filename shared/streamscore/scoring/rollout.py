"""What a scorer serves during a staged rollout: production, a canary for a sticky share of entities, shadows.

The canary's entities are chosen by a hash of the entity id's bytes (the engine's FNV-1a + splitmix64,
`streamscore.spec.text.hash_bytes`) mapped to [0, 1): an entity is the canary's when its position is
below the share. So the choice needs no state, is the same in every scorer process and after every
restart, and raising the share keeps the entities already in the canary and adds more.

Every version besides production (the canary and each shadow) scores every event, from the feature
matrix the served score came from (computed once; only the encoded columns are re-encoded when a
version learned other vocabularies). The scores that were not served (a shadow's on every event, the
canary's on production's events, production's on the canary's events) leave the scorer as one
`ShadowScores` record per batch and version (schemas/shadow_scores.avsc) on the `shadow-predictions`
topic; the logger writes them to `shadow_predictions`, one row per event and version. So for each
event every active version's score is in `predictions` or `shadow_predictions`, which is what the
online gate compares (streamscore.learning.rollout).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from streamscore.avro.codec import AvroCodec
from streamscore.avro.varint import write_bytes, write_long
from streamscore.scoring.served_model import ServedModel
from streamscore.spec.text import hash_bytes, text_hash

_TWO_POW_53 = float(1 << 53)


@njit(cache=True, nogil=True)
def entity_positions(buf, starts, lengths, out):
    """out[i] = the position in [0, 1) of the entity whose id is buf[starts[i]:starts[i]+lengths[i]]."""
    for i in range(len(starts)):
        h = np.uint64(hash_bytes(buf, starts[i], lengths[i]))
        out[i] = np.float64(h >> np.uint64(11)) / _TWO_POW_53


def entity_position(entity_id: str | bytes) -> float:
    """`entity_positions` for one entity id, in plain Python (tests, tools, SQL checks)."""
    data = entity_id.encode() if isinstance(entity_id, str) else bytes(entity_id)
    return ((text_hash(data) % (1 << 64)) >> 11) / _TWO_POW_53


def in_canary(entity_id: str | bytes, share: float) -> bool:
    return entity_position(entity_id) < share


def same_encoding(a: ServedModel, b: ServedModel) -> bool:
    """Whether two versions encode the feature matrix alike (the same learned vocabularies)."""
    if a.vocabularies.keys() != b.vocabularies.keys():
        return False
    return all(a.vocabularies[name].values == b.vocabularies[name].values for name in a.vocabularies)


@dataclass(frozen=True)
class ServingModels:
    """The loaded versions of a registry Rollout (streamscore.learning.registry.Rollout)."""

    production: ServedModel
    canary: ServedModel | None = None
    canary_share: float = 0.0
    shadows: tuple[ServedModel, ...] = ()

    @property
    def key(self) -> tuple:
        """What identifies it: production, canary and share, shadows (versions)."""
        return (self.production.version, self.canary.version if self.canary else None, self.canary_share,
                tuple(m.version for m in self.shadows))

    def describe(self) -> str:
        parts = [f"v{self.production.version}"]
        if self.canary is not None:
            parts.append(f"canary v{self.canary.version} at {self.canary_share:.0%}")
        if self.shadows:
            parts.append("shadow " + ", ".join(f"v{m.version}" for m in self.shadows))
        return "; ".join(parts)


# (name, type) of schemas/shadow_scores.avsc, in order: what `_assemble_shadow` writes.
SHADOW_FIELDS = (
    ("model_name", "string"), ("model_version", "int"), ("scored_at", "long"), ("event_ids", "array<string>"),
    ("entity_ids", "array<string>"), ("event_times", "array<long>"), ("scores", "array<double>"),
    ("event_partitions", "array<int>"), ("event_offsets", "array<long>"),
)


def _declared_shadow_fields(codec: AvroCodec) -> tuple[tuple[str, str], ...]:
    fields = []
    for f in codec.catalog.current("shadow_scores").expanded["fields"]:
        kind = f["type"]
        fields.append((f["name"], f"array<{kind['items']}>" if isinstance(kind, dict) else kind))
    return tuple(fields)


@njit(cache=True, nogil=True)
def _assemble_shadow(src, rows, id_starts, id_lengths, entity_starts, entity_lengths, times, score_bytes,
                     partitions, offsets, header, name, version, scored_at, out):
    """One ShadowScores record (SHADOW_FIELDS) of `rows` into out; returns its length. Arrays are one block
    of len(rows) items then the 0 that ends them; the strings are copied from src where they lie."""
    pos = 0
    for k in range(len(header)):
        out[k] = header[k]
    pos = len(header)
    pos = write_bytes(out, pos, name, 0, len(name))
    pos = write_long(out, pos, version)
    pos = write_long(out, pos, scored_at)
    n = len(rows)
    pos = write_long(out, pos, n)
    for i in rows:
        pos = write_bytes(out, pos, src, id_starts[i], id_lengths[i])
    out[pos] = 0
    pos = write_long(out, pos + 1, n)
    for i in rows:
        pos = write_bytes(out, pos, src, entity_starts[i], entity_lengths[i])
    out[pos] = 0
    pos = write_long(out, pos + 1, n)
    for i in rows:
        pos = write_long(out, pos, times[i])
    out[pos] = 0
    pos = write_long(out, pos + 1, n)
    for i in rows:
        for k in range(8):
            out[pos + k] = score_bytes[i, k]
        pos += 8
    out[pos] = 0
    pos = write_long(out, pos + 1, n)
    for i in rows:
        pos = write_long(out, pos, partitions[i])
    out[pos] = 0
    pos = write_long(out, pos + 1, n)
    for i in rows:
        pos = write_long(out, pos, offsets[i])
    out[pos] = 0
    return pos + 1


class ShadowWriter:
    """ShadowScores records (schemas/shadow_scores.avsc) for the unserved scores of a batch, written in one
    compiled loop from the batch's bytes (the same bytes as the generic encoder: tests compare them)."""

    def __init__(self, codec: AvroCodec, topic: str | None = None):
        declared = _declared_shadow_fields(codec)
        if declared != SHADOW_FIELDS:
            raise RuntimeError(f"schemas/shadow_scores.avsc declares {declared}, but this writer writes "
                               f"{SHADOW_FIELDS}: update scoring/rollout.py with the schema")
        self.header = np.frombuffer(codec.encoder("shadow_scores", topic).header, dtype=np.uint8)

    def encode(self, model: ServedModel, rows: np.ndarray, scores: np.ndarray, scored_at: int, src: np.ndarray,
               id_spans: tuple[np.ndarray, np.ndarray], entity_spans: tuple[np.ndarray, np.ndarray],
               times: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> bytes | None:
        """One record of `model`'s scores for `rows` (indices into the batch's scored events, whose id and entity
        are the (starts, lengths) spans into `src`)."""
        if len(rows) == 0:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        name = np.frombuffer(model.name.encode() or b"\0", dtype=np.uint8)[:len(model.name.encode())]
        size = (len(self.header) + len(name) + 40 + int(id_spans[1][rows].sum()) + int(entity_spans[1][rows].sum())
                + len(rows) * (2 * 10 + 3 * 10 + 8) + 60)
        out = np.empty(size, dtype=np.uint8)
        scores = np.ascontiguousarray(scores, dtype="<f8")
        end = _assemble_shadow(src, rows, id_spans[0], id_spans[1], entity_spans[0], entity_spans[1],
                               np.asarray(times, dtype=np.int64), scores.view(np.uint8).reshape(len(scores), 8),
                               np.asarray(partitions, dtype=np.int64), np.asarray(offsets, dtype=np.int64),
                               self.header, name, np.int64(model.version), np.int64(scored_at), out)
        return out[:end].tobytes()
