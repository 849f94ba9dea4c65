"""The LMDB cache: the log folded up to a checkpoint.

On disk, an LMDB environment (``data.mdb``, ``lock.mdb``) with two tables:

``data``
    key bytes -> value bytes, exactly as they are in the log (never decoded
    here). A tombstone deletes the key.
``meta``
    ``format`` (an int), ``identity`` (msgpack map: what log this cache
    mirrors, and with which codec) and ``checkpoint`` (msgpack map:
    partition -> position, the next offset to replay).

Crash safety rests on one rule: a batch of records and the checkpoint that
follows it are written in ONE write transaction (:meth:`Cache.apply`). LMDB
commits a transaction atomically, so a crash at any point leaves the cache
equal to the log folded up to the stored checkpoint: some prefix of the log,
never a torn mixture. :meth:`Cache.reset` likewise clears the data and writes
the new identity and an empty checkpoint in one transaction.

Only the replayer writes (from one thread at a time); any number of threads
read. LMDB can only grow its memory map while no transaction of this process
is open, so readers announce themselves (without a lock: see ``Cache.__init__``)
and the writer, between its own transactions, closes the way in and waits for
the readers inside before it resizes.

``Cache(path, sync=False)`` skips the fsync of every commit (LMDB's
``MDB_NOSYNC``): the store uses it when the log itself is not synced on every
write (the embedded log with ``fsync="interval"`` or ``"never"``). A killed
process loses nothing that way (the OS page cache has every commit), but an
OS crash or power loss can leave LMDB pages torn, and LMDB has no checksums to
notice. So an unsynced cache carries an ``UNSYNCED`` file naming the boot it
was written in (Linux's ``/proc/sys/kernel/random/boot_id``); a clean close
syncs and removes it. A cache found with the file of another boot is deleted
before LMDB opens it, and the store rebuilds it from the log
(:attr:`Cache.discarded` says why). Where the boot cannot be identified, the
cache is always synced.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from ._files import fsync_dir, write_file_atomically
from .errors import CacheError, ClosedError

__all__ = ["DEFAULT_MAP_SIZE", "Cache"]

#: Initial map size. Address space, not disk: LMDB files grow as data is
#: written. The map doubles whenever a replay batch does not fit.
DEFAULT_MAP_SIZE = 1 << 30

_FORMAT = 1
_META_FORMAT = b"format"
_META_IDENTITY = b"identity"
_META_CHECKPOINT = b"checkpoint"
_META_CURRENT_AT = b"current_at"

_UNSYNCED = "UNSYNCED"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str | None:
    """An id of the running boot of the OS, or ``None`` where there is none to read."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


#: Keys read per read transaction while iterating, so that a slow consumer of
#: an iterator never pins an old snapshot (nor blocks a map resize) for long.
_SCAN_CHUNK = 512


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class Cache:
    """An LMDB environment holding the folded log and its checkpoint.

    Args:
        path: directory of the LMDB environment; created if missing.
        map_size: initial LMDB map size in bytes; it grows on demand.

    Raises:
        CacheError: the environment cannot be opened (permissions, not an
            LMDB environment, ...).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True
    ) -> None:
        self.path = Path(path)
        #: Why the files found at ``path`` were deleted instead of opened, if they were.
        self.discarded: str | None = None
        boot = _boot_id()
        #: Whether every commit is synced to disk (``False`` only where the boot can be identified).
        self.sync = sync or boot is None
        # Growing the map (mdb_env_set_mapsize) needs every read transaction of
        # this process closed. Readers announce themselves without a lock, on the
        # hot path: a reader appends to _active and then checks _blocked; a
        # resizer (or close) sets _blocked and then checks _active. Both list
        # operations and attribute accesses are atomic and ordered under the GIL,
        # so at least one side sees the other (Dekker): the reader backs off, or
        # the resizer waits for it. Leaving readers wake a waiting resizer.
        self._gate = threading.Condition(threading.Lock())
        self._active: list[None] = []
        self._blocked = False
        self._resize_lock = threading.Lock()
        self._closed = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._discard_if_torn(boot)
            if not self.sync:
                self._mark_unsynced(boot)
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=4,
                # A cache is rebuildable, so it trades the last transaction's
                # durability on an OS crash for one fsync per commit instead of
                # two; integrity is kept either way (LMDB keeps two meta pages).
                metasync=False,
                # Unsynced: see the module docstring (a torn cache is detected
                # by its UNSYNCED file and rebuilt, never read).
                sync=self.sync,
                readahead=False,
                max_readers=512,
            )
            self._page_size = int(self._env.stat()["psize"])
            self._check_size()
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
        except CacheError:
            self._env.close()
            raise
        except lmdb.Error as exc:
            raise CacheError(f"cannot open the cache at {self.path}: {exc}") from exc
        except OSError as exc:
            raise CacheError(f"cannot create the cache directory {self.path}: {exc}") from exc

    def _discard_if_torn(self, boot: str | None) -> None:
        marker = self.path / _UNSYNCED
        try:
            written_in = marker.read_text().strip()
        except FileNotFoundError:
            return
        if boot is not None and written_in == boot:
            return  # the process died, not the OS: every commit is in the page cache
        self.discarded = (
            "the cache was written without fsync and the machine restarted before it was closed "
            "(an OS crash can tear unsynced LMDB pages)"
        )
        for name in ("data.mdb", "lock.mdb", _UNSYNCED):
            (self.path / name).unlink(missing_ok=True)

    def _mark_unsynced(self, boot: str | None) -> None:
        marker = self.path / _UNSYNCED
        if marker.exists():
            return
        write_file_atomically(marker, f"{boot}\n".encode(), sync=True)

    def _check_size(self) -> None:
        # A data file shorter than the pages its meta page claims (truncated by
        # a bad copy or a full disk) would make LMDB touch unmapped memory: the
        # process dies of SIGBUS instead of getting an error. Refuse it first.
        data_file = self.path / "data.mdb"
        needed = (int(self._env.info()["last_pgno"]) + 1) * self._page_size
        actual = data_file.stat().st_size
        if actual < needed:
            raise CacheError(
                f"the cache at {self.path} is damaged: data.mdb has {actual} bytes but its pages need "
                f"{needed}; delete the cache directory (it is rebuilt from the log) or run `kvlog rewarm`"
            )

    def _damaged(self, exc: lmdb.Error) -> CacheError:
        return CacheError(
            f"cannot read the cache at {self.path}: {exc}; delete the cache directory "
            "(it is rebuilt from the log) or run `kvlog rewarm`"
        )

    # -- reading ------------------------------------------------------------

    def _enter(self) -> None:
        active = self._active
        active.append(None)
        if self._blocked:
            active.pop()
            self._enter_slow()

    def _enter_slow(self) -> None:
        with self._gate:
            # A resizer may be waiting for the entry just removed.
            self._gate.notify_all()
            while True:
                if self._closed:
                    raise ClosedError(f"the cache at {self.path} is closed")
                if not self._blocked:
                    self._active.append(None)
                    if not self._blocked:
                        return
                    self._active.pop()
                    self._gate.notify_all()
                self._gate.wait()

    def _leave(self) -> None:
        self._active.pop()
        if self._blocked:
            with self._gate:
                self._gate.notify_all()

    def get(self, key: bytes) -> bytes | None:
        """Return the stored value bytes of ``key``, or ``None`` if absent."""
        # _enter and _leave inlined: this is the point-read hot path.
        active = self._active
        active.append(None)
        if self._blocked:
            active.pop()
            self._enter_slow()
        try:
            # begin/get/abort without the context manager and with a positional
            # db: half the cost of the idiomatic form; a read transaction that
            # raised is aborted when it is collected.
            txn = self._env.begin(self._data)
            value = txn.get(key)
            txn.abort()
            return value  # type: ignore[no-any-return]
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            active.pop()
            if self._blocked:
                with self._gate:
                    self._gate.notify_all()

    def __len__(self) -> int:
        self._enter()
        try:
            with self._env.begin() as txn:
                return int(txn.stat(self._data)["entries"])
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._leave()

    def items(
        self, *, start: bytes | None = None, stop: bytes | None = None, prefix: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` in key order, for ``start <= key < stop`` and keys under ``prefix``.

        Each chunk of keys is read in its own short read transaction: the
        iteration sees writes made while it runs, like iterating a dict that
        changes, but never fails because of them.
        """
        lower = start
        if prefix is not None and (lower is None or lower < prefix):
            lower = prefix
        inclusive = True
        while True:
            chunk: list[tuple[bytes, bytes]] = []
            self._enter()
            try:
                with self._env.begin(db=self._data, buffers=False) as txn:
                    cursor = txn.cursor()
                    positioned = cursor.set_range(lower) if lower is not None else cursor.first()
                    if positioned and not inclusive and cursor.key() == lower:
                        positioned = cursor.next()
                    while positioned and len(chunk) < _SCAN_CHUNK:
                        chunk.append((cursor.key(), cursor.value()))
                        positioned = cursor.next()
            except lmdb.Error as exc:
                raise self._damaged(exc) from exc
            finally:
                self._leave()
            for key, value in chunk:
                if stop is not None and key >= stop:
                    return
                if prefix is not None and not key.startswith(prefix):
                    return
                yield key, value
            if len(chunk) < _SCAN_CHUNK:
                return
            lower, inclusive = chunk[-1][0], False

    def keys(self) -> Iterator[bytes]:
        """Yield every key in order."""
        for key, _ in self.items():
            yield key

    # -- meta ---------------------------------------------------------------

    def _meta_get(self, name: bytes) -> Any:
        self._enter()
        try:
            with self._env.begin(db=self._meta) as txn:
                raw = txn.get(name)
        except lmdb.Error as exc:
            raise self._damaged(exc) from exc
        finally:
            self._leave()
        return None if raw is None else _unpack(raw)

    def identity(self) -> dict[str, Any] | None:
        """Return the identity of the log this cache mirrors, or ``None`` for a new cache."""
        fmt = self._meta_get(_META_FORMAT)
        if fmt is not None and fmt != _FORMAT:
            return {"format": fmt}
        return self._meta_get(_META_IDENTITY)  # type: ignore[no-any-return]

    def checkpoint(self) -> dict[int, int]:
        """Return partition -> next offset to replay (empty for a new or reset cache)."""
        return dict(self._meta_get(_META_CHECKPOINT) or {})

    def current_at(self) -> float | None:
        """Wall-clock time (epoch seconds) when the cache last stood at the end of the log, if known."""
        value = self._meta_get(_META_CURRENT_AT)
        return None if value is None else float(value)

    # -- writing (the replayer only) ----------------------------------------

    def mark_current(self, when: float) -> None:
        """Record that at ``when`` the checkpoint was at the end of the log.

        A reopened cache that is behind asks the log whether compaction dropped
        tombstones past its checkpoint since then (or, where the log cannot
        tell, compares the time away with the tombstone retention).
        """
        if self._closed:
            raise ClosedError(f"the cache at {self.path} is closed")
        try:
            with self._env.begin(write=True, db=self._meta) as txn:
                txn.put(_META_CURRENT_AT, _pack(when))
        except lmdb.Error as exc:
            raise CacheError(f"cannot write to the cache at {self.path}: {exc}") from exc

    def apply(self, records: Iterable[Any], checkpoint: Mapping[int, int]) -> tuple[int, int]:
        """Apply records in order and store ``checkpoint``, in ONE write transaction.

        Each record has ``key`` and ``value`` attributes; ``value=None`` is a
        tombstone. Records whose key the cache cannot hold (null, empty or
        longer than 511 bytes, possible only from foreign producers) are
        skipped and counted.

        Returns:
            ``(applied, skipped)`` record counts.

        Raises:
            CacheError: LMDB failed (e.g. the disk is full); nothing of this
                batch was written.
            ClosedError: the cache is closed.
        """
        if self._closed:
            raise ClosedError(f"the cache at {self.path} is closed")
        records = records if isinstance(records, list) else list(records)
        packed_checkpoint = _pack(dict(checkpoint))
        # The writer does not pass the reader gate: only the writer ever
        # resizes, and only between its own transactions, so readers are the
        # only transactions a resize must wait for. (Passing the gate here
        # would let busy readers starve replay of the gate's lock.)
        self._grow_ahead(records)
        while True:
            try:
                return self._apply_once(records, packed_checkpoint)
            except lmdb.MapFullError:
                pass  # grow, then write the whole batch again: the failed txn was aborted
            except lmdb.Error as exc:
                raise CacheError(f"cannot write to the cache at {self.path}: {exc}") from exc
            self._grow()

    def _apply_once(self, records: list[Any], packed_checkpoint: bytes) -> tuple[int, int]:
        skipped = 0
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(self._data)
            put = cursor.put
            delete = txn.delete
            data = self._data
            for record in records:
                key = record.key
                if not key or len(key) > 511:
                    skipped += 1
                    continue
                value = record.value
                if value is None:
                    delete(key, db=data)
                else:
                    put(key, value)
            txn.put(_META_CHECKPOINT, packed_checkpoint, db=self._meta)
        return len(records) - skipped, skipped

    def reset(self, identity: Mapping[str, Any], checkpoint: Mapping[int, int] | None = None) -> None:
        """Drop every entry and bind the cache to ``identity``, in one transaction.

        A crash during a reset leaves either the old cache or an empty cache
        bound to the new identity; both are consistent.
        """
        if self._closed:
            raise ClosedError(f"the cache at {self.path} is closed")
        try:
            with self._env.begin(write=True) as txn:
                txn.drop(self._data, delete=False)
                txn.put(_META_FORMAT, _pack(_FORMAT), db=self._meta)
                txn.put(_META_IDENTITY, _pack(dict(identity)), db=self._meta)
                txn.put(_META_CHECKPOINT, _pack(dict(checkpoint or {})), db=self._meta)
                # A replay from the log start that begins now misses no delete
                # unless the log drops tombstones before the replay reaches
                # them: the same bound as a cache that was current now.
                txn.put(_META_CURRENT_AT, _pack(time.time()), db=self._meta)
        except lmdb.Error as exc:
            raise CacheError(f"cannot reset the cache at {self.path}: {exc}") from exc

    def _grow_ahead(self, records: list[Any]) -> None:
        """Grow the map before a batch that may not fit, rather than after MapFullError.

        LMDB gets very slow close to a full map while readers pin old pages
        (each page allocation rescans the free list), so kvlog keeps the map at
        least twice as large as what the data and the coming batch may need.
        """
        incoming = 0
        for record in records:
            value = record.value
            incoming += len(record.key or b"") + (len(value) if value is not None else 0) + 16
        info = self._env.info()
        used = (info["last_pgno"] + 1) * self._page_size
        while 2 * (used + 2 * incoming) > self._env.info()["map_size"]:
            self._grow()

    def _grow(self) -> None:
        with self._resize_lock, self._gate:
            self._blocked = True
            try:
                while self._active:
                    self._gate.wait()
                new_size = self._env.info()["map_size"] * 2
                try:
                    self._env.set_mapsize(new_size)
                except lmdb.Error as exc:
                    raise CacheError(
                        f"the cache at {self.path} is full and cannot grow to {new_size} bytes: {exc}"
                    ) from exc
            finally:
                self._blocked = self._closed
                self._gate.notify_all()

    # -- housekeeping -------------------------------------------------------

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes."""
        return int(self._env.info()["map_size"])

    def disk_bytes(self) -> int:
        """Bytes the cache files take on disk."""
        total = 0
        for name in ("data.mdb", "lock.mdb"):
            try:
                total += (self.path / name).stat().st_blocks * 512
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Close the environment once no reader is inside. Idempotent."""
        with self._gate:
            if self._closed:
                return
            self._closed = True
            self._blocked = True
            while self._active:
                self._gate.wait()
        try:
            marker = self.path / _UNSYNCED
            if marker.exists():
                # Everything is on disk now: the cache survives a reboot.
                self._env.sync(True)
                marker.unlink()
                fsync_dir(self.path)
        finally:
            self._env.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        return f"<Cache {str(self.path)!r}{' closed' if self._closed else ''}>"
