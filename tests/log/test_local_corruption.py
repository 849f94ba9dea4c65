"""Corruption of the embedded log and of the cache: damage the files, reopen, check the repair and the report.

Like CPython's ``test_dbm_sqlite3.CorruptDatabase``: each test builds a good
data directory, damages it the way a crash, a bad disk or a person would, and
states what opening it must do. The segments are read here with this module's
own parser of the format documented in :mod:`kvlog.log.local`, so the
expectations do not come from the code under test.

A crash whose damage an open must look for is simulated by leaving the
``head`` as an OS crash leaves it (written in an earlier boot, not marked
clean): only then, or when the active segment's size is not the one the head
published, does an open scan the tail. (A killed process loses nothing the
head does not describe: that is tests/log/test_local_processes.py.)

A repaired tail ends at the last whole record that ends an ``append()`` batch
(flag 2): the records of a batch that was torn or damaged part-way are cut
with it, whole as they may be (all or nothing per partition, as Kafka keeps a
producer batch whole).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _head import read_head, set_entry, simulate_os_crash, to_old_layout
from ondisk import cache_env_dir, frame_records

from kvlog import KVLog, LogCorruptError
from kvlog.codec import get_codec
from kvlog.log.local import LocalLog, encode_frame
from kvlog.log.local import segments as segment_format

MAGIC = b"KVLSEG1\n"
MSGPACK = get_codec("msgpack")

Record = tuple[int, bytes, bytes | None]  # offset, key, value (None: tombstone)


# -- reading segments independently of kvlog ------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A record of a segment, and where its frame lies (``position`` to ``end``; a batch frame's records share it).

    A record frame is ``u32 length | u32 crc | i64 offset | i64 timestamp |
    u8 flags | u32 key length | key | value``; a batch frame (flag 4) is
    ``u32 length | u32 crc | i64 first offset | i64 timestamp | u8 flags | u32
    count | u32 keys bytes | u32 values bytes | keys | values [| offsets]``.
    ``flags``: 1 = tombstone, 2 = the frame ends an ``append()`` batch: ``batch_end``
    is set on its last record.
    """

    position: int
    end: int
    offset: int
    key: bytes
    value: bytes | None
    batch_end: bool
    #: For a record of a batch frame: the byte sizes of its keys and values columns.
    columns: tuple[int, int] | None = None

    def field_at(self, position: int) -> str:
        """The name of the field of this record's frame the byte at file ``position`` belongs to."""
        start = self.position + 8
        names = [("length", self.position + 4), ("crc", start), ("offset", start + 8)]
        names += [("timestamp", start + 16), ("flags", start + 17)]
        if self.columns is None:
            names += [("key length", start + 21), ("key", start + 21 + len(self.key))]
        else:
            keys, values = self.columns
            names += [("count", start + 21), ("keys bytes", start + 25), ("values bytes", start + 29)]
            names += [("keys", start + 29 + keys), ("values", start + 29 + keys + values)]
        for name, stop in names:
            if position < stop:
                return name
        return "value" if self.columns is None else "offsets"


def read_frames(segment: Path) -> list[Frame]:
    """Every record of a good segment, in order (asserting that it is good)."""
    data = segment.read_bytes()
    assert data[:8] == MAGIC
    frames, pos = [], 8
    while pos < len(data):
        length, crc = struct.unpack_from("<II", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        assert len(body) == length and zlib.crc32(body) == crc, f"{segment} is damaged at {pos}"
        flags = body[16]
        offsets, keys, values = frame_records(body)
        columns = struct.unpack_from("<II", body, 21) if flags & 4 else None
        for i, (offset, key, value) in enumerate(zip(offsets, keys, values, strict=True)):
            ends = bool(flags & 2) and i == len(offsets) - 1
            frames.append(Frame(pos, pos + 8 + length, offset, key, value, ends, columns))
        pos += 8 + length
    return frames


@dataclass(frozen=True)
class Cut:
    """Where recovery cuts a segment whose frames are whole up to ``before`` (a file position).

    The cut point is the end of the last frame before ``before`` that ends a
    batch; the whole frames between it and ``before`` belong to a batch that
    did not end, and are cut with it.
    """

    good_end: int  # the file position the segment is cut back to
    last_good_offset: int | None  # the offset of the last record kept in this segment
    batch_records: int  # whole records of the unfinished batch cut with the tail

    @classmethod
    def of(cls, frames: list[Frame], before: int) -> Cut:
        """``frames``: the records of a segment (see :func:`read_frames`)."""
        whole = [f for f in frames if f.end <= before]
        ends = [f for f in whole if f.batch_end]
        good_end = ends[-1].end if ends else len(MAGIC)
        return cls(
            good_end,
            ends[-1].offset if ends else None,
            sum(1 for f in whole if f.position >= good_end),
        )

    def end_offset(self, base: int) -> int:
        """The end offset of the partition after the cut (``base``: the segment's base offset)."""
        return base if self.last_good_offset is None else self.last_good_offset + 1


def batch_suffix(records: int) -> str:
    """How the recovery reason ends when whole records of an unfinished batch were cut."""
    return f"; {records} record(s) of an incomplete batch cut with it"


def segments(log_dir: Path, partition: int = 0) -> list[Path]:
    return sorted((log_dir / str(partition)).glob("*.log"))


def base_of(segment: Path) -> int:
    return int(segment.name[:-4])


def simulate_crash(log_dir: Path) -> None:
    """Leave the log as an OS crash would: a head the next open cannot trust, so it scans."""
    simulate_os_crash(log_dir)


def flip(path: Path, position: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def build_log(
    log_dir: Path, count: int = 100, segment_bytes: int = 1024, frame_records: int = 3
) -> list[Record]:
    """A one-partition log of ``count`` records (overwrites, tombstones) over several small segments.

    Written in ``append()`` batches of 7, 1, 4, 2, 5, 3, 7, ... records; with
    the defaults the last segment ends with a batch of 7, one of 1 and one of 4.
    Batch frames hold at most ``frame_records`` records, so that a batch of
    more spans several frames (as one of more than BATCH_FRAME_RECORDS does):
    damage to one of them leaves whole frames of a batch that did not end.
    """
    local = LocalLog(log_dir, segment_bytes=segment_bytes, background_compaction=False)
    records: list[Record] = []
    sizes = itertools.cycle((7, 1, 4, 2, 5, 3))
    start = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment_format, "BATCH_FRAME_RECORDS", frame_records)
        while start < count:
            batch = [
                (b"key-%02d" % (i % 23), None if i % 9 == 4 else b"value-%03d-" % i + b"x" * (i % 17))
                for i in range(start, min(count, start + next(sizes)))
            ]
            for (_, offset), (key, value) in zip(local.append(batch), batch, strict=True):
                records.append((offset, key, value))
            start += len(batch)
    local.close()
    assert len(segments(log_dir)) >= 4
    return records


def read_all(local: LocalLog, start: int | None = None) -> list[Record]:
    """Every record of partition 0 from ``start`` (the log start by default) to the end."""
    end = local.end_offsets()[0]
    reader = local.open_reader({0: local.begin_offsets()[0] if start is None else start})
    out: list[Record] = []
    try:
        for _ in range(10_000):
            if reader.positions()[0] >= end:
                return out
            out.extend((r.offset, r.key, r.value) for r in reader.poll(1.0, 1000))  # type: ignore[misc]
        pytest.fail("reading the log did not reach its end")
    finally:
        reader.close()
    return out


def check_recovered(
    log_dir: Path,
    records: list[Record],
    segment: Path,
    end: int,
    entry: dict[str, Any] | None,
    label: str,
) -> None:
    """Open a damaged log and check the repair: report, end offset, older records, new appends."""
    local = LocalLog(log_dir, background_compaction=False)
    try:
        recovery = local.recovery[0]
        if entry is None:
            assert recovery == [], f"{label}: nothing to repair, yet recovery says {recovery}"
        else:
            assert len(recovery) == 1, f"{label}: {recovery}"
            got = recovery[0]
            assert got["segment"] == str(segment), label
            assert got["truncated_bytes"] == entry["truncated_bytes"], f"{label}: {got}"
            assert got["last_good_offset"] == entry["last_good_offset"], f"{label}: {got}"
            for words in entry["reason"]:
                assert any(w in got["reason"] for w in words), (
                    f"{label}: reason {got['reason']!r} lacks {words}"
                )
            batch_records = entry.get("batch_records", 0)
            if batch_records:
                assert got["reason"].endswith(batch_suffix(batch_records)), (
                    f"{label}: reason {got['reason']!r} does not end with {batch_suffix(batch_records)!r}"
                )
            else:
                assert "incomplete batch" not in got["reason"], (
                    f"{label}: reason {got['reason']!r} names records of an incomplete batch; there are none"
                )
        assert local.end_offsets() == {0: end}, label
        assert read_all(local) == [r for r in records if r[0] < end], f"{label}: an earlier record changed"
        assert local.append([(b"new", b"written after the repair")]) == [(0, end)], label
        assert read_all(local, end) == [(end, b"new", b"written after the repair")], label
    finally:
        local.close()
    reopened = LocalLog(log_dir, background_compaction=False)
    try:
        assert reopened.recovery[0] == [], f"{label}: the repaired log needed a second repair"
        assert read_all(reopened)[-1] == (end, b"new", b"written after the repair"), label
    finally:
        reopened.close()


@pytest.fixture
def pristine(tmp_path: Path) -> tuple[Path, list[Record]]:
    """A good log closed as after an OS crash (a head that is not trusted), and the records it holds."""
    log_dir = tmp_path / "pristine"
    records = build_log(log_dir)
    simulate_crash(log_dir)
    return log_dir, records


_COPY_NUMBERS = itertools.count()


def last_batches(log_dir: Path) -> tuple[Path, list[Frame], int, int, list[int]]:
    """The last segment, its frames, base offset and size, and the file positions worth damaging.

    The positions: every byte of the magic, and every byte from inside the
    last record of the third batch from the end to the end of the file.
    """
    last = segments(log_dir)[-1]
    frames = read_frames(last)
    ends = [f for f in frames if f.batch_end]
    assert len(ends) >= 3
    size = last.stat().st_size
    return last, frames, base_of(last), size, [*range(0, len(MAGIC)), *range(ends[-3].position, size)]


def copies(tmp_path: Path, pristine: Path) -> Iterator[Path]:
    """Fresh copies of the pristine log, one per damage (each removed when the next is made)."""
    while True:
        copy = tmp_path / f"copy-{next(_COPY_NUMBERS)}"
        shutil.copytree(pristine, copy)
        yield copy
        shutil.rmtree(copy)


# -- the batch-end flag ----------------------------------------------------------------------


class TestBatchFlag:
    """What the cut point of a repair rests on: which frames carry the batch-end flag (2)."""

    def test_append_flags_the_last_record_of_each_batch(self, tmp_path: Path) -> None:
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        flagged = [f.offset for s in segments(log_dir) for f in read_frames(s) if f.batch_end]
        ends, total = [], 0
        for size in itertools.cycle((7, 1, 4, 2, 5, 3)):
            if total >= len(records):
                break
            total = min(len(records), total + size)
            ends.append(total - 1)
        assert flagged == ends

    def test_compaction_flags_every_frame_it_writes(self, tmp_path: Path) -> None:
        log_dir = tmp_path / "log"
        build_log(log_dir)
        active_before = segments(log_dir)[-1].read_bytes()
        local = LocalLog(log_dir, segment_bytes=1024, background_compaction=False)
        try:
            report = local.compact()
        finally:
            local.close()
        assert report["records_after"] < report["records_before"]
        *closed, active = segments(log_dir)
        for segment in closed:
            frames = read_frames(segment)
            last_of_frame = {f.position: f for f in frames}  # (the last record of each frame)
            assert all(f.batch_end == (last_of_frame[f.position] is f) for f in frames)
        assert active.read_bytes() == active_before, "compaction rewrote the active segment"


# -- the last segment ----------------------------------------------------------------------


class TestDamagedTail:
    """Torn or corrupt tails of the last (active) segment are cut back to the end of the last whole batch.

    That is the last good record that ends an ``append()`` batch; good records
    of the batch the damage is in go with it, and the reason ends with
    ``"; N record(s) of an incomplete batch cut with it"``.
    """

    def test_last_segment_holds_several_batches(self, pristine: tuple[Path, list[Record]]) -> None:
        """The tests below cut and damage the last batches of the last segment: a batch of many records, one of one."""
        log_dir, _ = pristine
        frames = read_frames(segments(log_dir)[-1])
        ends = [i for i, f in enumerate(frames) if f.batch_end]
        sizes = [b - a for a, b in zip([-1, *ends], ends, strict=False)]
        assert sizes[-3:] == [7, 1, 4] and ends[-1] == len(frames) - 1, sizes
        # The batch of 7 spans three frames (3 + 3 + 1 records): damage can leave whole frames of a batch.
        assert len({f.position for f in frames[ends[-4] + 1 : ends[-3] + 1]}) == 3

    def test_truncation_anywhere_in_the_last_batches(
        self, tmp_path: Path, pristine: tuple[Path, list[Record]]
    ) -> None:
        """A torn tail is cut back to the end of the last whole batch: whole records of a torn batch go with it."""
        log_dir, records = pristine
        last, frames, base, size, cuts = last_batches(log_dir)
        for length, copy in zip(cuts, copies(tmp_path, log_dir), strict=False):
            segment = copy / "0" / last.name
            os.truncate(segment, length)
            label = f"last segment cut to {length} of {size} bytes"
            if length < len(MAGIC):
                entry = {
                    "truncated_bytes": length,
                    "last_good_offset": None,
                    "reason": [("torn segment header",)],
                }
                check_recovered(copy, records, segment, base, entry, label)
                continue
            cut = Cut.of(frames, length)
            if cut.good_end == length:
                check_recovered(copy, records, segment, cut.end_offset(base), None, label)
                continue
            # The first byte that is not part of a whole frame: a torn frame starts there, or the file ends.
            frames_end = max([len(MAGIC), *(f.end for f in frames if f.end <= length)])
            entry = {
                "truncated_bytes": length - cut.good_end,
                "last_good_offset": cut.last_good_offset,
                "reason": [("incomplete",), (f"position {frames_end}",)],
                "batch_records": cut.batch_records,
            }
            check_recovered(copy, records, segment, cut.end_offset(base), entry, label)

    def test_flipped_byte_anywhere_in_the_last_batches(
        self, tmp_path: Path, pristine: tuple[Path, list[Record]]
    ) -> None:
        """The damaged record, everything after it and the records of its batch before it are cut.

        As Kafka does, the segment is cut at the damage; and since a batch is
        kept whole or not at all, back to the end of the batch before it.
        """
        log_dir, records = pristine
        last, frames, base, size, positions = last_batches(log_dir)
        for i, (position, copy) in enumerate(zip(positions, copies(tmp_path, log_dir), strict=False)):
            mask = (0x01, 0x80, 0xFF)[i % 3]
            segment = copy / "0" / last.name
            flip(segment, position, mask)
            if position < len(MAGIC):
                label = f"magic byte {position} ^ {mask:#x}"
                entry: dict[str, Any] = {
                    "truncated_bytes": size,
                    "last_good_offset": None,
                    "reason": [("bad segment header",)],
                }
                check_recovered(copy, records, segment, base, entry, label)
                continue
            damaged = next(f for f in frames if f.position <= position < f.end)  # (its frame's first record)
            field = damaged.field_at(position)
            label = f"byte {position} ({field} of offset {damaged.offset}) ^ {mask:#x}"
            cut = Cut.of(frames, damaged.position)
            reasons: tuple[str, ...] = (
                ("impossible frame length", "incomplete", "CRC mismatch")
                if field == "length"
                else ("CRC mismatch",)
            )
            entry = {
                "truncated_bytes": size - cut.good_end,
                "last_good_offset": cut.last_good_offset,
                "reason": [reasons, (f"position {damaged.position}",)],
                "batch_records": cut.batch_records,
            }
            check_recovered(copy, records, segment, cut.end_offset(base), entry, label)

    def test_torn_segment_header(self, tmp_path: Path, pristine: tuple[Path, list[Record]]) -> None:
        """A last segment shorter than its magic (a crash while rolling) is reset; offsets go on from its base."""
        log_dir, records = pristine
        last = segments(log_dir)[-1]
        for length, copy in zip((0, 3, 7), copies(tmp_path, log_dir), strict=False):
            segment = copy / "0" / last.name
            os.truncate(segment, length)
            entry = {
                "truncated_bytes": length,
                "last_good_offset": None,
                "reason": [("torn segment header",)],
            }
            check_recovered(copy, records, segment, base_of(last), entry, f"magic cut to {length} bytes")
            assert read_frames(segment)[0].offset == base_of(last)

    def test_cache_ahead_of_the_recovered_log_is_rebuilt(self, tmp_path: Path) -> None:
        """A cache whose checkpoint is past the repaired log's end is rebuilt from the log, never trusted."""
        path = tmp_path / "data"
        kv = KVLog(path)
        written: list[tuple[str, int]] = []
        for i in range(30):
            key = f"k{i % 12}"
            kv[key] = i
            written.append((key, i))
        assert kv.stats()["checkpoint"] == {0: 30}
        kv.close()
        simulate_crash(path / "log")
        (segment,) = segments(path / "log")
        damaged = read_frames(segment)[20]
        flip(segment, damaged.end - 1)  # the last byte of record 20's value
        kv = KVLog(path)
        try:
            assert kv.log.recovery[0][0]["last_good_offset"] == 19  # type: ignore[attr-defined]
            assert kv.log.end_offsets() == {0: 20}
            reason = kv.stats()["open_replay"]["rebuild_reason"]
            assert reason is not None and "past the log end offset" in reason
            assert dict(kv) == dict(written[:20])
            kv["after"] = "repair"
            assert kv.log.end_offsets() == {0: 21}
        finally:
            kv.close()

    def test_head_with_a_wrong_size_falls_back_to_a_scan(self, tmp_path: Path) -> None:
        """A head whose size does not describe the file is not believed (its end offset neither)."""
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        last = segments(log_dir)[-1]
        end, _, size = read_head(log_dir).entries[0]
        for lie, copy in zip(
            [{"size": size + 1, "end": end + 100}, {"size": size - 1, "end": end - 3}],
            copies(tmp_path, log_dir),
            strict=False,
        ):
            set_entry(copy, 0, **lie)
            check_recovered(copy, records, copy / "0" / last.name, len(records), None, f"head lies: {lie}")

    def test_old_layout_marker_with_a_wrong_size_falls_back_to_a_scan(self, tmp_path: Path) -> None:
        """A log of the layout before the head: a marker that does not describe the file is not believed."""
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        last = segments(log_dir)[-1]
        to_old_layout(log_dir)
        marker_path = log_dir / "clean-shutdown.json"
        good = json.loads(marker_path.read_text())
        lies = [
            {"size": good["partitions"]["0"]["size"] + 1, "end": good["partitions"]["0"]["end"] + 100},
            {"size": good["partitions"]["0"]["size"] - 1, "end": good["partitions"]["0"]["end"] - 3},
            {"base": good["partitions"]["0"]["base"] + 1, "end": 5},
        ]
        for lie, copy in zip(lies, copies(tmp_path, log_dir), strict=False):
            marker = {**good, "partitions": {"0": {**good["partitions"]["0"], **lie}}}
            (copy / "clean-shutdown.json").write_text(json.dumps(marker))
            check_recovered(copy, records, copy / "0" / last.name, len(records), None, f"marker lies: {lie}")
        for garbage, copy in zip((b"{not json", b"[]", b""), copies(tmp_path, log_dir), strict=False):
            (copy / "clean-shutdown.json").write_bytes(garbage)
            check_recovered(copy, records, copy / "0" / last.name, len(records), None, f"marker {garbage!r}")

    def test_clean_shutdown_marker_with_a_torn_tail_appended(self, tmp_path: Path) -> None:
        """Closed cleanly, then a torn frame or garbage appended: the tail is not zeros, so it is scanned and cut."""
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        last = segments(log_dir)[-1]
        size = last.stat().st_size
        n = len(records)
        torn_frame = encode_frame(n, 0, b"torn", b"v" * 40)[:-7]
        # A batch of two whose first record is whole and the second torn, and one whose last record is missing.
        first_of_two = encode_frame(n, 0, b"first", b"of a torn batch", batch_end=False)
        torn_batch = first_of_two + encode_frame(n + 1, 0, b"second", b"torn")[:-3]
        tails = [
            (torn_frame, 0, ("incomplete",)),
            (b"\xff" * 20, 0, ("impossible frame length",)),
            # Zeros past the published end are space preallocated for appends, never records:
            # nothing to repair, and the next append overwrites them.
            (b"\x00" * 3, 0, None),
            (torn_batch, 1, ("incomplete",)),
            (first_of_two, 1, ("incomplete",)),
        ]
        for (tail, batch_records, reason), copy in zip(tails, copies(tmp_path, log_dir), strict=False):
            assert read_head(copy).clean
            segment = copy / "0" / last.name
            with open(segment, "ab") as f:
                f.write(tail)
            entry = None
            if reason is not None:
                entry = {
                    "truncated_bytes": len(tail),
                    "last_good_offset": n - 1,
                    "reason": [reason, (f"position {size + (len(first_of_two) if batch_records else 0)}",)],
                    "batch_records": batch_records,
                }
            check_recovered(copy, records, segment, n, entry, f"appended {tail[:8]!r}...")
            assert segment.stat().st_size > size  # the repaired segment took the new record

    def test_whole_batch_appended_after_a_clean_close_is_kept(self, tmp_path: Path) -> None:
        """A head that does not describe the file is not believed; whole batches found by the scan are kept."""
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        segment = segments(log_dir)[-1]
        n = len(records)
        extra: list[Record] = [(n, b"one", b"1"), (n + 1, b"two", None), (n + 2, b"three", b"3")]
        with open(segment, "ab") as f:
            for offset, key, value in extra:
                f.write(encode_frame(offset, 0, key, value, batch_end=offset == n + 2))
        check_recovered(log_dir, [*records, *extra], segment, n + 3, None, "a whole batch appended")

    @pytest.mark.parametrize("writes", ["single-puts", "batches"])
    def test_clean_shutdown_marker_over_a_damaged_record_never_gives_a_wrong_value(
        self, tmp_path: Path, writes: str
    ) -> None:
        """A byte rots after a clean close (sizes still match, so the open does not scan).

        Reading the record raises LogCorruptError, never returns a wrong value,
        and cuts nothing yet. The head marks the partition suspect, so the
        next open (with no other instance open) scans its active segment, cuts it
        back to the end of the last whole batch before the damage, reports the
        cut, and the store opens with the records before it.
        """
        path = tmp_path / "data"
        kv = KVLog(path)
        if writes == "single-puts":
            for i in range(10):
                kv[f"k{i}"] = i
            good_end, batch_records = 6, 0  # each record is a batch of its own
        else:
            # Batch frames of two records: the damaged record's frame holds offsets 6 and 7,
            # and the whole frame before it (offsets 4 and 5) belongs to the same batch.
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(segment_format, "BATCH_FRAME_RECORDS", 2)
                for keys in (range(4), range(4, 8), range(8, 10)):  # offsets 0-3, 4-7, 8-9
                    kv.update({f"k{i}": i for i in keys})
            good_end, batch_records = 4, 2  # offsets 4 and 5 share the damaged record's batch
        kv.close()
        (segment,) = segments(path / "log")
        frames = read_frames(segment)
        assert [f.offset for f in frames if f.batch_end] == (
            list(range(10)) if writes == "single-puts" else [3, 7, 9]
        )
        damaged = frames[6]
        flip(segment, damaged.end - 1)  # the last byte of the value: a CRC mismatch
        size = segment.stat().st_size
        shutil.rmtree(path / "cache")  # so that the open replays the log, and reads the damage
        with pytest.raises(LogCorruptError) as info:
            KVLog(path, ready_timeout=30)
        message = str(info.value)
        assert str(segment) in message and f"position {damaged.position}" in message, message
        assert "next open" in message, f"the error does not say that the next open repairs it: {message}"
        assert segment.stat().st_size == size, "the failed open cut the segment"
        assert read_head(path / "log").suspect == [True], "the failed open did not mark the partition"
        # The lock was released by the failed open. The next open repairs the tail.
        kv = KVLog(path, ready_timeout=30)
        try:
            reason = f"CRC mismatch at file position {damaged.position}"
            if batch_records:
                reason += batch_suffix(batch_records)
            assert kv.log.recovery[0] == [  # type: ignore[attr-defined]
                {
                    "segment": str(segment),
                    "truncated_bytes": size - frames[good_end].position,
                    "reason": reason,
                    "last_good_offset": good_end - 1,
                }
            ]
            assert kv.log.end_offsets() == {0: good_end}
            assert dict(kv) == {f"k{i}": i for i in range(good_end)}
        finally:
            kv.close()
        assert segment.stat().st_size == frames[good_end].position

    def test_damage_read_through_a_reader_is_repaired_by_the_next_open(self, tmp_path: Path) -> None:
        """The same at the log level: a LocalReader hits the damage; close, reopen: the tail is cut."""
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        segment = segments(log_dir)[-1]
        frames = read_frames(segment)
        # The last batch (4 records, offsets 96-99) is a frame of 3 records and one of 1, damaged.
        damaged = frames[-1]
        first = frames[-4]
        assert [f.offset for f in frames if f.batch_end][-2:] == [95, 99] and first.offset == 96
        assert damaged.position == frames[-2].end and first.position == frames[-2].position
        flip(segment, damaged.position + 20)  # the timestamp
        local = LocalLog(log_dir, background_compaction=False)
        try:
            assert local.recovery == {0: []}  # the head matched: no scan
            with pytest.raises(LogCorruptError, match=f"position {damaged.position}"):
                read_all(local)
        finally:
            local.close()
        assert read_head(log_dir).suspect == [True]
        entry = {
            "truncated_bytes": segment.stat().st_size - first.position,
            "last_good_offset": 95,
            "reason": [("CRC mismatch",), (f"position {damaged.position}",)],
            "batch_records": 3,
        }
        check_recovered(log_dir, records, segment, 96, entry, "a damaged record read, then reopened")

    def test_a_torn_batch_is_cut_per_partition(self, tmp_path: Path) -> None:
        """An append() spanning partitions is one batch per partition: each is kept or cut whole on its own."""
        log_dir = tmp_path / "log"
        local = LocalLog(log_dir, partitions=2, background_compaction=False)
        first = [(b"a%d" % i, b"first") for i in range(12)]
        second = [(b"b%d" % i, b"second") for i in range(12)]
        local.append(first)
        # A frame per record: the tear below leaves whole frames of the torn batch (of a batch of
        # more than BATCH_FRAME_RECORDS records, a tear can leave whole batch frames so).
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(segment_format, "BATCH_FRAME_RECORDS", 1)
            placed = local.append(second)
        local.close()
        simulate_crash(log_dir)
        counts = {p: sum(1 for q, _ in placed if q == p) for p in (0, 1)}
        assert min(counts.values()) >= 2, counts
        # Per partition, the frames of the second append: only the last one of each ends a batch.
        for p in (0, 1):
            frames = read_frames(segments(log_dir, p)[-1])
            assert [f.batch_end for f in frames[-counts[p] :]] == [False] * (counts[p] - 1) + [True]
        # Tear partition 1's share of the second append in its middle (as a crash between writes would).
        segment1 = segments(log_dir, 1)[-1]
        frames1 = read_frames(segment1)
        torn_at = frames1[-2].position + 5
        os.truncate(segment1, torn_at)
        local = LocalLog(log_dir, background_compaction=False)
        try:
            assert local.recovery[0] == []
            cut = Cut.of(frames1, torn_at)
            assert cut.batch_records == counts[1] - 2
            (entry,) = local.recovery[1]
            assert entry["truncated_bytes"] == torn_at - cut.good_end
            assert entry["last_good_offset"] == cut.last_good_offset
            if cut.batch_records:
                assert entry["reason"].endswith(batch_suffix(cut.batch_records)), entry
            end = local.end_offsets()
            in_first = {q: sum(1 for k, _ in first if local.partition_for(k) == q) for q in (0, 1)}
            assert end == {0: in_first[0] + counts[0], 1: in_first[1]}
            reader = local.open_reader(dict.fromkeys(range(2), 0))
            got: dict[bytes, bytes | None] = {}
            for _ in range(100):
                if reader.positions() == end:
                    break
                for record in reader.poll(1.0, 1000):
                    assert record.key is not None
                    got[record.key] = record.value
            reader.close()
        finally:
            local.close()
        # Partition 0 keeps its share of the second append; partition 1 none of it, all of the first.
        wanted = dict(first) | {k: v for (k, v), (p, _) in zip(second, placed, strict=True) if p == 0}
        assert got == wanted


# -- closed segments -------------------------------------------------------------------------


class TestDamagedClosedSegment:
    """Only the last segment is scanned on open; a bad record in a closed one is reported when read."""

    @pytest.mark.parametrize(
        ("kind", "field"),
        [
            *(("record", f) for f in ("length", "crc", "offset", "timestamp", "flags", "key length", "key")),
            ("record", "value"),
            *(("batch", f) for f in ("length", "crc", "offset", "timestamp", "flags", "count", "keys bytes")),
            *(("batch", f) for f in ("values bytes", "keys", "values")),
        ],
    )
    def test_reading_across_the_damage_raises(self, tmp_path: Path, kind: str, field: str) -> None:
        log_dir = tmp_path / "log"
        records = build_log(log_dir)
        simulate_crash(log_dir)
        closed = segments(log_dir)[1]
        # The last record in a frame of that kind: not in the first frame of the segment.
        frame = [f for f in read_frames(closed) if (f.columns is not None) == (kind == "batch")][-1]
        assert frame.position > len(MAGIC)
        position = next(p for p in range(frame.position, frame.end) if frame.field_at(p) == field)
        flip(closed, position, 0x80 if field == "length" else 0xFF)
        local = LocalLog(log_dir, background_compaction=False)
        try:
            assert local.recovery == {0: []}
            assert local.end_offsets() == {0: len(records)}
            with pytest.raises(LogCorruptError) as info:
                read_all(local)
            message = str(info.value)
            assert str(closed) in message and f"position {frame.position}" in message, message
            # The damage is contained: the segments after it read fine.
            after = base_of(segments(log_dir)[2])
            assert read_all(local, after) == [r for r in records if r[0] >= after]
        finally:
            local.close()
        # A bad record in a closed segment is not cut: the active one is not suspect.
        assert read_head(log_dir).suspect == [False]

    def test_kvlog_open_and_rewarm_surface_the_damage(self, tmp_path: Path) -> None:
        """KVLog raises LogCorruptError naming the file: no hang, no wrong value."""
        path = tmp_path / "data"
        kv = KVLog(path, log=LocalLog(path / "log", segment_bytes=1024, background_compaction=False))
        for start in range(0, 120, 6):
            kv.update({f"key-{i:03d}": {"n": i, "pad": "x" * (i % 30)} for i in range(start, start + 6)})
        kv.close()
        assert len(segments(path / "log")) >= 3
        closed = segments(path / "log")[1]
        frame = read_frames(closed)[1]
        flip(closed, frame.end - 2)
        # A warm open reads only the tail: it works. A rewarm reads everything and hits the damage.
        kv = KVLog(path)
        try:
            assert kv["key-000"] == {"n": 0, "pad": ""}
            with pytest.raises(LogCorruptError) as info:
                kv.rewarm(timeout=30)
            assert str(closed) in str(info.value) and f"position {frame.position}" in str(info.value)
        finally:
            kv.close()
        shutil.rmtree(path / "cache")
        with pytest.raises(LogCorruptError) as info:
            KVLog(path, ready_timeout=30)
        assert str(closed) in str(info.value)


# -- other files of the data directory ------------------------------------------------------


class TestDamagedDirectory:
    @pytest.mark.parametrize(
        "garbage",
        [
            b"{garbage",
            b"",
            b'{"format": 99, "log_id": "x", "partitions": 1}',
            b"[1, 2]",
            b"null",
            b'"log"',
            b'{"format": 1, "partitions": 1}',
            b'{"format": 1, "log_id": 7, "partitions": 1}',
            b'{"format": 1, "log_id": "x"}',
            b'{"format": 1, "log_id": "x", "partitions": 0}',
            b'{"format": 1, "log_id": "x", "partitions": -2}',
            b'{"format": 1, "log_id": "x", "partitions": "1"}',
            b'{"format": 1, "log_id": "x", "partitions": 1.0}',
            b'{"format": 1, "log_id": "x", "partitions": true}',
            b'{"log_id": "x", "partitions": 1}',
        ],
        ids=[
            "not-json",
            "empty",
            "other-format",
            "json-array",
            "json-null",
            "json-string",
            "no-log-id",
            "int-log-id",
            "no-partitions",
            "zero-partitions",
            "negative-partitions",
            "str-partitions",
            "float-partitions",
            "bool-partitions",
            "no-format",
        ],
    )
    def test_garbage_log_json(self, tmp_path: Path, garbage: bytes) -> None:
        """An unusable ``log.json`` is a LogCorruptError naming it (not a raw KeyError, TypeError or AttributeError).

        It must be a dict with ``format`` 1, a str ``log_id`` and an int
        ``partitions`` of at least 1.
        """
        path = tmp_path / "data"
        with KVLog(path) as kv:
            kv["k"] = "v"
        meta = path / "log" / "log.json"
        good = meta.read_bytes()
        meta.write_bytes(garbage)
        with pytest.raises(LogCorruptError, match=r"log\.json"):
            LocalLog(path / "log")
        with pytest.raises(LogCorruptError, match=r"log\.json"):
            KVLog(path)
        assert meta.read_bytes() == garbage, "a failed open rewrote log.json"
        # The failed opens released the lock (in this very process, too).
        meta.write_bytes(good)
        with KVLog(path) as kv:
            assert kv["k"] == "v"

    @pytest.mark.parametrize("damage", ["directory-removed", "directory-emptied", "segments-removed"])
    def test_missing_partition_is_an_error(self, tmp_path: Path, damage: str) -> None:
        """A partition whose directory (or whose every segment) vanished lost its records: the open refuses.

        LogCorruptError naming the partition and its directory; the other
        partitions are not touched, no directory or segment is created in its
        place (silently starting the partition again at offset 0 would reuse
        offsets that caches already hold), and once it is restored the log opens.
        """
        log_dir = tmp_path / "log"
        local = LocalLog(log_dir, partitions=2, background_compaction=False)
        offsets = local.append([(b"k%d" % i, b"v") for i in range(40)])
        local.close()
        assert {p for p, _ in offsets} == {0, 1}
        shutil.copytree(log_dir, tmp_path / "backup")
        directory = log_dir / "1"
        if damage == "directory-removed":
            shutil.rmtree(directory)
        elif damage == "directory-emptied":
            shutil.rmtree(directory)
            directory.mkdir()
        else:
            for segment in segments(log_dir, 1):
                segment.unlink()
            (directory / "notes.txt").write_text("not a segment")
        left = sorted(f.name for f in directory.iterdir()) if directory.exists() else None
        for opening in (lambda: LocalLog(log_dir, background_compaction=False), lambda: KVLog(tmp_path)):
            with pytest.raises(LogCorruptError) as info:
                opening()
            message = str(info.value)
            assert "partition 1" in message and str(directory) in message, message
            assert (sorted(f.name for f in directory.iterdir()) if directory.exists() else None) == left
        shutil.rmtree(log_dir)
        shutil.copytree(tmp_path / "backup", log_dir)
        local = LocalLog(log_dir, background_compaction=False)
        try:
            assert local.end_offsets() == {p: sum(1 for q, _ in offsets if q == p) for p in (0, 1)}
        finally:
            local.close()

    def test_cache_over_a_log_that_lost_a_partition_is_not_used(self, tmp_path: Path) -> None:
        """KVLog refuses to open (LogCorruptError naming the partition), rather than serve a cache the log cannot back."""
        path = tmp_path / "data"
        with KVLog(path, partitions=2) as kv:
            kv.update({f"k{i}": i for i in range(40)})
            assert all(kv.stats()["checkpoint"].values())
        shutil.rmtree(path / "log" / "1")
        with pytest.raises(LogCorruptError) as info:
            KVLog(path)
        assert "partition 1" in str(info.value) and str(path / "log" / "1") in str(info.value)

    def test_new_log_creates_its_partitions_before_log_json(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``log.json`` is written last: once it exists, every partition has its (empty) first segment."""
        import kvlog.log.local as local_module

        log_dir = tmp_path / "log"
        seen: list[dict[str, list[tuple[str, bytes]]]] = []
        write_json = local_module._write_json_atomically

        def watching(target: Path, data: Any) -> None:
            if target.name == "log.json":
                seen.append(
                    {
                        d.name: [(f.name, f.read_bytes()) for f in sorted(d.iterdir())]
                        for d in sorted(log_dir.iterdir())
                        if d.is_dir()
                    }
                )
            write_json(target, data)

        monkeypatch.setattr(local_module, "_write_json_atomically", watching)
        LocalLog(log_dir, partitions=3, background_compaction=False).close()
        first = "00000000000000000000.log"
        assert seen == [{str(p): [(first, MAGIC)] for p in range(3)}]

    @pytest.mark.parametrize("made", [0, 1, 3])
    def test_creation_interrupted_before_log_json_is_taken_over(self, tmp_path: Path, made: int) -> None:
        """A crash while creating a log leaves empty segments and no ``log.json``: the next open creates the log."""
        log_dir = tmp_path / "log"
        LocalLog(log_dir, partitions=3, background_compaction=False).close()
        (log_dir / "log.json").unlink()
        (log_dir / "head").unlink()
        for p in range(made, 3):
            shutil.rmtree(log_dir / str(p))
        local = LocalLog(log_dir, partitions=3, background_compaction=False)
        try:
            assert local.partitions == 3
            assert local.recovery == {0: [], 1: [], 2: []}
            assert local.end_offsets() == {0: 0, 1: 0, 2: 0}
            placed = local.append([(b"k%d" % i, b"v") for i in range(30)])
            assert {p for p, _ in placed} == {0, 1, 2}
        finally:
            local.close()
        assert json.loads((log_dir / "log.json").read_text())["partitions"] == 3

    @pytest.mark.parametrize("partitions", [1, 2])
    def test_missing_log_json_over_records_is_an_error(self, tmp_path: Path, partitions: int) -> None:
        """``log.json`` gone while segments hold records: LogCorruptError naming it, not a new empty log.

        Whatever partition count the open asks for: a new log_id over old
        records would make every cache rebuild, and a partition left out of
        the new ``log.json`` would lose its records unreported.
        """
        log_dir = tmp_path / "log"
        local = LocalLog(log_dir, partitions=2, background_compaction=False)
        # Records in partition 1 only: partition 0 holds nothing but its empty first segment.
        keys = [k for k in (b"k%d" % i for i in range(40)) if local.partition_for(k) == 1]
        local.append([(k, b"v") for k in keys])
        local.close()
        assert read_frames(segments(log_dir, 0)[-1]) == []
        (log_dir / "log.json").unlink()
        before = sorted(str(f.relative_to(log_dir)) for f in log_dir.rglob("*") if f.name != "LOCK")
        with pytest.raises(LogCorruptError, match=r"log\.json"):
            LocalLog(log_dir, partitions=partitions, background_compaction=False)
        assert not (log_dir / "log.json").exists(), "the failed open wrote a new log.json"
        after = sorted(str(f.relative_to(log_dir)) for f in log_dir.rglob("*") if f.name != "LOCK")
        assert after == before

    def test_missing_log_json_over_records_in_partition_0(self, tmp_path: Path) -> None:
        path = tmp_path / "data"
        with KVLog(path) as kv:
            kv["k"] = "v"
        (path / "log" / "log.json").unlink()
        with pytest.raises(LogCorruptError, match=r"log\.json"):
            KVLog(path)
        with pytest.raises(LogCorruptError, match=r"log\.json"):
            LocalLog(path / "log", partitions=4)

    def test_leftover_lock_files_of_a_dead_process(self, tmp_path: Path) -> None:
        """Lock files a dead process left (with its pid, as the layout before the head wrote) lock nothing."""
        path = tmp_path / "data"
        with KVLog(path) as kv:
            kv["k"] = "v"
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
        )
        for name in ("LOCK", "OPEN", "COMPACT"):
            (path / "log" / name).write_text(dead.stdout)
        with KVLog(path) as kv:
            assert kv["k"] == "v"
            kv["k2"] = "v2"
        with KVLog(path) as kv:
            assert kv["k2"] == "v2"


# -- the LMDB cache ----------------------------------------------------------------------------

CACHE_PROBE = textwrap.dedent(
    """
    import json, sys
    from kvlog import KVLog
    from kvlog.errors import CacheError
    outcome = {"stage": "open"}
    try:
        kv = KVLog(sys.argv[1], follow=False)
        outcome["stage"] = "read"
        outcome["contents"] = {k: v for k, v in kv.scan()}
        outcome["open_replay"] = kv.stats()["open_replay"]
        kv.close()
    except Exception as exc:
        outcome.update(error=type(exc).__name__, module=type(exc).__module__, message=str(exc),
                       cache_error=isinstance(exc, CacheError))
    print(json.dumps(outcome))
    """
)

#: Ways to damage ``data.mdb``. Each used to raise CacheError ("delete the cache directory") at
#: open or at the first read; tests/test_faults_cache.py damages chosen LMDB structures.
CACHE_DAMAGE = {
    "garbage": lambda data: random.Random(0).randbytes(len(data)),
    "zeroed-meta-pages": lambda data: b"\x00" * 8192 + data[8192:],
    "truncated": lambda data: data[: len(data) // 2],
    "truncated-by-a-page": lambda data: data[:-4096],
    "one-garbage-page": lambda data: data[: len(data) // 2] + b"\xa5" * 4096 + data[len(data) // 2 + 4096 :],
}


@pytest.mark.parametrize("damage", sorted(CACHE_DAMAGE))
def test_damaged_cache_is_set_aside_and_rebuilt(tmp_path: Path, damage: str) -> None:
    """A damaged ``data.mdb`` is moved aside (named in the rebuild reason) and rebuilt from the log.

    Never a crash of the process (a truncated file made LMDB touch unmapped
    memory: SIGBUS), a raw ``lmdb`` exception, or wrong contents. Run in a
    child process, since the failure being tested for can kill the process.
    """
    path = tmp_path / "data"
    expected = {f"k{i:05d}": "v" * (i % 60) for i in range(20_000)}
    with KVLog(path) as kv:
        kv.update(expected)
    data_file = cache_env_dir(path / "cache") / "data.mdb"
    damaged = CACHE_DAMAGE[damage](data_file.read_bytes())
    data_file.write_bytes(damaged)
    probe = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE, str(path)], capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, f"the process died (exit {probe.returncode}): {probe.stderr[-2000:]}"
    outcome = json.loads(probe.stdout)
    assert "error" not in outcome, f"opening the damaged cache failed: {outcome}"
    assert outcome["contents"] == expected
    reason = outcome["open_replay"]["rebuild_reason"]
    (moved,) = path.glob("cache.corrupt-*")
    assert "damaged" in reason and str(moved) in reason, reason
    assert (moved / "data.mdb").read_bytes() == damaged
