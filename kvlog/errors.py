"""The exceptions kvlog raises.

Every error kvlog raises on purpose derives from :class:`KVLogError`. Leaves
also derive from the builtin whose meaning they share, so code that already
catches ``ValueError`` or ``TimeoutError`` keeps working::

    KVLogError(Exception)
    ├── ClosedError(KVLogError, ValueError)          use after close()
    ├── CodecError(KVLogError, ValueError)           a stored value the codec cannot decode
    ├── RecordTooLargeError(KVLogError, ValueError)  a record larger than the log accepts
    ├── TopicConfigError(KVLogError, ValueError)     topic not compacted, or otherwise unusable
    ├── CacheError(KVLogError, OSError)              the LMDB cache cannot be opened or written
    ├── LogLockedError(KVLogError, OSError)          another process writes this embedded log
    ├── LogCorruptError(KVLogError, OSError)         the embedded log has a bad record it cannot cut off
    ├── LogUnavailableError(KVLogError, ConnectionError)
    │   └── BrokerUnavailableError                   Kafka cannot be reached within the timeout
    ├── WriteError(KVLogError)                       the log refused or failed a write
    └── SyncTimeoutError(KVLogError, TimeoutError)   the cache did not catch up in time

Wrong key types raise the builtin ``TypeError``; a key the cache cannot hold
(empty, longer than 511 bytes, not encodable as UTF-8) raises ``ValueError``;
a value the codec cannot encode raises ``TypeError``. All of those are raised
before any I/O.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "CacheError",
    "ClosedError",
    "CodecError",
    "KVLogError",
    "LogCorruptError",
    "LogLockedError",
    "LogUnavailableError",
    "RecordTooLargeError",
    "SyncTimeoutError",
    "TopicConfigError",
    "WriteError",
]


class KVLogError(Exception):
    """Root of every error kvlog raises on purpose."""


class ClosedError(KVLogError, ValueError):
    """The store (or log, or cache) was used after ``close()``."""


class CodecError(KVLogError, ValueError):
    """A value read from the log cannot be decoded with the configured codec."""


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
    """The log cannot be reached."""


class BrokerUnavailableError(LogUnavailableError):
    """No Kafka broker answered within the configured timeout."""


class WriteError(KVLogError):
    """The log refused or failed a write; the write may or may not be in the log."""


class SyncTimeoutError(KVLogError, TimeoutError):
    """The cache did not catch up with the log before the timeout."""
