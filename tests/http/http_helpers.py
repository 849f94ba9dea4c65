"""Real ``kvlog serve`` processes for the HTTP tests, and the checks they share.

:class:`Served` starts ``python -m kvlog ... serve --port 0`` as a subprocess,
reads the URL it prints (the port it bound), then polls ``/healthz`` until it
answers, within a deadline. Every request the tests make goes through a real
httpx client over loopback TCP to that process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

#: Seconds a server may take to start, or a thing to happen (generous: a busy CI machine).
PATIENCE = 60.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Kafka or token settings (they would change what ``kvlog`` serves), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KVLOG_BOOTSTRAP_SERVERS", "KVLOG_TOPIC", "KVLOG_TOKEN")
    }
    env.update(extra)
    return env


def target_args(
    data: Path | None = None, *, cache: Path | None = None, kafka: tuple[str, str] | None = None
) -> list[str]:
    """The global options of ``kvlog`` for an embedded data directory or a Kafka topic (bootstrap, topic)."""
    if kafka is not None:
        assert cache is not None
        return ["--cache", str(cache), "--bootstrap-servers", kafka[0], "--topic", kafka[1]]
    assert data is not None
    return ["--data", str(data)]


class Served:
    """A running ``kvlog serve`` subprocess and an httpx client on it (a context manager)."""

    def __init__(
        self, target: list[str], *options: str, log_dir: Path, token: str | None = None, name: str = "serve"
    ) -> None:
        self.stderr_path = log_dir / f"{name}-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        argv = [sys.executable, "-m", "kvlog", *target, "serve", "--port", "0", *options]
        if token is not None:
            argv += ["--token", token]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=clean_env(),
            text=True,
        )
        try:
            self.url = self._read_url()
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self.client = httpx.Client(base_url=self.url, headers=headers, timeout=PATIENCE)
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _read_url(self) -> str:
        assert self.proc.stdout is not None
        # The first line comes once the port is bound and the store is open;
        # readline returns at EOF too (a server that failed to start).
        line = self.proc.stdout.readline()
        found = re.search(r"at (http://\S+?)/? \(", line)
        if not found:
            self.proc.wait(PATIENCE)
            pytest.fail(f"kvlog serve printed {line!r} and exited {self.proc.returncode}: {self.stderr()}")
        return found.group(1)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"kvlog serve exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"kvlog serve at {self.url} not healthy within {PATIENCE}s: {self.stderr()}")
            time.sleep(0.02)  # the polling interval of a deadline-bounded wait

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then wait for the exit (SIGKILL if it does not come); the exit code."""
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(PATIENCE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kvlog(target: list[str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``kvlog TARGET ARGS`` as a subprocess; must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "kvlog", *target, *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE * 2,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        env=clean_env(),
    )
    assert done.returncode == 0, f"kvlog {args} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


def error_of(response: httpx.Response, status: int, *words: str) -> str:
    """Assert ``response`` is ``status`` with a JSON ``{"error": ...}`` naming every one of ``words``."""
    assert response.status_code == status, f"{response.status_code} {response.text!r}, expected {status}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: Any = response.json()
    assert set(body) == {"error"}, body
    message = str(body["error"])
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


class LongPoll:
    """A long-poll running in a thread: ``GET key?wait=S`` with ``If-None-Match`` the ETag held."""

    def __init__(self, server: Served, key: str, etag: str | None, wait: float = 30.0) -> None:
        self.response: httpx.Response | None = None
        self.answered_at = 0.0
        headers = {"If-None-Match": etag} if etag else {}

        def run() -> None:
            self.response = server.client.get(f"/v1/keys/{key}?wait={wait}", headers=headers)
            self.answered_at = time.monotonic()

        self._thread = threading.Thread(target=run)
        self._thread.start()
        self._server = server

    def wait_until_waiting(self) -> None:
        """Until the server counts this request among its waiting long-polls (a deadline-bounded poll)."""
        deadline = time.monotonic() + PATIENCE
        while self._server.client.get("/v1/stats").json()["server"]["longpolls_waiting"] < 1:
            assert self.response is None, f"answered before any write: {self.response}"
            assert time.monotonic() < deadline, "the long-poll never started waiting"
            time.sleep(0.01)  # the polling interval of a deadline-bounded wait

    def result(self) -> httpx.Response:
        self._thread.join(PATIENCE)
        assert self.response is not None, "the long-poll never answered"
        return self.response
