"""ONE configuration for every Kafka client streamscore makes: producers, consumers, admin clients, readers.

`client_config(settings, ...)` layers, later wins:
  1. the caller's tuning defaults (linger.ms, fetch.wait.max.ms, ...);
  2. the properties file (STREAMSCORE_KAFKA_CLIENT_PROPERTIES, the `client.properties` convention);
  3. bootstrap.servers and the STREAMSCORE_KAFKA_* security settings;
  4. what the caller requires (group.id, enable.auto.commit=false, acks=all, ...). The file may repeat
     such a key with the same value (Confluent's files say acks=all) but not change it: delivery
     guarantees rest on them.

`check_connection` makes a failed login or an untrusted certificate a clear error within seconds
(librdkafka itself only logs them and retries forever) naming the setting to fix; secrets never
appear in those messages or in any log line (see properties.redacted).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from streamscore.kafka.properties import ClientPropertiesError
from streamscore.settings import Settings

CLIENT_LOG = logging.getLogger("streamscore.kafka")

# Keys a caller requires whose value the properties file must not change.
MANAGED_KEYS = frozenset({"group.id", "enable.auto.commit", "enable.idempotence", "acks", "isolation.level",
                          "enable.partition.eof"})


class KafkaConnectionError(RuntimeError):
    """Kafka refused this client (credentials, TLS) or did not answer; the message names the setting to check."""


def security_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka keys of the STREAMSCORE_KAFKA_* security settings that are set."""
    config: dict[str, Any] = {}
    if settings.kafka_security_protocol:
        config["security.protocol"] = settings.kafka_security_protocol
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanisms"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username is not None:
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_ca_location:
        config["ssl.ca.location"] = str(settings.kafka_ssl_ca_location)
    if settings.kafka_ssl_certificate_location:
        config["ssl.certificate.location"] = str(settings.kafka_ssl_certificate_location)
        config["ssl.key.location"] = str(settings.kafka_ssl_key_location)
    if settings.kafka_ssl_key_password is not None:
        config["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    return config


def client_config(settings: Settings, defaults: Mapping[str, Any] | None = None, **required: Any) -> dict[str, Any]:
    """The config of any Kafka client; `required` keys with dots go in as **{"group.id": ...}."""
    config: dict[str, Any] = {"logger": CLIENT_LOG}
    config.update(defaults or {})
    from_file = settings.client_properties
    config.update(from_file)
    config["bootstrap.servers"] = settings.bootstrap_servers
    config.update(security_config(settings))
    for key, value in required.items():
        if key in MANAGED_KEYS and key in from_file and _same(from_file[key], value) is False:
            raise ClientPropertiesError(
                f"{settings.kafka_client_properties} sets {key}={from_file[key]}, but streamscore needs "
                f"{key}={_text(value)} for its delivery guarantees: remove that line")
    config.update(required)
    return config


def admin_config(settings: Settings, **required: Any) -> dict[str, Any]:
    return client_config(settings, **required)


def reader_config(settings: Settings, **required: Any) -> dict[str, Any]:
    """A consumer that only reads assigned partitions (never joins or commits a group)."""
    values = {"group.id": "streamscore-reader", "enable.auto.commit": False}
    values.update(required)
    return client_config(settings, **values)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _same(file_value: str, value: Any) -> bool:
    return file_value.strip().lower() == _text(value).lower()


def schema_registry_config(settings: Settings) -> dict[str, str]:
    """SchemaRegistryClient options beyond the url: basic auth and TLS (empty when none is set)."""
    config: dict[str, str] = {}
    if settings.schema_registry_username is not None:
        config["basic.auth.user.info"] = (f"{settings.schema_registry_username}:"
                                          f"{settings.schema_registry_password.get_secret_value()}")
    if settings.schema_registry_ca_location:
        config["ssl.ca.location"] = str(settings.schema_registry_ca_location)
    if settings.schema_registry_certificate_location:
        config["ssl.certificate.location"] = str(settings.schema_registry_certificate_location)
        config["ssl.key.location"] = str(settings.schema_registry_key_location)
    return config


# --- a clear error instead of librdkafka's endless retries -----------------------------------
def _setting(settings: Settings, field: str, key: str) -> str:
    """How the user set librdkafka key `key`: the env var of `field`, or the properties file's line."""
    if getattr(settings, field) is not None:
        return f"STREAMSCORE_{field.upper()}"
    if key in settings.client_properties:
        return f"{key} in {settings.kafka_client_properties}"
    return f"STREAMSCORE_{field.upper()}"


def explain_client_error(settings: Settings, error: KafkaError | str) -> str | None:
    """A message naming the setting to fix for an authentication or TLS failure; None for other errors."""
    text = error.str() if isinstance(error, KafkaError) else str(error)
    code = error.code() if isinstance(error, KafkaError) else None
    lowered = text.lower()
    where = f"Kafka at {settings.bootstrap_servers}"
    if "sasl authentication" in lowered or "invalid credentials" in lowered or "authentication failed" in lowered:
        props = settings.client_properties
        mechanism = (settings.kafka_sasl_mechanism or props.get("sasl.mechanisms") or props.get("sasl.mechanism")
                     or "GSSAPI (librdkafka's default)")
        return (f"{where} rejected the SASL login: check {_setting(settings, 'kafka_sasl_username', 'sasl.username')}"
                f" and {_setting(settings, 'kafka_sasl_password', 'sasl.password')} (mechanism {mechanism}). "
                f"Broker said: {text}")
    if "certificate verify failed" in lowered or "unable to get local issuer" in lowered or "self-signed" in lowered \
            or "self signed" in lowered:
        ca = _setting(settings, "kafka_ssl_ca_location", "ssl.ca.location")
        value = settings.kafka_ssl_ca_location or settings.client_properties.get("ssl.ca.location")
        ca += f" (now {value})" if value else " (unset: the system trust store)"
        return (f"{where}: the broker's TLS certificate is not trusted: {ca} must name the PEM file of the CA that "
                f"signed it. librdkafka said: {text}")
    if "ssl handshake failed" in lowered or "wrong version number" in lowered or code == KafkaError._SSL:
        return (f"{where}: TLS handshake failed: check {_setting(settings, 'kafka_security_protocol', 'security.protocol')}"
                f" (SSL / SASL_SSL need a TLS listener at that address) and the ssl.* settings. librdkafka said: {text}")
    if code == KafkaError._AUTHENTICATION:
        return (f"{where} refused authentication: check {_setting(settings, 'kafka_security_protocol', 'security.protocol')}"
                f" and the STREAMSCORE_KAFKA_SASL_* / STREAMSCORE_KAFKA_SSL_* settings. librdkafka said: {text}")
    return None


def check_connection(settings: Settings, timeout_s: float = 10.0, wait_for_broker: bool = False):
    """Cluster metadata from `settings`' Kafka, or KafkaConnectionError.

    A refused login or an untrusted certificate raises at once, naming the setting. An unreachable
    cluster raises after `timeout_s` unless `wait_for_broker` (services: a broker that is restarting
    is not an error; they wait for it), in which case None is returned."""
    from confluent_kafka.admin import AdminClient

    seen: list[KafkaError] = []
    admin = AdminClient(admin_config(settings, error_cb=seen.append, log_level=0))
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    while True:
        try:
            return admin.list_topics(timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
        except KafkaException as exc:
            last = exc.args[0] if exc.args else exc
        admin.poll(0)  # serves error_cb
        for error in [last, *seen]:
            message = explain_client_error(settings, error)
            if message is not None:
                raise KafkaConnectionError(message)
        if time.monotonic() > deadline:
            if wait_for_broker:
                CLIENT_LOG.warning("Kafka at %s did not answer within %.0f s (%s); the services wait for it",
                                   settings.bootstrap_servers, timeout_s, last)
                return None
            raise KafkaConnectionError(
                f"Kafka at {settings.bootstrap_servers} did not answer within {timeout_s:.0f} s: {last}. Check "
                f"KAFKA_BOOTSTRAP_SERVERS, and {_setting(settings, 'kafka_security_protocol', 'security.protocol')} "
                f"(now {settings.kafka_security_protocol or settings.client_properties.get('security.protocol') or 'PLAINTEXT'}): "
                "a TLS listener does not answer a PLAINTEXT client")
