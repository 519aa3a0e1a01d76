"""Training a candidate in a process of its own, so a retrain never takes the scorer's core or GIL.

`streamscore run all` runs every service as a thread of one process; a retrain there (the training-set query,
its replay through the feature engine, LightGBM) held the GIL for tens of seconds and stalled scoring (p99
4.8 s in a soak). `TrainingProcess` runs `retraining.train_candidate` in a spawned interpreter with its own
store access (the embedded store through the socket of the process holding it, shared_store; a ClickHouse
server directly), at the lowest CPU priority (nice 19), and hands back a `Candidate` (plain data, the model as text). Registering and promoting stay
with the caller, so a training abandoned at shutdown (`abandon`) leaves nothing in the registry.

Spawned, not forked: the parent runs librdkafka threads and chDB, which a fork would copy mid-flight.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time

from streamscore.learning.retraining import Candidate
from streamscore.settings import Settings

log = logging.getLogger("streamscore.training_process")
TRAINING_NICE = 19


class TrainingFailed(RuntimeError):
    """The training process failed (its error, as text) or died."""


def _train(settings: Settings, since_ms: int | None, read_from_ms: int | None, connection) -> None:
    """The training process: resolve the spec, open the store, train, send back ("ok", Candidate) or
    ("error", text)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, TRAINING_NICE)  # the parent set it at the start (TrainingProcess)
        from streamscore.ops.process_names import TRAINING, name_this_process

        name_this_process(TRAINING)
        from streamscore.clickhouse.shared_store import connect_store
        from streamscore.learning.registry import ModelRegistry
        from streamscore.learning.retraining import train_candidate
        from streamscore.spec import resolve

        settings, spec = resolve(settings)
        store = connect_store(settings)
        try:
            candidate = train_candidate(store, ModelRegistry(settings.registry_dir), settings, spec,
                                        since_ms=since_ms, read_from_ms=read_from_ms)
        finally:
            store.close()
        connection.send(("ok", candidate))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        connection.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        connection.close()


class TrainingProcess:
    """One candidate's training in a spawned process; `result` waits for it a while, `abandon` stops it."""

    def __init__(self, settings: Settings, since_ms: int | None, read_from_ms: int | None = None):
        context = multiprocessing.get_context("spawn")
        self._receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_train, args=(settings, since_ms, read_from_ms, send),
                                       name="streamscore-training", daemon=True)
        self.started = time.monotonic()
        self.process.start()
        # Lowest CPU priority: the GIL is no longer shared, but the cores are (2 here, with the broker): the
        # scorer must win them whenever it has events; training takes what is left. Set from here at once,
        # not first in `_train`: the spawned interpreter's imports before it (lightgbm, numpy, pydantic)
        # took 0.2-0.3 of a core for ~10 s at the trainer's own priority in the soak.
        try:
            os.setpriority(os.PRIO_PROCESS, self.process.pid, TRAINING_NICE)
        except OSError:  # already gone: `result` reports it
            pass
        send.close()  # the child's end: EOF here once it exits

    def result(self, timeout_s: float) -> Candidate | None:
        """The candidate once trained (None while still training after `timeout_s`); raises TrainingFailed."""
        if not self._receive.poll(timeout_s):
            if self.process.is_alive():
                return None
            raise TrainingFailed(f"the training process died (exit code {self.process.exitcode})")
        try:
            kind, value = self._receive.recv()
        except EOFError as error:
            self.process.join(5)
            raise TrainingFailed(f"the training process died (exit code {self.process.exitcode})") from error
        self.process.join(10)
        if kind != "ok":
            raise TrainingFailed(value)
        return value

    def abandon(self) -> None:
        """Stop the training: nothing was registered (the parent registers), so nothing is left behind."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._receive.close()
