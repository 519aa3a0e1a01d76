"""Throughput of the feature path and the simulator (single core).

    .venv/bin/python bench/bench_features.py [--events 200000] [--entities 1000]

Prints: simulator events/s, validate_event µs/event, compute_batch µs/event on a
warm state (the second half of the stream, batches of 500 with offsets, as the
scorer calls it), EntityState.to_bytes (first write, and after one new event: the
checkpoint case)/from_bytes µs per entity and bytes per entity. CPU time (time.process_time), so other processes on the machine matter
less than for wall time; still run it on a quiet machine for numbers to quote.
"""
from __future__ import annotations

import argparse
import statistics
import time

from streamscore.legacy import features
from streamscore.settings import Settings
from streamscore.dev.simulator import Simulator
from streamscore.legacy.validation import validate_event


def cpu_us_per_item(fn, n_items: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best / n_items * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    n, half = args.events, args.events // 2

    start = time.process_time()
    pairs = list(Simulator(1, n_entities=args.entities).events(n))
    sim_rate = n / (time.process_time() - start)
    events = [event for event, _ in pairs]

    settings = Settings()
    now_ms = max(e["event_time"] for e in events) + 1
    validate_us = cpu_us_per_item(lambda: [validate_event(e, settings, now_ms) for e in events], n)

    warm: dict[str, features.EntityState] = {}
    features.compute_batch(warm, events[:half], list(range(half)))
    snapshot = {k: s.to_bytes() for k, s in warm.items()}

    def score_second_half() -> None:
        states = {k: features.EntityState.from_bytes(v) for k, v in snapshot.items()}
        start_ns = time.process_time_ns()
        for i in range(half, n, args.batch):
            chunk = events[i:i + args.batch]
            features.compute_batch(states, chunk, list(range(i, i + len(chunk))))
        timings.append((time.process_time_ns() - start_ns) / 1e3 / (n - half))

    timings: list[float] = []
    for _ in range(3):
        score_second_half()
    batch_us = min(timings)

    cold: dict[str, features.EntityState] = {}  # never written: to_bytes encodes every retained event
    features.compute_batch(cold, events[:half], list(range(half)))
    first_write_us = cpu_us_per_item(lambda: [s.to_bytes() for s in cold.values()], len(cold), repeat=1)
    states = list(warm.values())
    rewrite: list[float] = []  # a checkpoint's case: one event applied since the state's last write
    for round_ in range(3):
        for i, state in enumerate(states):
            state.apply(state.watermark + 60_000, 12.5, "5411", n + round_ * len(states) + i, i + 1)
        rewrite.append(cpu_us_per_item(lambda: [s.to_bytes() for s in states], len(states), repeat=1))
    blobs = [s.to_bytes() for s in states]
    from_bytes_us = cpu_us_per_item(lambda: [features.EntityState.from_bytes(b) for b in blobs], len(blobs))
    retained = statistics.mean(len(s) for s in states)

    print(f"simulator            {sim_rate:>10,.0f} events/s")
    print(f"validate_event       {validate_us:>10.2f} us/event")
    print(f"compute_batch (warm) {batch_us:>10.2f} us/event  ({1e6 / batch_us:,.0f} events/s, batch {args.batch})")
    print(f"state to_bytes       {first_write_us:>10.1f} us/entity first write, {min(rewrite):.1f} after one new "
          f"event; from_bytes {from_bytes_us:.1f} us/entity; {statistics.mean(map(len, blobs)):,.0f} bytes/entity, "
          f"{retained:.0f} retained events/entity")


if __name__ == "__main__":
    main()
