"""How far behind each service's consumer group is, from the Kafka admin API only.

Lag of a partition = end offset (high watermark) - the group's committed offset.
A partition the group is assigned but has never committed counts from the
beginning (consumers use auto.offset.reset=earliest). Used by `streamscore
status` and by the consumer lag gauges of the metrics endpoint; it needs no
consumer of its own, so it never joins (or rebalances) a group.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from streamscore.kafka.config import admin_config
from streamscore.kafka.io import admin_result
from streamscore.settings import Settings


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed this partition
    end: int
    lag: int


@dataclass
class GroupStatus:
    service: str
    group: str
    state: str  # Kafka's group state: STABLE, EMPTY, DEAD (never existed / expired), PREPARING_REBALANCE...
    members: list[str] = field(default_factory=list)  # "client_id@host" of each active member
    partitions: list[PartitionLag] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return bool(self.members)

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def _offsets(admin: AdminClient, partitions: list[TopicPartition], spec: OffsetSpec, timeout_s: float) -> dict:
    if not partitions:
        return {}
    futures = admin.list_offsets({TopicPartition(tp.topic, tp.partition): spec for tp in partitions},
                                 request_timeout=timeout_s)
    return {(tp.topic, tp.partition): admin_result(future).offset for tp, future in futures.items()}


def consumer_groups_status(settings: Settings, services: Iterable[str], timeout_s: float = 10.0,
                           admin: AdminClient | None = None) -> list[GroupStatus]:
    """State, active members and per-partition lag of the group `settings.group(service)` of each service."""
    admin = admin or AdminClient(admin_config(settings))
    services = list(services)
    groups = {service: settings.group(service) for service in services}
    descriptions = {group: admin_result(future) for group, future in
                    admin.describe_consumer_groups(list(groups.values()), request_timeout=timeout_s).items()}
    statuses = []
    for service, group in groups.items():
        description = descriptions[group]
        members = [f"{m.client_id}@{m.host}" for m in description.members]
        assigned = {(tp.topic, tp.partition) for m in description.members for tp in m.assignment.topic_partitions}
        request = [ConsumerGroupTopicPartitions(group)]
        committed_tps = admin_result(admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[group])
        committed = {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                     for tp in committed_tps.topic_partitions}
        keys = sorted(set(committed) | assigned)
        tps = [TopicPartition(topic, partition) for topic, partition in keys]
        ends = _offsets(admin, tps, OffsetSpec.latest(), timeout_s)
        starts = _offsets(admin, tps, OffsetSpec.earliest(), timeout_s)
        partitions = []
        for key in keys:
            position = committed.get(key)
            start = starts[key] if position is None else position
            partitions.append(PartitionLag(topic=key[0], partition=key[1], committed=position, end=ends[key],
                                           lag=max(ends[key] - start, 0)))
        state = getattr(description.state, "name", str(description.state))
        statuses.append(GroupStatus(service=service, group=group, state=state, members=members,
                                    partitions=partitions))
    return statuses
