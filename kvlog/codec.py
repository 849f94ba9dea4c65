"""Values to bytes and back, and the rules for keys.

A :class:`Codec` turns a value into the bytes stored in the log (and, as they
are, in the cache) and back. Replay copies bytes: it runs only the codec's
cheap ``validate`` on them (see below); ``encode`` runs on write and
``decode`` on read.

Built-in codecs, chosen by name:

``"msgpack"`` (default)
    Anything msgpack packs: ``None``, bool, int (64-bit), float, str, bytes,
    lists, tuples (read back as lists) and dicts of those whose keys are
    ``str`` or ``bytes``, nested at most 1024 containers deep.
``"json"``
    Anything :func:`json.dumps` accepts whose dict keys are ``str``, stored as
    UTF-8 JSON (readable by any consumer in any language). Tuples read back as
    lists; NaN and infinities are refused (JSON has no such numbers).
``"str"``
    ``str`` values stored as UTF-8.
``"bytes"``
    ``bytes`` values stored as they are.

A user codec is two functions: ``Codec("name", encode, decode)``. Its name is
part of the cache's identity, so a cache built with one codec is rebuilt, not
misread, when opened with another. Keys are ``str`` (stored as UTF-8) or
``bytes``, non-empty and at most :data:`MAX_KEY_SIZE` bytes (LMDB's limit).

What replay checks per value, what encoding refuses before any I/O, and the
limits decoding keeps for bytes from any producer: docs/design.md, "The codec".
"""

from __future__ import annotations

import json
import reprlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import CodecError

__all__ = ["MAX_KEY_SIZE", "Codec", "decode_key", "encode_key", "get_codec"]

#: LMDB's compiled-in maximum key size (``Environment.max_key_size()``).
MAX_KEY_SIZE = 511


@dataclass(frozen=True)
class Codec:
    """A named pair of functions: ``encode(value) -> bytes`` and ``decode(bytes) -> value``.

    ``encode`` should raise ``TypeError`` for a value it cannot represent;
    kvlog raises that before anything is written. ``decode`` should raise
    ``CodecError`` (or ``ValueError``) for bytes that are not a value.

    ``validate(bytes)``, optional, raises like ``decode`` but need not build
    the value: replay runs it on every record it applies (records written by
    foreign producers may hold anything) and quarantines what fails. Without
    it, replay runs ``decode``.
    """

    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    validate: Callable[[bytes], object] | None = None

    def value_check(self) -> Callable[[bytes], object] | None:
        """The function replay runs on each value, or ``None`` when every byte string is a value.

        Each call returns a check for one thread (the replayer asks once and
        calls it under its lock): msgpack's keeps an unpacker of its own.
        """
        if self.validate is _accept_any:
            return None
        if self.validate is _msgpack_validate:
            return _new_msgpack_check()  # the same check, without a thread-local lookup per value
        return self.validate if self.validate is not None else self.decode

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


#: Types that hold no other value: the key check below never looks inside them.
_LEAVES = frozenset((str, bytes, int, float, bool, type(None)))
_CONTAINERS = (dict, list, tuple)
#: The map keys msgpack reads back (strict_map_key).
_MAP_KEYS = frozenset((str, bytes))


def _check_dict_keys(value: Any, key_types: tuple[type, ...], codec: str) -> None:
    """Raise ``TypeError`` if a dict anywhere in ``value`` has a key that is not one of ``key_types``.

    Called after the codec's own encoder accepted ``value``, so ``value`` holds
    no cycle and is bounded in depth; the walk keeps its own stack all the same
    (a Python recursion stops at about 1000 levels).
    """
    if type(value) in _LEAVES:
        return
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        if isinstance(item, dict):
            for key in item:
                if type(key) is not str and not isinstance(key, key_types):
                    names = " or ".join(t.__name__ for t in key_types)
                    raise TypeError(
                        f"value cannot be stored with the {codec} codec: dict keys must be {names}, "
                        f"not {type(key).__name__} ({reprlib.repr(key)})"
                    )
            item = item.values()
        for child in item:
            if type(child) not in _LEAVES and isinstance(child, _CONTAINERS):
                push(child)


#: A packer per thread: msgpack.packb builds a new one (and its buffer) per call,
#: about half the cost of packing a small value.
_packers = threading.local()


def _msgpack_encode(value: Any) -> bytes:
    try:
        # Taken while it packs: packing a dict or list subclass runs its
        # Python methods, which could encode another value on this thread.
        packer = _packers.__dict__.pop("packer", None) or msgpack.Packer(use_bin_type=True)
        data: bytes = packer.pack(value)
        _packers.packer = packer
    except (TypeError, ValueError, OverflowError) as exc:
        # ValueError: a str with a lone surrogate, or more than 1024 nested
        # containers (a value that holds itself ends there too).
        raise TypeError(f"value cannot be stored with the msgpack codec: {exc}") from exc
    if type(value) in _LEAVES:
        return data
    if (
        type(value) is dict
        and _MAP_KEYS.issuperset(map(type, value))
        and _LEAVES.issuperset(map(type, value.values()))
    ):
        return data  # a flat map of leaves with str or bytes keys: what most values are
    # msgpack packs any dict key but reads back only str and bytes keys
    # (strict_map_key): refuse the others now, or the write would succeed and
    # every read of it fail. Reading the bytes back is the exact test, and in
    # C it costs less than walking the value in Python (about 0.5 us for a
    # 70-byte dict, 13 us for a list of 100 small dicts).
    try:
        msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise TypeError(
            f"value cannot be stored with the msgpack codec: dict keys must be str or bytes ({exc})"
        ) from None
    return data


def _msgpack_decode(data: bytes) -> Any:
    try:
        # strict_map_key: map keys are str or bytes, whose hashes an attacker
        # cannot choose (ints hash to themselves). No ext_hook: an ext type
        # from a foreign producer stays an ExtType, it never reaches pickle or
        # any other object constructor. The max_*_len limits are msgpack's
        # defaults, derived from len(data): passing them costs every read.
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.StackError as exc:
        raise CodecError("stored value nests containers deeper than msgpack reads (1024 levels)") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CodecError(f"stored value is not valid msgpack: {exc}") from exc


#: Large enough for any record a log accepts (Kafka's max.message.bytes is an int32).
_MAX_VALUE_BYTES = 2**31 - 1


def _new_msgpack_check() -> Callable[[bytes], None]:
    """A msgpack structure check for one thread: it reuses one ``Unpacker`` (which keeps state).

    Skipping an object with a reused unpacker costs a fraction of decoding it
    (replay runs this on every record); strings are not decoded, so their
    UTF-8 (and the type of map keys) is checked when the value is read.
    """
    feed: Callable[[bytes], None]
    skip: Callable[[], None]
    tell: Callable[[], int]
    fed = 0  # bytes fed to the current unpacker: where one whole object per value leaves it

    def renew() -> None:
        # After an error the unpacker holds the rest of the bad value.
        nonlocal feed, skip, tell, fed
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=_MAX_VALUE_BYTES)
        feed, skip, tell, fed = unpacker.feed, unpacker.skip, unpacker.tell, 0

    renew()

    def check(data: bytes) -> None:
        nonlocal fed
        try:
            feed(data)
            skip()
        except (ValueError, msgpack.UnpackException) as exc:
            renew()
            if not data:
                raise CodecError("stored value is empty, not a msgpack object") from None
            if isinstance(exc, msgpack.OutOfData):
                raise CodecError("stored value is not valid msgpack: it ends inside an object") from None
            if isinstance(exc, msgpack.StackError):
                raise CodecError(
                    "stored value nests containers deeper than msgpack reads (1024 levels)"
                ) from None
            detail = f": {exc}" if str(exc) else ""
            raise CodecError(f"stored value is not valid msgpack ({type(exc).__name__}{detail})") from None
        fed += len(data)
        if tell() != fed:
            after = fed - tell()
            renew()
            raise CodecError(f"stored value is not valid msgpack: {after} byte(s) after the object")

    return check


_msgpack_checks = threading.local()


def _msgpack_validate(data: bytes) -> None:
    """Raise CodecError unless ``data`` is exactly one msgpack object (its structure; nothing is built)."""
    try:
        check = _msgpack_checks.check
    except AttributeError:
        check = _msgpack_checks.check = _new_msgpack_check()
    check(data)


def _json_encode(value: Any) -> bytes:
    try:
        data = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"value cannot be stored with the json codec: {exc}") from exc
    # json.dumps turns int, float, bool and None keys into strings: the value
    # would come back different from what was stored.
    _check_dict_keys(value, (str,), "json")
    return data


def _json_decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"stored value is not valid JSON: {exc}") from exc


def _str_encode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"the str codec stores str values, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TypeError(f"value cannot be stored with the str codec: {exc}") from exc


def _str_decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(f"stored value is not valid UTF-8: {exc}") from exc


def _bytes_encode(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"the bytes codec stores bytes values, not {type(value).__name__}")
    return value


def _bytes_decode(data: bytes) -> bytes:
    return bytes(data)


def _accept_any(data: bytes) -> None:
    """Every byte string is a value (the bytes codec): replay skips the check."""


_BUILTIN = {
    "msgpack": Codec("msgpack", _msgpack_encode, _msgpack_decode, _msgpack_validate),
    "json": Codec("json", _json_encode, _json_decode),
    "str": Codec("str", _str_encode, _str_decode),
    "bytes": Codec("bytes", _bytes_encode, _bytes_decode, _accept_any),
}


def get_codec(codec: str | Codec) -> Codec:
    """Return the codec named ``codec`` (``"msgpack"``, ``"json"``, ``"str"``, ``"bytes"``).

    A :class:`Codec` instance is returned as it is.

    Raises:
        ValueError: no built-in codec has that name.
        TypeError: ``codec`` is neither a name nor a Codec.
    """
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        try:
            return _BUILTIN[codec]
        except KeyError:
            names = ", ".join(sorted(_BUILTIN))
            raise ValueError(f"unknown codec {codec!r}; choose one of {names} or pass a Codec") from None
    raise TypeError(f"codec must be a name or a Codec, not {type(codec).__name__}")


def encode_key(key: str | bytes) -> bytes:
    """Return the bytes that stand for ``key`` in the log and the cache.

    Raises:
        TypeError: ``key`` is neither ``str`` nor ``bytes``.
        ValueError: ``key`` is empty, longer than MAX_KEY_SIZE bytes, or a str
            that cannot be encoded as UTF-8 (a lone surrogate).
    """
    if isinstance(key, str):
        try:
            data = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}") from None
    elif isinstance(key, bytes):
        data = bytes(key)
    else:
        raise TypeError(f"keys must be str or bytes, not {type(key).__name__}")
    if not data:
        raise ValueError("keys must not be empty")
    if len(data) > MAX_KEY_SIZE:
        raise ValueError(
            f"key is {len(data)} bytes long; the cache holds keys of at most {MAX_KEY_SIZE} bytes"
        )
    return data


def decode_key(data: bytes, key_type: type) -> str | bytes:
    """Return a stored key as ``key_type`` (``str`` or ``bytes``).

    With ``str``, a key that is not valid UTF-8 (written by a foreign producer)
    comes back as ``bytes`` rather than failing the whole iteration.
    """
    if key_type is bytes:
        return bytes(data)
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(data)
