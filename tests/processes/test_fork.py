"""A store and fork(): opened before it (gunicorn's --preload), or after it in each child.

A ``KVLog`` opened in a parent and used in a child forked from it opens
itself again in the child at its first use there; the parent keeps using
its own. What a user would notice if this failed: a child that cannot use
the store it inherited, a child's write the parent does not read right
after it returned (or the other way round), a parent whose store stopped
working because a child used or closed the inherited one. The same with
``multiprocessing``'s "fork" context, with stores opened in each child, and
under a real gunicorn with two workers, with and without ``--preload``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import select
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proc_helpers import HERE, PATIENCE, Children, check_cache_is_whole_log, clean_env

from kvlog import KVLog


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """fork() from this multi-threaded process (a store's follower thread runs) is what is tested here."""
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock.
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


class Pipe:
    """JSON lines over a pipe between a forked child and its parent, read with a deadline."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self._buffer = b""

    def send(self, obj: Any) -> None:
        os.write(self.write_fd, json.dumps(obj).encode() + b"\n")

    def receive(self, timeout: float = PATIENCE) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.read_fd], [], [], remaining)[0]:
                pytest.fail(f"nothing came through the pipe within {timeout}s")
            chunk = os.read(self.read_fd, 65536)
            if not chunk:
                pytest.fail(f"the other end closed the pipe; got {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)


def wait_exit(pid: int, timeout: float = PATIENCE) -> int:
    """waitpid with a deadline: the exit code of a forked child (SIGKILLed if it does not end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)  # the polling interval of a deadline-bounded wait
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"forked child {pid} did not exit within {timeout}s")


def in_child(body: Callable[[], None], report: Pipe) -> None:
    """Run ``body`` in a forked child, report an exception through ``report``, and never return."""
    code = 1
    try:
        body()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - the parent reads it and fails the test
        with contextlib.suppress(BaseException):
            report.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        os._exit(code)


def test_a_store_opened_before_fork_is_used_by_child_and_parent(tmp_path: Path) -> None:
    """os.fork(): the child reads and writes through the inherited object, and each sees the other's writes."""
    data = tmp_path / "data"
    kv = KVLog(data)
    try:
        kv["opened-by"] = "parent"
        to_parent, to_child = Pipe(), Pipe()
        with forking():
            pid = os.fork()
        if pid == 0:

            def child() -> None:
                to_parent.send({"read": kv["opened-by"]})
                kv["child"] = os.getpid()
                to_parent.send({"wrote": True})
                assert to_child.receive() == "parent wrote"
                to_parent.send({"parent-after-fork": kv.get("parent-after-fork"), "items": len(kv)})
                kv.close()  # closes the child's own store, never the parent's files

            in_child(child, to_parent)
        try:
            assert to_parent.receive() == {"read": "parent"}
            assert to_parent.receive() == {"wrote": True}
            assert kv["child"] == pid, "the parent does not read the child's write right after it returned"
            kv["parent-after-fork"] = "yes"
            to_child.send("parent wrote")
            assert to_parent.receive() == {"parent-after-fork": "yes", "items": 3}
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            raise
        finally:
            code = wait_exit(pid)
        assert code == 0
        # The parent's store is untouched by the child's use and close of its copy.
        kv["after-child"] = 1
        assert kv["after-child"] == 1
        kv.sync(30)
        assert kv.stats()["following"]
        assert dict(kv) == {"opened-by": "parent", "child": pid, "parent-after-fork": "yes", "after-child": 1}
    finally:
        kv.close()
    check_cache_is_whole_log(data, "after the fork")


def _reporting(body: Callable[..., None]) -> Callable[..., None]:
    """A multiprocessing target that sends ``("error", ...)`` down its pipe (its second argument) if it fails."""

    def target(first: Any, conn: Any, n: int) -> None:
        try:
            body(first, conn, n)
        except BaseException as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            raise

    return target


@_reporting
def _mp_child(kv: KVLog, conn: Any, n: int) -> None:
    """A multiprocessing child: write through the inherited store, then read the parent's answer."""
    conn.send(("read", kv["opened-by"]))
    kv[f"mp-{n}"] = os.getpid()
    conn.send(("wrote", n))
    assert conn.recv() == "go"
    conn.send(("saw", {k: kv.get(k) for k in ("parent-answer", "mp-0", "mp-1", "mp-2")}))


def test_multiprocessing_fork_children_share_the_parents_store(tmp_path: Path) -> None:
    """Three multiprocessing "fork" children use the parent's store at once; all see all writes."""
    data = tmp_path / "data"
    ctx = multiprocessing.get_context("fork")
    kv = KVLog(data)
    processes = []
    try:
        kv["opened-by"] = "parent"
        pipes = [ctx.Pipe() for _ in range(3)]
        with forking():
            for n, (_, child_end) in enumerate(pipes):
                process = ctx.Process(target=_mp_child, args=(kv, child_end, n), daemon=True)
                process.start()
                processes.append(process)
        for n, (parent_end, _) in enumerate(pipes):
            assert parent_end.poll(PATIENCE), f"child {n} said nothing"
            assert parent_end.recv() == ("read", "parent")
            assert parent_end.poll(PATIENCE)
            assert parent_end.recv() == ("wrote", n)
            assert kv[f"mp-{n}"] == processes[n].pid
        kv["parent-answer"] = 42
        for parent_end, _ in pipes:
            parent_end.send("go")
        pids = {f"mp-{n}": p.pid for n, p in enumerate(processes)}
        for parent_end, _ in pipes:
            assert parent_end.poll(PATIENCE)
            assert parent_end.recv() == ("saw", {"parent-answer": 42, **pids})
        for process in processes:
            process.join(PATIENCE)
            assert process.exitcode == 0
        kv["parent-after"] = "still works"
        assert kv["parent-after"] == "still works"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        kv.close()
    check_cache_is_whole_log(data, "after the multiprocessing children")


@_reporting
def _opening_child(data: Path, conn: Any, n: int) -> None:
    """A child that opens its own store after the fork, writes, then reads what everyone wrote."""
    with KVLog(data) as kv:
        kv[f"own-{n}"] = n
        conn.send("wrote")
        assert conn.recv() == "go"
        conn.send({k: kv.get(k) for k in ("parent", "own-0", "own-1", "own-2")})


def test_stores_opened_in_each_child_after_fork(tmp_path: Path) -> None:
    """Each forked child opens KVLog(path) itself: writes from every child and the parent are visible everywhere."""
    data = tmp_path / "data"
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(3)]
    processes = [
        ctx.Process(target=_opening_child, args=(data, end, n), daemon=True)
        for n, (_, end) in enumerate(pipes)
    ]
    try:
        with forking():
            for process in processes:
                process.start()
        for parent_end, _ in pipes:
            assert parent_end.poll(PATIENCE) and parent_end.recv() == "wrote"
        with KVLog(data) as kv:
            assert {k: kv.get(k) for k in ("own-0", "own-1", "own-2")} == {"own-0": 0, "own-1": 1, "own-2": 2}
            kv["parent"] = "p"
            for parent_end, _ in pipes:
                parent_end.send("go")
            for parent_end, _ in pipes:
                assert parent_end.poll(PATIENCE)
                assert parent_end.recv() == {"parent": "p", "own-0": 0, "own-1": 1, "own-2": 2}
        for process in processes:
            process.join(PATIENCE)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    check_cache_is_whole_log(data, "after the children")


# -- gunicorn ---------------------------------------------------------------------------------------

#: Client threads: while one worker serves a request, another connection reaches the other worker.
CLIENTS = 4


def _request(url: str, method: str = "GET", body: Any = None) -> tuple[int, dict[str, Any]]:
    """``(status, JSON body)``; a body that is not JSON (gunicorn's own error page) comes back as ``{"text": ...}``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"text": raw.decode(errors="replace")[:200]}


@pytest.mark.parametrize(
    ("preload", "open_mode"),
    [(True, "import"), (False, "post_fork"), (False, "lazy")],
    ids=["preload-open-at-import", "open-in-post-fork-hook", "open-at-first-request"],
)
def test_gunicorn_workers_share_the_store(tmp_path: Path, preload: bool, open_mode: str) -> None:
    """Two gunicorn workers serve PUT and GET; a value PUT through one worker is read by whichever serves the next GET."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed (it is in the test extra)")
    from gunicorn import config

    data = tmp_path / "data"
    argv = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:0", "--chdir", str(HERE)]
    if any("--no-control-socket" in (setting.cli or ()) for setting in config.KNOWN_SETTINGS):
        argv.append("--no-control-socket")  # gunicorn 27+ would otherwise create one in the home directory
    if preload:
        argv.append("--preload")
    if open_mode == "post_fork":
        argv += ["-c", str(HERE / "kvlog_gunicorn_conf.py")]
    argv.append("kvlog_wsgi_app:app")
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = clean_env(KVLOG_TEST_DATA=str(data), KVLOG_TEST_OPEN=open_mode, PYTHONPATH=path)
    with Children(tmp_path) as children:
        server = children.command(argv, name="gunicorn", env=env, merge_stderr=True, cwd=HERE)
        listening = server.expect(lambda line: "Listening at: http://" in line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", listening).group(1))  # type: ignore[union-attr]
        for _ in range(2):
            server.expect(lambda line: "Booting worker with pid" in line)
        base = f"http://127.0.0.1:{port}/kv/"
        seen_put: set[int] = set()
        seen_get: set[int] = set()
        crossed = 0  # PUT served by one worker, the next GET by the other
        opened: set[Any] = set()
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            nonlocal crossed
            i = 0
            while not stop.is_set() and i < 500:
                i += 1
                key, value = f"c{n}-{i % 7}", {"client": n, "i": i}
                try:
                    status, put = _request(base + key, "PUT", value)
                    status_get, got = _request(base + key)
                except OSError as exc:
                    with lock:
                        errors.append(f"PUT/GET {key}: {exc}")
                    stop.set()
                    return
                with lock:
                    if status != 200 or status_get != 200 or got.get("value") != value:
                        errors.append(f"PUT {key}={value} -> {status} {put}; GET -> {status_get} {got}")
                        stop.set()
                        return
                    seen_put.add(put["pid"])
                    seen_get.add(got["pid"])
                    opened.update((put["opened_in"], got["opened_in"]))
                    crossed += put["pid"] != got["pid"]
                    if len(seen_put) == len(seen_get) == 2 and crossed >= 5 and i >= 20:
                        stop.set()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(PATIENCE)
        stop.set()
        assert not errors, f"{errors[:3]}; gunicorn said: {server.snapshot()[-30:]}"
        assert len(seen_put) == 2 and len(seen_get) == 2, (
            f"not both workers served: PUT {seen_put}, GET {seen_get}"
        )
        assert crossed >= 5, f"only {crossed} GETs were served by the other worker than their PUT"
        if preload:
            # Opened once, in the master, before the fork: every worker uses that object (reopened at first use).
            assert len(opened) == 1 and not opened & (seen_put | seen_get), opened
        else:
            assert opened == seen_put | seen_get, (opened, seen_put, seen_get)
        server.kill(signal.SIGTERM)
        assert server.reap(PATIENCE) == 0, server.snapshot()[-20:]
    check_cache_is_whole_log(data, "after gunicorn stopped")
