"""Kafka faults on a real three-broker KRaft cluster.

The partition leader SIGKILLed under a stream of writes, two of three brokers
down (too few in-sync replicas), and every broker stopped and restarted under
a following store and under a rewarm. Replication factor 3 and
``min.insync.replicas=2``, as a production topic would have. The cluster
(:mod:`kafka_cluster`) is one controller plus three broker processes, each
killed or stopped for real; nothing of Kafka is mocked.

One test needs no broker: a follower whose log read fails with a retriable
error (what a Kafka reader raises while no broker can serve it) must keep
retrying from its position without failing the writers waiting on it. The
embedded log, with its reads made to fail a few times, shows that exactly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kafka.errors as kerr
import msgpack
import pytest
from conftest import kafka_missing, stores, topic_records, wait_until
from kafka import KafkaConsumer, TopicPartition
from kafka_cluster import KafkaCluster

from devbroker import DevBrokerError
from kvlog import BrokerUnavailableError, KVLog, KVLogError, LogUnavailableError, NotEnoughReplicasError
from kvlog.log import LogReader
from kvlog.log.local import LocalLog

log = logging.getLogger(__name__)

#: A production-like topic: every write acknowledged by at least two replicas.
TOPIC_SETTINGS: dict[str, Any] = {"replication_factor": 3, "topic_config": {"min.insync.replicas": "2"}}
#: How long a broker takes to be fenced after a crash is the cluster's
#: broker.session.timeout.ms (3 s); a 2 s write timeout makes the writes in
#: flight at a leader kill fail, so the error path runs on every kill.
LEADER_KILL_WRITE_TIMEOUT = 2.0
LEADER_KILLS = 6
#: Records per update() in the leader-kill stream: large enough that a kill lands inside one.
WRITE_BATCH = 500
#: Writes must raise within their timeout plus this (the client's own bookkeeping).
TIMEOUT_MARGIN = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """One controller and three brokers on loopback for this module; killed at the end."""
    nodes = KafkaCluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start(timeout=120)
    except DevBrokerError as exc:
        nodes.close()
        kafka_missing("cluster", exc)
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def healthy(cluster: KafkaCluster) -> Iterator[KafkaCluster]:
    """The cluster with every broker running, also after a test that failed half-way."""
    cluster.start_brokers(list(cluster.brokers))
    yield cluster
    cluster.start_brokers(list(cluster.brokers))


@pytest.fixture
def open_kv(tmp_path: Path, healthy: KafkaCluster, topic: str) -> Iterator[Callable[..., KVLog]]:
    """``open_kv(name, **kwargs)``: a KVLog at ``tmp_path/name`` on the test's RF=3 topic; closed at teardown."""
    with stores(tmp_path, bootstrap_servers=healthy.bootstrap_servers, topic=topic, **TOPIC_SETTINGS) as make:
        yield make


def written(bootstrap: str, topic: str) -> list[tuple[int, bytes, Any]]:
    """``(offset, key, decoded value)`` of every record in the topic (these tests use one partition)."""
    records = topic_records(bootstrap, topic)
    assert {r.partition for r in records} <= {0}
    return [(r.offset, r.key or b"", msgpack.unpackb(r.value)) for r in records]


def fold(records: list[tuple[int, bytes, Any]]) -> dict[str, Any]:
    """The dict the records say: the last value of every key (these tests write no tombstones)."""
    return {key.decode(): value for _, key, value in records}


def in_sync(cluster: KafkaCluster, topic: str) -> bool:
    """Whether every broker is in the ISR of partition 0."""
    state = cluster.partition_state(topic)
    return state is not None and state["isr"] == sorted(cluster.brokers)


def leader_of(cluster: KafkaCluster, topic: str) -> int:
    """The broker leading partition 0 (waiting while an election is under way)."""

    def leader() -> int | None:
        state = cluster.partition_state(topic)
        return state["leader"] if state is not None and state["leader"] in cluster.brokers else None

    return int(wait_until(leader, 30, what=f"a leader of {topic}"))


#: Seconds within which a store that lived through the kills syncs again once
#: the cluster is healthy (every broker up and in the ISR): the bound the README states.
RECOVERY_SECONDS = 15.0
#: Where each kill lands, in turn (see TestLeaderKilled).
KILL_POINTS = ("mid-batch", "mid-rewarm", "while sync() waits")


@pytest.mark.kafka
class TestLeaderKilled:
    @pytest.mark.slow
    def test_sigkill_the_leader_six_times_under_writes_replays_and_syncs(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """Every write that returned is in the log once and in order; every store follows again afterwards.

        One store writes ``k<i> = i`` for i = 0, 1, 2, ... without pause,
        alternating single writes and ``update()`` batches; another store
        follows the topic (its long-poll fetch is outstanding at every kill).
        Six times the partition leader is SIGKILLed, in turn: while the writer
        is inside a batch, from the progress callback of a third store's
        ``rewarm()`` (which must complete), and from the progress callback of
        a ``follow=False`` store's ``sync()`` (which must complete within its
        timeout). Writes must resume through the new leader, and the killed
        broker is restarted and must rejoin the ISR before the next kill.

        Afterwards the raw topic holds every acknowledged ``i`` exactly once,
        in increasing order, and nothing kvlog was not asked to write; once
        the cluster is healthy, every store's first ``sync()`` succeeds within
        RECOVERY_SECONDS and its cache equals the topic's fold, and its
        ``stats()`` show the error it met and the progress it made since.
        """
        writer = open_kv("writer", timeout=LEADER_KILL_WRITE_TIMEOUT)
        watcher = open_kv("watcher", timeout=LEADER_KILL_WRITE_TIMEOUT)
        rewarmed = open_kv("rewarmed", timeout=LEADER_KILL_WRITE_TIMEOUT)
        lagger = open_kv("lagger", timeout=LEADER_KILL_WRITE_TIMEOUT, follow=False)
        stores = {"writer": writer, "watcher": watcher, "rewarmed": rewarmed, "lagger": lagger}
        wait_until(lambda: in_sync(healthy, topic), 30, what="all three replicas in sync")
        outcomes: list[tuple[int, BaseException | None]] = []
        acked = [0]  # written by the writer thread only
        stop = threading.Event()
        in_batch = threading.Event()

        def write_stream() -> None:
            i = 0
            while not stop.is_set():
                batch = 1 if i % 2 == 0 else WRITE_BATCH
                keys = range(i, i + batch)
                try:
                    if batch == 1:
                        writer[f"k{i:06d}"] = i
                    else:
                        in_batch.set()
                        try:
                            writer.update({f"k{j:06d}": j for j in keys})
                        finally:
                            in_batch.clear()
                except Exception as exc:  # noqa: BLE001 - judged below: each must be a retriable KVLogError
                    outcomes.extend((j, exc) for j in keys)
                else:
                    outcomes.extend((j, None) for j in keys)
                    acked[0] += batch
                i += batch

        def acks_past(count: int) -> Callable[[], bool]:
            return lambda: acked[0] >= count

        killed: list[tuple[str, int]] = []

        def kill_leader(point: str, leader: int | None = None) -> None:
            leader = leader_of(healthy, topic) if leader is None else leader
            healthy.kill(leader)
            killed.append((point, leader))

        def kill_from_progress(point: str) -> Callable[[dict[int, int], dict[int, int]], None]:
            kills_before = len(killed)  # one kill per replay: at its first report below the targets

            def progress(applied: dict[int, int], targets: dict[int, int]) -> None:
                # In the replaying thread, so the kill lands exactly here: before the
                # fetches that reach the targets, which then meet the failover.
                if len(killed) == kills_before and applied.get(0, 0) < targets.get(0, 0):
                    kill_leader(point)

            return progress

        write_thread = threading.Thread(target=write_stream, name="writer", daemon=True)
        write_thread.start()
        try:
            for n in range(LEADER_KILLS):
                point = KILL_POINTS[n % len(KILL_POINTS)]
                wait_until(acks_past(acked[0] + 2 * WRITE_BATCH), 30, what="writes flowing")
                before = len(killed)
                if point == "mid-batch":
                    # Asked first, so that the kill follows the batch's start at once.
                    leader = leader_of(healthy, topic)
                    wait_until(in_batch.is_set, 30, interval=0.001, what="the writer inside a batch")
                    kill_leader(point, leader)
                elif point == "mid-rewarm":
                    result = rewarmed.rewarm(timeout=120, progress=kill_from_progress(point))
                    assert result["records"] > 0
                else:
                    lagger.sync(timeout=60, progress=kill_from_progress(point))
                assert len(killed) == before + 1, f"the leader was not killed {point}"
                leader = killed[-1][1]
                wait_until(
                    acks_past(acked[0] + 2 * WRITE_BATCH),
                    60,
                    what=f"writes resuming after broker {leader} was killed {point}",
                )
                healthy.start_brokers([leader])
                wait_until(lambda: in_sync(healthy, topic), 60, what=f"broker {leader} back in the ISR")
        finally:
            stop.set()
            write_thread.join(timeout=60)
        assert not write_thread.is_alive(), "a write hung past its timeout"

        failed = [(i, exc) for i, exc in outcomes if exc is not None]
        log.info(
            "%d writes, %d raised (%s) across leader kills %s",
            len(outcomes),
            len(failed),
            sorted({type(exc).__name__ for _, exc in failed}),
            killed,
        )
        for i, exc in failed:
            assert isinstance(exc, KVLogError), f"write {i} raised a non-kvlog error: {exc!r}"
            assert exc.retriable, f"write {i} raised a non-retriable error: {exc!r}"
        assert failed, "a kill fails the writes in flight: the 2 s timeout is shorter than the failover"

        records = written(healthy.bootstrap_servers, topic)
        values = [value for _, _, value in records]
        assert all(key == f"k{value:06d}".encode() for _, key, value in records)
        assert values == sorted(set(values)), "a write was duplicated or reordered in the log"
        missing = {i for i, exc in outcomes if exc is None} - set(values)
        assert not missing, f"acknowledged writes missing from the log: {sorted(missing)[:20]}"
        assert set(values) <= {i for i, _ in outcomes}, "the log holds writes nobody made"

        expected = fold(records)
        fresh = open_kv("fresh")
        assert dict(fresh.items()) == expected, "a fresh replay differs from the topic"

        healthy_at = time.time()
        for name, store in stores.items():
            started = time.monotonic()
            store.sync(timeout=RECOVERY_SECONDS)  # the first call: no retry loop around it
            assert time.monotonic() - started < RECOVERY_SECONDS + TIMEOUT_MARGIN
            assert dict(store.items()) == expected, f"the {name} store's cache differs from the topic"
            health = store.stats()["replay_health"]
            assert health["last_progress_at"] is not None and health["last_progress_at"] >= healthy_at, (
                f"the {name} store's stats do not show the progress of its sync(): {health}"
            )
        for name in ("writer", "watcher", "rewarmed"):
            health = stores[name].stats()["replay_health"]
            assert health["following"], f"the {name} store's follower stopped: {health}"


@pytest.mark.kafka
class TestOffsetsAfterALeaderMoved:
    """After a leader change, an idle client asks the old leader for offsets: kafka-python's behaviour, and kvlog's.

    The partition's leader is killed while a client is idle, another broker is
    elected, and the killed one comes back as a follower. kafka-python 3.0
    keeps the old leader in the client's metadata (the refresh that the lost
    connection triggers runs before the controller has elected another) and
    retries a ListOffsets answered NOT_LEADER_OR_FOLLOWER at the same broker
    without refreshing it, until the metadata expires (5 minutes). kvlog makes
    such an answer refresh the metadata, and discards a client whose query
    failed anyway (README, "Guarantees and failure modes").
    """

    @staticmethod
    def move_the_leader(cluster: KafkaCluster, topic: str) -> int:
        """Kill the leader of partition 0, wait for another, restart the old one; returns the new leader."""
        old = leader_of(cluster, topic)
        cluster.kill(old)
        new = int(
            wait_until(
                lambda: (lambda leader: leader if leader not in (None, old) else None)(
                    (cluster.partition_state(topic) or {}).get("leader")
                ),
                30,
                what=f"a leader other than broker {old}",
            )
        )
        cluster.start_brokers([old])
        wait_until(lambda: in_sync(cluster, topic), 60, what=f"broker {old} back in the ISR")
        assert leader_of(cluster, topic) == new, "the leader moved back to the restarted broker"
        return new

    def test_a_plain_kafka_python_consumer_asks_the_old_leader_until_it_times_out(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """No kvlog in the loop: a KafkaConsumer's end_offsets() fails every time with the cluster healthy.

        This pins the kafka-python behaviour that kvlog works around. If it
        fails, a kafka-python release now refreshes its metadata here: the
        workaround in kvlog.log.kafka (``_refresh_metadata_when_not_leader``)
        may then go, and the README's guarantees row with it.
        """
        kv = open_kv("a")
        kv.update({"a": 1, "b": 2})
        wait_until(lambda: in_sync(healthy, topic), 30, what="all three replicas in sync")
        consumer = KafkaConsumer(
            bootstrap_servers=healthy.bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        try:
            tp = TopicPartition(topic, 0)
            assert consumer.end_offsets([tp], timeout_ms=10_000) == {tp: 2}
            self.move_the_leader(healthy, topic)
            for _ in range(3):
                with pytest.raises(kerr.KafkaTimeoutError, match="Failed to get offsets by timestamps"):
                    consumer.end_offsets([tp], timeout_ms=2000)
        finally:
            consumer.close()

    def test_a_store_reads_the_end_offsets_and_syncs_at_once_after_its_leader_moved(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """The same scenario through kvlog: the first end-offset query and the first sync() succeed."""
        kv = open_kv("a", timeout=2.0)
        idle = open_kv("idle", timeout=2.0, follow=False)
        kv.update({"a": 1, "b": 2})
        idle.sync(timeout=10)
        wait_until(lambda: in_sync(healthy, topic), 30, what="all three replicas in sync")
        assert kv.log.end_offsets() == {0: 2}
        self.move_the_leader(healthy, topic)
        assert kv.log.end_offsets() == {0: 2}, "the store's client asked the old leader"
        kv["c"] = 3
        for store in (kv, idle):
            store.sync(timeout=RECOVERY_SECONDS)
            assert dict(store.items()) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.kafka
class TestNotEnoughReplicas:
    def test_two_of_three_brokers_down(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """Writes raise NotEnoughReplicasError within the timeout; reads keep serving; writes work once back."""
        timeout = 3.0
        kv = open_kv("a", timeout=timeout)
        kv.update({"a": 1, "b": 2})
        leader = leader_of(healthy, topic)
        followers = [n for n in healthy.brokers if n != leader]
        for node in followers:
            healthy.kill(node)
        wait_until(
            lambda: (healthy.partition_state(topic) or {}).get("isr") == [leader],
            30,
            what="the ISR shrunk to the leader alone",
        )
        checkpoint = kv.stats()["checkpoint"]

        for write in (lambda: kv.__setitem__("c", 3), lambda: kv.update({"d": 4, "e": 5})):
            started = time.monotonic()
            with pytest.raises(NotEnoughReplicasError) as info:
                write()
            elapsed = time.monotonic() - started
            assert elapsed < timeout + TIMEOUT_MARGIN, f"the write took {elapsed:.1f}s with timeout={timeout}"
            message = str(info.value)
            assert "fewer in-sync replicas than min.insync.replicas=2" in message, message
            assert "no Kafka broker" not in message, message
            assert isinstance(info.value, LogUnavailableError) and info.value.retriable
            assert isinstance(info.value.__cause__, kerr.NotEnoughReplicasError), repr(info.value.__cause__)

        # Nothing of the refused writes reached the cache, and reads serve on.
        assert dict(kv.items()) == {"a": 1, "b": 2}
        assert kv["a"] == 1 and "c" not in kv and len(kv) == 2
        assert kv.stats()["checkpoint"] == checkpoint

        healthy.start_brokers(followers)
        wait_until(lambda: in_sync(healthy, topic), 60, what="the killed brokers back in the ISR")
        kv["c"] = 3  # the same store, not a reopened one
        assert kv["c"] == 3
        assert fold(written(healthy.bootstrap_servers, topic)) == dict(kv.items())


@pytest.mark.kafka
class TestBrokersRestarted:
    def test_follower_resumes_from_its_position(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """A following store rides out a stopped leader and a stopped cluster, then resumes where it was.

        Records written while a broker is down appear; while every broker is
        down, reads serve, writes raise a retriable error in time and a store
        can still be closed; once the brokers are back, a store that sat idle
        through the outage writes within its 3 s timeout, ``sync()`` is correct
        and nothing was replayed twice.
        """
        follower = open_kv("follower", timeout=5.0)
        writer = open_kv("writer", timeout=3.0)
        prober = open_kv("prober", timeout=3.0)

        def has(prefix: str, count: int) -> bool:
            return len(list(follower.scan(prefix))) == count

        writer.update({f"a{i:03d}": i for i in range(100)})
        wait_until(lambda: has("a", 100), 30, what="the follower has the first records")

        # The partition leader stops; the other producer writes through the new leader meanwhile.
        leader = leader_of(healthy, topic)
        healthy.brokers[leader].stop()
        writer.update({f"b{i:03d}": i for i in range(50)})
        wait_until(lambda: has("b", 50), 30, what="records written while the leader was down")
        healthy.start_brokers([leader])

        # A reader like the follower's, read to the log end, to ask during the outage.
        reader = follower.log.open_reader({0: 0})
        read = [0]

        def read_to_end() -> bool:
            read[0] += len(reader.poll(0.2, 1000))
            return read[0] == 150

        wait_until(read_to_end, 30, what="a second reader at the log end")

        # Every broker stops: nothing can reach the log.
        for node in healthy.brokers.values():
            node.stop()
        assert follower["a000"] == 0 and len(follower) == 150, "reads serve while the log is down"
        # A reader knows its positions without the brokers (the follower asks after every poll;
        # kafka-python's position() would wait for them to validate the positions, without end).
        answered: list[dict[int, int]] = []
        asking = threading.Thread(target=lambda: answered.append(reader.positions()), daemon=True)
        asking.start()
        asking.join(timeout=5)
        assert answered == [{0: 150}], "a reader's positions() waited for the brokers"
        started = time.monotonic()
        with pytest.raises(KVLogError) as info:
            prober["down"] = 1
        assert info.value.retriable, repr(info.value)
        assert time.monotonic() - started < 3.0 + TIMEOUT_MARGIN
        assert "down" not in prober
        # Closing must not wait for the log (the follower thread must not hang in a client call).
        closing = threading.Thread(target=prober.close, daemon=True)
        closing.start()
        closing.join(timeout=10)
        assert not closing.is_alive(), "close() hung while the brokers were down"

        healthy.start_brokers(list(healthy.brokers))
        # The writer's clients were idle through the outage; they must be back
        # within about a second of the brokers (not after kafka-python's
        # reconnect backoff of up to 30 s) for this to fit its 3 s timeout.
        writer.update({f"c{i:03d}": i for i in range(50)})
        follower.sync(timeout=10)
        assert has("c", 50)

        reader.close()
        records = written(healthy.bootstrap_servers, topic)
        assert dict(follower.items()) == fold(records)
        stats = follower.stats()
        assert stats["records_replayed"] == len(records) == 200, "a record was replayed twice, or missed"
        assert follower.rebuilds == ["new cache"], (
            f"the follower rebuilt instead of resuming: {follower.rebuilds}"
        )

    def test_rewarm_completes_across_a_restart_of_every_broker(
        self, open_kv: Callable[..., KVLog], healthy: KafkaCluster, topic: str
    ) -> None:
        """All brokers stop mid-rewarm; the rewarm reconnects, resumes from its position and completes."""
        kv = open_kv("a", timeout=10.0)
        total = 150_000
        for start in range(0, total, 10_000):
            kv.update({f"k{i:06d}": i for i in range(start, start + 10_000)})
        restarts: list[threading.Thread] = []
        seen: list[int] = []

        def stop_brokers_midway(applied: dict[int, int], targets: dict[int, int]) -> None:
            seen.append(applied[0])
            if restarts or not 0 < applied[0] < targets[0]:
                return
            # In the rewarm's own thread, so it is stopped exactly here; the
            # restart runs meanwhile, while the rewarm polls a dead cluster.
            for node in healthy.brokers.values():
                node.stop()
            restarter = threading.Thread(target=healthy.start_brokers, args=(list(healthy.brokers),))
            restarts.append(restarter)
            restarter.start()

        result = kv.rewarm(timeout=120, progress=stop_brokers_midway)
        assert restarts, f"the rewarm finished before it could be interrupted (progress {seen})"
        restarts[0].join()
        assert result["records"] == total, f"replayed {result['records']} records for {total}: not resumed"
        assert seen == sorted(seen) and seen[-1] == total, seen
        assert dict(kv.items()) == {f"k{i:06d}": i for i in range(total)}
        assert kv.stats()["checkpoint"] == {0: total}


class FlakyReader(LogReader):
    """A reader of the embedded log whose polls fail while its log says so."""

    def __init__(self, flaky_log: FlakyLocalLog, inner: LogReader) -> None:
        self._flaky_log = flaky_log
        self._inner = inner

    def poll(self, timeout: float, max_records: int) -> Any:
        if self._flaky_log.take_failure():
            raise BrokerUnavailableError("cannot read the log for now (injected)")
        return self._inner.poll(timeout, max_records)

    def positions(self) -> dict[int, int]:
        return self._inner.positions()

    def wakeup(self) -> None:
        self._inner.wakeup()

    def close(self) -> None:
        self._inner.close()


class FlakyLocalLog(LocalLog):
    """The embedded log, with a number of reader polls made to fail retriably."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._failures = 0
        self._failures_lock = threading.Lock()

    def fail_next_polls(self, count: int) -> None:
        with self._failures_lock:
            self._failures = count

    def take_failure(self) -> bool:
        with self._failures_lock:
            if self._failures <= 0:
                return False
            self._failures -= 1
            return True

    def failures_left(self) -> int:
        with self._failures_lock:
            return self._failures

    def open_reader(self, positions: Any) -> Any:
        return FlakyReader(self, super().open_reader(positions))


class TestTransientReadErrors:
    def test_a_follower_retries_a_retriable_read_error_without_failing_waiters(self, tmp_path: Path) -> None:
        """The write is in the log and the follower recovers in time, so the write returns.

        A follower that handed the read error to whoever waited made this
        write raise although its record was durable. On the embedded log a
        writer applies its own records without reading the log, unless the
        cache is behind: here a record another program appended (nobody
        applied it) is before the write, so the write waits for replay, which
        must read the log and meets the failures.
        """
        flaky = FlakyLocalLog(tmp_path / "log")
        with KVLog(tmp_path / "kv", log=flaky, timeout=10) as kv:
            kv["a"] = 1
            flaky.fail_next_polls(3)  # replay backs off 0.1 + 0.2 + 0.4 s
            flaky.append([(b"unapplied", msgpack.packb(0))])  # as another program would
            kv["b"] = 2
            assert flaky.failures_left() == 0, "replay did not meet the failures"
            assert dict(kv.items()) == {"a": 1, "unapplied": 0, "b": 2}
            assert kv.stats()["rebuilds"] == ["new cache"], "the follower rebuilt instead of resuming"
            health = kv.stats()["replay_health"]
            assert health["following"]
            assert "cannot read the log for now (injected)" in (health["last_error"] or ""), health
            assert health["last_progress_at"] >= health["last_error_at"], (
                "stats() do not show that the follower moved on after its last error"
            )
