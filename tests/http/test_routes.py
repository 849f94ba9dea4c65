"""Every route of ``kvlog serve``, through a real server process and a real HTTP client.

One writable server holds a data directory preloaded with ``kvlog load`` for
the module; what it answers is compared with what the ``kvlog`` command reads
from the same directory in another process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
from http_helpers import PATIENCE, Served, error_of, kvlog, target_args

from kvlog.cache import Cache

PRELOADED = 1200  # more than one chunk of a streamed scan (500 lines)


def order(i: int) -> dict[str, object]:
    return {"customer": f"c{i % 7}", "total": i / 4, "items": [i, "x"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routes") / "data"
    dump = path.parent / "orders.jsonl"
    dump.write_text(
        "".join(json.dumps({"key": f"order:{i:05d}", "value": order(i)}) + "\n" for i in range(PRELOADED))
    )
    kvlog(target_args(path), "load", str(dump))
    return path


@pytest.fixture(scope="module")
def server(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(target_args(data), "--writable", log_dir=tmp_path_factory.mktemp("logs")) as served:
        yield served


def test_get_answers_the_value_as_json_or_its_stored_bytes_with_one_etag(server: Served, data: Path) -> None:
    response = server.client.get("/v1/keys/order:00042")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == order(42)
    assert response.json() == json.loads(kvlog(target_args(data), "get", "order:00042").stdout)
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10

    raw = server.client.get("/v1/keys/order:00042?raw")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(raw.content) == order(42)
    assert raw.headers["etag"] == etag
    # Another value, another ETag; the same value read again, the same one.
    assert server.client.get("/v1/keys/order:00043").headers["etag"] != etag
    assert server.client.get("/v1/keys/order:00042").headers["etag"] == etag


def test_if_none_match_answers_304_while_the_value_is_the_one_held(server: Served) -> None:
    etag = server.client.get("/v1/keys/order:00007").headers["etag"]
    for header in (etag, f'"nope", {etag}', f"W/{etag}", "*"):
        response = server.client.get("/v1/keys/order:00007", headers={"If-None-Match": header})
        assert response.status_code == 304, header
        assert response.content == b""
        assert response.headers["etag"] == etag
    other = server.client.get("/v1/keys/order:00007", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200 and other.json() == order(7)


def test_a_missing_key_is_404_with_a_json_error(server: Served) -> None:
    error_of(server.client.get("/v1/keys/order:99999"), 404, "key not found", "order:99999")
    error_of(server.client.get("/v1/keys/order:99999", headers={"If-None-Match": "*"}), 404, "not found")


def test_put_writes_through_the_log_and_every_process_reads_it(server: Served, data: Path) -> None:
    value = {"status": "paid", "ünïcode": "✓", "n": [1, 2.5, None, True]}
    response = server.client.put("/v1/keys/put:1", json=value)
    assert response.status_code == 200, response.text
    etag = response.headers["etag"]
    assert response.json() == {"key": "put:1", "etag": etag}
    # Returned once durable and in the shared cache: another process reads it now.
    assert json.loads(kvlog(target_args(data), "get", "put:1").stdout) == value
    read = server.client.get("/v1/keys/put:1")
    assert read.json() == value and read.headers["etag"] == etag
    # A key with slashes and spaces, percent-encoded in the path.
    assert server.client.put("/v1/keys/a/b%20c%2Fd", json=1).status_code == 200
    assert kvlog(target_args(data), "get", "a/b c/d").stdout.strip() == "1"


def test_delete_writes_a_tombstone_and_a_missing_key_is_404(server: Served, data: Path) -> None:
    assert server.client.put("/v1/keys/del:1", json="bye").status_code == 200
    response = server.client.delete("/v1/keys/del:1")
    assert response.status_code == 200 and response.json() == {"key": "del:1", "deleted": True}
    error_of(server.client.get("/v1/keys/del:1"), 404, "not found")
    assert kvlog(target_args(data), "scan", "--prefix", "del:").stdout == ""
    error_of(server.client.delete("/v1/keys/del:1"), 404, "key not found")


def test_batch_writes_every_key_with_null_as_a_value(server: Served, data: Path) -> None:
    batch = {f"batch:{i}": {"i": i} for i in range(50)} | {"batch:null": None}
    response = server.client.post("/v1/batch", json=batch)
    assert response.status_code == 200 and response.json() == {"written": 51}
    lines = kvlog(target_args(data), "scan", "--prefix", "batch:").stdout.splitlines()
    assert {json.loads(line)["key"]: json.loads(line)["value"] for line in lines} == batch


def test_scan_streams_json_lines_in_key_order_like_kvlog_scan(server: Served, data: Path) -> None:
    with server.client.stream("GET", "/v1/scan", params={"prefix": "order:"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert "content-length" not in response.headers  # streamed, not built whole
        text = "".join(response.iter_text())
    assert text == kvlog(target_args(data), "scan", "--prefix", "order:").stdout
    keys = [json.loads(line)["key"] for line in text.splitlines()]
    assert keys == [f"order:{i:05d}" for i in range(PRELOADED)]

    limited = server.client.get("/v1/scan", params={"prefix": "order:", "limit": "3"}).text.splitlines()
    assert [json.loads(line)["key"] for line in limited] == ["order:00000", "order:00001", "order:00002"]
    ranged = server.client.get("/v1/scan", params={"start": "order:00010", "stop": "order:00013"}).text
    assert [json.loads(line)["key"] for line in ranged.splitlines()] == [
        "order:00010",
        "order:00011",
        "order:00012",
    ]
    assert server.client.get("/v1/scan", params={"prefix": "nothing:"}).text == ""
    assert server.client.get("/v1/scan", params={"limit": "0"}).text == ""


def test_stats_healthz_readyz(server: Served, data: Path) -> None:
    stats = server.client.get("/v1/stats").json()
    cli = json.loads(kvlog(target_args(data), "stats", "--json").stdout)
    assert stats["entries"] == cli["entries"] and stats["entries"] >= PRELOADED
    assert stats["checkpoint"] == stats["end_offsets"] == cli["end_offsets"]
    assert stats["codec"] == "msgpack" and stats["following"] is True
    assert server.client.get("/healthz").json() == {"status": "ok"}
    ready = server.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["total_lag"] == 0


def test_metrics_are_prometheus_text_with_the_store_and_http_counters(server: Served) -> None:
    def reads() -> float:
        text = server.client.get("/metrics").text
        return float(
            next(line.split()[1] for line in text.splitlines() if line.startswith("kvlog_http_reads_total"))
        )

    before = reads()
    for _ in range(3):
        server.client.get("/v1/keys/order:00001")
    assert reads() == before + 3
    response = server.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for name in (
        "kvlog_entries ",
        'kvlog_lag{partition="0"} 0.0',
        'kvlog_checkpoint{partition="0"}',
        "kvlog_records_replayed_total",
        "kvlog_records_quarantined_total 0.0",
        "kvlog_rebuilds_total",
        "kvlog_open_replay_seconds",
        "kvlog_http_writes_total",
    ):
        assert name in text, name
    assert "python_gc_objects_collected" not in text  # the app's own registry, not the global one


def test_the_console_is_one_static_page_with_nothing_from_elsewhere(server: Served) -> None:
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("console.js", "console.css"):
        assert f'"{name}"' in page.text
        assert server.client.get(f"/{name}").status_code == 200
    script = server.client.get("/console.js").text
    assert "http://" not in page.text + script and "https://" not in page.text + script


def test_a_long_poll_with_nothing_changing_answers_304_at_its_timeout(server: Served) -> None:
    etag = server.client.get("/v1/keys/order:00003").headers["etag"]
    started = time.monotonic()
    response = server.client.get("/v1/keys/order:00003?wait=0.5", headers={"If-None-Match": etag})
    waited = time.monotonic() - started
    assert response.status_code == 304 and response.headers["etag"] == etag
    assert 0.45 <= waited < 5, waited
    # Holding another value than the current one: answered at once, no waiting.
    started = time.monotonic()
    response = server.client.get("/v1/keys/order:00003?wait=30", headers={"If-None-Match": '"old"'})
    assert response.status_code == 200 and time.monotonic() - started < 5


def test_a_write_waiting_for_the_cache_does_not_hold_reads_and_readyz_sees_the_lag(
    tmp_path: Path,
) -> None:
    """A write blocked in the cache (another process holds LMDB's writer) leaves reads answering.

    The write is in the log but not yet in the cache, so /readyz with
    --max-lag 0 answers 503 with the lag, and 200 again once it is applied.
    """
    data = tmp_path / "data"
    kvlog(target_args(data), "put", "k", '"v"')
    with Served(target_args(data), "--writable", "--max-lag", "0", log_dir=tmp_path) as server:
        cache = Cache(data / "cache")
        txn = cache.env.begin(write=True)
        try:
            answers: list[httpx.Response] = []
            writer = threading.Thread(
                target=lambda: answers.append(
                    httpx.put(server.url + "/v1/keys/k", json="w", timeout=PATIENCE)
                )
            )
            writer.start()
            deadline = time.monotonic() + PATIENCE
            while True:
                ready = server.client.get("/readyz")
                if ready.status_code == 503:
                    break
                assert time.monotonic() < deadline, "the blocked write never showed as lag"
                time.sleep(0.02)  # the polling interval of a deadline-bounded wait
            assert ready.json()["ready"] is False and ready.json()["total_lag"] >= 1
            # The event loop is free: reads answer while the write waits in its thread.
            started = time.monotonic()
            assert server.client.get("/v1/keys/k").json() == "v"
            assert time.monotonic() - started < 2
            assert not answers
        finally:
            txn.abort()
            cache.close()
        writer.join(PATIENCE)
        assert answers and answers[0].status_code == 200
        assert server.client.get("/v1/keys/k").json() == "w"
        assert server.client.get("/readyz").status_code == 200


def test_keep_alive_requests_do_not_wait_for_a_delayed_ack(server: Served) -> None:
    """Sequential requests on one connection answer in about a millisecond, not the ~40 ms of a
    delayed ACK that an answer written in two pieces waits for when Nagle's algorithm is on."""
    server.client.get("/v1/keys/order:00001")  # the connection is open from here on
    took = []
    for _ in range(30):
        started = time.monotonic()
        assert server.client.get("/v1/keys/order:00001").status_code == 200
        took.append(time.monotonic() - started)
    assert sorted(took)[len(took) // 2] < 0.02, sorted(took)


MOUNTED_SERVICE = """
import socket, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
import kvlog.http
from kvlog import KVLog

kv = KVLog(sys.argv[1])
service = Starlette(routes=[
    Route("/", lambda request: PlainTextResponse("the user's own route")),
    Mount("/kv", app=kvlog.http.app(kv, writable=True)),
])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.bind(("127.0.0.1", 0))
print(f"serving at http://127.0.0.1:{sock.getsockname()[1]}/ (mounted)", flush=True)
try:
    uvicorn.Server(uvicorn.Config(service, log_level="warning")).run(sockets=[sock])
except KeyboardInterrupt:
    pass
kv.close()
"""


def test_the_app_mounted_under_a_path_in_a_users_starlette_service(tmp_path: Path) -> None:
    import subprocess
    import sys

    from http_helpers import clean_env

    data = tmp_path / "data"
    kvlog(target_args(data), "put", "a/b", '"mounted"')
    program = tmp_path / "service.py"
    program.write_text(MOUNTED_SERVICE)
    proc = subprocess.Popen(
        [sys.executable, str(program), str(data)], stdout=subprocess.PIPE, text=True, env=clean_env()
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" at ")[1].split("/ ")[0]
        with httpx.Client(base_url=url, timeout=PATIENCE) as client:
            deadline = time.monotonic() + PATIENCE
            while True:
                try:
                    if client.get("/kv/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "the mounted service never answered"
                )
                time.sleep(0.02)  # the polling interval of a deadline-bounded wait
            assert client.get("/").text == "the user's own route"
            assert client.get("/kv/v1/keys/a/b").json() == "mounted"
            assert client.get("/kv/v1/keys/a%2Fb").json() == "mounted"
            assert client.put("/kv/v1/keys/c%20d", json=[1]).status_code == 200
            assert kvlog(target_args(data), "get", "c d").stdout.strip() == "[1]"
            assert 'href="console.css"' in client.get("/kv/").text
            assert client.get("/kv/console.js").status_code == 200
            assert [json.loads(line)["key"] for line in client.get("/kv/v1/scan").text.splitlines()] == [
                "a/b",
                "c d",
            ]
    finally:
        proc.terminate()
        proc.wait(PATIENCE)
        if proc.stdout is not None:
            proc.stdout.close()
