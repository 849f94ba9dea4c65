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
    "bad_keys",
    "keys",
    "log_operations",
    "log_records",
    "log_values",
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
