"""Bad requests: each is refused with a 4xx and a JSON error naming the problem, and writes nothing.

"Nothing written" is checked on the log itself: the end offsets of the log
(``kvlog stats`` in another process) and every entry (``kvlog scan``) are the
same after the refused request as before it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_helpers import Served, error_of, kvlog, target_args

from kvlog.codec import MAX_KEY_SIZE

LIMIT = 1024 * 1024  # the embedded log's record limit (max_record_bytes)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "data"
    kvlog(target_args(path), "put", "k", '{"v": 1}')
    return path


@pytest.fixture(scope="module")
def server(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(target_args(data), "--writable", log_dir=tmp_path_factory.mktemp("logs")) as served:
        yield served


@pytest.fixture(scope="module")
def readonly(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(target_args(data), log_dir=tmp_path_factory.mktemp("logs")) as served:
        yield served


def state(data: Path) -> tuple[Any, str]:
    """The log's end offsets and every entry, read by other processes."""
    stats = json.loads(kvlog(target_args(data), "stats", "--json").stdout)
    return stats["end_offsets"], kvlog(target_args(data), "scan").stdout


Request = Callable[[httpx.Client], httpx.Response]

CASES: list[tuple[str, Request, int, tuple[str, ...]]] = [
    (
        "key too long",
        lambda c: c.put("/v1/keys/" + "k" * (MAX_KEY_SIZE + 1), json=1),
        400,
        (f"{MAX_KEY_SIZE + 1} bytes", f"at most {MAX_KEY_SIZE}"),
    ),
    (
        "key too long in bytes, not characters",
        lambda c: c.put("/v1/keys/" + "é" * 300, json=1),
        400,
        ("600 bytes",),
    ),
    ("key not UTF-8", lambda c: c.put("/v1/keys/%ff%fek", json=1), 400, ("not UTF-8",)),
    ("key not UTF-8 on GET", lambda c: c.get("/v1/keys/%c3%28"), 400, ("not UTF-8",)),
    ("empty key", lambda c: c.put("/v1/keys/", json=1), 400, ("empty",)),
    (
        "body not JSON",
        lambda c: c.put("/v1/keys/k", content=b"{not json"),
        400,
        ("not valid JSON",),
    ),
    ("body empty", lambda c: c.put("/v1/keys/k", content=b""), 400, ("empty",)),
    ("body not UTF-8", lambda c: c.put("/v1/keys/k", content=b'"\xff"'), 400, ("JSON",)),
    (
        "value over the record limit",
        lambda c: c.put("/v1/keys/k", json="x" * LIMIT),
        413,
        ("bytes", "at most", "nothing was written"),
    ),
    (
        "body over what the server reads",
        lambda c: c.put("/v1/keys/k", content=b'"' + b"x" * (5 * LIMIT) + b'"'),
        413,
        ("at most",),
    ),
    ("unknown query parameter", lambda c: c.put("/v1/keys/k?sync=1", json=2), 400, ("unknown", "sync")),
    ("unknown query parameter on GET", lambda c: c.get("/v1/keys/k?rwa"), 400, ("rwa", "raw, wait")),
    ("unknown query parameter on scan", lambda c: c.get("/v1/scan?prefx=k"), 400, ("prefx",)),
    ("bad limit", lambda c: c.get("/v1/scan?limit=-1"), 400, ("limit", "-1")),
    ("bad wait", lambda c: c.get("/v1/keys/k?wait=soon"), 400, ("wait", "soon")),
    ("wait too long", lambda c: c.get("/v1/keys/k?wait=100000"), 400, ("wait", "at most")),
    ("batch not an object", lambda c: c.post("/v1/batch", json=[["k", 1]]), 400, ("JSON object", "list")),
    ("batch empty", lambda c: c.post("/v1/batch", json={}), 400, ("empty",)),
    (
        "batch with one key too long",
        lambda c: c.post("/v1/batch", json={"a": 1, "k": 2, "b" * 600: 3}),
        400,
        ("600 bytes", "nothing was written"),
    ),
    (
        "batch with one record too large",
        lambda c: c.post("/v1/batch", json={"a": 1, "k": 2, "big": "x" * LIMIT}),
        413,
        ("nothing was written",),
    ),
    (
        "batch with too many keys",
        lambda c: c.post("/v1/batch", json={f"n{i}": i for i in range(10_001)}),
        413,
        ("10001 keys", "at most 10000"),
    ),
    ("a route that is not one", lambda c: c.get("/v1/nothing"), 404, ("no route", "/v1/nothing")),
    ("a method that is not one", lambda c: c.post("/v1/keys/k", json=1), 405, ("POST",)),
]


@pytest.mark.parametrize(("case", "request_", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_json_error_and_writes_nothing(
    server: Served, data: Path, case: str, request_: Request, status: int, words: tuple[str, ...]
) -> None:
    before = state(data)
    error_of(request_(server.client), status, *words)
    assert state(data) == before, f"{case}: something was written"
    assert server.client.get("/v1/keys/k").json() == {"v": 1}


@pytest.mark.parametrize(
    "request_",
    [
        lambda c: c.put("/v1/keys/k", json=2),
        lambda c: c.delete("/v1/keys/k"),
        lambda c: c.post("/v1/batch", json={"k": 2}),
    ],
    ids=["PUT", "DELETE", "batch"],
)
def test_a_server_without_writable_refuses_writes(readonly: Served, data: Path, request_: Request) -> None:
    before = state(data)
    response = request_(readonly.client)
    error_of(response, 405, "read-only", "--writable")
    assert response.headers["allow"] == "GET, HEAD"
    assert state(data) == before
    assert readonly.client.get("/v1/keys/k").json() == {"v": 1}
