"""Retrain requests: built from a drift signal, deduplicated by the trainer.

A request is delivered at least once (the drift service may replay a stretch
of predictions after a crash and detect the same drift again, with a slightly
different position), so the trainer must recognise duplicates, also after its
own restart. Two requests are the same when

- they have the same `request_id`, or
- they are about the same model version, detector and feature and their
  `detected_at` lie within the drift cool-down of each other: the monitor never
  asks twice for one version inside its cool-down, so such a pair can only be
  a replay. A request the monitor marks as a cool-down breakthrough (its reason contains
  `BREAKTHROUGH_MARK`: the evidence of the previous request had cleared) is a new shift, not a
  replay, and is only a duplicate by id.

The record of handled requests that survives restarts is the model registry
itself: the trainer registers each candidate with a reason made by
`retrain_reason`, and `HandledRequests.from_registry` parses those reasons back.
A request whose training failed registers nothing; its offset is committed, so
it is not redelivered — only a crash between failure and commit retries it once.

Scheduled retraining (`RetrainSchedule`, STREAMSCORE_RETRAIN_EVERY_HOURS) issues requests of detector
`schedule` through the same topic: one when the newest logged event crosses a multiple of the period
(event time, since the epoch), with a request_id made of the model and that boundary, so a request
issued twice (a restart) is recognised like any other duplicate.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from streamscore.drift.monitor import BREAKTHROUGH_MARK, DriftSignal

# "retrain for <request_id> (v<version> <detector>/<feature|-> at <detected_at ms>): <why>"
_REASON = re.compile(r"^retrain for (?P<id>\S+) \(v(?P<version>\d+) (?P<detector>[^/\s]+)/(?P<feature>\S+) "
                     r"at (?P<at>-?\d+)\): ")


MANUAL_DETECTOR = "manual"


def manual_request(model_name: str, model_version: int, reason: str, now_ms: int) -> dict:
    """A RetrainRequest from an operator (`streamscore train` while `run all` holds the embedded store).

    detected_at 0: the trainer's wait for labels "since the detection" counts every label, so it trains at once."""
    request_id = f"{model_name}-v{model_version}-manual-{now_ms}"
    return {"request_id": request_id, "model_name": model_name, "model_version": int(model_version),
            "reason": reason, "detector": MANUAL_DETECTOR, "feature": None, "statistic": MANUAL_DETECTOR,
            "value": 0.0, "threshold": 0.0, "window": 0, "detected_at": 0}


def retrain_request(signal: DriftSignal, model_name: str, model_version: int, predictions_seen: int) -> dict:
    """The `streamscore.RetrainRequest` record citing `signal`.

    The request_id is derived from what the monitor had seen, so re-detecting
    from the same saved state yields the same id.
    """
    feature = signal.feature
    key = f"{model_name}|{model_version}|{signal.detector}|{feature}|{signal.at_ms}|{predictions_seen}"
    request_id = f"{model_name}-v{model_version}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return {
        "request_id": request_id,
        "model_name": model_name,
        "model_version": int(model_version),
        "reason": signal.reason,
        "detector": signal.detector,
        "feature": feature,
        "statistic": signal.statistic,
        "value": float(signal.value),
        "threshold": float(signal.threshold),
        "window": int(signal.window),
        "detected_at": int(signal.at_ms),
    }


SCHEDULE_DETECTOR = "schedule"
HOUR_MS = 3_600_000


def scheduled_request(model_name: str, model_version: int, boundary_ms: int, every_hours: float) -> dict:
    """The RetrainRequest of the schedule's boundary `boundary_ms` (event time, epoch ms)."""
    return {
        "request_id": f"{model_name}-schedule-{int(boundary_ms)}",
        "model_name": model_name,
        "model_version": int(model_version),
        "reason": f"scheduled retraining every {every_hours:g} h of event time",
        "detector": SCHEDULE_DETECTOR,
        "feature": None,
        "statistic": "schedule",
        "value": float(every_hours),
        "threshold": float(every_hours),
        "window": 0,
        "detected_at": int(boundary_ms),
    }


class RetrainSchedule:
    """When the next scheduled retrain is due: at each multiple of `every_hours` (event time) that the newest
    logged event reaches. The first boundary counted is the one after the newest event when the schedule
    starts (or after the last scheduled retrain the registry records), so a history logged before the
    trainer starts asks for one retrain, not one per period it spans. (A trainer that runs while a history
    is being logged asks at most once per tick, rollout_gate_interval_s, while the load crosses boundaries.)"""

    def __init__(self, every_hours: float, last_boundary_ms: int | None = None):
        if every_hours <= 0:
            raise ValueError(f"STREAMSCORE_RETRAIN_EVERY_HOURS must be > 0 for a schedule, got {every_hours}")
        self.every_hours = float(every_hours)
        self.period_ms = int(round(every_hours * HOUR_MS))
        self.last_boundary_ms = last_boundary_ms

    @classmethod
    def from_registry(cls, every_hours: float, registry, model_name: str) -> "RetrainSchedule":
        fired = [r.detected_at for r in (parse_retrain_reason(v.reason) for v in registry.list(model_name))
                 if r is not None and r.detector == SCHEDULE_DETECTOR]
        return cls(every_hours, max(fired) if fired else None)

    def due(self, newest_event_ms: int | None) -> int | None:
        """The boundary a retrain is due for now (and remember it), or None."""
        if newest_event_ms is None:
            return None
        boundary = (int(newest_event_ms) // self.period_ms) * self.period_ms
        if self.last_boundary_ms is None:
            self.last_boundary_ms = boundary  # the schedule starts here
            return None
        if boundary <= self.last_boundary_ms:
            return None
        self.last_boundary_ms = boundary
        return boundary


@dataclass(frozen=True)
class HandledRequest:
    request_id: str
    model_version: int
    detector: str
    feature: str | None
    detected_at: int
    breakthrough: bool = False

    @classmethod
    def of(cls, request: dict) -> "HandledRequest":
        return cls(request["request_id"], int(request["model_version"]), request["detector"],
                   request.get("feature"), int(request["detected_at"]),
                   BREAKTHROUGH_MARK in (request.get("reason") or ""))


def retrain_reason(request: dict) -> str:
    """The registry `reason` of a version trained for `request` (parseable by `parse_retrain_reason`)."""
    feature = request.get("feature") or "-"
    return (f"retrain for {request['request_id']} (v{request['model_version']} {request['detector']}/{feature} "
            f"at {request['detected_at']}): {request['reason']}")


def parse_retrain_reason(reason: str) -> HandledRequest | None:
    """The request a registry reason says a version was trained for; None for other reasons."""
    match = _REASON.match(reason or "")
    if match is None:
        return None
    feature = match["feature"]
    return HandledRequest(match["id"], int(match["version"]), match["detector"],
                          None if feature == "-" else feature, int(match["at"]), BREAKTHROUGH_MARK in reason)


class HandledRequests:
    """Requests already acted on (trained, rejected, skipped or failed)."""

    def __init__(self, cooldown_ms: int):
        self.cooldown_ms = int(cooldown_ms)
        self._ids: set[str] = set()
        self._by_key: dict[tuple[int, str, str | None], list[int]] = {}

    @classmethod
    def from_registry(cls, registry, model_name: str, cooldown_ms: int) -> "HandledRequests":
        handled = cls(cooldown_ms)
        for version in registry.list(model_name):
            request = parse_retrain_reason(version.reason)
            if request is not None:
                handled.add(request)
        return handled

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request: HandledRequest) -> None:
        self._ids.add(request.request_id)
        key = (request.model_version, request.detector, request.feature)
        self._by_key.setdefault(key, []).append(request.detected_at)

    def duplicate_of(self, request: HandledRequest) -> str | None:
        """Why `request` is a duplicate, or None if it is new."""
        if request.request_id in self._ids:
            return f"request {request.request_id} was already handled"
        if request.breakthrough:
            return None
        key = (request.model_version, request.detector, request.feature)
        for at in self._by_key.get(key, ()):
            if abs(request.detected_at - at) < self.cooldown_ms:
                return (f"a request for v{request.model_version} {request.detector}/{request.feature or '-'} "
                        f"detected {abs(request.detected_at - at) / 1000:.0f} s (event time) apart, inside the "
                        "drift cool-down, was already handled")
        return None
