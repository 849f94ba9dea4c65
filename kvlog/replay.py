"""Replay: the only path from the log into the cache.

The :class:`Replayer` reads the log from the cache's checkpoint and applies
what it read in large batches, each batch together with the positions that
follow it in one LMDB transaction. It runs either as a background follower
thread (records from any producer appear without anyone asking) or on demand
in the caller's thread (``follow=False``); both go through :meth:`Replayer.step`.

Waiting is by position: a writer whose record landed at offset ``o`` of
partition ``p`` waits until the applied position of ``p`` is past ``o``
(read-your-writes); ``sync()`` waits until every partition's position reaches
an end-offset snapshot. Positions step over compacted gaps and transaction
markers, so neither ever waits for a record that does not exist.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .cache import Cache
from .errors import ClosedError, SyncTimeoutError
from .log import Log, LogReader, PositionOutOfRangeError

__all__ = ["Replayer"]

log = logging.getLogger(__name__)

#: Records per LMDB transaction while catching up. Large transactions are what
#: make replay fast (one commit, one fsync per batch).
BATCH_RECORDS = 50_000
#: ...but never hold a batch back longer than this once records are waiting.
BATCH_SECONDS = 0.25
#: How long one idle poll of the follower blocks (also how quickly it stops).
FOLLOW_POLL_SECONDS = 0.2
#: How often an idle follower records that the cache is current (a tiny write).
CURRENT_MARK_SECONDS = 10.0


class Replayer:
    """Applies the log to the cache, from the cache's checkpoint onwards.

    Args:
        log: the log to read.
        cache: the cache to apply to; its checkpoint says where to start.
        on_rebuild: called with a reason when a position falls outside the log
            and the cache must be rebuilt from the log start.
    """

    def __init__(self, log: Log, cache: Cache, *, on_rebuild: Callable[[str], None] | None = None) -> None:
        self._log = log
        self._cache = cache
        self._on_rebuild = on_rebuild
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
        self._closed = False
        #: Records applied since this replayer was created.
        self.records_replayed = 0
        #: Records skipped because the cache cannot hold their key.
        self.records_skipped = 0
        self.batches = 0
        self._marked_current_at = 0.0
        # A "current" mark requested while the follower held the pull lock; it
        # writes it after its step (see mark_current).
        self._current_pending: float | None = None
        self._open_reader()

    def _open_reader(self) -> None:
        checkpoint = self._cache.checkpoint()
        begin = self._log.begin_offsets()
        positions = {p: checkpoint.get(p, begin[p]) for p in range(self._log.partitions)}
        if self._reader is not None:
            self._reader.close()
        self._reader = self._log.open_reader(positions)
        with self._cond:
            self._positions = positions
            self._cond.notify_all()

    # -- state --------------------------------------------------------------

    @property
    def positions(self) -> dict[int, int]:
        """The applied position of every partition (equals the cache's checkpoint)."""
        with self._cond:
            return dict(self._positions)

    @property
    def following(self) -> bool:
        """Whether the background follower thread is running."""
        return self._follower is not None and self._follower.is_alive()

    # -- pulling ------------------------------------------------------------

    def step(self, timeout: float, *, max_records: int = BATCH_RECORDS) -> int:
        """Read one batch (waiting up to ``timeout`` for its first record) and apply it.

        Returns:
            The number of records read.
        """
        with self._pull_lock:
            if self._closed:
                raise ClosedError("the replayer is closed")
            try:
                return self._step_locked(timeout, max_records)
            finally:
                pending, self._current_pending = self._current_pending, None
                if pending is not None:
                    self._write_current(pending)

    def _step_locked(self, timeout: float, max_records: int) -> int:
        reader = self._reader
        assert reader is not None
        try:
            records = list(reader.poll(timeout, max_records))
            # Fill the transaction while records keep arriving quickly, so a
            # cold replay commits a few large transactions, not many small ones.
            if records:
                deadline = time.monotonic() + BATCH_SECONDS
                while len(records) < max_records and time.monotonic() < deadline:
                    more = reader.poll(0.0, max_records - len(records))
                    if not more:
                        break
                    records.extend(more)
            positions = reader.positions()
        except PositionOutOfRangeError as exc:
            self._rebuild_locked(str(exc))
            return 0
        with self._cond:
            unchanged = positions == self._positions
        if not records and unchanged:
            self._maybe_mark_current(positions)
            return 0
        applied, skipped = self._cache.apply(records, positions)
        if skipped:
            log.warning(
                "skipped %d record(s) whose key the cache cannot hold (null, empty or > 511 bytes)", skipped
            )
        with self._cond:
            self._positions = positions
            self.records_replayed += applied
            self.records_skipped += skipped
            self.batches += 1
            self._cond.notify_all()
        return len(records)

    def _rebuild_locked(self, reason: str) -> None:
        log.warning("rebuilding the cache from the log start: %s", reason)
        identity = self._cache.identity() or {}
        self._cache.reset(identity)
        self._open_reader()
        if self._on_rebuild is not None:
            self._on_rebuild(reason)

    def reset(self, identity: Mapping[str, Any]) -> None:
        """Empty the cache, bind it to ``identity`` and replay again from the log start."""
        with self._pull_lock:
            self._cache.reset(identity)
            self._open_reader()

    # -- waiting ------------------------------------------------------------

    def _maybe_mark_current(self, positions: Mapping[int, int]) -> None:
        """Now and then, record that an idle reader stands at the end of the log.

        An empty poll alone does not prove it (kafka-python also returns empty
        while the broker is unreachable), so the end offsets are asked, briefly.
        """
        now = time.time()
        if now - self._marked_current_at < CURRENT_MARK_SECONDS:
            return
        self._marked_current_at = now  # also spaces out the attempts while the log is down
        try:
            end = self._log.end_offsets(timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - unknown means not current; retried later
            log.debug("cannot tell whether the cache is current: %s", exc)
            return
        if all(positions.get(p, 0) >= offset for p, offset in end.items()):
            self._cache.mark_current(now)

    def mark_current(self) -> None:
        """Record that the cache is at the end of the log now (after a successful sync).

        Never waits for the follower's idle poll: if the follower holds the
        pull lock, it writes the mark when its step ends (a crash before that
        only makes the cache look less recent than it was).
        """
        now = time.time()
        if self._pull_lock.acquire(blocking=False):
            try:
                self._write_current(now)
            finally:
                self._pull_lock.release()
        else:
            self._current_pending = now

    def _write_current(self, when: float) -> None:
        # Callers hold the pull lock: cache writes (and map resizes) happen in one thread at a time.
        if not self._closed:
            self._cache.mark_current(when)
            self._marked_current_at = when

    def _reached(self, targets: Mapping[int, int]) -> bool:
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
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if self._closed:
                    raise ClosedError("the store was closed while waiting for replay")
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                reached = self._reached(targets)
                positions = dict(self._positions)
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
            if self.following:
                with self._cond:
                    if not self._reached(targets) and not self._closed and self._error is None:
                        self._cond.wait(timeout=min(remaining or 1.0, 1.0))
            else:
                self.step(min(remaining if remaining is not None else 1.0, 1.0))

    # -- the follower -------------------------------------------------------

    def start(self) -> None:
        """Start the background follower (idempotent)."""
        if self.following:
            return
        self._stop.clear()
        self._follower = threading.Thread(target=self._follow, name="kvlog-follower", daemon=True)
        self._follower.start()

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.step(FOLLOW_POLL_SECONDS)
                backoff = 0.1
            except ClosedError:
                return
            except Exception as exc:
                log.exception("replay failed; retrying in %.1fs", backoff)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

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
        """Stop following and close the reader. Idempotent."""
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
