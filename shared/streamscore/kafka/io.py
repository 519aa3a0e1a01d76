"""Kafka client construction and the few Kafka idioms every service shares.

Delivery guarantees come from three choices made here once:
- producers are idempotent with acks=all and retry for minutes, so a broker
  restart delays messages instead of losing them;
- consumers never auto-commit: a service commits a batch's offsets only after
  its outputs were acknowledged (scorer) or written (logger) — at-least-once;
- dead letters keep the original bytes untouched and say why in headers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streamscore.kafka.config import CLIENT_LOG, client_config, reader_config
from streamscore.settings import TOPIC_DEAD_LETTER, Settings

# librdkafka's own log lines (e.g. transient "coordinator load in progress" while
# a fresh broker starts) go through Python logging (CLIENT_LOG) instead of raw stderr.
DEAD_LETTER_LOG = logging.getLogger("streamscore.dead_letter")


def producer_config(settings: Settings, **overrides) -> dict:
    defaults = {
        # librdkafka's default. Each produce request costs the broker CPU: at 5k msgs/s a local broker
        # used ~80% of a core with 1 ms, ~45% with 5 ms (bench/e2e shares 2 cores with it).
        "linger.ms": 5,
        "compression.type": "lz4",
        # Survive a broker restart: keep retrying for up to 5 minutes.
        "message.timeout.ms": 300_000,
        "queue.buffering.max.messages": 500_000,
    }
    return client_config(settings, defaults, **{"enable.idempotence": True, "acks": "all", **overrides})


# How long the broker may hold a consumer's fetch while less than fetch.min.bytes is ready. A fetch returns
# as soon as that much arrives, so the scorer's 1 byte / 5 ms adds no latency to an event; it only makes an
# idle consumer ask 200 times a second. The logger (which writes every second anyway), drift and trainer take
# BATCH_FETCH: up to 100 ms for 64 KiB. Measured on a fresh local broker, `run all`'s four services idle: the
# broker used 0.20-0.22 of a core with every consumer at 5 ms, 0.10-0.11 at 100 ms; taking 2,000 events/s
# (30 s, runs interleaved): broker 0.680 / 0.683 of a core before, 0.643 / 0.654 with BATCH_FETCH.
LOW_LATENCY_FETCH = {"fetch.wait.max.ms": 5}
BATCH_FETCH = {"fetch.wait.max.ms": 100, "fetch.min.bytes": 65_536}


def consumer_config(settings: Settings, group: str, fetch: dict = LOW_LATENCY_FETCH, **overrides) -> dict:
    defaults = {
        "auto.offset.reset": "earliest",
        # Fast failure detection for rebalances; the broker's minimum is 6 s.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "max.poll.interval.ms": 600_000,
        **fetch,
    }
    return client_config(settings, defaults, **{"group.id": group, "enable.auto.commit": False, **overrides})


def admin_result(future):
    """The result of an AdminClient request's future; its error raised as a fresh exception.

    `future.result()` raises the exception object the future keeps. On its way up, that exception's
    traceback collects the caller's frames, and they hold the future and the AdminClient: a reference
    cycle. Only the cyclic garbage collector frees it, destroying the client and its futures in no
    particular order at whatever moment a collection runs; librdkafka then aborts the process
    (rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0' failed) or hangs in C with
    the GIL held, which no test timeout interrupts. A copy of the exception is not kept by the
    future, so no cycle forms and the client is destroyed when its last reference goes.
    """
    error = future.exception()
    if error is not None:
        raise type(error)(*error.args) from None
    return future.result()


def make_producer(settings: Settings, **overrides) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_consumer(settings: Settings, group: str, fetch: dict = LOW_LATENCY_FETCH, **overrides) -> Consumer:
    return Consumer(consumer_config(settings, group, fetch, **overrides))


def make_reader(settings: Settings, **overrides) -> Consumer:
    """A consumer for reading assigned partitions (checkpoints, changelogs): never commits."""
    return Consumer(reader_config(settings, **overrides))


def make_admin(settings: Settings, **overrides):
    from confluent_kafka.admin import AdminClient

    return AdminClient(client_config(settings, **overrides))


@dataclass
class DeliveryTracker:
    """Counts acknowledgements so a service knows a batch is safely in Kafka."""

    errors: list[str] = field(default_factory=list)
    delivered: int = 0

    def __call__(self, err, msg) -> None:  # confluent-kafka on_delivery callback
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def reset(self) -> None:
        self.errors.clear()
        self.delivered = 0


class AckBatch:
    """Delivery callback for one group of produced messages, and the offsets they make committable.

    A service produces with `on_delivery=batch` and adds to `produced` what it produced; once
    `seal`ed with the source messages those outputs cover, the batch is `acknowledged` when every
    message produced with it was delivered. Delivery reports of different partitions arrive in any
    order, so a global "delivered >= produced" count could not tell which offsets are safe; one
    counter per batch can, without flushing the producer.
    """

    __slots__ = ("produced", "delivered", "errors", "covered", "sealed")

    def __init__(self) -> None:
        self.produced = 0
        self.delivered = 0
        self.errors: list[str] = []
        self.covered: list[Message] = []  # source messages whose offsets commit once acknowledged
        self.sealed = False

    def __call__(self, err, msg) -> None:  # confluent-kafka on_delivery callback
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def seal(self, covered: list[Message]) -> None:
        self.covered = covered
        self.sealed = True

    @property
    def acknowledged(self) -> bool:
        return self.sealed and self.delivered + len(self.errors) >= self.produced


class DeliveryFailed(RuntimeError):
    """Some outputs of a batch were not acknowledged; its offsets must not be committed."""


def flush_or_raise(producer: Producer, tracker: DeliveryTracker, timeout_s: float = 330.0) -> None:
    remaining = producer.flush(timeout_s)
    if remaining:
        raise DeliveryFailed(f"{remaining} messages still unacknowledged after {timeout_s:.0f} s")
    if tracker.errors:
        raise DeliveryFailed(f"{len(tracker.errors)} messages failed delivery, first: {tracker.errors[0]}")


def next_offsets(messages: list[Message]) -> list[TopicPartition]:
    """The offsets to commit after processing `messages`: last offset + 1 per partition."""
    last: dict[tuple[str, int], int] = {}
    for msg in messages:
        key = (msg.topic(), msg.partition())
        if msg.offset() >= last.get(key, -1):
            last[key] = msg.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


# Commit errors that mean this consumer no longer owns the partitions (a rebalance,
# or the group forgot it while the broker was away): the new owner replays from the
# last committed offset, which at-least-once allows, so these are not fatal.
MEMBERSHIP_LOST_ERRORS = frozenset({
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.FENCED_INSTANCE_ID, KafkaError._ASSIGNMENT_LOST, KafkaError._STATE,
})
# Commit errors while the coordinator is away (broker restart, coordinator moving): retried.
COORDINATOR_AWAY_ERRORS = frozenset({
    KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD, KafkaError._ALL_BROKERS_DOWN,
})


def commit(consumer: Consumer, messages: list[Message], attempts: int = 5, asynchronous: bool = False) -> bool:
    """Commit what `messages` covered, synchronously unless `asynchronous`; True when committed (or sent).

    Never fatal for a lost membership or an unreachable coordinator: those
    offsets are then simply consumed again (by us or the partition's new owner)
    and the duplicates they produce are collapsed downstream (at-least-once).
    The next successful commit of a partition covers this one's offsets too.

    `asynchronous=True` only sends the commit (True: sent, one attempt); its outcome
    goes to the consumer's `on_commit` callback (see `log_commit_errors`). A loop that
    commits often uses it so a slow coordinator does not stall it: on a loaded 2-core
    machine a synchronous commit took up to 194 ms.
    """
    return commit_offsets(consumer, next_offsets(messages), attempts=attempts, asynchronous=asynchronous)


class FatalConsumerError(RuntimeError):
    """librdkafka reported a fatal error: this consumer can no longer be used, a new one must replace it."""


def data_messages(batch: list[Message]) -> list[Message]:
    """The messages of `batch` that carry data. Errors are logged (librdkafka recovers from the others by
    itself); a fatal one raises FatalConsumerError, so the service restarts with a new consumer (its
    runner's restart policy) instead of polling a dead one forever. Seen in CI: a static member whose
    session timed out while the broker restarted was fenced by its own rejoin ("Static consumer fenced by
    other consumer with same group.instance.id", librdkafka issue #3437) and consumed nothing more."""
    messages = []
    for msg in batch:
        error = msg.error()
        if error is None:
            messages.append(msg)
        elif error.fatal() or error.code() == KafkaError._FATAL:  # (consume() reports it as _FATAL, not flagged)
            raise FatalConsumerError(f"fatal consumer error: {error.str()}")
        elif error.code() != KafkaError._PARTITION_EOF:
            CLIENT_LOG.warning("consumer error: %s", error)
    return messages


def is_retriable(error: KafkaError | None) -> bool:
    """An error that goes away by itself (coordinator loading or moving, broker restarting, timeouts)."""
    if not isinstance(error, KafkaError):
        return False
    return error.code() in COORDINATOR_AWAY_ERRORS or error.retriable()


def commit_offsets(consumer: Consumer, offsets: list[TopicPartition], attempts: int = 5,
                   asynchronous: bool = False, backoff_s: float = 0.2) -> bool:
    """THE commit path of every service (see `commit`): `offsets` are the next offsets to read.

    Retriable errors (coordinator load in progress / not available, not coordinator, request timed out,
    transport, all brokers down) are retried `attempts` times with backoff (0.2 s doubling to 2 s); still
    failing, or membership lost (rebalance in progress, unknown member), returns False: the offsets are
    consumed again later, which at-least-once delivery allows. Only other errors raise."""
    if not offsets:
        return True
    if asynchronous:
        attempts = 1
    for attempt in range(1, attempts + 1):
        try:
            consumer.commit(offsets=offsets, asynchronous=asynchronous)
            return True
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            if code in MEMBERSHIP_LOST_ERRORS:
                CLIENT_LOG.warning("commit skipped, partitions are being reassigned (%s); they will be re-consumed",
                                   error)
                return False
            if not is_retriable(error):
                raise
            if attempt == attempts:
                CLIENT_LOG.warning("commit failed %d times (%s); offsets stay uncommitted until the next commit",
                                   attempts, error)
                return False
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 2.0)
    return False


def produce(producer: Producer, topic: str, value: bytes | None, key: bytes | None = None, *,
            partition: int | None = None, headers=None, on_delivery=None, timeout_s: float = 300.0) -> None:
    """THE produce path of every service: `producer.produce`, waiting while the local queue is full
    (BufferError: the broker is away and librdkafka holds what was produced) and retrying retriable
    errors, for up to `timeout_s` (librdkafka's message.timeout.ms is 5 minutes too). Delivery
    itself is retried inside librdkafka (idempotent producer); its outcome reaches `on_delivery`."""
    deadline = time.monotonic() + timeout_s
    kwargs = {"key": key, "value": value}
    if partition is not None:
        kwargs["partition"] = partition
    if headers is not None:
        kwargs["headers"] = headers
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            if time.monotonic() > deadline:
                raise DeliveryFailed(f"producer queue for {topic} stayed full for {timeout_s:.0f} s "
                                     "(is the broker reachable?)") from None
            producer.poll(0.1)  # delivery reports free the queue
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not is_retriable(error) or time.monotonic() > deadline:
                raise
            CLIENT_LOG.warning("produce to %s failed (%s); retrying", topic, error)
            producer.poll(0.5)


def log_commit_errors(error, partitions) -> None:
    """A consumer's `on_commit` callback: says which asynchronous commits failed (their offsets are consumed
    again after a restart or rebalance, unless a later commit covers them; at-least-once either way)."""
    failed = [f"{tp.topic}[{tp.partition}]@{tp.offset}: {tp.error}" for tp in partitions or () if tp.error]
    if error is not None or failed:
        CLIENT_LOG.warning("offset commit failed (%s); a later commit covers these offsets: %s",
                           error, ", ".join(failed) or "all partitions")


@dataclass(frozen=True)
class Rejection:
    reason: str
    field: str | None
    detail: str


def dead_letter(producer: Producer, settings: Settings, msg: Message, rejection: Rejection,
                service: str, event_id: str | None = None, on_delivery=None) -> None:
    """Send the original bytes of `msg` to the dead-letter topic with the reason in headers."""
    headers = [
        ("error.reason", rejection.reason.encode()),
        ("error.field", (rejection.field or "").encode()),
        ("error.detail", rejection.detail.encode()),
        ("error.service", service.encode()),
        ("source.topic", msg.topic().encode()),
        ("source.partition", str(msg.partition()).encode()),
        ("source.offset", str(msg.offset()).encode()),
    ]
    if event_id:
        headers.append(("event.id", event_id.encode()))
    produce(producer, settings.topic(TOPIC_DEAD_LETTER), key=msg.key(), value=msg.value() or b"",
            headers=headers, on_delivery=on_delivery)
    DEAD_LETTER_LOG.info(
        "dead letter: %s", rejection.reason,
        extra={"service": service, "reason": rejection.reason, "field": rejection.field, "event_id": event_id,
               "source_topic": msg.topic(), "source_partition": msg.partition(), "source_offset": msg.offset(),
               "detail": rejection.detail})


def headers_dict(msg: Message) -> dict[str, str]:
    return {k: (v.decode(errors="replace") if v is not None else "") for k, v in (msg.headers() or [])}


def wait_for_assignment(consumer: Consumer, timeout_s: float = 30.0) -> None:
    """Poll until the group gave this consumer partitions (used by tests and the demo)."""
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError("consumer got no partition assignment in time")
        consumer.poll(0.1)
