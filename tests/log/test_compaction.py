"""Replaying a compacted topic gives the same store as replaying it uncompacted (docs/design.md, "Invariants", 3).

These tests let the real broker's log cleaner compact a topic for real: they
write a history full of overwrites and deletes, then lower ``segment.ms`` so
that appends roll segments (the active segment is never cleaned) and wait
until a raw Kafka consumer sees that superseded records, and then the
tombstones themselves, are physically gone. ``delete.retention.ms`` is 100 ms,
so tombstones go on the cleaner's second pass.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import topic_records, wait_until

from kvlog import KVLog

# kafka-python warns about importlib.resources.read_text on import, which
# ``filterwarnings = error`` would turn into an error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.partitioner.default import murmur2

    import kvlog.log.kafka  # noqa: F401

pytestmark = pytest.mark.kafka

PARTITIONS = 2

#: Everything the cleaner needs to compact a topic at once, except a reason to
#: roll the active segment: ``segment.ms`` is lowered only when a test wants
#: compaction to start, so that the history can first be replayed uncompacted.
CLEANER_READY = {
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "100",
    # The smallest segment Kafka 4 accepts; the whole history fits in one.
    "segment.bytes": str(1024 * 1024),
}

#: How long the cleaner gets to compact the topic and drop its tombstones.
COMPACTION_TIMEOUT = 90.0

KEYS = [f"item:{i:03d}" for i in range(200)]


def heartbeat_keys() -> list[str]:
    """One key per partition (by Kafka's murmur2 partitioner), appended while waiting for the cleaner."""
    chosen: dict[int, str] = {}
    for i in itertools.count():
        key = f"~heartbeat:{i}"
        chosen.setdefault((murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS, key)
        if len(chosen) == PARTITIONS:
            return [chosen[p] for p in range(PARTITIONS)]
    raise AssertionError("unreachable")


class History:
    """Writes through a KVLog and keeps the dict model of what the topic folds up to."""

    def __init__(self, kv: KVLog) -> None:
        self.kv = kv
        self.model: dict[str, Any] = {}
        #: Records appended to the topic: values and tombstones.
        self.written = 0
        self.tombstones = 0
        self._beats = itertools.count()

    def update(self, items: dict[str, Any]) -> None:
        self.kv.update(items)
        self.model.update(items)
        self.written += len(items)

    def delete(self, key: str) -> None:
        del self.kv[key]
        del self.model[key]
        self.written += 1
        self.tombstones += 1

    def clear(self) -> None:
        self.tombstones += len(self.model)
        self.written += len(self.model)
        self.kv.clear()
        self.model.clear()

    def overwrite_and_delete(self) -> None:
        """200 keys x 6 versions, a clear(), re-puts, single deletes: every key has superseded records."""
        for version in range(6):
            self.update({k: {"version": version, "key": k, "pad": "x" * 40} for k in KEYS})
        self.clear()
        self.update({k: ["back", i] for i, k in enumerate(KEYS[::2])})
        for k in KEYS[::10]:
            self.delete(k)
        self.update({k: None for k in KEYS[1::20]})  # None is a value, not a delete
        self.update({k: b"\x00bytes" for k in KEYS[::4]})

    def heartbeat(self) -> None:
        """Append one small record to each partition, so that segments old enough to roll do."""
        beat = next(self._beats)
        self.update({key: beat for key in heartbeat_keys()})


def contents(kv: KVLog) -> dict[str, Any]:
    """Everything the store holds, checking on the way that ``scan`` and iteration agree."""
    items = dict(kv.scan())
    assert list(kv) == list(items)
    assert len(kv) == len(items)
    return items


def start_rolling_segments(admin: Any, topic: str) -> None:
    """Let every append roll a segment older than 200 ms, so the history becomes cleanable."""
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={"segment.ms": "200"})])


def wait_until_compacted(
    history: History, bootstrap: str, topic: str, gone: Callable[[list[Any]], bool]
) -> list[Any]:
    """Append heartbeats until the cleaner removed superseded records and ``gone(records)`` holds.

    Returns the records physically left in the topic.
    """

    def compacted() -> list[Any] | None:
        history.heartbeat()
        records = topic_records(bootstrap, topic)
        return records if len(records) < history.written and gone(records) else None

    return wait_until(
        compacted,
        COMPACTION_TIMEOUT,
        interval=0.2,
        what="the log cleaner to compact the topic",
    )


@pytest.fixture
def live(make_kv: Callable[..., KVLog]) -> Iterator[KVLog]:
    """The store that creates the topic (ready for the cleaner) and stays open throughout."""
    yield make_kv("live", partitions=PARTITIONS, topic_config=CLEANER_READY)


def close_an_old_cache(make_kv: Callable[..., KVLog], history: History) -> None:
    """Build the cache "old" from the topic as it is now, check it, and close it: its checkpoint stays here."""
    old = make_kv("old")
    assert contents(old) == history.model
    old.close()


def test_replaying_the_compacted_topic_gives_the_same_store(
    live: KVLog, make_kv: Callable[..., KVLog], admin: Any, bootstrap: str, topic: str
) -> None:
    """Caches rebuilt before and after compaction, the store open throughout, and an old cache all hold the same."""
    history = History(live)
    history.overwrite_and_delete()
    # An old cache whose checkpoint will end up inside the compacted region.
    close_an_old_cache(make_kv, history)
    # Only values after the old checkpoint: every record it misses is superseded by a survivor.
    history.update({k: {"final": k} for k in KEYS[::3]})
    assert len(topic_records(bootstrap, topic)) == history.written  # nothing compacted yet

    before = make_kv("before")
    assert before.stats()["open_replay"]["records"] == history.written
    assert contents(before) == history.model
    before.close()

    deleted = {k.encode() for k in KEYS if k not in history.model}
    assert deleted
    start_rolling_segments(admin, topic)
    left = wait_until_compacted(
        history,
        bootstrap,
        topic,
        lambda records: not any(r.key in deleted for r in records),
    )
    # Superseded values went on the cleaner's first pass, every tombstone on a later one.
    assert history.tombstones > 0
    assert not any(r.value is None for r in left)

    after = make_kv("after")
    assert after.stats()["open_replay"]["records"] < history.written
    assert contents(after) == history.model

    live.sync(20)
    assert contents(live) == history.model

    reopened = make_kv("old")
    assert contents(reopened) == history.model


def test_old_cache_does_not_resurrect_keys_whose_tombstones_were_compacted_away(
    live: KVLog, make_kv: Callable[..., KVLog], admin: Any, bootstrap: str, topic: str
) -> None:
    """A cache closed before some deletes, reopened after the cleaner removed their tombstones, lacks those keys."""
    history = History(live)
    history.overwrite_and_delete()
    close_an_old_cache(make_kv, history)
    missed = [k for k in KEYS if k in history.model][:20]
    for k in missed:
        history.delete(k)

    start_rolling_segments(admin, topic)
    missed_keys = {k.encode() for k in missed}
    wait_until_compacted(
        history,
        bootstrap,
        topic,
        lambda records: not any(r.key in missed_keys for r in records),
    )

    reopened = make_kv("old")
    assert [k for k in missed if k in reopened] == []
    assert contents(reopened) == history.model
