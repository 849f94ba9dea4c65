"""Codecs and key rules, without any log: what round-trips and what is refused up front."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from strategies import bad_keys, keys, values

from kvlog import Codec, CodecError
from kvlog.codec import MAX_KEY_SIZE, decode_key, encode_key, get_codec


@given(values())
def test_msgpack_round_trips_json_like_values(value: Any) -> None:
    codec = get_codec("msgpack")
    assert codec.decode(codec.encode(value)) == value


@given(keys())
def test_str_keys_round_trip_through_utf8(key: str) -> None:
    assert decode_key(encode_key(key), str) == key
    assert encode_key(key) == key.encode("utf-8")


@given(bad_keys())
def test_bad_keys_are_refused_with_type_or_value_error(key: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_key(key)


def test_key_limits() -> None:
    assert encode_key("x" * MAX_KEY_SIZE)
    with pytest.raises(ValueError, match="at most 511 bytes"):
        encode_key("x" * (MAX_KEY_SIZE + 1))
    with pytest.raises(ValueError, match="empty"):
        encode_key(b"")
    with pytest.raises(ValueError, match="UTF-8"):
        encode_key("\udcff")
    with pytest.raises(TypeError, match="keys must be str or bytes, not int"):
        encode_key(1)  # type: ignore[arg-type]


def test_undecodable_foreign_key_comes_back_as_bytes() -> None:
    assert decode_key(b"\xff\xfe", str) == b"\xff\xfe"
    assert decode_key(b"abc", bytes) == b"abc"


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, 2**64, float, {"a": object()}, {1: "int key"}, [{"a": {None: 1}}], "\udcff"]
)
def test_msgpack_refuses_unencodable_values_with_typeerror(value: Any) -> None:
    with pytest.raises(TypeError, match="msgpack codec"):
        get_codec("msgpack").encode(value)


@pytest.mark.parametrize(
    ("name", "value"), [("msgpack", {1: "one"}), ("json", {1: "one"}), ("json", {b"k": 1})]
)
def test_dict_keys_that_would_not_read_back_are_refused(name: str, value: Any) -> None:
    """msgpack reads only str/bytes map keys (strict_map_key); json would turn an int key into a str."""
    with pytest.raises(TypeError, match="keys must be str"):
        get_codec(name).encode(value)


def test_bytes_and_str_dict_keys_round_trip_through_msgpack() -> None:
    codec = get_codec("msgpack")
    value = {b"\x00raw": [1, {"s": b"v"}], "text": None}
    assert codec.decode(codec.encode(value)) == value


def test_msgpack_never_builds_objects_from_ext_types() -> None:
    import msgpack

    data = msgpack.packb(msgpack.ExtType(42, b"payload"))
    assert get_codec("msgpack").decode(data) == msgpack.ExtType(42, b"payload")


@pytest.mark.parametrize(
    ("name", "garbage"),
    [
        ("msgpack", b"\xc1"),
        ("msgpack", b"\x81\x91\x01\x01"),
        ("json", b"{nope"),
        ("json", b"[" * 100_000),
        ("str", b"\xff"),
    ],
)
def test_undecodable_stored_value_raises_codec_error(name: str, garbage: bytes) -> None:
    with pytest.raises(CodecError):
        get_codec(name).decode(garbage)


def test_codec_type_checks() -> None:
    with pytest.raises(TypeError, match="str codec"):
        get_codec("str").encode(b"x")
    with pytest.raises(TypeError, match="bytes codec"):
        get_codec("bytes").encode("x")
    with pytest.raises(TypeError, match="json codec"):
        get_codec("json").encode(float("nan"))
    with pytest.raises(ValueError, match="unknown codec 'yaml'"):
        get_codec("yaml")


def test_user_codec_is_returned_as_is() -> None:
    codec = Codec("rot", lambda v: v.encode()[::-1], lambda b: b[::-1].decode())
    assert get_codec(codec) is codec
    assert codec.decode(codec.encode("abc")) == "abc"
