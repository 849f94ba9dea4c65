"""Hypothesis strategies shared by the kvlog tests.

Keys are drawn mostly from a tiny alphabet so that a run of operations keeps
hitting the same few keys (overwrites, deletes of present keys, re-puts after
a delete), with some arbitrary unicode mixed in so that multi-byte UTF-8 and
byte-order iteration are exercised too. Values are what the msgpack codec
round-trips exactly, so a test can compare what it reads with what it wrote
using ``==``.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
from typing import Any

from hypothesis import strategies as st

from kvlog.codec import MAX_KEY_SIZE

__all__ = [
    "LOG_KEYS",
    "MAX_NESTING",
    "any_keys",
    "any_values",
    "bad_keys",
    "keys",
    "limit_keys",
    "log_operations",
    "log_records",
    "log_values",
    "nested",
    "sized_values",
    "unencodable_values",
    "values",
]

#: Characters most keys are made of: few enough that keys collide often.
_COMMON_ALPHABET = "ab:1"

#: Unicode text that UTF-8 can encode (no lone surrogates), incl. NUL and
#: characters of 2, 3 and 4 UTF-8 bytes.
_UNICODE = st.characters(codec="utf-8")

#: The longest key (in characters) the strategies produce; even at 4 UTF-8
#: bytes per character it is far below MAX_KEY_SIZE.
MAX_KEY_CHARS = 40


def keys() -> st.SearchStrategy[str]:
    """Valid ``str`` keys: non-empty, at most 40 characters, UTF-8 encodable.

    About four in five are one to three characters from ``"ab:1"`` (so
    operations collide on the same keys); the rest are arbitrary unicode,
    including NUL and characters of two to four UTF-8 bytes.
    """
    common = st.text(alphabet=_COMMON_ALPHABET, min_size=1, max_size=3)
    unusual = st.text(alphabet=_UNICODE, min_size=1, max_size=MAX_KEY_CHARS)
    return st.one_of(common, common, common, common, unusual)


def _scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        # msgpack packs the union of int64 and uint64.
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(alphabet=_UNICODE, max_size=20),
        st.binary(max_size=20),
    )


def values() -> st.SearchStrategy[Any]:
    """JSON-like values that the msgpack codec gives back equal to what was stored.

    ``None``, bools, 64-bit ints, finite floats, short text and bytes, and
    lists and ``str``-keyed dicts of those, nested at most three levels deep.
    No tuples: msgpack gives them back as lists.
    """
    return st.recursive(
        _scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(alphabet=_UNICODE, max_size=8), children, max_size=4),
        ),
        max_leaves=8,
    )


def bad_keys() -> st.SearchStrategy[Any]:
    """Keys every store must refuse before any I/O.

    Wrong types (int, ``None``, tuple, float, bytearray) raise ``TypeError``;
    an empty ``str``/``bytes``, a key longer than 511 UTF-8 bytes (even if it
    is fewer than 511 characters) and a ``str`` holding a lone surrogate raise
    ``ValueError``.
    """
    wrong_type = st.one_of(
        st.integers(),
        st.none(),
        st.tuples(st.text(max_size=3)),
        st.floats(),
        st.binary(min_size=1, max_size=8).map(bytearray),
    )
    too_long = st.one_of(
        st.integers(MAX_KEY_SIZE + 1, MAX_KEY_SIZE + 64).map(lambda n: "k" * n),
        # 256 two-byte characters: 256 characters, 512 bytes.
        st.integers(MAX_KEY_SIZE // 2 + 1, MAX_KEY_SIZE).map(lambda n: "é" * n),
        st.integers(MAX_KEY_SIZE + 1, MAX_KEY_SIZE + 64).map(lambda n: b"k" * n),
    )
    lone_surrogate = st.builds(
        lambda before, surrogate, after: before + surrogate + after,
        st.text(alphabet=_COMMON_ALPHABET, max_size=3),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
        st.text(alphabet=_COMMON_ALPHABET, max_size=3),
    )
    return st.one_of(wrong_type, st.sampled_from(["", b""]), too_long, lone_surrogate)


class _Opaque:
    """An object msgpack knows nothing about."""

    def __repr__(self) -> str:
        return "_Opaque()"


def unencodable_values() -> st.SearchStrategy[Any]:
    """Values the msgpack codec must refuse with ``TypeError`` (nothing written).

    Arbitrary objects, sets, complex numbers, ints outside 64 bits, decimals,
    fractions, datetimes, and lists or dicts that hide one of those inside.
    """
    bad = st.one_of(
        st.builds(_Opaque),
        st.builds(object),
        st.sets(st.integers(), max_size=3),
        st.frozensets(st.integers(), max_size=3),
        st.complex_numbers(allow_nan=False),
        st.integers(min_value=2**64),
        st.integers(max_value=-(2**63) - 1),
        st.decimals(allow_nan=False),
        st.fractions(),
        st.datetimes(),
        st.just(datetime.date(2024, 1, 1)),
        st.just(decimal.Decimal("1.5")),
        st.just(fractions.Fraction(1, 3)),
    )
    return st.one_of(
        bad,
        st.lists(bad, min_size=1, max_size=2),
        st.dictionaries(st.text(max_size=3), bad, min_size=1, max_size=2),
    )


# -- anything at all, for the bad-input fuzz (test_fuzz_input.py) ---------------

#: How deep msgpack nests containers, packing and unpacking alike (a list
#: holding a list ... 1024 levels down packs; 1025 does not).
MAX_NESTING = 1024

#: Every code point, lone surrogates (which UTF-8 cannot encode) included.
_ANY_CHAR = st.one_of(
    st.characters(categories=["L", "M", "N", "P", "S", "Z", "C"]),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
)


def _any_text(max_size: int) -> st.SearchStrategy[str]:
    # Not st.text(alphabet=_ANY_CHAR): text() silently drops the surrogates.
    return st.lists(_ANY_CHAR, max_size=max_size).map("".join)


def limit_keys() -> st.SearchStrategy[Any]:
    """``str`` and ``bytes`` keys of 505 to 515 bytes: both sides of the 511-byte limit.

    A ``str`` key is ASCII followed by one character of one to four UTF-8
    bytes, so a multi-byte character straddles the limit: 510 ASCII bytes and
    ``"é"`` make 511 characters but 512 bytes.
    """
    wide = st.sampled_from(["a", "é", "☃", "\U0001f600"])
    text = st.builds(lambda n, c: "k" * n + c, st.integers(MAX_KEY_SIZE - 6, MAX_KEY_SIZE), wide)
    raw = st.integers(MAX_KEY_SIZE - 2, MAX_KEY_SIZE + 2).map(lambda n: b"\xff" * n)
    return st.one_of(text, raw)


def any_keys() -> st.SearchStrategy[Any]:
    """Anything a caller may pass as a key.

    Good keys (:func:`keys`, raw bytes), every ``str`` (empty, lone
    surrogates, any code point), keys at the 511-byte limit
    (:func:`limit_keys`), and wrong types: int, float, ``None``, tuple, list,
    ``bytearray``, ``memoryview``.
    """
    wrong_type = st.one_of(
        st.integers(),
        st.floats(),
        st.none(),
        st.tuples(st.text(max_size=2)),
        st.lists(st.text(max_size=2), max_size=2),
        st.binary(max_size=4).map(bytearray),
        st.binary(max_size=4).map(memoryview),
    )
    return st.one_of(
        keys(),
        keys(),
        st.binary(max_size=6),
        _any_text(6),
        limit_keys(),
        st.sampled_from(["", b"", None]),
        wrong_type,
    )


def nested(min_depth: int = 1, max_depth: int = 100_000) -> st.SearchStrategy[Any]:
    """A value nested ``min_depth`` to ``max_depth`` containers deep, mostly near msgpack's limit.

    The containers are lists, tuples, ``str``-keyed dicts or a mix; the depth
    is one of 1000, 1023, 1024, 1025, 1100 or 100 000 (within the bounds),
    or any other in them.
    """
    near = [
        d
        for d in (1000, MAX_NESTING - 1, MAX_NESTING, MAX_NESTING + 1, 1100, 100_000)
        if min_depth <= d <= max_depth
    ]
    depth = (
        st.one_of(st.sampled_from(near), st.integers(min_depth, max_depth))
        if near
        else st.integers(min_depth, max_depth)
    )
    shape = st.sampled_from(["list", "tuple", "dict", "mixed"])
    return st.builds(_nest, depth, shape)


def _nest(depth: int, shape: str) -> Any:
    value: Any = 0
    for level in range(depth):
        kind = shape if shape != "mixed" else ("list", "dict", "tuple")[level % 3]
        value = [value] if kind == "list" else (value,) if kind == "tuple" else {"k": value}
    return value


def sized_values(limit: int) -> st.SearchStrategy[Any]:
    """``str``, ``bytes`` and list values whose encoding is within 64 bytes of ``limit``, either side."""
    size = st.integers(max(0, limit - 64), limit + 64)
    return st.one_of(
        size.map(lambda n: "v" * n),
        size.map(lambda n: b"\x00" * n),
        size.map(lambda n: ["w" * 100] * (n // 102)),
    )


class _SelfHolding(list):  # type: ignore[type-arg]
    """A list that holds itself: no encoder may loop forever on it."""

    def __repr__(self) -> str:
        return "_SelfHolding([...])"


def _self_holding(as_dict: bool) -> Any:
    inner = _SelfHolding()
    inner.append(inner)
    return {"self": inner} if as_dict else inner


def any_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Anything a caller may pass as a value.

    Good values (:func:`values`), values nobody can encode
    (:func:`unencodable_values`), floats with NaN and infinities, ints on
    both sides of the 64-bit range, ``str`` with lone surrogates, tuples,
    ``bytearray``, dicts keyed by int, float, bool, ``None``, tuples or bytes,
    deep nesting (:func:`nested`) and values that hold themselves.
    """
    scalars = st.one_of(
        st.floats(),
        st.integers(),
        st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
        _any_text(6),
        st.binary(max_size=6).map(bytearray),
        _scalars(),
    )
    odd_keys = st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        st.booleans(),
        st.none(),
        st.tuples(st.integers()),
        st.binary(max_size=3),
        _any_text(3),
    )
    mixed = st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(odd_keys, children, max_size=3),
            st.dictionaries(st.text(max_size=3), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )
    return st.one_of(
        values(),
        values(),
        unencodable_values(),
        mixed,
        mixed,
        nested(),
        st.booleans().map(_self_holding),
    )


# -- raw log records, for the embedded log's compaction tests -----------------

#: The key space of raw log records: small, so that every key is overwritten,
#: deleted and written again many times in one example.
LOG_KEYS = tuple(f"k{i}".encode() for i in range(6))


def log_values() -> st.SearchStrategy[bytes]:
    """Raw record values: mostly a few bytes, sometimes a few hundred.

    The large ones fill a 1 KiB segment in a handful of records, so that an
    example of a few dozen operations rolls segments and gives compaction
    closed segments to rewrite and merge.
    """
    return st.one_of(st.binary(max_size=8), st.binary(max_size=8), st.binary(min_size=200, max_size=400))


def log_records() -> st.SearchStrategy[tuple[bytes, bytes | None]]:
    """One ``(key, value)`` record for ``Log.append``; about one in four is a tombstone (``None``)."""
    return st.tuples(
        st.sampled_from(LOG_KEYS),
        st.one_of(log_values(), log_values(), log_values(), st.none()),
    )


def log_operations(min_size: int = 10, max_size: int = 80) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Operation sequences on an embedded log, as tuples a test interprets.

    * ``("put", key, value)`` and ``("delete", key)``: append one record (a
      delete appends a tombstone whether or not the key holds a value);
    * ``("batch", [(key, value or None), ...])``: one ``append`` call;
    * ``("compact",)``: compact the log now;
    * ``("reopen",)``: close the log and open its directory again;
    * ``("read", n)``: a reader that stays open across everything else reads
      up to ``n`` more records.
    """
    put = st.tuples(st.just("put"), st.sampled_from(LOG_KEYS), log_values())
    delete = st.tuples(st.just("delete"), st.sampled_from(LOG_KEYS))
    batch = st.tuples(st.just("batch"), st.lists(log_records(), min_size=1, max_size=16))
    compact = st.just(("compact",))
    reopen = st.just(("reopen",))
    read = st.tuples(st.just("read"), st.integers(1, 10))
    return st.lists(
        st.one_of(put, put, delete, batch, batch, compact, compact, reopen, read),
        min_size=min_size,
        max_size=max_size,
    )
