"""Child processes for the cache and disk fault tests (``tests/test_faults_cache.py``).

Run as a script: ``python tests/_fault_child.py MODE PATH [options]``. Every
mode prints one line per event on stdout, flushed at once, so that the parent
knows what happened before a kill:

``replay``
    Opens ``KVLog(PATH, follow=False)`` with the cache deleted beforehand by
    the parent (``--how open``: a cold replay) or on a warm cache that it
    re-warms (``--how rewarm``), with a hook in the cache's LMDB environment
    that SIGKILLs this process at one point of the replay given by
    ``--kill-at KIND:N``: ``op:N`` right after the N-th put or delete of a
    record, ``commit:N`` inside the N-th write transaction just before it
    commits (every record put, the checkpoint not yet committed), and
    ``committed:N`` right after the N-th commit. Write transactions are
    counted from the start of the replay (the reset of a re-warm is one, the
    "current" mark at the end another). It prints ``dying KIND N`` just before
    the kill; ``--kill-at none`` runs to the end and prints ``total ops=X
    txns=Y``. ``--batch B`` makes the replayer commit every B records.
``open``
    Opens ``KVLog(PATH, follow=False)``, then prints one JSON line: how the
    open went (``open_replay``, ``rebuilds``, where a damaged cache went) and
    a digest of the cache's raw contents. With ``--read KEY`` it first reads
    that key (a damaged cache raises CacheError), with ``--rewarm`` it then
    re-warms the store, and it reports both.
``holder``
    Opens the LMDB environment at PATH with ``--max-readers N`` (the first
    opener sizes the reader table), prints ``ready PID`` and waits.
``reader``
    Opens the LMDB environment at PATH, begins a read transaction (taking a
    reader slot), prints ``reading PID`` and waits to be killed.
``full-disk``
    Runs :func:`full_disk` with a file-size limit (``RLIMIT_FSIZE``) as the
    full disk, where no tmpfs can be mounted, and prints its JSON report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def emit(line: str) -> None:
    # One write() per line, flushed at once: what the parent reads was said before the kill.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def digest(items: Iterable[tuple[bytes, bytes]]) -> str:
    """A digest of raw ``(key, value)`` pairs in key order (the parent computes it from its model)."""
    h = hashlib.sha256()
    for key, value in sorted(items):
        h.update(len(key).to_bytes(4, "big") + key + len(value).to_bytes(4, "big") + value)
    return h.hexdigest()


# -- SIGKILL at a chosen point of the replay ----------------------------------------------


class KillPlan:
    """Counts the replay's record writes and commits; SIGKILLs this process at the chosen one."""

    def __init__(self, spec: str) -> None:
        kind, _, n = spec.partition(":")
        self.kind, self.n = kind, int(n or 0)
        self.ops = self.txns = 0
        self.armed = False

    def _die(self, what: str, n: int) -> None:
        emit(f"dying {what} {n}")
        os.kill(os.getpid(), signal.SIGKILL)

    def op(self) -> None:
        if self.armed:
            self.ops += 1
            if self.kind == "op" and self.ops == self.n:
                self._die("op", self.ops)

    def before_commit(self) -> None:
        if self.armed:
            self.txns += 1
            if self.kind == "commit" and self.txns == self.n:
                self._die("commit", self.txns)

    def after_commit(self) -> None:
        if self.armed and self.kind == "committed" and self.txns == self.n:
            self._die("committed", self.txns)


class _Cursor:
    def __init__(self, cursor: Any, plan: KillPlan) -> None:
        self._cursor, self._plan = cursor, plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def put(self, *args: Any, **kwargs: Any) -> Any:
        result = self._cursor.put(*args, **kwargs)
        self._plan.op()
        return result

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        result = self._cursor.delete(*args, **kwargs)
        self._plan.op()
        return result

    def putmulti(self, items: Iterable[Any], *args: Any, **kwargs: Any) -> Any:
        def counted() -> Iterator[Any]:
            for item in items:
                yield item
                self._plan.op()  # the item before this one is in the transaction now

        return self._cursor.putmulti(counted(), *args, **kwargs)


class _WriteTxn:
    """A write transaction that reports its record writes and its commit to the plan."""

    def __init__(self, txn: Any, plan: KillPlan, data_db: Callable[[], Any]) -> None:
        self._txn, self._plan, self._data_db = txn, plan, data_db

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def __enter__(self) -> _WriteTxn:
        self._txn.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        if exc_type is None:
            self._plan.before_commit()
        result = self._txn.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self._plan.after_commit()
        return result

    def commit(self) -> None:
        self._plan.before_commit()
        self._txn.commit()
        self._plan.after_commit()

    def cursor(self, *args: Any, **kwargs: Any) -> _Cursor:
        return _Cursor(self._txn.cursor(*args, **kwargs), self._plan)

    def _counted(self, method: str, args: Any, kwargs: Any) -> Any:
        result = getattr(self._txn, method)(*args, **kwargs)
        if kwargs.get("db") is self._data_db():
            self._plan.op()
        return result

    def put(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("put", args, kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("delete", args, kwargs)

    def replace(self, *args: Any, **kwargs: Any) -> Any:
        return self._counted("replace", args, kwargs)


class _Env:
    def __init__(self, env: Any, plan: KillPlan, cache: Any) -> None:
        self._env, self._plan, self._cache = env, plan, cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        txn = self._env.begin(*args, **kwargs)
        if kwargs.get("write"):
            return _WriteTxn(txn, self._plan, lambda: self._cache._data)
        return txn


def install_kill_hook(plan: KillPlan, batch: int) -> None:
    """Wrap the LMDB environment of every cache opened from now on (in this process only)."""
    import kvlog.replay
    from kvlog.cache import Cache

    original = Cache.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._env = _Env(self._env, plan, self)

    Cache.__init__ = init  # type: ignore[method-assign]
    # Small transactions, so that a replay of a few hundred records commits many times.
    kvlog.replay.BATCH_RECORDS = batch
    defaults = getattr(kvlog.replay.Replayer.step, "__kwdefaults__", None)
    if defaults and "max_records" in defaults:
        defaults["max_records"] = batch


def replay(args: argparse.Namespace) -> None:
    from kvlog import KVLog

    plan = KillPlan(args.kill_at)
    install_kill_hook(plan, args.batch)
    emit(f"opening {os.getpid()}")
    if args.how == "open":
        plan.armed = True
        kv = KVLog(args.path, follow=False)
    else:
        kv = KVLog(args.path, follow=False)
        plan.armed = True
        kv.rewarm()
    emit(f"total ops={plan.ops} txns={plan.txns}")
    kv.close()


# -- opening a (damaged) store ------------------------------------------------------------


def open_store(args: argparse.Namespace) -> None:
    from kvlog import KVLog
    from kvlog.errors import CacheError

    kv = KVLog(args.path, follow=False)
    cache = kv._cache
    assert cache is not None
    report: dict[str, Any] = {
        "open_replay": kv.open_replay,
        "rebuilds": kv.rebuilds,
        "moved_to": None if cache.moved_to is None else str(cache.moved_to),
        "structure_check_seconds": cache.structure_check_seconds,
    }
    if args.read is not None:
        try:
            kv[args.read]
            report["read"] = "no error"
        except CacheError as exc:
            report["read"] = f"CacheError: {exc}"
    if args.rewarm:
        kv.rewarm()
        report["rewarm_moved_to"] = str(cache.moved_to)
    try:
        report["digest"] = digest(cache.items())
    except CacheError as exc:
        report["digest"] = f"CacheError: {exc}"
    kv.close()
    emit(json.dumps(report))


# -- reader slots ---------------------------------------------------------------------------


def holder(args: argparse.Namespace) -> None:
    import lmdb

    env = lmdb.open(args.path, max_dbs=4, max_readers=args.max_readers)
    emit(f"ready {os.getpid()} {env.max_readers()}")
    threading.Event().wait()


def reader(args: argparse.Namespace) -> None:
    import lmdb

    env = lmdb.open(args.path, max_dbs=4)
    txn = env.begin()
    txn.get(b"anything")
    emit(f"reading {os.getpid()}")
    threading.Event().wait()


# -- a full disk -------------------------------------------------------------------------------


def full_disk(path: Path, fill: Callable[[], None], free: Callable[[], None]) -> dict[str, Any]:
    """Write to a store until the disk is full, check what is left, free space, carry on.

    ``fill()`` makes the disk full (after the store is open: a store cannot
    open on a full disk), ``free()`` makes room again. Returns what happened,
    for the parent's assertions: the error, the acknowledged writes (``model``),
    the failed write, ``verify`` reports before and after freeing space.
    """
    from kvlog import KVLog
    from kvlog.errors import KVLogError
    from kvlog.verify import verify

    value = "v" * 3000
    model: dict[str, str] = {}
    kv = KVLog(path, follow=False)
    report: dict[str, Any] = {}
    try:
        for i in range(20):
            kv[f"before-{i:03d}"] = value
            model[f"before-{i:03d}"] = value
        fill()
        failed = None
        for i in range(5000):
            key = f"full-{i:05d}"
            try:
                kv[key] = value
            except KVLogError as exc:
                report["error"] = {"type": type(exc).__name__, "message": str(exc)}
                failed = key
                break
            model[key] = value
        report["failed"] = failed
        # The cache is the log folded up to its checkpoint, and every acknowledged write is in it.
        report["verify_full"] = verify(kv, limit=5).ok
        report["acked_readable"] = all(kv.get(k) == v for k, v in model.items())
        free()
        for i in range(20):
            kv[f"after-{i:03d}"] = value
            model[f"after-{i:03d}"] = value
        kv.sync()
        # A write the log took before the cache failed is there now; one the log refused is not.
        report["failed_landed"] = failed is not None and failed in kv
        report["verify_freed"] = verify(kv, limit=5).ok
        report["model"] = model
        report["contents_equal"] = {k: v for k, v in kv.scan() if k != failed} == model
    finally:
        kv.close()
    return report


def full_disk_rlimit(args: argparse.Namespace) -> None:
    """The full disk as a file-size limit: every write past ``--limit`` bytes into a file fails (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    path = Path(args.path)

    def size(f: Path) -> int:
        # A segment up to its last byte that is not zero: the active one holds
        # preallocated zeros past its end, which writes fill without growing it.
        return len(f.read_bytes().rstrip(b"\0")) if f.suffix == ".log" else f.stat().st_size

    def fill() -> None:
        largest = max(size(f) for f in path.rglob("*") if f.is_file())
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest + args.limit, hard))

    def free() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

    emit(json.dumps(full_disk(path, fill, free)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["replay", "open", "holder", "reader", "full-disk"])
    parser.add_argument("path")
    parser.add_argument("--how", choices=["open", "rewarm"], default="open")
    parser.add_argument("--kill-at", default="none")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--read")
    parser.add_argument("--rewarm", action="store_true")
    parser.add_argument("--max-readers", type=int, default=8)
    parser.add_argument("--limit", type=int, default=64 * 1024)
    args = parser.parse_args(argv)
    # The store's warnings (a cache set aside, a rebuild) go to stderr, where the parent reads them.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    {
        "replay": replay,
        "open": open_store,
        "holder": holder,
        "reader": reader,
        "full-disk": full_disk_rlimit,
    }[args.mode](args)


if __name__ == "__main__":
    main()
