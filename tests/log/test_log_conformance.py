"""One set of tests of the log interface, run against every log (CPython's ``test_shelve`` pattern).

``KVLog`` does not know which log it has: the embedded :class:`LocalLog` and
:class:`KafkaLog` must behave the same behind :class:`kvlog.log.Log`. Every
test here takes the ``any_log`` fixture and runs once per log: ``local`` (a
fresh directory) and ``kafka`` (a fresh compacted topic on the session
broker). The second half runs a small mapping suite on ``KVLog`` over each.
"""

from __future__ import annotations

import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kvlog import ClosedError, KVLog, RecordTooLargeError
from kvlog.log import Log, LogReader, PositionOutOfRangeError
from kvlog.log.local import LocalLog

# kafka-python warns about importlib.resources.read_text on import, which
# ``filterwarnings = error`` would turn into an error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import TopicPartition

    from kvlog.log.kafka import KafkaLog

#: Seconds a broker operation may take.
TIMEOUT = 20.0

#: How long a reader may take to deliver what the log holds (the first
#: Kafka fetch also looks up metadata).
READ_DEADLINE = 30.0

#: A poll with nothing to read must return within its timeout plus this.
POLL_SLACK = 2.0

#: (partition, offset, key, value) of one record, whatever object the reader returned.
Row = tuple[int, int, bytes | None, bytes | None]


def row(record: Any) -> Row:
    return (record.partition, record.offset, record.key, record.value)


class LogHarness:
    """Opens logs of one kind for a test and closes everything at teardown.

    ``open()`` creates the log on first use and ``reopen()`` opens another
    instance of the same log (for the embedded log: the same directory, after
    closing the first, as only one instance may write it; for Kafka: a second
    client of the same topic). ``open(name="other")`` opens a different log.
    """

    def __init__(self, kind: str, root: Path, topic: str, bootstrap: str | None, admin: Any) -> None:
        self.kind = kind
        self.root = root
        self.topic = topic
        self.bootstrap = bootstrap
        self.admin = admin
        self.opened: list[Log] = []
        self._partitions: dict[str, int] = {}

    def open(self, partitions: int = 1, name: str = "main") -> Log:
        self._partitions.setdefault(name, partitions)
        log: Log
        if self.kind == "local":
            log = LocalLog(self.root / name, partitions=self._partitions[name])
        else:
            assert self.bootstrap is not None
            log = KafkaLog(
                self.bootstrap, f"{self.topic}-{name}", partitions=self._partitions[name], timeout=TIMEOUT
            )
        self.opened.append(log)
        return log

    def reopen(self, log: Log, name: str = "main") -> Log:
        if self.kind == "local":
            log.close()
        return self.open(name=name)

    def log_with_start_moved(self) -> tuple[Log, int]:
        """Return a log and a position below partition 0's log start offset.

        Kafka refuses to delete records from a topic that is only compacted,
        so this topic is ``cleanup.policy=compact,delete`` (which KafkaLog
        accepts only when told to); its records are deleted up to offset 2,
        so 1 is below the start. The embedded log's start never moves
        (compaction keeps the base offset of every segment), so there the
        only position below it is a negative one.
        """
        if self.kind == "local":
            log = self.open()
            append(log, [(b"a", b"1")])
            return log, -1
        assert self.bootstrap is not None
        kafka_log = KafkaLog(
            self.bootstrap,
            f"{self.topic}-start-moved",
            topic_config={"cleanup.policy": "compact,delete"},
            allow_non_compacted=True,
            timeout=TIMEOUT,
        )
        self.opened.append(kafka_log)
        append(kafka_log, [(b"a", b"1"), (b"a", b"2"), (b"a", b"3")])
        self.admin.delete_records({TopicPartition(kafka_log.topic, 0): 2}, timeout_ms=int(TIMEOUT * 1000))
        assert kafka_log.begin_offsets() == {0: 2}
        return kafka_log, 1

    def close(self) -> None:
        for log in self.opened:
            log.close()


@pytest.fixture(params=["local", pytest.param("kafka", marks=pytest.mark.kafka)])
def any_log(request: pytest.FixtureRequest, tmp_path: Path, topic: str) -> Iterator[LogHarness]:
    """A :class:`LogHarness` for the embedded log, then for a fresh compacted Kafka topic."""
    if request.param == "kafka":
        bootstrap = request.getfixturevalue("bootstrap")
        admin = request.getfixturevalue("admin")
    else:
        bootstrap = admin = None
    harness = LogHarness(request.param, tmp_path / "logs", topic, bootstrap, admin)
    yield harness
    harness.close()


def read_until(reader: LogReader, targets: Mapping[int, int], deadline: float = READ_DEADLINE) -> list[Row]:
    """Poll ``reader`` until every partition's position reaches ``targets``; return what it read."""
    rows: list[Row] = []
    give_up = time.monotonic() + deadline
    while any(reader.positions()[p] < target for p, target in targets.items()):
        assert time.monotonic() < give_up, (
            f"the reader did not reach {dict(targets)} in {deadline}s: at {reader.positions()}"
        )
        rows.extend(row(r) for r in reader.poll(0.2, 1000))
    return rows


def read_log(log: Log, positions: Mapping[int, int] | None = None) -> list[Row]:
    """Every record from ``positions`` (default: the log start) to the current end offsets."""
    reader = log.open_reader(log.begin_offsets() if positions is None else positions)
    try:
        return read_until(reader, log.end_offsets())
    finally:
        reader.close()


def append(log: Log, records: Sequence[tuple[bytes, bytes | None]]) -> list[tuple[int, int]]:
    return log.append(records, timeout=TIMEOUT)


def open_and_poll(log: Log, positions: Mapping[int, int], deadline: float = 10.0) -> None:
    """Open a reader at ``positions`` and poll it until it raises or ``deadline`` passes.

    A log may refuse a bad position when the reader opens (the embedded log)
    or when it first fetches (Kafka); either is conformant.
    """
    reader = log.open_reader(positions)
    try:
        give_up = time.monotonic() + deadline
        while time.monotonic() < give_up:
            reader.poll(0.2, 100)
    finally:
        reader.close()


class TestIdentity:
    def test_identity_names_the_kind_and_the_partitions(self, any_log: LogHarness) -> None:
        log = any_log.open(partitions=3)
        identity = log.identity()
        assert identity["kind"] == log.kind == any_log.kind
        assert identity["partitions"] == log.partitions == 3

    def test_identity_is_stable_across_reopen(self, any_log: LogHarness) -> None:
        log = any_log.open(partitions=2)
        before = log.identity()
        append(log, [(b"k", b"v")])
        again = any_log.reopen(log)
        assert again.identity() == before
        assert again.partitions == 2

    def test_another_log_has_another_identity(self, any_log: LogHarness) -> None:
        """What lets a cache tell that it mirrors another log (docs/design.md, "Invariants", 5)."""
        assert any_log.open().identity() != any_log.open(name="other").identity()

    def test_describe_and_tombstone_retention(self, any_log: LogHarness) -> None:
        log = any_log.open()
        assert isinstance(log.describe(), str) and log.describe()
        retention = log.tombstone_retention_seconds
        assert isinstance(retention, (int, float)) and retention > 0
        assert log.max_record_bytes is not None and log.max_record_bytes > 0


class TestAppend:
    def test_a_new_log_is_empty(self, any_log: LogHarness) -> None:
        log = any_log.open(partitions=3)
        assert log.begin_offsets() == log.end_offsets() == {0: 0, 1: 0, 2: 0}
        assert read_log(log) == []

    def test_offsets_grow_by_one_per_record_from_the_end_offset(self, any_log: LogHarness) -> None:
        log = any_log.open()
        assert append(log, [(b"a", b"1")]) == [(0, 0)]
        assert append(log, [(b"b", b"2"), (b"a", None), (b"c", b"")]) == [(0, 1), (0, 2), (0, 3)]
        assert log.end_offsets() == {0: 4}
        assert log.end_offsets(timeout=TIMEOUT) == {0: 4}
        assert log.begin_offsets() == {0: 0}
        assert append(log, [(b"d", b"4")]) == [(0, 4)]

    def test_an_empty_batch_appends_nothing(self, any_log: LogHarness) -> None:
        log = any_log.open()
        assert append(log, []) == []
        assert log.end_offsets() == {0: 0}

    def test_offsets_continue_after_reopen(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1"), (b"b", b"2")])
        again = any_log.reopen(log)
        assert again.end_offsets() == {0: 2}
        assert append(again, [(b"c", b"3")]) == [(0, 2)]
        assert [r[1:] for r in read_log(again)] == [(0, b"a", b"1"), (1, b"b", b"2"), (2, b"c", b"3")]

    def test_a_record_larger_than_max_record_bytes_is_refused_and_nothing_is_appended(
        self, any_log: LogHarness
    ) -> None:
        log = any_log.open()
        limit = log.max_record_bytes
        assert limit is not None
        append(log, [(b"before", b"x")])
        with pytest.raises(RecordTooLargeError):
            append(log, [(b"k", b"v" * limit)])  # key + value is one byte too many
        # One record too large spoils its whole batch, wherever it is.
        with pytest.raises(RecordTooLargeError):
            append(log, [(b"ok", b"fine"), (b"big", b"v" * limit), (b"ok2", b"fine")])
        assert log.end_offsets() == {0: 1}
        assert [r[2] for r in read_log(log)] == [b"before"]

    def test_a_record_of_exactly_max_record_bytes_is_accepted(self, any_log: LogHarness) -> None:
        log = any_log.open()
        limit = log.max_record_bytes
        assert limit is not None
        value = bytes(range(256)) * (limit // 256 + 1)
        value = value[: limit - 1]  # with the 1-byte key: exactly the limit
        assert append(log, [(b"k", value)]) == [(0, 0)]
        assert read_log(log) == [(0, 0, b"k", value)]


class TestRead:
    RECORDS: ClassVar[list[tuple[bytes, bytes | None]]] = [
        (b"a", b"1"),
        (b"b", b""),
        (b"a", None),
        (b"\x00\xff", b"\x00" * 100),
        (b"c", b"3"),
        (b"b", None),
        ("é".encode(), "ü".encode()),
        (b"a", b"again"),
    ]

    def test_a_reader_at_begin_reads_every_record_in_order_intact(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, self.RECORDS)
        rows = read_log(log)
        assert rows == [(0, i, k, v) for i, (k, v) in enumerate(self.RECORDS)]
        assert [v is None for *_, v in rows].count(True) == 2, "tombstones read back as value None"

    def test_a_reader_at_a_middle_position_reads_from_there(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, self.RECORDS)
        rows = read_log(log, {0: 3})
        assert rows == [(0, i, k, v) for i, (k, v) in enumerate(self.RECORDS) if i >= 3]

    def test_a_reader_at_the_end_reads_nothing(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, self.RECORDS)
        assert read_log(log, log.end_offsets()) == []

    def test_positions_reach_the_end_offsets_after_reading_everything(self, any_log: LogHarness) -> None:
        """What "caught up" means: the position of every partition equals its end offset."""
        log = any_log.open(partitions=3)
        append(log, [(f"key{i}".encode(), b"v") for i in range(30)])
        end = log.end_offsets()
        reader = log.open_reader(log.begin_offsets())
        try:
            assert reader.positions() == log.begin_offsets()
            rows = read_until(reader, end)
            assert reader.positions() == end
        finally:
            reader.close()
        assert len(rows) == sum(end.values()) == 30

    def test_max_records_bounds_a_poll(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, self.RECORDS)
        reader = log.open_reader({0: 0})
        try:
            rows: list[Row] = []
            give_up = time.monotonic() + READ_DEADLINE
            while len(rows) < len(self.RECORDS):
                assert time.monotonic() < give_up
                got = reader.poll(0.2, 3)
                assert len(got) <= 3
                rows.extend(row(r) for r in got)
        finally:
            reader.close()
        assert [r[1] for r in rows] == list(range(len(self.RECORDS)))

    def test_poll_with_nothing_to_read_returns_empty_within_about_the_timeout(
        self, any_log: LogHarness
    ) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1")])
        reader = log.open_reader(log.end_offsets())
        try:
            for timeout in (0.0, 0.3):
                started = time.monotonic()
                assert list(reader.poll(timeout, 100)) == []
                assert time.monotonic() - started < timeout + POLL_SLACK
        finally:
            reader.close()

    def test_a_reader_sees_records_appended_after_it_opened(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, [(b"old", b"1")])
        reader = log.open_reader(log.end_offsets())
        try:
            assert list(reader.poll(0.0, 100)) == []
            append(log, [(b"new", b"2"), (b"gone", None)])
            rows = read_until(reader, {0: 3})
        finally:
            reader.close()
        assert rows == [(0, 1, b"new", b"2"), (0, 2, b"gone", None)]

    def test_a_waiting_poll_returns_when_a_record_arrives(self, any_log: LogHarness) -> None:
        """A poll blocked on an empty log wakes up for a record appended meanwhile, long before its timeout."""
        log = any_log.open()
        reader = log.open_reader({0: 0})
        # The first Kafka poll looks up metadata; get that out of the way.
        assert list(reader.poll(0.2, 100)) == []
        got: list[Any] = []
        poller = threading.Thread(target=lambda: got.extend(reader.poll(READ_DEADLINE, 100)))
        try:
            started = time.monotonic()
            poller.start()
            append(log, [(b"k", b"v")])
            poller.join(READ_DEADLINE + POLL_SLACK)
            assert not poller.is_alive()
            assert [row(r) for r in got] == [(0, 0, b"k", b"v")]
            assert time.monotonic() - started < READ_DEADLINE / 2
        finally:
            poller.join()
            reader.close()


class TestPositionOutOfRange:
    @pytest.mark.parametrize("past", [1, 100])
    def test_a_position_past_the_end_is_refused(self, any_log: LogHarness, past: int) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1"), (b"b", b"2")])
        with pytest.raises(PositionOutOfRangeError):
            open_and_poll(log, {0: 2 + past})

    def test_a_position_past_the_end_of_one_partition_is_refused(self, any_log: LogHarness) -> None:
        log = any_log.open(partitions=3)
        append(log, [(f"key{i}".encode(), b"v") for i in range(12)])
        end = log.end_offsets()
        with pytest.raises(PositionOutOfRangeError):
            open_and_poll(log, {**end, 1: end[1] + 5})

    def test_a_position_below_the_log_start_is_refused(self, any_log: LogHarness) -> None:
        log, below = any_log.log_with_start_moved()
        with pytest.raises(PositionOutOfRangeError):
            open_and_poll(log, {0: below})

    def test_a_negative_position_is_refused(self, any_log: LogHarness) -> None:
        """Below every log start: refused like any other position outside the log."""
        log = any_log.open()
        append(log, [(b"a", b"1")])
        with pytest.raises(PositionOutOfRangeError):
            open_and_poll(log, {0: -1})

    def test_the_end_and_the_begin_are_inside_the_log(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1"), (b"b", b"2")])
        open_and_poll(log, {0: 2}, deadline=0.5)
        open_and_poll(log, {0: 0}, deadline=0.5)


class TestPartitions:
    def test_records_of_one_key_land_in_one_partition_and_every_partition_is_read(
        self, any_log: LogHarness
    ) -> None:
        log = any_log.open(partitions=3)
        keys = [f"user:{i}".encode() for i in range(30)]
        where: dict[bytes, set[int]] = {}
        for round_ in range(3):
            batch = [(k, f"{round_}".encode()) for k in keys]
            for (key, _), (partition, _offset) in zip(batch, append(log, batch), strict=True):
                where.setdefault(key, set()).add(partition)
        assert all(len(partitions) == 1 for partitions in where.values()), where
        assert {p for partitions in where.values() for p in partitions} == {0, 1, 2}
        rows = read_log(log)
        assert {p for p, *_ in rows} == {0, 1, 2}
        assert len(rows) == 90
        for p in range(3):
            offsets = [o for q, o, *_ in rows if q == p]
            assert offsets == list(range(len(offsets))), f"partition {p} read out of order"
            assert {k for q, _, k, _ in rows if q == p} == {k for k, ps in where.items() if p in ps}
        assert log.end_offsets() == {p: sum(1 for q, *_ in rows if q == p) for p in range(3)}

    def test_a_batch_over_partitions_gets_consecutive_offsets_per_partition(
        self, any_log: LogHarness
    ) -> None:
        log = any_log.open(partitions=3)
        append(log, [(f"warm{i}".encode(), b"v") for i in range(9)])
        before = log.end_offsets()
        batch = [(f"key{i}".encode(), b"v") for i in range(20)]
        result = append(log, batch)
        for p in range(3):
            offsets = [o for q, o in result if q == p]
            assert offsets == list(range(before[p], before[p] + len(offsets)))
        assert log.end_offsets() == {p: before[p] + sum(1 for q, _ in result if q == p) for p in range(3)}


class TestClose:
    def test_close_is_idempotent_and_use_after_close_raises_closed_error(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1")])
        log.close()
        log.close()
        for use in (
            lambda: log.append([(b"b", b"2")], timeout=TIMEOUT),
            log.begin_offsets,
            log.end_offsets,
            lambda: log.open_reader({0: 0}),
        ):
            with pytest.raises(ClosedError):
                use()

    def test_reader_close_is_idempotent_and_poll_after_close_raises_closed_error(
        self, any_log: LogHarness
    ) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1")])
        reader = log.open_reader({0: 0})
        reader.close()
        reader.close()
        with pytest.raises(ClosedError):
            reader.poll(0.1, 10)

    def test_a_reader_of_a_closed_log_raises_closed_error(self, any_log: LogHarness) -> None:
        log = any_log.open()
        append(log, [(b"a", b"1")])
        reader = log.open_reader({0: 0})
        try:
            log.close()
            with pytest.raises(ClosedError):
                reader.poll(1.0, 10)
        finally:
            reader.close()


# -- KVLog over each log: one small mapping suite -------------------------------


@pytest.fixture
def open_kv(any_log: LogHarness, tmp_path: Path) -> Iterator[Callable[..., KVLog]]:
    """``open_kv()`` opens a KVLog at ``tmp_path/"kv"`` over the harness's kind of log.

    Embedded: ``KVLog(path)`` (the default, the log in ``path/log``). Kafka:
    the test's topic. The cache is in ``path/cache`` for both. Every store
    opened is closed at teardown.
    """
    opened: list[KVLog] = []

    def open_() -> KVLog:
        kwargs: dict[str, Any] = {}
        if any_log.kind == "kafka":
            kwargs = {"bootstrap_servers": any_log.bootstrap, "topic": any_log.topic, "timeout": TIMEOUT}
        kv = KVLog(tmp_path / "kv", **kwargs)
        opened.append(kv)
        return kv

    yield open_
    for kv in opened:
        kv.close()


class TestMapping:
    def test_set_get_contains_len_and_iteration_in_byte_order(self, open_kv: Callable[..., KVLog]) -> None:
        kv = open_kv()
        kv["order:42"] = {"status": "paid", "total": 12.5}
        kv["é"] = "two UTF-8 bytes"
        kv["Z"] = None
        kv[b"raw"] = b"\x00\x01"
        assert kv["order:42"] == {"status": "paid", "total": 12.5}
        assert kv["Z"] is None and "Z" in kv
        assert kv[b"raw"] == b"\x00\x01" and kv["raw"] == b"\x00\x01"
        assert "missing" not in kv and kv.get("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            kv["missing"]
        assert len(kv) == 4
        assert list(kv) == ["Z", "order:42", "raw", "é"]

    def test_del_writes_a_tombstone_and_missing_keys_raise(self, open_kv: Callable[..., KVLog]) -> None:
        kv = open_kv()
        kv["a"] = 1
        del kv["a"]
        assert "a" not in kv and len(kv) == 0
        with pytest.raises(KeyError):
            del kv["a"]
        assert sum(kv.log.end_offsets().values()) == 2, "the refused del wrote nothing"

    def test_scan_by_prefix_and_range(self, open_kv: Callable[..., KVLog]) -> None:
        kv = open_kv()
        kv.update({"user:1": 1, "user:2": 2, "users": 3, "order:1": 4, "user:10": 5})
        assert list(kv.scan("user:")) == [("user:1", 1), ("user:10", 5), ("user:2", 2)]
        assert list(kv.scan(start="user:10", stop="users")) == [("user:10", 5), ("user:2", 2)]
        assert list(kv.scan()) == sorted(kv.items())

    def test_update_later_pairs_win_and_clear_empties(self, open_kv: Callable[..., KVLog]) -> None:
        kv = open_kv()
        kv.update([("a", 1), ("b", 2), ("a", 3)], c=4)
        assert dict(kv.items()) == {"a": 3, "b": 2, "c": 4}
        kv.clear()
        assert len(kv) == 0 and list(kv) == []
        kv["d"] = 5
        assert dict(kv.items()) == {"d": 5}

    def test_reopen_is_warm_and_replays_nothing(self, open_kv: Callable[..., KVLog]) -> None:
        kv = open_kv()
        kv.update({f"k{i}": i for i in range(50)})
        del kv["k7"]
        expected = dict(kv.items())
        kv.close()
        kv = open_kv()
        assert kv.stats()["open_replay"]["mode"] == "warm"
        assert kv.stats()["open_replay"]["records"] == 0
        assert dict(kv.items()) == expected

    def test_losing_the_cache_rebuilds_it_from_the_log(
        self, open_kv: Callable[..., KVLog], tmp_path: Path
    ) -> None:
        kv = open_kv()
        kv.update({f"k{i}": i for i in range(50)})
        kv.update({f"k{i}": -i for i in range(0, 50, 3)})
        for i in range(0, 50, 5):
            del kv[f"k{i}"]
        expected = dict(kv.items())
        kv.close()
        shutil.rmtree(tmp_path / "kv" / "cache")
        kv = open_kv()
        replay = kv.stats()["open_replay"]
        assert replay["mode"] == "cold"
        assert replay["records"] == 50 + 17 + 10
        assert dict(kv.items()) == expected
        assert list(kv) == sorted(expected)

    def test_sync_of_a_caught_up_store_keeps_to_its_timeout(self, open_kv: Callable[..., KVLog]) -> None:
        """``sync(timeout)`` with nothing to replay returns at once, not after the follower's idle poll."""
        kv = open_kv()
        kv["a"] = 1
        started = time.monotonic()
        for _ in range(10):
            kv.sync(timeout=0.1)
        # Ten syncs, each allowed 0.1 s, take milliseconds together when each returns at once.
        assert time.monotonic() - started < 10 * 0.1
