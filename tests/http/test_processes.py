"""Several ``kvlog serve`` processes on one data directory, and writers beside them.

A load balancer may send a client's requests to any of them: what one server
wrote the other reads, with the same ETag, and a long-poll waiting on one
server is woken by a write through the other, or by ``kvlog put`` in a
process of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_helpers import LongPoll, Served, kvlog, target_args


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Served, Served]]:
    tmp = tmp_path_factory.mktemp("pair")
    data = tmp / "data"
    kvlog(target_args(data), "put", "seed", "0")
    with (
        Served(target_args(data), "--writable", log_dir=tmp, name="a") as a,
        Served(target_args(data), "--writable", log_dir=tmp, name="b") as b,
    ):
        yield data, a, b


def test_a_write_through_one_server_is_read_through_the_other_with_the_same_etag(
    pair: tuple[Path, Served, Served],
) -> None:
    _, a, b = pair
    written = a.client.put("/v1/keys/shared:1", json={"by": "a"})
    assert written.status_code == 200
    read = b.client.get("/v1/keys/shared:1")
    assert read.status_code == 200 and read.json() == {"by": "a"}
    assert (
        read.headers["etag"] == written.headers["etag"] == a.client.get("/v1/keys/shared:1").headers["etag"]
    )
    # The ETag one server gave is good for a conditional GET on the other.
    assert (
        b.client.get("/v1/keys/shared:1", headers={"If-None-Match": read.headers["etag"]}).status_code == 304
    )
    assert b.client.delete("/v1/keys/shared:1").status_code == 200
    assert a.client.get("/v1/keys/shared:1").status_code == 404


def test_a_long_poll_is_woken_by_kvlog_put_in_another_process(pair: tuple[Path, Served, Served]) -> None:
    data, a, _ = pair
    a.client.put("/v1/keys/watched:1", json="before")
    etag = a.client.get("/v1/keys/watched:1").headers["etag"]
    poll = LongPoll(a, "watched:1", etag)
    poll.wait_until_waiting()
    kvlog(target_args(data), "put", "watched:1", '"after"')
    put_returned = time.monotonic()
    response = poll.result()
    assert response.status_code == 200, response.text
    assert response.json() == "after" and response.headers["etag"] != etag
    # Woken by the change, not by the 30 s timeout.
    assert poll.answered_at - put_returned < 5


def test_a_long_poll_on_one_server_is_woken_by_a_write_through_the_other(
    pair: tuple[Path, Served, Served],
) -> None:
    _, a, b = pair
    b.client.put("/v1/keys/watched:2", json=1)
    etag = a.client.get("/v1/keys/watched:2").headers["etag"]
    poll = LongPoll(a, "watched:2", etag)
    poll.wait_until_waiting()
    assert b.client.put("/v1/keys/watched:2", json=2).status_code == 200
    put_returned = time.monotonic()
    response = poll.result()
    assert response.status_code == 200 and response.json() == 2
    assert poll.answered_at - put_returned < 5


def test_a_long_poll_sees_a_delete_and_a_creation(pair: tuple[Path, Served, Served]) -> None:
    data, a, b = pair
    b.client.put("/v1/keys/watched:3", json="here")
    poll = LongPoll(a, "watched:3", a.client.get("/v1/keys/watched:3").headers["etag"])
    poll.wait_until_waiting()
    kvlog(target_args(data), "del", "watched:3")
    assert poll.result().status_code == 404
    # Without If-None-Match, the wait is for a value other than the one at request time: absent.
    poll = LongPoll(a, "watched:3", None)
    poll.wait_until_waiting()
    b.client.put("/v1/keys/watched:3", json="back")
    response = poll.result()
    assert response.status_code == 200 and response.json() == "back"


def test_a_write_to_another_key_does_not_answer_a_long_poll(pair: tuple[Path, Served, Served]) -> None:
    _, a, b = pair
    a.client.put("/v1/keys/watched:4", json="same")
    etag = a.client.get("/v1/keys/watched:4").headers["etag"]
    poll = LongPoll(a, "watched:4", etag, wait=1.5)
    poll.wait_until_waiting()
    for i in range(5):
        b.client.put(f"/v1/keys/other:{i}", json=i)
    b.client.put("/v1/keys/watched:4", json="same")  # rewritten with the same value: same ETag
    assert poll.result().status_code == 304
