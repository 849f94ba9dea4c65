"""``update()`` encodes a batch as ``encode_key`` and the codec encode each pair: same bytes, same errors.

The batch encoder reuses one msgpack packer and takes a leaf or a flat dict of
leaves as packed; everything else goes through the codec. For any keys and
values, what it returns, or the exception it raises (type and message), must
be what encoding pair by pair gives. And a store's ``update()`` writes what it
did before: the log holds those bytes and the cache the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import any_keys, keys, unencodable_values, values

from kvlog import KVLog
from kvlog.codec import encode_key, get_codec
from kvlog.store import _encode_records


class _Dict(dict[str, Any]):
    """A dict subclass: not the codec's flat-dict fast case."""


#: Values around the fast case: leaves, flat dicts (with str, bytes or other keys, leaf or container
#: values), subclasses, tuples, values msgpack cannot pack, and anything values() draws.
batch_values = st.one_of(
    values(),
    unencodable_values(),
    st.dictionaries(st.one_of(st.text(max_size=3), st.binary(max_size=3)), values(), max_size=4),
    st.dictionaries(
        st.one_of(st.integers(), st.none(), st.floats(), st.booleans()), st.integers(), max_size=3
    ),
    st.dictionaries(st.text(max_size=3), st.tuples(st.integers()), max_size=2),
    st.builds(_Dict, st.dictionaries(st.text(max_size=3), st.integers(), max_size=3)),
    st.integers(),  # beyond 64 bits too
    st.tuples(st.integers(min_value=0, max_value=9)),
)


def _pairwise(items: list[tuple[Any, Any]], codec: Any) -> Any:
    try:
        return [(encode_key(k), codec.encode(v)) for k, v in items]
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return (type(exc), str(exc))


def _batched(items: list[tuple[Any, Any]], codec: Any) -> Any:
    try:
        return _encode_records(iter(items), codec)  # an iterator: it is read once
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
        return (type(exc), str(exc))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.one_of(keys(), any_keys()), batch_values), max_size=6))
def test_the_batch_encoder_gives_what_pair_by_pair_encoding_gives(items: list[tuple[Any, Any]]) -> None:
    for name in ("msgpack", "json", "str", "bytes"):
        codec = get_codec(name)
        assert _batched(items, codec) == _pairwise(items, codec), name
        # update(a dict) hands over the dict's items, which the msgpack codec reads as two columns.
        try:
            mapping = dict(items)
        except TypeError:
            continue  # an unhashable key
        try:
            batched: Any = _encode_records(mapping.items(), codec)
        except Exception as exc:  # noqa: BLE001 - the exception is the outcome compared
            batched = (type(exc), str(exc))
        assert batched == _pairwise(list(mapping.items()), codec), name


def test_a_dict_key_msgpack_reads_back_as_another_type_is_refused_after_good_values() -> None:
    codec = get_codec("msgpack")
    good = [("a", {"x": 1}), ("b", 2)]
    assert _batched([*good, ("c", {1: "int key"})], codec) == _pairwise([*good, ("c", {1: "int key"})], codec)
    assert _batched([*good, ("c", {"x": {1: 2}})], codec)[0] is TypeError
    assert _batched(good, codec) == [(b"a", msgpack.packb({"x": 1})), (b"b", msgpack.packb(2))]


def test_update_writes_the_records_pair_by_pair_encoding_gives(tmp_path: Path) -> None:
    batch = {f"k{i}": {"i": i, "name": "é" * (i % 3), "raw": b"\x00" * i} for i in range(2500)}
    batch["nested"] = {"a": [1, {"b": None}], "t": (1, 2)}  # type: ignore[dict-item]
    with KVLog(tmp_path, follow=False) as kv:
        kv.update(batch, extra=1.5)
        expected = dict(_pairwise([*batch.items(), ("extra", 1.5)], get_codec("msgpack")))
        reader = kv.log.open_reader({0: 0})
        logged = {r.key: r.value for r in reader.poll(1.0, 10_000)}
        reader.close()
        assert logged == expected
        assert {k.encode(): kv[k] for k in batch}[b"nested"] == {"a": [1, {"b": None}], "t": [1, 2]}
        assert len(kv) == len(expected)
