"""The Kafka reader's hold: while this process writes, its reader leaves its sockets unread, for a bounded time.

A write returns once acknowledged and applied; the follower's fetch brings
the same record back at that moment. The hold keeps the reader's network
thread from handling that response while the write waits for its
acknowledgement, and never for longer than ``_HOLD_SECONDS``, so that writes
cannot starve replay.
"""

from __future__ import annotations

import threading
import time

import pytest

import kvlog.log.kafka as kafka_log
from kvlog.log.kafka import _ReadHold


def _waiter(hold: _ReadHold) -> tuple[threading.Thread, list[float]]:
    done: list[float] = []

    def run() -> None:
        hold.wait()
        done.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_without_a_write_a_read_goes_ahead_at_once() -> None:
    hold = _ReadHold()
    thread, done = _waiter(hold)
    thread.join(5)
    assert done, "the read waited although nothing was written"


def test_a_read_waits_until_the_write_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_log, "_HOLD_SECONDS", 60.0)
    hold = _ReadHold()
    with hold.writing():
        thread, done = _waiter(hold)
        thread.join(0.2)  # the read must still be held here
        assert not done, "the read went ahead while a write was in flight"
        released = time.monotonic()
    thread.join(5)
    assert done and done[0] >= released


def test_two_writes_hold_reads_until_both_are_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_log, "_HOLD_SECONDS", 60.0)
    hold = _ReadHold()
    first, second = hold.writing(), hold.writing()
    first.__enter__()
    second.__enter__()
    thread, done = _waiter(hold)
    first.__exit__(None, None, None)
    thread.join(0.2)
    assert not done, "the read went ahead while the second write was in flight"
    second.__exit__(None, None, None)
    thread.join(5)
    assert done


def test_a_write_that_fails_lets_reads_go_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_log, "_HOLD_SECONDS", 60.0)
    hold = _ReadHold()
    with pytest.raises(RuntimeError), hold.writing():
        raise RuntimeError("the broker refused")
    thread, done = _waiter(hold)
    thread.join(5)
    assert done


def test_writes_never_hold_a_read_longer_than_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes one after another (here: one that never ends) cannot starve replay."""
    monkeypatch.setattr(kafka_log, "_HOLD_SECONDS", 0.05)
    hold = _ReadHold()
    with hold.writing():
        started = time.monotonic()
        thread, done = _waiter(hold)
        thread.join(5)
        assert done, "the read was held past the bound"
        assert done[0] - started >= 0.05
