"""A private, throwaway ``redis-server`` on a free loopback port, for the benchmarks.

    with RedisServer() as server:
        r = server.client()
        r.set(b"k", b"v")
        print(server.version, server.port, server.rss_bytes())

Finds ``redis-server`` on ``PATH``; when it is missing and we are root on a
machine with ``apt-get``, installs the Debian package first. Anything that
keeps the server from running raises :class:`benchmarks.harness.Skipped` with
the reason, so a workload can record the subject as skipped and go on.

The server keeps nothing on disk (no RDB snapshots, no AOF), listens on
127.0.0.1 only, runs in its own process group and temporary directory, and is
stopped (its whole process group) when the ``with`` block ends. A system
redis that the package may have started on 6379 is left alone: we never use
that port unless the OS hands it to us as free.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from benchmarks.harness import Skipped

__all__ = ["RedisServer", "find_redis_server"]

_APT_TIMEOUT = 600.0


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_APT_TIMEOUT,
        check=False,
    )


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:] if line.strip())


def find_redis_server(*, install: bool = True) -> str:
    """Return the path of ``redis-server``, installing it with apt-get if allowed and possible.

    Raises:
        Skipped: it is not on PATH and cannot be installed here.
    """
    path = shutil.which("redis-server")
    if path:
        return path
    if not install:
        raise Skipped("redis-server is not on PATH")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise Skipped("redis-server is not on PATH and we are not root to install it")
    if shutil.which("apt-get") is None:
        raise Skipped("redis-server is not on PATH and there is no apt-get to install it")
    print("  installing redis-server with apt-get ...", flush=True)
    try:
        result = _apt_get("install", "-y", "-qq", "redis-server")
        if result.returncode != 0:
            # Most often a fresh machine whose package lists were never fetched
            # ("has no installation candidate", "Unable to locate package").
            update = _apt_get("update", "-qq")
            if update.returncode != 0:
                raise Skipped(f"apt-get update failed: {_tail(update.stderr or update.stdout)}")
            result = _apt_get("install", "-y", "-qq", "redis-server")
    except subprocess.TimeoutExpired as exc:
        raise Skipped(f"installing redis-server took longer than {_APT_TIMEOUT:.0f} s") from exc
    except OSError as exc:
        raise Skipped(f"cannot run apt-get: {exc}") from exc
    if result.returncode != 0:
        raise Skipped(f"apt-get install redis-server failed: {_tail(result.stderr or result.stdout)}")
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not path:
        raise Skipped("apt-get installed redis-server but no redis-server binary was found")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A ``redis-server`` process of our own; use as a context manager.

    Args:
        timeout: seconds to wait for the server to answer PING.
        install: install redis-server with apt-get when it is missing (root only).

    Attributes:
        port: the loopback port it listens on.
        version: the server's ``redis_version``.
    """

    def __init__(self, *, timeout: float = 30.0, install: bool = True) -> None:
        self._timeout = timeout
        self._install = install
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._clients: list[Any] = []
        self.port = 0
        self.version = ""

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            Skipped: redis-server or the redis client package is missing, or
                the server did not come up.
        """
        try:
            import redis  # noqa: F401  (the client is needed to talk to it at all)
        except ImportError as exc:
            raise Skipped("the redis client package is not installed") from exc
        binary = find_redis_server(install=self._install)
        self._tmp = tempfile.TemporaryDirectory(prefix="kvlog-bench-redis-")
        try:
            # The port is free when we ask, but another process may take it
            # before redis binds it: then redis exits at once, and we retry.
            last_error = ""
            for _ in range(3):
                self.port = _free_port()
                error = self._launch(binary)
                if error is None:
                    return
                last_error = error
            raise Skipped(f"redis-server did not start: {last_error}")
        except BaseException:
            self.stop()
            raise

    def _launch(self, binary: str) -> str | None:
        """Start the process on ``self.port``; return None once it answers PING, else why not."""
        assert self._tmp is not None
        workdir = Path(self._tmp.name)
        log_path = workdir / f"redis-{self.port}.log"
        cmd = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(log_path),
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise Skipped(f"cannot run {binary}: {exc}") from exc
        error = self._wait_ready(time.monotonic() + self._timeout, log_path)
        if error is not None:
            self._kill()
        return error

    def _wait_ready(self, deadline: float, log_path: Path) -> str | None:
        import redis

        assert self._proc is not None
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    stderr = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    log = log_path.read_text(errors="replace") if log_path.exists() else ""
                    return f"exited with code {self._proc.returncode}: {_tail(stderr + log)}"
                try:
                    if probe.ping():
                        self.version = str(probe.info("server").get("redis_version", ""))
                        return None
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() >= deadline:
                    return f"no answer to PING within {self._timeout:.0f} s"
                # Poll the condition (the process exits or PING answers) again
                # shortly; waiting on the process bounds the pause.
                try:
                    self._proc.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            probe.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                # start_new_session=True made redis a group leader: pgid == pid.
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def stop(self) -> None:
        """Close our clients, stop the server (its process group) and remove its directory. Idempotent."""
        for client in self._clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001  (closing a client of a dying server must not hide the stop)
                pass
        self._clients.clear()
        self._kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- use ------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Any:
        """A new ``redis.Redis`` connected to this server (closed by :meth:`stop`)."""
        import redis

        if self._proc is None:
            raise RuntimeError("the redis server is not running")
        client = redis.Redis(host="127.0.0.1", port=self.port, **kwargs)
        self._clients.append(client)
        return client

    def rss_bytes(self) -> int:
        """The server's resident memory (INFO memory ``used_memory_rss``)."""
        import redis

        probe = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            return int(probe.info("memory")["used_memory_rss"])
        finally:
            probe.close()

    def __repr__(self) -> str:
        state = f"port {self.port}" if self._proc is not None else "stopped"
        return f"<RedisServer {self.version or '?'} {state}>"
