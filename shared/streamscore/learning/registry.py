"""Versioned model registry in a local directory.

Layout (one directory per model):

    <root>/<model>/v<N>/model.txt       LightGBM text model      } written once into a temp dir,
    <root>/<model>/v<N>/metadata.json   ModelVersion as JSON     } renamed into place, then read-only
    <root>/<model>/stages.json          stage pointers + history (replaced atomically on every action):
                                        production, candidate, shadow (versions scored on every event
                                        but never served), canary ({version, share} or null: served to a
                                        sticky share of entities), and the history of every action
    <root>/<model>/.lock                flock'd while allocating a version or changing stages

Why this shape: a version directory appears with a single rename, so a reader
never sees half a model; a crash leaves at most a `.tmp-*` directory, which
`list()` ignores and the next `register()` removes. Stage pointers live in one
small file so a scorer can poll it every second (`read_production_version`)
without loading any model.

The registry does not talk to Kafka or ClickHouse. Every action returns the
`ModelUpdate` event (see `registry_event`) and `model_versions_row` builds the
ClickHouse row; the caller publishes/writes them.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # lightgbm is imported lazily: polling the pointer must stay cheap.
    import lightgbm

STAGE_PRODUCTION = "production"
STAGE_CANDIDATE = "candidate"
STAGE_SHADOW = "shadow"
STAGE_CANARY = "canary"
STAGES = (STAGE_PRODUCTION, STAGE_CANDIDATE)

ACTION_REGISTER = "register"
ACTION_PROMOTE = "promote"
ACTION_ROLLBACK = "rollback"
ACTION_REJECT = "reject"
ACTION_SHADOW = "shadow"
ACTION_CANARY = "canary"

# Column order of the ClickHouse `model_versions` table (see the contract).
MODEL_VERSIONS_COLUMNS = (
    "model_name", "version", "action", "stage", "parent_version", "feature_set", "created_at",
    "recorded_at", "train_start", "train_end", "train_rows", "metrics", "reason",
)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_METADATA_FORMAT = 1


class RegistryError(Exception):
    """A registry request that cannot be satisfied (unknown version, nothing to roll back to...)."""


class VersionExists(RegistryError):
    """A version directory is immutable; writing it twice is a bug in the caller."""


class FeatureSetMismatch(RegistryError):
    """The model was trained on a different feature definition than the running code computes."""


class FeatureNamesMismatch(RegistryError):
    """A model's own feature names (booster.feature_name()) differ from the ones it is registered with."""


def model_feature_names(model_text: str) -> list[str]:
    """The feature names a LightGBM model text declares (its `feature_names=` line), in model order."""
    for line in model_text.splitlines():
        if line.startswith("feature_names="):
            return line[len("feature_names="):].split()
        if line.startswith("Tree="):
            break
    raise ValueError("the model text has no feature_names= line: is it a LightGBM model?")


def check_feature_names(model_text: str, expected: Sequence[str]) -> None:
    """Refuse a model whose columns are not exactly `expected` in order, naming the first difference: a model
    with reordered columns would otherwise be served wrong without an error."""
    names = model_feature_names(model_text)
    expected = list(expected)
    if names == expected:
        return
    for position, (have, want) in enumerate(zip(names, expected)):
        if have != want:
            raise FeatureNamesMismatch(
                f"the model's feature {position} is {have!r} but the feature set's is {want!r} (the model has "
                f"{len(names)} features, the feature set {len(expected)}): train it on the spec's features in "
                "the spec's order")
    longer, shorter = (names, expected) if len(names) > len(expected) else (expected, names)
    extra = longer[len(shorter)]
    raise FeatureNamesMismatch(
        f"the model has {len(names)} features, the feature set {len(expected)}: feature {len(shorter)} "
        f"({extra!r}) is in the {'model' if longer is names else 'feature set'} only")


@dataclass(frozen=True)
class ModelVersion:
    model_name: str
    version: int
    created_at: int  # epoch ms
    parent_version: int | None  # production version when this one was registered
    feature_set: str  # hash of the feature definition it was trained on
    feature_names: list[str]
    categorical_features: list[str]
    train_start: int | None  # epoch ms of the first / last training event
    train_end: int | None
    train_rows: int
    metrics: dict[str, float]  # validation metrics (see streamscore.learning.training)
    baseline: dict[str, Any]  # per-feature and "score" statistics (see training.compute_baseline)
    threshold: float | None  # serving decision threshold chosen on validation (None for regression)
    params: dict[str, Any]
    reason: str
    model_sha256: str = ""  # of model.txt; load_booster verifies it
    objective: str = "binary"  # "binary" (a classifier's probability) or "regression"
    vocabularies: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # learned encodings, frozen
    spec_name: str = ""  # the feature spec's name (its hash is feature_set)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelVersion:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RegistryUpdate:
    """Result of promote/rollback/reject: the version acted on and the event to publish."""

    model_version: ModelVersion
    event: dict[str, Any]  # a streamscore.ModelUpdate record
    previous_production: int | None


@dataclass(frozen=True)
class Rollout:
    """What a scorer serves and shadows, read from stages.json: production serves every entity but the
    canary's share; the canary (when set) serves `canary_share` of entities (by entity hash); every
    shadow version scores every event without serving it."""

    production: int | None
    canary: int | None
    canary_share: float
    shadows: tuple[int, ...]

    @classmethod
    def of(cls, stages: dict[str, Any]) -> "Rollout":
        canary = stages.get(STAGE_CANARY) or None
        return cls(stages.get(STAGE_PRODUCTION), canary["version"] if canary else None,
                   float(canary["share"]) if canary else 0.0, tuple(stages.get(STAGE_SHADOW) or ()))

    def active_candidates(self) -> tuple[int, ...]:
        """Versions scored besides production: the canary, then the shadows."""
        return ((self.canary,) if self.canary is not None else ()) + self.shadows


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def registry_event(
    model_version: ModelVersion, *, action: str, stage: str, reason: str, updated_at: int,
    evidence: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The `streamscore.ModelUpdate` Avro record for one registry action (`evidence`: the figures it was
    decided on, e.g. the online gate's labelled events and both versions' metrics)."""
    return {
        "model_name": model_version.model_name,
        "version": model_version.version,
        "stage": stage,
        "action": action,
        "feature_set": model_version.feature_set,
        "reason": reason,
        "updated_at": int(updated_at),
        "evidence": _checked_evidence(evidence),
    }


def _checked_evidence(evidence: dict[str, float] | None) -> dict[str, float]:
    checked = {}
    for name, value in (evidence or {}).items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"evidence[{name!r}] is {value}; evidence must be finite numbers")
        checked[str(name)] = value
    return checked


def registration_event(model_version: ModelVersion) -> dict[str, Any]:
    """The ModelUpdate for `register()` (a new version starts as the candidate)."""
    return registry_event(
        model_version, action=ACTION_REGISTER, stage=STAGE_CANDIDATE,
        reason=model_version.reason, updated_at=model_version.created_at,
    )


def _ms_to_datetime(ms: int | None) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def model_versions_row(
    model_version: ModelVersion, event: dict[str, Any], recorded_at: int | None = None
) -> dict[str, Any]:
    """One row for the ClickHouse `model_versions` log (keys = MODEL_VERSIONS_COLUMNS).

    Timestamps are timezone-aware UTC datetimes; `recorded_at` defaults to the
    event's `updated_at` so replaying the same event yields the same row.
    """
    if event["model_name"] != model_version.model_name or event["version"] != model_version.version:
        raise ValueError(
            f"event is for {event['model_name']!r} v{event['version']} but model_version is "
            f"{model_version.model_name!r} v{model_version.version}"
        )
    return {
        "model_name": model_version.model_name,
        "version": model_version.version,
        "action": event["action"],
        "stage": event["stage"],
        "parent_version": model_version.parent_version,
        "feature_set": model_version.feature_set,
        "created_at": _ms_to_datetime(model_version.created_at),
        "recorded_at": _ms_to_datetime(event["updated_at"] if recorded_at is None else recorded_at),
        "train_start": _ms_to_datetime(model_version.train_start),
        "train_end": _ms_to_datetime(model_version.train_end),
        "train_rows": int(model_version.train_rows),
        # the version's validation metrics, and the action's evidence under "online.<name>"
        "metrics": {**{str(k): float(v) for k, v in model_version.metrics.items()},
                    **{f"online.{k}": float(v) for k, v in (event.get("evidence") or {}).items()}},
        "reason": event["reason"],
    }


def check_feature_set(model_version: ModelVersion, expected_hash: str) -> None:
    """Refuse to serve a model whose features were computed by a different definition."""
    if model_version.feature_set != expected_hash:
        raise FeatureSetMismatch(
            f"model {model_version.model_name!r} v{model_version.version} was trained on feature set "
            f"{model_version.feature_set!r}, but this code computes feature set {expected_hash!r}. "
            "Retrain the model with the current feature definition, or deploy the code version "
            "that matches the model's feature set."
        )


# --- file helpers -------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, data: bytes) -> None:
    """Readers see either the old or the new content, never a mix (temp file + os.replace)."""
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    try:
        _write_file_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    # allow_nan=False: NaN is not JSON; metrics/baselines must use null for "undefined".
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()


def _model_text(booster_or_model_text: Any) -> str:
    if isinstance(booster_or_model_text, str):
        text = booster_or_model_text
    elif hasattr(booster_or_model_text, "model_to_string"):
        text = booster_or_model_text.model_to_string()
    else:
        raise TypeError(
            f"expected a lightgbm.Booster or its model text, got {type(booster_or_model_text).__name__}"
        )
    if not text.strip():
        raise ValueError("model text is empty")
    return text


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- paths and locking ----------------------------------------------------
    def _model_dir(self, model_name: str) -> Path:
        if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
            raise ValueError(f"invalid model name {model_name!r}: use letters, digits, '_', '.', '-'")
        return self.root / model_name

    def _stages_path(self, model_name: str) -> Path:
        return self._model_dir(model_name) / "stages.json"

    @contextmanager
    def _locked(self, model_name: str) -> Iterator[Path]:
        """Exclusive lock per model, across threads and processes (flock on a per-call fd)."""
        model_dir = self._model_dir(model_name)
        model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(model_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield model_dir
        finally:
            os.close(fd)  # releases the lock

    # --- reading --------------------------------------------------------------
    def _version_numbers(self, model_name: str) -> list[int]:
        model_dir = self._model_dir(model_name)
        if not model_dir.is_dir():
            return []
        numbers = []
        for entry in model_dir.iterdir():
            match = _VERSION_DIR.match(entry.name)
            # Only complete versions count: a version dir appears by rename with its metadata inside.
            if match and (entry / "metadata.json").is_file():
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def _no_such_version(self, model_name: str, version: int) -> RegistryError:
        numbers = self._version_numbers(model_name)
        if not numbers:
            return RegistryError(f"model {model_name!r} has no versions in {self.root} (asked for version {version})")
        listed = ", ".join(str(n) for n in numbers)
        return RegistryError(f"model {model_name!r} has no version {version}; versions: {listed}")

    def get(self, model_name: str, version: int) -> ModelVersion:
        path = self._model_dir(model_name) / f"v{int(version)}" / "metadata.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise self._no_such_version(model_name, version) from None
        return ModelVersion.from_dict(data["model_version"])

    def list(self, model_name: str) -> list[ModelVersion]:
        return [self.get(model_name, n) for n in self._version_numbers(model_name)]

    def model_text(self, model_name: str, version: int) -> str:
        model_version = self.get(model_name, version)
        text = (self._model_dir(model_name) / f"v{model_version.version}" / "model.txt").read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
        if model_version.model_sha256 and digest != model_version.model_sha256:
            raise RegistryError(
                f"model {model_name!r} v{version}: model.txt is corrupted "
                f"(sha256 {digest}, metadata says {model_version.model_sha256})"
            )
        return text

    def load_booster(self, model_name: str, version: int) -> lightgbm.Booster:
        import lightgbm

        return lightgbm.Booster(model_str=self.model_text(model_name, version))

    def stages(self, model_name: str) -> dict[str, Any]:
        """{"production": N|None, "candidate": N|None, "history": [{stage, version, action, at, reason}, ...]}"""
        try:
            stages = json.loads(self._stages_path(model_name).read_text())
        except FileNotFoundError:
            stages = {STAGE_PRODUCTION: None, STAGE_CANDIDATE: None, "history": []}
        stages.setdefault(STAGE_SHADOW, [])
        stages.setdefault(STAGE_CANARY, None)
        return stages

    def rollout(self, model_name: str) -> Rollout:
        """Production, canary (and its share) and shadow versions: what scorers serve and score."""
        return Rollout.of(self.stages(model_name))

    def stage_started_at(self, model_name: str, version: int, stage: str) -> int | None:
        """When `version` last entered `stage` (shadow: its shadow action; canary: its latest canary step)."""
        action = {STAGE_SHADOW: ACTION_SHADOW, STAGE_CANARY: ACTION_CANARY}.get(stage, ACTION_PROMOTE)
        times = [h["at"] for h in self.stages(model_name)["history"]
                 if h["version"] == version and h["action"] == action and h["stage"] == stage]
        return times[-1] if times else None

    def read_production_version(self, model_name: str) -> int | None:
        """Cheap (one small file read): for scorers polling for a new production model."""
        return self.stages(model_name)[STAGE_PRODUCTION]

    def production_pointer_mtime(self, model_name: str) -> int | None:
        """st_mtime_ns of stages.json (None if absent); changes whenever any stage pointer may have."""
        try:
            return self._stages_path(model_name).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def production(self, model_name: str) -> ModelVersion | None:
        version = self.read_production_version(model_name)
        return None if version is None else self.get(model_name, version)

    def rejected_versions(self, model_name: str) -> set[int]:
        return {h["version"] for h in self.stages(model_name)["history"] if h["action"] == ACTION_REJECT}

    # --- writing --------------------------------------------------------------
    def register(
        self,
        model_name: str,
        booster_or_model_text: Any,
        *,
        feature_set: str,
        feature_names: Sequence[str],
        categorical_features: Sequence[str] = (),
        train_rows: int,
        metrics: dict[str, float],
        baseline: dict[str, Any],
        threshold: float | None,
        params: dict[str, Any] | None = None,
        reason: str = "",
        train_start: int | None = None,
        train_end: int | None = None,
        parent_version: int | None = None,
        created_at: int | None = None,
        version: int | None = None,
        objective: str = "binary",
        vocabularies: dict[str, Sequence[str]] | None = None,
        spec_name: str = "",
    ) -> ModelVersion:
        """Store a new immutable version and make it the candidate.

        The model's own feature names must be `feature_names` in that order (FeatureNamesMismatch
        names the first difference). `version` defaults to the next number; giving an existing one
        raises VersionExists. `parent_version` defaults to the current production version. The
        ModelUpdate to publish is `registration_event(result)`.
        """
        text = _model_text(booster_or_model_text)
        feature_names = [str(n) for n in feature_names]
        check_feature_names(text, feature_names)
        if objective not in ("binary", "regression"):
            raise ValueError(f"objective must be 'binary' or 'regression', got {objective!r}")
        unknown = [c for c in categorical_features if c not in feature_names]
        if unknown:
            raise ValueError(f"categorical_features {unknown} are not in feature_names {feature_names}")
        for name, value in metrics.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"metrics[{name!r}] is {value}; metrics must be finite numbers")
        if version is not None and (not isinstance(version, int) or version < 1):
            raise ValueError(f"version must be an int >= 1, got {version!r}")
        with self._locked(model_name) as model_dir:
            self._remove_crash_leftovers(model_dir)
            existing = self._version_numbers(model_name)
            if version is None:
                version = (existing[-1] + 1) if existing else 1
            target = model_dir / f"v{version}"
            if version in existing or target.exists():
                raise VersionExists(
                    f"model {model_name!r} version {version} already exists and is immutable; "
                    "register a new version instead"
                )
            stages = self.stages(model_name)
            model_version = ModelVersion(
                model_name=model_name,
                version=version,
                created_at=now_ms() if created_at is None else int(created_at),
                parent_version=stages[STAGE_PRODUCTION] if parent_version is None else int(parent_version),
                feature_set=str(feature_set),
                feature_names=feature_names,
                categorical_features=[str(c) for c in categorical_features],
                train_start=train_start,
                train_end=train_end,
                train_rows=int(train_rows),
                metrics={str(k): float(v) for k, v in metrics.items()},
                baseline=baseline,
                threshold=None if threshold is None else float(threshold),
                params=dict(params or {}),
                reason=reason,
                model_sha256=hashlib.sha256(text.encode()).hexdigest(),
                objective=objective,
                vocabularies={str(k): [str(v) for v in values] for k, values in (vocabularies or {}).items()},
                spec_name=spec_name,
            )
            metadata = _json_bytes({"format": _METADATA_FORMAT, "model_version": model_version.to_dict()})
            tmp_dir = model_dir / f".tmp-v{version}-{uuid.uuid4().hex}"
            tmp_dir.mkdir()
            try:
                _write_file_durably(tmp_dir / "model.txt", text.encode())
                _write_file_durably(tmp_dir / "metadata.json", metadata)
                for name in ("model.txt", "metadata.json"):
                    os.chmod(tmp_dir / name, 0o444)
                _fsync_dir(tmp_dir)
                os.rename(tmp_dir, target)  # the version becomes visible complete, or not at all
            except BaseException:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise
            _fsync_dir(model_dir)
            self._record(model_name, stages, STAGE_CANDIDATE, version, ACTION_REGISTER,
                         model_version.reason, model_version.created_at)
        return model_version

    def promote(self, model_name: str, version: int, stage: str = STAGE_PRODUCTION, reason: str = "",
                evidence: dict[str, float] | None = None) -> RegistryUpdate:
        """Make `version` the production (or candidate) version; promoted to production it stops being a
        shadow or the canary."""
        evidence = _checked_evidence(evidence)
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        with self._locked(model_name):
            model_version = self.get(model_name, version)
            stages = self.stages(model_name)
            previous = stages[STAGE_PRODUCTION]
            if stages[stage] == version:
                raise RegistryError(f"model {model_name!r} version {version} is already {stage}")
            at = now_ms()
            self._record(model_name, stages, stage, version, ACTION_PROMOTE, reason, at, evidence)
        event = registry_event(model_version, action=ACTION_PROMOTE, stage=stage, reason=reason, updated_at=at,
                               evidence=evidence)
        return RegistryUpdate(model_version, event, previous)

    def shadow(self, model_name: str, version: int, reason: str = "",
               evidence: dict[str, float] | None = None) -> RegistryUpdate:
        """Put `version` in shadow: scorers score every event with it too (logged to shadow_predictions),
        never serving its score. A canary put back in shadow stops serving."""
        evidence = _checked_evidence(evidence)
        with self._locked(model_name):
            model_version = self.get(model_name, version)
            stages = self.stages(model_name)
            if stages[STAGE_PRODUCTION] == version:
                raise RegistryError(f"model {model_name!r} version {version} is in production: it cannot be "
                                    "its own shadow")
            if version in stages[STAGE_SHADOW]:
                raise RegistryError(f"model {model_name!r} version {version} is already in shadow")
            at = now_ms()
            self._record(model_name, stages, STAGE_SHADOW, version, ACTION_SHADOW, reason, at, evidence)
        event = registry_event(model_version, action=ACTION_SHADOW, stage=STAGE_SHADOW, reason=reason,
                               updated_at=at, evidence=evidence)
        return RegistryUpdate(model_version, event, stages[STAGE_PRODUCTION])

    def canary(self, model_name: str, version: int, share: float, reason: str = "",
               evidence: dict[str, float] | None = None) -> RegistryUpdate:
        """Serve `version` to `share` (0 < share < 1) of the entities, chosen by a hash of the entity id, so
        the same entities every time, and a raised share keeps those and adds more. Calling it again for
        the canary raises (or lowers) its share; one canary at a time."""
        evidence = _checked_evidence(evidence)
        share = float(share)
        if not 0 < share < 1:
            raise ValueError(f"canary share must be between 0 and 1 (exclusive), got {share}: promote the "
                             "version to serve every entity")
        with self._locked(model_name):
            model_version = self.get(model_name, version)
            stages = self.stages(model_name)
            if stages[STAGE_PRODUCTION] is None:
                raise RegistryError(f"model {model_name!r} has no production version: a canary shares the "
                                    "traffic with production (promote a version first)")
            if stages[STAGE_PRODUCTION] == version:
                raise RegistryError(f"model {model_name!r} version {version} is in production already")
            current = stages[STAGE_CANARY]
            if current and current["version"] != version:
                raise RegistryError(f"model {model_name!r} version {current['version']} is the canary (share "
                                    f"{current['share']:g}): promote, reject or roll it back first")
            at = now_ms()
            self._record(model_name, stages, STAGE_CANARY, version, ACTION_CANARY, reason, at, evidence,
                         share=share)
        event = registry_event(model_version, action=ACTION_CANARY, stage=STAGE_CANARY, reason=reason,
                               updated_at=at, evidence={**evidence, "canary_share": share})
        return RegistryUpdate(model_version, event, stages[STAGE_PRODUCTION])

    def rollback_canary(self, model_name: str, reason: str = "",
                        evidence: dict[str, float] | None = None) -> RegistryUpdate:
        """Stop the canary: every entity is served by production again (recorded as a rollback of stage
        canary)."""
        evidence = _checked_evidence(evidence)
        with self._locked(model_name):
            stages = self.stages(model_name)
            current = stages[STAGE_CANARY]
            if not current:
                raise RegistryError(f"model {model_name!r} has no canary to roll back")
            model_version = self.get(model_name, current["version"])
            at = now_ms()
            self._record(model_name, stages, STAGE_CANARY, current["version"], ACTION_ROLLBACK, reason, at,
                         evidence)
        event = registry_event(model_version, action=ACTION_ROLLBACK, stage=STAGE_CANARY, reason=reason,
                               updated_at=at, evidence=evidence)
        return RegistryUpdate(model_version, event, stages[STAGE_PRODUCTION])

    def rollback(self, model_name: str, reason: str = "") -> RegistryUpdate:
        """Production goes back to the version that was production before the current one.

        Rollbacks unwind: promote 1, 2, 3 then rollback, rollback -> production is 1.
        """
        with self._locked(model_name):
            stages = self.stages(model_name)
            chain = _production_chain(stages["history"])
            current = stages[STAGE_PRODUCTION]
            if current is None:
                raise RegistryError(f"model {model_name!r} has no production version to roll back")
            if len(chain) < 2:
                raise RegistryError(
                    f"model {model_name!r}: production version {current} has no previous production "
                    "version to roll back to (promote a specific version instead)"
                )
            target = chain[-2]
            model_version = self.get(model_name, target)
            at = now_ms()
            self._record(model_name, stages, STAGE_PRODUCTION, target, ACTION_ROLLBACK, reason, at)
        event = registry_event(model_version, action=ACTION_ROLLBACK, stage=STAGE_PRODUCTION, reason=reason, updated_at=at)
        return RegistryUpdate(model_version, event, current)

    def reject(self, model_name: str, version: int, reason: str,
               evidence: dict[str, float] | None = None) -> RegistryUpdate:
        """Record that a candidate failed a validation gate (clears the candidate pointer; a rejected shadow
        stops being scored, a rejected canary stops serving)."""
        evidence = _checked_evidence(evidence)
        with self._locked(model_name):
            model_version = self.get(model_name, version)
            stages = self.stages(model_name)
            if stages[STAGE_PRODUCTION] == version:
                raise RegistryError(
                    f"model {model_name!r} version {version} is in production; roll back or promote another "
                    "version instead of rejecting it"
                )
            at = now_ms()
            self._record(model_name, stages, STAGE_CANDIDATE, version, ACTION_REJECT, reason, at, evidence)
        event = registry_event(model_version, action=ACTION_REJECT, stage=STAGE_CANDIDATE, reason=reason,
                               updated_at=at, evidence=evidence)
        return RegistryUpdate(model_version, event, stages[STAGE_PRODUCTION])

    # --- internals (call with the lock held) -----------------------------------
    def _record(self, model_name: str, stages: dict[str, Any], stage: str, version: int,
                action: str, reason: str, at: int, evidence: dict[str, float] | None = None,
                share: float | None = None) -> None:
        entry = {"stage": stage, "version": version, "action": action, "at": at, "reason": reason}
        if evidence:
            entry["evidence"] = evidence
        if share is not None:
            entry["share"] = share
        stages = {**stages, "history": [*stages["history"], entry]}
        if action in (ACTION_REGISTER, ACTION_PROMOTE, ACTION_ROLLBACK) and stage in STAGES:
            stages[stage] = version
        # A version is in at most one of production, canary and shadow: any action on it but `shadow` ends
        # its shadowing, any but `canary` ends its canary (promoted, rejected, rolled back, back in shadow).
        shadows = [v for v in stages.get(STAGE_SHADOW) or [] if v != version]
        stages[STAGE_SHADOW] = sorted(shadows + [version]) if action == ACTION_SHADOW else shadows
        canary = stages.get(STAGE_CANARY) or None
        if action == ACTION_CANARY:
            stages[STAGE_CANARY] = {"version": version, "share": share}
        elif canary and canary["version"] == version:
            stages[STAGE_CANARY] = None
        if action == ACTION_PROMOTE and stage == STAGE_PRODUCTION and stages[STAGE_CANDIDATE] == version:
            stages[STAGE_CANDIDATE] = None  # the candidate graduated
        if action == ACTION_REJECT and stages[STAGE_CANDIDATE] == version:
            stages[STAGE_CANDIDATE] = None
        _replace_atomically(self._stages_path(model_name), _json_bytes(stages))

    @staticmethod
    def _remove_crash_leftovers(model_dir: Path) -> None:
        # Under the lock nobody else is writing, so any temp dir is from a crashed writer.
        for entry in model_dir.glob(".tmp-v*"):
            shutil.rmtree(entry, ignore_errors=True)


def _production_chain(history: list[dict[str, Any]]) -> list[int]:
    """Production versions as a stack: promote pushes, rollback pops."""
    chain: list[int] = []
    for entry in history:
        if entry["stage"] != STAGE_PRODUCTION:
            continue
        if entry["action"] == ACTION_PROMOTE:
            chain.append(entry["version"])
        elif entry["action"] == ACTION_ROLLBACK and chain:
            chain.pop()
    return chain


def stage_label(stages: dict[str, Any], version: int, rejected: set[int] | None = None) -> str:
    """Human label for a version's state, for tables: production, canary NN%, shadow, candidate, rejected,
    retired or ''."""
    if stages.get(STAGE_PRODUCTION) == version:
        return STAGE_PRODUCTION
    canary = stages.get(STAGE_CANARY)
    if canary and canary["version"] == version:
        return f"{STAGE_CANARY} {canary['share']:.0%}"
    if version in (stages.get(STAGE_SHADOW) or ()):
        return STAGE_SHADOW
    if stages.get(STAGE_CANDIDATE) == version:
        return STAGE_CANDIDATE
    if rejected is None:
        rejected = {h["version"] for h in stages["history"] if h["action"] == ACTION_REJECT}
    if version in rejected:
        return "rejected"
    if any(h["version"] == version and h["stage"] == STAGE_PRODUCTION for h in stages["history"]):
        return "retired"
    return ""
