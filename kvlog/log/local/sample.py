"""The dirt sample: an estimate, from a sample of keys, of the bytes a compaction pass would remove.

Appends show it the records of the keys it follows and each compaction pass
adjusts it, so the cleaner knows a partition's dirty ratio without reading
the log. See docs/design.md, "The embedded log".
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from .segments import Segment, base_of

__all__ = ["HASH_MASK", "HASH_MIX", "DirtSample", "SeenRecord", "key_hash"]

#: Multiplying by this odd number spreads every bit of a crc32 into the high bits.
HASH_MIX = 0x9E3779B1
#: Keeps the 32 bits of a key hash.
HASH_MASK = 0xFFFFFFFF
#: Ranks of a 32-bit hash: its leading zero bits, 0..32.
_RANKS = 33
#: Keys the dirt sample of a partition follows at most (a log with fewer is measured exactly).
_SAMPLE_KEYS = 4096


def key_hash(key: bytes) -> int:
    """A 32-bit hash of a key, the same in every process; its leading zero bits are its rank."""
    return (zlib.crc32(key) * HASH_MIX) & HASH_MASK


class SeenRecord(NamedTuple):
    """A record shown to a :class:`DirtSample`."""

    key: bytes
    #: :func:`key_hash` of ``key``.
    key_hash: int
    offset: int
    #: Bytes of the record's frame.
    size: int
    #: The timestamp (ms) of a tombstone; -1 for a value.
    tombstone_ms: int


class DirtSample:
    """Estimates the bytes a compaction pass would remove from one partition, from a sample of its keys.

    A pass removes every record that a later record of its key supersedes,
    and the tombstones older than the retention; which records those are only
    a look at every key tells. The sample follows the keys whose hash has at
    least ``level`` leading zero bits (a share 2**-level of all keys, the same
    keys in every process): the newest record of each, and per segment the
    bytes of their records that a newer one superseded. Scaled by 2**level
    that estimates the whole. ``level`` rises whenever more than _SAMPLE_KEYS
    keys are followed, so memory stays bounded and a log with fewer keys is
    measured exactly.

    Records may be shown in any order (a scan of old records while appends go
    on): offsets decide which record of a key is the newest. Each record must
    be shown exactly once; ``pending`` lists the offset ranges not shown yet,
    in offset order (records another process appended are added to it as this
    one sees them). Callers hold the log's lock.
    """

    __slots__ = ("dead", "latest", "level", "pending")

    def __init__(self, pending: list[tuple[int, int]]) -> None:
        self.level = 0
        #: Key id (see _key_id; its low 32 bits are the key's hash) -> offset,
        #: frame bytes and tombstone timestamp (-1: a value) of the key's newest record.
        self.latest: dict[int, tuple[int, int, int]] = {}
        #: Segment base offset -> bytes of superseded records of followed keys in it, by rank.
        self.dead: dict[int, list[int]] = {}
        #: Offset ranges ``[low, high)`` whose records the sample has not been shown yet.
        self.pending = pending

    def add_pending(self, low: int, high: int) -> None:
        """Records ``[low, high)`` were published without being shown (another process appended them)."""
        if high <= low:
            return
        if self.pending and self.pending[-1][1] == low:
            self.pending[-1] = (self.pending[-1][0], high)
        else:
            self.pending.append((low, high))

    def counted_below(self, upto: int) -> None:
        """Every pending record below offset ``upto`` was shown (the ranges are in offset order)."""
        pending = self.pending
        while pending and pending[0][0] < upto:
            high = pending[0][1]
            if high > upto:
                pending[0] = (upto, high)
                return
            pending.pop(0)

    def uncounted(self) -> int:
        """How many offsets the sample has not been shown (the records of ``pending``, gaps included)."""
        return sum(high - low for low, high in self.pending)

    @property
    def threshold(self) -> int:
        """The keys whose :func:`key_hash` is below this are followed."""
        return 1 << (32 - self.level)

    @staticmethod
    def _key_id(key: bytes, h: int) -> int:
        return h | zlib.adler32(key) << 32 | len(key) << 64

    def observe(self, seen: Iterable[SeenRecord], segments: Sequence[Segment]) -> None:
        """Count records (``segments``: the partition's segments now, to place superseded ones)."""
        latest, dead, level = self.latest, self.dead, self.level
        adler32 = zlib.adler32
        active = segments[-1].base
        active_counts = dead.get(active)
        if active_counts is None:
            active_counts = dead[active] = [0] * _RANKS
        for key, h, offset, size, tombstone in seen:
            rank = 32 - h.bit_length()
            if rank < level:
                continue
            ident = h | adler32(key) << 32 | len(key) << 64
            prev = latest.get(ident)
            if prev is None:
                latest[ident] = (offset, size, tombstone)
                if len(latest) > _SAMPLE_KEYS:
                    self._raise_level()
                    latest, level = self.latest, self.level
                continue
            if prev[0] < offset:
                latest[ident] = (offset, size, tombstone)
                offset, size = prev[0], prev[1]  # the superseded one
            elif prev[0] == offset:
                continue  # shown twice
            if offset >= active:
                active_counts[rank] += size
                continue
            base = base_of(segments, offset)
            counts = dead.get(base)
            if counts is None:
                counts = dead[base] = [0] * _RANKS
            counts[rank] += size

    def observe_appended(
        self, key: bytes, h: int, offset: int, size: int, tombstone: int, segments: Sequence[Segment]
    ) -> None:
        """:meth:`observe` of one record just appended to the active segment: the single write's path.

        The same counting without a list, a :class:`SeenRecord` or the loop;
        a record not newer than the one the sample holds for its key (which
        an append never is) takes the general path.
        """
        rank = 32 - h.bit_length()
        if rank < self.level:
            return
        latest = self.latest
        ident = h | zlib.adler32(key) << 32 | len(key) << 64
        prev = latest.get(ident)
        if prev is None:
            latest[ident] = (offset, size, tombstone)
            if len(latest) > _SAMPLE_KEYS:
                self._raise_level()
            return
        if prev[0] >= offset:
            self.observe([SeenRecord(key, h, offset, size, tombstone)], segments)
            return
        latest[ident] = (offset, size, tombstone)
        # The superseded record's bytes count where it lies.
        old = prev[0]
        base = segments[-1].base
        if old < base:
            base = base_of(segments, old)
        counts = self.dead.get(base)
        if counts is None:
            counts = self.dead[base] = [0] * _RANKS
        counts[rank] += prev[1]

    def _raise_level(self) -> None:
        while len(self.latest) > _SAMPLE_KEYS:
            self.level += 1
            limit = 1 << (32 - self.level)
            self.latest = {k: v for k, v in self.latest.items() if k & HASH_MASK < limit}
        # Counts of lower ranks stay but are no longer summed.

    def replaced(self, bases: Sequence[int], into: int, counted: Mapping[int, Sequence[int]]) -> None:
        """Compaction replaced the segments at ``bases`` by one at ``into``, without the superseded records.

        ``counted``: the superseded bytes per segment when the pass started,
        which is what it removed; what was counted since stays.
        """
        left = [0] * _RANKS
        for base in bases:
            now = self.dead.pop(base, None)
            if now is not None:
                before = counted.get(base, ())
                for rank, size in enumerate(now):
                    left[rank] += max(0, size - (before[rank] if rank < len(before) else 0))
        if any(left):
            self.dead[into] = left

    def dropped(self, key: bytes, h: int, offset: int, size: int, base: int) -> None:
        """Compaction dropped this tombstone from the segment at ``base``.

        The tombstone was the newest record of its key when the pass started.
        """
        rank = 32 - h.bit_length()
        if rank < self.level:
            return
        ident = self._key_id(key, h)
        prev = self.latest.get(ident)
        if prev is None:
            return
        if prev[0] == offset:
            del self.latest[ident]
        elif prev[0] > offset and base in self.dead:
            # Superseded since the pass started, and counted so: gone now.
            counts = self.dead[base]
            counts[rank] = max(0, counts[rank] - size)

    def estimate(self, below: int, horizon: int) -> int:
        """Bytes a pass would remove below offset ``below`` (the closed segments).

        ``horizon``: tombstones with a timestamp (ms) before it are dropped.
        """
        level = self.level
        total = sum(sum(counts[level:]) for base, counts in self.dead.items() if base < below)
        total += sum(
            size for offset, size, ts in self.latest.values() if 0 <= ts < horizon and offset < below
        )
        return total << level

    def to_json(self) -> dict[str, Any]:
        """The sample as JSON-able data, for :meth:`from_json`."""
        return {
            "level": self.level,
            "pending": [list(r) for r in self.pending],
            "latest": [[ident, *entry] for ident, entry in self.latest.items()],
            "dead": [[base, counts] for base, counts in self.dead.items() if any(counts)],
        }

    @classmethod
    def from_json(cls, state: Mapping[str, Any]) -> DirtSample:
        """The sample :meth:`to_json` saved (ValueError, TypeError or KeyError if it is not one)."""
        sample = cls([(int(a), int(b)) for a, b in state["pending"]])
        sample.level = int(state["level"])
        if not 0 <= sample.level <= 32:
            raise ValueError(f"level {sample.level}")
        for ident, offset, size, tombstone in state["latest"]:
            sample.latest[int(ident)] = (int(offset), int(size), int(tombstone))
        for base, counts in state["dead"]:
            if len(counts) != _RANKS:
                raise ValueError("dead counts")
            sample.dead[int(base)] = [int(c) for c in counts]
        return sample
