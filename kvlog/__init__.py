"""kvlog: an embedded key-value database backed by a compacted log.

``KVLog`` is a dict whose source of truth is a compacted log: reads come
from a local LMDB cache, writes go to the log first, and a lost cache is
rebuilt by replaying the log. The log is an embedded one on local files by
default, or a compacted Kafka topic::

    from kvlog import KVLog

    with KVLog("./data") as kv:                    # embedded log in ./data/log
        kv["order:42"] = {"status": "paid", "total": 12.5}
        kv["order:42"]          # {'status': 'paid', 'total': 12.5}

    KVLog("./cache", bootstrap_servers="localhost:9092", topic="orders")  # Kafka
"""

from .codec import Codec
from .errors import (
    BadRecordError,
    BrokerUnavailableError,
    CacheError,
    ClosedError,
    CodecError,
    KVLogError,
    LogCorruptError,
    LogLockedError,
    LogUnavailableError,
    NotEnoughReplicasError,
    RecordTooLargeError,
    SyncTimeoutError,
    TopicConfigError,
    WriteError,
)
from .log.local import LocalLog
from .store import KVLog

__version__ = "0.1.0"

__all__ = [
    "BadRecordError",
    "BrokerUnavailableError",
    "CacheError",
    "ClosedError",
    "Codec",
    "CodecError",
    "KVLog",
    "KVLogError",
    "LocalLog",
    "LogCorruptError",
    "LogLockedError",
    "LogUnavailableError",
    "NotEnoughReplicasError",
    "RecordTooLargeError",
    "SyncTimeoutError",
    "TopicConfigError",
    "WriteError",
]
