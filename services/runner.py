"""Run one or more services in this process until stopped.

With the embedded ClickHouse engine only one process may open the data dir,
so `streamscore run all` (and the demo) run the services that need the store
as threads of one process sharing one Store; the scorer, which needs none, runs
in a child process of its own (settings.scorer_own_process,
services/service_process.py), so they never hold its GIL. With CLICKHOUSE_URL
each service can run in its own process or container (`streamscore run scorer`,
...), as docker-compose does.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from streamscore.clickhouse.shared_store import RemoteStore, StoreServer, socket_path
from streamscore.clickhouse.store import Store, open_store
from streamscore.clickhouse.tables import ensure_spec_tables
from streamscore.kafka.config import check_connection
from streamscore.ops.cpu_priority import nice_at_least, thread_ids
from streamscore.services.restarts import RestartPolicy, run_with_restarts
from streamscore.settings import Settings
from streamscore.spec import FeatureSpec, resolve

log = logging.getLogger("streamscore.runner")

SERVICE_NAMES = ("scorer", "logger", "drift", "trainer")
NEEDS_STORE = {"logger", "drift", "trainer"}
STOPS_LAST = {"logger"}  # it records what the others produce (model updates of a retrain finishing at a stop)


OWN_PROCESS_CAPABLE = {"scorer"}  # needs no store: it can run where the embedded one is not


def own_processes(settings: Settings, names) -> set[str]:
    """The services of `names` a production group (`run all`, the demo) runs in a child process of its own."""
    return OWN_PROCESS_CAPABLE & set(names) if settings.scorer_own_process and len(names) > 1 else set()


def build_service(name: str, settings: Settings, store: Store | None, spec: FeatureSpec, stats=None,
                  own_process: bool = False):
    """A new instance of service `name`; `stats`: keep counting in these (a restarted service's);
    `own_process`: the service runs in a child process, this is its handle (services/service_process.py)."""
    if own_process:
        from streamscore.services.service_process import ServiceProcess
        return ServiceProcess(name, settings, spec, stats=stats)
    # Imported here so `streamscore run scorer` does not load what it does not run.
    if name == "scorer":
        from streamscore.services.scorer.service import ScorerService
        return ScorerService(settings, spec=spec, stats=stats)
    if name == "logger":
        from streamscore.services.logger.service import LoggerService
        return LoggerService(settings, store=store, spec=spec, stats=stats)
    if name == "drift":
        from streamscore.services.drift.service import DriftService
        return DriftService(settings, store=store, spec=spec, stats=stats)
    if name == "trainer":
        from streamscore.services.trainer.service import TrainerService
        return TrainerService(settings, store=store, spec=spec, stats=stats)
    raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICE_NAMES)} or 'all'")


class ServiceGroup:
    """Services running as threads; a crashed one is restarted with backoff (services/restarts.py), and
    only one that keeps crashing stops the others."""

    def __init__(self, settings: Settings, names: list[str], store: Store | None = None,
                 spec: FeatureSpec | None = None, restart_policy: RestartPolicy | None = None,
                 processes: set[str] | frozenset[str] = frozenset()):
        unknown = [n for n in names if n not in SERVICE_NAMES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; choose from {', '.join(SERVICE_NAMES)} or 'all'")
        if set(processes) - OWN_PROCESS_CAPABLE:
            raise ValueError(f"only {', '.join(sorted(OWN_PROCESS_CAPABLE))} can run in a process of its own")
        if spec is None:
            settings, spec = resolve(settings)
        if names:  # refused credentials or an untrusted certificate: a clear error now, not a silent hang
            check_connection(settings, timeout_s=10, wait_for_broker=True)
        if store is None and NEEDS_STORE & set(names):
            store = open_store(settings)
            store.migrate()
        if store is not None:
            ensure_spec_tables(store, spec)  # idempotent: the spec's predictions table, evolved if it changed
        self.store = store
        self.spec = spec
        self.settings = settings
        self.stop = threading.Event()
        self._late_stop = threading.Event()  # the services of STOPS_LAST: set once the others stopped
        self.processes = set(processes) & set(names)  # run in child processes; the others as threads
        self.services = {name: build_service(name, settings, store, spec, own_process=name in self.processes)
                         for name in names}
        self.failures: dict[str, BaseException] = {}
        self._threads: list[threading.Thread] = []
        self.restart_policy = restart_policy or RestartPolicy.from_settings(settings)
        self.build = lambda name, stats: build_service(name, settings, store, spec, stats=stats,
                                                       own_process=name in self.processes)
        # chDB has one process per data dir: this one serves it to `streamscore query`, `status`, the trainer's
        # training process... on a local socket while it runs (clickhouse/shared_store.py)
        self.store_server: StoreServer | None = None
        if store is not None and store.is_embedded and not isinstance(store, RemoteStore):
            self.store_server = StoreServer(store, socket_path(settings), services=self.running_services)

    def _rebuild(self, name: str):
        stats = getattr(self.services[name], "stats", None)
        self.services[name] = self.build(name, stats)
        return self.services[name]

    def _count_restart(self, name: str) -> None:
        stats = getattr(self.services[name], "stats", None)
        if stats is not None and hasattr(stats, "count_restart"):
            stats.count_restart()

    def running_services(self) -> dict[str, bool]:
        """name -> running, of the services of this group (what `streamscore status` shows)."""
        return {name: bool(getattr(getattr(service, "stats", None), "running", False))
                for name, service in self.services.items()}

    def _stop_event(self, name: str) -> threading.Event:
        return self._late_stop if name in STOPS_LAST else self.stop

    def _stop_in_order(self) -> None:
        """Once `stop` is set: the services that produce what the logger records stop first (a retrain in
        flight may still finish and publish its model updates: trainer_shutdown_grace_s), then the logger,
        which records everything they flushed before it stops."""
        self.stop.wait()
        deadline = time.monotonic() + self.settings.trainer_shutdown_grace_s + 5
        for name, thread in zip(self.services, self._threads):
            if name not in STOPS_LAST:
                thread.join(max(deadline - time.monotonic(), 0))
        self._late_stop.set()

    def _run_one(self, name: str, service) -> None:
        try:
            run_with_restarts(name, service, lambda: self._rebuild(name), self._stop_event(name),
                              self.restart_policy, on_restart=lambda *_: self._count_restart(name))
        except BaseException as exc:  # noqa: BLE001 - reported and re-raised by join()
            log.exception("service %s crashed", name)
            self.failures[name] = exc
            self.stop.set()

    def start(self) -> "ServiceGroup":
        if self.store_server is not None:
            self.store_server.start()
        for name, service in self.services.items():
            thread = threading.Thread(target=self._run_one, args=(name, service), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.processes:
            self._yield_to_child_processes()
        threading.Thread(target=self._stop_in_order, name="stop-in-order", daemon=True).start()
        return self

    def _yield_to_child_processes(self) -> None:
        """Every thread of this process but the ones supervising child processes (whose restarts inherit
        their nice value) takes settings.bulk_work_nice: the logger, drift, trainer and the embedded store
        yield the cores to the scorer (ops/cpu_priority.py). Twice: a thread started during the first pass."""
        supervisors = {thread.native_id for name, thread in zip(self.services, self._threads)
                       if name in self.processes}
        for _ in range(2):
            nice_at_least([t for t in thread_ids() if t not in supervisors], self.settings.bulk_work_nice)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for every service thread (all within `timeout_s` together); raise if one
        crashed or is still running then, so a stuck shutdown never looks like a clean one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if self.store_server is not None:
            self.store_server.stop()
        if self.failures:
            name, exc = next(iter(self.failures.items()))
            raise RuntimeError(f"service {name} failed: {exc}") from exc
        stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            raise RuntimeError(f"service(s) {', '.join(stuck)} did not stop within {timeout_s:.0f} s; what they "
                               "did not commit is consumed again at the next start")

    def shutdown(self, timeout_s: float = 30.0) -> None:
        self.stop.set()
        self.join(timeout_s)

    def __enter__(self) -> "ServiceGroup":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def run_until_signalled(group: ServiceGroup, on_tick: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM/SIGINT (graceful: flush, commit, exit) or a service crash."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: group.stop.set())
    group.start()
    while not group.stop.wait(1.0):
        if on_tick:
            on_tick()
    group.join(60)
