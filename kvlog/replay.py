"""Replay: the only path from the log into the cache.

The :class:`Replayer` reads the log from the cache's checkpoint and applies
what it read in large batches, each batch together with the positions that
follow it in one LMDB transaction. It runs either as a background follower
thread or on demand in the caller's thread (``follow=False``); both go
through :meth:`Replayer.step`. A writer waits until the applied position of
its record's partition is past its offset; ``sync()`` waits until every
partition reaches an end-offset snapshot.

The cache is shared by every process that opens the data directory, and
any of them may replay into it: a batch commits only if the cache's
checkpoint is still the one the batch follows (see
:class:`~kvlog.cache.CheckpointMoved`), so whoever replays, the cache moves
forward in log order. On a Kafka log one process per cache directory
follows the topic: the one whose follower thread holds the replay lock
(``REPLAY`` in the cache directory); when it dies another takes over. On the
embedded log every writer puts its own records into the cache before it
returns (see :meth:`kvlog.KVLog.__setitem__`), and the follower only picks
up records nobody applied (a writer killed between its append and its
apply, another program appending to the log).

It also keeps the cache honest while it runs: it rebuilds from the log start
rather than apply records after the cache was away from the log end for longer
than the log keeps tombstones, or after the log changed under it (a recreated
topic), and it quarantines (or stops at) records the cache cannot take.
docs/design.md, "Replay", has the reasoning of each.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from ._files import open_file
from .cache import Cache, CheckpointMoved, RecordColumns
from .errors import BadRecordError, ClosedError, KVLogError, SyncTimeoutError
from .log import Log, LogReader, PositionOutOfRangeError, Record, partitions_changed_error

__all__ = ["BAD_RECORD_POLICIES", "Replayer"]

log = logging.getLogger(__name__)

#: Records per LMDB transaction while catching up. Large transactions are what
#: make replay from Kafka fast (one commit per batch).
BATCH_RECORDS = 50_000
#: ...but never hold a batch back longer than this once records are waiting.
BATCH_SECONDS = 0.25
#: A first read of fewer records than this is applied without waiting for more.
FILL_FROM_RECORDS = 1_000
#: How long one idle poll of the follower blocks (also how quickly it stops).
FOLLOW_POLL_SECONDS = 0.2
#: How often the replayer asks for the log's end offsets to note that the cache
#: is current (a tiny write) and checks that the log is still the one it opened
#: (a recreated topic, added partitions). Shorter for a short tombstone retention.
CURRENT_MARK_SECONDS = 10.0
#: The shortest interval between two of those checks, whatever the retention.
MIN_MARK_SECONDS = 0.25
#: A tombstone retention below this is too short to guard by time (a follower
#: cannot reliably stand at the log end that often): the replayer warns instead.
MIN_GUARDED_RETENTION_SECONDS = 1.0
#: The pause before a caller waiting with a deadline (``sync()``, a write
#: without the follower) asks the log again after a retriable error.
RETRY_PAUSE_SECONDS = 0.1
#: The shortest attempt to read them (a deadline about to pass still gets one try).
END_OFFSETS_MIN_SECONDS = 0.05
#: How often a process whose follower is not the replayer tries to become it
#: (the replayer's process died: another takes over within about this long).
TAKEOVER_POLL_SECONDS = 0.25
#: On the embedded log: how often the follower checks for records nobody applied.
ORPHAN_CHECK_SECONDS = 0.05
#: The longest pause between two looks at the shared checkpoint while another
#: process replays what a caller waits for (the pause starts shorter).
SHARED_WAIT_MAX_SECONDS = 0.005
#: The longest poll of a step that holds the replay lock for itself only (Kafka).
LOCKED_POLL_SECONDS = 0.05
#: The replay lock's file in the cache directory.
REPLAY_LOCK = "REPLAY"
#: How many of the last quarantined records ``quarantined`` keeps.
QUARANTINE_KEPT = 10
#: Quarantined records logged one by one per batch; the rest are summed up.
QUARANTINE_LOGGED = 10
#: What ``on_bad_record`` accepts.
BAD_RECORD_POLICIES = ("quarantine", "raise")


def _at_or_past(stored: Mapping[int, int], mine: Mapping[int, int]) -> bool:
    """Whether checkpoint ``stored`` is ``mine`` moved forward only (in every partition ``mine`` names)."""
    return bool(stored) and all(stored.get(p, -1) >= offset for p, offset in mine.items())


class _Columns:
    """What one step read from a reader that hands out columns (the embedded log's ``poll_columns``).

    Counted and iterated as its records, so that the step treats it as it
    treats a list of records; :meth:`Replayer._apply` hands the columns
    themselves to :meth:`~kvlog.cache.Cache.apply_columns`: the same
    transaction, for a fraction of the work per record.
    """

    __slots__ = ("columns", "count")

    def __init__(self, columns: list[RecordColumns]) -> None:
        self.columns = columns
        self.count = sum(len(part.offsets) for part in columns)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        for part in self.columns:
            yield from part.records()

    def extend(self, more: _Columns | list[Any]) -> None:
        """Add what a later poll of the same reader read."""
        assert isinstance(more, _Columns)  # a reader hands out columns or records, never both
        self.columns.extend(more.columns)
        self.count += more.count


def _poll(reader: LogReader, timeout: float, max_records: int) -> list[Any] | _Columns:
    """One poll of ``reader``: its columns where it has them (the embedded log), else its records."""
    poll_columns = getattr(reader, "poll_columns", None)
    if poll_columns is None:
        return list(reader.poll(timeout, max_records))
    return _Columns(poll_columns(timeout, max_records))


class Replayer:
    """Applies the log to the cache, from the cache's checkpoint onwards.

    Args:
        log: the log to read.
        cache: the cache to apply to; its checkpoint says where to start.
        identity: returns the identity to bind the cache to when it must be
            rebuilt (default: the identity it has).
        on_rebuild: called with a reason whenever the replayer rebuilds the
            cache from the log start (a position outside the log, a cache
            behind for longer than the log keeps tombstones, a recreated topic).
        check: run on every value replayed (the codec's ``value_check``); a
            value it raises on is a bad record.
        checked_codec: the name of the codec ``check`` belongs to if it is
            kvlog's own msgpack codec: columns whose ``values_codec`` is that
            name (the embedded log's frames written by a store with it) are
            not checked again.
        on_bad_record: ``"quarantine"`` (skip, count, log) or ``"raise"``.
        single_replayer: one process per cache directory replays (a Kafka
            topic: the follower that holds the replay lock); otherwise any
            process replays what it waits for (the embedded log).
        lock: take the replay lock at all (a rebuild beside the live cache
            replays into its own generation and does not).
    """

    def __init__(
        self,
        log: Log,
        cache: Cache,
        *,
        identity: Callable[[], Mapping[str, Any]] | None = None,
        on_rebuild: Callable[[str], None] | None = None,
        check: Callable[[bytes], object] | None = None,
        checked_codec: str | None = None,
        on_bad_record: str = "quarantine",
        single_replayer: bool = False,
        lock: bool = True,
    ) -> None:
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {', '.join(map(repr, BAD_RECORD_POLICIES))}")
        self._log = log
        self._cache = cache
        self._identity = identity
        self._on_rebuild = on_rebuild
        self._check = check
        self._checked_codec = checked_codec
        self._strict = on_bad_record == "raise"
        self._on_bad_record = on_bad_record
        self._single = single_replayer
        # The replay lock: an flock, so it dies with its process. Held by the
        # follower for as long as it follows (single replayer), or for one
        # step. flock belongs to the open file, shared by this process's
        # threads: _pull_lock keeps them apart, and _role_held says whether
        # this process's follower is the replayer.
        self._lock_fd: int | None = (
            open_file(cache.path / REPLAY_LOCK, os.O_RDWR, cache.file_mode) if lock else None
        )
        self._role_held = False
        self._cond = threading.Condition()
        # Held by whoever reads from the reader and writes the cache: the
        # follower, or a caller driving replay itself. KafkaConsumer is not
        # thread-safe, and the cache must be written in log order.
        self._pull_lock = threading.Lock()
        self._positions: dict[int, int] = {}
        self._reader: LogReader | None = None
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        #: An error no retry can cure (a bad record under "raise", partitions
        #: added to the topic): every later step, sync and write raises it.
        self._fatal: BaseException | None = None
        self._closed = False
        #: Records applied since this replayer was created.
        self.records_replayed = 0
        #: Records writers of this process put into the cache themselves since
        #: this replayer was created (on Kafka, see apply_own; replay skips them).
        self.records_applied_by_writers = 0
        #: Bad records skipped since this replayer was created.
        self.records_quarantined = 0
        #: The last few of them, as ``(partition, offset, reason)``.
        self.quarantined: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=QUARANTINE_KEPT)
        #: The last few warnings about guarantees replay could not keep (docs/design.md, "Missed deletes").
        self.warnings: collections.deque[str] = collections.deque(maxlen=QUARANTINE_KEPT)
        self.batches = 0
        #: When replay last moved forward: applied records, stepped over a gap,
        #: or found the cache at the log end (wall-clock seconds; ``None``: not since open).
        self.last_progress_at: float | None = None
        #: The last error replay met (reading, applying, or asking for the end
        #: offsets) and when, whether or not it was retried: ``(seconds, text)``.
        self.last_error: tuple[float, str] | None = None
        # When the cache last stood at the log end (the time of the end-offset
        # snapshot it reached), and whether that moment is a rebuild's start
        # rather than an arrival at the end. See docs/design.md, "Missed deletes".
        self._current_at = cache.current_at()
        self._from_start = not cache.checkpoint()
        self._slow_rebuild_warned = False
        self._unguarded_warned = False
        retention = log.tombstone_retention_seconds
        self._retention = retention
        self._mark_every = CURRENT_MARK_SECONDS
        if retention is not None:
            self._mark_every = max(MIN_MARK_SECONDS, min(CURRENT_MARK_SECONDS, retention / 4))
        # An end-offset snapshot (taken at the time given) that the positions
        # have not reached yet; when they do, the cache was current then.
        self._probe: tuple[float, dict[int, int]] | None = None
        self._last_probe = time.time()  # the opening replay already checked the log
        # A "current" mark decided while the follower held the pull lock; it
        # writes it after its step (see _note_current).
        self._current_pending = False
        # The checkpoint the reader's positions follow (empty: the log start).
        self._stored: dict[int, int] = {}
        # Whether writers moved the checkpoint past where the reader stands:
        # what it reads below the checkpoint is skipped (see apply_own).
        self._skipping = False
        try:
            self._open_reader()
        except BaseException:
            self._release_files()
            raise

    def _open_reader(self, stored: Mapping[int, int] | None = None) -> None:
        """Open a reader at the shared checkpoint (``stored``, read now if not given)."""
        checkpoint = self._cache.checkpoint() if stored is None else dict(stored)
        positions = self._start_positions(checkpoint)
        self._reader = self._log.open_reader(positions)
        self._stored = checkpoint
        with self._cond:
            self._positions = positions
            self._cond.notify_all()

    def _start_positions(self, checkpoint: Mapping[int, int]) -> dict[int, int]:
        partitions = range(self._log.partitions)
        if all(p in checkpoint for p in partitions):
            return {p: checkpoint[p] for p in partitions}
        begin = self._log.begin_offsets()
        return {p: checkpoint.get(p, begin[p]) for p in partitions}

    # -- the replay lock ----------------------------------------------------

    def _try_lock(self, blocking: bool) -> bool:
        if self._lock_fd is None:
            return True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _release_files(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # also releases the replay lock
            self._lock_fd = None
            self._role_held = False

    def _drop_reader(self) -> None:
        # The next step opens a new reader at the cache's checkpoint: after a
        # batch that failed to apply, the old one stands past what was applied.
        self._skipping = False
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    # -- state --------------------------------------------------------------

    @property
    def positions(self) -> dict[int, int]:
        """The applied position of every partition: the shared cache's checkpoint, read now."""
        return self._refresh_positions()

    def _refresh_positions(self) -> dict[int, int]:
        """Read the shared checkpoint (any process may have moved it) into ``_positions``."""
        checkpoint = self._cache.checkpoint()
        with self._cond:
            positions = dict(self._positions)
            if checkpoint:
                positions.update(checkpoint)
            self._positions = positions
            return dict(positions)

    @property
    def following(self) -> bool:
        """Whether the background follower thread is running."""
        return self._follower is not None and self._follower.is_alive()

    def health(self) -> dict[str, Any]:
        """How replay is doing, for an operator: is the cache following the log?

        Returns:
            ``following`` (the background follower runs), ``last_progress_at``
            (wall-clock seconds when replay last applied records or found the
            cache at the log end; ``None`` if not since open),
            ``current_at`` (the time of the last end-offset snapshot the cache
            reached), ``last_error`` and ``last_error_at`` (the last error met
            while reading, applying or asking for the end offsets, retried or
            not, and when the attempt that met it began; ``None`` if none
            since open), ``replaying_here`` (on a Kafka
            log: whether this process is the one that follows the topic for
            every process sharing the cache; ``None`` on the embedded log,
            where every writer replays its own records).
        """
        error = self.last_error
        return {
            "following": self.following,
            "last_progress_at": self.last_progress_at,
            "current_at": self._current_at,
            "last_error": None if error is None else error[1],
            "last_error_at": None if error is None else error[0],
            "replaying_here": self._role_held if self._single else None,
        }

    def check_usable(self) -> None:
        """Raise the error that stopped replay for good, if one did (before a write is sent)."""
        fatal = self._fatal
        if fatal is not None:
            raise fatal.with_traceback(None)

    # -- pulling ------------------------------------------------------------

    def step(self, timeout: float, *, max_records: int | None = None) -> int | None:
        """Read one batch (waiting up to ``timeout`` for its first record) and apply it.

        ``max_records`` defaults to :data:`BATCH_RECORDS`, or the reader's
        ``replay_batch_records`` if that is smaller. The step runs under
        the replay lock (held already by this process's follower, if it is the
        replayer). With a single replayer the lock is only tried: when another
        process's follower holds it, nothing is read and this returns ``None``.
        Otherwise the step waits for the lock (held for one step at a time).

        Returns:
            The number of records read, or ``None`` if another process replays.

        Raises:
            BadRecordError: ``on_bad_record="raise"`` and the batch holds a bad record.
            TopicConfigError: partitions were added to the topic.
        """
        with self._pull_lock:
            began = time.time()
            if self._closed:
                raise ClosedError("the replayer is closed")
            locked = False
            if not self._role_held:
                if not self._try_lock(not self._single):
                    return None
                locked = True
                # A step that took the lock for itself is a catch-up: what it
                # waits for is in the log already (the embedded log), or about
                # to be fetched (Kafka). It must not hold the lock through an
                # idle poll while other processes queue for it.
                timeout = min(timeout, LOCKED_POLL_SECONDS if self._single else 0.0)
            try:
                return self._step_locked(timeout, max_records)
            except Exception as exc:
                if not isinstance(exc, ClosedError):
                    self._note_error(exc, began)
                raise
            finally:
                if self._current_pending:
                    self._current_pending = False
                    self._write_current()
                if locked:
                    self._unlock()

    def _step_locked(self, timeout: float, max_records: int | None) -> int:
        self.check_usable()
        stored = self._cache.checkpoint()
        if self._reader is not None and stored != self._stored:
            if self._single and _at_or_past(stored, self._stored):
                # Writers applied their own records (apply_own): the reader
                # reads on and skips them, rather than a new consumer
                # connecting to fetch from there.
                self._stored = stored
                self._skipping = True
            else:
                # Another process (or a writer of this one) applied records: read on from there.
                self._drop_reader()
        if self._reader is None:
            try:
                self._open_reader(stored)
            except PositionOutOfRangeError as exc:
                self._rebuild_locked(str(exc))
                return 0
        reader = self._reader
        assert reader is not None
        if max_records is None:
            max_records = min(BATCH_RECORDS, reader.replay_batch_records or BATCH_RECORDS)
        try:
            records = _poll(reader, timeout, max_records)
            # Fill the transaction while records keep arriving quickly, so a
            # cold replay commits a few large transactions, not many small ones.
            # A small first read is the tail of the log: applied at once, since
            # a poll that finds nothing new still costs about a millisecond on
            # Kafka (kafka-python's network round of a fetch), all of it added
            # to the time until other processes and instances see a write.
            if len(records) >= FILL_FROM_RECORDS:
                deadline = time.monotonic() + BATCH_SECONDS
                while len(records) < max_records and time.monotonic() < deadline:
                    more = _poll(reader, 0.0, max_records - len(records))
                    if not more:
                        break
                    records.extend(more)
            positions = reader.positions()
        except PositionOutOfRangeError as exc:
            self._rebuild_locked(str(exc))
            return 0
        except BaseException:
            # The reader may stand past records this step read but will not
            # apply; kept, its next positions would skip them. The next step
            # opens a new reader at the cache's checkpoint instead.
            self._drop_reader()
            raise
        read = len(records)
        if self._skipping:
            records, positions = self._past_stored(records, positions)
        with self._cond:
            unchanged = positions == self._positions
        if records:
            problem = self._missed_delete_risk()
            if problem is not None:
                self._rebuild_locked(problem)
                return 0
        while records or not unchanged:
            try:
                self._apply(records, positions)
                break
            except CheckpointMoved:
                stored = self._cache.checkpoint()
                if not (self._single and _at_or_past(stored, self._stored)):
                    self._drop_reader()  # someone else applied first: read again from where they left it
                    return 0
                # A writer applied its own records meanwhile: apply what lies past them.
                self._stored = stored
                self._skipping = True
                records, positions = self._past_stored(records, positions)
                with self._cond:
                    unchanged = positions == self._positions
        self._track_current(positions)
        return read

    def _past_stored(
        self, records: Iterable[Any], positions: dict[int, int]
    ) -> tuple[list[Any], dict[int, int]]:
        """Drop the records below the stored checkpoint (writers applied them); never move a position back."""
        stored = self._stored
        kept = [r for r in records if r.offset >= stored.get(r.partition, 0)]
        merged = {p: max(offset, stored.get(p, offset)) for p, offset in positions.items()}
        if all(offset >= stored.get(p, offset) for p, offset in positions.items()):
            self._skipping = False  # the reader stands past everything they applied
        return kept, merged

    def apply_own(
        self, records: Sequence[tuple[bytes, bytes | None]], positions: Sequence[tuple[int, int]]
    ) -> bool:
        """Apply a writer's own records, just acknowledged at ``positions``, if they are the next ones.

        On a Kafka log a write would otherwise wait for the follower to fetch
        its records back from the broker. They are the next records to replay
        when, in every partition they went to, their offsets run on from the
        shared checkpoint without a gap: nothing unapplied lies before them.
        They commit with the checkpoint moved past them only if it is still
        the one read (the follower, or another process, may apply first); the
        follower then reads on past them (see :meth:`_past_stored`). The
        values came from the store's own codec: no value check.

        Returns:
            Whether they were applied. ``False`` leaves it to replay (a
            writer then waits, as before).
        """
        if not self._single or self._fatal is not None or self._closed:
            return False
        checkpoint = self._cache.checkpoint()
        with self._cond:
            # A partition nothing was applied to yet starts where the reader
            # started: the log's first offset.
            after = {**self._positions, **checkpoint}
        for partition, offset in positions:
            if after.get(partition) != offset:
                return False  # a gap, another writer's record first, or the cache is behind
            after[partition] = offset + 1
        batch = [Record(p, o, key, value) for (key, value), (p, o) in zip(records, positions, strict=True)]
        try:
            self._cache.apply(batch, after, expect=checkpoint)
        except CheckpointMoved:
            return False
        with self._cond:
            self._positions = {**self._positions, **after}
            self.last_progress_at = time.time()
            self.records_applied_by_writers += len(batch)
            self._cond.notify_all()
        return True

    def _apply(self, records: list[Any] | _Columns, positions: dict[int, int]) -> None:
        bad: list[tuple[Any, str]] = []
        try:
            columns = isinstance(records, _Columns)
            # Only the embedded log's columns can say their values need no check (see apply_columns).
            apply = (
                partial(self._cache.apply_columns, checked_codec=self._checked_codec)
                if columns
                else self._cache.apply
            )
            applied, skipped = apply(
                records.columns if isinstance(records, _Columns) else records,
                positions,
                expect=self._stored,
                check=self._check,
                on_bad=lambda r, why: bad.append((r, why)),
                strict=self._strict,
            )
        except CheckpointMoved:
            raise
        except BadRecordError as exc:
            self._drop_reader()
            fatal = BadRecordError(
                f"{exc} (in {self._log.describe()}); replay stops here because the store was opened with "
                "on_bad_record='raise' (with the default, 'quarantine', such a record is skipped, counted "
                "in stats() and logged)",
                partition=exc.partition,
                offset=exc.offset,
                reason=exc.reason,
            )
            self._set_fatal(fatal)
            raise fatal from None
        except BaseException:
            self._drop_reader()  # nothing of the batch was applied: read it again next time
            raise
        self._stored = dict(positions)
        with self._cond:
            self._positions = positions
            self.last_progress_at = time.time()
            self.records_replayed += applied
            self.records_quarantined += skipped
            self.quarantined.extend((r.partition, r.offset, why) for r, why in bad)
            self.batches += 1
            self._cond.notify_all()
        for record, why in bad[:QUARANTINE_LOGGED]:
            log.warning(
                "quarantined the record at offset %d of partition %d of %s: %s (skipped; the key keeps its "
                "previous value)",
                record.offset,
                record.partition,
                self._log.describe(),
                why,
            )
        if len(bad) > QUARANTINE_LOGGED:
            log.warning(
                "quarantined %d more record(s) of the same batch; stats()['quarantined'] lists the last %d",
                len(bad) - QUARANTINE_LOGGED,
                QUARANTINE_KEPT,
            )

    def _rebuild_locked(self, reason: str) -> None:
        log.warning("rebuilding the cache from the log start: %s", reason)
        try:
            # A topic deleted and created again is the usual cause of a
            # position outside the log: bind the rebuilt cache to the new one.
            self._log.current_identity()
        except Exception as exc:  # noqa: BLE001 - the identity the log has is the best there is
            log.debug("cannot check the log's identity: %s", exc)
        identity = self._identity() if self._identity is not None else self._cache.identity() or {}
        self._reset_locked(identity)
        if self._on_rebuild is not None:
            self._on_rebuild(reason)
        self._open_reader({})

    def _reset_locked(self, identity: Mapping[str, Any]) -> None:
        self._drop_reader()
        self._cache.reset(identity)
        self._stored = {}
        with self._cond:
            # Reset marks the cache current as of now: a replay from the log
            # start misses no delete that is still in the log when it starts.
            self._current_at = self._cache.current_at()
            self._from_start = True
            self._slow_rebuild_warned = False
            self._probe = None
            self._positions = {}
            self._cond.notify_all()

    def reset(self, identity: Mapping[str, Any]) -> None:
        """Empty the cache, bind it to ``identity`` and replay again from the log start."""
        with self._pull_lock:
            self._reset_locked(identity)
            self._open_reader({})

    # -- staying current ----------------------------------------------------

    def _missed_delete_risk(self) -> str | None:
        """Why applying records now could keep a key whose delete was compacted away, or ``None``."""
        retention = self._retention
        if retention is None:
            return None
        now = time.time()
        since = self._current_at
        if since is not None and now - since <= retention:
            return None
        with self._cond:
            positions = dict(self._positions)
        dropped = self._log.tombstones_dropped_after(positions, since or 0.0)
        if dropped is False:
            return None
        away = "an unknown time" if since is None else f"{now - since:.1f}s"
        if dropped is None and retention < MIN_GUARDED_RETENTION_SECONDS:
            if not self._unguarded_warned:
                self._unguarded_warned = True
                self._warn(
                    f"{self._log.describe()} keeps tombstones only {retention:g}s, too short for kvlog to notice "
                    "a delete it missed while behind; raise the topic's delete.retention.ms to well above "
                    f"{MIN_GUARDED_RETENTION_SECONDS:g}s"
                )
            return None
        if self._from_start:
            # Rebuilding again would take as long, and could end the same way.
            if not self._slow_rebuild_warned:
                self._slow_rebuild_warned = True
                what = (
                    "compaction dropped tombstones while it ran"
                    if dropped
                    else f"that is longer than the log keeps tombstones ({retention:g}s)"
                )
                self._warn(
                    f"replaying {self._log.describe()} from its start has taken {away}, and {what}: a delete "
                    "made meanwhile may be missing from the cache. Raise the log's tombstone retention "
                    "(Kafka: the topic's delete.retention.ms) well above the time a full replay takes"
                )
            return None
        if dropped:
            return f"compaction dropped tombstones past the cache's position while it was behind the log end ({away})"
        return (
            f"the cache has not been at the log end for {away}, longer than the log keeps tombstones "
            f"(delete.retention.ms={retention * 1000:.0f}): deletes made meanwhile may be compacted away"
        )

    def _set_fatal(self, error: BaseException) -> None:
        log.error("replay stopped: %s", error)
        with self._cond:
            self._fatal = error
            self._cond.notify_all()

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        with self._cond:
            self.warnings.append(message)

    def _track_current(self, positions: Mapping[int, int]) -> None:
        """Every few seconds, snapshot the end offsets and check the log; note arrivals at a snapshot.

        An empty poll alone does not prove that the reader is at the end
        (kafka-python also returns empty while the broker is unreachable),
        hence the snapshots.
        """
        now = time.time()
        if now - self._last_probe >= self._mark_every:
            self._last_probe = now  # also spaces out the attempts while the log is down
            try:
                end = self._log.end_offsets(timeout=2.0)
            except Exception as exc:  # noqa: BLE001 - unknown means not current; retried later
                log.debug("cannot tell whether the cache is current: %s", exc)
                self._note_error(exc)
            else:
                if self._probe is None:
                    self._probe = (now, end)
                self._check_log_locked()
        probe = self._probe
        if probe is not None and all(positions.get(p, 0) >= offset for p, offset in probe[1].items()):
            self._probe = None
            with self._cond:
                moved = self._advance_current(probe[0])
            if moved:
                self._write_current()

    def _check_log_locked(self) -> None:
        """Notice a topic recreated (rebuild) or given more partitions (stop: see partitions_changed_error)."""
        try:
            now = self._log.current_identity()
        except Exception as exc:  # noqa: BLE001 - checked again at the next snapshot
            log.debug("cannot check the log's identity: %s", exc)
            self._note_error(exc)
            return
        cached = self._cache.identity() or {}
        if all(cached.get(k) == v for k, v in now.items()):
            return
        changed = sorted(k for k, v in now.items() if cached.get(k) != v)
        if changed == ["partitions"]:
            self._set_fatal(
                partitions_changed_error(self._log.describe(), cached["partitions"], now["partitions"])
            )
            return
        details = ", ".join(f"{k}: {cached.get(k)!r} -> {now[k]!r}" for k in changed)
        self._rebuild_locked(f"the log changed under the store ({details})")

    def _advance_current(self, since: float) -> bool:
        # With self._cond held. Marks only move forward: a snapshot taken
        # before a rebuild started says nothing about the rebuilt cache.
        self.last_progress_at = time.time()
        if self._current_at is not None and since <= self._current_at:
            return False
        self._current_at = since
        self._from_start = False
        return True

    def _write_current(self) -> None:
        # Callers hold the pull lock: cache writes (and map resizes) happen in one thread at a time.
        when = self._current_at
        if not self._closed and when is not None:
            self._cache.mark_current(when)

    def _note_current(self, since: float, end: Mapping[int, int]) -> bool:
        """Record that the positions reached ``end``, a snapshot taken at ``since``.

        Returns ``False`` if they no longer stand there (a rebuild moved them
        back). Never waits for the follower's idle poll: if the follower holds
        the pull lock, it writes the mark when its step ends (a crash before
        that only makes the cache look less recent than it was).
        """
        if self._pull_lock.acquire(blocking=False):
            try:
                with self._cond:
                    if not self._reached(end):
                        return False
                    moved = self._advance_current(since)
                if moved:
                    self._write_current()
                return True
            finally:
                self._pull_lock.release()
        with self._cond:
            if not self._reached(end):
                return False
            if self._advance_current(since):
                self._current_pending = True
            return True

    def catch_up(
        self,
        timeout: float | None,
        *,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
    ) -> None:
        """Return once the cache holds everything the log held when this was called.

        If replay has to rebuild the cache meanwhile (docs/design.md,
        "Rebuilds"), this returns only after the rebuild caught up.

        Raises:
            SyncTimeoutError: ``timeout`` seconds passed first.
            BrokerUnavailableError: the end offsets could not be read.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.following:
            # Without a follower nothing else runs the periodic checks (a
            # store that is already current would not even step).
            with self._pull_lock:
                if not self._closed:
                    self.check_usable()
                    with self._cond:
                        positions = dict(self._positions)
                    self._track_current(positions)
        while True:
            since = time.time()
            end = self._end_offsets(deadline)
            self._wait(end, deadline, timeout, progress)
            if self._note_current(since, end):
                return

    def _end_offsets(self, deadline: float | None) -> dict[int, int]:
        """The log's end offsets; a retriable failure is asked again while ``deadline`` allows.

        Each attempt is bounded by the log's own timeout and by what is left
        of the deadline; without a deadline one attempt decides. A client that
        met a leader change can fail an attempt that a new one then answers
        (see :class:`~kvlog.log.kafka.KafkaLog`), so a ``sync(timeout=10)``
        rides out a failover rather than reporting it.
        """
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                return self._log.end_offsets(
                    timeout=None if remaining is None else max(END_OFFSETS_MIN_SECONDS, remaining)
                )
            except KVLogError as exc:
                self._note_error(exc)
                if not exc.retriable or deadline is None:
                    raise
                if deadline - time.monotonic() <= RETRY_PAUSE_SECONDS:
                    raise
                log.debug("end offsets unavailable, asking again: %s", exc)
                self._pause_before_retry(exc)

    def _pause_before_retry(self, exc: BaseException) -> None:
        with self._cond:
            if self._closed:
                raise ClosedError("the store was closed while waiting for replay") from exc
            self._cond.wait(timeout=RETRY_PAUSE_SECONDS)

    def _note_error(self, exc: BaseException, began: float | None = None) -> None:
        """Record ``exc`` as the last error, timed when the attempt that met it began (``began``, default now).

        An attempt that began before the error already recorded was made is
        not recorded: a look of the follower that ran a step, which recorded
        its error, reports the same error after another thread's step may
        have moved on (stats would show the error after the progress).
        """
        at = time.time() if began is None else began
        last = self.last_error
        if last is not None and at < last[0]:
            return
        self.last_error = (at, f"{type(exc).__name__}: {exc}")

    # -- waiting ------------------------------------------------------------

    def _reached(self, targets: Mapping[int, int]) -> bool:
        # With self._cond held: what this process last read of the shared checkpoint.
        positions = self._positions
        return all(positions.get(p, 0) >= offset for p, offset in targets.items())

    def wait_for(
        self,
        targets: Mapping[int, int],
        timeout: float | None,
        *,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
    ) -> None:
        """Return once every partition's applied position is at least its target.

        With the follower running this only waits; without it the caller
        drives replay itself. ``progress(applied, targets)`` is called with the
        applied positions after each batch (and once more when done).

        Raises:
            SyncTimeoutError: ``timeout`` seconds passed first.
            ClosedError: the replayer was closed while waiting.
            BadRecordError, TopicConfigError: replay stopped for good (see :meth:`step`).
        """
        self._wait(targets, None if timeout is None else time.monotonic() + timeout, timeout, progress)

    def _wait(
        self,
        targets: Mapping[int, int],
        deadline: float | None,
        timeout: float | None,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None,
    ) -> None:
        pause = SHARED_WAIT_MAX_SECONDS / 8
        while True:
            with self._cond:
                if self._closed:
                    raise ClosedError("the store was closed while waiting for replay")
                self.check_usable()
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
            positions = self._refresh_positions()
            reached = all(positions.get(p, 0) >= offset for p, offset in targets.items())
            if progress is not None:
                progress(positions, dict(targets))
            if reached:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise SyncTimeoutError(
                    f"the cache did not catch up with the log within {timeout:g}s "
                    f"(applied {positions}, waiting for {dict(targets)}); "
                    "a write that timed out here is nevertheless in the log"
                )
            if self._role_held and self.following:
                # This process's follower replays for everyone: it wakes us after each batch.
                with self._cond:
                    if not self._reached(targets) and not self._closed and self._error is None:
                        self._cond.wait(timeout=min(remaining or 1.0, 1.0))
                continue
            try:
                read = self.step(min(remaining if remaining is not None else 1.0, 1.0))
            except KVLogError as exc:
                # The log is out of reach for now (a leader failing over):
                # the reader resumes from the checkpoint, as the follower
                # would. A deadline bounds the retries; without one, the
                # caller decides.
                if not exc.retriable or exc is self._fatal or remaining is None:
                    raise
                log.debug("replay paused while waiting: %s", exc)
                self._pause_before_retry(exc)
                continue
            if read is None:
                # Another process replays (its follower holds the replay lock):
                # look at the shared checkpoint again shortly.
                with self._cond:
                    if not self._closed:
                        self._cond.wait(timeout=pause)
                pause = min(pause * 2, SHARED_WAIT_MAX_SECONDS)

    # -- the follower -------------------------------------------------------

    def start(self) -> None:
        """Start the background follower (idempotent)."""
        if self.following:
            return
        self._stop.clear()
        target = self._follow if self._single else self._pick_up_orphans
        self._follower = threading.Thread(target=target, name="kvlog-follower", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        """The follower of a single-replayer cache: become the replayer, then follow the log."""
        try:
            while not self._stop.is_set():
                if not self._role_held:
                    with self._pull_lock:
                        if self._closed:
                            return
                        self._role_held = self._try_lock(False)
                    if not self._role_held:
                        # Another process replays; take over when it is gone.
                        self._stop.wait(TAKEOVER_POLL_SECONDS)
                        continue
                    log.info("this process now replays %s into %s", self._log.describe(), self._cache.path)
                self._follow_steps()
        finally:
            with self._pull_lock:
                if self._role_held and self._lock_fd is not None:
                    self._unlock()
                self._role_held = False

    def _follow_steps(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if self.step(FOLLOW_POLL_SECONDS):
                    # Hand the GIL over now: a thread of this process waiting to
                    # read these records would otherwise get it only when this one
                    # next blocks, after its next fetch's few hundred microseconds
                    # of Python (on Kafka about 0.1-0.3 ms of every write's
                    # cross-instance visibility).
                    time.sleep(0)
                backoff = 0.1
            except ClosedError:
                return
            except Exception as exc:
                if exc is self._fatal:
                    self._stop.set()
                    return  # logged where it was found; sync() and writes raise it
                if isinstance(exc, KVLogError) and exc.retriable:
                    # The log is out of reach for now (brokers restarting): the
                    # reader keeps its position and resumes from it. Waiters
                    # are not failed for it; their own timeout bounds them.
                    log.warning("replay paused: %s; retrying in %.1fs", exc, backoff)
                else:
                    log.exception("replay failed; retrying in %.1fs", backoff)
                    with self._cond:
                        self._error = exc
                        self._cond.notify_all()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _pick_up_orphans(self) -> None:
        """The follower on the embedded log: apply what stays unapplied for longer than one look.

        Writers apply their own records before they return, so this reads
        nothing while they do; records that stay behind the checkpoint (a
        writer killed between its append and its apply, another program
        appending) are replayed within two looks.
        """
        seen: dict[int, int] | None = None
        while not self._stop.wait(ORPHAN_CHECK_SECONDS):
            began = time.time()
            try:
                end = self._log.end_offsets()
                positions = self._refresh_positions()
                if seen is not None and any(positions.get(p, 0) < offset for p, offset in seen.items()):
                    self._wait(seen, time.monotonic() + 5.0, 5.0, None)
                seen = end
            except ClosedError:
                return
            except Exception as exc:  # noqa: BLE001 - logged and looked at again at the next look
                if exc is self._fatal:
                    return
                log.warning("replay of records no writer applied failed: %s", exc)
                self._note_error(exc, began)
                seen = None

    def stop(self) -> None:
        """Stop the background follower and wait for it (idempotent)."""
        self._stop.set()
        reader = self._reader
        if reader is not None:
            reader.wakeup()
        follower, self._follower = self._follower, None
        if follower is not None and follower is not threading.current_thread():
            follower.join()

    def close(self) -> None:
        """Stop following, close the reader and let go of the replay lock. Idempotent."""
        self.stop()
        with self._pull_lock:
            if self._closed:
                return
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._release_files()

    def rebuild_beside(
        self,
        identity: Mapping[str, Any],
        timeout: float | None,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
    ) -> int:
        """Rebuild the cache from the log start in a new generation, then make it the live one.

        Every process (this one too) keeps reading the live cache meanwhile;
        the switch happens once the new generation holds at least what the
        live one holds, so no reader ever sees a half-built cache or an older
        value than it saw. A failure leaves the live cache as it was.

        Returns:
            The number of records the rebuild applied.

        Raises:
            SyncTimeoutError: not done within ``timeout`` seconds (the live cache is kept).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        builder = self._cache.new_generation(identity)
        switched = False
        sub: Replayer | None = None
        try:
            sub = Replayer(
                self._log,
                builder,
                identity=lambda: identity,
                check=self._check,
                checked_codec=self._checked_codec,
                on_bad_record=self._on_bad_record,
                lock=False,
            )
            sub.catch_up(timeout, progress=progress)
            while not self._cache.switch_to(builder):
                # Replay went on in the live cache meanwhile: follow it up, then try again.
                sub.catch_up(None if deadline is None else max(0.001, deadline - time.monotonic()))
            switched = True
            return sub.records_replayed
        finally:
            if sub is not None:
                sub.close()
                with self._cond:
                    self.records_replayed += sub.records_replayed
                    self.records_quarantined += sub.records_quarantined
                    self.quarantined.extend(sub.quarantined)
            if not switched:
                builder.discard()
            with self._pull_lock:
                self._drop_reader()  # the next step starts from the new generation's checkpoint
                self._from_start = False
                self._current_at = self._cache.current_at()

    def abandon_after_fork(self) -> None:
        """In a forked child: close the replay lock's descriptor (it shares the parent's lock)."""
        self._closed = True
        self._follower = None
        self._pull_lock = threading.Lock()
        self._cond = threading.Condition()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        self._role_held = False
