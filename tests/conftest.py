"""Shared fixtures: one real Kafka broker per test session, stores that close themselves.

The broker is a single-node KRaft Apache Kafka started from jars fetched from
Maven Central (:mod:`devbroker`, in the checkout), on free loopback ports, and killed
with its whole process group at the end of the session. Set
``KVLOG_TEST_BOOTSTRAP_SERVERS`` to use a broker you already run instead.

If the broker cannot be started (no Java or Maven), Kafka tests are skipped
with the reason, except where ``KVLOG_REQUIRE_KAFKA=1`` (as in ``.ci/run``):
there a missing broker fails the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import pytest
from hypothesis import HealthCheck, settings

from kvlog import KVLog

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

#: This folder: the child programs the crash and fault tests run live here.
TESTS = Path(__file__).resolve().parent

#: Broker settings for tests: the cleaner wakes up often, so compaction tests
#: finish in seconds rather than minutes.
TEST_BROKER_CONFIGS = {
    "log.cleaner.backoff.ms": "100",
    "log.initial.task.delay.ms": "0",
    "auto.create.topics.enable": "false",
}


def wait_until(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)  # polling interval of a deadline-bounded wait


class TopicRecord(NamedTuple):
    """One record as it physically is in a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def topic_records(bootstrap: str, topic: str, *, timeout: float = 60.0) -> list[TopicRecord]:
    """Every record physically in ``topic`` (all partitions, in partition and offset order), read with a plain consumer.

    What kvlog wrote, as any other client sees it: the tests compare stores
    with this, never with another kvlog replay.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[TopicRecord] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read topic {topic!r} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend(TopicRecord(r.partition, r.offset, r.key, r.value) for r in batch)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def kafka_missing(what: str, exc: Exception) -> NoReturn:
    """Skip the tests that need Kafka ``what`` ("broker", "cluster"), or fail them under KVLOG_REQUIRE_KAFKA=1."""
    if os.environ.get("KVLOG_REQUIRE_KAFKA") == "1":
        pytest.fail(f"KVLOG_REQUIRE_KAFKA=1 but the Kafka {what} did not start: {exc}", pytrace=False)
    pytest.skip(f"no Kafka {what} (set KVLOG_REQUIRE_KAFKA=1 to make this an error): {exc}")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A running single-node Kafka broker for the whole session (``.bootstrap_servers``)."""
    external = os.environ.get("KVLOG_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield type("ExternalBroker", (), {"bootstrap_servers": external})()
        return
    from devbroker import DevBroker, DevBrokerError

    broker = DevBroker(tmp_path_factory.mktemp("kafka"), broker_configs=TEST_BROKER_CONFIGS)
    try:
        broker.start(timeout=120)
    except DevBrokerError as exc:
        kafka_missing("broker", exc)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def bootstrap(kafka_broker: Any) -> str:
    """The session broker's bootstrap servers, ``"127.0.0.1:<port>"``."""
    return str(kafka_broker.bootstrap_servers)


@pytest.fixture(scope="session")
def admin(bootstrap: str) -> Iterator[Any]:
    """A kafka-python admin client on the session broker."""
    from kafka.admin import KafkaAdminClient

    client = KafkaAdminClient(bootstrap_servers=bootstrap)
    yield client
    client.close()


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (the topic itself is created by KVLog)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_kv(tmp_path: Path, bootstrap: str, topic: str) -> Iterator[Callable[..., KVLog]]:
    """Open KVLog stores on the session broker; every store opened is closed at teardown.

    ``make_kv()`` opens ``tmp_path/"a"`` on the test's topic; ``make_kv("b")``
    another cache on the same topic; any keyword goes to ``KVLog``.
    """
    with stores(tmp_path, bootstrap_servers=bootstrap, topic=topic, timeout=20.0) as make:
        yield make


@contextlib.contextmanager
def stores(parent: Path, **defaults: Any) -> Iterator[Callable[..., KVLog]]:
    """``make(name="a", **kwargs)`` opens a KVLog at ``parent/name`` with ``defaults`` under ``kwargs``.

    Every store it opened is closed on exit, also after a failed test.
    """
    opened: list[KVLog] = []

    def make(name: str = "a", **kwargs: Any) -> KVLog:
        kv = KVLog(parent / name, **{**defaults, **kwargs})
        opened.append(kv)
        return kv

    try:
        yield make
    finally:
        for kv in opened:
            kv.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the broker as ``kafka`` so ``-m "not kafka"`` selects the rest."""
    for item in items:
        if "kafka_broker" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
