"""A deterministic payment-event simulator with labelled fraud and optional drift.

`Simulator(seed).events(n)` yields (event, label) pairs in ARRIVAL order:
contract Event dicts and their Label dicts (label_time = event_time + a delay).
The same seed gives the same stream, event for event.

World model, kept small but learnable:
- Each entity (a card) has habits: home country and its currency, a typical
  amount (lognormal), 2-5 preferred merchant categories, a channel mix (mostly
  pos), one or two devices and an activity level. Legitimate activity follows
  the time of day (quiet at night).
- Fraud (~1.5 % of events by default) comes in bursts on a compromised card:
  2-8 events seconds to minutes apart, high amounts, usually a foreign country,
  risky merchant categories (gambling, quasi cash, wire transfers, ...), mostly
  ecom, an unseen device; uniform over the day, so relatively more at night.
- About 1 % of events arrive a few seconds after events that happened later
  (out of order), as real pipelines deliver them.

Drift (DriftSpec) from event index `at_event` on, nothing changes before it:
- covariate: every amount is multiplied by `amount_factor`.
- new_categories: a share of events use merchant categories and countries that
  are not in the feature vocabularies (feature code 1, "unknown").
- concept: new fraud bursts are card testing instead: many small amounts at the
  card's usual merchants, domestic, pos, the card's own device. A model trained
  before the drift scores them as legitimate.

Randomness comes from one numpy Generator drawn in vectorised chunks; the
per-event work is plain Python (well over 100k events/s).
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

# What the simulator generates; examples/payments/spec.yaml encodes the same lists (tests/unit/dev/test_simulator.py)
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "5411",  # grocery stores, supermarkets
    "5812",  # restaurants
    "5814",  # fast food
    "5541",  # service stations
    "5542",  # automated fuel dispensers
    "5311",  # department stores
    "5912",  # drug stores, pharmacies
    "5999",  # miscellaneous retail
    "5732",  # electronics stores
    "5691",  # clothing stores
    "4111",  # commuter transport
    "4121",  # taxis, limousines
    "4814",  # telecommunication services
    "7011",  # hotels, lodging
    "4511",  # airlines
    "5967",  # direct marketing, inbound teleservices
    "7995",  # betting, casino gambling
    "6011",  # ATM cash disbursement
    "6051",  # quasi cash (crypto, money orders)
    "4829",  # wire transfers, money orders
)
COUNTRIES: tuple[str, ...] = (
    "DE", "FR", "NL", "BE", "ES", "IT", "PT", "AT", "CH", "GB",
    "IE", "SE", "NO", "DK", "PL", "FI", "LU", "US", "CA", "JP",
)

DRIFT_KINDS = ("concept", "covariate", "new_categories")  # the first is `demo --drift`'s default: one that harms the model
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
DEFAULT_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

COUNTRY_CURRENCY = {
    "DE": "EUR", "FR": "EUR", "NL": "EUR", "BE": "EUR", "ES": "EUR", "IT": "EUR", "PT": "EUR", "AT": "EUR",
    "IE": "EUR", "FI": "EUR", "LU": "EUR", "CH": "CHF", "GB": "GBP", "SE": "SEK", "NO": "NOK", "DK": "DKK",
    "PL": "PLN", "US": "USD", "CA": "CAD", "JP": "JPY",
    # outside the feature vocabularies (new_categories drift)
    "BR": "BRL", "IN": "INR", "MX": "MXN", "ZA": "ZAR", "TH": "THB", "TR": "TRY",
}
HOME_COUNTRIES = ("DE", "FR", "NL", "BE", "ES", "IT", "AT", "GB", "SE", "PL", "DK", "IE")
HOME_COUNTRY_WEIGHTS = (18, 15, 8, 5, 12, 12, 4, 12, 4, 5, 3, 2)
EVERYDAY_MCCS = ("5411", "5812", "5814", "5541", "5542", "5311", "5912", "5999", "5691", "4111", "4121", "4814")
RARE_MCCS = ("5732", "7011", "4511")
FRAUD_MCCS = ("5967", "7995", "6051", "4829", "5732", "5999")
FRAUD_MCC_WEIGHTS = (3, 3, 3, 2, 2, 1)
FRAUD_COUNTRIES = ("US", "GB", "NL", "CA", "JP", "PL", "IT", "ES")
NEW_MCCS = ("5944", "7273", "5993", "7801", "5122", "7841")  # real MCCs absent from the vocabulary
NEW_COUNTRIES = ("BR", "IN", "MX", "ZA", "TH", "TR")
ATM_MCC = "6011"
CHANNEL_LIST = ("pos", "ecom", "atm", "moto")

assert set(EVERYDAY_MCCS + RARE_MCCS + FRAUD_MCCS + (ATM_MCC,)) <= set(MERCHANT_CATEGORIES)
assert not set(NEW_MCCS) & set(MERCHANT_CATEGORIES) and not set(NEW_COUNTRIES) & set(COUNTRIES)

# Relative legitimate activity by UTC hour (mean 1.0): quiet nights, busy days.
_HOURLY = (0.15, 0.1, 0.1, 0.1, 0.15, 0.3, 0.6, 1.0, 1.3, 1.4, 1.5, 1.6,
           1.7, 1.6, 1.5, 1.5, 1.6, 1.7, 1.7, 1.5, 1.3, 1.0, 0.6, 0.3)
HOURLY_ACTIVITY = tuple(h * 24 / sum(_HOURLY) for h in _HOURLY)

CLASSIC, CARD_TESTING = "classic", "card_testing"
BURST_LENGTH = {CLASSIC: (2, 8), CARD_TESTING: (3, 10)}  # inclusive ranges
BURST_GAP_MS = {CLASSIC: (5_000, 180_000), CARD_TESTING: (10_000, 300_000)}


@dataclass(frozen=True)
class DriftSpec:
    """Change the stream from event index `at_event` (0-based, arrival order) on."""

    kind: str
    at_event: int
    amount_factor: float = 3.0  # covariate
    new_category_share: float = 0.3  # new_categories: share of events with an unseen mcc (and, separately, country)

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise ValueError(f"DriftSpec.kind must be one of {DRIFT_KINDS}, got {self.kind!r}")
        if self.at_event < 0:
            raise ValueError(f"DriftSpec.at_event must be >= 0, got {self.at_event}")
        if self.amount_factor <= 0:
            raise ValueError(f"DriftSpec.amount_factor must be > 0, got {self.amount_factor}")
        if not 0 <= self.new_category_share <= 1:
            raise ValueError(f"DriftSpec.new_category_share must be in [0, 1], got {self.new_category_share}")


@dataclass(frozen=True)
class BadEvent:
    """A poison input: `value` is what goes on the wire; `reason`/`field` what the scorer should reject it with."""

    reason: str
    field: str | None
    value: bytes
    event: dict | None  # the dict that was encoded, None for raw garbage
    description: str


@dataclass(frozen=True)
class _Entity:
    entity_id: str
    country: str
    currency: str
    log_mean: float
    log_sigma: float
    mccs: tuple[str, ...]
    mcc_cum: tuple[float, ...]
    channel_cum: tuple[float, ...]
    devices: tuple[str, ...]


class _Draws:
    """Uniform and standard normal numbers from a Generator, drawn in chunks (cheap per call)."""

    def __init__(self, rng: np.random.Generator, chunk: int = 8192) -> None:
        self.rng = rng
        self.chunk = chunk
        self._u: list[float] = []
        self._ui = 0
        self._z: list[float] = []
        self._zi = 0

    def uniform(self) -> float:
        if self._ui == len(self._u):
            self._u = self.rng.random(self.chunk).tolist()
            self._ui = 0
        self._ui += 1
        return self._u[self._ui - 1]

    def normal(self) -> float:
        if self._zi == len(self._z):
            self._z = self.rng.standard_normal(self.chunk).tolist()
            self._zi = 0
        self._zi += 1
        return self._z[self._zi - 1]

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high] inclusive."""
        return low + int(self.uniform() * (high - low + 1))

    def pick(self, items: tuple, cumulative: tuple[float, ...] | None = None):
        if cumulative is None:
            return items[int(self.uniform() * len(items))]
        return items[bisect_right(cumulative, self.uniform() * cumulative[-1])]


def _cumulative(weights) -> tuple[float, ...]:
    return tuple(accumulate(float(w) for w in weights))


class Simulator:
    """Deterministic stream of (event, label) pairs; see the module docstring."""

    def __init__(
        self,
        seed: int,
        n_entities: int = 1000,
        start_ms: int = DEFAULT_START_MS,
        drift: DriftSpec | None = None,
        *,
        events_per_entity_per_day: float = 10.0,
        fraud_rate: float = 0.015,
        out_of_order_fraction: float = 0.01,
        label_delay_ms: int = 3_600_000,
        id_prefix: str | None = None,
    ) -> None:
        if n_entities < 1:
            raise ValueError(f"n_entities must be >= 1, got {n_entities}")
        if events_per_entity_per_day <= 0:
            raise ValueError(f"events_per_entity_per_day must be > 0, got {events_per_entity_per_day}")
        if not 0 <= fraud_rate < 0.5:
            raise ValueError(f"fraud_rate must be in [0, 0.5), got {fraud_rate}")
        if not 0 <= out_of_order_fraction <= 1:
            raise ValueError(f"out_of_order_fraction must be in [0, 1], got {out_of_order_fraction}")
        if label_delay_ms < 0:
            raise ValueError(f"label_delay_ms must be >= 0, got {label_delay_ms}")
        self.seed = seed
        self.n_entities = n_entities
        self.start_ms = int(start_ms)
        self.drift = drift
        self.fraud_rate = fraud_rate
        self.out_of_order_fraction = out_of_order_fraction
        self.label_delay_ms = label_delay_ms
        self.id_prefix = f"sim{seed}-" if id_prefix is None else id_prefix
        # mean simulated time between two legitimate events of the whole population
        self.mean_gap_ms = DAY_MS / (n_entities * events_per_entity_per_day)

        rng = np.random.default_rng(seed)
        self._entities = self._make_entities(rng, n_entities)
        self._activity_cum = _cumulative(rng.gamma(1.5, 1.0, n_entities))
        self._draws = _Draws(rng)
        self._clock = float(self.start_ms)
        self._next_legit: float | None = None
        self._latest_time = self.start_ms
        self._index = 0
        self._pending: list[tuple[int, int, int, str]] = []  # (time, seq, entity index, burst pattern)
        self._burst_seq = 0

    # --- the world ------------------------------------------------------------------
    @staticmethod
    def _make_entities(rng: np.random.Generator, n: int) -> list[_Entity]:
        home_p = np.asarray(HOME_COUNTRY_WEIGHTS, dtype=float) / sum(HOME_COUNTRY_WEIGHTS)
        homes = rng.choice(len(HOME_COUNTRIES), size=n, p=home_p)
        log_means = rng.normal(math.log(35.0), 0.6, n)
        log_sigmas = rng.uniform(0.3, 0.8, n)
        n_mccs = rng.integers(2, 6, n)
        ecom_share = rng.beta(2, 6, n)
        atm_share = rng.uniform(0.0, 0.08, n)
        two_devices = rng.random(n) < 0.3
        device_ids = rng.integers(0, 2**40, (n, 2))
        entities = []
        for i in range(n):
            mccs = tuple(rng.choice(EVERYDAY_MCCS, size=n_mccs[i] - 1, replace=False)) + (
                RARE_MCCS[i % len(RARE_MCCS)],)
            mcc_weights = rng.dirichlet(np.ones(len(mccs)) * 2)
            mcc_weights[-1] *= 0.2  # the rarely used category
            pos = 1.0 - ecom_share[i] - atm_share[i]
            channel_weights = (pos * 0.97, ecom_share[i], atm_share[i], pos * 0.03)
            devices = (f"dev-{device_ids[i, 0]:010x}",) + ((f"dev-{device_ids[i, 1]:010x}",) if two_devices[i] else ())
            country = HOME_COUNTRIES[homes[i]]
            entities.append(_Entity(
                entity_id=f"card-{i:06d}", country=country, currency=COUNTRY_CURRENCY[country],
                log_mean=float(log_means[i]), log_sigma=float(log_sigmas[i]),
                mccs=tuple(str(m) for m in mccs), mcc_cum=_cumulative(mcc_weights),
                channel_cum=_cumulative(channel_weights), devices=devices,
            ))
        return entities

    @property
    def clock_ms(self) -> int:
        """Simulated time of the latest legitimate event generated so far."""
        return int(self._clock)

    def expected_span_ms(self, n_events: int) -> int:
        """Roughly how much simulated time `n_events` cover (to choose start_ms = now - span)."""
        return int(n_events * self.mean_gap_ms)

    def _drifting(self, kind: str) -> bool:
        return self.drift is not None and self.drift.kind == kind and self._index >= self.drift.at_event

    # --- the stream -------------------------------------------------------------------
    def events(self, n: int) -> Iterator[tuple[dict, dict]]:
        """The next `n` (event, label) pairs in arrival order (continues where the last call stopped)."""
        for _ in range(n):
            yield self._next()

    def _next(self) -> tuple[dict, dict]:
        draws = self._draws
        activity = HOURLY_ACTIVITY[int(self._clock // HOUR_MS % 24)]
        if self._next_legit is None:  # kept until emitted, so fraud in between stays in time order
            self._next_legit = self._clock - math.log(1.0 - draws.uniform()) * self.mean_gap_ms / activity
        next_legit = self._next_legit
        if self._pending and self._pending[0][0] <= next_legit:
            event_time, _, entity_index, pattern = heapq.heappop(self._pending)
            event = self._fraud_event(self._entities[entity_index], event_time, pattern)
            label = 1
        else:
            self._clock = next_legit
            self._next_legit = None
            entity = self._entities[bisect_right(self._activity_cum, draws.uniform() * self._activity_cum[-1])]
            event = self._legit_event(entity, int(next_legit))
            label = 0
            self._maybe_start_burst(int(next_legit), activity)

        if self._drifting("covariate"):
            event["amount"] = round(event["amount"] * self.drift.amount_factor, 2)
        if self._drifting("new_categories"):
            share = self.drift.new_category_share
            if draws.uniform() < share:
                event["merchant_category"] = draws.pick(NEW_MCCS)
            if draws.uniform() < share:
                event["country"] = draws.pick(NEW_COUNTRIES)
        if draws.uniform() < self.out_of_order_fraction and self._index:
            # delivered 1-10 s after an event that happened later
            event["event_time"] = min(event["event_time"], self._latest_time) - draws.integer(1_000, 10_000)
        self._latest_time = max(self._latest_time, event["event_time"])

        event["event_id"] = f"{self.id_prefix}{self._index:010d}"
        self._index += 1
        label_time = event["event_time"] + int(self.label_delay_ms * (0.5 + draws.uniform()))
        return event, {"event_id": event["event_id"], "entity_id": event["entity_id"], "label": label,
                       "label_time": label_time}

    def _maybe_start_burst(self, now_ms: int, activity: float) -> None:
        draws = self._draws
        pattern = CARD_TESTING if self._drifting("concept") else CLASSIC
        low, high = BURST_LENGTH[pattern]
        # fraud_rate of all events; bursts are uniform in time while legit activity follows
        # the hour, so dividing by the activity keeps the overall rate and puts fraud at night.
        p_start = self.fraud_rate / ((1.0 - self.fraud_rate) * (low + high) / 2) / activity
        if draws.uniform() >= p_start:
            return
        victim = int(draws.uniform() * self.n_entities)
        gap_low, gap_high = BURST_GAP_MS[pattern]
        time = now_ms
        for _ in range(draws.integer(low, high)):
            time += draws.integer(gap_low, gap_high)
            self._burst_seq += 1
            heapq.heappush(self._pending, (time, self._burst_seq, victim, pattern))

    def _legit_event(self, entity: _Entity, event_time: int) -> dict:
        draws = self._draws
        channel = CHANNEL_LIST[bisect_right(entity.channel_cum, draws.uniform() * entity.channel_cum[-1])]
        amount = math.exp(entity.log_mean + entity.log_sigma * draws.normal())
        if channel == "atm":
            mcc = ATM_MCC
            amount = max(20.0, round(amount * 2, -1))
        else:
            mcc = draws.pick(entity.mccs, entity.mcc_cum)
        country, currency = entity.country, entity.currency
        if draws.uniform() < 0.04:  # travelling
            country = draws.pick(COUNTRIES)
            currency = COUNTRY_CURRENCY[country]
        device = entity.devices[0] if len(entity.devices) == 1 or draws.uniform() < 0.7 else entity.devices[1]
        event = {
            "event_id": "", "entity_id": entity.entity_id, "event_time": event_time,
            "amount": round(max(amount, 0.5), 2), "currency": currency, "merchant_category": mcc,
            "channel": channel, "country": country, "device_id": device,
        }
        if draws.uniform() < 0.03:  # incomplete records from some acquirers
            event[draws.pick(("merchant_category", "channel", "country", "device_id"))] = None
        return event

    def _fraud_event(self, entity: _Entity, event_time: int, pattern: str) -> dict:
        draws = self._draws
        if pattern == CARD_TESTING:
            return {
                "event_id": "", "entity_id": entity.entity_id, "event_time": event_time,
                "amount": round(0.5 + 4.5 * draws.uniform(), 2), "currency": entity.currency,
                "merchant_category": draws.pick(entity.mccs, entity.mcc_cum), "channel": "pos",
                "country": entity.country, "device_id": entity.devices[0],
            }
        if draws.uniform() < 0.8:
            country = draws.pick(FRAUD_COUNTRIES)
            if country == entity.country:
                country = "US"
        else:
            country = entity.country
        u = draws.uniform()
        channel = "ecom" if u < 0.7 else "moto" if u < 0.85 else "pos" if u < 0.95 else "atm"
        mcc = ATM_MCC if channel == "atm" else draws.pick(FRAUD_MCCS, _FRAUD_MCC_CUM)
        amount = math.exp(math.log(250.0) + 0.9 * draws.normal())
        return {
            "event_id": "", "entity_id": entity.entity_id, "event_time": event_time,
            "amount": round(min(max(amount, 1.0), 20_000.0), 2), "currency": COUNTRY_CURRENCY[country],
            "merchant_category": mcc, "channel": channel, "country": country,
            "device_id": f"dev-{int(draws.uniform() * 2**40):010x}",
        }

    # --- poison inputs ------------------------------------------------------------------
    def bad_events(self, encode: Callable[[dict], bytes] | None = None) -> Iterator[BadEvent]:
        """Inputs the scorer must dead-letter, each with the reason and field it should report.

        Dict cases are encoded with `encode` (default: the Avro single-object
        framing of streamscore.avro.codec, which every reader accepts). Times are
        absolute (year 2200, year 1990), so they are wrong for any sane clock
        and settings. Deterministic for a seed; does not advance `events()`.
        """
        if encode is None:  # the payments example's Event schema
            from streamscore.avro.codec import AvroCodec, SchemaCatalog
            from streamscore.spec import default_spec_path, load_spec

            encode = AvroCodec(SchemaCatalog.for_spec(load_spec(default_spec_path()))).encoder("event")
        template = {
            "event_id": f"{self.id_prefix}bad", "entity_id": "card-bad", "event_time": self.start_ms,
            "amount": 12.5, "currency": "EUR", "merchant_category": "5411", "channel": "pos",
            "country": "DE", "device_id": None,
        }
        cases = [
            ("null_entity", "entity_id", {"entity_id": ""}, "empty entity_id"),
            ("null_entity", "entity_id", {"entity_id": "   "}, "whitespace entity_id"),
            ("missing_field", "event_id", {"event_id": ""}, "empty event_id"),
            ("non_finite", "amount", {"amount": math.nan}, "NaN amount"),
            ("non_finite", "amount", {"amount": math.inf}, "infinite amount"),
            ("out_of_range", "amount", {"amount": -5.0}, "negative amount"),
            ("out_of_range", "amount", {"amount": 1e15}, "huge amount"),
            ("future_event_time", "event_time", {"event_time": 7_258_118_400_000}, "event in year 2200"),
            ("stale_event_time", "event_time", {"event_time": 631_152_000_000}, "event in year 1990"),
            ("invalid_value", "currency", {"currency": "eu"}, "malformed currency"),
        ]
        for i, (reason, field, change, description) in enumerate(cases):
            event = {**template, "event_id": f"{self.id_prefix}bad-{i}", **change}
            yield BadEvent(reason, field, encode(event), event, description)
        valid = encode(dict(template, event_id=f"{self.id_prefix}bad-truncated"))
        yield BadEvent("undecodable", None, valid[: len(valid) // 2], None, "truncated Avro body")
        yield BadEvent("undecodable", None, b"not avro at all", None, "garbage bytes (no framing magic byte)")


_FRAUD_MCC_CUM = _cumulative(FRAUD_MCC_WEIGHTS)
