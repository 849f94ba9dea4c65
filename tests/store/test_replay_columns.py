"""A cold replay of the embedded log (read and applied column by column) builds the cache the record path builds.

The log has several segments per partition, gaps left by compaction,
tombstones, and foreign records the cache must quarantine (keys LMDB cannot
hold, values that are not one msgpack object). The cache a cold open builds
must equal the log folded record by record with the documented value check
(docs/design.md, "Bad records"), quarantine the same records, and stop at the
same record with ``on_bad_record="raise"``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest
from ondisk import cache_contents

from kvlog import KVLog, LocalLog
from kvlog.codec import get_codec
from kvlog.errors import BadRecordError
from kvlog.verify import verify

BAD_VALUES = [b"\xc1", b"", msgpack.packb(1) + b"\x00", b"\x92\x01"]


def _write_log(path: Path, partitions: int) -> None:
    """Records of a store and of a foreign writer, over small segments, compacted once midway."""
    with KVLog(path, log=LocalLog(path / "log", partitions=partitions, segment_bytes=2048)) as kv:
        for round_ in range(8):
            kv.update({f"k{i}": {"round": round_, "i": i} for i in range(round_, 40, 3)})
            for i in range(round_ % 4, 40, 7):
                kv.discard(f"k{i}")
            kv.log.append(
                [
                    (b"k%d" % round_, BAD_VALUES[round_ % len(BAD_VALUES)]),  # quarantined: keeps its value
                    (b"", msgpack.packb(round_)),  # an empty key
                    (b"x" * 512, msgpack.packb(round_)),  # longer than LMDB holds
                    (b"foreign%d" % round_, msgpack.packb([round_])),
                    (b"gone%d" % round_, None),
                ],
                timeout=10,
            )
            if round_ == 4:
                kv.log.compact()


def _open(path: Path, **options: Any) -> KVLog:
    """The store, without background compaction: the log stays the one the expected fold read."""
    return KVLog(path, follow=False, log=LocalLog(path / "log", background_compaction=False), **options)


def _fold_record_by_record(log_dir: Path) -> tuple[dict[bytes, bytes], list[tuple[int, int]]]:
    """The log read with the plain reader (records) and folded with the msgpack codec's check."""
    check = get_codec("msgpack").value_check()
    assert check is not None
    log = LocalLog(log_dir, background_compaction=False)
    try:
        end = log.end_offsets()
        reader = log.open_reader(log.begin_offsets())
        state: dict[bytes, bytes] = {}
        bad: list[tuple[int, int]] = []
        while any(reader.positions()[p] < end[p] for p in end):
            for record in reader.poll(1.0, 1000):
                key, value = record.key, record.value
                if not key or len(key) > 511:
                    bad.append((record.partition, record.offset))
                elif value is None:
                    state.pop(key, None)
                else:
                    try:
                        check(value)
                    except Exception:  # noqa: BLE001 - the check's failure is what is being counted
                        bad.append((record.partition, record.offset))
                        continue
                    state[key] = value
        reader.close()
    finally:
        log.close()
    return state, sorted(bad)


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_cold_replay_builds_the_cache_record_by_record_folding_builds(
    tmp_path: Path, partitions: int
) -> None:
    _write_log(tmp_path, partitions)
    expected, bad = _fold_record_by_record(tmp_path / "log")
    assert (
        len(bad) >= 8 and len(expected) > 20
    )  # the log holds what this test is about (compaction dropped some)
    shutil.rmtree(tmp_path / "cache")
    with _open(tmp_path) as kv:
        stats: dict[str, Any] = kv.stats()
        assert kv.open_replay["mode"] == "cold"
        assert stats["records_quarantined"] == len(bad)
        # The last few quarantined records are kept, in log order within each partition.
        kept = stats["quarantined"]
        assert all(position in bad for position in ((p, o) for p, o, _ in kept))
        assert verify(kv).ok
    data, checkpoint, _ = cache_contents(tmp_path / "cache")
    assert data == expected
    log = LocalLog(tmp_path / "log", background_compaction=False)
    try:
        assert checkpoint == log.end_offsets()
    finally:
        log.close()


def test_replay_with_on_bad_record_raise_stops_at_the_first_bad_record(tmp_path: Path) -> None:
    _write_log(tmp_path, 1)
    _, bad = _fold_record_by_record(tmp_path / "log")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(BadRecordError) as raised:
        _open(tmp_path, on_bad_record="raise")
    assert (raised.value.partition, raised.value.offset) == bad[0]
