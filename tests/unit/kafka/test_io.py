"""The one commit path and the one produce path: retriable errors are retried, lost membership is skipped,
anything else raises. (The real broker's version of this is the broker kill -9 test in
tests/integration/test_reliability.py; these pin the decisions on each error code.)"""
from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from streamscore.kafka.io import (DeliveryFailed, FatalConsumerError, commit_offsets, data_messages, is_retriable,
                                  produce)

OFFSETS = [TopicPartition("t", 0, 10)]


class ScriptedConsumer:
    """commit() raises the scripted errors in turn, then succeeds."""

    def __init__(self, *codes: int):
        self.codes = list(codes)
        self.commits = 0

    def commit(self, offsets, asynchronous):
        self.commits += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))


@pytest.mark.parametrize("code", [KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
                                  KafkaError.NOT_COORDINATOR, KafkaError.REQUEST_TIMED_OUT, KafkaError._TRANSPORT,
                                  KafkaError._TIMED_OUT, KafkaError._WAIT_COORD, KafkaError._ALL_BROKERS_DOWN])
def test_retriable_commit_errors_are_retried_until_the_commit_succeeds(code):
    consumer = ScriptedConsumer(code, code)
    assert commit_offsets(consumer, OFFSETS, backoff_s=0.001) is True
    assert consumer.commits == 3


def test_a_coordinator_away_for_longer_than_the_attempts_is_not_fatal():
    consumer = ScriptedConsumer(*[KafkaError.COORDINATOR_LOAD_IN_PROGRESS] * 10)
    assert commit_offsets(consumer, OFFSETS, attempts=3, backoff_s=0.001) is False
    assert consumer.commits == 3


@pytest.mark.parametrize("code", [KafkaError.REBALANCE_IN_PROGRESS, KafkaError.UNKNOWN_MEMBER_ID,
                                  KafkaError.ILLEGAL_GENERATION])
def test_lost_membership_skips_the_commit_without_retrying(code):
    consumer = ScriptedConsumer(code)
    assert commit_offsets(consumer, OFFSETS, backoff_s=0.001) is False
    assert consumer.commits == 1


def test_other_commit_errors_raise():
    with pytest.raises(KafkaException):
        commit_offsets(ScriptedConsumer(KafkaError.TOPIC_AUTHORIZATION_FAILED), OFFSETS, backoff_s=0.001)
    assert not is_retriable(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))


def test_nothing_to_commit_is_no_call():
    consumer = ScriptedConsumer()
    assert commit_offsets(consumer, []) is True and consumer.commits == 0


class ScriptedProducer:
    def __init__(self, *failures: BaseException):
        self.failures = list(failures)
        self.produced: list[tuple] = []
        self.polls = 0

    def produce(self, topic, **kwargs):
        if self.failures:
            raise self.failures.pop(0)
        self.produced.append((topic, kwargs))

    def poll(self, timeout):
        self.polls += 1


def test_a_full_queue_is_waited_out_and_retriable_errors_retried():
    producer = ScriptedProducer(BufferError("queue full"), BufferError("queue full"),
                                KafkaException(KafkaError(KafkaError._TRANSPORT)))
    produce(producer, "t", b"v", b"k", partition=2, headers=[("h", b"1")])
    assert producer.produced == [("t", {"key": b"k", "value": b"v", "partition": 2, "headers": [("h", b"1")]})]
    assert producer.polls == 3


def test_a_queue_full_for_too_long_is_a_delivery_failure():
    producer = ScriptedProducer(*[BufferError("queue full")] * 1000)
    with pytest.raises(DeliveryFailed, match="stayed full"):
        produce(producer, "t", b"v", timeout_s=0)


def test_a_non_retriable_produce_error_raises():
    with pytest.raises(KafkaException):
        produce(ScriptedProducer(KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))), "t", b"v")


def test_data_messages_keeps_data_and_logs_transient_errors(caplog):
    data = [Message(topic="t", partition=0, offset=i, value=b"x") for i in range(2)]
    eof = Message(topic="t", partition=0, offset=2, error=KafkaError(KafkaError._PARTITION_EOF))
    transient = Message(error=KafkaError(KafkaError._TRANSPORT, "broker down"))
    assert data_messages([data[0], eof, transient, data[1]]) == data
    assert [r.getMessage() for r in caplog.records] == [f"consumer error: {transient.error()}"]  # EOF is not one


def test_a_fatal_consumer_error_raises_so_the_service_restarts_with_a_new_consumer():
    fenced = Message(error=KafkaError(KafkaError.FENCED_INSTANCE_ID, "Static consumer fenced", fatal=True))
    with pytest.raises(FatalConsumerError, match="Static consumer fenced"):
        data_messages([Message(topic="t", value=b"x"), fenced])
    as_consumed = Message(error=KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced"))
    with pytest.raises(FatalConsumerError, match="Static consumer fenced"):  # how consume() reports it
        data_messages([as_consumed])
