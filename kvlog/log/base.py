"""The log interface: what a store needs from the log that is its source of truth.

Two logs implement it: :class:`~kvlog.log.kafka.KafkaLog` (a compacted Kafka
topic) and :class:`~kvlog.log.local.LocalLog` (the embedded on-disk log).
:class:`~kvlog.KVLog` talks to either through these two abstract classes only.
The rest of kvlog imports them from :mod:`kvlog.log`, which re-exports them.

Offsets follow Kafka's meaning: each partition numbers its records from 0
upwards, compaction removes records but never renumbers the rest, and a
*position* is the offset of the next record to read (so a reader whose
position equals the end offset has read everything).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ..errors import TopicConfigError

__all__ = ["Log", "LogReader", "Record", "oversize_record", "partitions_changed_error"]


def oversize_record(records: Sequence[tuple[bytes, bytes | None]], limit: int) -> tuple[bytes, int] | None:
    """``(key, size)`` of the first record whose key + value is over ``limit`` bytes, or ``None``.

    Each log, and the store before it sends anything, refuses such a batch
    whole, with an error naming the limit in its own terms.
    """
    for key, value in records:
        size = len(key) + (0 if value is None else len(value))
        if size > limit:
            return key, size
    return None


def partitions_changed_error(description: str, cached: int, now: int) -> TopicConfigError:
    """The error for a log whose partition count changed under a cache (at open or while running).

    A key's records are in the partition its hash picks among the partitions
    there were when it was written. Once partitions are added, new records of
    a key can land in another partition than its older ones, and a replay,
    which reads partitions independently, cannot tell which of them is the
    latest: rebuilding would serve stale values. So kvlog refuses the log.
    """
    return TopicConfigError(
        f"{description} now has {now} partitions, but this cache was built from {cached}: after "
        "partitions are added, a key's new records can go to another partition than its old ones, and a "
        "replay cannot tell which value of a key is the latest. kvlog refuses the topic rather than serve "
        "stale values. Copy the values into a new topic created with the partition count you want and "
        "point kvlog at it (this cache still holds them as of the change: kvlog.cache.Cache(<path>/cache)"
        ".items() reads them)"
    )


class Record(NamedTuple):
    """One record read from the log. ``value`` is ``None`` for a tombstone."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class LogReader(abc.ABC):
    """Reads every partition of a log from given positions, in offset order per partition."""

    #: The most records replay should apply in one transaction from this
    #: reader, where the log knows a better size than replay's default.
    replay_batch_records: int | None = None

    @abc.abstractmethod
    def poll(self, timeout: float, max_records: int) -> Sequence[Any]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds for the first.

        Each item has ``partition``, ``offset``, ``key`` and ``value`` attributes
        (a :class:`Record` or a compatible object such as kafka-python's
        ``ConsumerRecord``).
        """

    @abc.abstractmethod
    def positions(self) -> dict[int, int]:
        """Return the position (next offset to read) of every partition.

        A position may move past offsets that hold no record (compacted gaps,
        transaction markers); that is what makes "caught up" decidable.
        """

    def wakeup(self) -> None:  # noqa: B027 - an optional hook: a no-op where a log cannot wake a poll
        """Make a ``poll`` waiting in another thread return early (with ``[]``), if the log can.

        The follower calls it when it is asked to stop, so that closing a store
        does not wait for an idle poll to time out.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the reader's resources. Idempotent."""


class Log(abc.ABC):
    """A partitioned, compacted log of (key, value) records."""

    #: "kafka" or "local"; part of the identity a cache is bound to.
    kind: str

    @property
    @abc.abstractmethod
    def partitions(self) -> int:
        """The number of partitions."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """Return what makes this log this log: kind, cluster, topic, topic id, partitions.

        A cache built from one log is never trusted for a log with another identity.
        """

    def current_identity(self) -> dict[str, Any]:
        """Ask the log what it is now, for a store that is already open on it.

        A topic can change under a running store: deleted and created again
        (a new topic id: another log, which the log adopts, so that
        :meth:`identity` and new readers follow it), or given more partitions
        (reported in the returned ``partitions``, never adopted: see
        :func:`partitions_changed_error`). The default, for logs that cannot
        change, is :meth:`identity`.

        Raises:
            LogUnavailableError: the log could not be asked.
        """
        return self.identity()

    @abc.abstractmethod
    def append(self, records: Sequence[tuple[bytes, bytes | None]], timeout: float) -> list[tuple[int, int]]:
        """Append ``(key, value)`` records durably; return ``(partition, offset)`` of each.

        ``value=None`` appends a tombstone. Returns only after every record is
        durable (acks=all for Kafka).

        Raises:
            RecordTooLargeError: a record is larger than the log accepts.
            LogUnavailableError: the log could not be reached within ``timeout``.
            WriteError: the log refused the write.
        """

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held by a writer of this process from before its append until its records are applied (or left to replay).

        A log may use it to keep its readers in this process from competing
        with the write (see :class:`kvlog.log.kafka.KafkaLog`); by default it
        does nothing.
        """
        return contextlib.nullcontext()

    @abc.abstractmethod
    def begin_offsets(self) -> dict[int, int]:
        """Return the log start offset of every partition."""

    @abc.abstractmethod
    def end_offsets(self, timeout: float | None = None) -> dict[int, int]:
        """Return the end offset (one past the last readable record) of every partition.

        ``timeout`` bounds the wait (default, and at most: the log's own timeout).
        """

    @abc.abstractmethod
    def open_reader(self, positions: Mapping[int, int]) -> LogReader:
        """Return a reader positioned at ``positions`` (one entry per partition)."""

    @property
    def max_record_bytes(self) -> int | None:
        """The largest key + value the log accepts, or ``None`` if unbounded."""
        return None

    @property
    def tombstone_retention_seconds(self) -> float | None:
        """How long the log keeps a tombstone before compaction may remove it (``None``: forever).

        A reader that falls further behind than this may miss a delete.
        """
        return None

    def tombstones_dropped_after(self, positions: Mapping[int, int], since: float) -> bool | None:
        """Whether compaction removed a tombstone at or past ``positions`` after ``since`` (unix time).

        ``None`` when the log cannot tell (Kafka): the store then falls back
        to :attr:`tombstone_retention_seconds`.
        """
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human description, e.g. ``kafka topic 'orders' at 127.0.0.1:9092``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and files. Idempotent."""
