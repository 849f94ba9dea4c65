"""Tests for kvlog.devbroker against a real single-node Kafka broker (no mocks)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from kvlog.devbroker import DevBroker, main

STARTUP_TIMEOUT = 90.0


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def process_group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes whose process group is *pgid* (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process went away while we looked
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        state, _ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def broker() -> Iterator[DevBroker]:
    b = DevBroker(broker_configs={"log.cleaner.backoff.ms": "100"})
    try:
        b.start(timeout=STARTUP_TIMEOUT)
        yield b
    finally:
        b.close()


def create_topic(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": 1}},
            wait_for_metadata=True,
        )
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        producer.send(topic, key=key, value=value).get(timeout=20)
    finally:
        producer.close()


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 20.0) -> list:
    """Read partition 0 of *topic* from the beginning until *expect* records arrived."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        records: list = []
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@pytest.mark.kafka
def test_start_produce_consume_stop(broker: DevBroker) -> None:
    assert broker.is_running()
    assert repr(broker).endswith("running>")
    topic = f"t-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap_servers, topic)
    produce(broker.bootstrap_servers, topic, b"k", b"v")
    records = consume_all(broker.bootstrap_servers, topic, expect=1)
    assert [(r.key, r.value) for r in records] == [(b"k", b"v")]
    assert broker.log_path.is_file()

    broker.stop()
    assert not broker.is_running()
    wait_until(lambda: not accepts_connections(broker.port), what="the port to close")
    broker.stop()  # idempotent


@pytest.mark.kafka
def test_restart_keeps_data(broker: DevBroker) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap_servers, topic)
    produce(broker.bootstrap_servers, topic, b"key", b"survives restart")
    cluster_id, port = broker.cluster_id, broker.port

    broker.restart(timeout=STARTUP_TIMEOUT)

    assert broker.is_running()
    assert (broker.cluster_id, broker.port) == (cluster_id, port)
    records = consume_all(broker.bootstrap_servers, topic, expect=1)
    assert [(r.key, r.value) for r in records] == [(b"key", b"survives restart")]
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        assert admin.describe_cluster()["cluster_id"] == cluster_id
    finally:
        admin.close()


@pytest.mark.kafka
def test_kill_kills_process_group(broker: DevBroker) -> None:
    pid = broker.pid
    assert pid is not None and pid_alive(pid)
    assert pid in process_group_members(pid)

    broker.kill()

    assert not broker.is_running()
    assert broker.pid is None
    wait_until(lambda: not pid_alive(pid), what=f"pid {pid} to disappear")
    wait_until(lambda: not process_group_members(pid), what="the process group to die")
    broker.kill()  # idempotent
    broker.stop()  # and stop after a crash is a no-op


@pytest.mark.kafka
def test_main_fetch_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--fetch-only"]) == 0
    libs = Path(capsys.readouterr().out.strip())
    assert libs.is_dir()
    assert any(libs.glob("kafka_2.13-*.jar"))
