"""Static membership ids: the same after a restart, different for another data dir, subscription or live peer."""
from __future__ import annotations

from streamscore.kafka.membership import InstanceSlot
from streamscore.settings import Settings

GROUP = "streamscore-scorer"


def test_an_instance_id_is_reused_only_by_a_restart_of_the_same_consumer(tmp_path):
    here, there = Settings(data_dir=tmp_path / "a"), Settings(data_dir=tmp_path / "b")
    first = InstanceSlot(here, GROUP, ["demo.events"])
    first_id = first.acquire()
    peer = InstanceSlot(here, GROUP, ["demo.events"])
    assert peer.acquire() != first_id  # a second live scorer of the data dir takes the next slot
    peer.release()
    first.release()
    restarted = InstanceSlot(here, GROUP, ["demo.events"])
    assert restarted.acquire() == first_id  # the dead one's slot, and its id
    restarted.release()
    # slot 0 each time, yet another id: another data dir on the host, or another spec's topic
    assert InstanceSlot(there, GROUP, ["demo.events"]).acquire() != first_id
    assert InstanceSlot(here, GROUP, ["demo.trip-requests"]).acquire() != first_id
