"""A service in a child process of its own, run by a ServiceGroup like its threads.

`streamscore run all` and the demo run the scorer this way (settings.scorer_own_process). As a thread
beside the logger, drift service, trainer and the demo's producer it shared their GIL: its loop stalled
whenever one of them held it (the logger decoding a 5,000-message batch, a garbage collection triggered by
another thread's allocations), and the demo's event -> prediction p99 at 2,000 events/s was 436-549 ms while
the scorer's own work was 1-2 ms per batch. In its own interpreter it needs no store, only Kafka and the
registry's files, so nothing is shared but the cores.

`ServiceProcess.run(stop)` spawns the child and blocks like a service loop: it returns once `stop` is set and
the child stopped gracefully (flush, commit), and raises when the child dies on its own, so the group's
restart policy (services/restarts.py) restarts it like a crashed thread. `ProcessStats` is the parent's view
of the child's ServiceStats (running, counters, model version, latencies, Prometheus metrics), answered by the
child over a pipe. The child stops when the pipe breaks: a parent killed with -9 leaves no scorer behind.

Spawned, not forked: the parent runs librdkafka threads and chDB, which a fork would copy mid-flight.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from streamscore.settings import Settings
from streamscore.spec import FeatureSpec

log = logging.getLogger("streamscore.runner")

# Families the parent keeps itself: restarts are counted across children, lag is refreshed by the parent's
# metrics server (streamscore.ops.metrics); the child's would be duplicates of the same series.
PARENT_FAMILIES = {"streamscore_service_restarts", "streamscore_consumer_lag"}
SNAPSHOT_FIELDS = ("events_in", "events_out", "batches", "errors", "model_version", "model_swaps",
                   "generic_decodes", "running", "partitions_owned", "rejections")
STOP_GRACE_S = 30.0  # the child's graceful stop (checkpoint: flush, commit) before it is terminated


def _serve_requests(connection, stats, stop: threading.Event) -> None:
    """The child's answering thread: one request, one reply; the pipe closing (the parent stopped or died)
    stops the service."""
    while True:
        try:
            number, request, argument = connection.recv()
        except (EOFError, OSError):
            stop.set()
            return
        if request == "stop":  # told, not asked: no reply (the parent may not wait for one)
            stop.set()
            continue
        if request == "snapshot":
            reply = {name: getattr(stats, name) for name in SNAPSHOT_FIELDS}
        elif request == "latency_percentiles":
            reply = stats.latency_percentiles(argument)
        elif request == "reset_latencies":
            reply = stats.reset_latencies()
        elif request == "metrics":
            reply = [family for family in stats.registry.collect() if family.name not in PARENT_FAMILIES]
        else:
            reply = ValueError(f"unknown request {request!r}")
        try:
            connection.send((number, reply))
        except (BrokenPipeError, OSError):
            stop.set()
            return


def _child_main(name: str, settings: Settings, spec_path: Path, connection, configure_logs: bool) -> None:
    """The child process: the service `name` of the spec at `spec_path`, until told to stop."""
    from streamscore.ops.logs import configure_logging
    from streamscore.ops.native_heap import bound_native_heap, describe_heap_limits
    from streamscore.ops.process_names import name_this_process
    from streamscore.services.runner import build_service
    from streamscore.spec import load_spec

    name_this_process(f"ss-{name}")
    heap = bound_native_heap()

    # Ctrl-C reaches the whole foreground process group: the parent decides when its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # terminated directly: stop gracefully too
    if configure_logs:
        configure_logging(settings)
    log.info("native heap: %s", describe_heap_limits(heap))
    service = build_service(name, settings, None, load_spec(spec_path))
    threading.Thread(target=_serve_requests, args=(connection, service.stats, stop), name=f"{name}-control",
                     daemon=True).start()
    service.run(stop)


class _ChildMetrics:
    """A collector (what MetricsServer combines) yielding the child's metric families and the parent's own."""

    def __init__(self, stats: "ProcessStats"):
        self.stats = stats

    def collect(self):
        families = list(self.stats.local_registry.collect())
        try:
            families += self.stats.ask("metrics") or []
        except ChildUnavailable:
            pass  # between two children: the parent's families only
        return families


class ChildUnavailable(RuntimeError):
    """The child process is not running (starting, restarting, stopped)."""


class ProcessStats:
    """The parent's view of a service's ServiceStats in its child process (the same reads)."""

    def __init__(self, service: str):
        self.service = service
        self.restarts = 0
        self._connection = None
        self._asked = 0  # numbers the requests: a late reply is never taken for the next one's
        self._lock = threading.Lock()
        self.local_registry = CollectorRegistry()
        labels = {"service": service}
        self.m_lag = Gauge("streamscore_consumer_lag", "Messages behind the end of each partition",
                           labelnames=["service", "topic", "partition"], registry=self.local_registry)
        self._m_restarts = Counter("streamscore_service_restarts", "Restarts of a crashed service (with backoff)",
                                   labelnames=["service"], registry=self.local_registry).labels(**labels)
        self.registry = _ChildMetrics(self)

    def attach(self, connection) -> None:
        with self._lock:
            self._connection = connection

    def detach(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
            self._connection = None

    def ask(self, request: str, argument=None, timeout_s: float = 10.0):
        """The child's reply to `request`; ChildUnavailable when no child is there to answer."""
        with self._lock:
            connection = self._connection
            if connection is None:
                raise ChildUnavailable(f"{self.service} has no running process")
            self._asked += 1
            deadline = time.monotonic() + timeout_s
            try:
                connection.send((self._asked, request, argument))
                while True:  # a reply to an earlier request that timed out is skipped
                    if not connection.poll(max(deadline - time.monotonic(), 0)):
                        raise ChildUnavailable(f"{self.service} did not answer {request!r} within {timeout_s:.0f} s")
                    number, reply = connection.recv()
                    if number == self._asked:
                        break
            except (EOFError, OSError) as error:
                raise ChildUnavailable(f"{self.service}'s process is gone: {error}") from error
        if isinstance(reply, Exception):
            raise reply
        return reply

    def tell(self, request: str) -> None:
        """Send `request` without waiting for a reply (the child may still be starting: it reads it then)."""
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.send((0, request, None))
                except (BrokenPipeError, OSError):
                    pass

    def snapshot(self) -> dict:
        """The child's counters now ({} while no child runs: everything reads as 0 / not running)."""
        try:
            return self.ask("snapshot")
        except ChildUnavailable:
            return {}

    def __getattr__(self, name: str):
        if name in SNAPSHOT_FIELDS:
            return self.snapshot().get(name, False if name == "running" else {} if name == "rejections" else 0)
        raise AttributeError(name)

    def latency_percentiles(self, qs=(50, 99, 99.9)) -> dict[float, float]:
        return self.ask("latency_percentiles", tuple(qs))

    def reset_latencies(self) -> None:
        self.ask("reset_latencies")

    def count_restart(self) -> None:
        self.restarts += 1
        self._m_restarts.inc()


class ServiceProcess:
    """Service `name` run in a spawned child process; `run(stop)` behaves like the service's own loop."""

    def __init__(self, name: str, settings: Settings, spec: FeatureSpec, stats: ProcessStats | None = None,
                 configure_logs: bool | None = None):
        self.name = name
        self.settings = settings
        self.spec = spec
        self.stats = stats or ProcessStats(name)
        # the child logs like this process: configured the same way when this one was (a CLI `run`)
        self.configure_logs = bool(logging.getLogger().handlers) if configure_logs is None else configure_logs
        self.process = None

    def run(self, stop: threading.Event) -> None:
        context = multiprocessing.get_context("spawn")
        mine, childs = context.Pipe()
        process = self.process = context.Process(
            target=_child_main, args=(self.name, self.settings, self.spec.path, childs, self.configure_logs),
            name=f"streamscore-{self.name}", daemon=True)
        process.start()
        childs.close()
        self.stats.attach(mine)
        try:
            while not stop.is_set() and process.is_alive():
                multiprocessing.connection.wait([process.sentinel], timeout=0.2)
            if process.is_alive():
                self.stats.tell("stop")
                process.join(STOP_GRACE_S)
            if process.is_alive():
                log.error("%s did not stop within %.0f s; terminating it (what it did not commit is consumed "
                          "again at the next start)", self.name, STOP_GRACE_S)
                process.terminate()
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
        finally:
            self.stats.detach()
        if process.exitcode != 0:
            raise RuntimeError(f"the {self.name} process exited with code {process.exitcode}")
        if not stop.is_set():
            raise RuntimeError(f"the {self.name} process ended without being asked to stop")
