"""KVLog on its embedded default: a real database with nothing else installed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

from kvlog import ClosedError, KVLog, LocalLog, RecordTooLargeError
from kvlog.log import Record
from kvlog.verify import verify


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
    def test_a_second_store_opens_beside_the_first_and_both_see_each_others_writes(
        self, tmp_path: Path
    ) -> None:
        """No store holds the data directory for itself: a second open, here or in another process, works."""
        with KVLog(tmp_path) as kv:
            kv["a"] = 1
            with KVLog(tmp_path) as other:
                assert other["a"] == 1
                other["b"] = 2
                assert kv["b"] == 2, "a write through the second store is not read through the first"
                kv["c"] = 3
                assert other["c"] == 3, "a write through the first store is not read through the second"
            assert dict(kv.items()) == {"a": 1, "b": 2, "c": 3}, (
                "closing the second store disturbed the first"
            )
            # Another process opens it too, reads this one's writes and writes its own.
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys\nfrom kvlog import KVLog\n"
                    "with KVLog(sys.argv[1]) as kv:\n    kv['d'] = kv['c'] + 1\n",
                    str(tmp_path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            assert kv["d"] == 4, "the other process's write is not read here"
            kv["e"] = 5
        with KVLog(tmp_path) as kv:
            assert dict(kv.items()) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}

    def test_a_refused_store_releases_the_log_it_was_given(self, tmp_path: Path) -> None:
        given = LocalLog(tmp_path / "log")
        with pytest.raises(ValueError, match="codec"):
            KVLog(tmp_path, log=given, codec="no-such-codec")
        with pytest.raises(ClosedError):  # the refused store closed the log it owned
            given.append([(b"k", b"v")])
        with KVLog(tmp_path) as kv:
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


class TestBesideOtherUsers:
    """Maintenance beside readers and writers: a rewarm and a verify need no quiet store."""

    @staticmethod
    def _wait_for_more(counter: list[int], done: threading.Event, more: int = 20) -> None:
        """Called between batches: let the other thread do ``more`` operations first (so they overlap)."""
        target = counter[0] + more
        deadline = time.monotonic() + 30
        while counter[0] < target and not done.is_set():
            assert time.monotonic() < deadline, "the other thread made no progress"
            time.sleep(0.001)  # polling interval of a deadline-bounded wait

    def test_a_reader_sees_every_key_while_a_rewarm_runs(self, tmp_path: Path) -> None:
        expected = {f"k{i:05d}": i for i in range(30_000)}
        with KVLog(tmp_path) as kv:
            kv.update(expected)
            generation = kv.stats()["cache_generation"]
            reads = [0]
            done = threading.Event()
            wrong: list[str] = []

            def reader() -> None:
                keys = list(expected)
                try:
                    while not done.is_set():
                        key = keys[reads[0] * 7919 % len(keys)]
                        if kv.get(key) != expected[key]:
                            wrong.append(f"{key} read as {kv.get(key)!r}")
                        if reads[0] % 50 == 0 and len(kv) != len(expected):
                            wrong.append(f"len() was {len(kv)}")
                        reads[0] += 1
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    wrong.append(repr(exc))

            batches = [0]

            def progress(applied: dict[int, int], targets: dict[int, int]) -> None:
                batches[0] += 1
                self._wait_for_more(reads, done)

            thread = threading.Thread(target=reader)
            thread.start()
            try:
                kv.rewarm(progress=progress)
                reads_at_switch = reads[0]
                self._wait_for_more(reads, done)  # and after the switch
            finally:
                done.set()
                thread.join(timeout=30)
            assert not wrong, f"a reader saw a half-built cache during the rewarm: {wrong[:5]}"
            assert batches[0] >= 2 and reads_at_switch > 0
            assert kv.stats()["cache_generation"] > generation
            assert dict(kv.items()) == expected

    def test_verify_succeeds_while_another_store_writes(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv, KVLog(tmp_path) as writer:
            kv.update({f"k{i:05d}": i for i in range(30_000)})
            writes = [0]
            done = threading.Event()
            failed: list[BaseException] = []

            def write() -> None:
                try:
                    while not done.is_set():
                        writer[f"w{writes[0] % 500:03d}"] = writes[0]
                        writes[0] += 1
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    failed.append(exc)

            thread = threading.Thread(target=write)
            thread.start()
            try:
                before = writes[0]
                report = verify(kv, progress=lambda applied, target: self._wait_for_more(writes, done))
                during = writes[0] - before
            finally:
                done.set()
                thread.join(timeout=30)
            assert not failed, failed
            assert report.ok, report
            assert during > 0 and report.checked >= 30_000
            assert kv.stats()["checkpoint"] != report.checkpoint, "the checkpoint did not move during verify"
            assert verify(kv).ok


class TestResume:
    def _interrupted_rewarm(self, path: Path, records: int) -> dict[int, int]:
        """Leave a cache rebuilt in place only partly, as a process killed in a rebuild at open does.

        (``rewarm()`` builds beside the live cache, so a killed rewarm leaves
        the live cache whole: tests/log/test_local_crash.py.)
        """
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
