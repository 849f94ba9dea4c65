"""Compaction of the embedded log keeps what a replay gives (docs/design.md, "Invariants", 3), and keeps offsets.

The oracle is an uncompacted twin: every operation goes to a compacted log
and to a plain one with the same settings, and to a dict model. A compacted
log must fold to the model and to the plain log's fold, hold a subset of the
plain log's records at the very same offsets, keep the newest record of
every key, and drop a tombstone only once nothing older of its key is left.

Then the parts that move while compaction runs: background compaction under
a writer and a following store, readers in the middle of a segment that
compaction replaces, and the on-disk states a crash during a compaction
leaves (a ``.cleaned`` file before the commit point, a ``.swap`` after it).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
from _head import simulate_os_crash
from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from ondisk import frame_records
from strategies import LOG_KEYS, log_operations

from kvlog import ClosedError, KVLog
from kvlog.codec import get_codec
from kvlog.log import LogReader
from kvlog.log.local import LocalLog

#: The smallest segment LocalLog accepts: a few records roll one.
SEGMENT_BYTES = 1024

#: Seconds a reader gets to read what the log holds (it takes milliseconds).
READ_DEADLINE = 10.0

#: Long enough that no tombstone of a test expires.
KEEP_TOMBSTONES = 3600.0

MSGPACK = get_codec("msgpack")

#: (partition, offset, key, value) of one record.
Row = tuple[int, int, bytes, bytes | None]


def open_log(path: Path, **options: Any) -> LocalLog:
    """A log with small segments and no background compaction (the test compacts), unless told otherwise."""
    options.setdefault("segment_bytes", SEGMENT_BYTES)
    options.setdefault("background_compaction", False)
    return LocalLog(path, **options)


def drain(reader: LogReader, end: Mapping[int, int]) -> list[Row]:
    """Read until every position reaches ``end``."""
    rows: list[Row] = []
    give_up = time.monotonic() + READ_DEADLINE
    while any(reader.positions()[p] < e for p, e in end.items()):
        assert time.monotonic() < give_up, (
            f"the reader is stuck at {reader.positions()}, short of {dict(end)}"
        )
        rows.extend((r.partition, r.offset, r.key, r.value) for r in reader.poll(5.0, 10_000))
    return rows


def read_exactly(reader: LogReader, n: int) -> list[Row]:
    """Read ``n`` records (the log must hold them), asking for no more than are still wanted."""
    rows: list[Row] = []
    give_up = time.monotonic() + READ_DEADLINE
    while len(rows) < n:
        assert time.monotonic() < give_up, (
            f"the reader is stuck at {reader.positions()} after {len(rows)} records"
        )
        rows.extend((r.partition, r.offset, r.key, r.value) for r in reader.poll(5.0, n - len(rows)))
    return rows


def read_all(log: LocalLog) -> list[Row]:
    """Every record the log holds, from its start to its end offsets."""
    reader = log.open_reader(log.begin_offsets())
    try:
        return drain(reader, log.end_offsets())
    finally:
        reader.close()


def fold(rows: Iterable[tuple[Any, ...]]) -> dict[bytes, bytes]:
    """What a replay makes of ``(…, key, value)`` rows: each key's last value; a tombstone deletes."""
    folded: dict[bytes, bytes | None] = {}
    for *_, key, value in rows:
        folded[key] = value
    return {k: v for k, v in folded.items() if v is not None}


def newest(rows: Iterable[Row]) -> dict[bytes, Row]:
    """The newest record of every key (keys go to one partition, so offsets order them)."""
    latest: dict[bytes, Row] = {}
    for r in rows:
        if r[2] not in latest or r[1] > latest[r[2]][1]:
            latest[r[2]] = r
    return latest


def total_bytes(log: LocalLog) -> int:
    return sum(p["bytes"] for p in log.stats()["partitions"].values())


def check_in_order(rows: list[Row]) -> None:
    """Per partition, a reader delivers strictly increasing offsets (no record twice)."""
    by_partition: dict[int, list[int]] = {}
    for p, offset, _, _ in rows:
        by_partition.setdefault(p, []).append(offset)
    for p, offsets in by_partition.items():
        assert offsets == sorted(set(offsets)), f"partition {p} read out of order or twice: {offsets}"


def check_compacted(compacted: LocalLog, plain: LocalLog, model: Mapping[bytes, bytes]) -> list[Row]:
    """What a compacted log must hold, given its uncompacted twin; returns its records."""
    kept, everything = read_all(compacted), read_all(plain)
    check_in_order(kept)
    assert compacted.end_offsets() == plain.end_offsets()
    assert compacted.begin_offsets() == plain.begin_offsets()
    # A subset of the very same (partition, offset, key, value): offsets are kept, records intact.
    assert set(kept) <= set(everything)
    assert fold(kept) == fold(everything) == model
    survivors = set(kept)
    keys_kept = {r[2] for r in kept}
    for key, record in newest(everything).items():
        if record[3] is not None:
            assert record in survivors, f"the newest value of {key!r} was compacted away"
        elif record not in survivors:
            # A tombstone may go only with everything older of its key.
            assert compacted.tombstone_retention < KEEP_TOMBSTONES
            assert key not in keys_kept, f"{key!r} lost its tombstone but kept an older record"
    return kept


def check_cleaned(log: LocalLog, rows: list[Row]) -> None:
    """Right after ``compact()``: below each partition's cleaned offset only the newest record of each key is left."""
    latest = newest(rows)
    for p, info in log.stats()["partitions"].items():
        for q, offset, key, _ in rows:
            if q == p and offset < info["cleaned_to"]:
                assert latest[key][1] == offset, f"offset {offset} of {key!r} is superseded but was kept"


def exact_dirty_ratio(log: LocalLog, p: int) -> float:
    """What :meth:`LocalLog.dirty_ratio` estimates, counted from every record: superseded bytes of closed segments.

    For a log whose tombstones are all within the retention (none expired).
    """
    bases = sorted(int(f.name[:-4]) for f in (log.path / str(p)).glob("*.log"))
    closed_bytes = sum((log.path / str(p) / f"{b:020d}.log").stat().st_size for b in bases[:-1])
    rows = [r for r in read_all(log) if r[0] == p]
    latest = newest(rows)
    sizes = record_sizes(log.path / str(p))
    superseded = sum(
        sizes[offset] for _, offset, key, _ in rows if offset < bases[-1] and latest[key][1] != offset
    )
    return superseded / closed_bytes if closed_bytes else 0.0


#: The most bytes of a batch frame that none of its records counts (see record_sizes): its
#: length and CRC, fixed fields, the headers of its two columns, and an offsets column.
_BATCH_FRAME_FIXED = 8 + 29 + 5 + 5 + 64


def batch_frames(directory: Path) -> int:
    """How many batch frames the segments of a partition hold."""
    count = 0
    for segment in directory.glob("*.log"):
        data = segment.read_bytes()
        pos = 8
        while pos < len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            if length == 0:
                break  # space preallocated past the active segment's end
            count += bool(data[pos + 24] & 4)
            pos += 8 + length
    return count


def record_sizes(directory: Path) -> dict[int, int]:
    """The bytes each record of a partition takes on disk, by offset, read from its segments.

    A record frame's record takes its whole frame; a batch frame's, its key
    and value as msgpack bins (the frame's fixed fields are shared, not counted).
    """
    sizes: dict[int, int] = {}
    for segment in sorted(directory.glob("*.log")):
        data = segment.read_bytes()
        pos = 8
        while pos < len(data):
            (length,) = struct.unpack_from("<I", data, pos)
            if length == 0:
                break  # space preallocated past the active segment's end
            body = data[pos + 8 : pos + 8 + length]
            offsets, keys, values = frame_records(body)
            for offset, key, value in zip(offsets, keys, values, strict=True):
                batched = body[16] & 4
                sizes[offset] = len(msgpack.packb(key)) + len(msgpack.packb(value)) if batched else 8 + length
            pos += 8 + length
    return sizes


def check_dirty_ratio(log: LocalLog) -> None:
    """For a log of few keys (the tests' logs) the dirty ratio is exact."""
    for p in range(log.partitions):
        assert log.dirty_ratio(p) == pytest.approx(exact_dirty_ratio(log, p), abs=1e-9), p


# -- equivalence, for any sequence of operations --------------------------------


class Twins:
    """A compacted log, its uncompacted twin, a model, and a reader that stays open throughout."""

    def __init__(self, root: Path, partitions: int, retention: float) -> None:
        self.options = {"partitions": partitions, "tombstone_retention": retention, "fsync": "never"}
        self.path = root / "compacted"
        self.compacted = open_log(self.path, **self.options)
        self.plain = open_log(root / "plain", **self.options)
        self.model: dict[bytes, bytes] = {}
        self.reader = self.compacted.open_reader(self.compacted.begin_offsets())
        self.read: list[Row] = []

    def append(self, records: list[tuple[bytes, bytes | None]]) -> None:
        assert self.compacted.append(records) == self.plain.append(records)
        for key, value in records:
            if value is None:
                self.model.pop(key, None)
            else:
                self.model[key] = value

    def append_one(self, key: bytes, value: bytes | None) -> None:
        """One record through the single write's own path (``append_one``) on the compacted log."""
        p, offset, _ = self.compacted.append_one(key, value)
        assert [(p, offset)] == self.plain.append([(key, value)])
        if value is None:
            self.model.pop(key, None)
        else:
            self.model[key] = value

    def compact(self) -> None:
        keep_tombstones = self.compacted.tombstone_retention >= KEEP_TOMBSTONES
        if keep_tombstones:
            check_dirty_ratio(self.compacted)
        report = self.compacted.compact()
        rows = check_compacted(self.compacted, self.plain, self.model)
        check_cleaned(self.compacted, rows)
        assert report["records_after"] <= report["records_before"]
        assert report["bytes_after"] <= report["bytes_before"]
        if keep_tombstones:
            assert report["tombstones_dropped"] == 0
            check_dirty_ratio(self.compacted)
            assert all(self.compacted.dirty_ratio(p) == 0.0 for p in range(self.compacted.partitions))

    def reopen(self) -> None:
        """Close the compacted log and open its directory again; the reader resumes where it was."""
        positions = self.reader.positions()
        self.reader.close()
        self.compacted.close()
        self.compacted = open_log(self.path, **self.options)
        self.reader = self.compacted.open_reader(positions)
        if self.compacted.tombstone_retention >= KEEP_TOMBSTONES:
            check_dirty_ratio(self.compacted)

    def read_some(self, n: int) -> None:
        self.read.extend((r.partition, r.offset, r.key, r.value) for r in self.reader.poll(0.0, n))

    def close(self) -> None:
        self.reader.close()
        self.compacted.close()
        self.plain.close()


@settings(max_examples=settings.default.max_examples * 10)
@given(
    ops=log_operations(),
    partitions=st.integers(1, 3),
    drop_tombstones=st.booleans(),
)
def test_compaction_at_any_point_replays_to_the_same_dict(
    ops: list[tuple[Any, ...]], partitions: int, drop_tombstones: bool
) -> None:
    """Puts, deletes and batches, compacted at any point (and reopened), replay like the uncompacted log.

    With ``drop_tombstones`` the retention is 0, so compaction drops every
    tombstone it can. A reader opened at the start and read a little at a
    time across compactions and reopens folds to the model too, as long as
    tombstones are kept (a reader that lags behind the tombstone retention
    may miss a delete: that is what the retention is for).
    """
    with tempfile.TemporaryDirectory() as tmp:
        twins = Twins(Path(tmp), partitions, 0.0 if drop_tombstones else KEEP_TOMBSTONES)
        try:
            for op in ops:
                if op[0] == "put":
                    twins.append_one(op[1], op[2])
                elif op[0] == "delete":
                    twins.append_one(op[1], None)
                elif op[0] == "batch":
                    twins.append(op[1])
                elif op[0] == "compact":
                    twins.compact()
                elif op[0] == "reopen":
                    twins.reopen()
                else:
                    twins.read_some(op[1])
            twins.compact()
            twins.read.extend(drain(twins.reader, twins.compacted.end_offsets()))
            check_in_order(twins.read)
            assert set(twins.read) <= set(read_all(twins.plain))
            assert twins.reader.positions() == twins.plain.end_offsets()
            if not drop_tombstones:
                assert fold(twins.read) == twins.model
            # And a store replaying the compacted log from scratch holds the model.
            twins.reader.close()
            with KVLog(
                Path(tmp) / "kv", log=twins.compacted, codec="bytes", key_type=bytes, follow=False
            ) as kv:
                assert dict(kv.items()) == twins.model
        finally:
            twins.close()


# -- what compaction keeps, on fixed examples ------------------------------------


def write_history(log: LocalLog, versions: int = 10, keys: int = 5) -> list[Row]:
    """``versions`` rounds over ``keys`` keys (the last key deleted in every odd round); returns what was appended."""
    written: list[Row] = []
    for version in range(versions):
        batch: list[tuple[bytes, bytes | None]] = [
            (f"key{i}".encode(), f"{version}:{i}:".encode() + b"x" * 60) for i in range(keys)
        ]
        if version % 2:
            batch[-1] = (batch[-1][0], None)
        for (p, offset), (key, value) in zip(log.append(batch), batch, strict=True):
            written.append((p, offset, key, value))
    return written


def test_compaction_keeps_offsets_and_the_newest_record_of_every_key(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log")
    written = write_history(log)
    assert log.stats()["partitions"][0]["segments"] > 3
    report = log.compact()
    kept = read_all(log)
    active_base = log.stats()["partitions"][0]["cleaned_to"]
    assert 0 < active_base < log.end_offsets()[0]
    # Closed segments: exactly the newest record of each key they hold; the active one: untouched.
    latest_offsets = {r[1] for r in newest(written).values()}
    assert kept == [r for r in written if r[1] >= active_base or r[1] in latest_offsets]
    assert report["records_before"] - report["records_after"] == len(written) - len(kept)
    assert report["bytes_after"] < report["bytes_before"]
    assert fold(kept) == fold(written)
    assert log.end_offsets() == {0: len(written)}
    # Appends continue from the same end offset; the next compaction keeps the result.
    assert log.append([(b"key0", b"new")]) == [(0, len(written))]
    log.close()
    log = open_log(tmp_path / "log")
    assert read_all(log) == [*kept, (0, len(written), b"key0", b"new")]
    log.close()


def test_a_second_compaction_merges_small_segments_and_keeps_offsets(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log")
    write_history(log, versions=20)
    log.compact()
    first = read_all(log)
    segments = log.stats()["partitions"][0]["segments"]
    report = log.compact()
    assert report["segments_after"] < segments
    assert log.stats()["partitions"][0]["segments"] == report["segments_after"]
    assert read_all(log) == first
    log.close()


def test_compaction_of_a_closed_log_raises_closed_error(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log")
    log.close()
    with pytest.raises(ClosedError):
        log.compact()


def test_tombstones_are_kept_within_the_retention(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log", tombstone_retention=KEEP_TOMBSTONES)
    written = write_history(log)
    report = log.compact()
    assert report["tombstones_dropped"] == 0
    kept = read_all(log)
    deleted = written[-1]  # the last key's newest record is its tombstone from round 9
    assert deleted[3] is None and deleted in kept
    assert [r for r in kept if r[2] == deleted[2]] == [deleted], "older records of a deleted key go"
    log.close()


def test_tombstones_older_than_the_retention_are_dropped_with_everything_before_them(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log", tombstone_retention=0.0)
    log.append([(b"gone", b"1"), (b"gone", b"2"), (b"stays", b"3")])
    [(_, tombstone)] = log.append([(b"gone", None)])
    # Roll: the tombstone's segment closes.
    log.append([(f"filler{i}".encode(), b"f" * 100) for i in range(20)])
    appended_at = time.time()
    # Retention 0 means "older than now": let the millisecond clock move past the appends.
    wait_until(lambda: time.time() > appended_at + 0.002, what="the clock to move")
    assert log.stats()["partitions"][0]["cleaned_to"] == 0
    report = log.compact()
    assert report["tombstones_dropped"] == 1
    kept = read_all(log)
    assert [r for r in kept if r[2] == b"gone"] == []
    assert log.stats()["partitions"][0]["cleaned_to"] > tombstone
    assert fold(kept) == {b"stays": b"3", **{f"filler{i}".encode(): b"f" * 100 for i in range(20)}}
    log.close()


def test_a_tombstone_in_the_active_segment_is_never_dropped(tmp_path: Path) -> None:
    log = open_log(tmp_path / "log", tombstone_retention=0.0)
    log.append([(f"filler{i}".encode(), b"f" * 100) for i in range(20)])
    log.append([(b"k", b"v")])
    [(_, tombstone)] = log.append([(b"k", None)])
    appended_at = time.time()
    wait_until(lambda: time.time() > appended_at + 0.002, what="the clock to move")
    assert log.stats()["partitions"][0]["cleaned_to"] <= tombstone
    log.compact()
    assert (0, tombstone, b"k", None) in read_all(log)
    log.close()


def test_an_old_cache_is_rebuilt_rather_than_miss_a_dropped_tombstone(tmp_path: Path) -> None:
    """A cache closed before a delete whose tombstone compaction dropped does not keep the deleted key."""

    def store() -> KVLog:
        return KVLog(tmp_path / "kv", log=open_log(tmp_path / "kv" / "log", tombstone_retention=0.0))

    with store() as kv:
        kv.update({"a": 1, "b": 2})
    log = open_log(tmp_path / "kv" / "log", tombstone_retention=0.0)
    log.append([(b"a", None)])
    log.append([(f"filler{i}".encode(), b"\xa1f") for i in range(80)])  # msgpack "f"; rolls segments
    appended_at = time.time()
    wait_until(lambda: time.time() > appended_at + 0.002, what="the clock to move")
    assert log.compact()["tombstones_dropped"] == 1
    log.close()
    with store() as kv:
        assert "a" not in kv
        assert kv["b"] == 2 and len(kv) == 81
        assert kv.stats()["open_replay"]["mode"] == "cold"


# -- compaction while things move ------------------------------------------------------


def caught_up(kv: KVLog) -> bool:
    """Whether a following store applied everything its log holds (``sync()`` without driving it)."""
    return kv.stats()["total_lag"] == 0


def test_background_compaction_shrinks_the_log_under_a_writer_and_a_follower(tmp_path: Path) -> None:
    """With a small dirty ratio the log stays small while a writer overwrites, and a following store keeps up."""
    log = open_log(
        tmp_path / "log",
        partitions=2,
        background_compaction=True,
        min_cleanable_dirty_ratio=0.05,
    )
    writer = KVLog(tmp_path / "writer", log=log)
    follower = KVLog(tmp_path / "follower", log=log)
    model: dict[str, Any] = {}
    appended = 0
    rounds = iter(range(1_000_000))
    try:

        def shrunk() -> bool:
            nonlocal appended
            n = next(rounds)
            batch = {f"key{i}": f"{n}:{i}:" + "v" * 40 for i in range(20)}
            writer.update(batch)
            model.update(batch)
            appended += sum(len(k.encode()) + len(MSGPACK.encode(v)) for k, v in batch.items())  # at least
            wait_until(lambda: caught_up(follower), timeout=10, interval=0.005, what="the follower")
            assert dict(follower.items()) == model
            # Without compaction the log is larger than everything appended; and keep
            # writing for a while, so that compaction runs again and again under the writer.
            return n >= 60 and log.stats()["last_compaction"] is not None and total_bytes(log) < appended / 4

        wait_until(shrunk, timeout=60, interval=0.01, what="background compaction to shrink the log")
        writer.update({"last": "write"})
        model["last"] = "write"
        wait_until(lambda: caught_up(follower), timeout=10, interval=0.005, what="the follower")
        assert dict(follower.items()) == model
        assert dict(writer.items()) == model
        assert fold(read_all(log)) == {k.encode(): MSGPACK.encode(v) for k, v in model.items()}
    finally:
        writer.close()
        follower.close()


@pytest.mark.parametrize("read_before", [0, 1, 7, 40, 120])
def test_a_reader_in_the_middle_of_a_segment_continues_across_compaction(
    tmp_path: Path, read_before: int
) -> None:
    """A reader that read part of the log, then compaction rewrote and merged the segments, reads the rest right."""
    log = open_log(tmp_path / "log")
    written = write_history(log, versions=30)
    reader = log.open_reader({0: 0})
    try:
        first = read_exactly(reader, read_before)
        assert [r[1] for r in first] == list(range(read_before))
        log.compact()
        log.compact()  # the second pass merges the now small segments
        more = write_history(log, versions=2)
        log.compact()
        rest = drain(reader, log.end_offsets())
    finally:
        reader.close()
    everything = first + rest
    check_in_order(everything)
    assert set(everything) <= set(written + more)
    assert fold(everything) == fold(written + more)
    assert rest[-len(more) :] == more, "records appended after the compactions are all read"


def test_readers_keep_up_with_compactions_running_in_another_thread(tmp_path: Path) -> None:
    """Appends, reads and compactions at once: the reader sees a consistent log that folds to the model."""
    log = open_log(tmp_path / "log", partitions=2)
    stop = threading.Event()
    errors: list[BaseException] = []
    compactions = 0

    def compact_until_stopped() -> None:
        nonlocal compactions
        try:
            while not stop.is_set():
                log.compact()
                compactions += 1
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which fails with it
            errors.append(exc)

    compactor = threading.Thread(target=compact_until_stopped)
    reader = log.open_reader(log.begin_offsets())
    written: list[Row] = []
    read: list[Row] = []
    compactor.start()
    try:
        for round_ in range(150):
            batch: list[tuple[bytes, bytes | None]] = [
                (key, None if (round_ + i) % 7 == 0 else f"{round_}".encode() * 20)
                for i, key in enumerate(LOG_KEYS)
            ]
            written.extend((p, o, k, v) for (p, o), (k, v) in zip(log.append(batch), batch, strict=True))
            read.extend((r.partition, r.offset, r.key, r.value) for r in reader.poll(0.0, 5))
        read.extend(drain(reader, log.end_offsets()))
    finally:
        stop.set()
        compactor.join()
        reader.close()
    assert not errors, errors
    assert compactions > 0
    check_in_order(read)
    assert set(read) <= set(written)
    assert fold(read) == fold(written)
    assert fold(read_all(log)) == fold(written)
    log.close()


# -- a crash during compaction ------------------------------------------------------


def segment_bases(path: Path, p: int = 0) -> list[int]:
    return sorted(int(f.name[:-4]) for f in (path / str(p)).glob("*.log"))


def append_rows(log: LocalLog, batch: list[tuple[bytes, bytes | None]]) -> list[Row]:
    return [(p, o, k, v) for (p, o), (k, v) in zip(log.append(batch), batch, strict=True)]


def build_and_compact_a_copy(tmp_path: Path) -> tuple[Path, Path, list[Row]]:
    """A log with closed segments, and a copy of it that was compacted further.

    Each round writes two keys that stay (until some are overwritten or
    deleted later) and overwrites three hot ones, so compacted segments keep
    records. The original was compacted once, then written to again
    (overwriting and deleting keys of every third round), so the copy's
    compaction both removes records from the early segments and merges them.
    Returns the original's path, the copy's path, and every record ever
    appended. Both logs are closed, the original as an OS crash leaves it:
    with a head the next open cannot trust.
    """
    original, copy = tmp_path / "original", tmp_path / "copy"
    log = open_log(original)
    written: list[Row] = []
    for round_ in range(30):
        batch: list[tuple[bytes, bytes | None]] = [
            (f"stays{round_}:{i}".encode(), b"s" * 30) for i in range(2)
        ]
        batch += [(f"hot{i}".encode(), f"{round_}".encode() * 20) for i in range(3)]
        written += append_rows(log, batch)
    log.compact()
    for round_ in range(0, 30, 3):
        batch = [(f"stays{round_}:0".encode(), b"again"), (f"stays{round_}:1".encode(), None)]
        batch += [(f"hot{i}".encode(), f"late{round_}".encode() * 20) for i in range(3)]
        written += append_rows(log, batch)
    log.close()
    shutil.copytree(original, copy)
    simulate_os_crash(original)
    log = open_log(copy)
    log.compact()
    log.close()
    return original, copy, written


def contents(path: Path) -> list[Row]:
    """Every record of the closed log at ``path``; it is left closed as an OS crash leaves it."""
    log = open_log(path)
    try:
        return read_all(log)
    finally:
        log.close()
        simulate_os_crash(path)


def test_a_cleaned_file_left_by_a_crash_is_deleted_on_open_and_the_data_is_intact(tmp_path: Path) -> None:
    """Before the commit point (``<base>.cleaned`` written, not yet renamed) the old segments are the log."""
    original, copy, written = build_and_compact_a_copy(tmp_path)
    before = contents(original)
    bases = segment_bases(original)
    # The compacted copy's first segment is exactly what that compaction wrote as .cleaned;
    # the second one is left torn, as a crash in the middle of writing it leaves it.
    (original / "0" / f"{bases[0]:020d}.cleaned").write_bytes(
        (copy / "0" / f"{bases[0]:020d}.log").read_bytes()
    )
    torn = (copy / "0" / f"{bases[0]:020d}.log").read_bytes()
    (original / "0" / f"{bases[1]:020d}.cleaned").write_bytes(torn[: len(torn) // 2])
    log = open_log(original)
    try:
        assert list((original / "0").glob("*.cleaned")) == []
        assert segment_bases(original) == bases
        assert read_all(log) == before
        assert fold(before) == fold(written)
        assert log.append([(b"after", b"crash")]) == [(0, len(written))]
    finally:
        log.close()


@pytest.mark.parametrize("old_segments", ["all still there", "all but the first deleted"])
@pytest.mark.parametrize("crashed_in", ["first", "middle", "last"])
def test_a_committed_swap_left_by_a_crash_is_finished_on_open(
    tmp_path: Path, crashed_in: str, old_segments: str
) -> None:
    """After the commit point (``<base>-<end>.swap`` durable) an open finishes the swap.

    The crash state is built from the real compaction's output: a copy of
    the log compacted further gives the new segments. Groups before the
    crashed one are swapped already, the crashed one has its ``.swap``
    beside old segments, the ones after it were not compacted yet.
    """
    original, copy, written = build_and_compact_a_copy(tmp_path)
    before, after = contents(original), contents(copy)
    assert len(after) < len(before), "the copy's compaction removed records"
    old_bases, new_bases = segment_bases(original), segment_bases(copy)
    assert old_bases[-1] == new_bases[-1], "the active segment is not compacted"
    # Compaction rewrote every closed segment of the copy; a group is what one new segment replaced.
    groups = []
    for i, base in enumerate(new_bases[:-1]):
        end = new_bases[i + 1]
        groups.append((base, end, [b for b in old_bases if base <= b < end]))
    assert any(len(old) > 1 for _, _, old in groups), "the copy's compaction merged segments"
    merged = [i for i, (_, _, old) in enumerate(groups) if len(old) > 1]
    crashed = {"first": merged[0], "middle": merged[len(merged) // 2], "last": merged[-1]}[crashed_in]
    directory = original / "0"
    for i, (base, end, old) in enumerate(groups[: crashed + 1]):
        new = (copy / "0" / f"{base:020d}.log").read_bytes()
        if i < crashed:  # finished before the crash
            for b in old:
                (directory / f"{b:020d}.log").unlink()
            (directory / f"{base:020d}.log").write_bytes(new)
        else:
            (directory / f"{base:020d}-{end:020d}.swap").write_bytes(new)
            if old_segments == "all but the first deleted":
                for b in old[1:]:
                    (directory / f"{b:020d}.log").unlink()
    base, boundary = groups[crashed][:2]  # offsets below the boundary come from the swapped segments
    assert [r for r in after if base <= r[1] < boundary], "the swap holds records"
    assert [r for r in after if base <= r[1] < boundary] != [r for r in before if base <= r[1] < boundary]

    log = open_log(original)
    try:
        assert list(directory.glob("*.swap")) == []
        expected_bases = [b for b in new_bases if b < boundary] + [b for b in old_bases if b >= boundary]
        assert segment_bases(original) == expected_bases
        rows = read_all(log)
        assert rows == [r for r in after if r[1] < boundary] + [r for r in before if r[1] >= boundary]
        check_in_order(rows)
        assert set(rows) <= set(written)
        assert fold(rows) == fold(written)
        assert log.end_offsets() == {0: len(written)}
        # The log goes on: appends continue at the end, and the next compaction finishes the job.
        assert log.append([(b"after", b"crash")]) == [(0, len(written))]
        log.compact()
        assert fold(read_all(log)) == {**fold(written), b"after": b"crash"}
    finally:
        log.close()


# -- compaction does only the work there is ------------------------------------------


def files_of(path: Path, p: int = 0) -> dict[str, tuple[int, int, int]]:
    """Each segment file of partition ``p``: its inode, modification time and size."""
    return {
        f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size)
        for f in (path / str(p)).glob("*.log")
    }


def write_unique(log: LocalLog, count: int, start: int = 0) -> list[Row]:
    """``count`` keys never written before, in batches of 10 (no record supersedes another)."""
    rows: list[Row] = []
    for first in range(start, start + count, 10):
        batch: list[tuple[bytes, bytes | None]] = [
            (f"unique{i:06d}".encode(), b"v" * 80) for i in range(first, min(start + count, first + 10))
        ]
        rows += append_rows(log, batch)
    return rows


def test_compaction_of_a_log_without_superseded_keys_rewrites_nothing(tmp_path: Path) -> None:
    """Every key written once, no tombstones: a pass leaves every segment file as it is and says so."""
    path = tmp_path / "log"
    log = open_log(path)
    try:
        written = write_unique(log, 200)
        assert len(segment_bases(path)) > 5
        before = files_of(path)
        assert log.dirty_ratio(0) == 0.0
        report = log.compact()
        assert files_of(path) == before, "compaction rewrote segments where nothing changes"
        assert report["segments_rewritten"] == report["bytes_rewritten"] == 0
        assert (
            report["records_after"]
            == report["records_before"]
            == len(written) - sum(1 for r in written if r[1] >= segment_bases(path)[-1])
        )
        assert report["bytes_after"] == report["bytes_before"]
        assert report["segments_after"] == report["segments_before"] == len(before)
        assert read_all(log) == written
        assert log.stats()["partitions"][0]["cleaned_to"] == segment_bases(path)[-1]
    finally:
        log.close()


def test_compaction_rewrites_only_the_segments_where_something_changes(tmp_path: Path) -> None:
    """Overwriting keys of one closed segment rewrites that segment alone; the others keep their files."""
    path = tmp_path / "log"
    log = open_log(path)
    try:
        written = write_unique(log, 200)
        bases = segment_bases(path)
        target = bases[2]  # a closed segment in the middle
        keys = [r[2] for r in written if target <= r[1] < bases[3]]
        before = files_of(path)
        written += append_rows(log, [(k, b"new") for k in keys[:3]])
        report = log.compact()
        after = files_of(path)
        closed_before = {name for name in before if int(name[:-4]) < segment_bases(path)[-1]}
        changed = {name for name in closed_before if after.get(name) != before[name]}
        assert changed == {f"{target:020d}.log"}
        assert report["segments_rewritten"] == 1
        assert report["bytes_rewritten"] == before[f"{target:020d}.log"][2]
        assert report["records_before"] - report["records_after"] == 3
        assert fold(read_all(log)) == fold(written)
    finally:
        log.close()


def test_the_dirty_ratio_is_the_share_a_pass_removes_and_none_is_left_after_it(tmp_path: Path) -> None:
    """Superseded records and expired tombstones in closed segments, as a share of their bytes.

    Exact for a log of a few keys (it is estimated from a sample of keys for
    many). A pass removes exactly that, so the background cleaner, which
    compacts when the ratio reaches ``min_cleanable_dirty_ratio``, has
    nothing to come back for.
    """
    path = tmp_path / "log"
    log = open_log(path, tombstone_retention=0.0)
    try:
        written = write_unique(log, 100)
        written += append_rows(log, [(r[2], b"again") for r in written[5:40:3]])
        written += append_rows(log, [(r[2], None) for r in written[50:60]])
        written += write_unique(log, 60, start=100)  # roll the tombstones into closed segments
        appended_at = time.time()
        wait_until(lambda: time.time() > appended_at + 0.002, what="the clock to move")
        ratio = log.dirty_ratio(0)
        assert 0 < ratio < 1
        frames_before = batch_frames(path / "0")
        report = log.compact()
        assert report["tombstones_dropped"] == 10
        removed = report["bytes_before"] - report["bytes_after"]
        # Exact but for the fixed fields of batch frames, which their records share: a pass
        # may drop some (a frame all of whose records go) and write others (a batch frame's
        # records on either side of a record frame it keeps).
        slack = _BATCH_FRAME_FIXED * (frames_before + batch_frames(path / "0"))
        assert abs(ratio * report["bytes_before"] - removed) <= slack, (ratio, removed, slack)
        assert log.dirty_ratio(0) == 0.0
        assert fold(read_all(log)) == fold(written)
    finally:
        log.close()


@pytest.mark.parametrize("sample", ["kept", "stale", "missing", "garbage", "before a compaction"])
def test_the_dirty_ratio_survives_a_reopen(tmp_path: Path, sample: str) -> None:
    """Reopened after a clean close, after a crash, or without its sample file, the log knows its dirty ratio.

    The sample it is estimated from is saved with the log; when the saved
    one misses records (a crash after it was saved), does not describe the
    segments any more (a compaction after it) or is lost, the open counts
    again what it lacks.
    """
    path = tmp_path / "log"
    log = open_log(path)
    written = write_unique(log, 100)
    written += append_rows(log, [(r[2], b"again") for r in written[:30:2]])
    if sample == "before a compaction":
        log.close()
        saved = (path / "cleaner-sample.json").read_bytes()
        log = open_log(path)
        log.compact()
    elif sample == "stale":
        log.close()
        saved = (path / "cleaner-sample.json").read_bytes()
        log = open_log(path)
    written += append_rows(log, [(r[2], b"and again") for r in written[40:70:2]])
    written += write_unique(log, 30, start=100)
    expected = log.dirty_ratio(0)
    assert expected > 0
    log.close()
    if sample in ("stale", "before a compaction"):
        (path / "cleaner-sample.json").write_bytes(saved)
        simulate_os_crash(path)
    elif sample == "missing":
        (path / "cleaner-sample.json").unlink()
    elif sample == "garbage":
        (path / "cleaner-sample.json").write_bytes(b'{"format": 1, "partitions": {"0": {"level": "x"}}}')
    log = open_log(path)
    try:
        assert log.dirty_ratio(0) == pytest.approx(expected, abs=1e-9)
        assert fold(read_all(log)) == fold(written)
    finally:
        log.close()


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_sample_that_lacks_another_instances_records_counts_each_of_them_once(
    tmp_path: Path, partitions: int
) -> None:
    """Another instance's appends interleaved with this one's, across many segments, leave many pending ranges.

    ``dirty_ratio`` counts them (and only them: each read once, whatever the
    number of ranges) and is then exact; an instance that takes up the sample
    it saved counts nothing, and one without a saved sample counts everything.
    """
    path = tmp_path / "log"
    mine, theirs = open_log(path, partitions=partitions), open_log(path, partitions=partitions)
    try:
        for i in range(300):
            for log, name in ((mine, b"a"), (theirs, b"b")):
                key = b"%s%d" % (name, i % 25)  # overwritten: dirty
                log.append([(key, b"%d:" % i + b"v" * (i % 40))])
        mine.end_offsets()  # (takes up what the other instance appended: pending ranges)
        assert sum(len(mine._cleaner.samples[p].pending) for p in range(partitions)) > 50
        ratios = [mine.dirty_ratio(p) for p in range(partitions)]
        assert mine.stats()["cleaner"]["records_counted"] == 300
        for p in range(partitions):
            assert ratios[p] == pytest.approx(exact_dirty_ratio(mine, p), abs=1e-9)
            assert not mine._cleaner.samples[p].pending
        theirs.end_offsets()
        assert [theirs.dirty_ratio(p) for p in range(partitions)] == pytest.approx(ratios, abs=1e-9)
        assert theirs.stats()["cleaner"]["records_counted"] == 0
        assert theirs.stats()["cleaner"]["samples_adopted"] == partitions
    finally:
        mine.close()
        theirs.close()
    (path / "cleaner-sample.json").unlink()
    log = open_log(path)
    try:
        assert [log.dirty_ratio(p) for p in range(partitions)] == pytest.approx(ratios, abs=1e-9)
        assert log.stats()["cleaner"]["records_counted"] == 600
    finally:
        log.close()


def cleaner_idle(log: LocalLog, *, woken: bool = False) -> bool:
    """Whether the background cleaner handled every wake-up asked of it (and was woken, if ``woken``)."""
    cleaner = log.stats()["cleaner"]
    return bool(cleaner["handled"] == cleaner["wakeups"] and (cleaner["wakeups"] > 0 or not woken))


def test_a_clean_log_reopened_is_not_compacted_and_a_dirty_one_is(tmp_path: Path) -> None:
    """The background cleaner starts at an open, or after a roll, only if the dirty ratio says there is work."""
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for path in (clean, dirty):
        log = open_log(path)
        written = write_unique(log, 200)
        if path == dirty:
            append_rows(log, [(r[2], b"again") for r in written[:150]])
        log.close()
    active = f"{segment_bases(clean)[-1]:020d}.log"
    before = {n: f for n, f in files_of(clean).items() if n != active}  # the closed segments
    log = open_log(clean, background_compaction=True)
    try:
        assert log.stats()["cleaner"]["wakeups"] == 0  # the open did not wake it
        write_unique(log, 30, start=200)  # a roll wakes the cleaner, too
        wait_until(lambda: cleaner_idle(log, woken=True), timeout=30, what="the cleaner to handle the roll")
        assert log.last_compaction is None
    finally:
        log.close()
    assert {n: f for n, f in files_of(clean).items() if n in before} == before
    assert not (clean / "cleaner-checkpoint.json").exists(), "a compaction pass ran"
    log = open_log(dirty, background_compaction=True)
    try:
        wait_until(lambda: log.last_compaction is not None, timeout=30, what="the background compaction")
        assert log.dirty_ratio(0) < log.min_cleanable_dirty_ratio
    finally:
        log.close()


def test_the_report_compares_the_segments_the_pass_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments rolled while a pass runs are not in its report: ``bytes_after`` is what those records take now."""
    path = tmp_path / "log"
    log = open_log(path)
    try:
        written = write_unique(log, 150)
        written += append_rows(log, [(r[2], b"again") for r in written[:40]])
        snapshot_active = segment_bases(path)[-1]
        closed_bytes = sum(
            size for name, (_, _, size) in files_of(path).items() if int(name[:-4]) < snapshot_active
        )
        segment_frames = LocalLog._segment_frames
        late: list[Row] = []

        def appending_meanwhile(self: LocalLog, *args: Any) -> Any:
            if not late:  # the first read of the pass: segments roll while it runs
                late.extend(write_unique(log, 60, start=1000))
            return segment_frames(self, *args)

        monkeypatch.setattr(LocalLog, "_segment_frames", appending_meanwhile)
        report = log.compact()
        assert segment_bases(path)[-1] > snapshot_active, "segments rolled during the pass"
        looked_at = {n: f for n, f in files_of(path).items() if int(n[:-4]) < snapshot_active}
        assert report["bytes_before"] == closed_bytes
        assert report["bytes_after"] == sum(size for _, _, size in looked_at.values())
        assert report["bytes_after"] < report["bytes_before"]
        assert report["segments_after"] == len(looked_at) + 1
        assert fold(read_all(log)) == fold(written + late)
    finally:
        log.close()


# -- readers entering closed segments -----------------------------------------------------


def test_a_reader_reading_a_closed_segment_does_not_hold_up_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a reader reads the segment files of a reopened log, an append from another thread goes through.

    Every read of a file the reader does makes an append in another thread
    first (once) and waits for it: a reader that read while holding the
    log's lock would keep the append waiting.
    """
    import os

    import kvlog.log.local as local_module

    path = tmp_path / "log"
    log = open_log(path, segment_bytes=64 * 1024, fsync="never")
    write_unique(log, 3000)
    log.close()
    log = open_log(path, segment_bytes=64 * 1024, fsync="never")
    reading = threading.Event()
    outcomes: list[bool] = []

    def append_meanwhile() -> None:
        if reading.is_set() and not outcomes and threading.current_thread() is threading.main_thread():
            appender = threading.Thread(target=log.append, args=([(b"during", b"read")],))
            appender.start()
            appender.join(timeout=5.0)
            outcomes.append(not appender.is_alive())

    real_pread, real_open = os.pread, open

    def pread(fd: int, n: int, offset: int) -> bytes:
        append_meanwhile()
        return real_pread(fd, n, offset)

    def opening(*args: Any, **kwargs: Any) -> Any:
        append_meanwhile()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(local_module, "open", opening, raising=False)
    reader = log.open_reader({0: 0})
    try:
        reading.set()
        rows = read_exactly(reader, 100)
        reading.clear()
        assert outcomes == [True], "an append waited for a reader reading a segment file"
        assert [r[1] for r in rows] == list(range(100))
    finally:
        reading.clear()
        reader.close()
        log.close()


def test_readers_positioned_anywhere_in_closed_segments_read_from_there(tmp_path: Path) -> None:
    """After a reopen (no segment indexed yet), readers opened at any offset, in any order, read from it."""
    path = tmp_path / "log"
    log = open_log(path, segment_bytes=256 * 1024, fsync="never")
    written = write_unique(log, 8000)
    log.close()
    log = open_log(path, segment_bytes=256 * 1024, fsync="never")
    try:
        bases = segment_bases(path)
        assert len(bases) >= 3
        positions = [bases[1] + 1500, bases[1] + 10, bases[0], bases[1] + 1501, bases[1], bases[1] - 1]
        positions += [bases[2] - 3, 7999, 4321, 4320]
        for position in positions:
            reader = log.open_reader({0: position})
            try:
                wanted = min(50, len(written) - position)
                assert read_exactly(reader, wanted) == written[position : position + wanted], position
            finally:
                reader.close()
    finally:
        log.close()
