"""Compaction of the embedded log, and the background cleaner thread that runs it.

A pass keeps each key's latest record, drops tombstones older than the
retention and merges small closed segments, keeping offsets; each rewritten
group is swapped in through ``.cleaned`` and ``.swap`` files. The cleaner runs
a pass when a partition's dirty ratio (estimated by ``sample``) is high
enough. The swap protocol, step by step, is in docs/design.md, "The embedded log".
"""

from __future__ import annotations

import bisect
import contextlib
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
from .sample import DirtSample, SeenRecord, key_hash
from .segments import (
    FORMAT_VERSION,
    MAGIC,
    Frame,
    Segment,
    cleaned_name,
    encode_frame,
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
                self.dropped_followed.append((frame.key, h, frame.offset, frame.end - frame.position))
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
        #: One compaction at a time.
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
        self._wake = threading.Event()
        #: Wake-ups asked of the background cleaner, and those it has handled:
        #: equal once it is idle (tests wait on that instead of sleeping).
        self.wakeups = 0
        self.wakeups_handled = 0

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
        """Whether a partition has records its sample has not counted, or is dirty enough for a pass."""
        lg = self._log
        return any(sample.pending for sample in self.samples.values()) or any(
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
        with self.lock:
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
            elif time.monotonic() - self._samples_saved >= _SAMPLE_SAVE_INTERVAL:
                self.save_samples()

    def close(self) -> None:
        """Wait for a compaction another thread runs, then save the samples (a failure only warns)."""
        with self.lock:
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
        """:meth:`~kvlog.log.local.LocalLog.dirty_ratio`: counts what the sample lacks first."""
        if self.samples[p].pending:
            with self.lock:
                self._log._check_open()
                self._catch_up(p)
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

    def _observe_segment(
        self, p: int, sample: DirtSample, segment: Segment, size: int, low: int, high: int
    ) -> None:
        """Show ``sample`` the records of ``segment`` (up to ``size``) with offsets in ``[low, high)``."""
        lg = self._log
        threshold = sample.threshold
        seen: list[SeenRecord] = []
        for frame in lg._segment_frames(p, segment, size):
            if not low <= frame.offset < high:
                continue
            h = key_hash(frame.key)
            if h >= threshold:
                continue
            ts = -1 if frame.value is not None else frame.timestamp
            seen.append(SeenRecord(frame.key, h, frame.offset, frame.end - frame.position, ts))
            if len(seen) >= _OBSERVE_BATCH:
                with lg._cond:
                    sample.observe(seen, lg._segments[p])
                seen, threshold = [], sample.threshold
        with lg._cond:
            sample.observe(seen, lg._segments[p])

    def _catch_up(self, p: int) -> None:
        """Show the dirt sample of ``p`` the records it has not counted yet (callers hold :attr:`lock`)."""
        lg = self._log
        with lg._cond:
            sample = self.samples[p]
            segments = list(lg._segments[p])
            sizes = [s.size for s in segments]
        while sample.pending:
            low, high = sample.pending[0]
            for i, segment in enumerate(segments):
                following = segments[i + 1].base if i + 1 < len(segments) else None
                if following is not None and following <= low:
                    continue
                if lg._closed:
                    return  # what is left stays pending, and a save keeps it so
                self._observe_segment(p, sample, segment, sizes[i], low, high)
                with lg._cond:
                    if following is None or following >= high:
                        sample.pending.pop(0)
                        break
                    sample.pending[0] = low, high = following, high

    # -- compaction ----------------------------------------------------------------------

    def compact(self) -> dict[str, Any]:
        """Compact every partition now (see :meth:`~kvlog.log.local.LocalLog.compact`); return the report."""
        with self.lock:
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
        survey = self._survey(p, segments, active_size, horizon) if closed and not sample.pending else None
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
            for segment in group:
                if lg._closed:  # close() does not wait for a long pass; nothing is committed yet
                    out.close()
                    cleaned.unlink()
                    return None
                for frame in lg._segment_frames(p, segment, segment.size):
                    if rewrite.drops(frame, latest[frame.key] != frame.offset, horizon, threshold):
                        continue
                    data = encode_frame(frame.offset, frame.timestamp, frame.key, frame.value)
                    out.write(data)
                    rewrite.segment.index_appended_frame(frame.offset, position)
                    position += len(data)
            out.flush()
            os.fsync(out.fileno())
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
        # Commit point: once the .swap name is durable, an open finishes the swap.
        # A crash before the directory sync leaves the .cleaned (deleted at open:
        # the old segments are intact) or the .swap (finished at open).
        os.replace(rewrite.cleaned, swap)
        fsync_dir(directory)
        with lg._cond:
            # A crash from here on leaves the .swap and some of the old segments:
            # an open deletes the rest and renames the .swap over the first.
            for old in group[1:]:
                old.path.unlink()
            os.replace(swap, new.path)
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
        self.drops_known_since = created
        path = self._log.path / _CHECKPOINT_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            self.cleaned_to = {int(p): int(o) for p, o in state["cleaned_to"].items()}
            self.tombstone_drops = {
                int(p): [(float(t), int(o)) for t, o in drops]
                for p, drops in state["tombstone_drops"].items()
            }
            self.drops_known_since = max(self.drops_known_since, float(state["drops_known_since"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Without the record of dropped tombstones no cache can prove it
            # missed none: from now on, a cache that is behind is rebuilt.
            log.warning("ignoring unreadable %s (%s); the next compaction rewrites it", path, exc)
            self.drops_known_since = time.time()

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

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool:
        """:meth:`~kvlog.log.local.LocalLog.tombstones_dropped_after`, from the recorded passes."""
        if since < self.drops_known_since:
            return any(positions.get(p, 0) < end for p, end in self._log.end_offsets().items())
        return any(
            t > since and offset >= positions.get(p, 0)
            for p, drops in self.tombstone_drops.items()
            for t, offset in drops
        )

    def load_samples(self) -> None:
        """Take up the dirt samples a previous session saved; count what they lack, or all, later."""
        lg = self._log
        path = lg.path / _SAMPLE_FILE
        try:
            state = json.loads(path.read_bytes())
            saved = state["partitions"] if state["format"] == FORMAT_VERSION else {}
        except FileNotFoundError:
            saved = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); the dirty ratio is counted again", path, exc)
            saved = {}
        for p in range(lg.partitions):
            segments, end = lg._segments[p], lg._end[p]
            sample = None
            try:
                entry = saved.get(str(p))
                if entry is not None:
                    sample = self._saved_sample(entry, segments, end)
            except (ValueError, KeyError, TypeError, AttributeError):
                sample = None
            if sample is None:
                begin = segments[0].base
                sample = DirtSample([(begin, end)] if end > begin else [])
            self.samples[p] = sample

    @staticmethod
    def _saved_sample(entry: Mapping[str, Any], segments: list[Segment], end: int) -> DirtSample | None:
        """A saved sample, if it still describes these segments (compaction did not change them since)."""
        closed = entry["closed"]
        through = int(entry["through"])
        if through > end or len(closed) >= len(segments) or segments[len(closed)].base != entry["active"]:
            return None
        if any(s.base != base or s.size != size for s, (base, size) in zip(segments, closed, strict=False)):
            return None
        sample = DirtSample.from_json(entry)
        if through < end:
            sample.pending.append((through, end))  # written after the save: a crash, most likely
        return sample

    def save_samples(self) -> None:
        """Save the dirt samples, so that an open knows the dirty ratio without reading the log."""
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
        data = json.dumps({"format": FORMAT_VERSION, "partitions": partitions}, separators=(",", ":"))
        write_file_atomically(
            lg.path / _SAMPLE_FILE,
            data.encode(),
            sync=lg.fsync != "never",
            file_mode=lg.file_mode,
        )
        self._samples_saved = time.monotonic()
