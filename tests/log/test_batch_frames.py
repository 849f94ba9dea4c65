"""Batch frames in real logs: logs of the format before them, readers starting inside them, the msgpack flag.

A log written before batch frames existed (format 1: record frames only,
``log.json`` format 1) must keep opening, replaying, taking appends and
being compacted, with its old frames beside the new ones. The fixture
writes it with the format-1 encoder (``encode_frames``) that appends used
then, which is also what a format-1 compaction wrote. The segments are read
back independently of kvlog (``ondisk.frame_records``).
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import pytest
from _head import simulate_os_crash
from ondisk import frame_records

import kvlog.log.local as local_module
from kvlog import KVLog
from kvlog.log.base import Record
from kvlog.log.local import LocalLog
from kvlog.log.local.segments import encode_frames


def disk_frames(log_dir: Path, partition: int = 0) -> list[tuple[int, list[int], list[bytes | None]]]:
    """Every frame of a partition, in order: its flags, offsets and values (read without kvlog)."""
    frames = []
    for segment in sorted((log_dir / str(partition)).glob("*.log")):
        data = segment.read_bytes()
        assert data[:8] == b"KVLSEG1\n"
        pos = 8
        while pos < len(data):
            length, crc = struct.unpack_from("<II", data, pos)
            if length == 0:
                break  # preallocated space past the active segment's end
            body = data[pos + 8 : pos + 8 + length]
            assert zlib.crc32(body) == crc
            offsets, _keys, values = frame_records(body)
            frames.append((body[16], offsets, values))
            pos += 8 + length
    return frames


def read_all(log: LocalLog, start: dict[int, int] | None = None, chunk: int = 1000) -> list[Record]:
    """Every record from ``start`` (the log start by default) to the end, ``chunk`` per poll."""
    end = log.end_offsets()
    reader = log.open_reader(start if start is not None else log.begin_offsets())
    out: list[Record] = []
    try:
        for _ in range(100_000):
            if all(reader.positions()[p] >= end[p] for p in end):
                return out
            out.extend(reader.poll(1.0, chunk))
        pytest.fail("reading the log did not reach its end")
    finally:
        reader.close()
    return out


def value(i: int) -> bytes:
    return msgpack.packb({"n": i, "pad": "x" * (i % 13)})


def batches(count: int) -> Iterator[list[tuple[bytes, bytes | None]]]:
    """Appends of 1 to 9 records over 40 keys, with tombstones."""
    sizes = [5, 1, 9, 2, 7, 3]
    i = 0
    while i < count:
        size = sizes[i % len(sizes)]
        yield [
            (b"key-%02d" % (j % 40), None if j % 11 == 5 else value(j))
            for j in range(i, min(count, i + size))
        ]
        i += size


@pytest.fixture
def format_1_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Record]]:
    """A log as the format before batch frames wrote it: compacted, closed as after an OS crash."""
    log_dir = tmp_path / "old"
    with monkeypatch.context() as patch:
        # What append() wrote then: one record frame per record, only the last a batch end.
        patch.setattr(
            local_module,
            "encode_columns",
            lambda offset, keys, values, timestamp, position, index_at, **_: encode_frames(
                list(zip(keys, values, strict=True)), offset, timestamp, position, index_at
            ),
        )
        log = LocalLog(log_dir, segment_bytes=1024, background_compaction=False, fsync="never")
        try:
            for batch in batches(300):
                log.append(batch)
            log.compact()  # (a record frame is rewritten as one: the bytes format 1 wrote)
            records = read_all(log)
        finally:
            log.close()
    meta = json.loads((log_dir / "log.json").read_text())
    (log_dir / "log.json").write_text(json.dumps({**meta, "format": 1}))
    assert all(not flags & 4 for flags, _, _ in disk_frames(log_dir)), "the fixture wrote a batch frame"
    assert len(list((log_dir / "0").glob("*.log"))) > 3
    simulate_os_crash(log_dir)  # the open scans the active segment, of old frames
    return log_dir, records


def fold(records: Sequence[Record]) -> dict[bytes | None, bytes | None]:
    state: dict[bytes | None, bytes | None] = {}
    for record in records:
        if record.value is None:
            state.pop(record.key, None)
        else:
            state[record.key] = record.value
    return state


def test_a_format_1_log_opens_reads_appends_and_compacts(format_1_log: tuple[Path, list[Record]]) -> None:
    log_dir, old = format_1_log
    log = LocalLog(log_dir, segment_bytes=1024, background_compaction=False)
    try:
        assert log.recovery == {0: []}
        assert json.loads((log_dir / "log.json").read_text())["format"] == 2  # older kvlogs refuse it now
        assert read_all(log) == old
        # Appends go on in the active segment of old frames: batch frames after them.
        added: list[Record] = []
        for batch in batches(120):
            positions = log.append(batch)
            added += [Record(p, o, k, v) for (p, o), (k, v) in zip(positions, batch, strict=True)]
        assert read_all(log) == old + added
        kinds = {bool(flags & 4) for flags, _, _ in disk_frames(log_dir)}
        assert kinds == {True, False}
        # Readers starting at every offset, any poll size: the same records.
        begin, end = log.begin_offsets()[0], log.end_offsets()[0]
        everything = old + added
        for start in range(begin, end + 1, 7):
            for chunk in (1, 3, 1000):
                assert read_all(log, {0: start}, chunk) == [r for r in everything if r.offset >= start]
        log.compact()
        assert fold(read_all(log)) == fold(everything)
    finally:
        log.close()
    simulate_os_crash(log_dir)
    log = LocalLog(log_dir, segment_bytes=1024, background_compaction=False)
    try:
        assert log.recovery == {0: []}
        assert fold(read_all(log)) == fold(everything)
    finally:
        log.close()


def test_a_store_replays_a_format_1_log_and_writes_on(format_1_log: tuple[Path, list[Record]]) -> None:
    log_dir, old = format_1_log
    expected = {
        k.decode(): msgpack.unpackb(v) for k, v in fold(old).items() if k is not None and v is not None
    }
    kv = KVLog(log_dir.parent / "store", log=LocalLog(log_dir, background_compaction=False))
    try:
        assert dict(kv) == expected
        kv.update({f"new-{i}": i for i in range(50)})
        assert dict(kv) == {**expected, **{f"new-{i}": i for i in range(50)}}
    finally:
        kv.close()


def test_a_torn_batch_frame_after_format_1_frames_is_cut(format_1_log: tuple[Path, list[Record]]) -> None:
    """Recovery of an active segment holding both kinds: a batch frame torn at any byte leaves the old frames."""
    log_dir, old = format_1_log
    log = LocalLog(log_dir, segment_bytes=1 << 20, background_compaction=False)
    try:
        log.append([(b"whole", b"1"), (b"batch", b"2")])
        segment = sorted((log_dir / "0").glob("*.log"))[-1]
        size = segment.stat().st_size
        log.append([(b"torn-%d" % i, b"v" * i) for i in range(6)])
    finally:
        log.close()
    torn_size = segment.stat().st_size
    pristine = segment.read_bytes()
    for cut in range(size + 1, torn_size, 5):
        segment.write_bytes(pristine[:cut])
        simulate_os_crash(log_dir)
        log = LocalLog(log_dir, background_compaction=False)
        try:
            (entry,) = log.recovery[0]
            assert entry["truncated_bytes"] == cut - size
            assert (
                "incomplete" in entry["reason"] and "record(s) of an incomplete batch" not in entry["reason"]
            )
            assert [r.key for r in read_all(log)[-2:]] == [b"whole", b"batch"]
            assert read_all(log)[:-2] == old
        finally:
            log.close()
        assert segment.stat().st_size == size


def test_a_reader_starts_inside_a_batch_frame(tmp_path: Path) -> None:
    """At every offset of appends of many records, with polls that end inside frames and gaps compaction left."""
    log = LocalLog(tmp_path, segment_bytes=1024, background_compaction=False, fsync="never")
    try:
        for round_ in range(6):
            log.append([(b"k%d" % (i % 30), b"%d:%d" % (round_, i)) for i in range(45)])
            log.append([(b"k%d" % i, None) for i in range(round_, 30, 7)])
        log.compact()  # batch frames with gaps in their offsets
        assert any(flags & 8 for flags, _, _ in disk_frames(tmp_path)), "no batch frame with gaps"
        everything = read_all(log)
        begin, end = log.begin_offsets()[0], log.end_offsets()[0]
        for start in range(begin, end + 1):
            for chunk in (1, 4, 1000):
                assert read_all(log, {0: start}, chunk) == [r for r in everything if r.offset >= start], (
                    start,
                    chunk,
                )
    finally:
        log.close()


def test_a_store_flags_its_values_and_replay_checks_only_the_others(tmp_path: Path) -> None:
    """The msgpack-values flag (16): set on what a store with the msgpack codec writes, never on others.

    Replay skips the value check only for flagged frames: a foreign bad value
    appended through the log is still quarantined, and compaction keeps each
    record's flag.
    """
    path = tmp_path / "data"
    kv = KVLog(path, log=LocalLog(path / "log", segment_bytes=1024, background_compaction=False))
    try:
        kv.update({f"k{i}": {"i": i} for i in range(40)})
        kv["single"] = [1, 2]
        # \xc1 is never msgpack; the first "fine" is superseded at once, so that compaction
        # rewrites this frame.
        foreign = [(b"foreign", b"\xc1"), (b"fine", msgpack.packb(-2)), (b"fine", msgpack.packb(-3))]
        assert kv.log.append(foreign)
        kv.update({f"k{i}": {"again": i} for i in range(0, 40, 3)})
        kv.update({f"later{i}": i for i in range(60)})  # the foreign records' segment is closed
        kv.sync()
    finally:
        kv.close()
    flagged = {v: bool(flags & 16) for flags, _, values in disk_frames(path / "log") for v in values}
    assert flagged[b"\xc1"] is False and flagged[msgpack.packb(-3)] is False
    assert flagged[msgpack.packb([1, 2])] and flagged[msgpack.packb({"i": 1})]
    log = LocalLog(path / "log", segment_bytes=1024, background_compaction=False)
    try:
        assert log.compact()["segments_rewritten"] >= 1
    finally:
        log.close()
    after = {v: bool(flags & 16) for flags, _, values in disk_frames(path / "log") for v in values}
    assert msgpack.packb(-2) not in after, "the frame of the foreign records was not rewritten"
    assert after[b"\xc1"] is False and after[msgpack.packb(-3)] is False
    assert after[msgpack.packb([1, 2])] and after[msgpack.packb({"i": 1})]
    shutil.rmtree(path / "cache")  # a cold replay of all of it
    kv = KVLog(path)
    try:
        assert kv.open_replay["mode"] == "cold"
        assert kv.stats()["records_quarantined"] == 1
        assert "foreign" not in kv and kv["fine"] == -3 and kv["single"] == [1, 2]
        assert kv["k3"] == {"again": 3} and kv["k4"] == {"i": 4}
    finally:
        kv.close()
