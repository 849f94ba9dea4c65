"""Workload 1, "point reads": look up keys one at a time and get the decoded value.

Every subject holds the same ``ctx.keys`` keys with the same msgpack values
(~100 bytes, the topic of :func:`benchmarks.data.topic_for`) and reads the same
pre-generated list of keys, drawn uniformly or from a Zipf distribution
(s=1.1), by 1 thread or by 2 threads that each take half of the list. Every
read ends with the decoded Python value (a dict), so a store of bytes pays for
``msgpack.unpackb`` like kvlog does; all subjects decode with kvlog's own
options (``raw=False, strict_map_key=True``).

Subjects (the baseline is "raw py-lmdb", the floor of kvlog's design):

kvlog
    ``KVLog(dir, bootstrap_servers=..., topic=...)`` that replayed the topic on
    open and keeps following it (its replayer thread stays alive, as a real
    reader's does); ``kv[key]``.
raw py-lmdb
    An LMDB environment opened with the flags kvlog's cache uses, one read
    transaction + ``get`` + ``unpackb`` per read.
dict
    A Python dict of key -> decoded value: the in-memory ceiling (what a
    hand-rolled consumer or a ktables-like table gives you).
diskcache, sqlitedict
    The embedded on-disk stores a Python user would otherwise reach for.
Redis GET (loopback)
    A private ``redis-server`` on 127.0.0.1, one redis-py client per thread.

Each of ``ctx.runs`` runs reads the whole key list (``reads`` lookups) in
:data:`SAMPLES_PER_RUN` short samples, after one warm-up sample per subject
and case. A sample is a slice of the list split evenly over the threads; the
threads wait on a barrier and the clock runs from its release until the last
thread finished its share (timed in that thread, so waking the joining thread
is not counted). kvlog and raw py-lmdb are loaded side by side and take turns
sample by sample, on the same slice, the order reversed every round; their
ratio is the median of the per-sample ratios. Short, interleaved samples are
what makes that ratio repeatable on a machine that does other work: a busy
moment of a few milliseconds hits one pair of samples, which the median
discards, instead of a whole long sample of one subject. The garbage
collector is off inside the samples of every subject (none of them makes
reference cycles; a collection would land on whichever sample crossed its
threshold) and runs between runs.
"""

from __future__ import annotations

import gc
import inspect
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack

from benchmarks.harness import (
    Context,
    Row,
    Skipped,
    gc_paused,
    more_rounds,
    turns,
    uniform_indices,
    zipf_indices,
)

__all__ = ["SUBJECTS", "WORKLOAD", "run"]

WORKLOAD = "point reads"
BASELINE = "raw py-lmdb"
UNIT = "reads/s"
VALUE_SIZE = 100
ZIPF_S = 1.1
THREADS = (1, 2)
#: Samples per run: each run's ``ctx.reads`` lookups are read in this many
#: slices, one sample each (about 10-30 ms for kvlog at the default sizes).
SAMPLES_PER_RUN = 20
#: The precision wanted of kvlog's median ratio to raw py-lmdb (half its 95%
#: confidence interval, relative): while it is not reached, the pair reads
#: more runs, up to :data:`MAX_RUNS_FACTOR` times ``ctx.runs`` in all.
PRECISION = 0.015
MAX_RUNS_FACTOR = 4

#: Every subject, in the order they are measured.
SUBJECTS = ("kvlog", "raw py-lmdb", "dict", "diskcache", "sqlitedict", "Redis GET (loopback)")

#: Subjects loaded together and sampled in turns (kvlog and its baseline, so
#: their ratio does not drift with the machine's load); one group at a time is
#: held in memory.
_GROUPS = (("kvlog", "raw py-lmdb"), ("dict",), ("diskcache",), ("sqlitedict",), ("Redis GET (loopback)",))

#: Subjects slow enough that a sample of ``ctx.reads`` lookups would dominate
#: the run: they read only the first ``ctx.reads // divisor`` keys of the same
#: list (a prefix of a random draw has the same distribution). Said in the note.
#: On a 2-core machine: diskcache ~100k reads/s, sqlitedict and a loopback
#: Redis ~15k reads/s, against ~400k for raw py-lmdb.
_READS_DIVISOR = {"diskcache": 4, "sqlitedict": 20, "Redis GET (loopback)": 20}

#: A Reader is made in the thread that will use it (before the barrier), given
#: the thread's index; it reads every key of the list it is given.
Reader = Callable[[list[Any]], None]
ReaderFactory = Callable[[int], Reader]


def _unpack(data: bytes) -> Any:
    # kvlog's codec decodes with these options; every subject does the same.
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


@dataclass
class _Subject:
    name: str
    reader: ReaderFactory
    #: Key lists of the subject's key type: str keys as a user of its API would
    #: pass them, or UTF-8 bytes where the library wants bytes.
    key_of: Callable[[str], Any]
    note: str = ""
    check: Callable[[Any], Any] | None = None  # key -> decoded value, for a sanity check


# -- timing -----------------------------------------------------------------


def _timed_sample(factory: ReaderFactory, keys: list[Any], threads: int) -> float:
    """Read ``keys`` split over ``threads`` threads; return reads per second.

    The clock starts when the barrier releases the threads and stops when the
    last of them finished its share, as each thread saw it: not when the
    caller's ``join`` returned, which adds the time to wake the caller.
    """
    per_thread = len(keys) // threads
    chunks = [keys[t * per_thread : (t + 1) * per_thread] for t in range(threads)]
    total = per_thread * threads
    started: list[float] = []
    finished = [0.0] * threads
    errors: list[BaseException] = []

    def release() -> None:  # run by the last thread to arrive, just before all are released
        started.append(time.perf_counter())

    barrier = threading.Barrier(threads, action=release, timeout=120)

    def work(index: int) -> None:
        try:
            read = factory(index)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread below)
            errors.append(exc)
            barrier.abort()
            return
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        try:
            read(chunks[index])
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread below)
            errors.append(exc)
        finished[index] = time.perf_counter()

    workers = [threading.Thread(target=work, args=(t,), name=f"reads-{t}") for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    if not started:
        raise RuntimeError("the reader threads never started together")
    return total / (max(finished) - started[0])


# -- subjects -----------------------------------------------------------------
#
# Each is a context manager that loads the data (outside any timing), yields a
# _Subject and closes everything it opened on exit.


class _Data:
    """What every subject loads: key strings, msgpack bytes, decoded values."""

    def __init__(self, ctx: Context) -> None:
        from benchmarks.data import encoded_values

        self.ctx = ctx
        self.keys = [ctx.key(i) for i in range(ctx.keys)]
        self.values = encoded_values(ctx, VALUE_SIZE)

    def pairs_bytes(self) -> Iterator[tuple[bytes, bytes]]:
        for key, value in zip(self.keys, self.values, strict=True):
            yield key.encode(), value


def _kvlog(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    from benchmarks.data import topic_for
    from kvlog import KVLog

    with _loading("the topic") as done:
        topic = topic_for(ctx, VALUE_SIZE)  # filled on first use, then shared by every workload
        done(topic)
    with _loading("kvlog") as done:
        kv = KVLog(
            ctx.subdir("reads-kvlog"),
            bootstrap_servers=ctx.bootstrap_servers,
            topic=topic,
            create_topic=False,
        )
        stack.callback(kv.close)
        done(f"replayed {kv.open_replay['records']:,} records")
    if len(kv) != ctx.keys:
        raise RuntimeError(f"kvlog holds {len(kv):,} keys after replay, expected {ctx.keys:,}")

    def reader(_: int) -> Reader:
        def read(keys: list[str]) -> None:
            for k in keys:
                kv[k]

        return read

    return _Subject(
        "kvlog",
        reader,
        key_of=str,  # kvlog's API takes str keys (key_type=str) and encodes them itself
        note="follow=True: the replayer thread keeps following the topic while reads run",
        check=lambda k: kv[k],
    )


def _lmdb(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    import lmdb

    path = ctx.subdir("reads-lmdb")
    payload = sum(len(k) + len(v) for k, v in zip(data.keys, data.values, strict=True))
    with _loading("raw py-lmdb") as done:
        # The flags of kvlog's Cache (kvlog/cache.py), so the only difference is kvlog itself.
        env = lmdb.open(
            str(path),
            map_size=max(1 << 30, 4 * (payload + 64 * ctx.keys)),
            max_dbs=4,
            metasync=False,
            readahead=False,
            max_readers=512,
        )
        stack.callback(env.close)
        db = env.open_db(b"data")
        pairs = data.pairs_bytes()
        while True:  # a few write transactions of up to 100k keys, in key order
            batch = [pair for _, pair in zip(range(100_000), pairs, strict=False)]
            if not batch:
                break
            with env.begin(write=True, db=db) as txn:
                txn.cursor().putmulti(batch, append=True)
        done()

    def get(k: str) -> Any:
        with env.begin(db=db) as txn:
            return _unpack(txn.get(k.encode()) or b"\xc0")  # absent reads as None

    def reader(_: int) -> Reader:
        begin = env.begin
        unpackb = msgpack.unpackb

        # Exactly the LMDB and msgpack calls kvlog makes for kv[k], in their
        # fastest form (no context manager, positional db), inline: the floor.
        def read(keys: list[str]) -> None:
            for k in keys:
                txn = begin(db)
                value = txn.get(k.encode())
                txn.abort()
                unpackb(value, raw=False, strict_map_key=True)

        return read

    return _Subject(
        "raw py-lmdb",
        reader,
        key_of=str,  # the same str keys kvlog gets; the read encodes them, as kvlog does
        note="per read, inline: key.encode(), a read txn (begin, get, abort) and unpackb; kvlog's Cache flags",
        check=get,
    )


def _dict(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    with _loading("dict") as done:
        table = {key: _unpack(value) for key, value in zip(data.keys, data.values, strict=True)}
        stack.callback(table.clear)
        done()

    def reader(_: int) -> Reader:
        def read(keys: list[str]) -> None:
            for k in keys:
                table[k]

        return read

    return _Subject(
        "dict",
        reader,
        key_of=str,
        note="decoded values held in memory: the ceiling (a hand-rolled consumer or ktables)",
        check=table.__getitem__,
    )


def _diskcache(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    try:
        import diskcache
    except ImportError as exc:
        raise Skipped("the diskcache package is not installed") from exc
    with _loading("diskcache") as done:
        # size_limit raised so that no key is evicted whatever ctx.keys is.
        cache = diskcache.Cache(str(ctx.subdir("reads-diskcache")), size_limit=1 << 40)
        stack.callback(cache.close)
        keys, values = data.keys, data.values
        for start in range(0, len(keys), 10_000):
            with cache.transact():
                for i in range(start, min(len(keys), start + 10_000)):
                    cache[keys[i]] = values[i]
        done()

    def reader(_: int) -> Reader:
        # diskcache keeps one SQLite connection per thread: open it here,
        # before the barrier, not inside the timed loop.
        cache.get(data.keys[0])

        def read(keys: list[str]) -> None:
            for k in keys:
                _unpack(cache[k])

        return read

    return _Subject(
        "diskcache",
        reader,
        key_of=str,  # diskcache takes str keys as they are (a TEXT key column)
        note="diskcache.Cache of msgpack bytes; one SQLite connection per thread",
        check=lambda k: _unpack(cache[k]),
    )


def _sqlitedict(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    try:
        from sqlitedict import SqliteDict
    except ImportError as exc:
        raise Skipped("the sqlitedict package is not installed") from exc

    def identity(x: Any) -> Any:
        return x

    options: dict[str, Any] = {"encode": identity, "decode": identity}
    if "outer_stack" in inspect.signature(SqliteDict.__init__).parameters:
        options["outer_stack"] = False  # no stack capture per request
    with _loading("sqlitedict") as done:
        table = SqliteDict(str(ctx.subdir("reads-sqlitedict") / "data.sqlite"), **options)
        stack.callback(table.close)
        keys, values = data.keys, data.values
        for start in range(0, len(keys), 10_000):
            table.update((keys[i], values[i]) for i in range(start, min(len(keys), start + 10_000)))
            table.commit()
        done()

    def reader(_: int) -> Reader:
        def read(keys: list[str]) -> None:
            for k in keys:
                _unpack(table[k])

        return read

    return _Subject(
        "sqlitedict",
        reader,
        key_of=str,  # sqlitedict keys are str (a TEXT key column)
        note=(
            "msgpack bytes (identity encode/decode, not pickle); sqlitedict serializes every access "
            "through its one connection thread, so 2 threads share it"
        ),
        check=lambda k: _unpack(table[k]),
    )


def _redis(ctx: Context, data: _Data, stack: ExitStack) -> _Subject:
    from benchmarks.redis_server import RedisServer

    with _loading("Redis GET (loopback)") as done:
        server = stack.enter_context(RedisServer(install=ctx.install))
        loader = server.client()
        keys, values = data.keys, data.values
        for start in range(0, len(keys), 10_000):
            pipe = loader.pipeline(transaction=False)
            for i in range(start, min(len(keys), start + 10_000)):
                pipe.set(keys[i], values[i])
            pipe.execute()
        if loader.dbsize() != ctx.keys:
            raise RuntimeError(f"redis holds {loader.dbsize():,} keys, expected {ctx.keys:,}")
        done(f"redis-server {server.version}, RSS {server.rss_bytes() / 1e6:.0f} MB")
    clients = [server.client() for _ in range(max(THREADS))]
    for client in clients:
        client.ping()  # connect now, not in the timed loop

    def reader(index: int) -> Reader:
        client = clients[index]  # one client (and so one connection) per thread

        def read(keys: list[str]) -> None:
            get = client.get
            for k in keys:
                _unpack(get(k))

        return read

    return _Subject(
        "Redis GET (loopback)",
        reader,
        key_of=str,  # redis-py takes str keys and encodes them as UTF-8
        note=f"private redis-server {server.version} on 127.0.0.1, redis-py {_version('redis')}, "
        "one client per thread",
        check=lambda k: _unpack(loader.get(k)),
    )


_LOADERS: dict[str, Callable[[Context, _Data, ExitStack], _Subject]] = {
    "kvlog": _kvlog,
    "raw py-lmdb": _lmdb,
    "dict": _dict,
    "diskcache": _diskcache,
    "sqlitedict": _sqlitedict,
    "Redis GET (loopback)": _redis,
}


# -- helpers ------------------------------------------------------------------


@contextmanager
def _loading(name: str) -> Iterator[Callable[..., None]]:
    """Time a subject's load and print it: ``with _loading(name) as done: ...; done(detail)``."""
    started = time.perf_counter()
    detail = [""]

    def done(text: str = "") -> None:
        detail[0] = text

    yield done
    extra = f" ({detail[0]})" if detail[0] else ""
    print(f"  {WORKLOAD}: loaded {name} in {time.perf_counter() - started:.1f} s{extra}", flush=True)


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _thread_label(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _sanity_check(subject: _Subject, ctx: Context, data: _Data) -> None:
    if subject.check is None:
        return
    for i in {0, ctx.keys // 2, ctx.keys - 1}:
        got = subject.check(subject.key_of(data.keys[i]))
        expected = _unpack(data.values[i])
        if got != expected:
            raise RuntimeError(f"{subject.name} returned {got!r} for {data.keys[i]!r}, expected {expected!r}")


# -- the workload ---------------------------------------------------------------


def run(ctx: Context, subjects: Iterable[str] | None = None) -> list[Row]:
    """Measure every subject (or only ``subjects``) in the four cases; return one row each."""
    wanted = list(SUBJECTS if subjects is None else subjects)
    unknown = [name for name in wanted if name not in _LOADERS]
    if unknown:
        raise ValueError(f"unknown subjects {unknown}; choose from {list(SUBJECTS)}")
    data = _Data(ctx)
    # The same index lists for every subject.
    distributions = {
        "uniform": uniform_indices(ctx.keys, ctx.reads, seed=ctx.seed),
        "zipfian": zipf_indices(ctx.keys, ctx.reads, s=ZIPF_S, seed=ctx.seed),
    }
    rows: list[Row] = []
    for group in _GROUPS:
        names = [name for name in group if name in wanted]
        if names:
            rows += _run_group(ctx, data, distributions, names)
    order = {name: n for n, name in enumerate(SUBJECTS)}
    rows.sort(key=lambda row: order[row.subject])  # stable: cases stay in their order
    return rows


class _Slices:
    """Consecutive slices of ``size`` keys of a list, wrapping around it: ``slices[i]`` is the i-th."""

    def __init__(self, keys: list[Any], size: int) -> None:
        self.size = size
        self.n = len(keys)
        # Long enough that every slice is one plain slice of it, whatever its start.
        self.keys = keys * (1 + -(-size // self.n))

    def __getitem__(self, index: int) -> list[Any]:
        start = (index * self.size) % self.n
        return self.keys[start : start + self.size]


def _ratios(samples: dict[str, list[float]], name: str, baseline: str) -> list[float]:
    """Per-round ratios of ``name``'s rates to ``baseline``'s (both sampled in every round)."""
    return [value / base for value, base in zip(samples[name], samples[baseline], strict=True)]


def _run_group(ctx: Context, data: _Data, distributions: dict[str, list[int]], names: list[str]) -> list[Row]:
    """Load the subjects of one group, then sample them in turns, case by case."""
    started = time.perf_counter()
    rows: list[Row] = []
    with ExitStack() as stack:
        subjects: dict[str, _Subject] = {}
        for name in names:
            try:
                subjects[name] = _LOADERS[name](ctx, data, stack)
                _sanity_check(subjects[name], ctx, data)
            except Skipped as exc:
                ctx.skip(WORKLOAD, name, str(exc))
            except Exception as exc:  # noqa: BLE001  (one broken subject must not end the whole run)
                ctx.skip(WORKLOAD, name, f"failed: {type(exc).__name__}: {exc}")
        reads = {name: max(ctx.reads // _READS_DIVISOR.get(name, 1), max(THREADS)) for name in subjects}
        # Everything loaded so far lives until the group ends: frozen, the
        # collections between runs do not walk it again and again.
        gc.collect()
        gc.freeze()
        stack.callback(gc.unfreeze)
        judged = BASELINE in subjects and "kvlog" in subjects
        for dist, indices in distributions.items():
            for threads in THREADS:
                case = f"{dist}, {_thread_label(threads)}"
                slices = {}
                for name, subject in subjects.items():
                    size = max(reads[name] // SAMPLES_PER_RUN, threads)
                    keys = [subject.key_of(data.keys[i]) for i in indices[: reads[name]]]
                    slices[name] = _Slices(keys, size)
                samples: dict[str, list[float]] = {name: [] for name in subjects}
                rounds: dict[str, list[int]] = {name: [] for name in subjects}
                gc.freeze()  # the key lists too: a collection between runs need not walk them
                runs = ctx.runs
                # Round 0 warms every subject up (its first sample in this
                # case reads keys its caches have not seen); it is dropped.
                # The rounds of one run read the key list once, in slices.
                with gc_paused():
                    round_ = 0
                    while True:
                        if round_ > 1 and round_ % SAMPLES_PER_RUN == 1:
                            gc.collect()  # between runs, never inside a sample
                        for name in turns(list(subjects), round_):
                            try:
                                rate = _timed_sample(subjects[name].reader, slices[name][round_], threads)
                            except Exception as exc:  # noqa: BLE001  (as above)
                                ctx.skip(WORKLOAD, name, f"failed in {case}: {type(exc).__name__}: {exc}")
                                del subjects[name]
                                rows = [row for row in rows if row.subject != name]
                                judged = judged and name not in (BASELINE, "kvlog")
                                continue
                            if round_:
                                samples[name].append(rate)
                                rounds[name].append(round_)
                        if round_ == runs * SAMPLES_PER_RUN:
                            # The planned runs are done: one more while kvlog's
                            # ratio to its baseline is not precise enough yet.
                            if not judged or not more_rounds(
                                _ratios(samples, "kvlog", BASELINE),
                                PRECISION,
                                runs,
                                MAX_RUNS_FACTOR * ctx.runs,
                            ):
                                break
                            runs += 1
                        round_ += 1
                if runs > ctx.runs:
                    print(
                        f"  {WORKLOAD}: {case}: {runs} runs (the ratio needed more than {ctx.runs})",
                        flush=True,
                    )
                for name, subject in subjects.items():
                    note = subject.note
                    divisor = _READS_DIVISOR.get(name, 1)
                    if divisor > 1:
                        note += f"; {reads[name]:,} reads per run (1/{divisor} of ctx.reads: a slow subject)"
                    row = Row(
                        workload=WORKLOAD,
                        case=case,
                        subject=name,
                        unit=UNIT,
                        samples=samples[name],
                        higher_is_better=True,
                        baseline=None if name == BASELINE else BASELINE,
                        note=note,
                        rounds=rounds[name],
                    )
                    rows.append(row)
                    print(
                        f"  {WORKLOAD}: {name} {case}: {row.median:,.0f} {UNIT} "
                        f"(median of {len(row.samples)} samples of {slices[name].size:,} reads)",
                        flush=True,
                    )
                del slices
    print(
        f"  {WORKLOAD}: {' and '.join(names)} took {time.perf_counter() - started:.1f} s in all", flush=True
    )
    return rows
