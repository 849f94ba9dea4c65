"""Check a live cache against its log: replay the log into a scratch cache and compare.

The cache is supposed to equal "the log folded up to the checkpoint"
(docs/design.md, "Invariants", 1). :func:`verify` tests exactly that statement, at one
position: the live cache's checkpoint ``C``. It replays the log from its start
into a scratch LMDB cache in a temporary directory, applying only the records
below ``C`` (so records appended meanwhile, by this or any other producer, do
not count as differences), then walks both caches in key order and compares
the stored value bytes. Nothing is decoded: a difference is a difference of
bytes, whatever the codec.

This is also what finds a flipped bit inside a stored value: LMDB keeps no
checksums, so such a value is still a well-formed entry that no check of the
cache's structure at open can tell from the one the log holds.

The live cache may keep moving while it is verified (other processes writing
to a live database): the checkpoint and the entries are read in one LMDB read
transaction, a snapshot that writers do not change. Keep in mind that a long
verify holds that snapshot, so the cache file grows meanwhile by what is
written (LMDB cannot reuse the pages the snapshot still reads).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Cache

if TYPE_CHECKING:
    from .store import KVLog

__all__ = ["Difference", "VerifyReport", "verify"]

#: Records read per poll of the scratch replay.
_POLL_RECORDS = 50_000
#: How long one poll waits for records that the end offsets say exist.
_POLL_SECONDS = 1.0

ProgressCallback = Callable[[dict[int, int], dict[int, int]], None]


@dataclass(frozen=True)
class Difference:
    """One key on which the live cache and the replayed log disagree.

    ``kind`` is ``"missing"`` (the log has the key, the cache does not),
    ``"extra"`` (the cache has a key the log does not) or ``"different"``
    (both have it, with other bytes). ``expected`` is the value bytes the log
    folds to (``None`` if absent), ``actual`` what the cache holds.
    """

    kind: str
    key: bytes
    expected: bytes | None
    actual: bytes | None


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`.

    Attributes:
        checkpoint: the position compared at (partition -> next offset).
        checked: distinct keys compared (present in the cache, the log, or both).
        missing, extra, different: how many keys differ, by kind.
        differences: the first ``limit`` differences, in key order.
        records: records replayed into the scratch cache.
        seconds: time the whole verification took.
    """

    checkpoint: dict[int, int]
    checked: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    differences: list[Difference] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the cache equals the fold of the log up to :attr:`checkpoint`."""
        return self.missing == 0 and self.extra == 0 and self.different == 0


def verify(
    kv: KVLog,
    *,
    progress: ProgressCallback | None = None,
    limit: int = 20,
    scratch_dir: str | Path | None = None,
) -> VerifyReport:
    """Replay ``kv``'s log into a scratch cache and compare it with ``kv``'s cache, key by key.

    Args:
        kv: an open store (other processes may go on writing to its data directory).
        progress: called as ``progress(applied, target)`` (partition -> offset
            dicts) while the scratch replay runs, like the store's own
            progress callbacks.
        limit: how many differences to keep in the report (all are counted).
        scratch_dir: where to create the temporary scratch cache (default: the
            system's temporary directory). It is removed afterwards.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` says whether the caches are equal.

    Raises:
        ValueError: the log no longer holds the records up to the checkpoint
            (its start moved past them, or it ends before it).
        KVLogError: the log or a cache failed.
    """
    started = time.monotonic()
    kv._check_open()
    # verify is part of the package: it reads the live cache directly (raw
    # bytes and the committed checkpoint), which the public mapping API
    # deliberately does not expose.
    live: Cache | None = kv._cache
    assert live is not None
    with (
        tempfile.TemporaryDirectory(prefix="kvlog-verify-", dir=scratch_dir) as tmp,
        # One read transaction: the checkpoint and the entries it describes,
        # while other processes go on writing (they write new pages; this one
        # keeps reading the old ones).
        live.snapshot() as (checkpoint, entries),
    ):
        report = VerifyReport(checkpoint=dict(checkpoint))
        scratch = Cache(Path(tmp) / "cache")
        try:
            # The scratch replay skips what the store's replay quarantines, or
            # every quarantined record would show up as a difference.
            check = kv._codec.value_check()
            report.records = _replay_until(kv.log, scratch, checkpoint, progress, check)
            _compare(entries, scratch, report, limit)
        finally:
            scratch.close()
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _replay_until(
    log: Any,
    scratch: Cache,
    checkpoint: dict[int, int],
    progress: ProgressCallback | None,
    check: Callable[[bytes], object] | None = None,
) -> int:
    """Apply every record of ``log`` below ``checkpoint`` to ``scratch``; return the record count."""
    begin = log.begin_offsets()
    end = log.end_offsets()
    target = {p: checkpoint.get(p, begin[p]) for p in range(log.partitions)}
    for p, position in target.items():
        if position < begin[p]:
            raise ValueError(
                f"the log starts at offset {begin[p]} of partition {p}, past the cache's checkpoint "
                f"{position}: it no longer holds what the cache was built from; run kvlog rewarm"
            )
        if position > end[p]:
            raise ValueError(
                f"the log ends at offset {end[p]} of partition {p}, before the cache's checkpoint "
                f"{position}: the cache mirrors another log, or the log lost records; run kvlog rewarm"
            )
    reader = log.open_reader(begin)
    applied = 0
    try:
        positions = dict(begin)
        while True:
            if progress is not None:
                progress({p: min(positions[p], target[p]) for p in target}, dict(target))
            if all(positions[p] >= target[p] for p in target):
                return applied
            polled = reader.poll(_POLL_SECONDS, _POLL_RECORDS)
            moved = reader.positions()
            records = [r for r in polled if r.offset < target[r.partition]]
            if records:
                applied += scratch.apply(records, moved, check=check)[0]
            elif moved == positions:
                _check_reachable(log, moved, target)
            positions = moved
    finally:
        reader.close()


def _check_reachable(log: Any, positions: dict[int, int], target: dict[int, int]) -> None:
    """After an empty poll: fail if the log now ends before a position still short of its target."""
    end = log.end_offsets()
    for p, position in positions.items():
        if position < target[p] and end[p] <= position:
            raise ValueError(
                f"the log of partition {p} ends at offset {end[p]}, before the cache's checkpoint "
                f"{target[p]}: it lost records while it was verified"
            )


def _compare(cached: Iterator[tuple[bytes, bytes]], scratch: Cache, report: VerifyReport, limit: int) -> None:
    """Walk both caches in key order (a merge join) and count every difference into ``report``."""

    def note(kind: str, key: bytes, expected: bytes | None, actual: bytes | None) -> None:
        setattr(report, kind, getattr(report, kind) + 1)
        if len(report.differences) < limit:
            report.differences.append(Difference(kind, key, expected, actual))

    replayed: Iterator[tuple[bytes, bytes]] = scratch.items()
    a = next(cached, None)
    b = next(replayed, None)
    while a is not None or b is not None:
        report.checked += 1
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            note("extra", a[0], None, a[1])
            a = next(cached, None)
        elif a is None or b[0] < a[0]:
            note("missing", b[0], b[1], None)
            b = next(replayed, None)
        else:
            if a[1] != b[1]:
                note("different", a[0], b[1], a[1])
            a = next(cached, None)
            b = next(replayed, None)
