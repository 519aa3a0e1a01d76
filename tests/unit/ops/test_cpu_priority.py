"""Per-thread nice values: raised for the threads named, never lowered, inherited by the threads they start."""
from __future__ import annotations

import threading

from streamscore.ops.cpu_priority import MAX_NICE, nice_at_least, niceness, thread_ids


class Parked(threading.Thread):
    """A thread that reports its native id, then (when told) starts a child thread and reports its nice value."""

    def __init__(self):
        super().__init__(daemon=True)
        self.ready, self.go, self.done = threading.Event(), threading.Event(), threading.Event()
        self.native_id_seen: int | None = None
        self.child_nice: int | None = None

    def run(self):
        self.native_id_seen = threading.get_native_id()
        self.ready.set()
        self.go.wait(10)
        child = threading.Thread(target=lambda: setattr(self, "child_nice", niceness(threading.get_native_id())))
        child.start()
        child.join()
        self.done.set()


def test_raising_a_threads_niceness_reaches_the_threads_it_starts_and_leaves_the_others():
    me = threading.get_native_id()
    mine = niceness(me)
    parked = Parked()
    parked.start()
    assert parked.ready.wait(10)
    tid = parked.native_id_seen
    assert tid in thread_ids() and me in thread_ids()
    before = niceness(tid)
    assert nice_at_least([tid], before + 3) == 1
    raised = niceness(tid)
    assert raised == min(MAX_NICE, before + 3)
    assert nice_at_least([tid], before + 3) == 0  # idempotent: already there
    assert niceness(me) == mine  # the caller's own thread is not touched
    parked.go.set()
    assert parked.done.wait(10)
    assert parked.child_nice == raised


def test_a_nice_value_is_never_lowered_and_an_ended_thread_is_skipped():
    me = threading.get_native_id()
    assert nice_at_least([me], niceness(me)) == 0 and nice_at_least([me], niceness(me) - 1) == 0
    assert nice_at_least([2**22 + 12345], 1) == 0  # no such thread (above the default pid_max)
