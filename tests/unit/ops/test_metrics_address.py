"""The metrics endpoint listens on 127.0.0.1 unless STREAMSCORE_METRICS_HOST says otherwise."""
from __future__ import annotations

import urllib.request

from streamscore.ops.metrics import MetricsServer
from streamscore.ops.service_stats import ServiceStats
from streamscore.settings import Settings


def serve(settings: Settings) -> MetricsServer:
    return MetricsServer(settings, {"scorer": ServiceStats("scorer")}, port=0, lag_interval_s=3600).start()


def test_metrics_bind_loopback_by_default():
    assert Settings().metrics_host == "127.0.0.1"
    server = serve(Settings(kafka_bootstrap_servers="127.0.0.1:1"))
    try:
        assert server._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read().decode()
        assert "streamscore_service_restarts_total" in body
    finally:
        server.stop()


def test_metrics_host_setting_is_the_listen_address(monkeypatch):
    monkeypatch.setenv("STREAMSCORE_METRICS_HOST", "0.0.0.0")
    server = serve(Settings(kafka_bootstrap_servers="127.0.0.1:1"))
    try:
        assert server._server.server_address[0] == "0.0.0.0"
    finally:
        server.stop()
