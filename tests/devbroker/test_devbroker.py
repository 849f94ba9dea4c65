"""Tests for devbroker, the development Kafka broker in the checkout (real brokers and ports, no mocks)."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

import devbroker
from devbroker import DevBroker, DevBrokerError, free_ports, main, new_cluster_id, port_is_listening

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


def test_the_library_does_not_import_devbroker() -> None:
    """devbroker is a development tool in the checkout: ``import kvlog`` must not need it."""
    code = "import sys, kvlog; assert 'devbroker' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_names() -> None:
    assert devbroker.__all__ == sorted(devbroker.__all__)
    for name in devbroker.__all__:
        assert getattr(devbroker, name).__doc__, f"{name} has no docstring"
    for name in ("server_properties", "wait_ready", "existing_cluster_id", "failure_details", "wait_exit"):
        assert getattr(DevBroker, name).__doc__, f"DevBroker.{name} has no docstring"


def test_help_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "devbroker", "--help"], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.startswith("usage: python -m devbroker") and "--fetch-only" in out


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        assert not port_is_listening(port)


def test_port_is_listening_sees_a_listener() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_is_listening(port)
    assert not port_is_listening(port)


def test_new_cluster_id_is_a_base64_uuid() -> None:
    ids = {new_cluster_id() for _ in range(10)}
    assert len(ids) == 10
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_extension_points_shape_a_node(tmp_path: Path) -> None:
    """A subclass's server_properties drives the cluster id lookup, without starting anything."""

    class OtherDataDir(DevBroker):
        def server_properties(self) -> dict[str, str]:
            return {**super().server_properties(), "log.dirs": str(tmp_path / "elsewhere")}

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "meta.properties").write_text("version=1\ncluster.id=abc-123\n")
    node = OtherDataDir(tmp_path / "work")
    assert node.existing_cluster_id() == node.cluster_id == "abc-123"
    assert not node.is_running() and node.pid is None
    assert "server.log (last lines) ---\n(file does not exist)" in node.failure_details()
    assert node.failure_details("boom").startswith("--- command output ---\nboom\n")
    with pytest.raises(DevBrokerError, match="no JVM to wait for"):
        node.wait_exit(0.1)
    node.close()


@pytest.mark.kafka
def test_main_reports_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (controller_port,) = free_ports(1)
        assert main(["--port", str(port), "--controller-port", str(controller_port)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"devbroker: error: cannot start Kafka: 127.0.0.1:{port} is already in use")
