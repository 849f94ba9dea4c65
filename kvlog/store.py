"""KVLog: a dict whose source of truth is a compacted log.

:class:`KVLog` is the front door; the pieces behind it are one module each:

* the **log** (:mod:`kvlog.log`): the embedded log on local files
  (:class:`~kvlog.log.local.LocalLog`, the default) or a compacted Kafka topic
  (:class:`~kvlog.log.kafka.KafkaLog`); both behind one interface, and any
  object implementing it can be passed as ``log=``;
* the **cache** (:mod:`kvlog.cache`): an LMDB environment holding each key's
  last value bytes and, in the same transaction, the checkpoint (the log
  position those values reflect) and the identity of the log it mirrors;
* **replay** (:mod:`kvlog.replay`): the only path from the log into the
  cache, in log order, run by a background follower thread or by the caller;
* the **codec** (:mod:`kvlog.codec`): values to bytes and back.

Every process on a machine may open the same data directory at once and
shares its log and its one cache. A write encodes and checks the record,
appends it to the log and returns once the shared cache holds it
(read-your-writes, in every process): on the embedded log the writer applies
its own records in its own thread while it still holds the log's write lock,
on Kafka it waits for the process that follows the topic. A read is one LMDB
lookup and one decode, with no lock and no log access. Opening compares the cache's identity
and checkpoint with the log: a cache that matches replays only what came after
its checkpoint (a warm start), one that does not is rebuilt from the log start,
never trusted. docs/design.md has the data flow, the invariants and the
on-disk formats; the README's "Guarantees and failure modes" has what each
failure does.
"""

from __future__ import annotations

import itertools
import logging
import operator
import os
import reprlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from . import _fork
from ._files import DEFAULT_FILE_MODE, check_file_mode
from .cache import DEFAULT_MAP_SIZE, Cache
from .codec import MAX_KEY_SIZE, Codec, decode_key, encode_key, get_codec
from .errors import CacheError, ClosedError, RecordTooLargeError
from .log import Log, oversize_record, partitions_changed_error
from .log.local import LocalLog
from .replay import BAD_RECORD_POLICIES, Replayer

__all__ = ["KVLog"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# One reopen at a time in a forked child (threads started there may race to it).
_reopen_lock = threading.Lock()
_MISSING: Any = object()
# A str key of at most this many characters encodes to at most MAX_KEY_SIZE
# bytes of UTF-8 (4 bytes a character at worst), so reads skip the length check.
_FAST_KEY_CHARS = MAX_KEY_SIZE // 4

#: The built-in msgpack codec, whose values a point read unpacks with msgpack's C function directly.
_MSGPACK = get_codec("msgpack")

#: Records sent per append call by :meth:`KVLog.update`.
UPDATE_BATCH = 10_000

# The caches this process has open, by directory: stores of one process on one
# data directory share one Cache (LMDB forbids opening an environment twice in
# a process: closing one handle drops the other's locks).
_open_caches: dict[Path, list[Any]] = {}
_open_caches_lock = threading.Lock()


def _open_shared_cache(path: Path, **options: Any) -> Cache:
    key = path.absolute()
    with _open_caches_lock:
        entry = _open_caches.get(key)
        if entry is not None and not entry[0].closed:
            entry[1] += 1
            return entry[0]  # type: ignore[no-any-return]
        cache = Cache(path, **options)
        _open_caches[key] = [cache, 1]
        return cache


def _close_shared_cache(cache: Cache) -> None:
    key = cache.path.absolute()
    with _open_caches_lock:
        entry = _open_caches.get(key)
        if entry is not None and entry[0] is cache:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _open_caches[key]
    cache.close()


def _forget_caches_in_child() -> None:
    global _open_caches_lock
    _open_caches.clear()
    _open_caches_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_caches_in_child)


#: Value types the msgpack codec takes as they are, and the map keys it reads back (see _encode_records).
_MSGPACK_LEAVES = frozenset((str, bytes, int, float, bool, type(None)))
_MSGPACK_MAP_KEYS = frozenset((str, bytes))
_MSGPACK_LEAVES_AND_DICT = _MSGPACK_LEAVES | {dict}
_STR = frozenset((str,))
_DICT_ITEMS: type[Any] = type({}.items())
_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _encode_msgpack_batch(
    keys: list[Any], values: list[Any], pack: Callable[[Any], bytes]
) -> list[tuple[bytes, bytes]] | None:
    """:func:`_encode_records` with the msgpack codec, whole columns at a time; None if it cannot be.

    Only for the batch it is cheap for: every key a short ``str`` and every
    value a leaf or a flat dict of leaves with ``str`` or ``bytes`` keys, all
    checked by C loops over the whole batch (the record-by-record fast case of
    _encode_records, without a Python statement per record). Anything else,
    or a key or value that fails to encode, gives None: the caller encodes
    record by record, which raises the documented errors.
    """
    if not keys or not _STR.issuperset(map(type, keys)):
        return None
    if min(map(len, keys)) == 0 or max(map(len, keys)) > _FAST_KEY_CHARS:
        return None
    value_types = set(map(type, values))
    if not _MSGPACK_LEAVES.issuperset(value_types):
        if not _MSGPACK_LEAVES_AND_DICT.issuperset(value_types):
            return None
        if len(value_types) == 1:
            dicts = values  # (the common batch: every value a dict)
        else:
            dicts = list(
                itertools.compress(values, map(operator.is_, map(type, values), itertools.repeat(dict)))
            )
        chain = itertools.chain.from_iterable
        if not _MSGPACK_MAP_KEYS.issuperset(map(type, chain(dicts))) or not _MSGPACK_LEAVES.issuperset(
            map(type, chain(map(dict.values, dicts)))
        ):
            return None
    try:
        return list(zip(map(str.encode, keys), map(pack, values), strict=True))
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError):
        return None  # a lone surrogate, an int msgpack cannot hold: found again record by record


def _encode_records(items: Iterable[tuple[Any, Any]], codec: Codec) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` pairs as ``update()`` sends them: each key by ``encode_key``, each value by ``codec``.

    The same bytes, and the same errors, as ``(encode_key(k), codec.encode(v))``
    for every pair. The common cases cost less: a short ``str`` key is
    encoded in place (an unencodable one is encoded again by ``encode_key``,
    for its error), and with the built-in msgpack codec one packer serves the
    whole batch, and a value that is a leaf or a flat dict of leaves with
    ``str`` or ``bytes`` keys is taken as packed (the codec's own fast case);
    any other value, or one that fails to pack, goes through ``codec.encode``,
    which checks it exactly and raises the error it documents.
    """
    msgpack_codec = codec is _MSGPACK
    # A packer per call, set up as the codec sets up its own: update() may run in several
    # threads at once. It packs only values whose types run no Python code while packed.
    pack = msgpack.Packer(use_bin_type=True).pack
    leaves, map_keys = _MSGPACK_LEAVES, _MSGPACK_MAP_KEYS
    if msgpack_codec:
        if type(items) is _DICT_ITEMS:
            # update(a dict): its keys and values as lists straight from the dict.
            mapping = items.mapping  # type: ignore[attr-defined]  # (checked just above)
            fast = _encode_msgpack_batch(list(mapping), list(mapping.values()), pack)
        else:
            items = list(items)  # (read once: it may be an iterator)
            fast = _encode_msgpack_batch(list(map(_first, items)), list(map(_second, items)), pack)
        if fast is not None:
            return fast
    records: list[tuple[bytes, bytes]] = []
    add = records.append
    encode = codec.encode
    for k, v in items:
        if type(k) is str and 0 < len(k) <= _FAST_KEY_CHARS:
            try:
                key = k.encode()
            except UnicodeEncodeError:
                key = encode_key(k)  # a lone surrogate: raises the documented ValueError
        else:
            key = encode_key(k)
        if msgpack_codec:
            t = type(v)
            if t in leaves or (
                t is dict and map_keys.issuperset(map(type, v)) and leaves.issuperset(map(type, v.values()))
            ):
                try:
                    add((key, pack(v)))
                    continue
                except (TypeError, ValueError, OverflowError):
                    pass  # encode() raises it as the codec's own TypeError
        add((key, encode(v)))
    return records


class KVLog(MutableMapping[Any, Any]):
    """A persistent dict over a compacted log, with reads served from a local LMDB cache.

    ``KVLog(path)`` is a database on one machine: an embedded compacted log in
    ``path/log`` and the cache in ``path/cache``. Any number of processes open
    the same ``path`` at once (a service's workers, the ``kvlog`` command
    beside them), each with full read and write access, all sharing one
    cache. A store opened before ``fork()`` opens again in the child at its
    first use there (the gunicorn ``--preload`` pattern). ``KVLog(path,
    bootstrap_servers=..., topic=...)`` mirrors a compacted Kafka topic
    instead, with the same semantics. Opening replays whatever the log holds
    beyond the cache's checkpoint, so the store is ready when the constructor
    returns: a warm restart replays only the tail, a lost or mismatched cache
    is rebuilt from the whole log.

    Keys are ``str`` (stored as UTF-8) or ``bytes``; iteration returns them in
    byte order, as ``key_type`` (``str`` by default). Values are anything the
    codec encodes (msgpack by default). A stored ``None`` is a value; ``del``
    writes a tombstone.

    Args:
        path: the data directory (created if missing). The LMDB environment
            lives in ``path/cache``, the embedded log (when no broker is named)
            in ``path/log``.
        bootstrap_servers: Kafka brokers, ``"host:port[,host:port]"``; with
            ``topic``, use Kafka instead of the embedded log.
        topic: the compacted topic to mirror; created if missing.
        log: any :class:`kvlog.log.Log` instead of ``bootstrap_servers`` and
            ``topic`` (the store closes it on ``close()``).
        codec: ``"msgpack"``, ``"json"``, ``"str"``, ``"bytes"`` or a
            :class:`~kvlog.Codec`. Part of the cache identity.
        key_type: ``str`` or ``bytes``: the type keys are returned as.
        follow: run a background thread that applies records from any producer
            as they arrive. With ``False`` the cache moves only in ``sync()``
            and in this store's own writes.
        timeout: seconds to wait for the broker when connecting and per write
            (the write raises :class:`~kvlog.BrokerUnavailableError` after it).
        ready_timeout: seconds to wait for the initial replay; ``None`` waits
            as long as it takes.
        partitions, replication_factor, topic_config: used when creating the topic.
        create_topic: create a missing topic (compacted).
        allow_non_compacted: accept a topic whose ``cleanup.policy`` is not
            ``compact`` (its expired records vanish from a rebuilt cache).
        kafka_config: settings passed as they are to every kafka-python client
            (``security_protocol``, ``sasl_*``, ``ssl_*``, ...).
        map_size: initial LMDB map size in bytes (it grows on demand).
        fsync: durability of the embedded log: ``"always"`` (a write returns
            after fdatasync), ``"interval"`` (synced every second) or
            ``"never"``. See :class:`~kvlog.log.local.LocalLog`.
        progress: ``progress(applied, targets)``, called with per-partition
            offsets while the opening replay runs (for progress bars).
        on_bad_record: what replay does with a record from a foreign producer
            that the cache cannot take (a null key, a key over 511 bytes, a
            value the codec rejects): ``"quarantine"`` (the default) skips it
            (the key keeps its previous value), counts it in
            ``stats()["records_quarantined"]``, lists it in
            ``stats()["quarantined"]`` and logs its partition, offset and
            reason; ``"raise"`` stops replay at it: the open, ``sync()``,
            writes and the follower raise :class:`~kvlog.BadRecordError`.
        file_mode: permission bits of every file kvlog creates for this store
            (cache, embedded log, markers): ``0o600`` by default, so only the
            owner can read the data; directories get the matching search bits
            (``0o640`` gives directories ``0o750``). Applied whatever the
            umask; files that already exist keep their modes.

    Raises:
        BrokerUnavailableError: no broker answered within ``timeout``.
        TopicConfigError: the topic is not compacted (or missing and not
            created), or it has more partitions than when the cache was built.
        BadRecordError: ``on_bad_record="raise"`` and the log holds a record
            the cache cannot take.
        CacheError: the cache directory cannot be opened, or it is damaged and
            cannot be moved aside (a damaged cache is otherwise moved to
            ``path/cache.corrupt-<time>``, named in a warning and in ``rebuilds``,
            and rebuilt from the log).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bootstrap_servers: str | Sequence[str] | None = None,
        topic: str | None = None,
        log: Log | None = None,
        codec: str | Codec = "msgpack",
        key_type: type = str,
        follow: bool = True,
        timeout: float = 30.0,
        ready_timeout: float | None = None,
        partitions: int = 1,
        replication_factor: int = 1,
        topic_config: Mapping[str, str] | None = None,
        create_topic: bool = True,
        allow_non_compacted: bool = False,
        kafka_config: Mapping[str, Any] | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
        fsync: str = "always",
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
        file_mode: int = DEFAULT_FILE_MODE,
        on_bad_record: str = "quarantine",
    ) -> None:
        try:
            check_file_mode(file_mode)
            if key_type not in (str, bytes):
                raise TypeError("key_type must be str or bytes")
            if on_bad_record not in BAD_RECORD_POLICIES:
                raise ValueError(
                    f"on_bad_record must be one of {', '.join(map(repr, BAD_RECORD_POLICIES))}, "
                    f"not {on_bad_record!r}"
                )
            self._on_bad_record = on_bad_record
            self._codec = get_codec(codec)
            self._decode = self._codec.decode
            self._encode = self._codec.encode
            if log is not None and (bootstrap_servers is not None or topic is not None):
                raise ValueError("pass either log= or bootstrap_servers= and topic=, not both")
            embedded = log is None and bootstrap_servers is None and topic is None
            if fsync != "always" and not embedded:
                raise ValueError(
                    "fsync= applies to the embedded log KVLog creates; Kafka's durability is acks=all"
                )
        except BaseException:
            if log is not None:
                log.close()  # the store owns a log it is given, also when it refuses the rest
            raise
        self.path = Path(path)
        self._key_type = key_type
        self._timeout = timeout
        self._closed = True  # until fully open: close() must be safe on a half-built store
        self._forked = False
        # What a forked child opens again (None: a log= object, which the child cannot reuse).
        self._reopen_with: dict[str, Any] | None = (
            None
            if log is not None
            else {
                "bootstrap_servers": bootstrap_servers,
                "topic": topic,
                "codec": codec,
                "key_type": key_type,
                "follow": follow,
                "timeout": timeout,
                "ready_timeout": ready_timeout,
                "partitions": partitions,
                "replication_factor": replication_factor,
                "topic_config": topic_config,
                "create_topic": create_topic,
                "allow_non_compacted": allow_non_compacted,
                "kafka_config": kafka_config,
                "map_size": map_size,
                "fsync": fsync,
                "file_mode": file_mode,
                "on_bad_record": on_bad_record,
            }
        )
        # The embedded log, whose writers apply their own records (see _write), or None.
        self._local_log: LocalLog | None = None
        self._cache: Cache | None = None
        self._replayer: Replayer | None = None
        self._log: Log | None = None
        self.rebuilds: list[str] = []
        if embedded:
            log = LocalLog(self.path / "log", partitions=partitions, fsync=fsync, file_mode=file_mode)
        elif log is None:
            if bootstrap_servers is None or topic is None:
                raise ValueError("a Kafka store needs both bootstrap_servers= and topic=")
            from .log.kafka import KafkaLog

            log = KafkaLog(
                bootstrap_servers,
                topic,
                partitions=partitions,
                replication_factor=replication_factor,
                topic_config=topic_config,
                create_topic=create_topic,
                allow_non_compacted=allow_non_compacted,
                timeout=timeout,
                kafka_config=kafka_config,
            )
        self._log = log
        try:
            # The cache is written without fsync: the log is what a write
            # makes durable (on the embedded log with fsync="always", one
            # fdatasync per write, not two; on Kafka, acks=all, with no disk
            # sync in the write's path at all), and a cache an OS crash may
            # have torn is found at the next open and rebuilt from the log
            # (see kvlog.cache).
            def open_cache() -> Cache:
                # A damaged cache is set aside (named in the rebuild reason) and rebuilt.
                return _open_shared_cache(
                    self.path / "cache",
                    map_size=map_size,
                    sync=False,
                    file_mode=file_mode,
                    move_damaged=True,
                )

            self._cache = open_cache()
            self._cache_get = self._cache.get
            self._read = self._cache.value_reader(self._decode, unpack_msgpack=self._codec is _MSGPACK)
            try:
                self._open_replay(ready_timeout, progress)
            except CacheError:
                if not self._cache.damaged:
                    raise
                # LMDB found damage that the checks at open could not see (the
                # file changed without its size or times changing): set it
                # aside and rebuild, once.
                if self._replayer is not None:
                    self._replayer.close()
                    self._replayer = None
                _close_shared_cache(self._cache)
                self._cache = open_cache()
                self._cache_get = self._cache.get
                self._read = self._cache.value_reader(self._decode, unpack_msgpack=self._codec is _MSGPACK)
                self._open_replay(ready_timeout, progress)
            # The embedded log calls back while it still holds its write
            # lock: the writer applies its own records (see _write).
            if isinstance(self._log, LocalLog):
                self._local_log = self._log
                self._apply_appended_one = self._cache.apply_appended_one
            self._closed = False
            _fork.register(self)
            if follow:
                assert self._replayer is not None
                self._replayer.start()
        except BaseException:
            self._closed = False
            self.close()
            raise

    # -- opening ------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        assert self._log is not None
        return {**self._log.identity(), "codec": self._codec.name}

    def _stale_reason(self, identity: Mapping[str, Any]) -> str | None:
        """Why the cache cannot be trusted for this log, or ``None`` if it can."""
        assert self._cache is not None and self._log is not None
        cached = self._cache.identity()
        if cached is None:
            return self._cache.discarded or "new cache"
        if cached != identity:
            changed = sorted(k for k in set(cached) | set(identity) if cached.get(k) != identity.get(k))
            if "partitions" in changed and cached.get("topic_id") == identity.get("topic_id") is not None:
                # The same topic with more partitions: no replay can be trusted
                # (see partitions_changed_error), so refuse rather than rebuild.
                raise partitions_changed_error(
                    self._log.describe(), cached["partitions"], identity["partitions"]
                )
            details = ", ".join(f"{k}: {cached.get(k)!r} -> {identity.get(k)!r}" for k in changed)
            return f"the cache mirrors another log ({details})"
        checkpoint = self._cache.checkpoint()
        if not checkpoint:
            return None
        begin, end = self._log.begin_offsets(), self._log.end_offsets()
        for p in range(self._log.partitions):
            position = checkpoint.get(p, 0)
            if position < begin[p]:
                return f"checkpoint {position} of partition {p} is below the log start offset {begin[p]}"
            if position > end[p]:
                return f"checkpoint {position} of partition {p} is past the log end offset {end[p]}"
        behind = any(checkpoint.get(p, 0) < end[p] for p in range(self._log.partitions))
        if not behind:
            return None
        current_at = self._cache.current_at()
        dropped = self._log.tombstones_dropped_after(checkpoint, current_at or 0.0)
        if dropped:
            return "compaction dropped tombstones past the checkpoint since the cache was last current"
        retention = self._log.tombstone_retention_seconds
        if dropped is None and retention is not None:
            # The log cannot tell (Kafka): a cache away for longer than the
            # topic keeps tombstones may have missed one.
            away = None if current_at is None else time.time() - current_at
            if away is None or away > retention:
                since = "an unknown time" if away is None else f"{away:.0f}s"
                return (
                    f"the cache was last current {since} ago, longer than the topic keeps tombstones "
                    f"(delete.retention.ms={retention * 1000:.0f}); deletes made meanwhile may be compacted away"
                )
        return None

    def _open_replay(
        self,
        ready_timeout: float | None,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None,
    ) -> None:
        assert self._cache is not None and self._log is not None
        started = time.monotonic()
        identity = self._identity()
        # Decided and done under the cache directory's lock: two processes
        # opening a stale cache at once rebuild it once, not twice.
        with self._cache.directory_lock():
            reason = self._stale_reason(identity)
            if reason is not None:
                if reason != "new cache":
                    log.warning("rebuilding the cache at %s: %s", self.path, reason)
                self.rebuilds.append(reason)
                self._cache.reset(identity)
            checkpoint_before = self._cache.checkpoint()
        self._replayer = Replayer(
            self._log,
            self._cache,
            identity=self._identity,
            on_rebuild=self.rebuilds.append,
            check=self._codec.value_check(),
            # The values kvlog's msgpack codec wrote (the embedded log's frames say which).
            checked_codec="msgpack" if self._codec is _MSGPACK else None,
            on_bad_record=self._on_bad_record,
            # One process per cache follows a topic; on the embedded log every writer replays.
            single_replayer=not isinstance(self._log, LocalLog),
        )
        self._replayer.catch_up(ready_timeout, progress=progress)
        self.open_replay: dict[str, Any] = {
            "mode": "warm" if checkpoint_before else "cold",
            "rebuild_reason": reason,
            "records": self._replayer.records_replayed,
            "seconds": round(time.monotonic() - started, 3),
        }

    # -- helpers ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            self._reopen_after_fork()

    def _reopen_after_fork(self) -> None:
        """In a child forked while this store was open: open it again here; otherwise raise ClosedError."""
        if not self._forked or self._reopen_with is None:
            raise self._closed_error()
        with _reopen_lock:
            if self._closed:
                log.debug("opening %s again in forked process %d", self.path, os.getpid())
                self.__init__(self.path, **self._reopen_with)  # type: ignore[misc]

    def _write(self, records: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Append to the log, then wait until the shared cache holds every record (read-your-writes)."""
        assert self._log is not None and self._replayer is not None
        # A replay that stopped for good (partitions added to the topic, a bad
        # record under on_bad_record="raise") could never apply this write.
        self._replayer.check_usable()
        started = time.monotonic()
        if self._local_log is not None:
            applied = self._append_and_apply(records)
            if applied is None:
                return
            positions = applied
        else:
            # Held until the records are in the cache, or left to replay: the
            # log's readers in this process do not compete with the write.
            with self._log.writing():
                positions = self._log.append(records, timeout=self._timeout)
                # Acknowledged: put them into the cache now if they are the next
                # records (no waiting for the follower to fetch them back).
                if self._replayer.apply_own(records, positions):
                    return
        targets: dict[int, int] = {}
        for partition, offset in positions:
            if offset + 1 > targets.get(partition, -1):
                targets[partition] = offset + 1
        self._replayer.wait_for(targets, max(0.001, self._timeout - (time.monotonic() - started)))

    def _append_and_apply(
        self, records: Sequence[tuple[bytes, bytes | None]]
    ) -> list[tuple[int, int]] | None:
        """Append to the embedded log and put the records into the shared cache under its write lock.

        While the log's write lock is held nothing else is appended, so if
        the cache's checkpoint is the log end from before this append, these
        records are exactly the next ones to replay: they commit in one LMDB
        transaction with the new end as the checkpoint, without being read
        back. Otherwise (records another writer appended but did not apply:
        it was killed in between) the caller replays from the log.

        Returns:
            ``None`` if the records are in the cache, else their positions.
        """
        assert isinstance(self._log, LocalLog) and self._cache is not None
        apply = self._cache.apply_appended
        done = False

        def on_appended(
            before: dict[int, int], positions: list[tuple[int, int]], after: dict[int, int]
        ) -> None:
            nonlocal done
            done = apply(records, before, after)

        positions = self._log.append(
            records,
            timeout=self._timeout,
            on_appended=on_appended,
            # Its msgpack codec encoded (and so checked) every value: replay need not again.
            msgpack_values=self._codec is _MSGPACK,
        )
        return None if done else positions

    # -- the mapping --------------------------------------------------------

    # The three read methods below are the point-read hot path: they inline the
    # common case of encode_key (a str short enough that its UTF-8 cannot pass
    # MAX_KEY_SIZE) and call the cache and codec through bound methods.

    def __getitem__(self, key: str | bytes) -> Any:
        if self._closed:
            self._reopen_after_fork()  # raises ClosedError unless this is a forked child
        if type(key) is str and 0 < len(key) <= _FAST_KEY_CHARS:
            try:
                data = key.encode()
            except UnicodeEncodeError:
                data = encode_key(key)  # raises the documented ValueError
        else:
            data = encode_key(key)
        value = self._read(data, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` if it is absent."""
        if self._closed:
            self._reopen_after_fork()  # raises ClosedError unless this is a forked child
        if type(key) is str and 0 < len(key) <= _FAST_KEY_CHARS:
            try:
                data = key.encode()
            except UnicodeEncodeError:
                data = encode_key(key)
        else:
            data = encode_key(key)
        return self._read(data, default)

    def get_stored(self, key: str | bytes, default: Any = None) -> Any:
        """Return the bytes of ``key``'s value as the cache stores them (the codec's encoding), or ``default``.

        The bytes are the record's value as it is in the log, not decoded:
        every process reading the same value gets the same bytes, so a hash of
        them identifies the value (``kvlog serve`` makes its ETags so).
        ``codec.decode`` of them is what :meth:`get` returns.
        """
        self._check_open()
        assert self._cache is not None
        value = self._cache.get(encode_key(key))
        return default if value is None else value

    @property
    def codec(self) -> Codec:
        """The codec values are stored with (``codec.decode(get_stored(k))`` is ``get(k)``)."""
        return self._codec

    def cache_version(self) -> tuple[int, int]:
        """A value that changes whenever the shared cache may have changed, whoever changed it.

        Cheap enough to poll every millisecond (two reads of mapped memory, no
        LMDB transaction): compare it with the one read before, and re-read
        the keys of interest only when it moved. Every write applied to the
        cache by any process sharing it (or by this store's follower) moves
        it; it may also move without any value changing. ``kvlog serve``'s
        long-polls learn of other processes' writes this way (docs/design.md,
        "Serving over HTTP").
        """
        self._check_open()
        assert self._cache is not None
        return self._cache.version()

    def __contains__(self, key: object) -> bool:
        if self._closed:
            self._reopen_after_fork()  # raises ClosedError unless this is a forked child
        return self._cache_get(encode_key(key)) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: str | bytes, value: Any) -> None:
        """Write ``value`` to the log; return once it is durable and visible in this cache.

        Raises:
            TypeError, ValueError: bad key or unencodable value (nothing written).
            RecordTooLargeError: the record is larger than the topic accepts.
            BrokerUnavailableError: the broker did not acknowledge in time.
            NotEnoughReplicasError: the partition has fewer in-sync replicas
                than the topic's ``min.insync.replicas``.
            SyncTimeoutError: the write is in the log but the cache did not
                show it within ``timeout``.

        The last three are ``retriable``: the same write may succeed later.
        A write that raised one may still be in the log (see
        :class:`~kvlog.KVLogError`).
        """
        if self._closed:
            self._reopen_after_fork()  # raises ClosedError unless this is a forked child
        data = encode_key(key)
        encoded = self._encode(value)
        local = self._local_log
        if local is None:
            self._write([(data, encoded)])
            return
        # The single write on the embedded log: _write and _append_and_apply
        # for one record, with a call frame less at each step.
        replayer = self._replayer
        assert replayer is not None
        replayer.check_usable()
        started = time.monotonic()
        p, offset, applied = local.append_one(
            data, encoded, self._apply_appended_one, msgpack_values=self._codec is _MSGPACK
        )
        if not applied:
            replayer.wait_for({p: offset + 1}, max(0.001, self._timeout - (time.monotonic() - started)))

    def __delitem__(self, key: str | bytes) -> None:
        """Write a tombstone for ``key``.

        Raises:
            KeyError: ``key`` is not in the cache (nothing is written).
        """
        self._check_open()
        assert self._cache is not None
        data = encode_key(key)
        if self._cache.get(data) is None:
            raise KeyError(key)
        self._write([(data, None)])

    def discard(self, key: str | bytes) -> None:
        """Write a tombstone for ``key`` whether or not the cache holds it."""
        self._check_open()
        self._write([(encode_key(key), None)])

    def __iter__(self) -> Iterator[Any]:
        self._check_open()
        assert self._cache is not None
        key_type = self._key_type
        for key in self._cache.keys():
            yield decode_key(key, key_type)

    def __len__(self) -> int:
        self._check_open()
        assert self._cache is not None
        return len(self._cache)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Write many keys: encoded and checked first, sent in batches, one wait per batch.

        Every key, value and record size is checked before anything is sent,
        so bad input writes nothing. The batch is not atomic: if the broker fails
        part-way, the records sent before the failure stay in the log.
        """
        self._check_open()
        items: Iterable[tuple[Any, Any]]
        if isinstance(other, Mapping):
            items = other.items()
        elif hasattr(other, "keys"):
            items = ((k, other[k]) for k in other.keys())
        else:
            items = other
        records = _encode_records(items, self._codec)
        if kwargs:
            records.extend(_encode_records(kwargs.items(), self._codec))
        if len(records) > UPDATE_BATCH:
            # The log checks the size of each batch it is given, but only that
            # batch: a record too large for the second batch would otherwise
            # be found after the first was written.
            self._check_sizes(records)
        for start in range(0, len(records), UPDATE_BATCH):
            self._write(records[start : start + UPDATE_BATCH])

    def _check_sizes(self, records: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Raise RecordTooLargeError if any record is larger than the log accepts (before anything is sent)."""
        assert self._log is not None
        limit = self._log.max_record_bytes
        if limit is None:
            return
        # The longest key plus the longest value bound every record's size (loops in C).
        if max(map(len, map(_first, records))) + max(map(len, map(_second, records))) <= limit:
            return
        oversize = oversize_record(records, limit)
        if oversize is not None:
            key, size = oversize
            raise RecordTooLargeError(
                f"the record for key {reprlib.repr(key)} is {size} bytes; {self._log.describe()} "
                f"accepts at most {limit} bytes (key + value); nothing was written"
            )

    def clear(self) -> None:
        """Write a tombstone for every key in the cache (in batches)."""
        self._check_open()
        assert self._cache is not None
        keys = list(self._cache.keys())
        for start in range(0, len(keys), UPDATE_BATCH):
            self._write([(k, None) for k in keys[start : start + UPDATE_BATCH]])

    # -- beyond the mapping -------------------------------------------------

    def scan(
        self,
        prefix: str | bytes | None = None,
        *,
        start: str | bytes | None = None,
        stop: str | bytes | None = None,
    ) -> Iterator[tuple[Any, Any]]:
        """Return an iterator of ``(key, value)`` pairs in key order.

        The arguments are checked when ``scan`` is called, not at the first
        ``next()``: a bad prefix fails where it was passed.

        Args:
            prefix: only keys that start with it.
            start: only keys ``>= start``.
            stop: only keys ``< stop``.

        Raises:
            TypeError: an argument is neither ``str`` nor ``bytes``.
            ValueError: an argument cannot be encoded as UTF-8 (or, for
                ``start``/``stop``, is not a key the cache can hold).
        """
        self._check_open()
        assert self._cache is not None
        lo = None if start is None else encode_key(start)
        hi = None if stop is None else encode_key(stop)
        pre = None if prefix is None else _encode_prefix(prefix)
        return self._scan(self._cache.items(start=lo, stop=hi, prefix=pre))

    def _scan(self, items: Iterator[tuple[bytes, bytes]]) -> Iterator[tuple[Any, Any]]:
        key_type, decode = self._key_type, self._codec.decode
        for key, value in items:
            yield decode_key(key, key_type), decode(value)

    def sync(
        self,
        timeout: float | None = None,
        *,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
    ) -> None:
        """Wait until the cache holds everything the log held when this was called.

        ``progress(applied, targets)`` is called with per-partition offsets as replay proceeds.

        If replay finds meanwhile that the cache may have missed a delete (it
        was behind the log end for longer than the log keeps tombstones), it
        rebuilds the cache, and this returns once the rebuild caught up.

        Raises:
            SyncTimeoutError: not caught up within ``timeout`` seconds.
            BrokerUnavailableError: the end offsets could not be read.
            TopicConfigError: partitions were added to the topic (see ``KVLog``).
            BadRecordError: ``on_bad_record="raise"`` and replay met a bad record.
        """
        self._check_open()
        assert self._log is not None and self._replayer is not None
        self._replayer.catch_up(timeout, progress=progress)

    def rewarm(
        self,
        timeout: float | None = None,
        *,
        progress: Callable[[dict[int, int], dict[int, int]], None] | None = None,
    ) -> dict[str, Any]:
        """Drop the cache and rebuild it by replaying the log from the start.

        ``progress(applied, targets)`` is called with per-partition offsets as replay proceeds.

        The new cache is built beside the live one: every process sharing the
        cache (this one too) keeps reading and writing the live cache until
        the new one holds at least as much, then all of them switch to it at
        their next read; none ever sees a half-built cache. A crash during it
        leaves the live cache as it was (the partial one is deleted later).

        Returns:
            ``{"records": n, "seconds": s}`` for the replay.
        """
        self._check_open()
        assert self._log is not None and self._replayer is not None
        started = time.monotonic()
        records = self._replayer.rebuild_beside(self._identity(), timeout, progress)
        self.rebuilds.append("rewarm")
        return {"records": records, "seconds": round(time.monotonic() - started, 3)}

    def stats(self) -> dict[str, Any]:
        """Return a snapshot of the store's state, for humans and monitoring.

        Keys: ``path``, ``log`` (identity of the mirrored log), ``codec``,
        ``entries``, ``checkpoint`` and ``end_offsets`` per partition, ``lag``
        per partition and ``total_lag`` (``None`` when the log is unreachable),
        ``bytes_on_disk``, ``map_size``, ``cache_generation`` (the live
        generation of the shared cache: a rewarm moves it on), ``following``, ``records_replayed``
        and ``records_quarantined`` since open, ``records_applied_by_writers`` (on Kafka:
        records this process's writes put into the cache themselves, being the next
        ones to replay, so that no write waited for the follower to fetch them
        back), ``quarantined`` (the last few
        quarantined records as ``(partition, offset, reason)``),
        ``replay_health`` (when replay last moved forward or found the cache at
        the log end, and the last error it met: see
        :meth:`~kvlog.replay.Replayer.health`; a follower that makes no
        progress while ``total_lag`` stays above zero is stuck, and the error
        says why), ``open_replay`` (how the last open went: warm or cold, records,
        seconds, why it rebuilt), ``rebuilds`` (every reason the cache was
        rebuilt since open) and ``warnings`` (guarantees replay could not
        keep, e.g. a full replay slower than the topic keeps tombstones).
        """
        self._check_open()
        assert self._cache is not None and self._log is not None and self._replayer is not None
        checkpoint = self._replayer.positions
        try:
            end: dict[int, int] | None = self._log.end_offsets()
        except Exception as exc:  # noqa: BLE001 - stats must work while the broker is down
            log.debug("end offsets unavailable for stats: %s", exc)
            end = None
        lag = None if end is None else {p: max(0, end[p] - checkpoint.get(p, 0)) for p in end}
        return {
            "path": str(self.path),
            "log": self._log.identity(),
            "codec": self._codec.name,
            "entries": len(self._cache),
            "checkpoint": checkpoint,
            "end_offsets": end,
            "lag": lag,
            "total_lag": None if lag is None else sum(lag.values()),
            "bytes_on_disk": self._cache.disk_bytes(),
            "map_size": self._cache.map_size,
            "cache_generation": self._cache.generation,
            "following": self._replayer.following,
            "replay_health": self._replayer.health(),
            "records_replayed": self._replayer.records_replayed,
            "records_applied_by_writers": self._replayer.records_applied_by_writers,
            "records_quarantined": self._replayer.records_quarantined,
            "quarantined": list(self._replayer.quarantined),
            "open_replay": dict(self.open_replay),
            "rebuilds": list(self.rebuilds),
            "warnings": list(self._replayer.warnings),
        }

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Stop following, close the log clients and the cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _fork.unregister(self)
        if self._replayer is not None:
            self._replayer.close()
        if self._log is not None:
            self._log.close()
        if self._cache is not None:
            _close_shared_cache(self._cache)

    @property
    def log(self) -> Log:
        """The log this store mirrors (a :class:`~kvlog.log.local.LocalLog` or a ``KafkaLog``)."""
        assert self._log is not None
        return self._log

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _closed_error(self) -> ClosedError:
        if self._forked:
            return ClosedError(_fork.after_fork_message(repr(self)))
        return ClosedError(f"{self!r} is closed")

    def _abandon_after_fork(self) -> None:
        """In a forked child: the store opens again at its first use; close() leaves the parent's files alone."""
        self._forked = True
        self._closed = True
        if self._replayer is not None:
            self._replayer.abandon_after_fork()

    def __repr__(self) -> str:
        target = self._log.describe() if self._log is not None else "nothing"
        state = " (unusable after fork)" if self._forked else " (closed)" if self._closed else ""
        return f"<KVLog {str(self.path)!r} mirroring {target}{state}>"


def _encode_prefix(prefix: str | bytes) -> bytes:
    if isinstance(prefix, str):
        try:
            return prefix.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"prefix {prefix!r} cannot be encoded as UTF-8: {exc.reason}") from None
    if isinstance(prefix, bytes):
        return prefix
    raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")
