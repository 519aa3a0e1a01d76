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


class ShadowWriter:
    """ShadowScores records (schemas/shadow_scores.avsc) for the unserved scores of a batch."""

    def __init__(self, codec: AvroCodec, topic: str | None = None):
        self._encode = codec.encoder("shadow_scores", topic)

    def encode(self, model: ServedModel, rows: np.ndarray, scores: np.ndarray, scored_at: int,
               event_ids: list[str], entity_ids: list[str], times: np.ndarray, partitions: np.ndarray,
               offsets: np.ndarray) -> bytes | None:
        """One record of `model`'s scores for the given rows (indices into the batch's scored events)."""
        if len(rows) == 0:
            return None
        picked = rows.tolist()
        return self._encode({
            "model_name": model.name, "model_version": int(model.version), "scored_at": int(scored_at),
            "event_ids": [event_ids[i] for i in picked], "entity_ids": [entity_ids[i] for i in picked],
            "event_times": times[rows].tolist(), "scores": scores[rows].astype(np.float64).tolist(),
            "event_partitions": partitions[rows].tolist(), "event_offsets": offsets[rows].tolist(),
        })
