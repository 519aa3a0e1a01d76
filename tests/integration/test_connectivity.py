"""A secured Kafka for real: the local broker's SASL_SSL listener (SCRAM-SHA-512, TLS with its own CA), made by
`infra up --secure`. The pipeline runs through it with the client settings file it writes; a wrong password
and an untrusted certificate each end `streamscore run` within seconds with an error naming the setting."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import environment_without_settings
from conftest import CACHE_DIR, drop_database, free_port_pair, prepare
from streamscore.settings import Settings
from test_reliability import BackgroundProducer, drained, store_counts, wait_services_ready, wait_until

pytestmark = pytest.mark.integration

STREAMSCORE = str(Path(sys.executable).with_name("streamscore"))


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    from streamscore.dev.kafka_broker import LocalKafkaBroker

    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, kafka_port=free_port_pair(3),
                                       data_dir=tmp_path_factory.mktemp("secure-broker"), cache_dir=CACHE_DIR),
                              secure=True)
    broker.start(die_with_parent=True)
    try:
        yield broker
    finally:
        broker.stop()


def test_secure_setup_writes_what_a_client_needs_and_keeps_secrets_private(secure_broker):
    props = secure_broker.client_properties_file
    text = props.read_text()
    assert f"bootstrap.servers={secure_broker.secure_bootstrap}" in text and "security.protocol=SASL_SSL" in text
    assert "sasl.mechanisms=SCRAM-SHA-512" in text and f"ssl.ca.location={secure_broker.ca_file}" in text
    for private in (props, secure_broker.tls_dir / "ca.key", secure_broker.tls_dir / "broker.p12",
                    secure_broker.server_properties):
        assert private.stat().st_mode & 0o077 == 0, f"{private} is readable by others"
    # The plain listener is not the secure one: a plaintext client to the SASL_SSL port gets nowhere.
    settings = Settings(kafka_client_properties=props)
    assert settings.bootstrap_servers == secure_broker.secure_bootstrap and not settings.uses_local_broker


def test_pipeline_runs_through_sasl_ssl(make_settings, secure_broker):
    from streamscore.clickhouse.store import open_store
    from streamscore.services.runner import ServiceGroup

    settings = prepare(make_settings(kafka_bootstrap_servers=None,
                                     kafka_client_properties=secure_broker.client_properties_file))
    assert settings.bootstrap_servers == secure_broker.secure_bootstrap
    store = open_store(settings)
    try:
        group = ServiceGroup(settings, ["scorer", "logger"], store=store).start()
        try:
            wait_services_ready(settings)
            report = BackgroundProducer(settings, 3_000, rate=None, seed=21).result()
            wait_until(lambda: group.failures or drained(settings), 120, "scorer and logger to commit everything")
            assert not group.failures, group.failures
        finally:
            group.shutdown()
        counts = store_counts(store)
    finally:
        store.close()
        drop_database(settings)
    print(f"\nthrough SASL_SSL: produced {report.events}, rows {counts.rows}, duplicates {counts.duplicates}")
    assert counts.rows == counts.unique == report.events and counts.labels == report.labels


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 60) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run([STREAMSCORE, *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, " ".join((done.stdout + done.stderr).split()), time.monotonic() - started


def secure_env(broker, tmp_path, **extra: str) -> dict[str, str]:
    env = environment_without_settings()
    env.update(STREAMSCORE_KAFKA_CLIENT_PROPERTIES=str(broker.client_properties_file),
               STREAMSCORE_DATA_DIR=str(tmp_path / "data"), STREAMSCORE_CACHE_DIR=str(CACHE_DIR), **extra)
    return env


def test_wrong_password_is_a_clear_error_within_seconds(secure_broker, tmp_path):
    env = secure_env(secure_broker, tmp_path, STREAMSCORE_KAFKA_SASL_USERNAME="streamscore",
                     STREAMSCORE_KAFKA_SASL_PASSWORD="not-the-password")
    code, output, seconds = run_cli(env, "run", "scorer")
    print(f"\nwrong password: exit {code} after {seconds:.1f} s: {output}")
    assert code == 1, output
    assert "rejected the SASL login" in output and "STREAMSCORE_KAFKA_SASL_PASSWORD" in output
    assert "not-the-password" not in output
    assert seconds < 20
    code, output, _ = run_cli(env, "status")  # status says it too, without the secret
    assert "STREAMSCORE_KAFKA_SASL_PASSWORD" in output and "not-the-password" not in output


def test_untrusted_certificate_is_a_clear_error_within_seconds(secure_broker, tmp_path):
    from streamscore.dev.kafka_broker import make_certificate_authority

    other_ca = make_certificate_authority(tmp_path / "other-ca", name="some other CA")
    env = secure_env(secure_broker, tmp_path, STREAMSCORE_KAFKA_SSL_CA_LOCATION=str(other_ca))
    code, output, seconds = run_cli(env, "run", "scorer")
    print(f"\nuntrusted certificate: exit {code} after {seconds:.1f} s: {output}")
    assert code == 1, output
    assert "TLS certificate is not trusted" in output and "STREAMSCORE_KAFKA_SSL_CA_LOCATION" in output
    assert str(other_ca) in output
    assert seconds < 20
