"""One Kafka client configuration: properties file, security settings, what streamscore requires; secrets
never printed; the registry and ClickHouse get their auth and TLS options."""
from __future__ import annotations

import logging
import socket
import time

import pytest
from pydantic import ValidationError

from streamscore.kafka.config import (KafkaConnectionError, check_connection, client_config,
                                      explain_client_error, schema_registry_config)
from streamscore.kafka.io import consumer_config, producer_config
from streamscore.kafka.properties import ClientPropertiesError, parse_properties, redacted
from streamscore.settings import Settings

CONFLUENT_CLOUD_JAVA = """\
# Required connection configs for Kafka producer, consumer, and admin
bootstrap.servers=pkc-abc12.eu-west-1.aws.confluent.cloud:9092
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username='KEY123' password='s3cr=t;x';
# Best practice for higher availability in Apache Kafka clients prior to 3.0
session.timeout.ms=45000
acks=all
"""


def test_properties_parse_java_syntax_and_read_credentials_out_of_jaas():
    props = parse_properties(CONFLUENT_CLOUD_JAVA)
    assert props["bootstrap.servers"] == "pkc-abc12.eu-west-1.aws.confluent.cloud:9092"
    assert props["sasl.username"] == "KEY123" and props["sasl.password"] == "s3cr=t;x"
    assert "sasl.jaas.config" not in props  # librdkafka has no such key
    assert props["session.timeout.ms"] == "45000"
    assert parse_properties("a: 1\nb 2\n! comment\nc=x\\\n  y\n") == {"a": "1", "b": "2", "c": "xy"}


def test_a_line_that_is_not_a_property_names_file_and_line():
    with pytest.raises(ClientPropertiesError, match=r"client.properties:2: expected key=value"):
        parse_properties("a=1\n=oops\n")


def write(tmp_path, text: str, name: str = "client.properties"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_client_gets_file_then_security_settings_then_what_streamscore_requires(tmp_path):
    path = write(tmp_path, CONFLUENT_CLOUD_JAVA + "linger.ms=50\n")
    settings = Settings(kafka_bootstrap_servers=None, kafka_client_properties=path)
    assert settings.bootstrap_servers.startswith("pkc-abc12") and not settings.uses_local_broker
    producer = producer_config(settings)
    assert producer["sasl.username"] == "KEY123" and producer["security.protocol"] == "SASL_SSL"
    assert producer["linger.ms"] == "50", "the file wins over streamscore's tuning defaults"
    assert producer["acks"] == "all" and producer["enable.idempotence"] is True
    consumer = consumer_config(settings, "g")
    assert consumer["group.id"] == "g" and consumer["enable.auto.commit"] is False
    assert consumer["session.timeout.ms"] == "45000"
    # The STREAMSCORE_KAFKA_* settings win over the file; KAFKA_BOOTSTRAP_SERVERS over its bootstrap.servers.
    override = Settings(kafka_bootstrap_servers="other:9093", kafka_client_properties=path,
                        kafka_sasl_username="u2", kafka_sasl_password="p2")
    config = client_config(override)
    assert config["bootstrap.servers"] == "other:9093"
    assert (config["sasl.username"], config["sasl.password"]) == ("u2", "p2")


def test_the_file_cannot_weaken_delivery_guarantees(tmp_path):
    settings = Settings(kafka_client_properties=write(tmp_path, "acks=1\nenable.auto.commit=true\n"))
    with pytest.raises(ClientPropertiesError, match="sets acks=1, but streamscore needs acks=all"):
        producer_config(settings)
    with pytest.raises(ClientPropertiesError, match="enable.auto.commit=true, but streamscore needs enable.auto.commit=false"):
        consumer_config(settings, "g")


def test_security_settings_map_to_librdkafka_keys(tmp_path):
    ca, cert, key = (write(tmp_path, "x", name) for name in ("ca.pem", "client.pem", "client.key"))
    settings = Settings(kafka_bootstrap_servers="k:9093", kafka_security_protocol="SASL_SSL",
                        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc", kafka_sasl_password="pw",
                        kafka_ssl_ca_location=ca, kafka_ssl_certificate_location=cert, kafka_ssl_key_location=key,
                        kafka_ssl_key_password="kpw")
    config = client_config(settings)
    assert config["security.protocol"] == "SASL_SSL" and config["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert config["ssl.ca.location"] == str(ca) and config["ssl.certificate.location"] == str(cert)
    assert config["ssl.key.location"] == str(key) and config["ssl.key.password"] == "kpw"
    plain = client_config(Settings(kafka_bootstrap_servers="k:9092"))
    assert not {"security.protocol", "sasl.username", "ssl.ca.location"} & set(plain)


@pytest.mark.parametrize("values, message", [
    ({"kafka_security_protocol": "SASL_SSL"}, "needs STREAMSCORE_KAFKA_SASL_MECHANISM"),
    ({"kafka_sasl_username": "u"}, "STREAMSCORE_KAFKA_SASL_USERNAME and STREAMSCORE_KAFKA_SASL_PASSWORD"),
    ({"kafka_ssl_ca_location": "/nonexistent/ca.pem"}, "STREAMSCORE_KAFKA_SSL_CA_LOCATION=/nonexistent/ca.pem: no such file"),
    ({"kafka_client_properties": "/nonexistent/client.properties"}, "STREAMSCORE_KAFKA_CLIENT_PROPERTIES"),
    ({"kafka_security_protocol": "SASL_TLS"}, "kafka_security_protocol"),
    ({"schema_registry_username": "u"}, "STREAMSCORE_SCHEMA_REGISTRY_PASSWORD"),
])
def test_inconsistent_security_settings_are_refused_naming_the_setting(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_secrets_never_appear_in_settings_output_or_redacted_configs(tmp_path):
    settings = Settings(kafka_bootstrap_servers="k:9093", kafka_security_protocol="SASL_SSL",
                        kafka_sasl_mechanism="PLAIN", kafka_sasl_username="svc", kafka_sasl_password="hunter2",
                        schema_registry_username="sr", schema_registry_password="srpass",
                        clickhouse_url="https://default:chpass@ch.example:8443")
    for text in (repr(settings), str(settings), settings.model_dump_json(), str(redacted(client_config(settings))),
                 settings.clickhouse_location):
        assert "hunter2" not in text and "srpass" not in text, text
    assert "chpass" not in settings.clickhouse_location
    assert settings.clickhouse_location == "https://default:***@ch.example:8443"
    assert redacted({"sasl.password": "x", "ssl.key.password": "y", "a": 1, "logger": logging}) == {
        "sasl.password": "***", "ssl.key.password": "***", "a": 1}


def test_schema_registry_gets_basic_auth_and_tls(tmp_path):
    from streamscore.dev.kafka_broker import make_certificate_authority

    ca = make_certificate_authority(tmp_path)  # a real PEM: the client loads it
    cert, key = ca, tmp_path / "ca.key"
    settings = Settings(schema_registry_url="https://sr:8081", schema_registry_username="key",
                        schema_registry_password="secret", schema_registry_ca_location=ca,
                        schema_registry_certificate_location=cert, schema_registry_key_location=key)
    assert schema_registry_config(settings) == {"basic.auth.user.info": "key:secret", "ssl.ca.location": str(ca),
                                                "ssl.certificate.location": str(cert), "ssl.key.location": str(key)}
    assert schema_registry_config(Settings()) == {}
    from confluent_kafka.schema_registry import SchemaRegistryClient

    SchemaRegistryClient({"url": "https://sr:8081", **schema_registry_config(settings)})  # accepted as is


def test_clickhouse_server_gets_ca_and_verify_options(tmp_path):
    from streamscore.clickhouse.store import tls_options

    ca = write(tmp_path, "x", "ca.pem")
    assert tls_options(Settings(clickhouse_url="https://u:p@ch:8443", clickhouse_ca_cert=ca)) == {"ca_cert": str(ca)}
    assert tls_options(Settings(clickhouse_url="https://u:p@ch:8443", clickhouse_verify=False)) == {"verify": False}
    assert tls_options(Settings(clickhouse_url=None, clickhouse_ca_cert=ca)) == {}  # embedded: no TLS


def test_clickhouse_connection_errors_hide_the_password(tmp_path):
    from streamscore.clickhouse.store import StoreError, open_store

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(clickhouse_url=f"http://default:topsecret@127.0.0.1:{port}", data_dir=tmp_path)
    with pytest.raises(StoreError) as error:
        open_store(settings)
    assert "topsecret" not in str(error.value) and "default:***@127.0.0.1" in str(error.value)


@pytest.mark.parametrize("text, names", [
    ("sasl_ssl://h:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to "
     "invalid credentials with SASL mechanism SCRAM-SHA-512", ["STREAMSCORE_KAFKA_SASL_PASSWORD"]),
    ("ssl://h:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
     ["STREAMSCORE_KAFKA_SSL_CA_LOCATION"]),
])
def test_auth_and_tls_failures_name_the_setting(text, names):
    message = explain_client_error(Settings(kafka_bootstrap_servers="h:9093"), text)
    assert message and all(name in message for name in names), message
    assert explain_client_error(Settings(), "Local: Broker transport failure") is None


def test_the_file_line_is_named_when_the_value_came_from_the_file(tmp_path):
    path = write(tmp_path, "security.protocol=SASL_SSL\nsasl.mechanisms=PLAIN\nsasl.username=u\nsasl.password=p\n")
    message = explain_client_error(Settings(kafka_client_properties=path),
                                   "SASL authentication error: Authentication failed")
    assert f"sasl.password in {path}" in message and "=p" not in message


def test_an_unreachable_cluster_is_an_error_within_the_timeout_naming_what_to_check():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(KafkaConnectionError, match="did not answer within 2 s.*KAFKA_BOOTSTRAP_SERVERS"):
        check_connection(Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}"), timeout_s=2)
    assert time.monotonic() - started < 6
    assert check_connection(Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}"), timeout_s=1,
                            wait_for_broker=True) is None
