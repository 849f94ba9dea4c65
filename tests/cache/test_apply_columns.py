"""``Cache.apply_columns`` (replay of either log) does what ``Cache.apply`` does with the same records.

The same entries and checkpoint in LMDB, the same records skipped for the
same reasons in the same order, the same record raised at with ``strict``,
whatever the batch holds: tombstones anywhere, keys LMDB cannot hold, values
the codec's check refuses, several partitions. Likewise a writer's own batch
(``apply_appended``), which goes to LMDB with ``putmulti`` between tombstones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlog.cache import Cache
from kvlog.codec import get_codec
from kvlog.errors import BadRecordError
from kvlog.log.base import Record
from kvlog.log.kafka import _KafkaColumns
from kvlog.log.local.segments import FrameColumns

keys = st.one_of(
    st.sampled_from([b"a", b"b", b"c", b"d"]),
    st.binary(min_size=1, max_size=8),
    st.just(b""),  # LMDB cannot hold it: skipped
    st.just(b"k" * 512),  # nor that
)
msgpack_values = st.one_of(
    st.none(),  # a tombstone
    st.integers(min_value=-(2**63), max_value=2**64 - 1).map(msgpack.packb),
    st.sampled_from([{"a": [1, 2]}, "text", [None, 1.5]]).map(msgpack.packb),
    st.sampled_from(
        [b"", b"\xc1", b"\x92\x01", msgpack.packb(1) + b"\x00", b"\x81"]
    ),  # not one msgpack object
    st.binary(max_size=6),
)
#: A batch: per partition, its records in offset order.
batches = st.lists(st.tuples(st.integers(min_value=0, max_value=2), keys, msgpack_values), max_size=40)


def _columns(batch: list[tuple[int, bytes, bytes | None]]) -> tuple[list[FrameColumns], list[Record]]:
    """The batch as replay of the embedded log holds it (one FrameColumns per run of a partition) and as records."""
    columns: list[FrameColumns] = []
    records: list[Record] = []
    offsets = [0, 0, 0]
    for partition, key, value in batch:
        if not columns or columns[-1].partition != partition:
            columns.append(FrameColumns(partition))
        part = columns[-1]
        if value is None:
            part.tombstones.append(len(part.offsets))
        part.offsets.append(offsets[partition])
        part.keys.append(key)
        part.values.append(value)
        records.append(Record(partition, offsets[partition], key, value))
        offsets[partition] += 2  # gaps, as compaction leaves them
    # The cache applies columns in list order; records of one partition stay in their order.
    ordered = [record for part in columns for record in part.records()]
    return columns, ordered


def _fresh(path: Path, before: dict[bytes, bytes]) -> Cache:
    cache = Cache(path)
    cache.reset({"kind": "test"})
    cache.apply([Record(0, 0, key, value) for key, value in before.items()], {})
    return cache


def _contents(cache: Cache) -> tuple[dict[bytes, bytes], dict[int, int]]:
    return dict(cache.items()), cache.checkpoint()


def _outcome(apply: Callable[..., tuple[int, int]], batch: Any, strict: bool, check: Any) -> Any:
    bad: list[tuple[Any, str]] = []
    try:
        counts = apply(
            batch,
            {0: 99, 1: 99, 2: 99},
            check=check,
            strict=strict,
            on_bad=lambda r, why: bad.append((r, why)),
        )
    except BadRecordError as exc:
        return ("raised", exc.partition, exc.offset, exc.reason)
    return counts, [(tuple(record), why) for record, why in bad]


CHECKS = {
    "msgpack": lambda: get_codec("msgpack").value_check(),
    "json": lambda: get_codec("json").value_check(),
    "none": lambda: None,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=batches,
    before=st.dictionaries(st.sampled_from([b"a", b"b", b"c", b"x"]), st.binary(max_size=4), max_size=4),
    strict=st.booleans(),
    check=st.sampled_from(sorted(CHECKS)),
)
def test_apply_columns_leaves_what_apply_leaves(
    tmp_path_factory: pytest.TempPathFactory,
    batch: list[tuple[int, bytes, bytes | None]],
    before: dict[bytes, bytes],
    strict: bool,
    check: str,
) -> None:
    columns, records = _columns(batch)
    by_records = _fresh(tmp_path_factory.mktemp("records"), before)
    by_columns = _fresh(tmp_path_factory.mktemp("columns"), before)
    try:
        expected = _outcome(by_records.apply, records, strict, CHECKS[check]())
        assert _outcome(by_columns.apply_columns, columns, strict, CHECKS[check]()) == expected
        assert _contents(by_columns) == _contents(by_records)
    finally:
        by_records.close()
        by_columns.close()


def _kafka_columns(
    batch: list[tuple[int, bytes | None, bytes | None]],
) -> tuple[list[_KafkaColumns], list[Record]]:
    """The batch as replay of a Kafka topic holds it: the decoder's tuples, one _KafkaColumns per run of a partition."""
    runs: list[tuple[int, list[Record]]] = []
    offsets = [0, 0, 0]
    for partition, key, value in batch:
        if not runs or runs[-1][0] != partition:
            runs.append((partition, []))
        runs[-1][1].append(Record(partition, offsets[partition], key, value))  # type: ignore[arg-type]
        offsets[partition] += 2
    columns = [
        _KafkaColumns(
            partition,
            tuple(r.offset for r in run),
            tuple(r.key for r in run),
            tuple(r.value for r in run),
        )
        for partition, run in runs
    ]
    return columns, [record for _, run in runs for record in run]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # A Kafka topic may hold records without a key: bad records, like an empty key.
    batch=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2), st.one_of(keys, st.none()), msgpack_values),
        max_size=40,
    ),
    strict=st.booleans(),
    check=st.sampled_from(sorted(CHECKS)),
)
def test_kafka_columns_leave_what_apply_leaves(
    tmp_path_factory: pytest.TempPathFactory,
    batch: list[tuple[int, bytes | None, bytes | None]],
    strict: bool,
    check: str,
) -> None:
    columns, records = _kafka_columns(batch)
    assert [record for part in columns for record in part.records()] == records
    for part in columns:
        assert part.tombstones == [i for i, value in enumerate(part.values) if value is None]
    by_records = _fresh(tmp_path_factory.mktemp("records"), {b"a": b"0"})
    by_columns = _fresh(tmp_path_factory.mktemp("columns"), {b"a": b"0"})
    try:
        expected = _outcome(by_records.apply, records, strict, CHECKS[check]())
        assert _outcome(by_columns.apply_columns, columns, strict, CHECKS[check]()) == expected
        assert _contents(by_columns) == _contents(by_records)
    finally:
        by_records.close()
        by_columns.close()


def test_a_bad_value_is_found_after_good_ones_and_tombstones(tmp_path: Path) -> None:
    """A column whose check fails half-way is applied record by record: the good records around it go in."""
    columns, records = _columns(
        [
            (0, b"a", msgpack.packb(1)),
            (0, b"b", None),
            (0, b"c", b"\xc1"),
            (0, b"d", msgpack.packb(json.dumps(4))),
        ]
    )
    cache = _fresh(tmp_path, {b"b": b"old", b"c": msgpack.packb("old")})
    try:
        bad: list[tuple[Any, str]] = []
        check = get_codec("msgpack").value_check()
        assert cache.apply_columns(
            columns, {0: 8}, check=check, on_bad=lambda r, why: bad.append((r, why))
        ) == (3, 1)
        assert dict(cache.items()) == {
            b"a": msgpack.packb(1),
            b"c": msgpack.packb("old"),
            b"d": records[3].value,
        }
        assert [(r.offset, "msgpack" in why) for r, why in bad] == [(4, True)]
    finally:
        cache.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.lists(
        st.tuples(
            st.sampled_from([b"a", b"b", b"c", b"d", b"e"]), st.one_of(st.none(), st.binary(max_size=5))
        ),
        min_size=1,
        max_size=30,
    )
)
def test_a_writers_batch_with_tombstones_anywhere_is_applied_in_order(
    tmp_path_factory: pytest.TempPathFactory, batch: list[tuple[bytes, bytes | None]]
) -> None:
    cache = _fresh(tmp_path_factory.mktemp("appended"), {b"a": b"0", b"c": b"0"})
    try:
        assert cache.apply_appended(batch, {}, {0: len(batch)})
        expected = {b"a": b"0", b"c": b"0"}
        for key, value in batch:
            if value is None:
                expected.pop(key, None)
            else:
                expected[key] = value
        assert _contents(cache) == (expected, {0: len(batch)})
    finally:
        cache.close()
