"""The record batch decoder (kvlog/log/recordbatch.py) and the Kafka reader that uses it.

Every expectation comes from a real reference, never from the decoder itself:

* record sets built with kafka-python's own batch builders (random records,
  headers, offset gaps, compression, transactions, control batches, a cut
  trailing batch, a corrupt batch) are decoded by kafka-python's fetcher
  decoder and by kvlog's, and must give the same records and next offset;
* topics written by the real broker, through kafka-python's producer (every
  compression type, transactions) and through the Java client (every
  compression type, interleaved committed and aborted transactions), are read
  by kvlog's reader and by a plain kafka-python consumer with
  ``isolation_level="read_committed"`` (whose decoder is kafka-python's own);
* a store replayed from a topic with aborted transactions and compacted gaps
  equals the fold of the committed records.
"""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import stores, topic_records, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

# kafka-python warns about importlib.resources.read_text on import, which
# ``filterwarnings = error`` would turn into an error.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import kafka.errors as kerr
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
    from kafka.consumer.fetcher import Fetcher
    from kafka.protocol.consumer import IsolationLevel
    from kafka.record import MemoryRecords
    from kafka.record.default_records import DefaultRecordBatchBuilder
    from kafka.record.legacy_records import LegacyRecordBatchBuilder
    from kafka.record.util import calc_crc32c

    import kvlog.log.kafka as kafka_log_module
    from kvlog.log import Record
    from kvlog.log.kafka import (
        KafkaLog,
        _decoder_hook_fits,
        _FrameReceiver,
        _install_receiver,
        _parser_fits,
        _partition_records,
        _receive_hook_fits,
    )
    from kvlog.log.recordbatch import CRC_CHECK_AVAILABLE, LegacyRecordFormat, decode

HERE = Path(__file__).resolve().parent
JAVA_SOURCE = HERE / "RecordBatchProducer.java"

#: The compression types, by kafka-python's names, and their ids in a batch's attributes.
COMPRESSIONS = ["none", "gzip", "snappy", "lz4", "zstd"]
CODEC_IDS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def codec_installed(name: str) -> bool:
    """Whether kafka-python (and so kvlog's decoder) can decompress ``name`` here."""
    import kafka.codec

    return name in ("none", "gzip") or bool(getattr(kafka.codec, f"has_{name}")())


# -- record sets built with kafka-python's builders ----------------------------


class Aborted(NamedTuple):
    """An entry of a fetch response's aborted transactions, as kafka-python's fetcher reads them."""

    producer_id: int
    first_offset: int


class BatchSpec(NamedTuple):
    """One batch to build: where it starts, its records, and what kind of batch it is."""

    base_offset: int
    #: (offset delta, timestamp delta, key, value, headers) per record.
    records: list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]]
    #: The batch's last offset delta (past the last record's after compaction).
    last_delta: int
    compression: int
    producer_id: int
    transactional: bool
    #: ``None`` for a data batch, else the marker: 0 ABORT, 1 COMMIT.
    control: int | None
    leader_epoch: int


def set_crc(buffer: bytearray) -> None:
    """Compute a v2 batch's CRC-32C again after a field it covers changed."""
    struct.pack_into(">I", buffer, 17, calc_crc32c(bytes(buffer[21:])))


def build_batch(spec: BatchSpec) -> bytes:
    """Bytes of one v2 batch, made by kafka-python's ``DefaultRecordBatchBuilder``."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=spec.compression,
        is_transactional=spec.transactional,
        producer_id=spec.producer_id,
        producer_epoch=0 if spec.producer_id >= 0 else -1,
        base_sequence=0 if spec.producer_id >= 0 else -1,
        batch_size=1 << 30,
    )
    first_timestamp = 1_700_000_000_000
    if spec.control is not None:
        # A control record: key (version, type), value (version, coordinator epoch).
        builder.append(0, first_timestamp, struct.pack(">hh", 0, spec.control), struct.pack(">hi", 0, 7), [])
    for delta, ts_delta, key, value, headers in spec.records:
        builder.append(delta, first_timestamp + ts_delta, key, value, headers)
    buffer = bytearray(builder.build())
    # The broker assigns the base offset and leader epoch; the CRC covers neither.
    struct.pack_into(">q", buffer, 0, spec.base_offset)
    struct.pack_into(">i", buffer, 12, spec.leader_epoch)
    changed = False
    if spec.control is not None:
        struct.pack_into(">h", buffer, 21, struct.unpack_from(">h", buffer, 21)[0] | 0x20)
        changed = True
    if spec.last_delta != struct.unpack_from(">i", buffer, 23)[0]:
        struct.pack_into(">i", buffer, 23, spec.last_delta)
        changed = True
    if changed:
        set_crc(buffer)
    return bytes(buffer)


def kafka_python_decode(
    buffer: bytes, fetch_offset: int, read_committed: bool, aborted: list[Aborted]
) -> tuple[list[tuple[int, bytes | None, bytes | None]], int, BaseException | None]:
    """What kafka-python's fetcher makes of a record set: ``(records, next fetch offset, error)``."""
    part = Fetcher.PartitionRecords(
        fetch_offset,
        TopicPartition("t", 0),
        MemoryRecords(buffer),
        check_crcs=True,
        isolation_level=IsolationLevel.READ_COMMITTED if read_committed else IsolationLevel.READ_UNCOMMITTED,
        aborted_transactions=aborted,
    )
    records: list[tuple[int, bytes | None, bytes | None]] = []
    error: BaseException | None = None
    while part:
        try:
            taken = part.take(1000)
        except kerr.KafkaError as exc:
            error = exc
            break
        if not taken and part:
            break  # defensive: kafka-python never stalls like this on these inputs
        records.extend((r.offset, r.key, r.value) for r in taken)
    return records, part.next_fetch_offset, error


def kvlog_decode(
    buffer: bytes, fetch_offset: int, read_committed: bool, aborted: list[Aborted]
) -> tuple[list[tuple[int, bytes | None, bytes | None]], int, BaseException | None]:
    """What kvlog's decoder makes of it, in the same terms."""
    try:
        decoded = decode(buffer, fetch_offset, read_committed=read_committed, aborted_transactions=aborted)
    except kerr.KafkaError as exc:
        return [], fetch_offset, exc
    records = list(zip(decoded.offsets, decoded.keys, decoded.values, strict=True))
    return records, decoded.next_offset, decoded.error


# Keys and values: null, short (1-byte lengths), medium (2-byte), long (3-byte varints).
payloads = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.binary(min_size=64, max_size=300),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(8192, 20_000), st.integers(0, 255)),
)
headers_lists = st.lists(
    st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=100))),
    max_size=3,
)
# Timestamp deltas of 1, 2 and 3+ bytes; offset gaps inside a batch of 0 to 3+ bytes.
ts_deltas = st.one_of(st.integers(0, 60), st.integers(64, 8000), st.integers(8192, 10**9))
gaps = st.one_of(st.just(0), st.integers(1, 3), st.integers(60, 200), st.integers(8192, 9000))


@st.composite
def record_sets(draw: st.DrawFn) -> tuple[list[BatchSpec], list[Aborted]]:
    """Batches as a partition holds them, and the aborted transactions a fetch of them reports.

    Plain batches, transactional ones of two producers (each transaction ends
    with a COMMIT or ABORT control batch, sometimes not within the record
    set), compacted ones (gaps between and inside batches, records gone from
    the end, empty batches), compressed with every codec installed here.
    """
    codecs = [CODEC_IDS[name] for name in COMPRESSIONS if codec_installed(name)]
    specs: list[BatchSpec] = []
    aborted: list[Aborted] = []
    open_txn: dict[int, int] = {}  # producer id -> first offset of its open transaction
    offset = draw(st.integers(0, 10**6))
    epoch = draw(st.integers(0, 5))
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.sampled_from(["plain", "txn", "txn", "marker"]))
        producer_id = draw(st.sampled_from([1000, 2000]))
        epoch += draw(st.integers(0, 1))
        if kind == "marker":
            if producer_id not in open_txn:
                continue
            marker = draw(st.sampled_from([0, 1]))
            first = open_txn.pop(producer_id)
            if marker == 0:
                aborted.append(Aborted(producer_id, first))
            specs.append(BatchSpec(offset, [], 0, 0, producer_id, True, marker, epoch))
            offset += 1 + draw(gaps)
            continue
        count = draw(st.integers(0, 6))
        delta = 0
        records = []
        for i in range(count):
            if i:
                delta += 1 + draw(gaps)
            records.append((delta, draw(ts_deltas), draw(payloads), draw(payloads), draw(headers_lists)))
        last_delta = delta + draw(st.one_of(st.just(0), st.integers(1, 5)))
        transactional = kind == "txn"
        if transactional:
            open_txn.setdefault(producer_id, offset)
        specs.append(
            BatchSpec(
                offset,
                records,
                last_delta,
                draw(st.sampled_from(codecs)),
                producer_id if transactional or draw(st.booleans()) else -1,
                transactional,
                None,
                epoch,
            )
        )
        offset += last_delta + 1 + draw(gaps)
    # Transactions still open here are aborted later, past the record set:
    # the fetch reports them too (the broker lists those it knows of).
    for producer_id, first in open_txn.items():
        if draw(st.booleans()):
            aborted.append(Aborted(producer_id, first))
    return specs, aborted


# Each example takes milliseconds, and transactions need many to meet their corner cases.
@settings(max_examples=300)
@given(record_sets(), st.booleans(), st.data())
def test_the_decoder_reads_what_kafka_pythons_fetcher_reads(
    record_set: tuple[list[BatchSpec], list[Aborted]], read_committed: bool, data: st.DataObject
) -> None:
    """Random batches, whole or with the last one cut, from a fetch offset inside the first batch."""
    specs, aborted = record_set
    if not specs:
        return
    batches = [build_batch(spec) for spec in specs]
    buffer = b"".join(batches)
    first = specs[0]
    fetch_offset = data.draw(
        st.integers(first.base_offset, first.base_offset + first.last_delta), "fetch offset"
    )
    # Cut anywhere in the last batch (or not at all): a fetch that ran out of bytes.
    cut = data.draw(st.integers(len(buffer) - len(batches[-1]), len(buffer)), "record set size")
    buffer = buffer[:cut]

    expected = kafka_python_decode(buffer, fetch_offset, read_committed, aborted)
    got = kvlog_decode(buffer, fetch_offset, read_committed, aborted)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert got[2] is None and expected[2] is None
    # The bytes the complete batches take: the next fetch starts after them.
    total = sum(map(len, batches))
    decoded = decode(buffer, fetch_offset, read_committed=read_committed, aborted_transactions=aborted)
    assert decoded.size == (total if cut == total else total - len(batches[-1]))


def partition_records(
    kind: Callable[..., Any], buffer: bytes, fetch_offset: int, aborted: list[Aborted]
) -> Any:
    """A fetcher's ``PartitionRecords`` of ``kind`` for a record set, as ``Fetcher._parse_fetched_data`` makes it."""
    return kind(
        fetch_offset,
        TopicPartition("t", 0),
        MemoryRecords(buffer),
        key_deserializer=None,
        value_deserializer=None,
        check_crcs=True,
        isolation_level=IsolationLevel.READ_COMMITTED,
        aborted_transactions=aborted,
        metric_aggregator=None,
        on_drain=lambda _: None,
    )


@settings(max_examples=200)
@given(record_sets(), st.data())
def test_takes_move_the_position_as_kafka_pythons_do(
    record_set: tuple[list[BatchSpec], list[Aborted]], data: st.DataObject
) -> None:
    """The fetcher's view: records taken a few at a time, and the position and leader epoch after each take.

    kafka-python finds out that nothing but markers and dropped batches is
    left only at the take after the last record; kvlog's reader knows it at
    once and moves its position past them with the last record.
    """
    specs, aborted = record_set
    if not specs:
        return
    buffer = b"".join(build_batch(spec) for spec in specs)
    fetch_offset = specs[0].base_offset
    theirs = partition_records(Fetcher.PartitionRecords, buffer, fetch_offset, aborted)
    ours = partition_records(_partition_records(Fetcher.PartitionRecords), buffer, fetch_offset, aborted)
    assert not isinstance(ours, Fetcher.PartitionRecords)  # the hook decoded it
    while ours:
        n = data.draw(st.integers(1, 5), "records per take")
        taken = ours.take(n)
        assert [(r.offset, r.key, r.value) for r in taken] == [
            (r.offset, r.key, r.value) for r in theirs.take(n)
        ]
        if not ours:
            while theirs:
                assert theirs.take(n) == []
        assert bool(theirs) == bool(ours)
        assert (ours.next_fetch_offset, ours.leader_epoch) == (theirs.next_fetch_offset, theirs.leader_epoch)


@settings(max_examples=100)
@given(record_sets(), st.data())
def test_a_corrupt_batch_stops_the_decoder_where_it_stops_kafka_python(
    record_set: tuple[list[BatchSpec], list[Aborted]], data: st.DataObject
) -> None:
    """A flipped byte under a batch's CRC: the records before that batch, then the error."""
    specs, aborted = record_set
    if not specs:
        return
    batches = [bytearray(build_batch(spec)) for spec in specs]
    broken = data.draw(st.integers(0, len(batches) - 1), "corrupt batch")
    where = data.draw(st.integers(21, len(batches[broken]) - 1), "corrupt byte")
    batches[broken][where] ^= 0xFF
    buffer = b"".join(batches)
    fetch_offset = specs[0].base_offset

    expected = kafka_python_decode(buffer, fetch_offset, True, aborted)
    got = kvlog_decode(buffer, fetch_offset, True, aborted)
    assert got[0] == expected[0]
    assert isinstance(expected[2], kerr.CorruptRecordError)
    assert isinstance(got[2], kerr.CorruptRecordError)


def test_a_batch_that_fails_midway_gives_none_of_its_records() -> None:
    """A batch whose CRC holds but whose records do not add up: the batches before it, the error, nothing of it.

    (kafka-python hands out the records of such a batch up to the bad one;
    kvlog keeps the batch whole, and its position at the batch, so a
    re-fetch meets the same error at the same place.)
    """
    good = build_batch(
        BatchSpec(0, [(0, 0, b"a", b"1", []), (1, 0, b"b", b"2", [])], 1, 0, -1, False, None, 0)
    )
    short = bytearray(
        build_batch(BatchSpec(2, [(0, 0, b"c", b"3", []), (1, 0, b"d", b"4", [])], 2, 0, -1, False, None, 0))
    )
    struct.pack_into(">i", short, 57, 3)  # a record count one more than the batch holds
    set_crc(short)
    decoded = decode(good + bytes(short))
    assert isinstance(decoded.error, kerr.CorruptRecordError)
    assert (list(decoded.offsets), list(decoded.keys)) == ([0, 1], [b"a", b"b"])
    assert (decoded.next_offset, decoded.size) == (2, len(good))
    with pytest.raises(kerr.CorruptRecordError):
        decode(bytes(short))


def test_the_crc_is_checked() -> None:
    """The decision in recordbatch.py: with the C CRC-32C (a kvlog dependency) every batch is checked."""
    assert CRC_CHECK_AVAILABLE
    spec = BatchSpec(5, [(0, 0, b"k", b"v", [])], 0, 0, -1, False, None, 0)
    good = build_batch(spec)
    bad = bytearray(good)
    bad[-2] ^= 1  # the value (the last byte is the header count): the record still parses
    assert list(decode(good).values) == [b"v"]
    with pytest.raises(kerr.CorruptRecordError, match="CRC"):
        decode(bytes(bad))
    assert list(decode(bytes(bad), check_crc=False).values) == [b"w"]


def test_a_partial_trailing_batch_is_left_for_the_next_fetch() -> None:
    """The size and next offset stop before a batch that the record set holds only part of."""
    first = build_batch(
        BatchSpec(10, [(0, 0, b"a", b"1", []), (2, 5, b"b", b"2", [])], 3, 0, -1, False, None, 1)
    )
    second = build_batch(BatchSpec(14, [(0, 0, b"c", b"3", [])], 0, 0, -1, False, None, 1))
    for cut in (1, 11, 12, 17, 61, len(second) - 1):
        decoded = decode(first + second[:cut], 10)
        assert list(decoded.offsets) == [10, 12]
        assert (decoded.size, decoded.next_offset) == (len(first), 14)
    whole = decode(first + second, 10)
    assert list(whole.offsets) == [10, 12, 14]
    assert (whole.size, whole.next_offset) == (len(first) + len(second), 15)
    assert (decode(b"", 7).next_offset, decode(second[:30], 7).size) == (7, 0)


def test_old_message_formats_are_handed_back_to_kafka_python() -> None:
    """Magic 0 and 1 batches: the decoder refuses them and the reader's hook lets kafka-python decode them."""
    for magic in (0, 1):
        builder = LegacyRecordBatchBuilder(magic=magic, compression_type=0, batch_size=1 << 20)
        for i in range(3):
            builder.append(
                i, timestamp=1_700_000_000_000 if magic else None, key=b"k%d" % i, value=b"v%d" % i
            )
        buffer = bytes(builder.build())
        with pytest.raises(LegacyRecordFormat):
            decode(buffer)
        make = _partition_records(Fetcher.PartitionRecords)
        part = make(
            0,
            TopicPartition("t", 0),
            MemoryRecords(buffer),
            key_deserializer=None,
            value_deserializer=None,
            check_crcs=True,
            isolation_level=IsolationLevel.READ_COMMITTED,
            aborted_transactions=[],
            metric_aggregator=None,
            on_drain=lambda _: None,
        )
        assert isinstance(part, Fetcher.PartitionRecords)
        assert [(r.offset, r.key, r.value) for r in part.take(10)] == [
            (i, b"k%d" % i, b"v%d" % i) for i in range(3)
        ]


@pytest.mark.parametrize(
    ("codec", "package", "modules"),
    [
        ("snappy", "python-snappy", ["snappy"]),
        ("lz4", "lz4", ["lz4", "lz4.frame", "lz4f", "lz4framed"]),
        ("zstd", "zstandard", ["zstandard"]),
    ],
)
def test_a_missing_codec_library_is_named(
    codec: str, package: str, modules: list[str], tmp_path: Path
) -> None:
    """In a process where the codec's library cannot be imported, decoding names the package to install."""
    batch = bytearray(build_batch(BatchSpec(3, [(0, 0, b"k", b"v" * 100, [])], 0, 0, -1, False, None, 0)))
    # The records section stays as it is: the error comes before any decompression.
    struct.pack_into(">h", batch, 21, CODEC_IDS[codec])
    set_crc(batch)
    (tmp_path / "batch").write_bytes(bytes(batch))
    child = f"""
import sys, warnings
for name in {modules!r}:
    sys.modules[name] = None  # what an import of a package that is not installed raises
warnings.simplefilter("ignore", DeprecationWarning)
import kafka.errors
from kvlog.log.recordbatch import decode
try:
    decode(open(sys.argv[1], "rb").read())
except kafka.errors.UnsupportedCodecError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "batch")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE.parent.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
        check=True,
    )
    assert f"{codec}-compressed" in result.stdout
    assert f"'{package}'" in result.stdout
    assert f"kafka-python[{codec}]" in result.stdout


# -- the reader's hook into kafka-python ---------------------------------------


def test_the_hook_fits_this_kafka_python() -> None:
    """What the hook relies on in kafka-python's fetcher; a release that changes it fails here first."""
    import inspect

    assert _decoder_hook_fits(Fetcher)
    source = inspect.getsource(Fetcher._parse_fetched_data)
    assert "records = MemoryRecords(completed_fetch.partition_data.records)" in source
    assert "aborted_transactions=aborted_transactions" in source
    assert isinstance(MemoryRecords(b"")._buffer, bytes)
    # The protocol the fetcher uses on what PartitionRecords returns.
    fetcher_source = inspect.getsource(Fetcher)
    for use in (
        "part.next_fetch_offset",
        "part.leader_epoch",
        "part.take(max_records)",
        "part.drain()",
        "partition_records.bytes_read",
        ".topic_partition",
    ):
        assert use in fetcher_source, use


def test_the_receive_hook_fits_this_kafka_python() -> None:
    """What the large reads rely on in kafka-python's connections; a release that changes it fails here first."""
    import inspect

    from kafka.net.manager import KafkaConnectionManager
    from kafka.net.transport import KafkaTCPTransport

    assert _receive_hook_fits(KafkaTCPTransport)
    assert inspect.iscoroutinefunction(KafkaConnectionManager._build_transport)
    assert "self._sock = " in inspect.getsource(KafkaTCPTransport.__init__)
    consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:9", api_version=(4, 0))
    try:
        assert _install_receiver(consumer)
    finally:
        consumer.close()


def test_the_frame_receiver_fits_this_kafka_python() -> None:
    """What decoding responses in place relies on in kafka-python's parser; a release that changes it fails here."""
    from kafka.protocol.parser import KafkaProtocol

    assert _parser_fits(KafkaProtocol)
    parser = KafkaProtocol()
    assert not parser._receiving and parser._header.tell() == 0


def _recording_parser() -> Any:
    """A real kafka-python parser whose responses are what a decoder would read of each: the header's 4 bytes, the rest."""
    from kafka.protocol.parser import KafkaProtocol

    parser = KafkaProtocol(receive_message_max_bytes=100_000)

    def process(buffer: Any) -> tuple[bytes, bytes, int]:
        head = bytes(buffer.read(4))
        rest = bytes(buffer.read())
        return head, rest, buffer.tell()

    parser._process_response = process
    return parser


@given(
    frames=st.lists(st.binary(min_size=4, max_size=3_000), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=30_000), max_size=12),
)
@settings(max_examples=300, deadline=None)
def test_the_frame_receiver_reads_responses_as_kafka_python_does(
    frames: list[bytes], cuts: list[int]
) -> None:
    """Responses arriving in any pieces come out of the receiver as out of kafka-python's parser, in the same calls."""
    stream = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    theirs, ours = _recording_parser(), _recording_parser()
    receive = _FrameReceiver(ours)
    for piece in pieces:
        assert receive(piece) == theirs.receive_bytes(piece)
    assert _FrameReceiver(_recording_parser())(stream) == [(f[:4], f[4:], len(f)) for f in frames]


def test_the_frame_receiver_refuses_an_impossible_size_as_kafka_python_does() -> None:
    """A size past the limit (or negative) raises kafka-python's own error, or hands it to the read loop."""
    import socket

    import kafka.errors as kerr

    for size in (200_000, -5):
        data = size.to_bytes(4, "big", signed=True) + b"x" * 10
        with pytest.raises(kerr.InvalidReceiveError):
            _recording_parser().receive_bytes(data)
        with pytest.raises(kerr.InvalidReceiveError):
            _FrameReceiver(_recording_parser())(data)
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(data)
            assert isinstance(
                _FrameReceiver(_recording_parser()).receive_from(ours)[1], kerr.InvalidReceiveError
            )


@given(
    frames=st.lists(st.integers(min_value=0, max_value=90_000), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=10),
)
@settings(max_examples=40, deadline=None)
def test_the_frame_receiver_reads_responses_from_its_socket(frames: list[int], cuts: list[int]) -> None:
    """Responses sent in any pieces are read from the socket whole, in order, larger ones than its first buffer too."""
    import select
    import socket
    import threading

    bodies = [os.urandom(4) + bytes([i % 251]) * size for i, size in enumerate(frames)]
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    parser = _recording_parser()
    parser._validate_frame_size = lambda size: None
    receiver = _FrameReceiver(parser)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        sender = threading.Thread(
            target=lambda: [theirs.sendall(stream[a:b]) for a, b in itertools.pairwise(bounds)]
        )
        sender.start()
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while len(got) < len(bodies):
            assert time.monotonic() < deadline, f"{len(got)} of {len(bodies)} responses"
            select.select([ours], [], [], 1.0)
            data, error = receiver.receive_from(ours)
            assert (data, error) == (b"", None)
            got.extend(receiver(data))
        sender.join()
    assert got == [(b[:4], b[4:], len(b)) for b in bodies]


def test_the_frame_receiver_gives_back_what_large_responses_grew() -> None:
    """A follower at the end of the log holds no buffer the size of the cold replay's fetches."""
    parser = _recording_parser()
    parser._validate_frame_size = lambda size: None
    receiver = _FrameReceiver(parser)
    big = os.urandom(3_000_000)
    assert receiver(len(big).to_bytes(4, "big") + big) == [(big[:4], big[4:], len(big))]
    assert len(receiver._buf) >= 3_000_000
    assert receiver(b"\x00\x00\x00\x05small") == [(b"smal", b"l", 5)]
    assert len(receiver._buf) <= 256 * 1024


# -- topics written by real clients --------------------------------------------


class Read(NamedTuple):
    """What a reader returned: the records, and the positions once it reached the end offsets."""

    records: list[tuple[int, int, bytes | None, bytes | None]]
    positions: dict[int, int]
    end: dict[int, int]


def read_with_kvlog(kafka_log: KafkaLog, *, max_records: int = 100_000, timeout: float = 60.0) -> Read:
    """Read the whole topic with kvlog's reader, checking its positions after every poll."""
    end = kafka_log.end_offsets()
    reader = kafka_log.open_reader({p: 0 for p in range(kafka_log.partitions)})
    try:
        records: list[tuple[int, int, bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout
        while True:
            positions = reader.positions()
            if all(positions[p] >= end[p] for p in end):
                return Read(records, positions, end)
            assert time.monotonic() < deadline, f"the reader stopped at {positions}, short of {end}"
            batch = reader.poll(0.5, max_records)
            for record in batch:
                assert type(record) is Record
            records.extend((r.partition, r.offset, r.key, r.value) for r in batch)
            if batch:
                # A position passes the records returned, and nothing else of its partition yet.
                last = batch[-1]
                assert reader.positions()[last.partition] > last.offset
    finally:
        reader.close()


def read_committed(bootstrap: str, topic: str, *, timeout: float = 60.0) -> Read:
    """The reference: a plain kafka-python consumer, ``read_committed``, with kafka-python's own decoder."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[tuple[int, int, bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read topic {topic!r} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend((r.partition, r.offset, r.key, r.value) for r in batch)
        positions = {tp.partition: consumer.position(tp) for tp in tps}
        return Read(records, positions, {tp.partition: end[tp] for tp in tps})
    finally:
        consumer.close()


def assert_reads_like_kafka_python(kafka_log: KafkaLog, bootstrap: str, topic: str, **read: Any) -> Read:
    """kvlog's reader returns what the reference consumer does, and ends at the same positions."""
    expected = read_committed(bootstrap, topic)
    got = read_with_kvlog(kafka_log, **read)
    assert got.end == expected.end
    assert got.records == expected.records
    assert got.positions == expected.positions == expected.end
    return got


@pytest.fixture
def kafka_log(bootstrap: str, topic: str, admin: Any) -> Iterator[KafkaLog]:
    """The test's topic, one partition, read through kvlog.

    Not compacted: a compacted topic refuses records without a key, and
    null keys are among what the decoder must read.
    """
    admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=1, topic_configs={"cleanup.policy": "delete"})]
    )
    log = KafkaLog(bootstrap, topic, create_topic=False, allow_non_compacted=True, timeout=20.0)
    yield log
    log.close()


def produce(bootstrap: str, topic: str, records: list[Any], **settings: Any) -> None:
    """Write ``(key, value, headers)`` to partition 0 with a kafka-python producer, in batches of several."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=1000,
        batch_size=1 << 20,
        max_request_size=8 << 20,
        **settings,
    )
    try:
        futures = []
        for i, (key, value, headers) in enumerate(records):
            futures.append(producer.send(topic, key=key, value=value, headers=headers, partition=0))
            if i % 8 == 7:
                producer.flush(timeout=30)
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close()


def mixed_records(tag: str) -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]]:
    """Records of every shape: headers, null keys, tombstones, a 300 KB value, 2- and 3-byte varints."""
    out: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []
    for i in range(60):
        key = None if i % 11 == 7 else f"{tag}:key:{i % 17}".encode()
        value: bytes | None
        if i % 9 == 4 and key is not None:
            value = None
        elif i == 30:
            value = os.urandom(300 * 1024)
        else:
            value = f"{tag}:value:{i}:".encode() + b"v" * (i * i * 3)
        headers = [
            (f"h{h}", f"{i}/{h}".encode() * h) for h in range(i % 4)
        ]  # kafka-python sends no null header value
        out.append((key, value, headers))
    return out


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_batches_of_kafka_pythons_producer(
    compression: str, kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """Every compression type, with headers, null keys, tombstones and a large value."""
    if not codec_installed(compression):
        pytest.skip(f"kafka-python has no {compression} library here to compress with")
    produce(
        bootstrap,
        topic,
        mixed_records(compression),
        compression_type=None if compression == "none" else compression,
    )
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    assert len(got.records) == 60
    assert any(value is None for *_, value in got.records)


def test_a_fetch_that_ends_in_a_partial_batch(
    kafka_log: KafkaLog, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than one fetch (16 MiB) of data: the first record set ends inside a batch, which the next fetch reads whole."""
    seen: list[tuple[int, int]] = []
    real_decode = kafka_log_module.decode

    def recording_decode(buffer: Any, *args: Any, **kwargs: Any) -> Any:
        decoded = real_decode(buffer, *args, **kwargs)
        seen.append((len(buffer), decoded.size))
        return decoded

    monkeypatch.setattr(kafka_log_module, "decode", recording_decode)
    produce(bootstrap, topic, [(b"big:%d" % i, os.urandom(250_000), []) for i in range(80)])
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    assert len(got.records) == 80
    assert any(size < length for length, size in seen), seen


def test_the_reader_reads_whole_fetches_from_its_socket(
    kafka_log: KafkaLog, bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's connection reads over 4 KiB a call into its receiver, and the records are kafka-python's."""
    reads: list[int] = []
    real_receive_from = _FrameReceiver.receive_from

    def recording_receive_from(self: _FrameReceiver, sock: Any, hold: Any = None) -> Any:
        before = self._have
        result = real_receive_from(self, sock, hold)
        reads.append(self._have - before)
        return result

    monkeypatch.setattr(_FrameReceiver, "receive_from", recording_receive_from)
    produce(bootstrap, topic, [(b"big:%d" % i, os.urandom(250_000), []) for i in range(40)])
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    assert len(got.records) == 40
    assert reads and max(reads) > 4096, reads
    assert sum(reads) > 40 * 250_000


def test_a_poll_that_finds_nothing_leaves_no_garbage_behind(
    kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """Replay polls without waiting after every large batch; such a poll leaves no reference cycle behind.

    kafka-python, asked to wait 0 ms while its next fetch is on the way,
    raises and catches a timeout error whose traceback and frames form a
    cycle; the frames hold the caller's records and fetch responses until the
    garbage collector runs, which a replay allocating few objects makes rare.
    """
    import gc

    produce(bootstrap, topic, [(b"big:%d" % i, os.urandom(250_000), []) for i in range(200)])
    reader = kafka_log.open_reader({0: 0})
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        deadline = time.monotonic() + 60
        read = empty = 0
        while read < 200:
            assert time.monotonic() < deadline, f"read {read} of 200 records"
            read += len(reader.poll(0.5, 100_000))
            while more := len(reader.poll(0.0, 100_000)):  # as replay fills a batch
                read += more
            empty += 1
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        reader.close()
    assert empty >= 2  # the data took more than one fetch
    assert "traceback" not in left and "KafkaTimeoutError" not in left, left


def test_a_reader_polled_only_without_waiting_still_reads_everything(
    kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """Polls that never wait still send fetches and hand out what they bring back."""
    produce(bootstrap, topic, [(b"k:%d" % i, b"v" * 1000, []) for i in range(3000)])
    reader = kafka_log.open_reader({0: 0})
    try:
        read: list[int] = []
        deadline = time.monotonic() + 30
        while len(read) < 3000:
            assert time.monotonic() < deadline, f"read {len(read)} of 3000 records with polls of 0 s"
            read.extend(r.offset for r in reader.poll(0.0, 1000))
        assert read == list(range(3000))
    finally:
        reader.close()


@pytest.fixture(scope="session")
def java_producer(kafka_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], None]:
    """``run(topic, mode)``: RecordBatchProducer.java, compiled once, run against the session broker."""
    from devbroker.jars import fetch_jars

    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        message = "the Java client tests need a JDK (javac and java) on the PATH"
        if os.environ.get("KVLOG_REQUIRE_KAFKA") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    classpath = f"{fetch_jars()}/*"
    classes = tmp_path_factory.mktemp("java-producer")
    subprocess.run(
        [javac, "-d", str(classes), "-cp", classpath, str(JAVA_SOURCE)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bootstrap = str(kafka_broker.bootstrap_servers)

    def run(topic: str, mode: str) -> None:
        result = subprocess.run(
            [java, "-cp", f"{classes}{os.pathsep}{classpath}", "RecordBatchProducer", bootstrap, topic, mode],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return run


def test_batches_of_the_java_client(
    java_producer: Callable[[str, str], None], kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """gzip, snappy, lz4 and zstd batches as the Java producer writes them, with headers, null keys, tombstones."""
    java_producer(topic, "codecs")
    missing = [c for c in COMPRESSIONS if not codec_installed(c)]
    if missing:
        # Then kafka-python's consumer cannot read them either: the error must name what to install.
        with pytest.raises(kerr.UnsupportedCodecError, match="pip install"):
            read_with_kvlog(kafka_log)
        return
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    assert len(got.records) == 5 * 40
    assert {value.split(b":", 1)[0] for *_, value in got.records if value is not None} == {
        c.encode() for c in COMPRESSIONS
    }


def test_transactions_of_the_java_client(
    java_producer: Callable[[str, str], None], kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """Interleaved committed and aborted transactions: only committed records, and positions past every marker."""
    java_producer(topic, "transactions")
    physical = topic_records(bootstrap, topic)  # read_uncommitted: aborted data included, markers not
    assert sum(1 for r in physical if r.value is not None and r.value.startswith(b"aborted")) == 10
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    values = [value for *_, value in got.records]
    assert len(values) == 5 + 3 + 2 + 4
    assert all(value is not None and value.startswith(b"committed:") for value in values)
    # The partition ends with an aborted batch and its marker; the position passed both.
    assert got.records[-1][1] < physical[-1].offset < got.positions[0] - 1


def test_transactions_read_a_few_records_at_a_time(
    java_producer: Callable[[str, str], None], kafka_log: KafkaLog, bootstrap: str, topic: str
) -> None:
    """Polls of 2 records at most: positions mid-fetch stand right after the last record returned."""
    java_producer(topic, "transactions")
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic, max_records=2)
    assert len(got.records) == 14


def test_transactions_of_kafka_pythons_producer(kafka_log: KafkaLog, bootstrap: str, topic: str) -> None:
    """kafka-python's own transactional producer: committed, aborted, committed, then aborted at the end."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"{topic}-txn", compression_type="gzip"
    )
    try:
        producer.init_transactions()
        for round_, fate in enumerate(["committed", "aborted", "committed", "aborted"]):
            producer.begin_transaction()
            for i in range(4):
                producer.send(topic, key=f"k{i}".encode(), value=f"{fate}:{round_}:{i}".encode(), partition=0)
            producer.flush(timeout=30)
            if fate == "committed":
                producer.commit_transaction()
            else:
                producer.abort_transaction()
    finally:
        producer.close()
    got = assert_reads_like_kafka_python(kafka_log, bootstrap, topic)
    assert [value for *_, value in got.records] == [
        f"committed:{r}:{i}".encode() for r in (0, 2) for i in range(4)
    ]


# -- a replay through KVLog ----------------------------------------------------

#: Everything the cleaner needs to compact a topic at once (see tests/log/test_compaction.py).
CLEANER_READY = {
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "100",
    "segment.bytes": str(1024 * 1024),
}


def test_replay_of_aborted_transactions_and_compacted_gaps(
    tmp_path: Path, bootstrap: str, topic: str, admin: Any
) -> None:
    """A store replayed from a compacted topic with aborted transactions holds the fold of the committed records."""
    keys = [f"item:{i:03d}" for i in range(120)]
    model: dict[str, bytes] = {}
    with stores(tmp_path, bootstrap_servers=bootstrap, topic=topic, timeout=20.0, codec="bytes") as make:
        live = make("live", partitions=2, topic_config=CLEANER_READY)
        for version in range(4):
            batch = {k: f"{k}:v{version}".encode() for k in keys}
            live.update(batch)
            model.update(batch)
        producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-txn")
        try:
            producer.init_transactions()
            for round_, fate in enumerate(["committed", "aborted", "committed", "aborted"]):
                producer.begin_transaction()
                for k in keys[round_::3]:
                    producer.send(topic, key=k.encode(), value=f"{k}:{fate}:{round_}".encode())
                producer.flush(timeout=30)
                if fate == "committed":
                    producer.commit_transaction()
                    model.update({k: f"{k}:{fate}:{round_}".encode() for k in keys[round_::3]})
                else:
                    producer.abort_transaction()
        finally:
            producer.close()
        for k in keys[::7]:
            live.discard(k)
            model.pop(k, None)

        before = make("before")
        assert dict(before.items()) == model
        before.close()

        # Let the cleaner compact: segments roll on every append older than 200 ms.
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs={"segment.ms": "200"})])
        beats = itertools.count()

        def compacted() -> bool:
            beat = next(beats)
            live[f"~heartbeat:{beat % 2}"] = model[f"~heartbeat:{beat % 2}"] = f"beat:{beat}".encode()
            # The first round of values, superseded by three more, is gone.
            return not any(
                r.value is not None and r.value.endswith(b":v0") for r in topic_records(bootstrap, topic)
            )

        wait_until(compacted, 90.0, interval=0.2, what="the log cleaner to compact the topic")

        after = make("after")
        assert dict(after.items()) == model
        stats = after.stats()
        assert stats["checkpoint"] == stats["end_offsets"]  # past every gap, marker and aborted batch
        live.sync(20)
        assert dict(live.items()) == model
