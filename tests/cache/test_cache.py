"""The LMDB cache on its own: batches and checkpoints are atomic, the map grows, crashes leave a prefix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import wait_until

from kvlog import ClosedError
from kvlog.cache import Cache
from kvlog.log import Record


def rec(key: bytes, value: bytes | None, offset: int = 0) -> Record:
    return Record(0, offset, key, value)


def test_apply_writes_records_and_checkpoint_together(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.reset({"kind": "test"})
    assert cache.apply([rec(b"a", b"1"), rec(b"b", b"2"), rec(b"a", None)], {0: 3}) == (3, 0)
    assert cache.get(b"a") is None and cache.get(b"b") == b"2"
    assert cache.checkpoint() == {0: 3}
    assert len(cache) == 1
    cache.close()
    reopened = Cache(tmp_path)
    assert reopened.checkpoint() == {0: 3} and reopened.identity() == {"kind": "test"}
    reopened.close()


def test_records_with_keys_lmdb_cannot_hold_are_skipped_and_counted(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    records = [rec(None, b"x"), rec(b"", b"x"), rec(b"k" * 512, b"x"), rec(b"ok", b"1")]  # type: ignore[arg-type]
    applied, skipped = cache.apply(records, {0: 4})
    assert (applied, skipped) == (1, 3)
    assert list(cache.keys()) == [b"ok"] and cache.checkpoint() == {0: 4}
    cache.close()


def test_reset_drops_data_and_rebinds_identity(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.reset({"topic": "a"})
    cache.apply([rec(b"k", b"v")], {0: 1})
    cache.reset({"topic": "b"})
    assert len(cache) == 0 and cache.checkpoint() == {} and cache.identity() == {"topic": "b"}
    cache.close()


def test_map_grows_when_a_batch_does_not_fit(tmp_path: Path) -> None:
    cache = Cache(tmp_path, map_size=256 * 1024)
    value = os.urandom(2000)
    records = [rec(b"k%06d" % i, value) for i in range(2000)]  # ~4 MB: many times the map
    cache.apply(records, {0: 2000})
    assert len(cache) == 2000 and cache.map_size >= 4 * 1024 * 1024
    assert cache.get(b"k001999") == value
    cache.close()


def test_map_grows_while_other_threads_read(tmp_path: Path) -> None:
    """Readers in other threads never see a torn map while the writer resizes it."""
    cache = Cache(tmp_path, map_size=128 * 1024)
    cache.apply([rec(b"anchor", b"A")], {0: 1})
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                assert cache.get(b"anchor") == b"A"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for batch in range(20):
            cache.apply(
                [rec(b"b%02d-%04d" % (batch, i), os.urandom(500)) for i in range(200)], {0: batch + 2}
            )
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors
    assert len(cache) == 1 + 20 * 200
    assert cache.map_size >= 2 * 1024 * 1024  # it did grow, several times, under the readers
    cache.close()


def test_close_while_threads_read(tmp_path: Path) -> None:
    """Readers racing close() get their value or ClosedError, never a closed environment."""
    cache = Cache(tmp_path)
    cache.apply([rec(b"anchor", b"A")], {0: 1})
    outcomes: list[object] = []
    reading = threading.Barrier(5)

    def reader() -> None:
        reading.wait()
        try:
            while True:
                assert cache.get(b"anchor") == b"A"
        except ClosedError as exc:
            outcomes.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcomes.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    reading.wait()
    cache.close()
    for t in threads:
        t.join(timeout=30)
    assert [type(o) for o in outcomes] == [ClosedError] * 4


def test_items_respects_bounds_across_chunks(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.apply([rec(b"p%05d" % i, b"v") for i in range(1500)] + [rec(b"q", b"v")], {0: 1501})
    keys = [k for k, _ in cache.items(prefix=b"p")]
    assert keys == [b"p%05d" % i for i in range(1500)]
    assert [k for k, _ in cache.items(start=b"p01499")] == [b"p01499", b"q"]
    assert [k for k, _ in cache.items(stop=b"p00002")] == [b"p00000", b"p00001"]
    cache.close()


def test_use_after_close_is_a_closed_error(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.close()
    cache.close()
    with pytest.raises(ClosedError):
        cache.get(b"k")


CHILD = textwrap.dedent(
    """
    import sys
    from kvlog.cache import Cache
    from kvlog.log import Record

    cache = Cache(sys.argv[1], map_size=1 << 20)  # small: the crash also lands inside map growth
    n = cache.checkpoint().get(0, 0)
    print("ready", flush=True)
    while True:
        # Batch n overwrites 200 keys with n and adds key n%06d: the cache after
        # batch n is exactly {k*: n, n0..n: their n}. A torn batch shows mixed values.
        value = str(n).encode()
        batch = [Record(0, n, b"k%03d" % i, value) for i in range(200)]
        batch.append(Record(0, n, b"n%06d" % n, value))
        cache.apply(batch, {0: n + 1})
        n += 1
    """
)


@pytest.mark.parametrize("round_", range(3))
def test_sigkill_during_apply_leaves_a_prefix_matching_the_checkpoint(tmp_path: Path, round_: int) -> None:
    """A process killed mid-transaction leaves data and checkpoint from the same committed batch."""
    path = tmp_path / "cache"
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        progress = Cache(path)
        start = progress.checkpoint().get(0, 0)
        # Let it get well into committing batches, then kill it wherever it is.
        target = start + 5 + 7 * round_
        wait_until(lambda c=progress, t=target: c.checkpoint().get(0, 0) >= t, timeout=60)
        progress.close()
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        cache = Cache(path)
        checkpoint = cache.checkpoint()[0]
        last = str(checkpoint - 1).encode()
        contents = dict(cache.items())
        cache.close()
        expected = {b"k%03d" % i: last for i in range(200)} | {
            b"n%06d" % n: str(n).encode() for n in range(checkpoint)
        }
        assert contents == expected


# -- an unsynced cache (the embedded log with fsync="interval" or "never") -----

UNSYNCED_CHILD = textwrap.dedent(
    """
    import sys
    from kvlog.cache import Cache
    from kvlog.log import Record

    cache = Cache(sys.argv[1], sync=False)
    cache.apply([Record(0, i, b"k%04d" % i, b"v%d" % i) for i in range(500)], {0: 500})
    print("applied", flush=True)
    sys.stdin.read()  # killed here, never closed
    """
)


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /proc/sys/kernel/random/boot_id: write another id to "reboot"."""
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setattr("kvlog.cache._BOOT_ID", path)
    return path


def _kill_after_apply(cache_dir: Path, boot: Path) -> None:
    code = (
        f"import kvlog.cache, pathlib; kvlog.cache._BOOT_ID = pathlib.Path({str(boot)!r})\n" + UNSYNCED_CHILD
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(cache_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    with child:
        assert child.stdout is not None
        assert child.stdout.readline() == b"applied\n"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)


def test_an_unsynced_cache_outlives_a_killed_process(tmp_path: Path, boot: Path) -> None:
    _kill_after_apply(tmp_path / "cache", boot)
    cache = Cache(tmp_path / "cache")
    assert cache.discarded is None
    assert len(cache) == 500 and cache.checkpoint() == {0: 500}
    env_path = cache.env_path
    assert (env_path / "UNSYNCED").exists()  # the killed writer's marker, still there while open
    cache.close()
    assert not (env_path / "UNSYNCED").exists()  # synced and closed: now it survives a reboot too


def test_an_unsynced_cache_left_open_across_a_reboot_is_discarded(tmp_path: Path, boot: Path) -> None:
    _kill_after_apply(tmp_path / "cache", boot)
    boot.write_text("boot-2\n")
    cache = Cache(tmp_path / "cache")
    assert cache.discarded is not None and "restarted" in cache.discarded
    assert len(cache) == 0 and cache.checkpoint() == {}
    cache.close()


def test_an_unsynced_cache_closed_cleanly_survives_a_reboot(tmp_path: Path, boot: Path) -> None:
    cache = Cache(tmp_path / "cache", sync=False)
    assert not cache.sync and (cache.env_path / "UNSYNCED").read_text() == "boot-1\n"
    cache.apply([rec(b"k", b"v")], {0: 1})
    cache.close()
    boot.write_text("boot-2\n")
    cache = Cache(tmp_path / "cache")
    assert cache.discarded is None and cache.get(b"k") == b"v"
    cache.close()


def test_a_synced_cache_has_no_marker_and_without_a_boot_id_nothing_is_unsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(tmp_path / "a")
    assert cache.sync and cache.env_path.is_dir() and not (cache.env_path / "UNSYNCED").exists()
    cache.close()
    monkeypatch.setattr("kvlog.cache._BOOT_ID", tmp_path / "missing")
    cache = Cache(tmp_path / "b", sync=False)
    assert cache.sync  # cannot tell a reboot: sync every commit
    cache.close()
