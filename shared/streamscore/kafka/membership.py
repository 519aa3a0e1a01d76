"""Static group membership: a `group.instance.id` that survives a restart of the same service.

A consumer killed without leaving its group stays a member until its session times out (10 s): a dynamic
member that restarts meanwhile joins as a new member, and the rebalance waits for the dead one to expire.
With KIP-345 static membership the restarted consumer presents the dead one's instance id, takes its place
at once and gets its partitions back without a rebalance.

The id must be unique among the group's live consumers and the same after a restart. `InstanceSlot` takes
the first free slot of <data_dir>/members/<group>.<n>.lock under an exclusive flock: a live process holds
its slot, the kernel frees a dead one's, so its restart (same host, same data dir) takes the same slot and
id, and a second scorer on the host takes the next.

The id also carries a digest of the data dir and of the subscribed topics: a consumer of another data dir on
the same host (a demo beside `run all`, two test sessions), or one restarted with another spec's topics, must
not present the same id. Kafka would fence the other live member, or hand the rejoining one the assignment it
cached for the old subscription without a rebalance: a scorer whose spec changed would then consume nothing
(seen: the rides demo after the payments demo scored 0 of 3,000 events in 120 s). The cost: a static member that stops for good hands its
partitions over only after its session timeout (it does not leave the group), not at once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import socket

from streamscore.settings import Settings

MAX_SLOTS = 256


class InstanceSlot:
    """A slot held (flock) while the consumer lives; `instance_id` names it: <group>-<host>-<digest>-<slot>."""

    def __init__(self, settings: Settings, group: str, topics: list[str]):
        self.directory = settings.data_dir / "members"
        self.group = group
        where = f"{self.directory.resolve()}|{','.join(sorted(topics))}"
        self.digest = hashlib.sha256(where.encode()).hexdigest()[:10]
        self.slot: int | None = None
        self._fd: int | None = None

    def acquire(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.group)
        for slot in range(MAX_SLOTS):
            fd = os.open(self.directory / f"{safe}.{slot}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.slot, self._fd = slot, fd
            return self.instance_id
        raise RuntimeError(f"{MAX_SLOTS} consumers of group {self.group} already run with data dir "
                           f"{self.directory.parent}; give each its own data dir")

    @property
    def instance_id(self) -> str:
        return f"{self.group}-{socket.gethostname()}-{self.digest}-{self.slot}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops its flock
            self._fd = None
