"""Restart a crashed service with bounded backoff instead of stopping the process.

A service loop that raises (a Kafka error nobody retried, ClickHouse away longer than the logger's
retries, a bug hit by one message) is rebuilt from scratch and run again after a delay that doubles
per crash in a row (1, 2, 4 ... 60 s by default). A fresh instance, not the same object: the crashed
one's in-memory state (entity features, monitor windows, buffered rows) may cover messages whose
offsets were never committed, and those come again from Kafka. Only a service that crashes
`max_restarts` times in a row (none of them after running `healthy_s`) ends the process, with
the last error. Each restart is logged and counted (`streamscore_service_restarts`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from streamscore.settings import Settings

log = logging.getLogger("streamscore.runner")


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    healthy_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "RestartPolicy":
        return cls(max_restarts=settings.service_max_restarts, backoff_s=settings.service_restart_backoff_s,
                   healthy_s=settings.service_healthy_s)

    def delay_s(self, crashes_in_a_row: int) -> float:
        return min(self.backoff_s * 2 ** max(crashes_in_a_row - 1, 0), self.max_backoff_s)


class ServiceKeepsFailing(RuntimeError):
    """A service crashed more often in a row than its restart policy allows."""


def run_with_restarts(name: str, service, rebuild: Callable[[], object], stop: threading.Event,
                      policy: RestartPolicy, on_restart: Callable[[int, BaseException], None] | None = None) -> None:
    """`service.run(stop)` until it returns; after a crash, wait, `rebuild()` and run the new one.

    Raises ServiceKeepsFailing (from the last error) after `policy.max_restarts` restarts in a row;
    a crash once `stop` is set is raised as it is (nothing to restart for)."""
    in_a_row = 0
    while True:
        started = time.monotonic()
        try:
            if service is None:  # after a crash; building it can fail too (store or broker away), same policy
                service = rebuild()
                log.info("service %s restarted", name, extra={"service": name})
            service.run(stop)
            return
        except Exception as exc:
            service = None
            if stop.is_set():
                raise
            if time.monotonic() - started >= policy.healthy_s:
                in_a_row = 0
            in_a_row += 1
            if in_a_row > policy.max_restarts:
                raise ServiceKeepsFailing(f"{name} crashed {in_a_row} times in a row, last: "
                                          f"{type(exc).__name__}: {exc}") from exc
            delay = policy.delay_s(in_a_row)
            log.error("service %s crashed (%s: %s); restart %d of at most %d in a row in %.1f s", name,
                      type(exc).__name__, exc, in_a_row, policy.max_restarts, delay, exc_info=exc,
                      extra={"service": name, "restart": in_a_row, "delay_s": delay})
            if on_restart is not None:
                on_restart(in_a_row, exc)
        if stop.wait(delay):
            return
