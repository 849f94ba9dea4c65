"""Bad input at the API: any key, any value, through a real store.

Every call either does what a ``dict`` would do (and values come back exactly)
or raises the documented error -- ``TypeError`` for a wrong key type or a
value the codec cannot store, ``ValueError`` for a key the cache cannot hold,
:class:`~kvlog.RecordTooLargeError` for a record the log refuses -- before any
I/O: the log's end offsets do not move and the store still equals a plain
dict model. The model below states the rules independently of kvlog's code.
"""

from __future__ import annotations

import json
import reprlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from strategies import MAX_NESTING, any_keys, any_values, keys, nested, sized_values, values

import kvlog.store
from kvlog import CodecError, KVLog, RecordTooLargeError
from kvlog.codec import MAX_KEY_SIZE, get_codec
from kvlog.log.local import LocalLog

#: The embedded log of the fuzzed stores takes records of at most this many
#: bytes (key + value), so values on both sides of the limit are cheap to make.
SMALL_LIMIT = 4096

Outcome = type[BaseException] | None

# -- the model: what must happen to any key and any value ------------------------------


def key_outcome(key: Any) -> bytes | type[BaseException]:
    """The bytes ``key`` is stored under, or the error a store must raise for it."""
    if isinstance(key, str):
        try:
            data = key.encode("utf-8")
        except UnicodeEncodeError:
            return ValueError
    elif isinstance(key, bytes):
        data = bytes(key)
    else:
        return TypeError  # bytearray and memoryview too: keys are str or bytes
    if not data or len(data) > MAX_KEY_SIZE:
        return ValueError
    return data


def _walk(value: Any, visit: Callable[[Any], bool]) -> Outcome:
    """Walk ``value`` (without recursion); TypeError for a cycle or more than MAX_NESTING containers deep.

    ``visit(item)`` says whether a non-container item is storable.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    on_path: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth + 1 > MAX_NESTING or id(item) in on_path:
                return TypeError
            on_path.add(id(item))  # every container is on the path: values are trees unless cyclic
            if isinstance(item, dict):
                for key, child in item.items():
                    if not visit(("key", key)):
                        return TypeError
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif not visit(item):
            return TypeError
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def msgpack_outcome(value: Any) -> Outcome:
    """``None`` if the msgpack codec stores ``value`` exactly, else ``TypeError``."""

    def storable(item: Any) -> bool:
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "key":
            key = item[1]
            return isinstance(key, bytes) or (isinstance(key, str) and _utf8(key))
        if item is None or isinstance(item, (bool, float, bytes, bytearray, memoryview)):
            return True
        if isinstance(item, int):
            return -(2**63) <= item < 2**64
        if isinstance(item, str):
            return _utf8(item)
        return False

    return _walk(value, storable)


def json_outcome(value: Any) -> Outcome:
    """``None`` if the json codec stores ``value`` exactly, else ``TypeError``.

    Values given to the json fuzz nest at most 100 levels deep or far past
    what Python's json module reaches, so MAX_NESTING decides both ways.
    """

    def storable(item: Any) -> bool:
        if isinstance(item, tuple) and len(item) == 2 and item[0] == "key":
            return isinstance(item[1], str) and _utf8(item[1])
        if item is None or isinstance(item, bool):
            return True
        if isinstance(item, int):
            return abs(item) < 10**4300  # Python's int/str conversion limit
        if isinstance(item, float):
            return item == item and item not in (float("inf"), float("-inf"))
        if isinstance(item, str):
            return _utf8(item)
        return False

    return _walk(value, storable)


def same_msgpack(a: Any, b: Any) -> bool:
    """Whether two values are the same msgpack value (NaN equals NaN; a tuple is a list; deep is fine)."""
    pack = msgpack.Packer(use_bin_type=True)
    return bool(pack.pack(a) == pack.pack(b))


def same_json(a: Any, b: Any) -> bool:
    return json.dumps(a) == json.dumps(b)


CODECS = {
    "msgpack": (msgpack_outcome, lambda v: msgpack.packb(v, use_bin_type=True), same_msgpack),
    "json": (
        json_outcome,
        lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode(),
        same_json,
    ),
}


def shown_key(data: bytes) -> str | bytes:
    """A stored key as a ``key_type=str`` store returns it (bytes where it is not UTF-8)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


# -- the fuzz ---------------------------------------------------------------------------


def operations(value_strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Short sequences of store calls with any key and any value."""
    items = st.lists(st.tuples(keys(), values()), min_size=1, max_size=5)
    bad_item = st.tuples(any_keys(), value_strategy)
    update = st.builds(
        lambda good, bad, at: ("update", [*good[:at], bad, *good[at:]]), items, bad_item, st.integers(0, 5)
    )
    return st.lists(
        st.one_of(
            st.tuples(st.just("set"), any_keys(), value_strategy),
            st.tuples(st.just("set"), keys(), value_strategy),
            update,
            st.tuples(st.just("del"), st.one_of(any_keys(), keys())),
            st.tuples(st.just("discard"), any_keys()),
            st.tuples(st.just("get"), st.one_of(any_keys(), keys())),
            st.tuples(st.just("in"), any_keys()),
            st.tuples(
                st.just("scan"), st.one_of(any_keys(), st.just(""), st.text(alphabet="ab:", max_size=2))
            ),
        ),
        min_size=1,
        max_size=6,
    )


@pytest.fixture
def small_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], KVLog]]:
    """``small_store(codec)``: an embedded store taking records of at most SMALL_LIMIT bytes.

    ``update`` sends batches of 3 records here, so that a bad record can sit
    in a later batch than good ones.
    """
    monkeypatch.setattr(kvlog.store, "UPDATE_BATCH", 3)
    opened: list[KVLog] = []

    def make(codec: str) -> KVLog:
        path = tmp_path / codec
        log = LocalLog(path / "log", fsync="never", max_record_bytes=SMALL_LIMIT, background_compaction=False)
        kv = KVLog(path, log=log, codec=codec, follow=False)
        opened.append(kv)
        return kv

    yield make
    for kv in opened:
        kv.close()


class Fuzz:
    """One store, one dict model (key bytes -> value) and the rules above, applied call by call."""

    def __init__(self, kv: KVLog, codec: str) -> None:
        self.kv = kv
        self.model: dict[bytes, Any] = {}
        self.outcome, self.encode, self.same = CODECS[codec]
        self.limit = SMALL_LIMIT

    def item_outcome(self, key: Any, value: Any) -> tuple[Outcome, bytes | None]:
        """What writing ``key = value`` must raise (or ``None``), and the key's bytes if it is good."""
        data = key_outcome(key)
        if not isinstance(data, bytes):
            return data, None
        error = self.outcome(value)
        if error is not None:
            return error, data
        if len(data) + len(self.encode(value)) > self.limit:
            return RecordTooLargeError, data
        return None, data

    def expect_refusal(self, error: type[BaseException], call: Callable[[], Any]) -> None:
        """``call()`` raises ``error`` (and nothing else) and neither the log nor the store moves."""
        before = self.kv.log.end_offsets()
        with pytest.raises(Exception) as raised:
            call()
        assert isinstance(raised.value, error), f"expected {error.__name__}, got {raised.value!r}"
        if error is not RecordTooLargeError:
            assert not isinstance(raised.value, RecordTooLargeError)
        assert self.kv.log.end_offsets() == before, "a refused call wrote to the log"

    def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        note(f"{kind} {reprlib.repr(op[1:])}")  # reprlib: a plain repr of a deep value recurses
        if kind == "set":
            key, value = op[1], op[2]
            error, data = self.item_outcome(key, value)
            if error is not None:
                self.expect_refusal(error, lambda: self.kv.__setitem__(key, value))
                return
            assert data is not None
            self.kv[key] = value
            self.model[data] = value
            assert self.same(self.kv[key], value), "the value read back differs from the one written"
        elif kind == "update":
            batch = op[1]
            outcomes = [self.item_outcome(k, v) for k, v in batch]
            # Every key and value is encoded, in order, before sizes are checked.
            first = next((e for e, _ in outcomes if e not in (None, RecordTooLargeError)), None)
            error = first or next((e for e, _ in outcomes if e is not None), None)
            if error is not None:
                self.expect_refusal(error, lambda: self.kv.update(batch))
                return
            self.kv.update(batch)
            for (_key, value), (_e, data) in zip(batch, outcomes, strict=True):
                assert data is not None
                self.model[data] = value
        elif kind in ("del", "discard"):
            key = op[1]
            data = key_outcome(key)
            method = self.kv.__delitem__ if kind == "del" else self.kv.discard
            if not isinstance(data, bytes):
                self.expect_refusal(data, lambda: method(key))
            elif kind == "del" and data not in self.model:
                self.expect_refusal(KeyError, lambda: method(key))
            else:
                method(key)
                self.model.pop(data, None)
        elif kind in ("get", "in"):
            key = op[1]
            data = key_outcome(key)
            call = (lambda: self.kv.get(key, "absent")) if kind == "get" else (lambda: key in self.kv)
            if not isinstance(data, bytes):
                self.expect_refusal(data, call)
            elif kind == "in":
                assert (key in self.kv) is (data in self.model)
            elif data in self.model:
                assert self.same(self.kv.get(key, "absent"), self.model[data])
            else:
                assert self.kv.get(key, "absent") == "absent"
        elif kind == "scan":
            prefix = op[1]
            if isinstance(prefix, str) and not _utf8(prefix):
                self.expect_refusal(ValueError, lambda: list(self.kv.scan(prefix=prefix)))
            elif not isinstance(prefix, (str, bytes, type(None))):
                self.expect_refusal(TypeError, lambda: list(self.kv.scan(prefix=prefix)))
            else:
                raw = prefix.encode("utf-8") if isinstance(prefix, str) else prefix or b""
                got = list(self.kv.scan(prefix=prefix))
                expected = sorted((k, v) for k, v in self.model.items() if k.startswith(raw))
                assert [k for k, _ in got] == [shown_key(k) for k, _ in expected]
                assert all(self.same(a, b) for (_, a), (_, b) in zip(got, expected, strict=True))

    def check_whole_store(self) -> None:
        """The store holds exactly the model: same keys in byte order, same values."""
        assert len(self.kv) == len(self.model)
        got = list(self.kv.scan())
        expected = sorted(self.model.items())
        assert [k for k, _ in got] == [shown_key(k) for k, _ in expected]
        for (key, value), (_, want) in zip(got, expected, strict=True):
            assert self.same(value, want), key


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_any_key_and_value_round_trips_or_is_refused_before_any_io(
    small_store: Callable[[str], KVLog], codec: str
) -> None:
    fuzz = Fuzz(small_store(codec), codec)
    value_strategy = st.one_of(any_values(), sized_values(SMALL_LIMIT))
    if codec == "json":
        # Python's json stops near its recursion limit (about 1000 levels, less
        # on a deeper stack), so the json fuzz nests either well below or far past it.
        value_strategy = value_strategy.filter(lambda v: not _deep_but_not_far(v))

    @given(operations(value_strategy))
    def run(ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            fuzz.run(op)
        fuzz.check_whole_store()

    run()


def _deep_but_not_far(value: Any) -> bool:
    depth = 0
    while isinstance(value, (list, tuple, dict)) and value:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
        depth += 1
        if depth > 5000:
            return False
    return depth > 100


# -- nesting: msgpack's limit is kvlog's, both ways --------------------------------------


@given(nested(min_depth=MAX_NESTING - 2, max_depth=MAX_NESTING + 2))
def test_msgpack_packs_and_reads_up_to_its_nesting_limit(value: Any) -> None:
    codec = get_codec("msgpack")
    if msgpack_outcome(value) is None:
        assert same_msgpack(codec.decode(codec.encode(value)), value)
    else:
        with pytest.raises(TypeError, match="msgpack codec"):
            codec.encode(value)


def test_a_value_deeper_than_msgpack_nests_is_a_type_error_not_a_crash(tmp_path: Path) -> None:
    with KVLog(tmp_path, follow=False) as kv:
        for value in (nested_value(MAX_NESTING + 1), nested_value(1_000_000), _cycle()):
            before = kv.log.end_offsets()
            with pytest.raises(TypeError, match="msgpack codec"):
                kv["deep"] = value
            with pytest.raises(TypeError, match="msgpack codec"):
                kv.update({"good": 1, "deep": value})
            assert kv.log.end_offsets() == before and len(kv) == 0
        kv["deep"] = nested_value(MAX_NESTING)
        assert same_msgpack(kv["deep"], nested_value(MAX_NESTING)), (
            "the deepest value msgpack packs reads back"
        )


def nested_value(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def _cycle() -> Any:
    outer: dict[str, Any] = {"a": []}
    outer["a"].append(outer)
    return outer


# -- dict keys: what msgpack reads back (strict_map_key) is what it may write -----------


@pytest.mark.parametrize(
    "value",
    [
        {1: "one"},
        {1.5: "x"},
        {None: 1},
        {True: 1},
        {(1, 2): 1},
        {"ok": [{"nested": {3: "int key deep down"}}]},
    ],
    ids=["int", "float", "None", "bool", "tuple", "deep"],
)
@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_a_dict_key_the_codec_cannot_give_back_is_refused(tmp_path: Path, codec: str, value: Any) -> None:
    with KVLog(tmp_path, codec=codec, follow=False) as kv:
        with pytest.raises(TypeError, match="keys must be str"):
            kv["k"] = value
        assert kv.log.end_offsets() == {0: 0}
        kv["bytes-keys" if codec == "msgpack" else "str-keys"] = (
            {b"\x00": 1, "s": 2} if codec == "msgpack" else {"s": {"t": 2}}
        )
        assert len(kv) == 1


# -- sizes: the log's limit, checked before anything is sent -----------------------------


def test_a_record_at_the_limit_is_written_and_one_byte_more_is_refused(tmp_path: Path) -> None:
    with KVLog(tmp_path, codec="bytes", follow=False) as kv:
        limit = kv.log.max_record_bytes
        assert limit == 1024 * 1024
        kv["k"] = b"\x01" * (limit - 1)
        assert len(kv["k"]) == limit - 1
        before = kv.log.end_offsets()
        with pytest.raises(RecordTooLargeError, match="larger than the log accepts"):
            kv["k"] = b"\x02" * limit
        assert kv.log.end_offsets() == before and kv["k"][0] == 1


def test_update_writes_nothing_when_a_later_batch_holds_a_record_too_large(tmp_path: Path) -> None:
    """A real-size update (more than UPDATE_BATCH records): the last record is too large, nothing is sent."""
    with KVLog(tmp_path, codec="bytes", follow=False) as kv:
        limit = kv.log.max_record_bytes
        items = [(f"k{i:05d}", b"v") for i in range(kvlog.store.UPDATE_BATCH)]
        items.append(("big", b"x" * limit))
        with pytest.raises(RecordTooLargeError) as raised:
            kv.update(items)
        assert kv.log.end_offsets() == {0: 0} and len(kv) == 0, "the first batch was written"
        assert "nothing was written" in str(raised.value)


@pytest.mark.parametrize(
    ("argument", "error"),
    [
        ({"prefix": "\ud800"}, ValueError),
        ({"prefix": 7}, TypeError),
        ({"start": ""}, ValueError),
        ({"stop": None, "start": 1.5}, TypeError),
    ],
)
def test_scan_refuses_a_bad_argument_when_called_not_at_the_first_item(
    tmp_path: Path, argument: dict[str, Any], error: type[Exception]
) -> None:
    with KVLog(tmp_path) as kv:
        kv["a"] = 1
        with pytest.raises(error):
            kv.scan(**argument)  # no next(): the call itself refuses


class TestKafka:
    """The oversize path on a real topic whose max.message.bytes is small."""

    MAX_MESSAGE_BYTES = 4096

    def test_records_over_the_topic_limit_are_refused_before_anything_is_sent(self, make_kv: Any) -> None:
        kv = make_kv(codec="bytes", topic_config={"max.message.bytes": str(self.MAX_MESSAGE_BYTES)})
        limit = kv.log.max_record_bytes
        assert 0 < limit < self.MAX_MESSAGE_BYTES
        kv["k"] = b"\x01" * (limit - 1)  # the largest record kvlog sends: the broker takes it
        assert kv["k"] == b"\x01" * (limit - 1)
        before = kv.log.end_offsets()
        for call in (
            lambda: kv.__setitem__("k", b"\x02" * limit),
            lambda: kv.update([("a", b"1"), ("b", b"2" * limit), ("c", b"3")]),
        ):
            with pytest.raises(RecordTooLargeError, match="accepts at most"):
                call()
            assert kv.log.end_offsets() == before
        for bad in (lambda: kv.__setitem__(1, b"x"), lambda: kv.__setitem__("k", "not bytes")):
            with pytest.raises(TypeError):
                bad()
        assert kv.log.end_offsets() == before and kv["k"][0] == 1

    def test_many_records_each_under_the_topic_limit_are_written(self, make_kv: Any) -> None:
        """Records under max.message.bytes must not be refused because the producer batched them together."""
        kv = make_kv(codec="bytes", topic_config={"max.message.bytes": str(self.MAX_MESSAGE_BYTES)})
        items = {f"k{i:03d}": bytes([i]) * (self.MAX_MESSAGE_BYTES // 4) for i in range(40)}
        kv.update(items)
        assert dict(kv.items()) == items


# -- a foreign producer's bytes are read with safe limits -------------------

#: Crafted msgpack records (what any producer may write to the topic) and what reading them says.
CRAFTED = {
    "int-keyed map": (b"\x81\x01\xa1x", "not allowed for map key"),
    "bool-keyed map": (b"\x81\xc3\x01", "not allowed for map key"),
    "nil-keyed map": (b"\x81\xc0\x01", "not allowed for map key"),
    "float-keyed map": (b"\x81\xcb" + b"\x00" * 8 + b"\x01", "not allowed for map key"),
    "array-keyed map": (b"\x81\x91\x01\x01", "not allowed for map key"),
    "map-keyed map": (b"\x81\x80\x01", "not allowed for map key"),
    "array of 2**32-1 items in 5 bytes": (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),
    "map of 2**32-1 pairs in 5 bytes": (b"\xdf\xff\xff\xff\xff", "exceeds max_map_len"),
    "str of 4 GiB in 5 bytes": (b"\xdb\xff\xff\xff\xff", "not valid msgpack"),
    "bin of 4 GiB in 5 bytes": (b"\xc6\xff\xff\xff\xff", "not valid msgpack"),
    "ext of 4 GiB in 6 bytes": (b"\xc9\xff\xff\xff\xff\x05", "not valid msgpack"),
    "1025 nested arrays": (b"\x91" * (MAX_NESTING + 1) + b"\xc0", "deeper than msgpack reads"),
    "a million nested maps": (b"\x81\xa1k" * 1_000_000 + b"\xc0", "deeper than msgpack reads"),
    "truncated array": (b"\x92\x01", "not valid msgpack"),
    "empty": (b"", "not valid msgpack"),
    "trailing bytes": (b"\xc0\xc0", "not valid msgpack"),
    "reserved byte 0xc1": (b"\xc1", "not valid msgpack"),
    "str that is not UTF-8": (b"\xa2\xff\xfe", "not valid msgpack"),
    "bad timestamp": (b"\xd4\xff\x00", "not valid msgpack"),
}


def colliding_int_map(count: int) -> bytes:
    """A msgpack map of ``count`` int keys, each ``n * (2**61 - 1)``-ish: ints hash modulo 2**61 - 1."""
    out = bytearray(b"\xdf" + count.to_bytes(4, "big"))
    for n in range(count):
        out += b"\xd3" + (n * (2**61 - 1) % 2**63).to_bytes(8, "big", signed=True) + b"\xc0"
    return bytes(out)


@pytest.mark.parametrize(("data", "message"), list(CRAFTED.values()), ids=list(CRAFTED))
def test_a_crafted_msgpack_record_is_a_codec_error_quickly(data: bytes, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(CodecError, match=message):
        get_codec("msgpack").decode(data)
    assert time.monotonic() - started < 2.0, "decoding a crafted record must not take long"


def test_a_large_map_of_int_keys_is_refused_without_building_it() -> None:
    data = colliding_int_map(200_000)
    started = time.monotonic()
    with pytest.raises(CodecError, match="not allowed for map key"):
        get_codec("msgpack").decode(data)
    assert time.monotonic() - started < 0.5, "the first int key ends the decode"


def test_ext_types_never_reach_an_object_constructor() -> None:
    codec = get_codec("msgpack")
    assert codec.decode(b"\xd4\x05\x00") == msgpack.ExtType(5, b"\x00")
    # The timestamp extension (-1) is msgpack's own Timestamp, not a datetime.
    assert codec.decode(msgpack.packb(msgpack.Timestamp(1, 0))) == msgpack.Timestamp(1, 0)


def test_the_deepest_value_msgpack_writes_is_read_back() -> None:
    data = b"\x91" * MAX_NESTING + b"\xa4leaf"
    assert same_msgpack(get_codec("msgpack").decode(data), nested_value(MAX_NESTING))


def test_crafted_records_in_the_log_are_codec_errors_on_read_never_a_crash(tmp_path: Path) -> None:
    """A foreign producer appends well-framed msgpack the codec refuses: reads raise CodecError, the rest reads."""
    foreign = {
        b"int-keys": CRAFTED["int-keyed map"][0],
        b"not-utf8": CRAFTED["str that is not UTF-8"][0],
        b"flood": colliding_int_map(50_000),
    }
    with KVLog(tmp_path, follow=False) as kv:
        kv["good"] = {"a": 1}
        kv.log.append(list(foreign.items()))
        kv.sync()
        for key in foreign:
            with pytest.raises(CodecError):
                kv[key]
            with pytest.raises(CodecError):
                kv.get(key)
        assert kv["good"] == {"a": 1}
        assert list(kv.scan(prefix="go")) == [("good", {"a": 1})]
        with pytest.raises(CodecError):
            list(kv.scan())
