"""The dump format on its own (``kvlog.dumpfile``): what a dump line holds, what reads back, what is refused.

The commands that write and read dumps (``dump``, ``scan``, ``load``) are
tested through the command line in ``test_cli.py`` and ``test_cli_bad_input.py``.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import msgpack
import pytest

from kvlog.codec import MAX_KEY_SIZE, get_codec
from kvlog.dumpfile import DumpLineError, dump_line, dump_record, parse_dump_line, read_dump

#: The default codec's check, as ``kvlog load`` passes it for a msgpack store.
ENCODE = get_codec("msgpack").encode


def fields(line: str) -> set[str]:
    """The field names of one dump line, read as strict JSON (NaN or Infinity would fail here)."""
    record = json.loads(line, parse_constant=_refuse_constant)
    assert isinstance(record, dict)
    return set(record)


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"a dump line holds {name}, which is not JSON")


def round_trip(key: bytes, value: Any) -> tuple[bytes, Any]:
    """Write ``key, value`` as a dump line and read it back."""
    line = dump_line(key, value)
    assert "\n" not in line and "\r" not in line, "one entry is one line"
    return parse_dump_line(line, ENCODE)


def same_value(a: Any, b: Any) -> bool:
    """Equal as stored: the same msgpack bytes (so NaN equals NaN, and deep values compare without recursion)."""
    return bool(msgpack.packb(a, use_bin_type=True) == msgpack.packb(b, use_bin_type=True))


def deep(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


# -- keys -------------------------------------------------------------------------------


class TestKeys:
    def test_a_utf8_key_is_written_as_readable_text(self) -> None:
        line = dump_line("naïve ☃:1".encode(), 1)
        assert json.loads(line) == {"key": "naïve ☃:1", "value": 1}
        assert "☃" in line, "non-ASCII text is kept as it is, not \\u-escaped"

    def test_a_utf8_key_reads_back_as_the_same_bytes(self) -> None:
        key = "naïve ☃:1".encode()
        assert round_trip(key, 1) == (key, 1)

    def test_a_key_that_is_not_utf8_is_base64(self) -> None:
        key = b"\xff\x00key"
        line = dump_line(key, "one")
        assert json.loads(line) == {"key_b64": base64.b64encode(key).decode(), "value": "one"}
        assert round_trip(key, "one") == (key, "one")

    def test_a_str_key_and_its_bytes_are_one_key(self) -> None:
        from_text = parse_dump_line('{"key": "order:1", "value": 1}', ENCODE)
        from_b64 = parse_dump_line('{"key_b64": "b3JkZXI6MQ==", "value": 1}', ENCODE)
        assert from_text == from_b64 == (b"order:1", 1)


# -- values ------------------------------------------------------------------------------

JSON_EXACT = {
    "none": None,
    "true": True,
    "zero": 0,
    "negative": -1,
    "int64": 2**63 - 1,
    "float": 12.5,
    "empty-str": "",
    "unicode": "naïve ☃",
    "line-breaks": "a\nb\rc\u2028d",
    "empty-list": [],
    "empty-dict": {},
    "nested": {"status": "paid", "lines": [1, 2, {"sku": "a", "gift": None}]},
    "ten-deep": deep(10),
}

NOT_JSON = {
    "bytes-in-a-dict": {"blob": b"\x01\x02"},
    "bytes-in-a-list": [b"\xfe"],
    "bytes-dict-key": {b"\x01": "one", "two": 2},
    "ext-type": msgpack.ExtType(42, b"\x00\x01"),
    "nan": math.nan,
    "infinity": [math.inf, -math.inf],
    "thousand-deep": deep(1000),  # msgpack holds 1024 levels; Python's JSON and recursion do not
}


class TestValues:
    @pytest.mark.parametrize("value", JSON_EXACT.values(), ids=JSON_EXACT.keys())
    def test_a_value_json_holds_exactly_is_plain_json(self, value: Any) -> None:
        line = dump_line(b"k", value)
        assert fields(line) == {"key", "value"}
        assert json.loads(line)["value"] == value
        assert round_trip(b"k", value) == (b"k", value)

    def test_a_bytes_value_is_base64(self) -> None:
        value = bytes(range(256))
        line = dump_line(b"k", value)
        assert json.loads(line) == {"key": "k", "value_b64": base64.b64encode(value).decode()}
        assert round_trip(b"k", value) == (b"k", value)

    @pytest.mark.parametrize("value", NOT_JSON.values(), ids=NOT_JSON.keys())
    def test_anything_else_is_msgpack_in_base64_and_reads_back_the_same(self, value: Any) -> None:
        line = dump_line(b"k", value)
        assert fields(line) == {"key", "value_msgpack_b64"}
        packed = base64.b64decode(json.loads(line)["value_msgpack_b64"])
        assert same_value(msgpack.unpackb(packed, raw=False, strict_map_key=False), value)
        key, read = round_trip(b"k", value)
        assert key == b"k" and same_value(read, value)

    def test_a_tuple_comes_back_as_a_list_as_from_msgpack(self) -> None:
        assert json.loads(dump_line(b"k", (1, "a", (2,)))) == {"key": "k", "value": [1, "a", [2]]}
        assert round_trip(b"k", (1, "a", (2,))) == (b"k", [1, "a", [2]])

    def test_dump_line_is_dump_record_as_json(self) -> None:
        for value in (*JSON_EXACT.values(), b"raw", *NOT_JSON.values()):
            assert json.loads(dump_line(b"\xffk", value)) == dump_record(b"\xffk", value)


# -- reading a whole dump ------------------------------------------------------------------


class TestReadDump:
    def test_entries_come_back_in_order_and_blank_lines_are_skipped(self) -> None:
        entries = [(b"b", 2), (b"\xfe", b"\x00"), (b"a", {"blob": b"\x01"}), (b"c", "x\ny")]
        text = "\n".join(dump_line(k, v) for k, v in entries[:2]) + "\n\n  \n"
        text += "\n".join(dump_line(k, v) for k, v in entries[2:]) + "\n"
        assert read_dump(io.StringIO(text), ENCODE) == entries

    def test_an_empty_dump_is_no_entries(self) -> None:
        assert read_dump(io.StringIO(""), ENCODE) == []
        assert read_dump(io.StringIO("\n\n"), ENCODE) == []

    def test_the_last_line_may_lack_its_newline(self) -> None:
        assert read_dump(io.StringIO('{"key": "a", "value": 1}'), ENCODE) == [(b"a", 1)]

    @pytest.mark.parametrize(
        ("bad", "message"),
        [
            ("{not json", "not valid JSON"),
            ("[1, 2]", "expected a JSON object, got list"),
            ('"text"', "expected a JSON object, got str"),
            ('{"key": "k"}', 'expected exactly one of "value", "value_b64" and "value_msgpack_b64"'),
            ('{"value": 1}', 'expected exactly one of "key" and "key_b64"'),
            ('{"key": "k", "key_b64": "aw==", "value": 1}', 'expected exactly one of "key" and "key_b64"'),
            ('{"key": "k", "value": 1, "value_b64": "AA=="}', 'expected exactly one of "value"'),
            ('{"key": "k", "value": 1, "colour": "red"}', "unknown field 'colour'"),
            ('{"key": 7, "value": 1}', '"key" must be a string'),
            ('{"key": "", "value": 1}', "bad key: keys must not be empty"),
            ('{"key": "' + "k" * (MAX_KEY_SIZE + 1) + '", "value": 1}', "bad key: key is 512 bytes long"),
            ('{"key_b64": "***", "value": 1}', "not valid base64"),
            ('{"key": "k", "value_b64": "***"}', "not valid base64"),
            ('{"key": "k", "value_b64": 7}', '"value_b64" must be a base64 string'),
            ('{"key": "k", "value_msgpack_b64": "wQ=="}', '"value_msgpack_b64" is not valid msgpack'),
            (  # {1: "a"}: the format reads str and bytes map keys only, whatever the codec
                '{"key": "k", "value_msgpack_b64": "gQGhYQ=="}',
                '"value_msgpack_b64" is not valid msgpack: int is not allowed for map key',
            ),
            ('{"key": "k", "value": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
        ],
        ids=[
            "not-json",
            "list",
            "string",
            "no-value",
            "no-key",
            "two-keys",
            "two-values",
            "unknown-field",
            "key-not-a-string",
            "empty-key",
            "long-key",
            "key-not-base64",
            "value-not-base64",
            "value-b64-not-a-string",
            "not-msgpack",
            "int-map-key",
            "deep-json",
        ],
    )
    def test_a_bad_line_is_reported_by_its_number(self, bad: str, message: str) -> None:
        good = [json.dumps({"key": f"k{i}", "value": i}) for i in range(2)]
        stream = io.StringIO("\n".join([*good, "", bad, *good]) + "\n")
        with pytest.raises(DumpLineError) as caught:
            read_dump(stream, ENCODE)
        assert caught.value.line_number == 4, "blank lines count"
        assert str(caught.value) == f"line 4: {caught.value.reason}"
        assert message in caught.value.reason, caught.value.reason
        assert isinstance(caught.value, ValueError)

    def test_the_first_bad_line_is_reported(self) -> None:
        stream = io.StringIO('{"key": "a", "value": 1}\n{bad\n{"key": ""}\n')
        with pytest.raises(DumpLineError, match=r"^line 2: not valid JSON"):
            read_dump(stream, ENCODE)

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            (b'{"key": "k", "value": "\xff"}', "bad value"),
            (b'{"key": "\xfe\xff", "value": 1}', "bad key"),
            (b"\xff\xfe not even JSON", "not valid JSON"),
        ],
        ids=["value", "key", "garbage"],
    )
    def test_bytes_that_are_not_utf8_are_a_bad_line_not_a_decoding_error(
        self, line: bytes, message: str
    ) -> None:
        data = b'{"key": "a", "value": 1}\n' + line + b"\n"
        stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
        with pytest.raises(DumpLineError) as caught:
            read_dump(stream, ENCODE)
        assert caught.value.line_number == 2 and message in caught.value.reason, caught.value


# -- the codec's check ------------------------------------------------------------------------


class TestCodecCheck:
    def test_a_value_the_codec_refuses_is_a_bad_line(self) -> None:
        json_encode = get_codec("json").encode
        nan = dump_line(b"k", math.nan)
        with pytest.raises(ValueError, match=r"^bad value: .*json codec"):
            parse_dump_line(nan, json_encode)
        with pytest.raises(ValueError, match=r"^bad value: "):
            parse_dump_line('{"key": "k", "value": {"not": "bytes"}}', get_codec("bytes").encode)

    def test_the_codec_only_checks_and_does_not_change_the_value(self) -> None:
        assert parse_dump_line('{"key": "k", "value": [1, "a"]}', get_codec("json").encode) == (
            b"k",
            [1, "a"],
        )
        assert parse_dump_line('{"key": "k", "value_b64": "AAE="}', get_codec("bytes").encode) == (
            b"k",
            b"\x00\x01",
        )
