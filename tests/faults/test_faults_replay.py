"""Replay correctness under log faults and foreign records.

4. A cache closed, or open but behind the log end, for longer than the log keeps tombstones is
   rebuilt rather than keep a key whose delete compaction removed meanwhile; a full replay slower
   than that retention warns instead of rebuilding forever.
5. Partitions added to the topic under a cache: refused at open, noticed by a running store, and
   kvlog's own writes keep the key -> partition mapping of the count the store opened with.
6. A checkpoint past the log end (the topic lost records): rebuilt at open and by a running reader.
7. Records from foreign producers that the cache cannot take (a value the codec rejects, a null
   key, a key over 511 bytes) are quarantined, or stop replay with ``on_bad_record="raise"``.

The Kafka tests run on the session broker (whose cleaner wakes every 100 ms) with real topics;
a deleted record is waited for until a plain consumer no longer sees it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import TESTS, topic_records, wait_until
from kafka import KafkaProducer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.partitioner import murmur2

from kvlog import BadRecordError, CacheError, Codec, KVLog, LocalLog, SyncTimeoutError, TopicConfigError
from kvlog import replay as replay_module
from kvlog.cache import Cache
from kvlog.verify import verify

REPO = TESTS.parent

#: Topic settings under which the broker's cleaner removes a tombstone within seconds: segments
#: roll on the next append after 100 ms, any dirt makes the log cleanable, and a tombstone is kept
#: 3 s after its first cleaning. kvlog's follower then notes "current" every 0.75 s.
RETENTION_MS = 3000
SHORT_RETENTION = {
    "delete.retention.ms": str(RETENTION_MS),
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
}


def send_raw(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Write records as a foreign producer would: kafka-python, no kvlog checks."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for future in [producer.send(topic, key=key, value=value) for key, value in records]:
            future.get(timeout=30)
    finally:
        producer.close()


def delete_and_compact_away(writer: KVLog, bootstrap: str, topic: str, key: str) -> None:
    """Delete ``key``, then keep writing until the cleaner has removed every record of it, tombstone included.

    A consumer that is not polling still has one fetch outstanding (kafka-python sends the next
    one before it returns records, and the broker answers it as soon as anything is appended): a
    filler written first takes that answer, so no stopped reader holds the tombstone in a buffer.
    The active segment is never cleaned and rolls only on an append, hence a filler every round.
    """
    writer["filler"] = 0
    writer.discard(key)
    round_ = 0

    def gone() -> bool:
        nonlocal round_
        round_ += 1
        writer["filler"] = round_
        return all(k != key.encode() for _, _, k, _ in topic_records(bootstrap, topic))

    wait_until(gone, timeout=120, interval=0.3, what=f"the cleaner to remove every record of {key!r}")


def set_cleanup_policy(admin: Any, topic: str, policy: str) -> None:
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": policy})])


def raised(call: Callable[[], object], error: type[BaseException]) -> BaseException | None:
    """The ``error`` that ``call()`` raised, or ``None`` if it returned."""
    try:
        call()
    except error as exc:
        return exc
    return None


# -- tombstone retention guard -------------------------------------------------------------


class TestMissedDeletes:
    def test_a_cache_closed_longer_than_the_retention_is_rebuilt(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        kv = make_kv("a", topic_config=SHORT_RETENTION)
        kv.update({"doomed": 1, "kept": 1})
        kv.close()
        writer = make_kv("w")
        delete_and_compact_away(writer, bootstrap, topic, "doomed")
        reopened = make_kv("a")
        assert "doomed" not in reopened, "a delete compacted away while the cache was closed"
        assert reopened["kept"] == 1 and reopened["filler"] == writer["filler"]
        assert f"delete.retention.ms={RETENTION_MS}" in reopened.open_replay["rebuild_reason"]

    def test_a_store_not_synced_for_longer_than_the_retention_rebuilds_on_sync(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        lagging = make_kv("a", topic_config=SHORT_RETENTION, follow=False)
        current = make_kv("c")  # follows the topic the whole time
        lagging.update({"doomed": 1, "kept": 1})
        writer = make_kv("w")
        delete_and_compact_away(writer, bootstrap, topic, "doomed")
        assert "doomed" in lagging, "follow=False: the cache moves only on sync"
        lagging.sync(timeout=60)
        assert "doomed" not in lagging, "sync kept a key whose delete was compacted away while it lagged"
        stats = lagging.stats()
        assert stats["total_lag"] == 0 and lagging["filler"] == writer["filler"], (
            "sync waited for the rebuild"
        )
        assert any(f"delete.retention.ms={RETENTION_MS}" in reason for reason in stats["rebuilds"])
        # The control: a follower that kept up saw the tombstone, and never had a reason to rebuild.
        wait_until(lambda: current.get("filler") == writer["filler"], what="the follower to catch up")
        assert "doomed" not in current
        assert current.stats()["rebuilds"] == ["new cache"], "a follower that keeps up never rebuilds"

    def test_a_follower_paused_for_longer_than_the_retention_rebuilds(
        self, make_kv: Any, bootstrap: str, topic: str, tmp_path: Path
    ) -> None:
        """SIGSTOP stands for any follower that could not read the topic (a paused VM, a partition)."""
        writer = make_kv("w", topic_config=SHORT_RETENTION)
        with _FollowerChild(tmp_path / "child", bootstrap, topic) as child:
            os.kill(child.pid, signal.SIGSTOP)
            try:
                delete_and_compact_away(writer, bootstrap, topic, "doomed")
            finally:
                os.kill(child.pid, signal.SIGCONT)
            state = wait_until(
                lambda: (s := child.state())["filler"] == writer["filler"] and s,
                timeout=60,
                what="the resumed follower to catch up",
            )
        assert state["doomed"] is False, "the resumed follower kept a key whose delete it never saw"
        assert any(f"delete.retention.ms={RETENTION_MS}" in reason for reason in state["rebuilds"])

    def test_a_full_replay_slower_than_the_retention_warns_instead_of_rebuilding_again(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Rebuilding because the rebuild took too long would never end: kvlog warns and carries on."""
        records = 1200
        seed = LocalLog(tmp_path / "log")
        seed.append([(b"k%05d" % i, msgpack.packb(i)) for i in range(records)])
        seed.close()
        monkeypatch.setattr(replay_module, "BATCH_RECORDS", 100)

        def slow_check(data: bytes) -> None:
            time.sleep(0.001)  # stands for a replay slower than the retention (not a synchronisation)

        codec = Codec("slow", msgpack.packb, msgpack.unpackb, validate=slow_check)
        with KVLog(tmp_path, log=_RetentionOnlyLog(tmp_path / "log"), codec=codec, ready_timeout=60) as kv:
            stats = kv.stats()
            assert len(kv) == records and stats["records_replayed"] == records, "one pass, no second rebuild"
            assert stats["rebuilds"] == ["new cache"]
            assert any(
                "delete.retention.ms) well above the time a full replay takes" in w for w in stats["warnings"]
            )

    def test_an_embedded_log_store_not_synced_across_a_dropped_tombstone_rebuilds(
        self, tmp_path: Path
    ) -> None:
        """The embedded log says exactly which tombstones it dropped; a lagging store asks it on sync."""
        small = {"segment_bytes": 1024, "tombstone_retention": 0.0, "background_compaction": False}
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", **small), follow=False) as kv:  # type: ignore[arg-type]
            kv["doomed"] = "alive"
            kv.update({f"pad{i}": "x" * 50 for i in range(40)})
            log = kv.log
            # Another writer's delete, appended to the log but not replayed by this store yet.
            log.append([(b"doomed", None)], timeout=10)
            log.append([(b"pad%d" % i, msgpack.packb("y" * 50)) for i in range(40)], timeout=10)
            # A tombstone is dropped once it is older than the retention (0 s)
            # by the millisecond clock: on a fast machine this is still its millisecond.
            appended_ms = time.time_ns() // 1_000_000
            wait_until(lambda: time.time_ns() // 1_000_000 > appended_ms, 5, what="the next millisecond")
            assert log.compact()["tombstones_dropped"] >= 1  # type: ignore[attr-defined]
            assert "doomed" in kv, "follow=False: not replayed yet"
            kv.sync(timeout=30)
            assert "doomed" not in kv
            assert "compaction dropped tombstones" in kv.stats()["rebuilds"][-1]
            assert kv["pad0"] == "y" * 50


class _RetentionOnlyLog(LocalLog):
    """The embedded log answering like Kafka: no record of dropped tombstones, a 1 s retention."""

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool | None:
        return None

    @property
    def tombstone_retention_seconds(self) -> float:
        return 1.0


_CHILD = """
import json, sys
from kvlog import KVLog
kv = KVLog(sys.argv[1], bootstrap_servers=sys.argv[2], topic=sys.argv[3], timeout=20)
kv["doomed"] = 1
print("ready", flush=True)
for _ in sys.stdin:
    stats = kv.stats()
    print(json.dumps({"doomed": "doomed" in kv, "filler": kv.get("filler"), "rebuilds": stats["rebuilds"]}), flush=True)
kv.close()
"""


class _FollowerChild:
    """A KVLog with a follower in a child process, asked for its state over a pipe."""

    def __init__(self, path: Path, bootstrap: str, topic: str) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path), bootstrap, topic],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.proc.pid
        assert self._line(60) == "ready"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the child did not answer within {timeout}s"
        line = self.proc.stdout.readline()
        assert line, f"the child exited ({self.proc.wait()})"
        return line.strip()

    def state(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return json.loads(self._line(30))  # type: ignore[no-any-return]

    def __enter__(self) -> _FollowerChild:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.kill(self.pid, signal.SIGCONT)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            assert self.proc.stdout is not None
            self.proc.stdout.close()


# -- partitions added under a cache -------------------------------------------------------


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


#: Kafka's own known answers for its murmur2 (the Java client's ``Utils.murmur2`` test vectors).
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


class TestPartitioning:
    def test_keys_land_in_the_partition_the_java_clients_default_partitioner_picks(
        self, make_kv: Any, bootstrap: str
    ) -> None:
        """A key kvlog writes and the same key written by a Java or kafka-python producer share a partition.

        Otherwise the two records of one key sit in two partitions and no
        replay can tell which is newer. The Java client's own murmur2 answers
        pin the expected partitions; more keys are checked against
        kafka-python's murmur2, which must agree with them.
        """
        partitions = 4
        for key, java_hash in JAVA_MURMUR2.items():
            assert murmur2(key) & 0x7FFFFFFF == java_hash & 0x7FFFFFFF, key
        kv = make_kv(partitions=partitions)
        keys = [*JAVA_MURMUR2, *(b"order:%d" % i for i in range(64))]
        kv.update({key: 1 for key in keys})
        placed = {r.key: r.partition for r in topic_records(bootstrap, kv.log.topic)}  # type: ignore[attr-defined]
        for key, java_hash in JAVA_MURMUR2.items():
            assert placed[key] == (java_hash & 0x7FFFFFFF) % partitions, key
        assert {key: placed[key] for key in keys} == {key: kafka_partition(key, partitions) for key in keys}
        assert len(set(placed.values())) == partitions


class TestPartitionsAdded:
    def test_reopening_a_cache_after_partitions_were_added_is_refused(
        self, make_kv: Any, admin: Any, topic: str
    ) -> None:
        kv = make_kv("a", partitions=2)
        kv.update({f"k{i}": i for i in range(20)})
        kv.close()
        admin.create_partitions({topic: 3})
        with pytest.raises(TopicConfigError, match="now has 3 partitions, but this cache was built from 2"):
            make_kv("a")

    def test_writes_keep_the_partitions_the_store_opened_with(
        self, make_kv: Any, admin: Any, topic: str, bootstrap: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A store that has not noticed the new partition yet never writes into it (it does not read it)."""
        monkeypatch.setattr(replay_module, "CURRENT_MARK_SECONDS", 3600.0)  # it does not look again here
        kv = make_kv(partitions=2, timeout=5, kafka_config={"metadata_max_age_ms": 200})
        admin.create_partitions({topic: 3})
        producer = kv.log._producer  # the store's own producer must know of the third partition
        wait_until(lambda: len(producer.partitions_for(topic)) == 3, what="the producer to see 3 partitions")
        keys = [k for k in (b"key%d" % i for i in range(200)) if kafka_partition(k, 3) == 2][:5]
        for key in keys:
            kv[key] = 1  # into partition 2 (which the store does not read), this would time out
        placed = {key: p for p, _, key, _ in topic_records(bootstrap, topic)}
        assert {placed[k] for k in keys} <= {0, 1}
        assert all(placed[k] == kafka_partition(k, 2) for k in keys)

    def test_a_running_store_notices_added_partitions(
        self, make_kv: Any, admin: Any, topic: str, bootstrap: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(replay_module, "CURRENT_MARK_SECONDS", 0.3)
        kv = make_kv("a", partitions=2)
        unfollowed = make_kv("b", follow=False)
        kv["a"] = 1
        unfollowed.sync(timeout=10)
        admin.create_partitions({topic: 3})
        expected = "now has 3 partitions, but this cache was built from 2"
        for store in (kv, unfollowed):
            error = wait_until(
                lambda store=store: raised(lambda: store.sync(timeout=10), TopicConfigError),
                timeout=30,
                what="sync() to report the added partition",
            )
            assert expected in str(error)
        before = topic_records(bootstrap, topic)
        with pytest.raises(TopicConfigError, match=expected):
            kv["b"] = 2
        assert topic_records(bootstrap, topic) == before, "the refused write sent nothing"
        assert kv["a"] == 1 and unfollowed["a"] == 1, "reads keep serving the cache as of the change"


# -- checkpoint past the log end ---------------------------------------------------------


class TestCheckpointPastTheEnd:
    def test_at_open_the_cache_is_rebuilt(self, make_kv: Any, tmp_path: Path) -> None:
        kv = make_kv("a")
        kv.update({f"k{i}": i for i in range(10)})
        kv.close()
        cache = Cache(tmp_path / "a" / "cache")
        cache.apply([], {0: 1000})  # as if the topic had lost the records past offset 10
        cache.close()
        reopened = make_kv("a")
        assert "checkpoint 1000 of partition 0 is past the log end offset 10" in (
            reopened.open_replay["rebuild_reason"] or ""
        )
        assert dict(reopened) == {f"k{i}": i for i in range(10)}

    def test_a_running_reader_past_the_end_rebuilds(
        self, make_kv: Any, admin: Any, topic: str, bootstrap: str
    ) -> None:
        """The topic is deleted and created again (it lost its records) under a running follower."""
        kv = make_kv("a")
        kv.update({f"old{i}": i for i in range(20)})
        admin.delete_topics([topic])
        wait_until(lambda: topic not in admin.list_topics(), timeout=30, what="the topic to be deleted")
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": 1, "configs": {"cleanup.policy": "compact"}}},
            wait_for_metadata=True,
        )
        send_raw(bootstrap, topic, [(b"new", msgpack.packb(1))])
        wait_until(
            lambda: dict(kv) == {"new": 1}, timeout=60, what="the follower to rebuild from the new topic"
        )
        assert any("outside the log" in reason for reason in kv.stats()["rebuilds"])
        kv["after"] = 2
        assert dict(kv) == {"new": 1, "after": 2}
        kv.close()
        reopened = make_kv("a")
        assert reopened.open_replay["rebuild_reason"] is None, "the rebuilt cache is bound to the new topic"
        assert dict(reopened) == {"new": 1, "after": 2}


# -- records from foreign producers ---------------------------------------------------------


class TestForeignRecords:
    def test_bad_records_are_quarantined_and_keys_keep_their_previous_value(
        self, make_kv: Any, admin: Any, bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, logger="kvlog")
        kv = make_kv("a")
        kv.update({"k": "old", "j": "old"})  # offsets 0 and 1
        # A compacted topic refuses records without a key; one written before the
        # topic became compacted is still there to read.
        set_cleanup_policy(admin, topic, "delete")
        wait_until(
            lambda: raised(lambda: send_raw(bootstrap, topic, [(None, msgpack.packb(1))]), Exception) is None,
            what="the broker to take a record without a key",
        )  # offset 2
        set_cleanup_policy(admin, topic, "compact")
        send_raw(
            bootstrap,
            topic,
            [
                (b"k", b"\xc1"),  # 3: a byte msgpack never uses
                (b"x" * 600, msgpack.packb(1)),  # 4: longer than LMDB holds
                (b"j", b"\x92\x01"),  # 5: an array of two with one element
                (b"after", msgpack.packb("new")),  # 6
            ],
        )
        wait_until(lambda: "after" in kv, what="the follower to pass the bad records")
        assert kv["k"] == "old" and kv["j"] == "old", "a quarantined record leaves the key's previous value"
        stats = kv.stats()
        assert stats["records_quarantined"] == 4
        reasons = {offset: reason for partition, offset, reason in stats["quarantined"] if partition == 0}
        assert sorted(reasons) == [2, 3, 4, 5]
        assert "null key" in reasons[2] and "msgpack" in reasons[3]
        assert "600 bytes" in reasons[4] and "ends inside an object" in reasons[5]
        assert "offset 3 of partition 0" in caplog.text and "offset 5 of partition 0" in caplog.text
        cold = make_kv("b")  # a cold replay of the same topic does the same
        assert dict(cold) == {"k": "old", "j": "old", "after": "new"}
        assert cold.stats()["records_quarantined"] == 4

    def test_raise_stops_the_open_and_a_running_store_at_the_bad_record(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        kv = make_kv("a", on_bad_record="raise")
        kv["k"] = "old"  # offset 0
        send_raw(bootstrap, topic, [(b"k", b"\x81")])  # offset 1: a map missing its key and value
        error = wait_until(
            lambda: raised(lambda: kv.sync(timeout=10), BadRecordError), what="sync() to raise BadRecordError"
        )
        assert isinstance(error, BadRecordError) and isinstance(error, ValueError)
        assert (error.partition, error.offset) == (0, 1)
        assert "offset 1 of partition 0" in str(error) and "on_bad_record='raise'" in str(error)
        before = topic_records(bootstrap, topic)
        with pytest.raises(BadRecordError, match="offset 1 of partition 0"):
            kv["x"] = 1
        assert topic_records(bootstrap, topic) == before, "the refused write sent nothing"
        assert kv["k"] == "old", "reads keep serving the cache as it was"
        with pytest.raises(BadRecordError, match=r"offset 1 of partition 0.*not valid msgpack"):
            make_kv("b", on_bad_record="raise")

    @pytest.mark.parametrize(
        ("codec", "good", "bad"),
        [
            ("msgpack", msgpack.packb({"a": [1, 2]}), msgpack.packb(1) + b"\x00"),  # a byte after the object
            ("json", b'{"a": 1}', b'{"a": '),
            ("str", "é".encode(), b"\xff\xfe"),
        ],
    )
    def test_each_codec_quarantines_what_it_cannot_decode(
        self, tmp_path: Path, codec: str, good: bytes, bad: bytes
    ) -> None:
        """The embedded log, written to directly as a foreign writer would."""
        with KVLog(tmp_path, codec=codec, follow=False) as kv:
            kv.log.append([(b"good", good), (b"bad", bad), (b"", good), (b"y" * 512, good)], timeout=10)
            kv.sync(timeout=10)
            assert list(kv) == ["good"]
            stats = kv.stats()
            assert stats["records_quarantined"] == 3
            assert [offset for _, offset, _ in stats["quarantined"]] == [1, 2, 3]
            report = verify(kv)
            assert report.ok, "verify skips what replay quarantines, rather than reporting it"

    def test_the_bytes_codec_takes_any_value(self, tmp_path: Path) -> None:
        with KVLog(tmp_path, codec="bytes", follow=False) as kv:
            kv.log.append([(b"a", b"\xc1"), (b"b", b"")], timeout=10)
            kv.sync(timeout=10)
            assert dict(kv) == {"a": b"\xc1", "b": b""} and kv.stats()["records_quarantined"] == 0

    def test_a_user_codec_is_checked_with_its_validate_or_else_its_decode(self, tmp_path: Path) -> None:
        def decode(data: bytes) -> bytes:
            if not data.startswith(b"ok:"):
                raise ValueError("no ok: prefix")
            return data[3:]

        def encode(value: bytes) -> bytes:
            return b"ok:" + value

        records = [(b"a", b"ok:1"), (b"b", b"zz")]
        with KVLog(tmp_path / "1", codec=Codec("ok", encode, decode), follow=False) as kv:
            kv.log.append(records, timeout=10)
            kv.sync(timeout=10)
            assert dict(kv) == {"a": b"1"}
            assert "ValueError: no ok: prefix" in kv.stats()["quarantined"][0][2]
        lenient = Codec("ok", encode, decode, validate=lambda data: None)
        with KVLog(tmp_path / "2", codec=lenient, follow=False) as kv:
            kv.log.append(records, timeout=10)
            kv.sync(timeout=10)
            assert sorted(kv) == ["a", "b"], "validate replaces decode as the check"

    def test_an_unknown_policy_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="on_bad_record must be one of 'quarantine', 'raise'"):
            KVLog(tmp_path, on_bad_record="ignore")


# -- a batch that failed to apply ------------------------------------------------------------


def test_a_batch_that_failed_to_apply_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader moved past a batch the cache refused (a full disk): the next replay reads it again."""
    with KVLog(tmp_path, follow=False) as kv:
        kv.log.append([(b"k%d" % i, msgpack.packb(i)) for i in range(100)], timeout=10)
        failures: Iterator[BaseException] = iter([CacheError("injected: the disk is full")])

        def failing_once(apply: Callable[..., tuple[int, int]]) -> Callable[..., tuple[int, int]]:
            def fail_once(self: Cache, *args: Any, **kwargs: Any) -> tuple[int, int]:
                for exc in failures:
                    raise exc
                return apply(self, *args, **kwargs)

            return fail_once

        # Replay of the embedded log applies the columns its reader reads; of other logs, records.
        monkeypatch.setattr(Cache, "apply", failing_once(Cache.apply))
        monkeypatch.setattr(Cache, "apply_columns", failing_once(Cache.apply_columns))
        with pytest.raises(CacheError, match="injected"):
            kv.sync(timeout=10)
        kv.sync(timeout=10)
        assert len(kv) == 100 and kv["k99"] == 99


def test_sync_timeout_is_still_a_sync_timeout(tmp_path: Path) -> None:
    """catch_up keeps sync()'s contract: a timeout names itself and the time given."""
    with KVLog(tmp_path, follow=False) as kv:
        kv.log.append([(b"k%d" % i, msgpack.packb(i)) for i in range(10)], timeout=10)
        with pytest.raises(SyncTimeoutError, match="within 0s"):
            kv.sync(timeout=0)
