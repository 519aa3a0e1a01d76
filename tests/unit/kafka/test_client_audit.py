"""Audit of every Kafka client in the code: each gets the shared configuration (so security settings reach
it), and offsets are committed only through the shared retrying path (streamscore.kafka.io)."""
from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
SOURCES = sorted(p for root in ("shared/streamscore", "services") for p in (REPO_ROOT / root).rglob("*.py")
                 if "legacy" not in p.parts)
# The local broker's own readiness probe and SCRAM setup talk to its PLAINTEXT listener on purpose.
RAW_CONFIG_ALLOWED = {"shared/streamscore/dev/kafka_broker.py"}
COMMIT_PATH = "shared/streamscore/kafka/io.py"


def relative(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def test_no_kafka_client_is_built_from_a_hand_written_config():
    raw = re.compile(r"\b(Consumer|Producer|AdminClient)\(\s*\{")
    offenders = [f"{relative(p)}:{n}" for p in SOURCES if relative(p) not in RAW_CONFIG_ALLOWED
                 for n, line in enumerate(p.read_text().splitlines(), 1) if raw.search(line)]
    assert not offenders, ("Kafka clients built without streamscore.kafka.config (they would miss the security "
                           f"settings): {offenders}")
    assert not [relative(p) for p in SOURCES if relative(p) not in RAW_CONFIG_ALLOWED
                and '"bootstrap.servers"' in p.read_text() and relative(p) != "shared/streamscore/kafka/config.py"
                and relative(p) != "shared/streamscore/settings.py"]


def test_offsets_are_committed_only_through_the_shared_retrying_path():
    direct = re.compile(r"\.commit\(\s*(offsets=|message=|asynchronous=|\))")
    offenders = [f"{relative(p)}:{n}" for p in SOURCES if relative(p) != COMMIT_PATH
                 for n, line in enumerate(p.read_text().splitlines(), 1) if direct.search(line)]
    assert not offenders, f"direct consumer.commit calls (use streamscore.kafka.io.commit/commit_offsets): {offenders}"


def test_every_registry_client_gets_the_registry_auth_and_tls():
    offenders = [relative(p) for p in SOURCES if p.read_text().count("registry_url=settings.schema_registry_url")
                 != p.read_text().count("registry_config=schema_registry_config(settings)")]
    assert not offenders, f"AvroCodec built without registry_config=schema_registry_config(settings): {offenders}"


def test_the_audit_sees_the_services():
    names = {relative(p) for p in SOURCES}
    assert {"services/drift/service.py", "services/scorer/service.py", "services/logger/service.py",
            "services/trainer/service.py"} <= names
