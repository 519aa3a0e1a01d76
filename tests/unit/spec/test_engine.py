"""The feature engine: exact values on small cases, and no online/offline skew for any spec.

The oracle (spec/oracle.py) is a naive interpreter of the documented semantics. The compiled engine
must agree with it bit for bit, online (batches, restarts through the changelog bytes, crash replays)
and offline (one replay), for the example specs and for random specs over random streams.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from conftest import example_spec
from streamscore.avro.scanner import columns_from_records
from streamscore.spec import load_spec
from streamscore.spec.engine import APPLIED, DUPLICATE, LATE, REPLAYED, FeatureEngine
from streamscore.spec.oracle import Oracle
from streamscore.spec.text import Vocabulary

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
PAYMENTS = example_spec("payments")
_ids = iter(range(10**9))


def ev(t: int, amount: float = 10.0, entity: str = "card-1", **fields) -> dict:
    event = {"event_id": f"e{next(_ids)}", "entity_id": entity, "event_time": t, "amount": amount,
             "currency": "EUR", "merchant_category": "5411", "channel": "pos", "country": "DE", "device_id": None}
    event.update(fields)
    return event


def run(spec, events, offsets=None, engine=None, state=None, learned=None):
    """(matrix, status, first offsets) of events in arrival order through one partition's state."""
    engine = engine or FeatureEngine(spec)
    state = state if state is not None else engine.new_state()
    batch = columns_from_records(spec.event.layout, events)
    offsets = np.arange(len(events)) if offsets is None else np.asarray(offsets)
    inputs = engine.inputs(batch, np.arange(len(events)), offsets)
    matrix, status, first = engine.compute(state, inputs)
    engine.encode(matrix, inputs, {k: Vocabulary(v) for k, v in (learned or {}).items()})
    return matrix, status, first


def named(spec, matrix):
    return [dict(zip(spec.feature_names, row.tolist())) for row in matrix]


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN equal to NaN)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all((a.view(np.int64) == b.view(np.int64)) | (np.isnan(a) & np.isnan(b))))


# --- exact values (the payments spec) ---------------------------------------------------------
def test_first_event_has_empty_windows_and_nan_where_undefined():
    (f,) = named(PAYMENTS, run(PAYMENTS, [ev(T0 + 5 * HOUR, 25.0)])[0])
    assert f["amount"] == 25.0 and f["log_amount"] == math.log1p(25.0) and f["hour_of_day"] == 5.0
    assert f["count_1h"] == f["sum_1h"] == f["count_24h"] == f["sum_24h"] == f["distinct_mcc_24h"] == 0.0
    for name in ("mean_7d", "std_7d", "secs_since_prev", "amount_to_mean_7d", "amount_zscore_7d"):
        assert math.isnan(f[name]), name


def test_window_boundaries_exclude_exactly_w_ago_and_include_same_time():
    events = [ev(T0), ev(T0 + HOUR - 1), ev(T0 + HOUR), ev(T0 + HOUR)]
    rows = named(PAYMENTS, run(PAYMENTS, events)[0])
    assert rows[1]["count_1h"] == 1.0  # T0 is inside (t - 1h, t]
    assert rows[2]["count_1h"] == 1.0  # T0 is exactly 1 h ago: out; T0+1h-1 in
    assert rows[3]["count_1h"] == 2.0  # an earlier event at the same time counts (time <= t)
    assert rows[3]["secs_since_prev"] == 0.0


def test_mean_std_ratio_and_zscore():
    rows = named(PAYMENTS, run(PAYMENTS, [ev(T0, 10.0), ev(T0 + MIN, 20.0), ev(T0 + 2 * MIN, 40.0)])[0])
    last = rows[2]
    assert last["mean_7d"] == 15.0 and last["std_7d"] == pytest.approx(math.sqrt(50.0), rel=1e-15)
    assert last["amount_to_mean_7d"] == 40.0 / 15.0
    assert last["amount_zscore_7d"] == pytest.approx((40.0 - 15.0) / math.sqrt(50.0), rel=1e-15)
    assert last["sum_1h"] == 30.0 and last["count_24h"] == 2.0


def test_identical_values_have_exactly_their_mean_and_zero_std_so_no_zscore():
    rows = named(PAYMENTS, run(PAYMENTS, [ev(T0 + i * MIN, 0.1) for i in range(4)])[0])
    assert rows[3]["mean_7d"] == 0.1 and rows[3]["std_7d"] == 0.0  # 0.1 summed thrice is not 0.3
    assert math.isnan(rows[3]["amount_zscore_7d"]) and rows[3]["amount_to_mean_7d"] == 1.0


def test_zero_mean_gives_nan_ratio():
    rows = named(PAYMENTS, run(PAYMENTS, [ev(T0, 0.0), ev(T0 + MIN, 5.0)])[0])
    assert rows[1]["mean_7d"] == 0.0 and math.isnan(rows[1]["amount_to_mean_7d"])


def test_out_of_order_event_sees_no_future_and_counts_for_later_events():
    events = [ev(T0 + 30 * MIN, 1.0), ev(T0, 2.0), ev(T0 + 40 * MIN, 4.0)]
    rows = named(PAYMENTS, run(PAYMENTS, events)[0])
    assert rows[1]["count_1h"] == 0.0 and math.isnan(rows[1]["secs_since_prev"])  # T0+30m is its future
    assert rows[2]["count_1h"] == 2.0 and rows[2]["sum_1h"] == 3.0 and rows[2]["secs_since_prev"] == 600.0


def test_distinct_count_ignores_nulls_empty_and_repeats():
    events = [ev(T0, merchant_category="5411"), ev(T0 + 1, merchant_category="5411"),
              ev(T0 + 2, merchant_category=None), ev(T0 + 3, merchant_category=""),
              ev(T0 + 4, merchant_category="7995"), ev(T0 + 5)]
    assert named(PAYMENTS, run(PAYMENTS, events)[0])[5]["distinct_mcc_24h"] == 2.0


def test_category_codes_null_unknown_and_known():
    rows = named(PAYMENTS, run(PAYMENTS, [ev(T0, currency="USD", merchant_category=None, channel="",
                                             country="BR")])[0])
    assert rows[0]["currency_code"] == 3.0  # EUR 2, USD 3
    assert rows[0]["mcc_code"] == 0.0 and rows[0]["channel_code"] == 0.0  # null and empty
    assert rows[0]["country_code"] == 1.0  # not in the vocabulary


def test_secs_since_prev_looks_back_no_further_than_its_window():
    rows = named(PAYMENTS, run(PAYMENTS, [ev(T0), ev(T0 + 7 * DAY - 1), ev(T0 + 15 * DAY)])[0])
    assert rows[1]["secs_since_prev"] == (7 * DAY - 1) / 1000
    assert math.isnan(rows[2]["secs_since_prev"])  # 8 days back: outside the 7 d window


def test_late_event_is_scored_but_not_added_to_state():
    lateness = PAYMENTS.lateness_ms
    newest = T0 + lateness + DAY
    events = [ev(newest, 5.0), ev(T0, 100.0), ev(newest - DAY + 10 * MIN, 7.0), ev(newest - DAY + 20 * MIN, 1.0)]
    matrix, status, _ = run(PAYMENTS, events)
    assert status.tolist() == [APPLIED, LATE, APPLIED, APPLIED]  # 1 d behind the watermark: not late
    rows = named(PAYMENTS, matrix)
    assert rows[1]["amount"] == 100.0 and rows[1]["count_24h"] == 0.0  # scored from the retained state
    assert rows[3]["count_1h"] == 1.0 and rows[3]["sum_1h"] == 7.0  # the late one was never applied


def test_retention_drops_old_events_but_keeps_windows_of_non_late_events_exact():
    engine = FeatureEngine(PAYMENTS)
    state = engine.new_state()
    events = [ev(T0 + i * DAY) for i in range(30)]
    matrix, _, _ = run(PAYMENTS, events, engine=engine, state=state)
    kept = state.events_of(b"card-1")[:, 0]
    assert kept[0] >= kept[-1] - PAYMENTS.retention_ms and len(kept) == 15  # 14 d + the newest
    reference = Oracle(PAYMENTS).run((e, 0, i) for i, e in enumerate(events))
    assert identical(matrix, reference)


def test_replayed_offset_is_not_counted_twice_and_gets_the_same_vector():
    engine = FeatureEngine(PAYMENTS)
    state = engine.new_state()
    events = [ev(T0, 10.0), ev(T0 + MIN, 20.0), ev(T0 + 2 * MIN, 30.0)]
    first, _, _ = run(PAYMENTS, events, engine=engine, state=state)
    again, status, _ = run(PAYMENTS, events[1:], offsets=[1, 2], engine=engine, state=state)
    assert status.tolist() == [REPLAYED, REPLAYED] and identical(again, first[1:])
    assert len(state.events_of(b"card-1")) == 3


def test_resent_event_id_is_not_applied_again_and_gets_its_first_vector():
    engine = FeatureEngine(PAYMENTS)
    state = engine.new_state()
    a, b = ev(T0, 10.0), ev(T0 + MIN, 20.0)
    matrix, status, first = run(PAYMENTS, [a, b, dict(a), ev(T0 + 2 * MIN, 5.0)], engine=engine, state=state)
    assert status.tolist() == [APPLIED, APPLIED, DUPLICATE, APPLIED] and first[2] == 0
    assert identical(matrix[2], matrix[0])
    assert named(PAYMENTS, matrix)[3]["count_1h"] == 2.0  # the re-send did not count


# --- learned encodings (the rides spec) -------------------------------------------------------
def test_learned_encodings_use_the_given_vocabulary_and_are_unknown_without_one():
    rides = example_spec("rides")
    from streamscore.dev.generators import load_generator

    events = [e for e, _ in load_generator(rides).make_generator(2, 5).events(20)]
    column = rides.feature_names.index("pickup_code")
    without, _, _ = run(rides, events)
    assert set(without[:, column]) == {1.0}  # no model yet: every zone is unknown
    zones = sorted({e["pickup_zone"] for e in events})
    with_vocabulary, _, _ = run(rides, events, learned={"pickup_code": zones})
    assert with_vocabulary[:, column].tolist() == [2.0 + zones.index(e["pickup_zone"]) for e in events]
    oracle = Oracle(rides, learned={"pickup_code": zones}).run((e, 0, i) for i, e in enumerate(events))
    assert identical(with_vocabulary, oracle)


# --- no skew: online (batches, restarts through bytes, replays) == offline == the oracle ----------
def online(spec, events, partitions, batch: int, restart_every: int, replay: int):
    """Vectors of each event's first scoring, like the scorer: batches; every `restart_every` events every
    state goes through its changelog bytes and the last `replay` events are processed again (a crash
    after the state was written, before the offsets were committed). Replays of events that are not late
    against the entity's watermark at replay time must get their first vector again."""
    engine = FeatureEngine(spec)
    states = {p: engine.new_state() for p in set(partitions)}
    first: dict[int, np.ndarray] = {}
    position, next_restart = 0, restart_every
    while position < len(events):
        chunk = range(position, min(position + batch, len(events)))
        for p in states:
            rows = [i for i in chunk if partitions[i] == p]
            if not rows:
                continue
            watermarks = {}
            for i in rows:
                entity = events[i][spec.event.entity_field].encode()
                if entity in states[p]:
                    watermarks[i] = states[p].events_of(entity)[-1, 0]
            matrix, status, _ = run(spec, [events[i] for i in rows], offsets=rows, engine=engine, state=states[p])
            for k, i in enumerate(rows):
                if i not in first:
                    first[i] = matrix[k]
                elif status[k] == REPLAYED:
                    t = events[i][spec.event.time_field] // spec.event.time_divisor
                    if i not in watermarks or t >= watermarks[i] - spec.lateness_ms:
                        assert identical(matrix[k], first[i]), f"replay of event {i} differs"
        position = chunk.stop
        if position >= next_restart:
            next_restart += restart_every
            restored = {}
            for p, state in states.items():
                restored[p] = engine.new_state()
                for entity, value in state.encode(list(range(len(state.entity_ids)))):
                    restored[p].load(entity, value)
            states = restored
            position = max(0, position - replay)
    return np.array([first[i] for i in range(len(events))])


def offline(spec, events, partitions):
    matrix = np.empty((len(events), len(spec.features)))
    engine = FeatureEngine(spec)
    for p in sorted(set(partitions)):
        rows = [i for i in range(len(events)) if partitions[i] == p]
        matrix[rows] = run(spec, [events[i] for i in rows], offsets=rows, engine=engine)[0]
    return matrix


def assert_no_skew(spec, events, partitions, batch=7, restart_every=50, replay=5):
    served = online(spec, events, partitions, batch, restart_every, replay)
    replayed = offline(spec, events, partitions)
    reference = np.array(Oracle(spec).run((e, partitions[i], i) for i, e in enumerate(events)))
    assert identical(served, replayed), "online != offline"
    assert identical(replayed, reference.reshape(replayed.shape)), "engine != the oracle"


def payments_stream(seed: int, n: int, resend: float = 0.0) -> list[dict]:
    """Arrival-ordered events with out-of-order, late, unknown and null categories and (with probability
    `resend`) producer re-sends of one of the last 50 events."""
    rnd = random.Random(seed)
    clock, events = T0, []
    for i in range(n):
        if events and rnd.random() < resend:
            events.append(dict(rnd.choice(events[-50:])))
            continue
        clock += int(rnd.expovariate(1 / (20 * MIN)))
        if rnd.random() < 0.01:
            clock += rnd.randint(1, 20) * DAY  # quiet periods beyond retention
        t, u = clock, rnd.random()
        if u < 0.1:
            t -= rnd.randint(1_000, 3 * HOUR)  # out of order
        elif u < 0.13:
            t -= rnd.randint(7 * DAY + 1, 30 * DAY)  # late
        elif u < 0.15:
            t -= rnd.randint(6 * DAY, 7 * DAY)  # just inside the lateness bound
        events.append({
            "event_id": f"s{seed}-{i}", "entity_id": f"card-{rnd.randrange(6)}", "event_time": t,
            "amount": rnd.choice([round(rnd.lognormvariate(3, 1.2), 2), 0.0, 12.5, round(rnd.uniform(0, 1e6), 2)]),
            "currency": rnd.choice(["EUR", "USD", "XXX", "GBP"]),
            "merchant_category": rnd.choice(["5411", "5812", "7995", "0000", None, ""]),
            "channel": rnd.choice(["pos", "ecom", "POS", None]), "country": rnd.choice(["DE", "FR", "BR", None]),
            "device_id": None,
        })
    return events


def test_payments_online_with_restarts_replays_and_resends_equals_offline_and_the_oracle():
    events = payments_stream(seed=7, n=1500, resend=0.03)
    assert_no_skew(PAYMENTS, events, [hash(e["entity_id"]) % 2 for e in events])


def test_rides_online_with_restarts_and_replays_equals_offline_and_the_oracle():
    rides = example_spec("rides")
    from streamscore.dev.generators import load_generator

    events = [e for e, _ in load_generator(rides).make_generator(4, 40).events(1500)]
    assert_no_skew(rides, events, [int(e["driver_id"][-2:]) % 3 for e in events], batch=11, restart_every=90)


# --- random specs over random streams ----------------------------------------------------------
SCHEMA = {"type": "record", "name": "Thing", "namespace": "test", "fields": [
    {"name": "id", "type": "string"}, {"name": "key", "type": "string"}, {"name": "at", "type": "long"},
    {"name": "x", "type": "double"}, {"name": "y", "type": ["null", "double"], "default": None},
    {"name": "n", "type": "int"}, {"name": "flag", "type": "boolean"},
    {"name": "s", "type": ["null", "string"], "default": None}, {"name": "c", "type": "string"},
]}
LABEL = {"type": "record", "name": "Outcome", "namespace": "test", "fields": [
    {"name": "id", "type": "string"}, {"name": "value", "type": "double"}]}
WINDOWS = ["1s", "90s", "15m", "1h", "1d"]
NUMERIC = ["x", "y", "n", "flag"]

feature_strategy = st.one_of(
    st.builds(lambda f: {"field": f}, st.sampled_from(NUMERIC)),
    st.builds(lambda f: {"transform": "log1p", "field": f}, st.sampled_from(NUMERIC)),
    st.sampled_from([{"transform": "hour_of_day"}, {"transform": "day_of_week"}]),
    st.builds(lambda w: {"aggregate": "count", "window": w}, st.sampled_from(WINDOWS)),
    st.builds(lambda f, w: {"aggregate": "count", "field": f, "window": w}, st.sampled_from(["y", "s"]),
              st.sampled_from(WINDOWS)),
    st.builds(lambda a, f, w: {"aggregate": a, "field": f, "window": w},
              st.sampled_from(["sum", "mean", "std", "min", "max", "last"]), st.sampled_from(NUMERIC),
              st.sampled_from(WINDOWS)),
    st.builds(lambda f, w: {"aggregate": "distinct_count", "field": f, "window": w}, st.sampled_from(["s", "c"]),
              st.sampled_from(WINDOWS)),
    st.builds(lambda w: {"aggregate": "time_since_previous", "window": w}, st.sampled_from(WINDOWS)),
    st.builds(lambda f, of, w: {"transform": "ratio", "field": f, "of": of, "window": w}, st.sampled_from(NUMERIC),
              st.sampled_from(["mean", "sum", "min", "max", "last"]), st.sampled_from(WINDOWS)),
    st.builds(lambda f, w: {"transform": "zscore", "field": f, "window": w}, st.sampled_from(NUMERIC),
              st.sampled_from(WINDOWS)),
    st.builds(lambda f: {"encode": "vocabulary", "field": f, "values": ["a", "b", "c"]}, st.sampled_from(["s", "c"])),
)
event_strategy = st.fixed_dictionaries({
    "key": st.sampled_from(["k1", "k2", "k3"]),
    "dt": st.one_of(st.integers(-2 * MIN, 2 * MIN), st.integers(-2 * DAY, 2 * DAY), st.just(0)),
    "x": st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, -1.0, 0.1, 1e-300])),
    "y": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False, width=32)),
    "n": st.integers(-5, 5), "flag": st.booleans(),
    "s": st.one_of(st.none(), st.sampled_from(["a", "b", "z", ""])), "c": st.sampled_from(["a", "c", "q"]),
    "resend": st.integers(0, 20),
    # an event exactly a window length (+-1 ms) after an earlier one: the boundaries must agree to the ms
    "anchor": st.one_of(st.none(), st.tuples(st.sampled_from([1000, 90_000, 15 * MIN, HOUR, DAY]),
                                             st.sampled_from([-1, 0, 1]))),
})


def write_spec(directory: Path, features: list[dict], lateness: str) -> Path:
    (directory / "thing.avsc").write_text(json.dumps(SCHEMA))
    (directory / "outcome.avsc").write_text(json.dumps(LABEL))
    named_features = [{"name": f"f{i}", **f} for i, f in enumerate(features)]
    spec = {"format": 1, "name": "random", "lateness": lateness,
            "event": {"schema": "thing.avsc", "id": "id", "entity": "key", "time": "at"},
            "label": {"schema": "outcome.avsc", "id": "id", "value": "value", "kind": "numeric"},
            "features": named_features}
    path = directory / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@hypothesis_settings(max_examples=120, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(feature_strategy, min_size=1, max_size=8), st.sampled_from(["0s", "1m", "1h", "2d"]),
       st.lists(event_strategy, min_size=1, max_size=50), st.integers(1, 9), st.integers(3, 25))
def test_property_any_spec_online_equals_offline_equals_the_oracle(tmp_path_factory, features, lateness, raw, batch,
                                                                  restart_every):
    spec = load_spec(write_spec(tmp_path_factory.mktemp("spec"), features, lateness))
    clock, events = T0, []
    for i, r in enumerate(raw):
        if r["resend"] == 0 and events:
            events.append(dict(events[i // 2]))  # a producer re-send of an earlier event
            continue
        clock += abs(r["dt"]) // 3
        at = clock + r["dt"]
        if r["anchor"] is not None and events:
            at = events[i // 2]["at"] + r["anchor"][0] + r["anchor"][1]
            clock = max(clock, at)
        events.append({"id": f"h{i}", "key": r["key"], "at": at, "x": r["x"], "y": r["y"],
                       "n": r["n"], "flag": r["flag"], "s": r["s"], "c": r["c"]})
    assert_no_skew(spec, events, [0] * len(events), batch=batch, restart_every=restart_every,
                   replay=min(3, restart_every))
