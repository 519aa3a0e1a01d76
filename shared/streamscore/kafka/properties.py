"""The `client.properties` file: Kafka client settings as `key=value` lines.

This is the file managed Kafka services hand out (Confluent Cloud, Aiven, MSK,
Redpanda Cloud): bootstrap.servers, security.protocol, sasl.* and ssl.* lines.
It is read with Java properties rules (`=`, `:` or whitespace between key and
value, `#` / `!` comments, a trailing backslash continues a line). Java clients
put the SASL credentials in `sasl.jaas.config`; librdkafka has no such key, so
its username and password are read out of it into sasl.username / sasl.password.
"""
from __future__ import annotations

import re
from pathlib import Path

# Keys whose values are secrets: never printed (see redacted()).
SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password", "ssl.keystore.password", "ssl.key.pem",
                         "sasl.oauthbearer.client.secret", "sasl.jaas.config", "basic.auth.user.info"})
_JAAS_OPTION = re.compile(r"""(\w+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s;]+))""")


class ClientPropertiesError(ValueError):
    """The properties file cannot be read or has a line that is not a property."""


def parse_properties(text: str, source: str = "client.properties") -> dict[str, str]:
    """`key=value` lines -> dict (Java properties syntax, the subset config files use)."""
    result: dict[str, str] = {}
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        start = number
        line = lines[number].strip()
        number += 1
        while line.endswith("\\") and number < len(lines):  # continuation
            line = line[:-1] + lines[number].strip()
            number += 1
        if not line or line[0] in "#!":
            continue
        match = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)$", line)
        if match is None:
            raise ClientPropertiesError(f"{source}:{start + 1}: expected key=value, got {line[:40]!r}")
        result[match.group(1)] = match.group(2).strip()
    jaas = result.pop("sasl.jaas.config", None)
    if jaas is not None:
        options = {m.group(1): next(g for g in m.groups()[1:] if g is not None) for m in _JAAS_OPTION.finditer(jaas)}
        for java, librdkafka in (("username", "sasl.username"), ("password", "sasl.password")):
            if java in options:
                result.setdefault(librdkafka, options[java])
    return result


def read_client_properties(path: Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ClientPropertiesError(f"STREAMSCORE_KAFKA_CLIENT_PROPERTIES={path}: {error.strerror}") from error
    return parse_properties(text, source=str(path))


def redacted(config: dict) -> dict:
    """A copy of a client config fit for a log line: secrets as ***, callbacks and loggers left out."""
    return {key: ("***" if key in SECRET_KEYS or "password" in key or "secret" in key else value)
            for key, value in config.items() if isinstance(value, (str, int, float, bool))}
