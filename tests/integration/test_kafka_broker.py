"""The local Kafka broker and topic creation, against a real broker."""
from __future__ import annotations

import gc
import os
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from conftest import CACHE_DIR
from streamscore.dev.kafka_broker import LOG_CLEANER_BYTES_PER_S, KafkaBrokerError, LocalKafkaBroker
from streamscore.kafka.io import admin_result, commit, log_commit_errors
from streamscore.settings import TOPIC_EVENTS, TOPIC_RETRAIN, TOPIC_SCORER_STATE, Settings
from streamscore.kafka.topics import SCORER_STATE_SEGMENT_BYTES, TopicMismatchError, ensure_topics, topic_names


def test_install_second_call_is_fast_and_reuses_cache(tmp_path):
    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, cache_dir=CACHE_DIR, data_dir=tmp_path))
    version = broker.install()  # resolves with Maven only if .cache/ has no jars yet
    libs = broker.libs_dir(version)
    jars_before = sorted(path.name for path in libs.iterdir())

    started = time.perf_counter()
    assert broker.install() == version
    assert time.perf_counter() - started < 0.1

    assert sorted(path.name for path in libs.iterdir()) == jars_before
    assert f"kafka_2.13-{version}.jar" in jars_before
    assert f"kafka-server-{version}.jar" in jars_before
    # log4j2 binding present and slf4j 2 (not the 1.7 Kafka would pull) so the broker log works
    assert "log4j-slf4j2-impl-2.25.5.jar" in jars_before
    assert "slf4j-api-2.0.17.jar" in jars_before
    assert not any(name.startswith("slf4j-api-1.") for name in jars_before)


def test_start_refuses_a_port_in_use_and_names_the_setting(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, kafka_port=port,
                                           cache_dir=CACHE_DIR, data_dir=tmp_path))
        with pytest.raises(KafkaBrokerError) as raised:
            broker.start()
    assert str(port) in str(raised.value)
    assert "STREAMSCORE_KAFKA_PORT" in str(raised.value)
    assert not broker.pid_file.exists()


def test_start_refuses_when_an_external_cluster_is_configured(tmp_path):
    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers="kafka.example:9092", data_dir=tmp_path))
    with pytest.raises(KafkaBrokerError, match="KAFKA_BOOTSTRAP_SERVERS"):
        broker.start()


def test_status_ignores_a_pid_file_naming_another_process(tmp_path):
    # A stale pid file whose pid was reused must not make us report (or kill) a stranger.
    broker = LocalKafkaBroker(Settings(kafka_bootstrap_servers=None, kafka_port=39990, data_dir=tmp_path))
    broker.pid_file.parent.mkdir(parents=True)
    broker.pid_file.write_text(f"{os.getpid()}\n")
    status = broker.status()
    assert (status.running, status.pid) == (False, None)
    assert broker.stop() is False
    assert not broker.pid_file.exists()


@pytest.mark.integration
def test_produce_and_consume_round_trip(settings):
    topic = settings.topic(TOPIC_EVENTS)
    sent = {f"entity-{i % 37}".encode(): [] for i in range(37)}
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True, "acks": "all"})
    for i in range(2000):
        key = f"entity-{i % 37}".encode()
        value = f"event-{i}".encode()
        sent[key].append(value)
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    consumer = Consumer({
        "bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group("round-trip"),
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    received = {key: [] for key in sent}
    partitions_of_key: dict[bytes, set[int]] = {key: set() for key in sent}
    count, deadline = 0, time.monotonic() + 60
    try:
        while count < 2000 and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                assert message.error() is None, message.error()
                received[message.key()].append(message.value())
                partitions_of_key[message.key()].add(message.partition())
                count += 1
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()

    assert count == 2000
    assert received == sent  # nothing lost or duplicated, per-key order kept
    assert all(len(parts) == 1 for parts in partitions_of_key.values())  # a key lives on one partition
    assert len(set().union(*partitions_of_key.values())) == settings.partitions


@pytest.mark.integration
def test_asynchronous_commit_is_sent_without_waiting_and_its_failure_is_logged(settings, caplog):
    topic = settings.topic(TOPIC_EVENTS)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for i in range(5):
        producer.produce(topic, value=f"v{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    outcomes: list[tuple] = []

    def on_commit(error, partitions):
        outcomes.append((error, [(tp.topic, tp.partition, tp.offset, tp.error) for tp in partitions or ()]))
        log_commit_errors(error, partitions)

    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group("async-commit"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "on_commit": on_commit})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        messages, deadline = [], time.monotonic() + 30
        while len(messages) < 5 and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(10, 1.0) if m.error() is None]
        assert len(messages) == 5
        assert commit(consumer, messages, asynchronous=True) is True
        assert outcomes == []  # sent, not waited for: the reply comes with a later poll
        deadline = time.monotonic() + 30
        while not outcomes and time.monotonic() < deadline:
            consumer.consume(1, 0.2)
        assert outcomes == [(None, [(topic, 0, messages[-1].offset() + 1, None)])]
        assert consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset == messages[-1].offset() + 1
        # a commit the coordinator refuses reaches the callback, which says so
        caplog.clear()
        consumer.commit(offsets=[TopicPartition(topic, 0, -5)], asynchronous=True)
        deadline = time.monotonic() + 30
        while len(outcomes) < 2 and time.monotonic() < deadline:
            consumer.consume(1, 0.2)
    finally:
        consumer.close()
    assert len(outcomes) == 2 and (outcomes[1][0] is not None or outcomes[1][1][0][3] is not None), outcomes
    assert "offset commit failed" in caplog.text


@pytest.mark.integration
def test_ensure_topics_is_idempotent_with_partitions_and_configs(make_settings):
    settings = make_settings(partitions=3)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})

    assert sorted(ensure_topics(settings, admin)) == sorted(topic_names(settings))
    assert ensure_topics(settings, admin) == []

    metadata = admin.list_topics(timeout=10).topics
    assert len(metadata[settings.topic(TOPIC_EVENTS)].partitions) == 3
    assert len(metadata[settings.topic(TOPIC_SCORER_STATE)].partitions) == 3  # co-partitioned with events
    assert len(metadata[settings.topic(TOPIC_RETRAIN)].partitions) == 1

    resources = [ConfigResource("topic", settings.topic(TOPIC_SCORER_STATE)),
                 ConfigResource("topic", settings.topic(TOPIC_EVENTS))]
    configs = {resource.name: admin_result(future) for resource, future in admin.describe_configs(resources).items()}
    assert configs[settings.topic(TOPIC_SCORER_STATE)]["cleanup.policy"].value == "compact"
    assert configs[settings.topic(TOPIC_SCORER_STATE)]["segment.bytes"].value == str(SCORER_STATE_SEGMENT_BYTES)
    assert configs[settings.topic(TOPIC_EVENTS)]["cleanup.policy"].value == "delete"
    assert configs[settings.topic(TOPIC_EVENTS)]["retention.ms"].value == str(7 * 24 * 3600 * 1000)


@pytest.mark.integration
def test_the_local_broker_throttles_its_log_cleaner(kafka_bootstrap, environment_settings, docker_available):
    if environment_settings.kafka_bootstrap_servers or docker_available:
        pytest.skip("the session's broker is not the project's own")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    broker = ConfigResource("broker", "1")
    configs = admin_result(admin.describe_configs([broker])[broker])
    assert float(configs["log.cleaner.io.max.bytes.per.second"].value) == LOG_CLEANER_BYTES_PER_S  # a double


@pytest.mark.integration
def test_ensure_topics_refuses_existing_topics_with_other_partition_counts(make_settings):
    settings = make_settings(partitions=2)
    ensure_topics(settings)
    with pytest.raises(TopicMismatchError, match="STREAMSCORE_PARTITIONS"):
        ensure_topics(make_settings(partitions=3, topic_prefix=settings.topic_prefix))


def _client_threads() -> int:
    """librdkafka threads of this process (every client has an rdk:main thread)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(name == "rdk:main" for name in names)


def test_a_failed_admin_request_does_not_keep_its_client_alive(kafka_bootstrap):
    """admin_result raises a copy: no reference cycle through the future keeps the AdminClient for the
    cyclic collector, which would destroy client and futures in any order (librdkafka aborts or hangs)."""
    def failing_request() -> int:
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        bad = NewTopic(f"invalid-{time.time_ns()}", num_partitions=1, replication_factor=1,
                       config={"cleanup.policy": "no-such-policy"})
        future = admin.create_topics([bad], operation_timeout=30)[bad.topic]
        try:
            admin_result(future)
        except KafkaException as error:
            return error.args[0].code()
        return KafkaError.NO_ERROR

    before = _client_threads()
    gc.disable()  # only reference counting may free the client
    try:
        assert failing_request() == KafkaError.INVALID_CONFIG
        deadline = time.monotonic() + 10
        while _client_threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        # <=: a client of an earlier test may end meanwhile; ours would keep the count above `before`
        assert _client_threads() <= before, "the AdminClient outlived its last plain reference"
    finally:
        gc.enable()
