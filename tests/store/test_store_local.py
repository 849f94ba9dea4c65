"""KVLog on its embedded default: a real database with nothing else installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from kvlog import KVLog, LocalLog, LogLockedError, RecordTooLargeError
from kvlog.log import Record


def _log_records(path: Path) -> list[Record]:
    """Every record of the embedded log at ``path``, read with a fresh reader."""
    lg = LocalLog(path, background_compaction=False)
    try:
        reader = lg.open_reader(lg.begin_offsets())
        records: list[Record] = []
        while reader.positions() != lg.end_offsets():
            records.extend(reader.poll(1.0, 10_000))
        reader.close()
        return records
    finally:
        lg.close()


class TestDefault:
    def test_a_path_alone_is_a_durable_database(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            kv["order:42"] = {"status": "paid"}
            kv.update({f"k{i}": i for i in range(100)})
            del kv["k7"]
            assert kv.log.kind == "local"
            assert repr(kv) == f"<KVLog {str(tmp_path)!r} mirroring embedded log at {tmp_path / 'log'}>"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "log"]
        with KVLog(tmp_path) as kv:
            assert kv.open_replay["mode"] == "warm" and kv.open_replay["records"] == 0
            assert kv["order:42"] == {"status": "paid"} and "k7" not in kv and len(kv) == 100

    def test_a_lost_cache_is_rebuilt_from_the_log(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            kv.update({f"k{i:03d}": [i] for i in range(500)})
            kv.discard("k001")
            before = dict(kv.items())
        shutil.rmtree(tmp_path / "cache")
        with KVLog(tmp_path) as kv:
            assert kv.open_replay["mode"] == "cold" and kv.open_replay["records"] == 501
            assert dict(kv.items()) == before

    def test_each_write_is_in_the_log_when_it_returns(self, tmp_path: Path) -> None:
        with KVLog(tmp_path, follow=False) as kv:
            kv["a"] = 1
            kv["b"] = 2
            del kv["a"]
            records = _log_records_while_open(kv)
        assert [(r.key, r.value is None) for r in records] == [(b"a", False), (b"b", False), (b"a", True)]

    @pytest.mark.parametrize("fsync", ["always", "interval", "never"])
    def test_every_fsync_policy_keeps_acknowledged_writes_across_reopen(
        self, tmp_path: Path, fsync: str
    ) -> None:
        with KVLog(tmp_path, fsync=fsync) as kv:
            kv.update({f"k{i}": i for i in range(50)})
            assert kv.log.fsync == fsync  # type: ignore[attr-defined]
        with KVLog(tmp_path, fsync=fsync) as kv:
            assert dict(kv.items()) == {f"k{i}": i for i in range(50)}

    def test_a_cache_left_unsynced_across_a_reboot_is_rebuilt_from_the_log(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """fsync="never" does not sync the cache either; after a (simulated) reboot it is not trusted."""
        boot = tmp_path / "boot_id"
        boot.write_text("boot-1\n")
        monkeypatch.setattr("kvlog.cache._BOOT_ID", boot)
        code = (
            "import sys, pathlib, kvlog.cache\n"
            f"kvlog.cache._BOOT_ID = pathlib.Path({str(boot)!r})\n"
            "from kvlog import KVLog\n"
            f"kv = KVLog({str(tmp_path / 'db')!r}, fsync='never')\n"
            "kv.update({f'k{i}': i for i in range(300)})\n"
            "print('written', flush=True)\n"
            "sys.stdin.read()\n"
        )
        with subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as child:
            assert child.stdout is not None and child.stdout.readline() == b"written\n"
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        boot.write_text("boot-2\n")
        with KVLog(tmp_path / "db", fsync="never") as kv:
            assert kv.open_replay["mode"] == "cold"
            assert "restarted" in (kv.open_replay["rebuild_reason"] or "")
            assert dict(kv.items()) == {f"k{i}": i for i in range(300)}
        with KVLog(tmp_path / "db", fsync="never") as kv:  # closed cleanly: warm again
            assert kv.open_replay["mode"] == "warm" and kv.open_replay["rebuild_reason"] is None

    def test_an_unknown_fsync_policy_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="fsync must be one of always, interval, never"):
            KVLog(tmp_path, fsync="sometimes")

    def test_fsync_is_refused_for_kafka(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="fsync= applies to the embedded log"):
            KVLog(tmp_path, bootstrap_servers="127.0.0.1:1", topic="t", fsync="never")

    def test_half_a_kafka_configuration_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="both bootstrap_servers= and topic="):
            KVLog(tmp_path, topic="orders")
        assert not (tmp_path / "log").exists(), "no embedded log was created by mistake"


def _log_records_while_open(kv: KVLog) -> list[Record]:
    reader = kv.log.open_reader(kv.log.begin_offsets())
    records: list[Record] = []
    while reader.positions() != kv.log.end_offsets():
        records.extend(reader.poll(1.0, 10_000))
    reader.close()
    return records


class TestMisuse:
    def test_a_second_writer_is_refused_with_the_holders_pid(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            kv["a"] = 1
            with pytest.raises(LogLockedError, match=f"open for writing by process {os.getpid()}"):
                KVLog(tmp_path)
            assert kv["a"] == 1, "the refused open disturbed nothing"
        with KVLog(tmp_path) as kv:  # closing released the lock
            assert kv["a"] == 1

    def test_a_refused_store_releases_the_log_it_was_given(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="codec"):
            KVLog(tmp_path, log=LocalLog(tmp_path / "log"), codec="no-such-codec")
        with KVLog(tmp_path) as kv:  # the writer lock was released with the refused store
            kv["a"] = 1

    def test_an_oversize_record_writes_nothing(self, tmp_path: Path) -> None:
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", max_record_bytes=1000)) as kv:
            kv["small"] = "x"
            end = kv.log.end_offsets()
            with pytest.raises(RecordTooLargeError, match="larger than the log accepts"):
                kv.update({"a": "y", "big": "x" * 2000})
            assert kv.log.end_offsets() == end and "a" not in kv

    @pytest.mark.parametrize("key", [1, None, 2.5, ("t",)])
    def test_bad_key_types_write_nothing(self, tmp_path: Path, key: object) -> None:
        with KVLog(tmp_path) as kv:
            with pytest.raises(TypeError):
                kv[key] = 1  # type: ignore[index]
            assert kv.log.end_offsets() == {0: 0}

    def test_an_unencodable_value_writes_nothing(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            with pytest.raises(TypeError):
                kv.update({"a": 1, "b": object()})
            assert kv.log.end_offsets() == {0: 0} and len(kv) == 0


class TestResume:
    def _interrupted_rewarm(self, path: Path, records: int) -> dict[int, int]:
        """Leave a cache that a rewarm rebuilt only partly, as a killed rewarm does."""
        with KVLog(path, follow=False) as kv:
            kv.update({f"k{i:06d}": i for i in range(records)})
        cache_dir = path / "cache"
        from kvlog.cache import Cache
        from kvlog.replay import Replayer

        lg = LocalLog(path / "log", background_compaction=False)
        cache = Cache(cache_dir)
        identity = cache.identity()  # what the store bound the cache to
        assert identity is not None
        try:
            replayer = Replayer(lg, cache)
            replayer.reset(identity)
            replayer.step(1.0, max_records=records // 3)
            checkpoint = cache.checkpoint()
            replayer.close()
        finally:
            cache.close()
            lg.close()
        return checkpoint

    def test_a_partial_rewarm_resumes_from_its_checkpoint(self, tmp_path: Path) -> None:
        checkpoint = self._interrupted_rewarm(tmp_path, 3000)
        assert 0 < checkpoint[0] < 3000
        with KVLog(tmp_path) as kv:
            assert kv.open_replay["rebuild_reason"] is None
            assert kv.open_replay["records"] == 3000 - checkpoint[0]
            assert len(kv) == 3000

    def test_a_cache_behind_a_dropped_tombstone_is_rebuilt(self, tmp_path: Path) -> None:
        """The embedded log knows exactly when compaction dropped a delete a cache has not seen."""
        small = {"segment_bytes": 1024, "tombstone_retention": 0.0, "background_compaction": False}
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", **small)) as kv:  # type: ignore[arg-type]
            kv["doomed"] = "alive"
            kv.update({f"pad{i}": "x" * 50 for i in range(40)})
        # An old copy of the cache: it holds "doomed", and its checkpoint is before the delete.
        shutil.copytree(tmp_path / "cache", tmp_path / "old-cache")
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", **small)) as kv:  # type: ignore[arg-type]
            del kv["doomed"]
            kv.update({f"pad{i}": "y" * 50 for i in range(40)})  # rolls the tombstone into a closed segment
            report = kv.log.compact()  # type: ignore[attr-defined]
            assert report["tombstones_dropped"] >= 1
            assert all(r.key != b"doomed" for r in _log_records_while_open(kv)), "the delete is gone"
        shutil.rmtree(tmp_path / "cache")
        shutil.move(tmp_path / "old-cache", tmp_path / "cache")
        with KVLog(tmp_path) as kv:
            assert "tombstones" in (kv.open_replay["rebuild_reason"] or "")
            assert "doomed" not in kv, "a missed delete must not resurrect the key"

    def test_a_cache_behind_only_live_records_resumes(self, tmp_path: Path) -> None:
        small = {"segment_bytes": 1024, "tombstone_retention": 0.0, "background_compaction": False}
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", **small)) as kv:  # type: ignore[arg-type]
            kv.update({f"pad{i}": "x" * 50 for i in range(40)})
        shutil.copytree(tmp_path / "cache", tmp_path / "old-cache")
        with KVLog(tmp_path, log=LocalLog(tmp_path / "log", **small)) as kv:  # type: ignore[arg-type]
            kv.update({f"pad{i}": "y" * 50 for i in range(40)})
            kv.log.compact()  # type: ignore[attr-defined]
            expected = dict(kv.items())
        shutil.rmtree(tmp_path / "cache")
        shutil.move(tmp_path / "old-cache", tmp_path / "cache")
        with KVLog(tmp_path) as kv:
            assert kv.open_replay["mode"] == "warm" and kv.open_replay["rebuild_reason"] is None
            assert dict(kv.items()) == expected


def _bytes_read_by_this_process() -> int:
    """Bytes this process got from read()/pread() calls so far (Linux ``/proc/self/io``: rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _log_bytes(log_dir: Path) -> int:
    return sum(f.stat().st_size for f in log_dir.glob("*/*.log"))


def _cleaner_idle(kv: KVLog) -> bool:
    cleaner = kv.log.stats()["cleaner"]  # type: ignore[attr-defined]
    return bool(cleaner["handled"] == cleaner["wakeups"])


class TestColdReplay:
    """Rebuilding a lost cache reads the log once, and does not start a compaction that has nothing to do."""

    @pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
    def test_a_cold_replay_reads_each_segment_once(self, tmp_path: Path) -> None:
        """A replayer entering a closed segment at its base reads it from there: no second scan of the file."""

        def store() -> KVLog:
            log = LocalLog(tmp_path / "log", segment_bytes=256 * 1024, background_compaction=False)
            return KVLog(tmp_path, log=log)

        with store() as kv:
            for start in range(0, 30_000, 1000):
                kv.update({f"key:{i:06d}": {"n": i, "pad": "x" * 80} for i in range(start, start + 1000)})
        shutil.rmtree(tmp_path / "cache")
        log_bytes = _log_bytes(tmp_path / "log")
        assert len(list((tmp_path / "log" / "0").glob("*.log"))) > 10
        read_before = _bytes_read_by_this_process()
        with store() as kv:
            read = _bytes_read_by_this_process() - read_before
            assert kv.open_replay["mode"] == "cold" and len(kv) == 30_000
        assert read < 1.2 * log_bytes, f"the replay read {read} bytes of a {log_bytes}-byte log"

    def test_a_store_of_keys_written_once_is_never_compacted(self, tmp_path: Path) -> None:
        """Background compaction on (the default): writing new keys, and rebuilding the cache, compact nothing."""

        def store() -> KVLog:
            return KVLog(tmp_path, log=LocalLog(tmp_path / "log", segment_bytes=1024))

        with store() as kv:
            for start in range(0, 600, 20):
                kv.update({f"key:{i:04d}": "v" * 50 for i in range(start, start + 20)})
            # Rolls woke the cleaner: let it handle them all before close (which aborts a pass).
            wait_until(lambda: _cleaner_idle(kv), timeout=30, what="the cleaner to handle the rolls")
            assert kv.log.last_compaction is None  # type: ignore[attr-defined]
        segments = sorted((tmp_path / "log" / "0").glob("*.log"))
        assert len(segments) > 10
        closed = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in segments[:-1]}
        shutil.rmtree(tmp_path / "cache")
        with store() as kv:
            assert kv.open_replay["mode"] == "cold" and len(kv) == 600
            assert kv.log.stats()["cleaner"]["wakeups"] == 0  # type: ignore[attr-defined]  # not woken
            assert kv.log.last_compaction is None  # type: ignore[attr-defined]
        assert not (tmp_path / "log" / "cleaner-checkpoint.json").exists(), "a compaction pass ran"
        assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in closed} == closed
