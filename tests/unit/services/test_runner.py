"""ServiceGroup semantics: a crashed service is restarted with backoff while the others keep running; one
that keeps crashing, or a stuck one, never looks like a clean stop."""
from __future__ import annotations

import threading
import time

import pytest

from streamscore.ops.service_stats import ServiceStats
from streamscore.services.restarts import RestartPolicy, ServiceKeepsFailing, run_with_restarts
from streamscore.services.runner import ServiceGroup
from streamscore.settings import Settings

QUICK = RestartPolicy(max_restarts=3, backoff_s=0.01, healthy_s=60)


class StopsWhenAsked:
    def run(self, stop: threading.Event) -> None:
        stop.wait()


class IgnoresStop:
    def __init__(self):
        self.release = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self.release.wait(10)


class Crashes:
    def __init__(self, stats: ServiceStats | None = None):
        self.stats = stats or ServiceStats("bad")

    def run(self, stop: threading.Event) -> None:
        raise ValueError("boom")


class CrashesFirstTimes:
    """Crashes on its first `crashes` runs (counted across rebuilt instances), then runs until stopped."""

    def __init__(self, crashes: int, runs: list | None = None, stats: ServiceStats | None = None):
        self.crashes = crashes
        self.runs = runs if runs is not None else []
        self.stats = stats or ServiceStats("flaky")

    def run(self, stop: threading.Event) -> None:
        self.runs.append(self)
        if len(self.runs) <= self.crashes:
            raise ConnectionError(f"crash #{len(self.runs)}")
        stop.wait()


def group_of(policy: RestartPolicy = QUICK, **services) -> ServiceGroup:
    group = ServiceGroup(Settings(kafka_bootstrap_servers="unused:9092"), [], restart_policy=policy)
    group.services = services
    group.build = lambda name, stats: type(services[name])(**rebuild_args(services[name], stats))
    return group


def rebuild_args(service, stats) -> dict:
    if isinstance(service, CrashesFirstTimes):
        return {"crashes": service.crashes, "runs": service.runs, "stats": stats}
    return {"stats": stats}


def test_clean_shutdown_returns():
    group = group_of(a=StopsWhenAsked(), b=StopsWhenAsked()).start()
    group.shutdown(timeout_s=5)


def test_a_service_ignoring_stop_makes_shutdown_raise_within_the_timeout():
    stuck = IgnoresStop()
    group = group_of(ok=StopsWhenAsked(), stuck=stuck).start()
    try:
        with pytest.raises(RuntimeError, match="stuck did not stop within"):
            group.shutdown(timeout_s=0.5)
    finally:
        stuck.release.set()


def test_a_crashed_service_is_restarted_as_a_new_instance_and_the_others_keep_running():
    flaky = CrashesFirstTimes(crashes=2)
    group = group_of(ok=StopsWhenAsked(), flaky=flaky).start()
    try:
        deadline = time.monotonic() + 5
        while len(flaky.runs) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(flaky.runs) == 3, flaky.runs
        assert not group.stop.is_set() and not group.failures
        assert len({id(run) for run in flaky.runs}) == 3, "a restart must build a fresh service"
        assert group.services["flaky"] is flaky.runs[-1]
        assert flaky.runs[-1].stats is flaky.stats and flaky.stats.restarts == 2
        sample = flaky.stats.registry.get_sample_value("streamscore_service_restarts_total", {"service": "flaky"})
        assert sample == 2
    finally:
        group.shutdown(timeout_s=5)


def test_a_service_that_keeps_crashing_stops_the_others_and_is_raised():
    group = group_of(ok=StopsWhenAsked(), bad=Crashes()).start()
    assert group.stop.wait(5), "a service that keeps crashing must stop the others"
    with pytest.raises(RuntimeError, match="service bad failed: bad crashed 4 times in a row, last: ValueError: boom"):
        group.join(5)
    assert group.services["bad"].stats.restarts == 3


def test_backoff_doubles_up_to_the_bound():
    policy = RestartPolicy(max_restarts=10, backoff_s=1.0, max_backoff_s=60.0)
    assert [policy.delay_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_restart_waits_the_backoff_and_a_stop_during_it_ends_quickly():
    stop = threading.Event()
    starts: list[float] = []

    class Failing:
        def run(self, stop_event):
            starts.append(time.monotonic())
            raise ConnectionError("down")

    policy = RestartPolicy(max_restarts=3, backoff_s=0.1)
    with pytest.raises(ServiceKeepsFailing):
        run_with_restarts("x", Failing(), Failing, stop, policy)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 4 and all(g >= want * 0.9 for g, want in zip(gaps, (0.1, 0.2, 0.4))), gaps

    starts.clear()
    threading.Timer(0.2, stop.set).start()
    began = time.monotonic()
    run_with_restarts("x", Failing(), Failing, stop, RestartPolicy(max_restarts=3, backoff_s=30))
    assert time.monotonic() - began < 2 and len(starts) == 1


def test_a_service_that_ran_healthy_long_enough_starts_its_count_again():
    stop = threading.Event()
    runs = []

    class SlowThenCrash:
        def run(self, stop_event):
            runs.append(1)
            if len(runs) > 6:
                return
            time.sleep(0.03)  # "healthy" for longer than healthy_s below
            raise ConnectionError("broker restarted")

    run_with_restarts("x", SlowThenCrash(), SlowThenCrash, stop,
                      RestartPolicy(max_restarts=2, backoff_s=0.01, healthy_s=0.02))
    assert len(runs) == 7, "crashes after a healthy run must not add up to giving up"


def test_a_rebuild_that_fails_counts_as_a_crash_and_is_retried():
    stop = threading.Event()
    attempts = []

    class Works:
        def run(self, stop_event):
            attempts.append("ran")

    def rebuild():
        attempts.append("build")
        if attempts.count("build") == 1:
            raise ConnectionError("store not reachable yet")
        return Works()

    class CrashOnce:
        def run(self, stop_event):
            attempts.append("crash")
            raise ConnectionError("broker restarted")

    run_with_restarts("x", CrashOnce(), rebuild, stop, RestartPolicy(max_restarts=3, backoff_s=0.01))
    assert attempts == ["crash", "build", "build", "ran"]


class RecordsStop:
    def __init__(self, name: str, stopped: list, linger_s: float = 0.0):
        self.name, self.stopped, self.linger_s = name, stopped, linger_s

    def run(self, stop: threading.Event) -> None:
        stop.wait()
        threading.Event().wait(self.linger_s)  # e.g. a retrain finishing within its grace period
        self.stopped.append(self.name)


def test_the_logger_stops_after_the_services_whose_output_it_records():
    stopped: list[str] = []
    group = group_of(logger=RecordsStop("logger", stopped), trainer=RecordsStop("trainer", stopped, 0.3),
                     scorer=RecordsStop("scorer", stopped)).start()
    group.shutdown(timeout_s=5)
    assert stopped[-1] == "logger" and set(stopped) == {"logger", "trainer", "scorer"}
