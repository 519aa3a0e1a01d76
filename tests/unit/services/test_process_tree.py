"""The soak bench's memory figure covers the whole process tree: children started by any thread (the runner
starts the scorer's process from its scorer thread, the trainer its training process), grandchildren too."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from streamscore.ops.process_names import SCORER_PROCESS, TRAINING
from streamscore.services.tools.soak import named_memory, process_memory, process_tree

SLEEP_WITH_CHILD = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"


def test_children_of_other_threads_and_grandchildren_are_counted():
    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(subprocess.Popen([sys.executable, "-c", SLEEP_WITH_CHILD])))
    thread.start()
    thread.join()
    child = started[0]
    try:
        # the grandchild needs its interpreter started; the test process may have other children (a suite's
        # earlier tests), so look for this child's own subtree within the whole tree
        tree, subtree = [], []
        for _ in range(100):
            tree, subtree = process_tree(os.getpid()), process_tree(child.pid)
            if child.pid in tree and len(subtree) == 2:
                break
            threading.Event().wait(0.05)
        assert child.pid in tree and len(subtree) == 2 and set(subtree) <= set(tree)
        rss_mib, threads = process_memory(os.getpid())
        own_rss_mib, _ = process_memory(child.pid)
        assert rss_mib > own_rss_mib > 0 and threads >= 3
    finally:
        for pid in process_tree(child.pid)[1:]:
            os.kill(pid, 9)
        child.kill()
        child.wait(10)


def test_training_processes_are_left_out_of_the_memory_trend():
    named = ("from streamscore.ops.process_names import TRAINING, name_this_process; name_this_process(TRAINING); "
             "big = bytearray(200 * 2**20); import time; time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", named])
    try:
        for _ in range(200):  # until it named itself and holds its 200 MiB
            if Path(f"/proc/{child.pid}/comm").read_text().strip() == TRAINING and process_memory(child.pid, ())[0] > 200:
                break
            threading.Event().wait(0.05)
        counted, _ = process_memory(os.getpid(), leave_out=())
        trend, _ = process_memory(os.getpid())
        assert counted - trend > 190
    finally:
        child.kill()
        child.wait(10)


def test_the_scorer_process_memory_is_reported_on_its_own():
    named = ("from streamscore.ops.process_names import SCORER_PROCESS, name_this_process; "
             "name_this_process(SCORER_PROCESS); big = bytearray(150 * 2**20); import time; time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", named])
    try:
        scorer = 0.0
        for _ in range(200):  # until it named itself and holds its 150 MiB
            if (scorer := named_memory(os.getpid(), SCORER_PROCESS)) > 150:
                break
            threading.Event().wait(0.05)
        total, _ = process_memory(os.getpid())
        assert scorer > 150 and total > scorer  # the whole tree: this process and its child
        assert named_memory(os.getpid(), TRAINING) == 0
    finally:
        child.kill()
        child.wait(10)
