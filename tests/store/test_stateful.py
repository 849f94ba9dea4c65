"""KVLog behaves like a dict, through reopens, cache loss, re-warms, compaction and a second writer.

A hypothesis state machine drives a KVLog and a plain ``dict`` model with the
same operations, and after every step checks that the store shows exactly
what the model holds, in UTF-8 byte order. It runs twice: on the real Kafka
broker (every example gets a fresh two-partition topic, and a second store
writes to it too) and on the embedded log (``KVLog(path)``, no broker; small
segments, and rules that compact the log at any point). Both logs have two
partitions, so replay always merges partitions.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from strategies import bad_keys, keys, unencodable_values, values

from kvlog import KVLog
from kvlog.codec import get_codec
from kvlog.log import Log
from kvlog.log.local import LocalLog

# kafka-python warns about importlib.resources.read_text on import, which
# ``filterwarnings = error`` would turn into a failure of the first test that
# opens a Kafka store; import it here, once, with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kvlog.log.kafka  # noqa: F401

#: Seconds any single log operation in the machine may take.
TIMEOUT = 20.0

#: Examples come from the loaded profile (dev: 15, see conftest), capped at 20
#: for the ci profile: one example of 20 steps takes about 4-5 s, most of it in
#: reopens, cache rebuilds and re-warms (0.3-0.4 s each).
MACHINE_SETTINGS = settings(max_examples=min(settings.default.max_examples, 20), stateful_step_count=20)

#: The embedded log's machine has no broker but the same cap: one example of
#: 30 steps takes 1-2 s, most of it in closing a following store (about 0.2 s:
#: the follower finishes its idle poll). Longer examples than Kafka's, so that
#: segments roll and compaction has closed segments to rewrite and merge.
LOCAL_MACHINE_SETTINGS = settings(max_examples=min(settings.default.max_examples, 20), stateful_step_count=30)

#: The smallest segment LocalLog accepts: one ``update_bulky`` batch rolls one or two.
LOCAL_SEGMENT_BYTES = 1024

#: The keys of bulky values (a few, so that compaction finds them superseded).
BULKY_KEYS = ("a", "b", "ab", "1:")

msgpack_codec = get_codec("msgpack")


def byte_order(keys: Any) -> list[str]:
    """``keys`` sorted the way the cache stores them: by their UTF-8 bytes."""
    return sorted(keys, key=lambda k: k.encode("utf-8"))


def count_records(log: Log) -> int:
    """The records physically in ``log`` (what a cold replay reads), read with a reader of its own."""
    end = log.end_offsets()
    reader = log.open_reader(log.begin_offsets())
    try:
        count = 0
        while any(position < end[p] for p, position in reader.positions().items()):
            count += len(reader.poll(TIMEOUT, 100_000))
        return count
    finally:
        reader.close()


class StoreMachine(RuleBasedStateMachine):
    """One KVLog under test (``kv``) and a dict model; subclasses say which log it mirrors."""

    #: Set by the test: a directory for the stores.
    root: Path = Path()

    def __init__(self) -> None:
        super().__init__()
        self.run = uuid.uuid4().hex[:12]
        self.path = self.root / self.run / "kv"
        self.model: dict[str, Any] = {}
        #: Records in the log: every put and every tombstone written (compaction does not lower it).
        self.records = 0
        self.opened: list[KVLog] = []
        self.kv = self._open(self.path)

    def _open(self, path: Path) -> KVLog:
        raise NotImplementedError

    def _cache_dir(self) -> Path:
        """The directory whose loss is a lost cache (the log itself stays)."""
        raise NotImplementedError

    def _records_in_log(self) -> int:
        """The records a cold replay reads: every record written, unless compaction removed some."""
        return self.records

    def teardown(self) -> None:
        for kv in self.opened:
            kv.close()

    # -- writes through the store under test ---------------------------------

    @rule(key=keys(), value=values())
    def put(self, key: str, value: Any) -> None:
        """A put is readable as soon as it returns."""
        self.kv[key] = value
        self.model[key] = value
        self.records += 1
        assert self.kv[key] == value

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_present(self, data: st.DataObject) -> None:
        """Deleting a present key makes it absent as soon as ``del`` returns."""
        key = data.draw(st.sampled_from(byte_order(self.model)), label="key")
        del self.kv[key]
        del self.model[key]
        self.records += 1
        assert key not in self.kv
        assert self.kv.get(key, "absent") == "absent"

    @rule(key=keys())
    def delete_absent(self, key: str) -> None:
        """Deleting an absent key raises KeyError, like a dict, and writes nothing."""
        while key in self.model:
            key += "~"
        with pytest.raises(KeyError):
            del self.model[key]
        with pytest.raises(KeyError):
            del self.kv[key]

    @rule(
        items=st.lists(st.tuples(keys(), values()), max_size=8),
        as_mapping=st.booleans(),
    )
    def update(self, items: list[tuple[str, Any]], as_mapping: bool) -> None:
        """``update`` with a mapping or with pairs (later pairs win) matches ``dict.update``."""
        batch: Any = dict(items) if as_mapping else items
        self.kv.update(batch)
        self.model.update(batch)
        self.records += len(batch)

    @rule(data=st.data())
    def refuse_invalid_write(self, data: st.DataObject) -> None:
        """A bad key or an unencodable value raises before anything reaches the log or the cache.

        That includes ``update``: one bad item anywhere in the batch means no item is written.
        """
        kind = data.draw(st.sampled_from(["bad key", "bad value", "bad batch"]), label="kind")
        if kind == "bad key":
            with pytest.raises((TypeError, ValueError)):
                self.kv[data.draw(bad_keys(), label="key")] = data.draw(values(), label="value")
        elif kind == "bad value":
            with pytest.raises(TypeError):
                self.kv[data.draw(keys(), label="key")] = data.draw(unencodable_values(), label="value")
        else:
            good = data.draw(st.lists(st.tuples(keys(), values()), max_size=4), label="good items")
            bad = data.draw(
                st.one_of(
                    st.tuples(bad_keys(), values()),
                    st.tuples(keys(), unencodable_values()),
                ),
                label="bad item",
            )
            where = data.draw(st.integers(0, len(good)), label="position of the bad item")
            with pytest.raises((TypeError, ValueError)):
                self.kv.update([*good[:where], bad, *good[where:]])
        # The invariants then check that the topic and the cache did not change.

    # -- reopening and losing the cache ---------------------------------------

    @rule()
    def reopen(self) -> None:
        """Close and reopen the same cache: a warm start that replays nothing new."""
        self.kv.close()
        self.kv = self._open(self.path)
        replay = self.kv.stats()["open_replay"]
        assert replay["mode"] == ("warm" if self.records else "cold")
        assert replay["records"] == 0

    @rule()
    def lose_cache(self) -> None:
        """Delete the cache directory and reopen: a cold rebuild of every record in the log."""
        self.kv.close()
        shutil.rmtree(self._cache_dir())
        self.kv = self._open(self.path)
        replay = self.kv.stats()["open_replay"]
        assert replay["mode"] == "cold"
        assert replay["records"] == self._records_in_log()

    @rule()
    def rewarm(self) -> None:
        """``rewarm()`` replays the whole log into a new generation beside the live cache, then switches to it."""
        generation = self.kv.stats()["cache_generation"]
        result = self.kv.rewarm(timeout=TIMEOUT)
        assert result["records"] == self._records_in_log()
        assert self.kv.stats()["cache_generation"] > generation

    # -- what must hold after every step --------------------------------------

    @invariant()
    def equals_model(self) -> None:
        """The store holds exactly the model's items, iterated in UTF-8 byte order."""
        order = byte_order(self.model)
        assert list(self.kv) == order
        assert list(self.kv.scan()) == [(k, self.model[k]) for k in order]
        assert dict(self.kv.items()) == self.model
        assert len(self.kv) == len(self.model)

    @invariant()
    def log_holds_each_write_once(self) -> None:
        """Every write that returned took exactly one offset; refused writes left nothing."""
        stats = self.kv.stats()
        assert sum(stats["end_offsets"].values()) == self.records
        assert stats["total_lag"] == 0
        assert stats["entries"] == len(self.model)


class KVLogMachine(StoreMachine):
    """The store on a fresh topic of the real broker, and a second store (``other``) on the same topic."""

    #: Set by the test: the session broker.
    bootstrap: str = ""

    def __init__(self) -> None:
        self.other: KVLog | None = None
        super().__init__()
        self.other_path = self.root / self.run / "other"

    @property
    def topic(self) -> str:
        return f"stateful-{self.run}"

    def _open(self, path: Path) -> KVLog:
        kv = KVLog(
            path,
            bootstrap_servers=self.bootstrap,
            topic=self.topic,
            partitions=2,
            timeout=TIMEOUT,
        )
        self.opened.append(kv)
        return kv

    def _cache_dir(self) -> Path:
        return self.path  # a Kafka store keeps nothing else locally

    def _second(self) -> KVLog:
        """The second instance, opened on first use (most examples never need it)."""
        if self.other is None:
            self.other = self._open(self.other_path)
        return self.other

    # -- a second instance writing to the same topic --------------------------

    @rule(key=keys(), value=values())
    def put_from_other_instance(self, key: str, value: Any) -> None:
        """Another instance's put: it reads its own write at once, this store after ``sync()``."""
        other = self._second()
        other[key] = value
        assert other[key] == value
        self.model[key] = value
        self.records += 1
        self.kv.sync(TIMEOUT)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_from_other_instance(self, data: st.DataObject) -> None:
        """Another instance, once synced, holds everything this store wrote, and can delete it."""
        other = self._second()
        other.sync(TIMEOUT)
        assert dict(other.scan()) == self.model
        key = data.draw(st.sampled_from(byte_order(self.model)), label="key")
        del other[key]
        assert key not in other
        del self.model[key]
        self.records += 1
        self.kv.sync(TIMEOUT)

    @rule(key=keys())
    def discard_from_other_instance(self, key: str) -> None:
        """``discard`` writes a tombstone whether or not the key is present; replay tolerates both."""
        other = self._second()
        other.discard(key)
        assert key not in other
        self.model.pop(key, None)
        self.records += 1
        self.kv.sync(TIMEOUT)


class LocalKVLogMachine(StoreMachine):
    """The store on the embedded log (no broker), with segments small enough that compaction has work.

    Each open creates a new :class:`LocalLog` on ``path/"log"`` (a store
    closes its log). Background compaction is off so that an example
    replays the same way when hypothesis shrinks it: compaction happens
    where the ``compact`` rule puts it.
    """

    def _open(self, path: Path) -> KVLog:
        log = LocalLog(
            path / "log",
            partitions=2,
            segment_bytes=LOCAL_SEGMENT_BYTES,
            background_compaction=False,
        )
        kv = KVLog(path, log=log, timeout=TIMEOUT)
        self.opened.append(kv)
        return kv

    def _cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def log(self) -> LocalLog:
        log = self.kv.log
        assert isinstance(log, LocalLog)
        return log

    def _records_in_log(self) -> int:
        return count_records(self.log)

    def _fold_log(self) -> dict[str, Any]:
        """The dict a replay of the whole log gives: each key's last record, decoded; tombstones delete."""
        end = self.log.end_offsets()
        reader = self.log.open_reader(self.log.begin_offsets())
        folded: dict[bytes, bytes | None] = {}
        try:
            while any(position < end[p] for p, position in reader.positions().items()):
                for record in reader.poll(TIMEOUT, 100_000):
                    folded[record.key] = record.value
        finally:
            reader.close()
        return {k.decode(): msgpack_codec.decode(v) for k, v in folded.items() if v is not None}

    @rule(
        sizes=st.lists(st.tuples(st.sampled_from(BULKY_KEYS), st.integers(100, 600)), min_size=1, max_size=6)
    )
    def update_bulky(self, sizes: list[tuple[str, int]]) -> None:
        """Values of hundreds of bytes on a few keys: a batch rolls a segment or two, mostly of overwrites."""
        batch = [(key, "x" * size) for key, size in sizes]
        self.kv.update(batch)
        self.model.update(batch)
        self.records += len(batch)

    @rule(drop_tombstones=st.booleans())
    def compact(self, drop_tombstones: bool) -> None:
        """Compaction at any point removes records but no offsets, and the log still folds to the model.

        With ``drop_tombstones`` the retention is 0, so the tombstones in
        closed segments go too (the store is caught up, so it misses none).
        The invariants then check the store itself, and later ``lose_cache``
        and ``rewarm`` rules rebuild it from the compacted log.
        """
        log = self.log
        end = log.end_offsets()
        before = count_records(log)
        retention = log.tombstone_retention
        if drop_tombstones:
            log.tombstone_retention = 0.0
        try:
            report = log.compact()
        finally:
            log.tombstone_retention = retention
        after = count_records(log)
        assert report["records_before"] - report["records_after"] == before - after
        if not drop_tombstones:
            assert report["tombstones_dropped"] == 0
        assert log.end_offsets() == end
        assert log.begin_offsets() == {0: 0, 1: 0}
        assert self._fold_log() == self.model


# A failure is shrunk on the real broker, a few seconds per example: give
# hypothesis time to finish shrinking and report rather than be cut off.
@pytest.mark.kafka
@pytest.mark.timeout(900)
def test_kvlog_behaves_like_a_dict(bootstrap: str, tmp_path: Path) -> None:
    """Across puts, deletes, batches, reopens, cache loss, re-warms and a second writer, KVLog equals a dict."""
    machine = type("KVLogMachine", (KVLogMachine,), {"bootstrap": bootstrap, "root": tmp_path})
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)


def test_kvlog_on_the_embedded_log_behaves_like_a_dict(tmp_path: Path) -> None:
    """The same machine on ``KVLog(path)``'s embedded log, plus compaction at any point; no broker."""
    machine = type("LocalKVLogMachine", (LocalKVLogMachine,), {"root": tmp_path})
    run_state_machine_as_test(machine, settings=LOCAL_MACHINE_SETTINGS)
