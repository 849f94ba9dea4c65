"""kvlog: an embedded key-value database backed by a compacted log.

``KVLog`` is a dict whose source of truth is a compacted Kafka topic: reads
come from a local LMDB cache, writes go to the topic first, and a lost cache
is rebuilt by replaying the topic::

    from kvlog import KVLog

    with KVLog("./cache", bootstrap_servers="localhost:9092", topic="orders") as kv:
        kv["order:42"] = {"status": "paid", "total": 12.5}
        kv["order:42"]          # {'status': 'paid', 'total': 12.5}
"""

from .codec import Codec
from .errors import (
    BrokerUnavailableError,
    CacheError,
    ClosedError,
    CodecError,
    KVLogError,
    LogUnavailableError,
    RecordTooLargeError,
    SyncTimeoutError,
    TopicConfigError,
    WriteError,
)
from .store import KVLog

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailableError",
    "CacheError",
    "ClosedError",
    "Codec",
    "CodecError",
    "KVLog",
    "KVLogError",
    "LogUnavailableError",
    "RecordTooLargeError",
    "SyncTimeoutError",
    "TopicConfigError",
    "WriteError",
]
