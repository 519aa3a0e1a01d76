"""What a running service counts about itself: plain numbers for the demo and
tests, mirrored into Prometheus metrics in a registry owned by the service
(not the process-global one, so several services can share a process)."""
from __future__ import annotations

import threading
from collections import Counter as TallyCounter

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServiceStats:
    def __init__(self, service: str, keep_latencies: int = 200_000):
        self.service = service
        self.events_in = 0
        self.events_out = 0
        self.batches = 0
        self.errors = 0
        self.model_version = 0
        self.model_swaps = 0
        self.generic_decodes = 0  # messages the compiled readers left to the generic Avro decoder
        self.running = False
        self.partitions_owned = 0  # input partitions assigned and ready (their state restored, for the scorer)
        self.restarts = 0  # times the runner restarted this service after a crash
        self.rejections: TallyCounter[str] = TallyCounter()
        # The newest `keep_latencies` event latencies in a preallocated ring (1.6 MB), not a deque of Python
        # floats: that one grew by ~32 bytes an event up to 2M events (~64 MiB a service), a soak's memory
        # growth that looked like a leak for its first 13 minutes at 2,500 events/s.
        self._latencies_ms = np.empty(keep_latencies, dtype=np.float64)
        self._latency_next = 0  # where the next latency goes
        self._latency_count = 0  # how many of the ring hold one
        self._lock = threading.Lock()

        self.registry = CollectorRegistry()
        labels = {"service": service}
        self._m_in = Counter("streamscore_events_in", "Messages consumed", labelnames=["service"],
                             registry=self.registry).labels(**labels)
        self._m_out = Counter("streamscore_events_out", "Messages produced or rows written", labelnames=["service"],
                              registry=self.registry).labels(**labels)
        self._m_dead = Counter("streamscore_dead_letters", "Messages sent to the dead-letter topic",
                               labelnames=["service", "reason"], registry=self.registry)
        self._m_batch = Histogram("streamscore_batch_seconds", "Time to process one batch", labelnames=["service"],
                                  registry=self.registry,
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)).labels(**labels)
        self._m_latency = Histogram("streamscore_event_latency_ms", "Event produced -> output acknowledged (ms)",
                                    labelnames=["service"], registry=self.registry,
                                    buckets=LATENCY_BUCKETS_MS).labels(**labels)
        self._m_version = Gauge("streamscore_model_version", "Model version currently served or monitored",
                                labelnames=["service"], registry=self.registry).labels(**labels)
        self.m_lag = Gauge("streamscore_consumer_lag", "Messages behind the end of each partition",
                           labelnames=["service", "topic", "partition"], registry=self.registry)
        self._m_generic = Counter("streamscore_generic_decodes",
                                  "Messages the compiled readers left to the generic Avro decoder (another writer "
                                  "schema, registry framing, unusual encodings, bad bytes)",
                                  labelnames=["service"], registry=self.registry).labels(**labels)
        self._m_drift_statistic = Gauge("streamscore_drift_statistic",
                                        "Latest windowed drift statistic (PSI, mean shift, ...) vs the training baseline",
                                        labelnames=["service", "feature", "statistic"], registry=self.registry)
        self._m_drift_detections = Counter("streamscore_drift_detections", "Drift detections",
                                           labelnames=["service", "detector", "feature"], registry=self.registry)

        self._m_restarts = Counter("streamscore_service_restarts", "Restarts of a crashed service (with backoff)",
                                   labelnames=["service"], registry=self.registry).labels(**labels)

    def count_restart(self) -> None:
        with self._lock:
            self.restarts += 1
        self._m_restarts.inc()

    def record_batch(self, n_in: int, n_out: int, seconds: float, latencies_ms: list[float] = ()) -> None:
        with self._lock:
            self.events_in += n_in
            self.events_out += n_out
            self.batches += 1
            self._keep_latencies(latencies_ms)
        self._m_in.inc(n_in)
        self._m_out.inc(n_out)
        self._m_batch.observe(seconds)
        for value in latencies_ms:
            self._m_latency.observe(value)
        self._m_version.set(self.model_version)

    def _keep_latencies(self, latencies_ms) -> None:
        ring = self._latencies_ms
        size = len(ring)
        values = np.asarray(latencies_ms, dtype=np.float64)[-size:]
        n = len(values)
        if not n:
            return
        at = self._latency_next
        first = min(n, size - at)
        ring[at:at + first] = values[:first]
        ring[:n - first] = values[first:]
        self._latency_next = (at + n) % size
        self._latency_count = min(self._latency_count + n, size)

    def count_generic_decodes(self, n: int) -> None:
        if n:
            with self._lock:
                self.generic_decodes += n
            self._m_generic.inc(n)

    def count_rejection(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1
        self._m_dead.labels(service=self.service, reason=reason).inc()

    def record_drift_statistic(self, feature: str, statistic: str, value: float) -> None:
        self._m_drift_statistic.labels(service=self.service, feature=feature, statistic=statistic).set(value)

    def count_drift(self, detector: str, feature: str) -> None:
        self._m_drift_detections.labels(service=self.service, detector=detector, feature=feature).inc()

    def latency_percentiles(self, qs=(50, 99, 99.9)) -> dict[float, float]:
        with self._lock:
            values = self._latencies_ms[:self._latency_count].copy()
        if values.size == 0:
            return {q: float("nan") for q in qs}
        return {q: float(np.percentile(values, q)) for q in qs}

    def reset_latencies(self) -> None:
        with self._lock:
            self._latency_next = self._latency_count = 0
