"""A fast decoder of Kafka record batches (magic v2) for replay.

A fetch response carries, per partition, a *record set*: record batches one
after the other, the last of which may be cut short by the fetch size. Replay
needs of it only each data record's offset, key and value, in order, and
where the next fetch starts. kafka-python's decoder builds several Python
objects per record (a record, a ``ConsumerRecord``, a header list) and calls a
function per varint, which made it most of a cold replay. This one returns a
record set as three parallel tuples (offsets, keys, values: no object per
record beyond the key and value bytes themselves), decodes the common one-
and two-byte varints inline, steps over timestamps without decoding them and
over headers without building them.

Batch by batch it follows the Java consumer (``CompletedFetch``):

* a control batch (a transaction marker) yields nothing, but its offsets are
  passed over like any other;
* under ``read_committed`` the aborted transactions of the fetch response
  decide which transactional batches to drop: a producer id becomes aborted
  once a batch at or past its transaction's first offset is reached, and stays
  so until that producer's ABORT marker;
* records below the fetch offset (a fetch that starts inside a batch) are
  dropped;
* a batch that the record set holds only part of ends the decoding; the
  result says where it starts (:attr:`DecodedRecords.size`) and at which
  offset the next fetch resumes (:attr:`DecodedRecords.next_offset`).

Batches of the old message formats (magic 0 and 1) are not decoded here:
:func:`decode` raises :class:`LegacyRecordFormat` and the caller hands the
record set to kafka-python's own decoder (a broker of Kafka 4 writes no such
batch; only a log carried over from an old cluster can hold them).
"""

from __future__ import annotations

import collections
import functools
import gzip
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

import kafka.codec as kafka_codec
import kafka.errors as kerr

_crc32c: Callable[[Any], int] | None
try:
    from crc32c import crc32c as _crc32c_any
except ImportError:  # pragma: no cover - kvlog depends on kafka-python[crc32c]
    _crc32c = None
else:
    try:
        _crc32c_any(b"", gil_release_mode=0)
    except TypeError:  # pragma: no cover - crc32c before 2.3
        _crc32c = _crc32c_any
    else:
        # Without the GIL released: a batch takes microseconds to check, and
        # a thread that lets the GIL go (this package does for 32 KiB and
        # more) waits for the interpreter's switch interval, 5 ms, to get it
        # back from kafka-python's network thread.
        _crc32c = functools.partial(_crc32c_any, gil_release_mode=0)

__all__ = ["CRC_CHECK_AVAILABLE", "DecodedRecords", "LegacyRecordFormat", "decode"]

#: Whether :func:`decode` can check batch checksums. It checks them with the C
#: implementation of CRC-32C (the ``crc32c`` package, which kvlog installs
#: with ``kafka-python[crc32c]``): about 20 GB/s on data in the CPU cache, 1 ms
#: for a 16 MiB fetch. In a cold replay, where it is the first pass over each
#: freshly received batch, it measured 1-5% of the time (about 25 ms per
#: 100 MB), some of which the decoding then saves, as it finds the batch in
#: the cache: cheap enough for what it buys (a record damaged on the broker's
#: disk or in its memory is refused rather than cached), and what the Java
#: consumer and aiokafka pay by default too. Where only kafka-python's
#: pure-Python CRC-32C is there (about 7 MB/s: slower than all of the
#: decoding), the check is skipped rather than paid: the broker validated each
#: batch's CRC when it was produced (and the log cleaner when it rewrote one),
#: and TCP checksums the transfer.
CRC_CHECK_AVAILABLE = _crc32c is not None

# The batch header (magic v2), 61 bytes, big-endian:
#   0 baseOffset q | 8 batchLength i | 12 partitionLeaderEpoch i | 16 magic b
#   17 crc I | 21 attributes h | 23 lastOffsetDelta i | 27 baseTimestamp q
#   35 maxTimestamp q | 43 producerId q | 51 producerEpoch h | 53 baseSequence i
#   57 recordCount i | 61 records (compressed as a whole if attributes say so)
_PREFIX = struct.Struct(">qiib")  # up to the magic byte, common to every format
_V2_REST = struct.Struct(">Ihi16xq6xi")  # crc, attributes, lastOffsetDelta, producerId, recordCount
_HEADER_SIZE = 61
_LOG_OVERHEAD = 12  # baseOffset + batchLength: what batchLength does not count
_CRC_START = 21  # the CRC covers the attributes to the end of the batch
_MIN_V2_LENGTH = _HEADER_SIZE - _LOG_OVERHEAD

_COMPRESSION_MASK = 0x07
_TRANSACTIONAL = 0x10
_CONTROL = 0x20

# A control record's key: version (int16), type (int16); type 0 is ABORT.
_CONTROL_KEY = struct.Struct(">hh")
_ABORT = 0


class LegacyRecordFormat(Exception):
    """The record set holds a batch of message format v0 or v1, which :func:`decode` leaves to kafka-python."""


def _gzip(data: bytes) -> bytes:
    return gzip.decompress(data)


#: Per compression type: its name, whether kafka-python finds its library here, the
#: package that provides it, and the function that decompresses it (kafka-python's
#: own, except gzip: the standard library's one-call form of what kafka-python does).
_CODECS: dict[int, tuple[str, bool, str, Any]] = {
    1: ("gzip", kafka_codec.has_gzip(), "(the standard library)", _gzip),
    2: ("snappy", kafka_codec.has_snappy(), "python-snappy", kafka_codec.snappy_decode),
    3: ("lz4", kafka_codec.has_lz4(), "lz4", kafka_codec.lz4_decode),
    4: ("zstd", kafka_codec.has_zstd(), "zstandard", kafka_codec.zstd_decode),
}


class DecodedRecords:
    """The data records of one record set, as parallel tuples, and where the set ends.

    Attributes:
        offsets: each record's offset, increasing.
        keys: each record's key (``None`` for a null key).
        values: each record's value (``None`` for a tombstone).
        batches: per complete batch, in order (control and dropped batches
            too): ``(records up to its end, offset after it, leader epoch,
            bytes up to its end)``.
        next_offset: the offset after the last complete batch (at least the
            fetch offset): where the next fetch starts once every record was
            handed out. It passes control batches, aborted batches and
            compacted gaps, as positions must.
        size: the bytes of the record set that complete batches take; a
            partial trailing batch, if any, starts here.
        error: an error met at a batch after the decoded ones (a corrupt
            batch, a codec that is not installed), or ``None``. The records
            before it are good; the caller hands them out first.
    """

    __slots__ = ("batches", "error", "keys", "next_offset", "offsets", "size", "values")

    def __init__(
        self,
        offsets: Sequence[int],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        batches: list[tuple[int, int, int, int]],
        next_offset: int,
        size: int,
        error: Exception | None,
    ) -> None:
        self.offsets = offsets
        self.keys = keys
        self.values = values
        self.batches = batches
        self.next_offset = next_offset
        self.size = size
        self.error = error

    def __len__(self) -> int:
        return len(self.offsets)

    def leader_epoch_at(self, count: int) -> int:
        """The leader epoch of the batch that holds the first ``count`` records' last one (-1: no batch).

        A reader that hands out only part of the records makes this its
        position's epoch, as the Java consumer does with the epoch of the
        batch of the last record it returned.
        """
        batches = self.batches
        if not batches:
            return -1
        index = bisect_left([batch[0] for batch in batches], count)
        return batches[min(index, len(batches) - 1)][2]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The raw (zigzag-encoded) varint at ``pos`` and the position after it."""
    value = 0
    shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise kerr.CorruptRecordError("a varint longer than 10 bytes")


def _zigzag(raw: int) -> int:
    return (raw >> 1) ^ -(raw & 1)


def _skip_headers(buf: bytes, pos: int) -> int:
    """The position after the header count and headers at ``pos`` (whose content kvlog does not use)."""
    raw, pos = _varint(buf, pos)
    headers = _zigzag(raw)
    if headers < 0:
        raise kerr.CorruptRecordError(f"a record with {headers} headers")
    for _ in range(headers):
        raw, pos = _varint(buf, pos)
        size = _zigzag(raw)
        if size < 0:
            raise kerr.CorruptRecordError(f"a record header key of length {size}")
        pos += size
        raw, pos = _varint(buf, pos)
        size = _zigzag(raw)
        if size < -1:
            raise kerr.CorruptRecordError(f"a record header value of length {size}")
        pos += max(size, 0)
    if pos > len(buf):
        raise kerr.CorruptRecordError("a record's headers run past the end of its batch")
    return pos


def _read_record(buf: bytes, pos: int) -> tuple[int, int, bytes | None, bytes | None]:
    """The slow, complete parse of one record: ``(end, offset delta, key, value)``; headers are checked."""
    raw, pos = _varint(buf, pos)
    end = pos + _zigzag(raw)
    pos += 1  # attributes: unused
    _, pos = _varint(buf, pos)  # timestamp delta
    raw, pos = _varint(buf, pos)
    delta = _zigzag(raw)
    fields: list[bytes | None] = []
    for _ in range(2):
        raw, pos = _varint(buf, pos)
        size = _zigzag(raw)
        if size < -1:
            raise kerr.CorruptRecordError(f"a record field of length {size}")
        if size == -1:
            fields.append(None)
        else:
            fields.append(buf[pos : pos + size])
            pos += size
    pos = _skip_headers(buf, pos)
    if pos != end:
        raise kerr.CorruptRecordError(
            f"a record's fields take {pos - end:+d} bytes more than its length says"
        )
    return end, delta, fields[0], fields[1]


def _read_records(
    buf: bytes,
    pos: int,
    end: int,
    count: int,
    base: int,
    offsets: list[int],
    keys: list[bytes | None],
    values: list[bytes | None],
) -> None:
    """Append the ``count`` records in ``buf[pos:end]`` to the three lists.

    This loop is where a cold replay spends its decoding time, so it is
    written for the fewest Python operations per record. A record is:
    length, attributes (1 byte), timestamp delta, offset delta, key length,
    key, value length, value, header count, headers; every length, delta and
    count is a zigzag varint. The record length, the attributes and the
    timestamp delta are stepped over (the fields say where the record ends);
    a varint of one or two bytes (what lengths and offset deltas nearly
    always take) is read inline, a longer one by :func:`_varint`; a
    non-negative zigzag value is the raw value shifted right by one.
    Headers are stepped over by :func:`_skip_headers`. The batch as a whole
    must end where its records do.
    """
    add_offset, add_key, add_value = offsets.append, keys.append, values.append
    try:
        for _ in repeat(None, count):
            # The record length (1 or 2 bytes), the attributes and a 1-byte
            # timestamp delta; then a longer timestamp delta, if it is one.
            if buf[pos] < 0x80:
                pos += 3
            elif buf[pos + 1] < 0x80:
                pos += 4
            else:
                pos = _varint(buf, pos)[1] + 2
            if buf[pos - 1] >= 0x80:
                pos = _varint(buf, pos - 1)[1]
            # The offset delta.
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                m = buf[pos + 1]
                if m < 0x80:
                    n += (m << 7) - 0x80
                    pos += 2
                else:
                    n, pos = _varint(buf, pos)
            add_offset(base + (n >> 1))
            # The key: zigzag(-1) == 1 is null; another odd value is a negative length.
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                m = buf[pos + 1]
                if m < 0x80:
                    n += (m << 7) - 0x80
                    pos += 2
                else:
                    n, pos = _varint(buf, pos)
            if n & 1:
                if n != 1:
                    raise kerr.CorruptRecordError("a record key of negative length")
                add_key(None)
            else:
                n = pos + (n >> 1)
                add_key(buf[pos:n])
                pos = n
            # The value, likewise.
            n = buf[pos]
            if n < 0x80:
                pos += 1
            else:
                m = buf[pos + 1]
                if m < 0x80:
                    n += (m << 7) - 0x80
                    pos += 2
                else:
                    n, pos = _varint(buf, pos)
            if n & 1:
                if n != 1:
                    raise kerr.CorruptRecordError("a record value of negative length")
                add_value(None)
            else:
                n = pos + (n >> 1)
                add_value(buf[pos:n])
                pos = n
            # The header count: one byte, 0, unless the record has headers.
            if buf[pos]:
                pos = _skip_headers(buf, pos)
            else:
                pos += 1
    except IndexError:
        raise kerr.CorruptRecordError("a record runs past the end of its batch") from None
    if pos != end:
        raise kerr.CorruptRecordError(
            f"the records of a batch take {pos - end:+d} bytes more than the batch holds (or its record count is wrong)"
        )


def _decompress(compression: int, data: memoryview, base_offset: int) -> bytes:
    codec = _CODECS.get(compression)
    if codec is None:
        raise kerr.UnsupportedCodecError(
            f"the record batch at offset {base_offset} uses compression type {compression}, which Kafka does not define"
        )
    name, available, package, decompress = codec
    if not available:
        raise kerr.UnsupportedCodecError(
            f"the record batch at offset {base_offset} is {name}-compressed, and reading it needs the Python "
            f"package {package!r} (what kafka-python decompresses {name} with), which is not installed: "
            f"pip install 'kafka-python[{name}]'"
        )
    try:
        result = decompress(data if compression == 1 else data.tobytes())
    except Exception as exc:  # each library raises its own errors for bad input
        raise kerr.CorruptRecordError(
            f"the {name}-compressed record batch at offset {base_offset} cannot be decompressed: {exc!r}"
        ) from exc
    return result if type(result) is bytes else bytes(result)


def _control_type(buf: bytes, pos: int, end: int, compression: int, base: int) -> int | None:
    """The type of a control batch's marker (0 ABORT, 1 COMMIT), or ``None`` if the batch holds no record."""
    if compression:
        records = _decompress(compression, memoryview(buf)[pos + _HEADER_SIZE : end], base)
        start, stop = 0, len(records)
    else:
        records, start, stop = buf, pos + _HEADER_SIZE, end
    if start >= stop:
        return None
    _, _, key, _ = _read_record(records, start)
    if key is None or len(key) < 4:
        raise kerr.CorruptRecordError(f"the control record at offset {base} has no valid key")
    return int(_CONTROL_KEY.unpack_from(key)[1])


def decode(
    buffer: bytes | bytearray | memoryview,
    fetch_offset: int = 0,
    *,
    read_committed: bool = False,
    aborted_transactions: Iterable[Any] | None = None,
    check_crc: bool = True,
) -> DecodedRecords:
    """Decode the record set of one partition of a fetch response.

    Args:
        buffer: the record set, as the broker sent it.
        fetch_offset: the offset the fetch asked for; records below it (a
            fetch that starts inside a batch) are left out.
        read_committed: drop the records of aborted transactions.
        aborted_transactions: the fetch response's aborted transactions of
            this partition: objects with ``producer_id`` and ``first_offset``.
        check_crc: check each batch's CRC-32C (only where
            :data:`CRC_CHECK_AVAILABLE`; see there).

    Returns:
        The records and where the record set ends. An error at a batch after
        good ones is returned in :attr:`DecodedRecords.error` with the records
        before it.

    Raises:
        LegacyRecordFormat: a batch of message format v0 or v1.
        kafka.errors.CorruptRecordError: the first batch is corrupt.
        kafka.errors.UnsupportedCodecError: the first batch is compressed with
            a codec whose library is not installed.
    """
    buf = buffer if type(buffer) is bytes else bytes(buffer)
    offsets: list[int] = []
    keys: list[bytes | None] = []
    values: list[bytes | None] = []
    batches: list[tuple[int, int, int, int]] = []
    error: Exception | None = None
    try:
        _decode_into(
            buf, fetch_offset, read_committed, aborted_transactions, check_crc, offsets, keys, values, batches
        )
    except (kerr.CorruptRecordError, kerr.UnsupportedCodecError) as exc:
        if not batches:
            raise
        # The failing batch may have added records before it failed.
        good = batches[-1][0]
        del offsets[good:], keys[good:], values[good:]
        error = exc
    # Tuples, not lists: the garbage collector untracks a tuple of bytes and
    # ints at its first pass, while it traverses a list of 100,000 items at
    # every collection of its generation, as long as the records are handed out.
    return DecodedRecords(
        tuple(offsets),
        tuple(keys),
        tuple(values),
        batches,
        batches[-1][1] if batches else fetch_offset,
        batches[-1][3] if batches else 0,
        error,
    )


def _decode_into(  # the batch loop of decode(); fills the lists it is given
    buf: bytes,
    fetch_offset: int,
    read_committed: bool,
    aborted_transactions: Iterable[Any] | None,
    check_crc: bool,
    offsets: list[int],
    keys: list[bytes | None],
    values: list[bytes | None],
    batches: list[tuple[int, int, int, int]],
) -> None:
    crc32c = _crc32c if check_crc else None
    view = memoryview(buf)
    size = len(buf)
    aborted = collections.deque(
        sorted(((t.first_offset, t.producer_id) for t in aborted_transactions or ()), key=lambda t: t[0])
    )
    aborted_producers: set[int] = set()
    pos = 0
    next_offset = fetch_offset
    while size - pos >= _PREFIX.size:
        base, length, epoch, magic = _PREFIX.unpack_from(buf, pos)
        end = pos + _LOG_OVERHEAD + length
        if end > size:
            break  # a partial trailing batch: the next fetch starts with it
        if magic != 2:
            if magic in (0, 1):
                raise LegacyRecordFormat(f"a batch of message format v{magic} at offset {base}")
            raise kerr.CorruptRecordError(
                f"the record batch at offset {base} has an unknown magic byte {magic}"
            )
        if length < _MIN_V2_LENGTH:
            raise kerr.CorruptRecordError(f"the record batch at offset {base} is shorter than its header")
        crc, attributes, last_delta, producer_id, count = _V2_REST.unpack_from(buf, pos + 17)
        if crc32c is not None and crc32c(view[pos + _CRC_START : end]) != crc:
            raise kerr.CorruptRecordError(f"the record batch at offset {base} fails its CRC check")
        last_offset = base + last_delta
        compression = attributes & _COMPRESSION_MASK
        dropped = False
        if read_committed and producer_id >= 0:
            # As the Java consumer does: a producer's transaction counts as
            # aborted from the first batch that reaches its first offset
            # until that producer's ABORT marker.
            while aborted and aborted[0][0] <= last_offset:
                aborted_producers.add(aborted.popleft()[1])
            if attributes & _CONTROL:
                if _control_type(buf, pos, end, compression, base) == _ABORT:
                    aborted_producers.discard(producer_id)
            elif attributes & _TRANSACTIONAL and producer_id in aborted_producers:
                dropped = True
        if count and not dropped and not attributes & _CONTROL:
            first = len(offsets)
            if compression:
                records = _decompress(compression, view[pos + _HEADER_SIZE : end], base)
                _read_records(records, 0, len(records), count, base, offsets, keys, values)
            else:
                _read_records(buf, pos + _HEADER_SIZE, end, count, base, offsets, keys, values)
            if base < fetch_offset:
                # A fetch that starts inside this batch: what precedes it was read before.
                cut = bisect_left(offsets, fetch_offset, first)
                del offsets[first:cut], keys[first:cut], values[first:cut]
        if last_offset >= next_offset:
            next_offset = last_offset + 1
        pos = end
        batches.append((len(offsets), next_offset, epoch, pos))
