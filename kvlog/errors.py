"""The exceptions kvlog raises.

Every error kvlog raises on purpose derives from :class:`KVLogError`. Leaves
also derive from the builtin whose meaning they share, so code that already
catches ``ValueError`` or ``TimeoutError`` keeps working::

    KVLogError(Exception)
    ├── ClosedError(KVLogError, ValueError)          use after close()
    ├── CodecError(KVLogError, ValueError)           a stored value the codec cannot decode
    ├── BadRecordError(KVLogError, ValueError)       a record in the log the cache cannot take
    ├── RecordTooLargeError(KVLogError, ValueError)  a record larger than the log accepts
    ├── TopicConfigError(KVLogError, ValueError)     topic not compacted, or otherwise unusable
    ├── CacheError(KVLogError, OSError)              the LMDB cache cannot be opened or written
    ├── LogLockedError(KVLogError, OSError)          another process writes this embedded log
    ├── LogCorruptError(KVLogError, OSError)         the embedded log has a bad record it cannot cut off
    ├── LogUnavailableError(KVLogError, ConnectionError)  (retriable)
    │   ├── BrokerUnavailableError                   Kafka cannot be reached within the timeout
    │   └── NotEnoughReplicasError                   the partition has too few in-sync replicas
    ├── WriteError(KVLogError)                       the log refused or failed a write
    └── SyncTimeoutError(KVLogError, TimeoutError)   the cache did not catch up in time (retriable)

    PositionOutOfRangeError(Exception)               internal: a log reader's position left the log

``PositionOutOfRangeError`` is not public API, and sits outside the tree (no
``retriable``): a log raises it to kvlog's own replayer, which answers it by
rebuilding the cache.

Every error has a ``retriable`` attribute: ``True`` where the condition is
transient (a broker down, a leader moving, replicas catching up, a slow
replay), so the same call may succeed later without anything changing on the
caller's side; ``False`` where retrying cannot help until someone acts. A
write that raised a retriable error may or may not be in the log: a broker
can append it and then fail to answer (``SyncTimeoutError`` even means it is
in the log). kvlog never retries it after raising, so retrying is the caller's
call; rewriting the same value is harmless in a last-writer-wins store.

Wrong key types raise the builtin ``TypeError``; a key the cache cannot hold
(empty, longer than 511 bytes, not encodable as UTF-8) raises ``ValueError``;
a value the codec cannot encode raises ``TypeError``. All of those are raised
before any I/O.
"""

from __future__ import annotations

__all__ = [
    "BadRecordError",
    "BrokerUnavailableError",
    "CacheError",
    "ClosedError",
    "CodecError",
    "KVLogError",
    "LogCorruptError",
    "LogLockedError",
    "LogUnavailableError",
    "NotEnoughReplicasError",
    "RecordTooLargeError",
    "SyncTimeoutError",
    "TopicConfigError",
    "WriteError",
]


class KVLogError(Exception):
    """Root of every error kvlog raises on purpose."""

    #: Whether the condition is transient: the same call may succeed later.
    retriable: bool = False


class ClosedError(KVLogError, ValueError):
    """The store (or log, or cache) was used after ``close()``."""


class CodecError(KVLogError, ValueError):
    """A value read from the log cannot be decoded with the configured codec."""


class BadRecordError(KVLogError, ValueError):
    """A record in the log cannot go into the cache: a null or oversize key, or a value the codec rejects.

    Only from foreign producers (kvlog never writes one), and raised only by a
    store opened with ``on_bad_record="raise"``; by default such a record is
    quarantined: skipped, counted and logged. ``partition``, ``offset`` and
    ``reason`` say which record and why.
    """

    def __init__(
        self, message: str, *, partition: int | None = None, offset: int | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.partition = partition
        self.offset = offset
        self.reason = reason


class RecordTooLargeError(KVLogError, ValueError):
    """A record is larger than the log accepts (Kafka's ``max.message.bytes``)."""


class TopicConfigError(KVLogError, ValueError):
    """The topic exists but cannot back a kvlog store (e.g. not ``cleanup.policy=compact``)."""


class CacheError(KVLogError, OSError):
    """The LMDB cache cannot be opened or written."""


class LogLockedError(KVLogError, OSError):
    """The embedded log directory is open for writing in another process (the message names its pid)."""


class LogCorruptError(KVLogError, OSError):
    """The embedded log holds a damaged record that recovery cannot cut off (it is not at the tail)."""


class LogUnavailableError(KVLogError, ConnectionError):
    """The log cannot be reached, or cannot take acknowledged writes for now. Retriable."""

    retriable = True


class BrokerUnavailableError(LogUnavailableError):
    """No Kafka broker answered (or acknowledged a write) within the configured timeout."""


class NotEnoughReplicasError(LogUnavailableError):
    """The partition leader answered but has fewer in-sync replicas than ``min.insync.replicas``.

    Kafka refuses ``acks=all`` writes then, so the write was not acknowledged
    within the timeout; reads keep serving from the cache. Writes succeed again
    once enough replicas are back in sync.
    """


class WriteError(KVLogError):
    """The log refused or failed a write; the write may or may not be in the log."""


class SyncTimeoutError(KVLogError, TimeoutError):
    """The cache did not catch up with the log before the timeout (a write that raised it is in the log)."""

    retriable = True


class PositionOutOfRangeError(Exception):
    """A reader's position is no longer in the log (its start moved past it, or it lost data).

    Internal, not public API (not exported by :mod:`kvlog`; import it from
    :mod:`kvlog.log`): the logs' readers raise it, and the replayer answers it
    by rebuilding the cache from the log start. It is not a :class:`KVLogError`.
    """
