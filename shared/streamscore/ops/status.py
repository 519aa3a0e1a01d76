"""What `streamscore status` reports, gathered from each source independently.

Kafka (consumer groups, lag), the model registry and ClickHouse (recent drift
events and registry actions) are read separately: when one is unavailable —
typically the embedded ClickHouse data dir held by a running `streamscore run`
process — the others are still reported and the gap is explained.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient

from streamscore.kafka.config import KafkaConnectionError, admin_config, check_connection
from streamscore.kafka.lag import GroupStatus, consumer_groups_status
from streamscore.learning.registry import ModelRegistry
from streamscore.settings import Settings
from streamscore.clickhouse.shared_store import RemoteStore, connect_store
from streamscore.clickhouse.store import QueryResult, Store, StoreError

RECENT_DRIFT_SQL = """SELECT formatDateTime(detected_at, '%F %T') AS detected_at, model_version, detector, feature, statistic, round(value, 4) AS value,
       round(threshold, 4) AS threshold, retrain_requested
FROM drift_events WHERE kind = 'drift' ORDER BY detected_at DESC LIMIT {limit:UInt32}"""

RECENT_MODEL_EVENTS_SQL = """SELECT formatDateTime(recorded_at, '%F %T') AS recorded_at, version, action,
       train_rows, round(metrics['auc'], 4) AS auc, reason
FROM model_versions ORDER BY recorded_at DESC LIMIT {limit:UInt32}"""


# Services that assign their partitions themselves (no consumer group membership to see them by).
SELF_ASSIGNING = frozenset({"drift"})


@dataclass
class RegistryStatus:
    model_name: str
    production: int | None
    candidate: int | None
    versions: int
    production_auc: float | None = None
    canary: int | None = None
    canary_share: float = 0.0
    shadows: tuple[int, ...] = ()


@dataclass
class OpsStatus:
    groups: list[GroupStatus] = field(default_factory=list)
    kafka_error: str | None = None
    registry: RegistryStatus | None = None
    registry_error: str | None = None
    drift_events: QueryResult | None = None
    model_events: QueryResult | None = None
    store_error: str | None = None
    # name -> running, from the process serving the embedded store (None: not known, e.g. a server store)
    process_services: dict[str, bool] | None = None

    def service_running(self, group: GroupStatus) -> bool | None:
        """Whether the service of `group` runs: a member of its consumer group, or running in the process that
        serves the store; None when neither can tell (a service that assigns its partitions itself, like
        drift, has no group members)."""
        if group.alive:
            return True
        if self.process_services is not None and group.service in self.process_services:
            return self.process_services[group.service]
        return None if group.service in SELF_ASSIGNING else False


def registry_status(settings: Settings) -> RegistryStatus:
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    stages = registry.stages(name)
    production = registry.production(name)
    rollout = registry.rollout(name)
    return RegistryStatus(model_name=name, production=stages.get("production"), candidate=stages.get("candidate"),
                          versions=len(registry.list(name)),
                          production_auc=production.metrics.get("auc") if production else None,
                          canary=rollout.canary, canary_share=rollout.canary_share, shadows=rollout.shadows)


def collect_status(settings: Settings, services: Iterable[str], store: Store | None = None,
                   recent: int = 5) -> OpsStatus:
    """Everything `streamscore status` shows; errors of one source are recorded, not raised."""
    status = OpsStatus()
    # A quick probe first, so a stopped broker costs seconds (not one timeout per request) and refused
    # credentials or an untrusted certificate say which setting to fix; then a quiet client.
    try:
        check_connection(settings, timeout_s=5)
        admin = AdminClient(admin_config(settings, log_level=0))
        status.groups = consumer_groups_status(settings, services, admin=admin)
    except KafkaConnectionError as exc:
        status.kafka_error = str(exc)
    except Exception as exc:  # broker went away meanwhile
        status.kafka_error = f"Kafka at {settings.bootstrap_servers} did not answer: {exc}"
    try:
        status.registry = registry_status(settings)
    except Exception as exc:
        status.registry_error = f"model registry {settings.registry_dir}: {exc}"
    own_store = store is None
    try:
        if own_store:
            store = connect_store(settings)
        try:
            if isinstance(store, RemoteStore):  # the process holding the store says what it runs
                status.process_services = store.services()
            status.drift_events = store.query(RECENT_DRIFT_SQL, {"limit": recent})
            status.model_events = store.query(RECENT_MODEL_EVENTS_SQL, {"limit": recent})
        finally:
            if own_store:
                store.close()
    except StoreError as exc:
        status.store_error = str(exc)
    except Exception as exc:  # tables missing (not migrated) or a server error
        status.store_error = f"ClickHouse {settings.clickhouse_database}: {str(exc).strip().splitlines()[0]}"
    return status
