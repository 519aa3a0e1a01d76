"""The trainer's training set reads a bounded span of `predictions`, however long the table: the window (at
most trainer_max_events) plus at most trainer_max_history_events of warm-up before it, by the table's time
order (rows read = ClickHouse's own count, in the query summary)."""
from __future__ import annotations

import pytest

from streamscore.learning.training_set import load_logged_events, training_window

from conftest import example_spec

pytestmark = pytest.mark.integration

PAYMENTS = example_spec("payments")
EVENTS = 200_000
STEP_MS = 10_000  # one event every 10 s: 200k events span 23 days, longer than the spec's 14-day history
START_MS = 1_780_000_000_000
GRANULE = 8192


def log_synthetic_events(store, n: int, blocks: int = 4) -> None:
    """`n` logged events, one every STEP_MS, inserted in time-ordered blocks (as the logger writes them)."""
    per_block = n // blocks
    for block in range(blocks):
        store.command(
            "INSERT INTO predictions (event_id, entity_id, event_time, scored_at, model_name, model_version, score, "
            "amount, currency, merchant_category, channel, country, device_id, feature_set, event_partition, "
            "event_offset) "
            f"SELECT concat('e', toString(number)), concat('card', toString(number % 500)), "
            f"fromUnixTimestamp64Milli(toInt64({START_MS} + number * {STEP_MS}), 'UTC'), now64(3), 'fraud', 1, 0.1, "
            "10 + number % 90, 'EUR', 'grocery', 'web', 'DE', '', 'fs', toUInt32(number % 4), number "
            f"FROM numbers({block * per_block}, {per_block})")


def test_the_training_set_reads_the_window_and_its_warm_up_not_the_table(store, settings):
    log_synthetic_events(store, EVENTS)
    everything = load_logged_events(store, PAYMENTS)
    assert len(everything) == EVENTS and everything.rows_read >= EVENTS  # unbounded: the whole table

    window = training_window(store, PAYMENTS, window_ms=30 * 86_400_000, max_events=10_000,
                             max_history_events=15_000)
    newest = START_MS + (EVENTS - 1) * STEP_MS
    assert window.since_ms == newest - (10_000 - 1) * STEP_MS  # capped at the newest 10k events
    assert window.read_from_ms == newest - (25_000 - 1) * STEP_MS  # warm-up capped at 15k before them
    assert window.rows_read <= 25_000 + 2 * GRANULE * 4  # finding it read about what it found

    logged = load_logged_events(store, PAYMENTS, since_ms=window.since_ms, read_from_ms=window.read_from_ms)
    assert len(logged) == 25_000
    assert int(logged.times.min()) == window.read_from_ms
    # the primary key (event_time, event_id) prunes the rest: a granule or two at each edge of each part
    assert logged.rows_read <= 25_000 + 2 * GRANULE * 4, logged.rows_read
    assert logged.rows_read < EVENTS / 4

    # a short window within the spec's history: the history bound (14 days before it) applies, not the cap
    days = load_logged_events(store, PAYMENTS, since_ms=newest - 86_400_000)
    expected = (86_400_000 + PAYMENTS.history_ms) // STEP_MS + 1
    assert len(days) == expected and days.rows_read <= expected + 2 * GRANULE * 4
