"""Values to bytes and back, and the rules for keys.

A :class:`Codec` turns a value into the bytes stored in the log (and, as they
are, in the cache) and back. Replay never decodes: it copies bytes, so the
codec runs only on write (``encode``) and on read (``decode``).

Built-in codecs, chosen by name:

``"msgpack"`` (default)
    Anything msgpack packs: ``None``, bool, int (64-bit), float, str, bytes,
    lists, tuples (read back as lists) and dicts of those.
``"json"``
    Anything :func:`json.dumps` accepts, stored as UTF-8 JSON (readable by any
    consumer in any language).
``"str"``
    ``str`` values stored as UTF-8.
``"bytes"``
    ``bytes`` values stored as they are.

A user codec is two functions: ``Codec("name", encode, decode)``. Its name is
part of the cache's identity, so a cache built with one codec is rebuilt, not
misread, when opened with another.

Keys are ``str`` (stored as UTF-8) or ``bytes``, non-empty and at most
:data:`MAX_KEY_SIZE` bytes long (LMDB's limit).
"""

from __future__ import annotations

import json
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
    kvlog raises that before anything is written.
    """

    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]

    def __repr__(self) -> str:
        return f"Codec({self.name!r})"


def _msgpack_encode(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"value cannot be stored with the msgpack codec: {exc}") from exc


def _msgpack_decode(data: bytes) -> Any:
    try:
        # strict_map_key=False: dicts with int keys round-trip, as they pack.
        # No ext_hook: an ext type from a foreign producer stays an ExtType,
        # it never reaches pickle or any other object constructor.
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CodecError(f"stored value is not valid msgpack: {exc}") from exc


def _json_encode(value: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"value cannot be stored with the json codec: {exc}") from exc


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


_BUILTIN = {
    "msgpack": Codec("msgpack", _msgpack_encode, _msgpack_decode),
    "json": Codec("json", _json_encode, _json_decode),
    "str": Codec("str", _str_encode, _str_decode),
    "bytes": Codec("bytes", _bytes_encode, _bytes_decode),
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
