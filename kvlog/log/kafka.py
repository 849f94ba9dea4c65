"""A compacted Apache Kafka topic as a kvlog log, on kafka-python.

Three clients, each with one job:

* an admin client finds the cluster id, creates the topic compacted (or
  refuses an existing one that is not) and reads its configuration;
* an idempotent producer with ``acks=all`` appends; a write returns only
  once every in-sync replica has it;
* consumers with manual assignment of every partition and no consumer group
  (nothing is committed to Kafka: the cache holds its own checkpoint) read
  the topic from given positions, and a separate one answers offset queries
  so that they never touch the reader's fetch state from another thread.

Consumers use ``isolation_level="read_committed"``: records of aborted
transactions from foreign transactional producers never reach the cache, and
end offsets are last stable offsets, which a committed reader can reach.

The reader's consumer decodes what it fetches with :mod:`kvlog.log.recordbatch`
instead of kafka-python's record decoder (see :func:`_install_decoder`);
kafka-python still sends the fetches and keeps the positions, and its
connections to the partition leaders read their sockets in large reads (see
:func:`_install_receiver`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import kafka.errors as kerr
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka.partitioner import murmur2
from kafka.protocol.consumer import IsolationLevel

from ..errors import (
    BrokerUnavailableError,
    ClosedError,
    KVLogError,
    NotEnoughReplicasError,
    RecordTooLargeError,
    TopicConfigError,
    WriteError,
)
from . import Log, LogReader, PositionOutOfRangeError, Record, oversize_record
from .recordbatch import DecodedRecords, LegacyRecordFormat, decode

__all__ = ["KafkaLog"]

log = logging.getLogger(__name__)

# What a Kafka record costs beyond its key and value: the record batch header
# (61 bytes) plus the record's own varint framing. Kafka checks
# max.message.bytes against the whole batch, so kvlog checks key + value +
# this before sending anything.
_BATCH_OVERHEAD = 61 + 24

_UNKNOWN_TOPIC = kerr.UnknownTopicOrPartitionError.errno

#: The longest pause between two attempts to reach a broker that is down.
_RECONNECT_BACKOFF_MAX_MS = 1000

#: What kafka-python raises when no broker answers in time.
_UNREACHABLE = (kerr.KafkaTimeoutError, kerr.KafkaConnectionError)


def _retention_from(configs: Mapping[str, Any], name: str, default: int) -> int:
    entry = configs.get(name)
    if entry is None:
        return default
    value = entry["value"] if isinstance(entry, Mapping) else entry
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# kafka-python 3.0 counts its bootstrap as a metadata refresh and then waits
# retry_backoff_ms (100 ms, and the client's own setting is not passed down)
# before it fetches the metadata of any topic: every new client paid 100 ms
# before its first request, half of a warm restart. The backoff after a failed
# refresh is separate (exponential, KIP-580), so a short one here only shortens
# that first wait and the pause between refreshes that found topic errors.
_METADATA_BACKOFF_MS = 10


def _refresh_metadata_when_not_leader(consumer: Any) -> None:
    """Make a consumer's offset queries refresh a stale leader instead of asking it again until they time out.

    kafka-python 3.0 retries a ListOffsets answered with NOT_LEADER_OR_FOLLOWER
    (or another "ask the leader again" error) at once, to the same broker,
    without asking for new metadata. A consumer that met a leader change
    while idle keeps the old leader in its metadata (a refresh triggered by
    the lost connection runs before the controller has elected another), so
    once that broker is back as a follower every ``end_offsets()`` and
    ``beginning_offsets()`` spins against it until it times out, until the
    metadata expires (``metadata_max_age_ms``, 5 minutes). The Java client
    requests a metadata update and waits for it before retrying; this makes
    kafka-python do the same, by reporting such an answer as stale metadata,
    which its retry loop already handles that way. Where a kafka-python
    release has no such method, a failed query still discards its consumer
    (see :meth:`KafkaLog._offsets`).
    """
    fetcher = getattr(consumer, "_fetcher", None)
    send = getattr(fetcher, "_send_list_offsets_requests", None)
    if send is None or not inspect.iscoroutinefunction(send):
        return

    async def send_list_offsets_requests(timestamps: Any) -> Any:
        offsets, retry = await send(timestamps)
        if retry:
            raise kerr.StaleMetadata(f"the leader of {sorted(map(str, retry))} moved; refreshing metadata")
        return offsets, retry

    setattr(fetcher, "_send_list_offsets_requests", send_list_offsets_requests)  # noqa: B010 - an instance's method


def _cluster_config(client: Any) -> Any:
    """The config of ``client``'s cluster metadata, or ``None`` in a kafka-python layout this does not know."""
    try:
        return client._client._manager.cluster.config  # the consumer and the admin client
    except AttributeError:
        pass
    # The producer keeps no _client: its cluster metadata is its _metadata.
    return getattr(getattr(client, "_metadata", None), "config", None)


def _shorten_startup_backoff(client: Any) -> None:
    config = _cluster_config(client)  # None in a layout this does not know: its behaviour is kept
    if isinstance(config, dict) and config.get("retry_backoff_ms", 0) > _METADATA_BACKOFF_MS:
        config["retry_backoff_ms"] = _METADATA_BACKOFF_MS


#: Makes a ``Record`` from a tuple of its fields in C, without the Python
#: ``__new__`` of a NamedTuple: the one object per record that replay needs,
#: at half the cost (0.1 µs instead of 0.24, before the garbage collector's
#: share, which is the same for both).
_new_tuple = tuple.__new__

#: The keyword arguments kafka-python's fetcher passes to ``PartitionRecords``
#: (``Fetcher._parse_fetched_data``); the hook is installed only where its
#: constructor takes every one of them.
_PARTITION_RECORDS_ARGS = (
    "fetch_offset",
    "tp",
    "records",
    "key_deserializer",
    "value_deserializer",
    "check_crcs",
    "isolation_level",
    "aborted_transactions",
    "metric_aggregator",
    "on_drain",
)


class _KafkaColumns:
    """Records of one partition, from one take of a decoded fetch, column by column, in log order.

    What the replayer applies (see :meth:`kvlog.cache.Cache.apply_columns`):
    the decoder's columns, sliced, and no object per record.
    """

    __slots__ = ("keys", "offsets", "partition", "tombstones", "values")

    def __init__(
        self,
        partition: int,
        offsets: Sequence[int],
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
    ) -> None:
        self.partition = partition
        self.offsets = offsets
        self.keys = keys
        self.values = values
        #: The indexes of the tombstones, ascending (found by ``index``, a loop in C).
        self.tombstones: list[int] = []
        with contextlib.suppress(ValueError):
            at = -1
            while True:
                at = values.index(None, at + 1)
                self.tombstones.append(at)

    def __len__(self) -> int:
        return len(self.offsets)

    def records(self) -> list[Record]:
        """Every record, in log order."""
        return list(
            map(_new_tuple, repeat(Record), zip(repeat(self.partition), self.offsets, self.keys, self.values))
        )


class _Taken:
    """Stands in the fetcher's results for each record a take handed to the reader as columns."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<a record taken as columns>"


_TAKEN = _Taken()


class _DecodedPartitionRecords:
    """The records of one partition's fetch, decoded by :mod:`~kvlog.log.recordbatch`, as kafka-python's fetcher takes them.

    The same protocol as ``Fetcher.PartitionRecords``: true until drained;
    ``take(n)`` returns up to ``n`` records and moves ``next_fetch_offset``
    and ``leader_epoch`` (which the fetcher makes the partition's position)
    past them; once every record was taken, past the last complete batch, so
    that a position passes control batches, aborted batches and compacted
    gaps. ``drain()`` drops what is left. The records are
    :class:`~kvlog.log.Record` tuples, made only when taken: the decoded
    record set holds no object per record.
    """

    __slots__ = (
        "_decoded",
        "_metric_aggregator",
        "_on_drain",
        "_sink",
        "_taken",
        "bytes_read",
        "fetch_offset",
        "leader_epoch",
        "next_fetch_offset",
        "records_read",
        "topic_partition",
    )

    def __init__(
        self,
        fetch_offset: int,
        tp: TopicPartition,
        decoded: DecodedRecords,
        metric_aggregator: Any,
        on_drain: Callable[[Any], None],
        sink: list[_KafkaColumns] | None = None,
    ) -> None:
        self.fetch_offset = fetch_offset
        self.topic_partition = tp
        self.next_fetch_offset = fetch_offset
        self.leader_epoch = -1
        self.bytes_read = 0
        self.records_read = 0
        self._decoded: DecodedRecords | None = decoded
        self._taken = 0
        self._metric_aggregator = metric_aggregator
        self._on_drain = on_drain
        self._sink = sink

    def __bool__(self) -> bool:
        return self._decoded is not None

    def drain(self) -> None:
        """Drop the records not taken; report what was read (kafka-python's metrics and partition rotation)."""
        if self._decoded is not None:
            self._decoded = None
            if self._metric_aggregator:
                self._metric_aggregator.record(self.topic_partition, self.bytes_read, self.records_read)
            self._on_drain(self)

    def take(self, n: int | None = None) -> list[Any]:
        """Up to ``n`` (all if ``None``) of the records not taken yet, in offset order.

        With a ``sink``, the records go to it as one :class:`_KafkaColumns`,
        and the list returned holds a :data:`_TAKEN` for each, which is all
        the fetcher needs: it counts them and hands them on to ``poll``.

        Raises:
            kafka.errors.CorruptRecordError, kafka.errors.UnsupportedCodecError:
                the fetch held a batch that cannot be decoded, after every
                record before it was taken. The position then stands at that
                batch, and the next fetch meets it again.
        """
        decoded = self._decoded
        if decoded is None:
            return []
        start = self._taken
        total = len(decoded.offsets)
        if start == total and decoded.error is not None:
            error = decoded.error
            self.drain()
            raise error
        stop = total if n is None else min(total, start + n)
        offsets = decoded.offsets
        # (Slicing a whole tuple copies nothing.)
        records: list[Any]
        if self._sink is not None:
            self._sink.append(
                _KafkaColumns(
                    self.topic_partition.partition,
                    offsets[start:stop],
                    decoded.keys[start:stop],
                    decoded.values[start:stop],
                )
            )
            records = [_TAKEN] * (stop - start)
        else:
            columns = zip(
                repeat(self.topic_partition.partition),
                offsets[start:stop],
                decoded.keys[start:stop],
                decoded.values[start:stop],
            )
            records = list(map(_new_tuple, repeat(Record), columns))
        self._taken = self.records_read = stop
        if stop < total:
            self.next_fetch_offset = offsets[stop - 1] + 1
            self.leader_epoch = decoded.leader_epoch_at(stop)
            return records
        self.next_fetch_offset = decoded.next_offset
        if decoded.batches:
            self.leader_epoch = decoded.batches[-1][2]
        self.bytes_read = decoded.size
        if decoded.error is None:
            # Drained at once, not at the next take: kafka-python sends no
            # fetch for a partition whose records are still pending, and the
            # next fetch should be in flight while these records are applied.
            self.drain()
        return records


def _partition_records(
    kafka_records: Callable[..., Any], sink: list[_KafkaColumns] | None = None
) -> Callable[..., Any]:
    """A stand-in for ``Fetcher.PartitionRecords`` that decodes with :func:`~kvlog.log.recordbatch.decode`.

    ``kafka_records`` (kafka-python's own class) takes the record sets this
    decoder leaves alone: batches of message formats v0 and v1, a consumer
    with deserializers, a record set kafka-python keeps otherwise than this
    expects.
    """

    def partition_records(fetch_offset: int, tp: TopicPartition, records: Any, **kwargs: Any) -> Any:
        buffer = getattr(records, "_buffer", None)
        if (
            not isinstance(buffer, (bytes, bytearray, memoryview))
            or kwargs.get("key_deserializer") is not None
            or kwargs.get("value_deserializer") is not None
        ):
            return kafka_records(fetch_offset, tp, records, **kwargs)
        try:
            decoded = decode(
                buffer,
                fetch_offset,
                read_committed=kwargs.get("isolation_level") == IsolationLevel.READ_COMMITTED,
                aborted_transactions=kwargs.get("aborted_transactions"),
                check_crc=bool(kwargs.get("check_crcs", True)),
            )
        except LegacyRecordFormat:
            return kafka_records(fetch_offset, tp, records, **kwargs)
        return _DecodedPartitionRecords(
            fetch_offset,
            tp,
            decoded,
            kwargs.get("metric_aggregator"),
            kwargs.get("on_drain") or (lambda _: None),
            sink,
        )

    return partition_records


#: Per fetcher class: whether the decoder hook fits it (see _decoder_hook_fits).
_hook_fits: dict[type, bool] = {}


def _decoder_hook_fits(fetcher_class: type) -> bool:
    """Whether ``fetcher_class`` builds its records through ``self.PartitionRecords(...)`` with the arguments known here."""
    fits = _hook_fits.get(fetcher_class)
    if fits is None:
        fits = False
        kafka_records = getattr(fetcher_class, "PartitionRecords", None)
        parse = getattr(fetcher_class, "_parse_fetched_data", None)
        if kafka_records is not None and parse is not None:
            try:
                parameters = inspect.signature(kafka_records).parameters
                source = inspect.getsource(parse)
            except (TypeError, ValueError, OSError):
                pass
            else:
                fits = "self.PartitionRecords(" in source and all(
                    name in parameters for name in _PARTITION_RECORDS_ARGS
                )
        _hook_fits[fetcher_class] = fits
    return fits


def _install_decoder(consumer: KafkaConsumer, sink: list[_KafkaColumns] | None = None) -> bool:
    """Make ``consumer`` decode fetched record sets with :mod:`kvlog.log.recordbatch`; return whether it does.

    kafka-python's fetcher turns each partition of a fetch response into a
    ``PartitionRecords`` (``Fetcher._parse_fetched_data``), after it has
    handled the response's errors (OffsetOutOfRange, a leader change, a
    diverging epoch) and checked that the fetch still matches the position;
    the fetcher then takes records from it and makes its
    ``next_fetch_offset`` the position. That class is looked up on the
    fetcher instance, so an instance attribute replaces it for this consumer
    only, and everything else (fetch requests, sessions, positions, retries,
    offset validation) stays kafka-python's. With a ``sink``, taken records
    go to it as columns (see :meth:`_DecodedPartitionRecords.take`). Another kafka-python whose
    fetcher does not build it that way keeps its own decoder (slower, as
    correct); ``tests/log/test_recordbatch.py`` pins this release's.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not _decoder_hook_fits(type(fetcher)):
        log.warning("this kafka-python's fetcher does not fit kvlog's record decoder; using kafka-python's")
        return False
    fetcher.PartitionRecords = _partition_records(type(fetcher).PartitionRecords, sink)
    return True


#: How much one ``recv`` of the reader's socket may take. kafka-python reads
#: 4 KiB at a time until the socket is empty: about 4,000 calls, each holding
#: the GIL for its Python frame, for one 16 MiB fetch. Whole fetches in a few
#: calls leave that time to decoding and applying.
_RECV_BYTES = 256 * 1024


#: The longest a reader's network thread holds off reading while this
#: process writes (see :class:`_ReadHold`). Back-to-back writes keep it
#: holding until this runs out, and the follower's catching up then lands on
#: one write: the bound sets how often. Here, single writes one after another
#: had a p99 2.3x the raw producer's with 5 ms and about 1.1x with 20 ms. It is
#: also how late, at worst, this process's cache shows a record of another
#: writer that no write of this process waits behind (one in another
#: partition) while this process writes without a pause.
_HOLD_SECONDS = 0.02


class _ReadHold:
    """Counts this process's writes in flight; the reader's connections leave their sockets unread meanwhile.

    A write on Kafka returns once the broker acknowledged it and the writer
    applied it to the cache; the follower's fetch brings the same record back
    at the moment the acknowledgement comes, and handling that response
    (kafka-python's network thread, then the follower) takes about half a
    millisecond of CPU under the same GIL as the producer's thread and the
    writer, which wait for it. Holding the reader's reads until the write
    is done (at most :data:`_HOLD_SECONDS`, so that a steady stream of writes
    cannot starve replay) moves that work out of the write; the records are
    then skipped, or applied, by the follower right after.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writes = 0

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writes += 1
        try:
            yield
        finally:
            with self._cond:
                self._writes -= 1
                if not self._writes:
                    self._cond.notify_all()

    def wait(self) -> None:
        """Wait, for at most :data:`_HOLD_SECONDS`, until no write of this process is in flight."""
        if self._writes:  # read without the lock: a stale answer only holds, or not, once
            with self._cond:
                self._cond.wait_for(lambda: not self._writes, _HOLD_SECONDS)


def _read_available(sock: Any, hold: _ReadHold | None = None) -> tuple[bytes, Exception | None]:
    """What ``sock`` has to read now, in large reads: kafka-python's ``_sock_recv`` with :data:`_RECV_BYTES` reads.

    A short read means the socket is drained for now; the selector calls
    again when more arrives (the loop stops there, where kafka-python's tries
    once more and gets ``BlockingIOError``). With a ``hold``, it first waits
    while this process writes (see :class:`_ReadHold`).
    """
    if hold is not None:
        hold.wait()
    chunks: list[bytes] = []
    while True:
        try:
            data = sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except Exception as e:
            log.debug("error receiving from %s", sock, exc_info=True)
            return b"".join(chunks), kerr.KafkaConnectionError(e)
        if not data:
            return b"".join(chunks), kerr.KafkaConnectionError("socket disconnected")
        chunks.append(data)
        if len(data) < _RECV_BYTES:
            break
    return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), None


class _Frame:
    """One received response, read as kafka-python's parser reads its buffer, without copying it.

    kafka-python reads a response back out of its buffer with two copies (a
    ``bytearray`` slice, then ``bytes``) before decoding a view of it. This
    hands the decoder a view of the receiver's buffer instead; every field
    the decoder makes of it is a copy (the records are ``bytes``), so the
    buffer can take the next response once the decoder returns.
    """

    __slots__ = ("_pos", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def read(self, nbytes: int | None = None) -> bytes | memoryview:
        """The next ``nbytes`` as ``bytes`` (the header's fields), or a view of the rest (the body)."""
        start = self._pos
        if nbytes is None:
            self._pos = len(self._view)
            return self._view[start:]
        self._pos = min(start + nbytes, len(self._view))
        return bytes(self._view[start : self._pos])

    def seek(self, pos: int) -> None:
        self._pos = pos

    def tell(self) -> int:
        return self._pos


class _FrameReceiver:
    """A connection's receiving end: its socket read into one reused buffer, responses decoded in place.

    kafka-python reads a socket into new ``bytes``, copies each response into
    a new ``bytearray`` of its size, and copies it twice more to decode it.
    For the reader's fetches (up to 16 MiB each) every copy lands in memory
    the process just got from the OS, at a page fault per 4 KiB: a copy of a
    fetch of 1 KB values cost about a tenth of the replay. This receiver
    reads the socket with ``recv_into`` into a buffer that grows to the
    largest response and is kept (one copy, into warm memory), and decodes
    each complete response from a view of it.

    It stands in for the connection parser's ``receive_bytes``: called with
    bytes, it takes them as received; called with ``b""`` (what
    :meth:`receive_from` returns to kafka-python's read loop), it decodes
    what its reads gathered. Responses are a 4-byte big-endian size and that
    many bytes; the size is checked by the parser's ``_validate_frame_size``
    and the rest by its ``_process_response``, so the errors are
    kafka-python's own.
    """

    def __init__(self, parser: Any) -> None:
        self._validate = parser._validate_frame_size
        self._process = parser._process_response
        self._buf = bytearray(_RECV_BYTES)
        self._have = 0  # bytes at the start of _buf: what came and is not decoded yet

    def __call__(self, data: bytes) -> list[Any]:
        if data:
            self._reserve(len(data))
            self._buf[self._have : self._have + len(data)] = data
            self._have += len(data)
        return self._decode_complete()

    def receive_from(self, sock: Any, hold: _ReadHold | None = None) -> tuple[bytes, Exception | None]:
        """Read what ``sock`` has now into the buffer; return ``(b"", error)`` for kafka-python's read loop.

        Reads until the socket is drained or a response is complete, so a
        response is handed on as soon as it is whole. With a ``hold``, it
        first waits while this process writes (see :class:`_ReadHold`).
        """
        if hold is not None:
            hold.wait()
        try:
            while True:
                self._reserve(_RECV_BYTES)
                room = len(self._buf) - self._have
                try:
                    with memoryview(self._buf) as view:
                        n = sock.recv_into(view[self._have :], room)
                except (BlockingIOError, InterruptedError):
                    break
                except Exception as e:
                    log.debug("error receiving from %s", sock, exc_info=True)
                    return b"", kerr.KafkaConnectionError(e)
                if not n:
                    return b"", kerr.KafkaConnectionError("socket disconnected")
                self._have += n
                if self._whole_response() or n < room:
                    break
        except kerr.KafkaError as e:  # an impossible response size: the connection is aborted with it
            return b"", e
        return b"", None

    def _reserve(self, extra: int) -> None:
        """Make the buffer hold what it has, plus ``extra`` bytes, plus the rest of the response it is in."""
        need = self._have + extra
        if self._have >= 4:
            need = max(need, 4 + self._validated_size(0))
        if need > len(self._buf):
            # A new buffer, not a resize: a view of the old one may be alive (a traceback's frame).
            grown = bytearray(max(need, 2 * len(self._buf)))
            grown[: self._have] = memoryview(self._buf)[: self._have]
            self._buf = grown

    def _validated_size(self, pos: int) -> int:
        size = int.from_bytes(self._buf[pos : pos + 4], "big", signed=True)
        self._validate(size)
        return size

    def _whole_response(self) -> bool:
        return self._have >= 4 and self._have >= 4 + self._validated_size(0)

    def _decode_complete(self) -> list[Any]:
        responses: list[Any] = []
        pos, have = 0, self._have
        with memoryview(self._buf) as view:
            while have - pos >= 4:
                size = self._validated_size(pos)
                if have - pos - 4 < size:
                    break
                responses.append(self._process(_Frame(view[pos + 4 : pos + 4 + size])))
                pos += 4 + size
        if pos:
            if pos == have and len(self._buf) > _RECV_BYTES and pos - 4 * len(responses) < _RECV_BYTES // 4:
                # Small responses again (a follower at the end of the log): the
                # buffer a cold replay grew goes back to the OS.
                self._buf = bytearray(_RECV_BYTES)
            else:
                # The start of the next response, if any, moves to the front (a few bytes, usually none).
                self._buf[: have - pos] = self._buf[pos:have]
            self._have = have - pos
        return responses


def _receiver_of(connection: Any) -> _FrameReceiver | None:
    """``connection``'s :class:`_FrameReceiver`, given to its parser now if it has received nothing yet.

    Called before each read of a connection the reader's consumer made, so
    a parser made on a reconnection gets one too. ``None`` when the parser
    does not fit (see :func:`_parser_fits`) or is inside a response (it
    never is, called before its first bytes).
    """
    parser = getattr(connection, "parser", None)
    if parser is None:
        return None
    receive = parser.receive_bytes
    if type(receive) is _FrameReceiver:
        return receive
    if _parser_fits(type(parser)) and not parser._receiving and parser._header.tell() == 0:
        receiver = parser.receive_bytes = _FrameReceiver(parser)
        return receiver
    return None


#: Per parser class: whether _FrameReceiver fits it (see _parser_fits).
_parser_fits_cache: dict[type, bool] = {}


def _parser_fits(parser_class: type) -> bool:
    """Whether ``parser_class`` frames responses as :class:`_FrameReceiver` does and decodes them with ``read``."""
    fits = _parser_fits_cache.get(parser_class)
    if fits is None:
        fits = False
        if all(
            callable(getattr(parser_class, name, None))
            for name in ("_validate_frame_size", "_process_response")
        ):
            try:
                receive = inspect.getsource(parser_class.receive_bytes)  # type: ignore[attr-defined]
                process = inspect.getsource(parser_class._process_response)  # type: ignore[attr-defined]
            except (AttributeError, TypeError, OSError):
                pass
            else:
                fits = (
                    "Int32.decode(self._header)" in receive
                    and "self._validate_frame_size(nbytes)" in receive
                    and "self._process_response(self._rbuffer)" in receive
                    and "response_type.decode(read_buffer)" in process
                )
        _parser_fits_cache[parser_class] = fits
    return fits


#: Per transport class: whether the receive hook fits it (see _receive_hook_fits).
_receive_fits: dict[type, bool] = {}


def _receive_hook_fits(transport_class: type) -> bool:
    """Whether ``transport_class`` reads its socket only through ``self._sock_recv()``, returning ``(data, error)``."""
    fits = _receive_fits.get(transport_class)
    if fits is None:
        fits = False
        read = getattr(transport_class, "_read_from_sock", None)
        if read is not None and callable(getattr(transport_class, "_sock_recv", None)):
            try:
                source = inspect.getsource(read)
            except (TypeError, OSError):
                pass
            else:
                fits = "recvd_data, err = self._sock_recv()" in source and ".recv(" not in source
        _receive_fits[transport_class] = fits
    return fits


def _install_receiver(consumer: KafkaConsumer, hold: _ReadHold | None = None) -> bool:
    """Make ``consumer``'s plain TCP connections read their sockets in large reads; return whether they will.

    kafka-python 3 builds a transport per broker connection in its connection
    manager (``_build_transport``); replacing that method on this consumer's
    manager gives every transport it builds from now on, and no other
    client's, a ``_sock_recv`` of :func:`_read_available`. TLS transports keep
    their own (their reads go through the TLS record layer). Connections open
    before the call (the bootstrap one) keep kafka-python's reads; fetches go
    to the partition leaders' connections, made later. With a ``hold``, each
    read first waits while this process writes (see :class:`_ReadHold`).
    """
    manager = getattr(getattr(consumer, "_client", None), "_manager", None)
    build = getattr(manager, "_build_transport", None)
    try:
        from kafka.net.transport import KafkaTCPTransport
    except ImportError:
        return False
    if build is None or not inspect.iscoroutinefunction(build) or not _receive_hook_fits(KafkaTCPTransport):
        return False

    async def build_transport(*args: Any, **kwargs: Any) -> Any:
        transport = await build(*args, **kwargs)
        sock = getattr(transport, "_sock", None)
        if type(transport) is KafkaTCPTransport and sock is not None:

            def sock_recv() -> tuple[bytes, Exception | None]:
                receiver = _receiver_of(transport._protocol)
                if receiver is not None:
                    return receiver.receive_from(sock, hold)
                return _read_available(sock, hold)

            transport._sock_recv = sock_recv
        return transport

    manager._build_transport = build_transport  # type: ignore[union-attr]
    return True


class KafkaReader(LogReader):
    """Reads every partition of a topic with a group-less, manually assigned consumer."""

    def __init__(self, kafka_log: KafkaLog, positions: Mapping[int, int]) -> None:
        self._log = kafka_log
        self._closed = True  # until the consumer is set up
        self._tps = [TopicPartition(kafka_log.topic, p) for p in range(kafka_log.partitions)]
        for tp in self._tps:
            position = positions.get(tp.partition)
            if position is None or position < 0:
                raise PositionOutOfRangeError(
                    f"no valid position for partition {tp.partition} of topic {kafka_log.topic!r}: {position}"
                )
        self._consumer = kafka_log._new_consumer(
            max_poll_records=100_000,
            # Large fetches keep replay throughput up; one partition fetch must
            # still hold the largest record the topic accepts.
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=max(16 * 1024 * 1024, kafka_log.max_record_bytes or 0),
            # A new consumer's first poll finds no fetchable position until its
            # metadata arrives, and then sleeps retry_backoff_ms (100 ms by
            # default) before it fetches: most of a warm restart with a few
            # new records. A short backoff only shortens that pause.
            retry_backoff_ms=kafka_log._kafka_config.get("retry_backoff_ms", 10),
        )
        try:
            #: What the fetcher took during the current poll, as columns (see poll_columns).
            self._taken: list[_KafkaColumns] = []
            _install_decoder(self._consumer, self._taken)
            _install_receiver(self._consumer, kafka_log._read_hold)
            self._consumer.assign(self._tps)
            for tp in self._tps:
                self._consumer.seek(tp, positions[tp.partition])
        except BaseException:
            self._consumer.close(autocommit=False)  # or it keeps reconnecting in the background
            raise
        self._closed = False

    def poll(self, timeout: float, max_records: int) -> list[Any]:
        return [record for part in self.poll_columns(timeout, max_records) for record in part.records()]

    def poll_columns(self, timeout: float, max_records: int) -> list[_KafkaColumns]:
        """What :meth:`poll` returns, per partition and column by column (see :meth:`kvlog.cache.Cache.apply_columns`).

        The decoder hands every take to the reader as columns; records that
        kafka-python decoded itself (message formats v0 and v1) are put in
        columns here, in their place in the partition's order.
        """
        if self._closed or self._log._closed:
            raise ClosedError(f"a reader of {self._log.describe()} was used after close()")
        if timeout <= 0 and self._only_a_fetch_to_wait_for():
            # kafka-python would wait 0 ms for the fetch in flight and raise,
            # and catch, a timeout error whose traceback and frames form a
            # reference cycle holding this step's records and the fetch
            # responses until the collector runs. Replay polls so at the end
            # of every large batch and allocates too few container objects for
            # the collector to run often: a cold replay of 10 million records
            # grew to 530 MB of RssAnon. With no fetch in flight, the poll goes
            # to kafka-python, which sends the next one.
            return []
        taken = self._taken
        taken.clear()
        with self._read_errors():
            batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        if not batches:
            return []
        parts: list[_KafkaColumns] = []
        if len(batches) == 1 and len(taken) == 1 and len(taken[0]) == len(next(iter(batches.values()))):
            parts.append(taken[0])  # a poll of one take, the usual one
        else:
            pending = {
                tp.partition: iter([part for part in taken if part.partition == tp.partition])
                for tp in batches
            }
            for tp, items in batches.items():
                i, n = 0, len(items)
                while i < n:
                    if items[i] is _TAKEN:
                        part = next(pending[tp.partition])
                        parts.append(part)
                        i += len(part)
                    else:
                        j = i
                        while j < n and items[j] is not _TAKEN:
                            j += 1
                        legacy = items[i:j]
                        parts.append(
                            _KafkaColumns(
                                tp.partition,
                                [r.offset for r in legacy],
                                [r.key for r in legacy],
                                [r.value for r in legacy],
                            )
                        )
                        i = j
        taken.clear()
        return parts

    def _only_a_fetch_to_wait_for(self) -> bool:
        """Whether the consumer holds no fetched record unread and a fetch is on its way.

        It first sends the fetches kafka-python's poll would send before
        waiting (``send_fetches`` runs on kafka-python's network thread and
        returns once it is done, callbacks of fetches that just completed
        included, so the buffer is looked at again after it). ``False`` when
        it cannot tell (kafka-python's fetcher changed), and when nothing is
        in flight (positions still to validate or reset, say): the poll then
        goes to kafka-python, which does that work.
        """
        fetcher = getattr(self._consumer, "_fetcher", None)
        try:
            if fetcher._completed_fetches or fetcher._next_partition_records:  # type: ignore[union-attr]
                return False
            fetcher.send_fetches()  # type: ignore[union-attr]
            if fetcher._completed_fetches or fetcher._next_partition_records:  # type: ignore[union-attr]
                return False
            return bool(fetcher.in_flight_fetches())  # type: ignore[union-attr]
        except AttributeError:
            return False

    def positions(self) -> dict[int, int]:
        # timeout_ms=0: the positions this consumer holds, without a network
        # round-trip. Without a timeout, kafka-python first validates them
        # against the leader's epoch after a leader change (KIP-320), waiting
        # without bound and raising when no broker answers; poll() validates
        # before it fetches anyway.
        with self._read_errors():  # a truncation found by a validation that poll() started
            return {tp.partition: self._consumer.position(tp, timeout_ms=0) for tp in self._tps}

    @contextlib.contextmanager
    def _read_errors(self) -> Iterator[None]:
        """Turn kafka-python's read errors into the ones the replayer acts on."""
        try:
            yield
        except kerr.OffsetOutOfRangeError as exc:
            raise PositionOutOfRangeError(f"a reader position is outside the log: {exc}") from exc
        except kerr.LogTruncationError as exc:
            # KIP-320: the partition's log now ends before records this reader
            # already read (an unclean leader election, a topic created again):
            # kafka-python raises this rather than OffsetOutOfRangeError.
            raise PositionOutOfRangeError(
                f"a reader position is outside the log: the log was truncated below it ({exc})"
            ) from exc
        except kerr.KafkaError as exc:
            if not exc.retriable:
                raise
            raise _unreadable(self._log, exc) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close(autocommit=False)


class KafkaLog(Log):
    """A compacted Kafka topic.

    Args:
        bootstrap_servers: ``"host:port"`` or a list of them.
        topic: the topic name; created compacted if missing and ``create_topic``.
        partitions: partition count for a topic kvlog creates.
        replication_factor: replication factor for a topic kvlog creates.
        topic_config: extra topic configs for a topic kvlog creates
            (e.g. ``{"min.insync.replicas": "2"}``).
        create_topic: create the topic if it does not exist.
        allow_non_compacted: accept a topic whose ``cleanup.policy`` is not
            ``compact``. Its records expire, so a rebuilt cache loses keys:
            only for topics you know to be complete.
        timeout: seconds to wait for the cluster when connecting and writing.
        kafka_config: settings passed to every kafka-python client as they are
            (security_protocol, sasl_*, ssl_*, client_id, ...).

    Raises:
        BrokerUnavailableError: no broker answered within ``timeout``.
        TopicConfigError: the topic is missing (and not created) or not compacted.
    """

    kind = "kafka"

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str,
        *,
        partitions: int = 1,
        replication_factor: int = 1,
        topic_config: Mapping[str, str] | None = None,
        create_topic: bool = True,
        allow_non_compacted: bool = False,
        timeout: float = 30.0,
        kafka_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty str")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.topic = topic
        self.bootstrap_servers = (
            bootstrap_servers if isinstance(bootstrap_servers, str) else ",".join(bootstrap_servers)
        )
        self.timeout = timeout
        self._kafka_config = dict(kafka_config or {})
        self._closed = False
        self._offsets_lock = threading.Lock()
        self._admin_lock = threading.Lock()  # the follower re-describes the topic (current_identity)
        self._producer: KafkaProducer | None = None
        self._producer_errors = _ProducerErrors(None)
        # Guards replacing the producer after a failed write (see _write_failed).
        self._producer_lock = threading.Lock()
        self._offsets_consumer: KafkaConsumer | None = None
        self._admin: KafkaAdminClient | None = None
        #: This process's writes in flight, which its readers do not compete with.
        self._read_hold = _ReadHold()
        try:
            self._admin = self._connect(
                KafkaAdminClient, request_timeout_ms=self._timeout_ms, bootstrap_timeout_ms=self._timeout_ms
            )
            self.cluster_id: str = self._admin.describe_cluster()["cluster_id"]
            topic_info = self._describe_topic()
            if topic_info is None:
                if not create_topic:
                    raise TopicConfigError(
                        f"topic {topic!r} does not exist at {self.bootstrap_servers}; "
                        "create it with cleanup.policy=compact or pass create_topic=True"
                    )
                topic_info = self._create_topic(partitions, replication_factor, topic_config or {})
            self.topic_id = str(topic_info["topic_id"])
            self._partitions = len(topic_info["partitions"])
            self.topic_configs = self._describe_configs()
            self._check_policy(allow_non_compacted)
            self._max_message_bytes = _retention_from(self.topic_configs, "max.message.bytes", 1048588)
            self.delete_retention_ms = _retention_from(self.topic_configs, "delete.retention.ms", 86400000)
            self._producer, self._producer_errors = self._new_producer()
            self._offsets_consumer = self._new_consumer()
        except BaseException:
            self.close()
            raise

    # -- connection helpers -------------------------------------------------

    @property
    def _timeout_ms(self) -> int:
        return max(1, int(self.timeout * 1000))

    def _unavailable(self, exc: BaseException | None = None) -> BrokerUnavailableError:
        detail = f": {exc}" if exc is not None and str(exc) else ""
        return BrokerUnavailableError(
            f"no Kafka broker answered at {self.bootstrap_servers} within {self.timeout:g}s{detail}"
        )

    def _connect(self, client: type, **settings: Any) -> Any:
        config = {
            "bootstrap_servers": self.bootstrap_servers,
            # kafka-python backs off reconnecting to a broker up to 30 s
            # (the Java client: 1 s), so clients came back that long after a
            # restarted cluster did. The user's kafka_config may say otherwise.
            "reconnect_backoff_max_ms": _RECONNECT_BACKOFF_MAX_MS,
            **self._kafka_config,
            **settings,
        }
        try:
            instance = client(**config)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc) from exc
        _shorten_startup_backoff(instance)
        return instance

    def _new_producer(self, bootstrap_timeout: float | None = None) -> tuple[KafkaProducer, _ProducerErrors]:
        settings: dict[str, Any] = {}
        if bootstrap_timeout is not None:
            # A replacement made while the brokers are down must not block for
            # kafka-python's default 30 s bootstrap wait.
            settings["bootstrap_timeout_ms"] = max(1, int(bootstrap_timeout * 1000))
        producer = self._connect(
            KafkaProducer,
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            max_request_size=max(1048576, self._max_message_bytes + 1024),
            max_block_ms=self._timeout_ms,
            request_timeout_ms=min(30000, self._timeout_ms),
            delivery_timeout_ms=max(self._timeout_ms, min(30000, self._timeout_ms)),
            **settings,
        )
        return producer, _ProducerErrors(producer)

    def _producer_for_write(self, timeout: float) -> tuple[KafkaProducer, _ProducerErrors]:
        with self._producer_lock:
            if self._producer is None:
                # The last one was discarded after a failed write.
                self._producer, self._producer_errors = self._new_producer(bootstrap_timeout=timeout)
            return self._producer, self._producer_errors

    def _write_failed(
        self,
        exc: kerr.KafkaError,
        producer: KafkaProducer,
        errors: _ProducerErrors,
        started: float,
        timeout: float,
    ) -> tuple[KVLogError, BaseException]:
        """Discard the producer of a failed write; return the error to raise and its cause.

        The producer goes in every case. After a batch expires that it had
        already sent, kafka-python 3.0 resets its idempotent producer id and
        never asks for a new one: every later write through it times out,
        also once the brokers are back. Discarding it also drops what it still
        holds, so a write that raised is not retried behind the caller's back.
        """
        with self._producer_lock:
            current = self._producer is producer
            if current:
                self._producer = None
        if current:
            _discard_producer(producer, timeout=0)
        cause: BaseException = exc
        partition = None
        if isinstance(exc, kerr.RetriableError) and not isinstance(exc, kerr.BrokerResponseError):
            # A timeout, or a request cancelled with its connection, hides
            # what the brokers answered to the retries before it.
            last = errors.last_since(started)
            if last is not None:
                partition, cause = last
        where = f"partition {partition}" if partition is not None else "the partition"
        if isinstance(cause, (kerr.NotEnoughReplicasError, kerr.NotEnoughReplicasAfterAppendError)):
            min_isr = _retention_from(self.topic_configs, "min.insync.replicas", 0)
            required = f"min.insync.replicas={min_isr}" if min_isr else "min.insync.replicas"
            return (
                NotEnoughReplicasError(
                    f"write to {self.describe()} was not acknowledged within {timeout:g}s: {where} has "
                    f"fewer in-sync replicas than {required}, so Kafka refuses acks=all writes "
                    f"(the broker answered {_error_text(cause)}); the write may or may not be in the log. "
                    "Writes succeed again once enough replicas are back in sync"
                ),
                cause,
            )
        if isinstance(cause, kerr.RetriableError) or not current:
            # (not current: another write's failure discarded the producer under this one.)
            return (
                BrokerUnavailableError(
                    f"no Kafka broker acknowledged the write to topic {self.topic!r} at "
                    f"{self.bootstrap_servers} within {timeout:g}s (last error: {_error_text(cause)}); "
                    "the write may or may not be in the log"
                ),
                cause,
            )
        return WriteError(f"write to {self.describe()} failed: {cause!r}"), cause

    def _new_consumer(self, **settings: Any) -> KafkaConsumer:
        consumer = self._connect(
            KafkaConsumer,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            # kvlog seeks explicitly; a position that the log no longer holds is
            # a reason to rebuild, never a reason to silently jump to the end.
            auto_offset_reset="none",
            request_timeout_ms=max(31000, self._timeout_ms),
            **settings,
        )
        _refresh_metadata_when_not_leader(consumer)
        return consumer

    def _describe_topic(self) -> dict[str, Any] | None:
        assert self._admin is not None
        for info in self._admin.describe_topics([self.topic]):
            if info["name"] != self.topic:
                continue
            if info["error_code"] == _UNKNOWN_TOPIC:
                return None
            if info["error_code"]:
                error = kerr.for_code(info["error_code"])
                raise TopicConfigError(f"topic {self.topic!r} cannot be described: {error.__name__}")
            return info  # type: ignore[no-any-return]
        return None

    def _create_topic(
        self, partitions: int, replication_factor: int, topic_config: Mapping[str, str]
    ) -> dict[str, Any]:
        assert self._admin is not None
        configs = {"cleanup.policy": "compact", **{k: str(v) for k, v in topic_config.items()}}
        try:
            self._admin.create_topics(
                {
                    self.topic: {
                        "num_partitions": partitions,
                        "replication_factor": replication_factor,
                        "configs": configs,
                    }
                },
                timeout_ms=self._timeout_ms,
                wait_for_metadata=True,
            )
            log.info("created compacted topic %r with %d partition(s)", self.topic, partitions)
        except kerr.TopicAlreadyExistsError:
            pass  # another instance created it first; its settings are checked below
        except kerr.KafkaTimeoutError as exc:
            raise self._unavailable(exc) from exc
        except kerr.KafkaError as exc:
            raise TopicConfigError(f"cannot create topic {self.topic!r}: {exc}") from exc
        # Brokers learn of a new topic from the controller a moment after it
        # exists, and the admin client may ask one that has not yet (on a
        # multi-broker cluster: "unknown topic" or LEADER_NOT_AVAILABLE).
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                info = self._describe_topic()
                if info is not None:
                    return info
                problem = TopicConfigError(f"topic {self.topic!r} was created but is not visible")
            except TopicConfigError as exc:
                problem = exc
            if time.monotonic() >= deadline:
                raise problem
            time.sleep(0.05)  # polling interval while the metadata propagates

    def _describe_configs(self) -> dict[str, Any]:
        """The topic's configuration, from a broker that knows the topic (waiting up to the timeout for one).

        A broker asked about a topic it has not heard of yet answers with no
        configuration at all, and no error: read as it is, that is the
        default ``cleanup.policy=delete``. On a cluster, a topic just created
        (by this store or another) is such a topic on some brokers for a
        moment. Every topic a broker knows has a configuration (the defaults
        at least), so an empty one is asked for again.
        """
        assert self._admin is not None
        deadline = time.monotonic() + self.timeout
        while True:
            result = self._admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, self.topic)], config_filter="all"
            )
            configs = dict(result["topic"].get(self.topic) or {})
            if configs:
                return configs
            if time.monotonic() >= deadline:
                raise TopicConfigError(
                    f"no broker at {self.bootstrap_servers} reported the configuration of topic "
                    f"{self.topic!r} within {self.timeout:g}s"
                )
            time.sleep(0.05)  # polling interval while the metadata propagates

    def _check_policy(self, allow_non_compacted: bool) -> None:
        entry = self.topic_configs.get("cleanup.policy", {"value": "delete"})
        policy = entry["value"] if isinstance(entry, Mapping) else str(entry)
        policies = {p.strip() for p in policy.split(",")}
        if policies == {"compact"} or allow_non_compacted:
            return
        raise TopicConfigError(
            f"topic {self.topic!r} has cleanup.policy={policy}; kvlog needs cleanup.policy=compact "
            "(records that expire by retention would vanish from a rebuilt cache). Change it with "
            f"`kafka-configs.sh --alter --entity-type topics --entity-name {self.topic} "
            "--add-config cleanup.policy=compact`, or pass allow_non_compacted=True if you accept that"
        )

    # -- the Log interface --------------------------------------------------

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def max_record_bytes(self) -> int:
        return self._max_message_bytes - _BATCH_OVERHEAD

    @property
    def tombstone_retention_seconds(self) -> float:
        return self.delete_retention_ms / 1000.0

    def identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cluster_id": self.cluster_id,
            "topic": self.topic,
            "topic_id": self.topic_id,
            "partitions": self._partitions,
        }

    def current_identity(self) -> dict[str, Any]:
        """Describe the topic again (see :meth:`Log.current_identity`); adopt it if it was recreated.

        Raises:
            BrokerUnavailableError: the broker did not answer.
            TopicConfigError: the topic no longer exists.
        """
        self._check_open()
        with self._admin_lock:
            try:
                info = self._describe_topic()
            except _UNREACHABLE as exc:
                raise self._unavailable(exc) from exc
        if info is None:
            raise TopicConfigError(f"topic {self.topic!r} no longer exists at {self.bootstrap_servers}")
        topic_id, partitions = str(info["topic_id"]), len(info["partitions"])
        if topic_id != self.topic_id:
            # Another topic under the same name: nothing of the old one
            # carries over, so its partition count is simply the new one.
            log.warning(
                "topic %r was deleted and created again (topic id %s -> %s)",
                self.topic,
                self.topic_id,
                topic_id,
            )
            self.topic_id, self._partitions = topic_id, partitions
        return {**self.identity(), "partitions": partitions}

    def partition_for(self, key: bytes) -> int:
        """The partition kvlog writes ``key`` to.

        Kafka's default partitioner (murmur2 of the key, modulo the partition
        count, as the Java client and kafka-python compute it), over the
        partitions the topic had when this log was opened: a store never
        writes into a partition it does not read, and a key's records stay in
        one partition when partitions are added (which kvlog then refuses, see
        :func:`~kvlog.log.partitions_changed_error`).
        """
        partitions = self._partitions
        if partitions == 1:
            return 0
        return int(murmur2(key) & 0x7FFFFFFF) % partitions

    def describe(self) -> str:
        return f"kafka topic {self.topic!r} at {self.bootstrap_servers}"

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.describe()} is closed")

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """While held, this log's readers in this process leave their sockets unread (see :class:`_ReadHold`)."""
        return self._read_hold.writing()

    def append(self, records: Sequence[tuple[bytes, bytes | None]], timeout: float) -> list[tuple[int, int]]:
        self._check_open()
        limit = self.max_record_bytes
        oversize = oversize_record(records, limit)
        if oversize is not None:
            key, size = oversize
            raise RecordTooLargeError(
                f"record for key {key[:40]!r} is {size} bytes; topic {self.topic!r} accepts at most "
                f"{limit} (max.message.bytes={self._max_message_bytes})"
            )
        started = time.monotonic()
        deadline = started + timeout
        producer, errors = self._producer_for_write(timeout)
        try:
            # With linger_ms=0 the sender ships each batch as soon as it can, so
            # waiting on the futures is enough; flush() would add a pass over
            # every in-flight batch of the producer (about 1 ms a write here).
            # An explicit partition: the producer's own partitioner would follow
            # partitions added to the topic (see partition_for).
            send, partition_for = producer.send, self.partition_for
            futures = [
                send(self.topic, key=key, value=value, partition=partition_for(key)) for key, value in records
            ]
            metadata = [f.get(timeout=max(0.001, deadline - time.monotonic())) for f in futures]
        except (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError) as exc:
            raise RecordTooLargeError(f"topic {self.topic!r} refused a record as too large: {exc}") from exc
        except kerr.KafkaError as exc:
            error, cause = self._write_failed(exc, producer, errors, started, timeout)
            raise error from cause
        return [(m.partition, m.offset) for m in metadata]

    def _tps(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in range(self._partitions)]

    def _offsets(self, which: str, timeout: float | None = None) -> dict[int, int]:
        self._check_open()
        timeout_ms = (
            self._timeout_ms if timeout is None else max(1, min(self._timeout_ms, int(timeout * 1000)))
        )
        with self._offsets_lock:
            consumer = self._offsets_consumer
            try:
                if consumer is None:
                    # The last one was discarded after a failed query.
                    consumer = self._new_consumer(bootstrap_timeout_ms=timeout_ms)
                    if self._closed:  # close() ran meanwhile and found no consumer to close
                        _quietly(consumer.close, autocommit=False)
                        self._check_open()
                    self._offsets_consumer = consumer
                offsets = getattr(consumer, which)(self._tps(), timeout_ms=timeout_ms)
            except BrokerUnavailableError:
                raise
            except kerr.KafkaError as exc:
                # Whatever state made this query fail (metadata naming a broker
                # that no longer leads, a connection kafka-python still
                # believes in), a new consumer starts from none of it: it
                # bootstraps and asks the cluster who leads now.
                self._offsets_consumer = None
                if consumer is not None:
                    _quietly(consumer.close, autocommit=False)
                if isinstance(exc, _UNREACHABLE):
                    raise self._unavailable(exc) from exc
                raise
        return {tp.partition: offset for tp, offset in offsets.items()}

    def begin_offsets(self) -> dict[int, int]:
        return self._offsets("beginning_offsets")

    def end_offsets(self, timeout: float | None = None) -> dict[int, int]:
        return self._offsets("end_offsets", timeout)

    def open_reader(self, positions: Mapping[int, int]) -> KafkaReader:
        self._check_open()
        return KafkaReader(self, positions)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Close in reverse order of creation; a failure to close one client
        # must not leak the others' sockets and threads.
        if self._offsets_consumer is not None:
            _quietly(self._offsets_consumer.close, autocommit=False)
        if self._producer is not None:
            _discard_producer(self._producer, timeout=min(5.0, self.timeout))
        if self._admin is not None:
            _quietly(self._admin.close)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._partitions} partition(s)"
        return f"<KafkaLog {self.describe()}, {state}>"


def _unreadable(kafka_log: KafkaLog, exc: kerr.KafkaError) -> BrokerUnavailableError:
    """What a reader raises for a retriable read failure: the brokers cannot serve it for now."""
    return BrokerUnavailableError(f"cannot read {kafka_log.describe()} for now: {_error_text(exc)}")


def _error_text(exc: BaseException) -> str:
    """``Name: message`` of a kafka-python error, without its ``[Error n]`` prefix or a ``None`` message."""
    message = exc.args[0] if exc.args else None
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _ProducerErrors:
    """The last error a producer's brokers answered, which kafka-python retries without a word.

    A write that times out reports only the timeout ("Expiring 1 record(s)
    ...: 5000 ms has passed since batch creation"); what the brokers answered
    to the retries (NOT_ENOUGH_REPLICAS, NOT_LEADER_OR_FOLLOWER, a lost
    connection) goes to kafka-python's log only. This wraps the sender's one
    decision point for failed batches so that kvlog's error can name the cause.
    Where a kafka-python release has no such method, errors name the timeout only.
    """

    def __init__(self, producer: KafkaProducer | None) -> None:
        self._last: tuple[float, int, BaseException] | None = None
        # The last error that a broker answered (it has an error code), kept
        # apart: a request cancelled or a connection lost after the broker
        # answered NOT_ENOUGH_REPLICAS says less about why the write failed.
        self._last_answer: tuple[float, int, BaseException] | None = None
        sender = getattr(producer, "_sender", None)
        dispatch = getattr(sender, "_dispatch_error", None)
        if sender is None or dispatch is None:
            return

        def dispatch_error(batch: Any, exception: Any, partition_response: Any) -> Any:
            # Runs in the sender thread; one tuple assignment is atomic.
            if isinstance(exception, BaseException) and not isinstance(exception, kerr.KafkaTimeoutError):
                entry = (time.monotonic(), batch.topic_partition.partition, exception)
                self._last = entry
                if isinstance(exception, kerr.BrokerResponseError):
                    self._last_answer = entry
            return dispatch(batch, exception, partition_response)

        sender._dispatch_error = dispatch_error

    def last_since(self, started: float) -> tuple[int, BaseException] | None:
        """``(partition, error)`` of the last error after ``started`` (monotonic), if any.

        A broker's answer is preferred to a client-side failure (a cancelled
        request, a lost connection) that came after it.
        """
        for last in (self._last_answer, self._last):
            if last is not None and last[0] >= started:
                return last[1], last[2]
        return None


def _discard_producer(producer: KafkaProducer, timeout: float) -> None:
    """Close a producer, waiting up to ``timeout`` s for what it holds and dropping the rest."""
    try:
        producer.close(timeout=timeout)
        return
    except kerr.KafkaTimeoutError:
        pass
    except Exception:
        log.debug("error while closing a Kafka producer", exc_info=True)
        return
    # kafka-python 3.0's close() flushes first and raises when records are still
    # pending, before it stops its sender thread, which would then retry them
    # for ever. Stop it the way close() would have: abort what is pending.
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(5.0)
    _quietly(producer.close, timeout=0)  # nothing pending now: completes the close


def _quietly(close: Any, **kwargs: Any) -> None:
    try:
        close(**kwargs)
    except Exception:
        log.debug("error while closing a Kafka client", exc_info=True)
