"""The Prometheus endpoint of a streamscore process (settings.metrics_port, on settings.metrics_host:
127.0.0.1 unless configured, so a laptop does not serve it to its network).

Each service keeps its metrics in its own CollectorRegistry (ServiceStats), so
several services can share a process. One process serves ONE endpoint:
`CombinedCollector` exposes every service's registry together, merging
families of the same name (all services count `streamscore_events_in`, with a
`service` label), because the exposition format allows each name only once.

Consumer lag is not something a consumer loop sees cheaply, so a background
thread refreshes the `streamscore_consumer_lag` gauges from the Kafka admin API
(committed offset vs end offset, see streamscore.kafka.lag) every
settings.metrics_lag_interval_s.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

from streamscore.kafka.lag import consumer_groups_status
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import Settings

log = logging.getLogger("streamscore.metrics")


class CombinedCollector:
    """A collector yielding the metrics of several registries, same-named families merged."""

    def __init__(self, registries: Iterable[CollectorRegistry]):
        self.registries = list(registries)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for registry in self.registries:
            for family in registry.collect():
                if family.name not in merged:
                    merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name].samples.extend(family.samples)
        return list(merged.values())


class MetricsServer:
    """HTTP /metrics for the given services' stats, plus the consumer lag refresher."""

    def __init__(self, settings: Settings, stats: Mapping[str, ServiceStats], port: int | None = None,
                 addr: str | None = None, lag_interval_s: float | None = None):
        self.settings = settings
        self.stats = dict(stats)
        self.port = settings.metrics_port if port is None else port
        self.addr = settings.metrics_host if addr is None else addr  # 127.0.0.1 unless configured
        self.lag_interval_s = lag_interval_s or settings.metrics_lag_interval_s
        self.collector = CombinedCollector(s.registry for s in self.stats.values())
        self._stop = threading.Event()
        self._server = None
        self._lag_thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        """Serve; port 0 picks a free port (read it back from .port)."""
        self._server, _ = start_http_server(self.port, addr=self.addr, registry=self.collector)
        self.port = self._server.server_address[1]
        self._lag_thread = threading.Thread(target=self._refresh_lag_forever, name="metrics-lag", daemon=True)
        self._lag_thread.start()
        log.info("metrics on http://%s:%d/metrics", self.addr, self.port,
                 extra={"port": self.port, "services": ",".join(self.stats)})
        return self

    def refresh_lag(self) -> None:
        for group in consumer_groups_status(self.settings, self.stats):
            gauge = self.stats[group.service].m_lag
            for p in group.partitions:
                gauge.labels(service=group.service, topic=p.topic, partition=str(p.partition)).set(p.lag)

    def _refresh_lag_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_lag()
            except Exception as exc:  # Kafka briefly unreachable: keep the last values, try again later
                log.warning("consumer lag refresh failed: %s", exc)
            self._stop.wait(self.lag_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._lag_thread is not None:
            self._lag_thread.join(5)

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
