"""Compaction of the embedded log, and the background cleaner thread that runs it.

A pass keeps each key's latest record, drops tombstones older than the
retention and merges small closed segments, keeping offsets; each rewritten
group is swapped in through ``.cleaned`` and ``.swap`` files. The cleaner runs
a pass when a partition's dirty ratio (estimated by ``sample``) is high
enough. One pass runs at a time over every process that has the log open (an
``flock`` of ``COMPACT``); the swap itself is done under the write lock. Only
the holder of that lock counts the records a sample lacks, after taking up the
sample another process saved if that one counted further, and saves what it
counted: each record is read to count it once, not once per process. The swap
protocol, step by step, is in docs/design.md, "The embedded log".
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..._files import fsync_dir, open_file, write_file_atomically
from ...errors import ClosedError
from .recovery import remove_cleaned
from .sample import DirtSample, SeenRecord, key_hash
from .segments import (
    MAGIC,
    MAX_FRAME,
    STATE_FORMAT,
    BadFrame,
    Frame,
    Segment,
    cleaned_name,
    encode_columns,
    encode_frame,
    parse_frames,
    segment_name,
    swap_name,
)

if TYPE_CHECKING:
    from . import LocalLog

__all__ = ["COMPACTOR_THREAD", "Cleaner"]

# The embedded log logs under one name, whichever of its modules speaks.
log = logging.getLogger(__package__)

#: The name of the background cleaner's thread.
COMPACTOR_THREAD = "kvlog-log-compactor"
_CHECKPOINT_FILE = "cleaner-checkpoint.json"
_SAMPLE_FILE = "cleaner-sample.json"
#: Compaction passes that dropped tombstones remembered per partition.
_DROPS_KEPT = 256
#: Records a scan hands to a dirt sample per hold of the log's lock.
_OBSERVE_BATCH = 4096
#: Seconds between saves of the dirt samples by the background cleaner.
_SAMPLE_SAVE_INTERVAL = 5.0
#: The fields of a compaction report that add up over partitions.
_REPORT_FIELDS = (
    "segments_before",
    "segments_after",
    "segments_rewritten",
    "records_before",
    "records_after",
    "bytes_before",
    "bytes_after",
    "bytes_rewritten",
    "tombstones_dropped",
)


class _Survey(NamedTuple):
    """What a read of a whole partition tells a compaction pass."""

    #: The offset of every key's latest record.
    latest: dict[bytes, int]
    #: Per closed segment: whether it holds a record the pass removes.
    dirty: list[bool]
    #: Per closed segment: its record count.
    records: list[int]


class _SavedSample(NamedTuple):
    """A partition's entry of ``cleaner-sample.json``: a dirt sample, and the log it describes."""

    sample: DirtSample
    #: The end offset of the partition when it was saved.
    through: int
    #: The base of the active segment then, and the base and size of each closed one.
    active: int
    closed: list[tuple[int, int]]

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> _SavedSample:
        """The entry :meth:`Cleaner.save_samples` wrote (ValueError, KeyError, TypeError or AttributeError if not)."""
        closed = [(int(base), int(size)) for base, size in entry["closed"]]
        return cls(DirtSample.from_json(entry), int(entry["through"]), int(entry["active"]), closed)

    def taken_up(self, segments: Sequence[Segment], end: int) -> DirtSample | None:
        """The sample, if it still describes ``segments`` (and ``end``), with the records written after it pending.

        None if compaction rewrote a segment since, or if it was saved past ``end``.
        """
        closed = self.closed
        if self.through > end or len(closed) >= len(segments) or segments[len(closed)].base != self.active:
            return None
        if any(s.base != base or s.size != size for s, (base, size) in zip(segments, closed, strict=False)):
            return None
        sample = self.sample
        if self.through < end:
            sample.pending.append((self.through, end))  # written after the save
        return sample


@dataclass
class _Rewrite:
    """One group of closed segments rewritten into a ``.cleaned`` file: what it kept and dropped."""

    cleaned: Path
    #: The segment that replaces the group (its size is set once written).
    segment: Segment
    #: Records not copied: superseded ones and dropped tombstones.
    records_removed: int = 0
    tombstones_dropped: int = 0
    #: The highest offset of a dropped tombstone, -1 if none was dropped.
    dropped_up_to: int = -1
    #: Dropped tombstones of keys the dirt sample follows: key, key hash, offset, frame bytes.
    dropped_followed: list[tuple[bytes, int, int, int]] = field(default_factory=list)

    def drops(self, frame: Frame, superseded: bool, horizon: int, threshold: int) -> bool:
        """Whether ``frame`` is left out, counting it if so.

        ``superseded``: a later record of its key exists; ``threshold``: the
        dirt sample's, to note the dropped tombstones of the keys it follows.
        """
        if not superseded and frame.value is None and frame.timestamp < horizon:
            self.tombstones_dropped += 1
            self.dropped_up_to = frame.offset
            superseded = True
            if (h := key_hash(frame.key)) < threshold:
                self.dropped_followed.append((frame.key, h, frame.offset, frame.size))
        if superseded:
            self.records_removed += 1
        return superseded


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    """Remove ``path`` if the block fails: a half-written ``.cleaned`` on a full disk only takes space."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _merge_groups(closed: Sequence[Segment], segment_bytes: int) -> list[list[int]]:
    """Group consecutive closed segments (by index) whose combined size fits one segment."""
    groups: list[list[int]] = []
    for i, segment in enumerate(closed):
        if groups and sum(closed[j].size for j in groups[-1]) + segment.size <= segment_bytes:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _new_report(segments: Sequence[Segment]) -> dict[str, int]:
    """The report of a pass over ``segments`` (the last one active) that changes nothing."""
    closed_bytes = sum(s.size for s in segments[:-1])
    report = dict.fromkeys(_REPORT_FIELDS, 0)
    report.update(
        segments_before=len(segments),
        segments_after=len(segments),
        bytes_before=closed_bytes,
        bytes_after=closed_bytes,
    )
    return report


def _count_rewrite(report: dict[str, int], group: Sequence[Segment], rewrite: _Rewrite) -> None:
    """Add a group swapped in to the report of its partition."""
    old_bytes = sum(s.size for s in group)
    report["segments_after"] -= len(group) - 1
    report["segments_rewritten"] += len(group)
    report["records_after"] -= rewrite.records_removed
    report["tombstones_dropped"] += rewrite.tombstones_dropped
    report["bytes_after"] += rewrite.segment.size - old_bytes
    report["bytes_rewritten"] += old_bytes


class Cleaner:
    """Compacts a :class:`~kvlog.log.local.LocalLog`, and runs its background cleaner thread.

    Holds what compaction keeps between passes: the dirt samples, how far
    each partition was compacted, and which passes dropped tombstones (saved
    in ``cleaner-checkpoint.json`` and ``cleaner-sample.json``). Internal to
    the log, which delegates :meth:`~kvlog.log.local.LocalLog.compact` and
    :meth:`~kvlog.log.local.LocalLog.dirty_ratio` here.
    """

    def __init__(self, local_log: LocalLog) -> None:
        self._log = local_log
        #: One compaction at a time in this process (with :meth:`locked`, in every process).
        self.lock = threading.Lock()
        #: Per partition, the offset up to which the log was compacted (the active segment's base then).
        self.cleaned_to: dict[int, int] = {}
        #: Per partition, [unix time, highest offset] of each compaction pass that
        #: dropped tombstones (the newest _DROPS_KEPT of them): what lets a cache
        #: that was away know for certain whether it missed a delete.
        self.tombstone_drops: dict[int, list[tuple[float, int]]] = {}
        #: Since when (unix time) ``tombstone_drops`` knows every drop.
        self.drops_known_since = 0.0
        #: Per partition, what the dirty ratio is estimated from.
        self.samples: dict[int, DirtSample] = {}
        self._samples_saved = time.monotonic()
        #: (inode, size, mtime) of cleaner-sample.json when this instance last read or wrote it.
        self._sample_stamp: tuple[int, int, int] | None = None
        #: Records this instance read to count them into its samples (the work a
        #: saved sample spares), and samples it took up from cleaner-sample.json
        #: instead of counting what they had counted.
        self.records_counted = 0
        self.samples_adopted = 0
        self._wake = threading.Event()
        #: Wake-ups asked of the background cleaner, and those it has handled:
        #: equal once it is idle (tests wait on that instead of sleeping).
        self.wakeups = 0
        self.wakeups_handled = 0
        self._created = 0.0
        #: (inode, size, mtime) of cleaner-checkpoint.json when last read or written.
        self._checkpoint_stamp: tuple[int, int, int] | None = None

    @contextlib.contextmanager
    def locked(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold the compaction lock: :attr:`lock`, then the ``flock`` of ``COMPACT``.

        With ``wait=False`` the flock is only tried; the block gets False
        (and holds nothing of it) when another process compacts.
        """
        with self.lock:
            fd = self._log._compact_fd
            if fd is None:
                raise ClosedError(f"{self._log.describe()} is closed")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def remove_leftovers_if_idle(self) -> None:
        """At open: remove ``.cleaned`` files a dead compactor left, unless some process compacts now."""
        with self.locked(wait=False) as held:
            if held:
                for p in range(self._log.partitions):
                    remove_cleaned(self._log.path / str(p))

    def _prepare_pass(self) -> None:
        """Before a pass (holding the compaction lock): take up what other processes did meanwhile.

        That is the published ends and segment lists, the checkpoint, and the
        dirt samples another process counted further than this one.
        """
        lg = self._log
        lg._refresh()
        self.reload_checkpoint_if_changed()
        for p in range(lg.partitions):
            remove_cleaned(lg.path / str(p))
        self.take_up_saved_samples()

    # -- the background cleaner ----------------------------------------------------

    def wake(self) -> None:
        """Ask the background cleaner for a pass (after a roll, or at open)."""
        with self._log._cond:
            self.wakeups += 1
        self._wake.set()

    def notify_closed(self) -> None:
        """Let the background cleaner see that the log closed (it then returns)."""
        self._wake.set()

    def is_due(self) -> bool:
        """At open: whether what the samples counted already makes a partition dirty enough for a pass.

        Reads nothing. Records a sample has not counted do not make it due:
        they are counted by the process that next holds the compaction lock
        (after a roll, or for :meth:`dirty_ratio`), once for every process.
        """
        lg = self._log
        return any(
            self.estimated_dirty_ratio(p) >= lg.min_cleanable_dirty_ratio for p in range(lg.partitions)
        )

    def run(self) -> None:
        """The background cleaner thread: a pass after each wake-up, until the log closes."""
        lg = self._log
        while True:
            self._wake.wait()
            self._wake.clear()
            if lg._closed:
                return
            with lg._cond:
                asked = self.wakeups
            try:
                self._compact_if_dirty()
            except ClosedError:
                return
            except Exception:
                log.exception(
                    "background compaction of %s failed; it is retried after the next roll", lg.path
                )
            with lg._cond:
                self.wakeups_handled = asked

    def _compact_if_dirty(self) -> None:
        """The background cleaner's pass: compact the partitions that are dirty enough."""
        lg = self._log
        with self.locked(wait=False) as held:
            if not held:
                # Another process compacts, or counts: one at a time is enough, and what it
                # counts it saves, for the next holder of the lock to take up.
                return
            self._prepare_pass()  # takes up a sample another process counted further
            counted = self.records_counted
            for p in range(lg.partitions):
                if lg._closed:
                    return
                self._catch_up(p)
            due = [
                p
                for p in range(lg.partitions)
                if self.estimated_dirty_ratio(p) >= lg.min_cleanable_dirty_ratio
            ]
            if due:
                self._compact_locked(due)  # saves the samples
            elif (
                self.records_counted > counted
                or time.monotonic() - self._samples_saved >= _SAMPLE_SAVE_INTERVAL
            ):
                self.save_samples()  # so that the next process takes them up instead of counting again

    def close(self) -> None:
        """Wait for a compaction another thread runs, then save the samples (a failure only warns).

        Not saved if another process compacts now (its pass saves its own
        samples), nor over samples another process saved since this instance
        last read or wrote the file: those were saved after counting, or by a
        close like this one, and overwriting them would lose what was counted.
        """
        with self.locked(wait=False) as held:
            if not held:
                return
            if self._stamp(self._log.path / _SAMPLE_FILE) != self._sample_stamp:
                return
            try:
                self.save_samples()
            except OSError as exc:
                log.warning(
                    "could not save the dirt sample of %s (%s); the next open counts again",
                    self._log.path,
                    exc,
                )

    # -- the dirty ratio -------------------------------------------------------------

    def _horizon(self) -> int:
        """Tombstones with a timestamp (ms) before this are older than the retention."""
        return time.time_ns() // 1_000_000 - int(self._log.tombstone_retention * 1000)

    def dirty_ratio(self, p: int) -> float:
        """:meth:`~kvlog.log.local.LocalLog.dirty_ratio`: counts what the sample lacks first.

        Under the compaction lock, like the background cleaner: a sample
        another process counted further is taken up first, and what is
        counted is saved for the next process.
        """
        lg = self._log
        lg._refresh()
        if self.samples[p].pending:
            with self.locked():
                lg._check_open()
                lg._refresh()  # at least as far as any sample saved before this lock was taken
                self.take_up_saved_samples()
                counted = self.records_counted
                self._catch_up(p)
                if self.records_counted > counted:
                    try:
                        self.save_samples()
                    except OSError as exc:
                        log.warning("could not save the dirt sample of %s (%s)", lg.path, exc)
        return self.estimated_dirty_ratio(p)

    def estimated_dirty_ratio(self, p: int) -> float:
        """:meth:`dirty_ratio` from what the sample has counted so far (reads nothing)."""
        lg = self._log
        horizon = self._horizon()
        with lg._cond:
            segments = lg._segments[p]
            total = sum(s.size for s in segments[:-1])
            dirty = self.samples[p].estimate(segments[-1].base, horizon) if total else 0
        return min(1.0, dirty / total) if total else 0.0

    def _frames_from(self, p: int, segment: Segment, offset: int, size: int) -> Iterator[Frame]:
        """The frames of ``segment`` up to ``size``, from the indexed frame nearest below ``offset``."""
        lg = self._log
        with lg._cond:
            start = segment.start_for(offset)
        with open(segment.path, "rb") as f:
            f.seek(start)
            data = f.read(max(0, size - start))
        try:
            yield from parse_frames(data, 0, start, MAX_FRAME, -1)
        except BadFrame as bad:
            raise lg._corrupt(p, segment, bad) from None

    def _observe_segment(
        self, p: int, sample: DirtSample, segment: Segment, size: int, ranges: Sequence[tuple[int, int]]
    ) -> None:
        """Show ``sample`` the records of ``segment`` (up to ``size``) in ``ranges`` (in offset order).

        One read of the segment, from the first range on, whatever the number of ranges.
        """
        lg = self._log
        threshold = sample.threshold
        seen: list[SeenRecord] = []
        counted = 0
        j, (low, high) = 0, ranges[0]
        for frame in self._frames_from(p, segment, low, size):
            offset = frame.offset
            if offset >= high:
                j += 1
                while j < len(ranges) and ranges[j][1] <= offset:
                    j += 1
                if j == len(ranges):
                    break
                low, high = ranges[j]
            if offset < low:
                continue
            counted += 1
            h = key_hash(frame.key)
            if h >= threshold:
                continue
            ts = -1 if frame.value is not None else frame.timestamp
            seen.append(SeenRecord(frame.key, h, offset, frame.size, ts))
            if len(seen) >= _OBSERVE_BATCH:
                with lg._cond:
                    sample.observe(seen, lg._segments[p])
                seen, threshold = [], sample.threshold
        with lg._cond:
            sample.observe(seen, lg._segments[p])
            self.records_counted += counted

    def _catch_up(self, p: int) -> None:
        """Show the dirt sample of ``p`` the records it has not counted yet (callers hold the compaction lock).

        Counts up to the end this instance saw when it started: records other
        processes publish meanwhile stay pending. Reads each segment that
        holds pending records once.
        """
        lg = self._log
        with lg._cond:
            sample = self.samples[p]
            segments = list(lg._segments[p])
            sizes = [s.size for s in segments]
            upto = lg._end[p]
            ranges = [(low, min(high, upto)) for low, high in sample.pending if low < upto]
        if not ranges:
            return
        for i, segment in enumerate(segments):
            following = segments[i + 1].base if i + 1 < len(segments) else upto
            here = [
                (max(low, segment.base), min(high, following))
                for low, high in ranges
                if low < following and high > segment.base
            ]
            if here:
                if lg._closed:
                    return  # what is left stays pending, and a save keeps it so
                self._observe_segment(p, sample, segment, sizes[i], here)
            with lg._cond:
                sample.counted_below(min(following, upto))
            if following >= upto:
                break

    # -- compaction ----------------------------------------------------------------------

    def compact(self) -> dict[str, Any]:
        """Compact every partition now (see :meth:`~kvlog.log.local.LocalLog.compact`); return the report."""
        with self.locked():
            self._log._check_open()
            self._prepare_pass()
            return self._compact_locked(range(self._log.partitions))

    def _compact_locked(self, partitions: Iterable[int]) -> dict[str, Any]:
        lg = self._log
        started = time.monotonic()
        total: dict[str, Any] = dict.fromkeys(_REPORT_FIELDS, 0)
        for p in partitions:
            for name, value in self._compact_partition(p).items():
                total[name] += value
        self.save_checkpoint()
        self.save_samples()
        total["seconds"] = round(time.monotonic() - started, 3)
        lg.last_compaction = total
        log.info("compacted %s: %s", lg.describe(), total)
        return total

    def _compact_partition(self, p: int) -> dict[str, int]:
        """Rewrite each group of closed segments of ``p`` where something changes; return the report."""
        lg = self._log
        self._catch_up(p)  # the sample must have counted every record for the adjustments below
        with lg._cond:
            segments = list(lg._segments[p])
            active_size = segments[-1].size
            sample = self.samples[p]
            # What the sample counts as superseded when the pass starts is what
            # it removes; counted later is superseded by records appended since.
            counted = {s.base: list(sample.dead.get(s.base, ())) for s in segments[:-1]}
        closed = segments[:-1]
        report = _new_report(segments)
        horizon = self._horizon()
        survey = self._survey(p, segments, active_size, horizon) if closed and not lg._closed else None
        if survey is None:
            return report
        report["records_before"] = report["records_after"] = sum(survey.records)
        for members in _merge_groups(closed, lg.segment_bytes):
            if len(members) == 1 and not survey.dirty[members[0]]:
                continue  # nothing in it changes: the file stays as it is
            group = [closed[i] for i in members]
            end = segments[members[-1] + 1].base
            rewrite = self._write_cleaned(p, group, survey.latest, horizon, sample.threshold)
            if rewrite is None:
                return report  # the log closed meanwhile
            self._record_tombstone_drops(p, rewrite)
            self._swap_in(p, group, end, rewrite, sample, counted)
            _count_rewrite(report, group, rewrite)
        with lg._cond:
            self.cleaned_to[p] = segments[-1].base
        return report

    def _survey(self, p: int, segments: list[Segment], active_size: int, horizon: int) -> _Survey | None:
        """Read the partition up to the snapshot ``segments`` + ``active_size``.

        Returns the latest offset of every key, which closed segments hold a
        record the pass removes (superseded, or a tombstone past the
        retention), and their record counts. None if the log was closed meanwhile.
        """
        lg = self._log
        closed_count = len(segments) - 1
        bases = [s.base for s in segments]
        latest: dict[bytes, int] = {}
        dirty = [False] * closed_count
        records = [0] * closed_count
        for i, segment in enumerate(segments):
            if lg._closed:
                return None
            is_closed = i < closed_count
            base = segment.base
            count = 0
            superseded = expired = False  # a record here superseded; a tombstone here expired
            for frame in lg._segment_frames(p, segment, segment.size if is_closed else active_size):
                count += 1
                key = frame.key
                prev = latest.get(key)
                latest[key] = frame.offset
                if prev is None:
                    pass
                elif prev >= base:
                    superseded = True
                else:
                    j = bisect.bisect_right(bases, prev) - 1
                    if j < closed_count:
                        dirty[j] = True
                if frame.value is None and frame.timestamp < horizon:
                    expired = True  # (dropped, or superseded: removed either way)
            if is_closed:
                records[i] = count
                dirty[i] = dirty[i] or superseded or expired
        return _Survey(latest, dirty, records)

    def _write_cleaned(
        self, p: int, group: list[Segment], latest: Mapping[bytes, int], horizon: int, threshold: int
    ) -> _Rewrite | None:
        """Write the records of ``group`` the pass keeps to ``<base>.cleaned``, synced.

        None, with the file removed, if the log was closed meanwhile.
        """
        lg = self._log
        base = group[0].base
        directory = lg.path / str(p)
        cleaned = directory / cleaned_name(base)
        rewrite = _Rewrite(cleaned, Segment(directory / segment_name(base), base, 0))
        with (
            _removed_on_error(cleaned),
            open(open_file(cleaned, os.O_WRONLY | os.O_TRUNC, lg.file_mode), "wb") as out,
        ):
            out.write(MAGIC)
            position = len(MAGIC)
            # The records of batch frames kept go out in runs of one timestamp (an append's
            # records share theirs), each run as batch frames: a frame has one timestamp,
            # which tombstone retention needs per record, and one msgpack-values flag, which
            # must stay true of every record it covers. Those of record frames stay so.
            offsets: list[int] = []
            keys: list[bytes] = []
            values: list[bytes | None] = []
            timestamp = 0
            trusted = False  # the run's frames carry the msgpack-values flag

            def flush() -> None:
                nonlocal position
                data, entries = encode_columns(
                    offsets, keys, values, timestamp, position, 0, msgpack_values=trusted
                )
                out.write(data)
                for entry in entries:
                    rewrite.segment.index_appended_frame(*entry)
                position += len(data)
                offsets.clear()
                keys.clear()
                values.clear()

            for segment in group:
                if lg._closed:  # close() does not wait for a long pass; nothing is committed yet
                    out.close()
                    cleaned.unlink()
                    return None
                for frame in lg._segment_frames(p, segment, segment.size):
                    if rewrite.drops(frame, latest[frame.key] != frame.offset, horizon, threshold):
                        continue
                    if not frame.batched:
                        # A record frame stays one: the dirt sample counts a record as it was written.
                        if offsets:
                            flush()
                        data = encode_frame(
                            frame.offset,
                            frame.timestamp,
                            frame.key,
                            frame.value,
                            msgpack_values=frame.msgpack_values,
                        )
                        out.write(data)
                        rewrite.segment.index_appended_frame(frame.offset, position)
                        position += len(data)
                        continue
                    if offsets and (frame.timestamp, frame.msgpack_values) != (timestamp, trusted):
                        flush()
                    timestamp, trusted = frame.timestamp, frame.msgpack_values
                    offsets.append(frame.offset)
                    keys.append(frame.key)
                    values.append(frame.value)
            if offsets:
                flush()
            out.flush()
            os.fsync(out.fileno())
            rewrite.segment.identify(os.fstat(out.fileno()))  # the inode the renames keep
        rewrite.segment.size = position
        return rewrite

    def _record_tombstone_drops(self, p: int, rewrite: _Rewrite) -> None:
        """Record in the checkpoint that ``rewrite`` drops tombstones, if it does, before it is committed."""
        if rewrite.dropped_up_to < 0:
            return
        # Recorded before the commit point: a crash in between records a
        # drop that did not happen, which only costs a cache a rebuild.
        drops = self.tombstone_drops.setdefault(p, [])
        drops.append((time.time(), rewrite.dropped_up_to))
        if len(drops) > _DROPS_KEPT:
            self.drops_known_since = max(self.drops_known_since, drops.pop(0)[0])
        with _removed_on_error(rewrite.cleaned):
            self.save_checkpoint()

    def _swap_in(
        self,
        p: int,
        group: list[Segment],
        end: int,
        rewrite: _Rewrite,
        sample: DirtSample,
        counted: Mapping[int, Sequence[int]],
    ) -> None:
        """Replace the segments of ``group`` (offsets up to ``end``) by the synced ``.cleaned`` file."""
        lg = self._log
        directory = lg.path / str(p)
        new = rewrite.segment
        swap = directory / swap_name(new.base, end)
        # All of it under the write lock, which is what every process reloads the directory
        # under: none sees a half-done swap, and a .swap found outside it was left by a
        # swapper that died (whoever reloads next finishes it).
        with lg._write_locked():
            # Commit point: once the .swap name is durable, an open finishes the swap.
            # A crash before the directory sync leaves the .cleaned (deleted by the next
            # compaction: the old segments are intact) or the .swap (finished).
            os.replace(rewrite.cleaned, swap)
            fsync_dir(directory)
            # The generation moves before the files do: a reader of another process that
            # finds a file gone or changed reloads, and that waits for this lock.
            lg._publish_generation()
            # A crash from here on leaves the .swap and some of the old segments:
            # the next reload deletes the rest and renames the .swap over the first.
            for old in group[1:]:
                old.path.unlink()
            os.replace(swap, new.path)
            assert lg._head is not None
            lg._head.writing = False  # (set by the publish: nothing is past the published ends)
            with lg._cond:
                current = lg._segments[p]
                at = current.index(group[0])
                current[at : at + len(group)] = [new]
                for old in group:
                    old.replaced = True
                sample.replaced([s.base for s in group], new.base, counted)
                for key, h, offset, size in rewrite.dropped_followed:
                    sample.dropped(key, h, offset, size, new.base)
            fsync_dir(directory)

    # -- what the cleaner keeps between sessions -----------------------------------------

    def load_checkpoint(self, created: float) -> None:
        """Take up ``cleaner-checkpoint.json``; ``created``: when the log was created (unix time)."""
        self._created = created
        self.drops_known_since = created
        path = self._log.path / _CHECKPOINT_FILE
        self._checkpoint_stamp = self._stamp(path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            cleaned_to = {int(p): int(o) for p, o in state["cleaned_to"].items()}
            tombstone_drops = {
                int(p): [(float(t), int(o)) for t, o in drops]
                for p, drops in state["tombstone_drops"].items()
            }
            drops_known_since = max(created, float(state["drops_known_since"]))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Without the record of dropped tombstones no cache can prove it
            # missed none: from now on, a cache that is behind is rebuilt.
            log.warning("ignoring unreadable %s (%s); the next compaction rewrites it", path, exc)
            self.drops_known_since = time.time()
            return
        self.cleaned_to, self.tombstone_drops = cleaned_to, tombstone_drops
        self.drops_known_since = drops_known_since

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def reload_checkpoint_if_changed(self) -> None:
        """Read ``cleaner-checkpoint.json`` again if another process rewrote it (a stat when it did not)."""
        if self._stamp(self._log.path / _CHECKPOINT_FILE) != self._checkpoint_stamp:
            self.load_checkpoint(self._created)

    def save_checkpoint(self) -> None:
        """Save ``cleaner-checkpoint.json`` (synced)."""
        self._log._save_json(
            self._log.path / _CHECKPOINT_FILE,
            {
                "cleaned_to": {str(p): o for p, o in self.cleaned_to.items()},
                "tombstone_drops": {str(p): drops for p, drops in self.tombstone_drops.items()},
                "drops_known_since": self.drops_known_since,
            },
        )
        self._checkpoint_stamp = self._stamp(self._log.path / _CHECKPOINT_FILE)

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool:
        """:meth:`~kvlog.log.local.LocalLog.tombstones_dropped_after`, from the recorded passes.

        Other processes' passes too: the checkpoint is read again when it changed.
        """
        self.reload_checkpoint_if_changed()
        if since < self.drops_known_since:
            return any(positions.get(p, 0) < end for p, end in self._log.end_offsets().items())
        return any(
            t > since and offset >= positions.get(p, 0)
            for p, drops in self.tombstone_drops.items()
            for t, offset in drops
        )

    def _read_saved_samples(self) -> dict[int, _SavedSample]:
        """The samples in ``cleaner-sample.json`` by partition (none if it is missing or unreadable).

        A partition whose entry is unreadable is left out.
        """
        path = self._log.path / _SAMPLE_FILE
        try:
            state = json.loads(path.read_bytes())
            entries = state["partitions"] if state["format"] == STATE_FORMAT else {}
            items = list(entries.items())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s); the dirty ratio is counted again", path, exc)
            return {}
        saved = {}
        for p, entry in items:
            try:
                saved[int(p)] = _SavedSample.parse(entry)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return saved

    def load_samples(self) -> None:
        """Take up the dirt samples a previous session saved; count what they lack, or all, later."""
        lg = self._log
        # Stamped before the read: a save in between is read again later, never missed.
        self._sample_stamp = self._stamp(lg.path / _SAMPLE_FILE)
        saved = self._read_saved_samples()
        for p in range(lg.partitions):
            segments, end = lg._segments[p], lg._end[p]
            entry = saved.get(p)
            sample = entry.taken_up(segments, end) if entry is not None else None
            if sample is None:
                begin = segments[0].base
                sample = DirtSample([(begin, end)] if end > begin else [])
            self.samples[p] = sample

    def fresh_sample(self, p: int, segments: list[Segment], end: int) -> DirtSample:
        """A sample for partition ``p`` after another process compacted it.

        The one that process saved after its pass, if it describes these
        segments; otherwise one that counts the whole partition again.
        """
        entry = self._read_saved_samples().get(p)
        sample = entry.taken_up(segments, end) if entry is not None else None
        if sample is not None:
            return sample
        begin = segments[0].base
        return DirtSample([(begin, end)] if end > begin else [])

    def take_up_saved_samples(self) -> None:
        """Per partition, take up the sample another process saved if it leaves less to count than this one.

        So that records are counted once, by whichever process holds the
        compaction lock, not once per process. Callers hold that lock (every
        save is made under it) and took up the head (so that a sample saved
        before is never past this instance's ends). Only a stat when nobody
        saved since this instance last read or wrote the file.
        """
        lg = self._log
        path = lg.path / _SAMPLE_FILE
        stamp = self._stamp(path)
        if stamp is None or stamp == self._sample_stamp:
            return
        with lg._cond:
            if not any(sample.pending for sample in self.samples.values()):
                return  # this instance counted everything: nothing saved can be further
        saved = self._read_saved_samples()
        # With this instance's appends held off: an append shows its records to the sample
        # it looked up before it published them, which must be the one kept.
        with lg._append_lock, lg._cond:
            for p, entry in saved.items():
                own = self.samples.get(p)
                if own is None or not own.pending:
                    continue
                theirs = entry.taken_up(lg._segments[p], lg._end[p])
                if theirs is not None and theirs.uncounted() < own.uncounted():
                    self.samples[p] = theirs
                    self.samples_adopted += 1
        self._sample_stamp = stamp

    def save_samples(self) -> None:
        """Save the dirt samples (callers hold the compaction lock).

        So that an open knows the dirty ratio without reading the log, and the
        next process to count takes them up instead of counting them again.
        """
        lg = self._log
        partitions = {}
        with lg._cond:
            for p, sample in self.samples.items():
                segments = lg._segments[p]
                partitions[str(p)] = {
                    **sample.to_json(),
                    "through": lg._end[p],
                    "active": segments[-1].base,
                    "closed": [[s.base, s.size] for s in segments[:-1]],
                }
        data = json.dumps({"format": STATE_FORMAT, "partitions": partitions}, separators=(",", ":"))
        write_file_atomically(
            lg.path / _SAMPLE_FILE,
            data.encode(),
            sync=lg.fsync != "never",
            file_mode=lg.file_mode,
        )
        self._samples_saved = time.monotonic()
        self._sample_stamp = self._stamp(lg.path / _SAMPLE_FILE)
