"""The rides example's data: trip requests of drivers in a city of 40 zones, and how long each trip took.

Implements the generator protocol of streamscore.dev.generators. A trip's duration follows its routed
distance at a speed that depends on the hour (rush hours are slow, nights fast) and on the pickup zone's
congestion, plus the airport, the vehicle class and the surge (a proxy for traffic), with log-normal noise.
The outcome (the label) is known when the trip ends. Drivers work shifts, so a driver's recent trips say
where and how busy they are: the spec's windows are minutes to hours.

Drifts (DRIFT_KINDS): `traffic` (every trip 40% slower from the drift on: a concept change that harms the
model), `distance` (trips 50% longer: a covariate shift the model extrapolates over) and `new_zones`
(pickups in 20 zones never seen in training).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEMO_ENTITIES", "DRIFT_KINDS", "make_generator"]

DRIFT_KINDS = ("traffic", "distance", "new_zones")
DEMO_ENTITIES = 300
ZONES = tuple(f"Z{i:02d}" for i in range(1, 41))
NEW_ZONES = tuple(f"Z{i:02d}" for i in range(41, 61))
VEHICLES = ("standard", "xl", "green", "luxury")
VEHICLE_WEIGHTS = (0.7, 0.15, 0.1, 0.05)
VEHICLE_FACTOR = {"standard": 1.0, "xl": 1.05, "green": 1.02, "luxury": 0.95, None: 1.0}
DEFAULT_START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC
TRIPS_PER_DRIVER_HOUR = 1.6
HOUR_MS = 3_600_000


def _speed_kmh(hour: int) -> float:
    """Average city speed by hour of day: rush hours slow, nights fast."""
    if hour in (7, 8, 9, 16, 17, 18):
        return 17.0
    if hour >= 22 or hour < 5:
        return 38.0
    return 26.0


@dataclass(frozen=True)
class BadTrip:
    """A poison input: `value` is what goes on the wire; `reason`/`field` what the scorer must reject it with."""

    reason: str
    field: str | None
    value: bytes
    event: dict | None
    description: str


class TripGenerator:
    def __init__(self, seed: int, n_entities: int, start_ms: int = DEFAULT_START_MS, drift=None,
                 out_of_order_fraction: float = 0.01):
        if n_entities < 1:
            raise ValueError(f"n_entities must be >= 1, got {n_entities}")
        self.seed = seed
        self.n_entities = n_entities
        self.start_ms = start_ms
        self.drift = drift
        self.out_of_order_fraction = out_of_order_fraction
        self.id_prefix = f"trip{seed}-"
        rng = np.random.default_rng(seed)
        self._rng = rng
        self._congestion = dict(zip(ZONES + NEW_ZONES, rng.uniform(0.8, 1.4, len(ZONES) + len(NEW_ZONES)).tolist()))
        self._home = [ZONES[i] for i in rng.integers(0, len(ZONES), n_entities)]
        self._pace = rng.normal(1.0, 0.05, n_entities).tolist()  # some drivers are quicker
        self._index = 0
        # the next request time of every driver, earliest first
        gap = HOUR_MS / TRIPS_PER_DRIVER_HOUR
        self._queue = [(start_ms + int(rng.exponential(gap)), d) for d in range(n_entities)]
        heapq.heapify(self._queue)

    def expected_span_ms(self, n_events: int) -> int:
        return int(n_events / (self.n_entities * TRIPS_PER_DRIVER_HOUR) * HOUR_MS)

    def _drifting(self, kind: str) -> bool:
        return self.drift is not None and self.drift.kind == kind and self._index >= self.drift.at_event

    def events(self, n: int):
        for _ in range(n):
            yield self._next()

    def _next(self) -> tuple[dict, dict]:
        rng = self._rng
        at, driver = heapq.heappop(self._queue)
        hour = (at // HOUR_MS) % 24
        pickup = self._home[driver] if rng.random() < 0.5 else ZONES[int(rng.integers(0, len(ZONES)))]
        if self._drifting("new_zones") and rng.random() < 0.5:
            pickup = NEW_ZONES[int(rng.integers(0, len(NEW_ZONES)))]
        dropoff = None if rng.random() < 0.1 else ZONES[int(rng.integers(0, len(ZONES)))]
        airport = bool(rng.random() < 0.08)
        distance = float(np.round(rng.lognormal(math.log(5.0), 0.6) + (14.0 if airport else 0.0), 2))
        if self._drifting("distance"):
            distance = round(distance * 1.5, 2)
        vehicle = None if rng.random() < 0.05 else VEHICLES[int(rng.choice(4, p=VEHICLE_WEIGHTS))]
        congestion = self._congestion[pickup]
        surge = float(np.float32(round(max(1.0, 1.0 + (congestion - 1.0) * 2.0 + rng.normal(0, 0.1)), 1)))
        speed = _speed_kmh(hour) / congestion
        duration = 120.0 + distance / speed * 3600.0 * self._pace[driver] * VEHICLE_FACTOR[vehicle]
        duration *= 1.0 + 0.08 * (surge - 1.0)
        if airport:
            duration += 300.0
        if self._drifting("traffic"):
            duration *= 1.4
        duration = round(duration * float(rng.lognormal(0.0, 0.12)), 1)
        reported = at
        if rng.random() < self.out_of_order_fraction:
            reported = at - int(rng.integers(1_000, 120_000))  # reached the topic late
        event_id = f"{self.id_prefix}{self._index:010d}"
        event = {
            "trip_id": event_id, "driver_id": f"driver-{driver:05d}", "requested_at": reported,
            "pickup_zone": pickup, "dropoff_zone": dropoff, "distance_km": distance,
            "passengers": int(rng.choice([1, 1, 1, 2, 2, 3, 4])), "vehicle": vehicle, "surge": surge,
            "is_airport": airport, "rider_rating": None if rng.random() < 0.05 else round(float(rng.uniform(3.5, 5)), 2),
        }
        label = {"trip_id": event_id, "driver_id": event["driver_id"], "duration_s": duration,
                 "completed_at": at + int(duration * 1000)}
        # the driver's next request: after this trip, plus a pause
        heapq.heappush(self._queue, (at + int(duration * 1000) + int(rng.exponential(HOUR_MS / 4)), driver))
        self._index += 1
        return event, label

    def bad_events(self, encode):
        """Inputs the scorer must dead-letter, each with the reason and field it should report."""
        template = {"trip_id": f"{self.id_prefix}bad", "driver_id": "driver-bad", "requested_at": self.start_ms,
                    "pickup_zone": "Z01", "dropoff_zone": "Z02", "distance_km": 3.5, "passengers": 1,
                    "vehicle": "standard", "surge": 1.0, "is_airport": False, "rider_rating": 4.5}
        cases = [
            ("null_entity", "driver_id", {"driver_id": ""}, "empty driver"),
            ("out_of_range", "distance_km", {"distance_km": -2.0}, "negative distance"),
            ("out_of_range", "passengers", {"passengers": 0}, "no passenger"),
            ("non_finite", "surge", {"surge": math.nan}, "NaN surge"),
            ("invalid_value", "pickup_zone", {"pickup_zone": "downtown"}, "a zone name, not a zone code"),
            ("invalid_value", "vehicle", {"vehicle": "bike"}, "an unknown vehicle class"),
            ("future_event_time", "requested_at", {"requested_at": 7_258_118_400_000}, "a request in year 2200"),
        ]
        for reason, field, change, description in cases:
            event = {**template, **change}
            yield BadTrip(reason, field, encode(event), event, description)
        yield BadTrip("undecodable", None, b"not avro at all", None, "garbage bytes")


def make_generator(seed: int, n_entities: int, start_ms: int | None = None, drift=None) -> TripGenerator:
    """`drift`: a streamscore.dev.generators.Drift (kind in DRIFT_KINDS, at_event) or None."""
    return TripGenerator(seed, n_entities, DEFAULT_START_MS if start_ms is None else start_ms, drift)
