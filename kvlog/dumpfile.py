"""The dump format: kvlog entries as JSON lines, written by ``kvlog dump`` and ``kvlog scan``, read by ``kvlog load``.

A dump is text (UTF-8), one JSON object per line, one line per entry; blank
lines are skipped. Each object has exactly two fields, one naming the key and
one holding the value, and no others:

``"key"``
    a key whose bytes are valid UTF-8, as a string. A ``str`` key and the
    ``bytes`` key of the same UTF-8 bytes are one key in the log, so both
    are written this way.
``"key_b64"``
    any other key: its bytes, base64-encoded.
``"value"``
    a value JSON represents exactly: ``None``, ``bool``, ``int``, ``str``, a
    finite ``float``, and lists (or tuples) and dicts with ``str`` keys of
    those.
``"value_b64"``
    a ``bytes`` value, base64-encoded.
``"value_msgpack_b64"``
    anything else JSON cannot hold (bytes inside a container, a dict with
    bytes or int keys, msgpack extension types, NaN or infinity, a value
    nested a few hundred levels deep, past what Python's recursion handles
    safely): the value packed with msgpack, base64-encoded.

For example::

    {"key": "order:42", "value": {"status": "paid", "total": 12.5}}
    {"key": "photo:1", "value_b64": "/9j/4AAQSkZJRg=="}
    {"key_b64": "/wBrZXk=", "value_msgpack_b64": "gQGjb25l"}

Reading decodes all three value fields, so writing a store's entries and
reading them back reproduces every key and value (tuples come back as
lists, as they do from msgpack). :func:`read_dump` checks every line before
it returns any, so a loader can refuse a bad file before writing anything.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import IO, Any

import msgpack

from .codec import encode_key

__all__ = [
    "KEY_FIELDS",
    "VALUE_FIELDS",
    "DumpLineError",
    "dump_line",
    "dump_record",
    "jsonable",
    "parse_dump_line",
    "read_dump",
]

#: The fields that name a line's key; a line has exactly one of them.
KEY_FIELDS = ("key", "key_b64")
#: The fields that hold a line's value; a line has exactly one of them.
VALUE_FIELDS = ("value", "value_b64", "value_msgpack_b64")


class DumpLineError(ValueError):
    """A line of a dump that cannot be read: ``str(error)`` is ``"line N: what is wrong"``."""

    def __init__(self, line_number: int, reason: str) -> None:
        super().__init__(f"line {line_number}: {reason}")
        #: The 1-based number of the bad line in the input (blank lines count).
        self.line_number = line_number
        #: What is wrong with it, without the line number.
        self.reason = reason


def dump_record(key: bytes, value: Any) -> dict[str, Any]:
    """The JSON object of one entry: its key and value fields, chosen as the module docstring says."""
    record: dict[str, Any] = {}
    try:
        record["key"] = key.decode("utf-8")
    except UnicodeDecodeError:
        record["key_b64"] = _b64(key)
    if isinstance(value, bytes):
        record["value_b64"] = _b64(value)
    elif _json_exact_within_recursion_limit(value):
        record["value"] = value
    else:
        record["value_msgpack_b64"] = _msgpack_b64(value)
    return record


def jsonable(value: Any) -> Any:
    """A value made printable as JSON, as ``kvlog get`` and ``kvlog serve`` show it (lossy, unlike a dump line).

    Bytes become text where they decode as UTF-8, else hex; a float that is
    not finite becomes its string; anything else JSON cannot hold, its repr.
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    if isinstance(value, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)  # a msgpack ExtType or Timestamp


def dump_line(key: bytes, value: Any) -> str:
    """One line of a dump, without its newline: :func:`dump_record` as compact JSON, non-ASCII text kept as is."""
    record = dump_record(key, value)
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except RecursionError:  # _json_exact passed, json.dumps (on a deeper stack) did not
        del record["value"]
        record["value_msgpack_b64"] = _msgpack_b64(value)
        return json.dumps(record, ensure_ascii=False, allow_nan=False)


def parse_dump_line(line: str, encode: Callable[[Any], bytes]) -> tuple[bytes, Any]:
    """Parse and check one line of a dump; return ``(key bytes, value)``.

    The key must be one the cache can hold (see :func:`kvlog.codec.encode_key`)
    and the value one ``encode`` (a codec's ``encode``) accepts.

    Raises:
        ValueError: the line is not valid, or its key or value cannot be stored.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(
            "nests too deeply for Python's JSON parser (value_msgpack_b64 holds deep values)"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(KEY_FIELDS) - set(VALUE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    keys = [f for f in KEY_FIELDS if f in record]
    values = [f for f in VALUE_FIELDS if f in record]
    if len(keys) != 1:
        raise ValueError('expected exactly one of "key" and "key_b64"')
    if len(values) != 1:
        raise ValueError('expected exactly one of "value", "value_b64" and "value_msgpack_b64"')
    raw_key = record[keys[0]]
    if not isinstance(raw_key, str):
        raise ValueError(f'"{keys[0]}" must be a string')
    try:
        key = encode_key(_unb64(raw_key) if keys[0] == "key_b64" else raw_key)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad key: {exc}") from None
    field, value = values[0], record[values[0]]
    if field != "value":
        if not isinstance(value, str):
            raise ValueError(f'"{field}" must be a base64 string')
        value = _unb64(value)
        if field == "value_msgpack_b64":
            try:
                # The codec's limits: str/bytes map keys only, lengths within the data.
                value = msgpack.unpackb(value, raw=False, strict_map_key=True)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise ValueError(
                    f'"value_msgpack_b64" is not valid msgpack: {exc or type(exc).__name__}'
                ) from None
    try:
        encode(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad value: {exc}") from None
    return key, value


def read_dump(stream: IO[str], encode: Callable[[Any], bytes]) -> list[tuple[bytes, Any]]:
    """Parse and check a whole dump; return its ``(key bytes, value)`` pairs in order.

    Every line is checked (as :func:`parse_dump_line` does) before this
    returns, so nothing need be written until the whole input is known good.
    Open ``stream`` with ``errors="surrogateescape"``: bytes that are not
    UTF-8 then reach the line's checks (as a bad key, value or JSON) and are
    reported with the line's number, instead of as a decoding error.

    Raises:
        DumpLineError: the first bad line, by number.
    """
    items: list[tuple[bytes, Any]] = []
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            items.append(parse_dump_line(line, encode))
        except ValueError as exc:
            raise DumpLineError(number, str(exc)) from None
    return items


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError(f"not valid base64: {exc}") from None


def _msgpack_b64(value: Any) -> str:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return _b64(packed)


def _json_exact(value: Any) -> bool:
    """Whether JSON holds ``value`` exactly (tuples become lists, as they do in msgpack)."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_exact(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_exact(v) for k, v in value.items())
    return False


def _json_exact_within_recursion_limit(value: Any) -> bool:
    # A value nested about a thousand levels deep (msgpack holds 1024) is past
    # what Python's recursion, and so its json module, reaches: it goes to
    # value_msgpack_b64 like anything else JSON cannot hold.
    try:
        return _json_exact(value)
    except RecursionError:
        return False
