"""ServiceGroup shutdown semantics: a stuck or crashed service never looks like a clean stop."""
from __future__ import annotations

import threading

import pytest

from streamscore.services.runner import ServiceGroup
from streamscore.settings import Settings


class StopsWhenAsked:
    def run(self, stop: threading.Event) -> None:
        stop.wait()


class IgnoresStop:
    def __init__(self):
        self.release = threading.Event()

    def run(self, stop: threading.Event) -> None:
        self.release.wait(10)


class Crashes:
    def run(self, stop: threading.Event) -> None:
        raise ValueError("boom")


def group_of(**services) -> ServiceGroup:
    group = ServiceGroup(Settings(kafka_bootstrap_servers="unused:9092"), [])
    group.services = services
    return group


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


def test_a_crash_stops_the_others_and_is_raised():
    group = group_of(ok=StopsWhenAsked(), bad=Crashes()).start()
    assert group.stop.wait(5), "a crash must stop the other services"
    with pytest.raises(RuntimeError, match="service bad failed: boom"):
        group.join(5)


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
