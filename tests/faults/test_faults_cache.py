"""Cache and disk faults: killed replays, damaged cache files, full maps and disks, reader slots, fork, file modes.

The cache and disk rows of the README's "Guarantees and failure modes". The children are
``tests/_fault_child.py``; crashes are real SIGKILLs, a damaged cache is opened
in a child process (a crash there is a signal exit, not a dead pytest), a full
disk is a real small tmpfs (or, where mounting is not allowed, a file-size
limit), and fork() is a real fork.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from _fault_child import digest, full_disk
from conftest import TESTS
from ondisk import active_segments, cache_contents, cache_env_dir, fold_log, log_head_clean, torn_tail

from kvlog import ClosedError, KVLog
from kvlog.cache import Cache
from kvlog.codec import get_codec
from kvlog.errors import CacheError
from kvlog.log.local import LocalLog
from kvlog.verify import verify

CHILD = TESTS / "_fault_child.py"
MSGPACK = get_codec("msgpack")


def run_child(mode: str, path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), mode, str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def raw_contents(path: Path) -> dict[bytes, bytes]:
    return cache_contents(path)[0]


# -- SIGKILL stepped through a replay ------------------------------------------------------------

BATCH = 32


@pytest.fixture(scope="module")
def replay_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded log of 420 records (puts, overwrites, deletes) over 2 partitions, and a warm cache."""
    path = tmp_path_factory.mktemp("replay") / "data"
    local = LocalLog(path / "log", partitions=2, background_compaction=False)
    for round_ in range(6):
        batch: list[tuple[bytes, bytes | None]] = []
        for i in range(70):
            key = b"k%03d" % ((i * 7 + round_ * 13) % 120)
            if (i + round_) % 9 == 0:
                batch.append((key, None))
            else:
                batch.append((key, MSGPACK.encode({"round": round_, "i": i})))
        local.append(batch)
    local.close()
    KVLog(path, follow=False).close()
    return path


def kill_replay(tmp_path: Path, source: Path, how: str, kill_at: str) -> tuple[Path, str]:
    """Copy the source, run a replay child that SIGKILLs itself at ``kill_at``; return the copy and its stdout."""
    path = tmp_path / f"{how}-{kill_at.replace(':', '-')}"
    shutil.copytree(source, path)
    if how == "open":
        shutil.rmtree(path / "cache")
    done = run_child("replay", path, "--how", how, "--kill-at", kill_at, "--batch", str(BATCH))
    kind, _, n = kill_at.partition(":")
    assert done.returncode == -signal.SIGKILL, (
        f"the child did not kill itself at {kill_at}: {done.stderr[-2000:]}"
    )
    assert f"dying {kind} {n}\n" in done.stdout, done.stdout
    return path, done.stdout


def replay_totals(tmp_path: Path, source: Path, how: str) -> tuple[int, int]:
    """Record writes and write transactions of a whole replay (a child that is not killed)."""
    path = tmp_path / f"count-{how}"
    shutil.copytree(source, path)
    if how == "open":
        shutil.rmtree(path / "cache")
    done = run_child("replay", path, "--how", how, "--batch", str(BATCH))
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    ops, txns = (int(part.split("=")[1]) for part in line.split()[1:])
    shutil.rmtree(path)
    return ops, txns


def check_after_kill(path: Path, full: dict[bytes, bytes], label: str, how: str = "open") -> None:
    """The cache is the log folded up to its checkpoint; reopening completes it; verify finds nothing.

    A rewarm builds beside the live cache, so a kill anywhere in it leaves a
    whole live cache (the old one, or the new one if the switch was done), and
    the partial generation is deleted by the next open.
    """
    cached, checkpoint, identity = cache_contents(path / "cache")
    assert sorted((path / "cache").glob("gen-*")) == [cache_env_dir(path / "cache")], (
        f"{label}: a generation other than the live one is left after an open"
    )
    if how == "rewarm":
        assert cached == full, f"{label}: the live cache is not whole after a rewarm was killed"
    prefix, end, after = fold_log(path / "log", upto=checkpoint)
    assert cached == prefix, (
        f"{label}: the cache is not the log folded up to its checkpoint {checkpoint} "
        f"({len(cached)} entries, the prefix has {len(prefix)})"
    )
    if checkpoint:
        assert identity is not None and identity["kind"] == "local", label
    with KVLog(path, follow=False) as kv:
        opened = kv.open_replay
        assert kv.stats()["checkpoint"] == end, label
        if checkpoint:  # resumed from the checkpoint, not rebuilt
            assert opened["rebuild_reason"] is None and opened["records"] == sum(after.values()), (
                label,
                opened,
            )
        report = verify(kv)
        assert report.ok, f"{label}: verify after reopening: {report}"
    assert raw_contents(path / "cache") == full, f"{label}: the reopened cache is not the whole log folded"
    shutil.rmtree(path)


def kill_points(ops: int, txns: int, op_step: int) -> list[str]:
    points = [f"op:{n}" for n in range(1, ops + 1, op_step)] + [f"op:{ops}"]
    points += [f"{kind}:{n}" for n in range(1, txns + 1) for kind in ("commit", "committed")]
    return points


@pytest.mark.parametrize("how", ["open", "rewarm"])
def test_replay_killed_at_stepped_points_leaves_a_prefix(
    tmp_path: Path, replay_source: Path, how: str
) -> None:
    """A few deterministic kill points: first and last record write, inside and after an early commit."""
    full, _, _ = fold_log(replay_source / "log")
    ops, txns = replay_totals(tmp_path, replay_source, how)
    assert ops >= 400 and txns >= 12, (ops, txns)  # many batches: the points below land in the middle
    for kill_at in [
        "op:1",
        f"op:{ops // 2}",
        f"op:{ops}",
        "commit:2",
        "committed:2",
        "committed:5",
        f"commit:{txns}",
    ]:
        path, _ = kill_replay(tmp_path, replay_source, how, kill_at)
        check_after_kill(path, full, f"{how} killed at {kill_at}", how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["open", "rewarm"])
def test_replay_killed_at_every_point_leaves_a_prefix(tmp_path: Path, replay_source: Path, how: str) -> None:
    """SQLite-style sweep: the kill point steps through every batch's writes, pre-commit and post-commit."""
    full, _, _ = fold_log(replay_source / "log")
    ops, txns = replay_totals(tmp_path, replay_source, how)
    points = kill_points(ops, txns, op_step=11)
    for kill_at in points:
        path, _ = kill_replay(tmp_path, replay_source, how, kill_at)
        check_after_kill(path, full, f"{how} killed at {kill_at}", how)
    print(f"{how}: {len(points)} kill points over {ops} record writes and {txns} transactions")


# -- a damaged data.mdb -------------------------------------------------------------------------

U16, U32, U64 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q")
P_BRANCH, F_SUBDATA = 0x01, 0x02
HEADER = 16  # LMDB 0.9's page header (kvlog's caches are created in that format)


class Pages:
    """Just enough of LMDB's on-disk format to find and damage a chosen structure of data.mdb."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.psize = U32.unpack_from(self.data, HEADER + 24)[0]
        metas = [self.meta(0), self.meta(1)]
        self.newest = max(range(2), key=lambda i: metas[i]["txnid"])

    def meta(self, i: int) -> dict[str, int]:
        base = i * self.psize + HEADER
        return {
            "main_root": U64.unpack_from(self.data, base + 72 + 40)[0],
            "txnid": U64.unpack_from(self.data, base + 128)[0],
        }

    def header(self, pgno: int) -> tuple[int, int]:
        """``(flags, number of nodes)`` of a branch or leaf page."""
        flags, lower = struct.unpack_from("=HH", self.data, pgno * self.psize + 10)
        return flags, (lower - HEADER) // 2

    def node(self, pgno: int, i: int) -> tuple[int, int, bytes]:
        """``(file offset of node i, child page number if a branch node, key)``."""
        ptr = U16.unpack_from(self.data, pgno * self.psize + HEADER + 2 * i)[0]
        at = pgno * self.psize + ptr
        lo, hi, flags, ksize = struct.unpack_from("=HHHH", self.data, at)
        return at, lo | hi << 16 | flags << 32, bytes(self.data[at + 8 : at + 8 + ksize])

    def pages(self, root: int) -> Iterator[tuple[int, str]]:
        stack = [root]
        while stack:
            pgno = stack.pop()
            flags, n = self.header(pgno)
            if flags & P_BRANCH:
                yield pgno, "branch"
                stack.extend(self.node(pgno, i)[1] for i in range(n))
            else:
                yield pgno, "leaf"

    def table_record(self, name: bytes) -> int:
        """File offset of the named table's record (an MDB_db) in the main table."""
        for pgno, kind in self.pages(self.meta(self.newest)["main_root"]):
            for i in range(self.header(pgno)[1] if kind == "leaf" else 0):
                at, _, key = self.node(pgno, i)
                if key == name:
                    return at + 8 + len(key)
        raise KeyError(name)

    def root(self, name: bytes) -> int:
        return int(U64.unpack_from(self.data, self.table_record(name) + 40)[0])

    def leaf(self, name: bytes = b"data", k: int = 3) -> int:
        return [pgno for pgno, kind in self.pages(self.root(name)) if kind == "leaf"][k]

    def value_at(self, pgno: int, i: int) -> tuple[int, bytes]:
        """File offset and bytes of the value of leaf node i (a value stored in the node)."""
        at, size, key = self.node(pgno, i)
        return at + 8 + len(key), bytes(
            self.data[at + 8 + len(key) : at + 8 + len(key) + (size & 0xFFFFFFFF)]
        )


def _set_leaf_flags(p: Pages) -> None:
    U16.pack_into(p.data, p.leaf() * p.psize + 10, 0)


def _set_leaf_bounds(p: Pages) -> None:
    U16.pack_into(p.data, p.leaf() * p.psize + 12, 0xFFF0)


def _set_leaf_node_pointer(p: Pages) -> None:
    U16.pack_into(p.data, p.leaf() * p.psize + HEADER + 2 * 3, 0xFFF0)


def _set_branch_child(target: Callable[[Pages, int], int]) -> Callable[[Pages], None]:
    def damage(p: Pages) -> None:
        branch = p.root(b"data")
        assert p.header(branch)[0] & P_BRANCH
        at, _, _ = p.node(branch, 1)
        child = target(p, branch)
        struct.pack_into("=HHH", p.data, at, child & 0xFFFF, (child >> 16) & 0xFFFF, child >> 32)

    return damage


def _set_key_byte(p: Pages) -> None:
    at, _, _ = p.node(p.leaf(), 3)
    p.data[at + 8] = 0  # sorts before the key in front of it


def _set_key_size(p: Pages) -> None:
    at, _, _ = p.node(p.leaf(), 3)
    U16.pack_into(p.data, at + 6, 0xFFFF)


def _set_table_root(p: Pages) -> None:
    U64.pack_into(p.data, p.table_record(b"data") + 40, 10**9)


def _set_meta_root(p: Pages) -> None:
    U64.pack_into(p.data, p.newest * p.psize + HEADER + 72 + 40, 10**9)


def _zero_meta(*which: int) -> Callable[[Pages], None]:
    def damage(p: Pages) -> None:
        for i in which:
            p.data[i * p.psize : (i + 1) * p.psize] = bytes(p.psize)

    return damage


def _truncate(keep: Callable[[int], int]) -> Callable[[Pages], None]:
    def damage(p: Pages) -> None:
        del p.data[keep(len(p.data)) :]

    return damage


#: Damage to data.mdb, and what opening the store did with it before kvlog checked caches first.
CORRUPTIONS: dict[str, Callable[[Pages], None]] = {
    "leaf-page-flags": _set_leaf_flags,  # was: SIGABRT (LMDB assertion IS_LEAF in mdb_cursor_next)
    "leaf-page-bounds": _set_leaf_bounds,  # was: CacheError at a read ("delete the cache directory")
    "leaf-node-pointer": _set_leaf_node_pointer,  # was: SIGBUS
    "branch-child-beyond-the-file": _set_branch_child(lambda p, b: 10**9),  # was: CacheError at a read
    "branch-child-a-meta-page": _set_branch_child(lambda p, b: 0),  # was: CacheError at a read
    "branch-child-itself": _set_branch_child(lambda p, b: b),  # was: CacheError (cursor stack full)
    "key-out-of-order": _set_key_byte,  # was: served silently (scans out of order, lookups miss)
    "key-size": _set_key_size,  # was: CacheError at a read
    "table-root": _set_table_root,  # was: CacheError at a read (MDB_BAD_TXN)
    "meta-root": _set_meta_root,  # was: CacheError at open
    "truncated-half": _truncate(lambda n: n // 2),  # was: CacheError at open
    "truncated-by-a-page": _truncate(lambda n: n - 4096),  # was: CacheError at open
    "truncated-to-100-bytes": _truncate(lambda n: 100),  # was: CacheError at open (MDB_INVALID)
    "zeroed-meta-0": _zero_meta(0),  # was: CacheError at open (MDB_INVALID)
    "zeroed-meta-1": _zero_meta(1),  # was: CacheError at open (MDB_INVALID)
    "zeroed-metas": _zero_meta(0, 1),  # was: CacheError at open (MDB_INVALID)
}


@pytest.fixture(scope="module")
def damage_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store of 3000 keys (a two-level tree, some deletes), closed cleanly; and its digest."""
    path = tmp_path_factory.mktemp("damage") / "data"
    with KVLog(path) as kv:
        kv.update({f"key{i:05d}": {"i": i, "pad": "x" * (i % 40)} for i in range(3000)})
        for i in range(0, 3000, 17):
            del kv[f"key{i:05d}"]
    return path, digest(raw_contents(path / "cache").items())


def damaged_copy(tmp_path: Path, source: Path, damage: Callable[[Pages], None]) -> tuple[Path, bytes]:
    path = tmp_path / "data"
    shutil.copytree(source, path)
    data_file = cache_env_dir(path / "cache") / "data.mdb"
    pages = Pages(data_file.read_bytes())
    damage(pages)
    data_file.write_bytes(bytes(pages.data))
    return path, bytes(pages.data)


class TestDamagedCache:
    @pytest.mark.parametrize("name", sorted(CORRUPTIONS))
    def test_is_moved_aside_and_rebuilt_without_a_crash(
        self, tmp_path: Path, damage_source: tuple[Path, str], name: str
    ) -> None:
        """No signal reaches the process; the cache is set aside (kept), named in a warning, and rebuilt."""
        source, expected = damage_source
        path, damaged = damaged_copy(tmp_path, source, CORRUPTIONS[name])
        done = run_child("open", path)
        assert done.returncode == 0, (
            f"opening a cache with {name} failed (exit {done.returncode}):\n{done.stderr}"
        )
        report = json.loads(done.stdout)
        reason = report["open_replay"]["rebuild_reason"]
        moved = Path(report["moved_to"])
        assert "damaged" in reason and str(moved) in reason, reason
        assert report["rebuilds"] == [reason] and report["open_replay"]["mode"] == "cold"
        assert moved.parent == path and moved.name.startswith("cache.corrupt-")
        assert (moved / "data.mdb").read_bytes() == damaged, "the damaged file is not kept as it was"
        assert f"WARNING kvlog.store: rebuilding the cache at {path}: {reason}" in done.stderr
        assert report["digest"] == expected, "the rebuilt cache is not the log folded"
        # The damaged generation went aside whole; HEAD names the new one, rebuilt in its place.
        assert sorted(p.name for p in (path / "cache").glob("gen-*")) == ["gen-000002"]
        assert cache_env_dir(path / "cache") == path / "cache" / "gen-000002"
        # The new cache was closed cleanly: the next open trusts it without a structure check.
        cache = Cache(path / "cache")
        assert cache.discarded is None and cache.structure_check_seconds is None
        assert cache.generation == 2
        cache.close()
        with KVLog(path) as kv:
            assert kv.open_replay["rebuild_reason"] is None

    @pytest.mark.parametrize("name", ["truncated-half", "truncated-by-a-page", "zeroed-metas"])
    def test_meta_pages_are_checked_even_when_the_file_looks_cleanly_closed(
        self, tmp_path: Path, damage_source: tuple[Path, str], name: str
    ) -> None:
        """The always-on check: a truncation under a matching stat (no structure check) is caught, not a SIGBUS."""
        source, expected = damage_source
        path, _ = damaged_copy(tmp_path, source, CORRUPTIONS[name])
        forge_clean_close(path / "cache")
        done = run_child("open", path)
        assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr}"
        report = json.loads(done.stdout)
        assert (
            report["structure_check_seconds"] is None
            and "data.mdb" in report["open_replay"]["rebuild_reason"]
        )
        assert report["digest"] == expected

    def test_a_flipped_value_byte_is_found_by_verify(
        self, tmp_path: Path, damage_source: tuple[Path, str]
    ) -> None:
        """LMDB has no checksums: a value byte is undetectable at open; kvlog.verify compares with the log."""
        source, _ = damage_source
        key: list[bytes] = []

        def flip_value(p: Pages) -> None:
            leaf = p.leaf()
            at, value = p.value_at(leaf, 5)
            key.append(p.node(leaf, 5)[2])
            p.data[at + len(value) - 1] ^= 0x01  # the last byte of the padding string: still msgpack

        path, _ = damaged_copy(tmp_path, source, flip_value)
        cache = Cache(path / "cache")
        # The file had changed, so its structure was checked, and found sound.
        assert cache.structure_check_seconds is not None and cache.discarded is None
        cache.close()
        with KVLog(path, follow=False) as kv:
            assert kv.open_replay["rebuild_reason"] is None
            report = verify(kv)
        assert not report.ok and (report.different, report.missing, report.extra) == (1, 0, 0)
        assert report.differences[0].key == key[0]

    def test_damage_lmdb_reports_at_run_time_marks_the_cache(
        self, tmp_path: Path, damage_source: tuple[Path, str]
    ) -> None:
        """Damage the checks at open cannot see (bit rot under an unchanged stat): a clear error, then a rebuild.

        The read raises CacheError naming ``kvlog rewarm``; ``rewarm()`` sets the
        cache aside rather than dropping a damaged tree; without it, the next
        open sets the cache aside.
        """
        source, expected = damage_source
        for then in ("rewarm", "reopen"):
            under: list[str] = []

            def damage(p: Pages, under: list[str] = under) -> None:
                # The key of a branch entry is the first key of the subtree it leads to.
                under.append(p.node(p.root(b"data"), 1)[2].decode())
                _set_branch_child(lambda p, b: 10**9)(p)

            path, _ = damaged_copy(tmp_path / then, source, damage)
            forge_clean_close(path / "cache")
            done = run_child("open", path, "--read", under[0], *(["--rewarm"] if then == "rewarm" else []))
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert (
                report["open_replay"]["rebuild_reason"] is None and report["structure_check_seconds"] is None
            )
            assert report["read"].startswith("CacheError: ") and "kvlog rewarm" in report["read"]
            assert "MDB_PAGE_NOTFOUND" in report["read"], report["read"]
            if then == "rewarm":
                # The rewarm built a new generation beside the damaged one; the
                # damaged one is kept for inspection, not deleted.
                aside = [p for p in path.iterdir() if p.name.startswith("cache.corrupt-")]
                assert len(aside) == 1, f"the damaged generation was not set aside: {sorted(path.iterdir())}"
                assert (aside[0] / "data.mdb").is_file() and (aside[0] / "DAMAGED").is_file()
                assert report["digest"] == expected
            else:
                assert (cache_env_dir(path / "cache") / "DAMAGED").exists()
                done = run_child("open", path)
                assert done.returncode == 0, done.stderr
                report = json.loads(done.stdout)
                assert "MDB_PAGE_NOTFOUND" in report["open_replay"]["rebuild_reason"], report
                assert report["digest"] == expected

    @pytest.mark.parametrize("byte", [0xC1, 0x92], ids=["not-msgpack", "a-list-not-a-map"])
    def test_a_garbled_checkpoint_is_set_aside_at_open(
        self, tmp_path: Path, damage_source: tuple[Path, str], byte: int
    ) -> None:
        """A meta value that is not what kvlog wrote (structure intact): set aside and rebuilt at open."""
        source, expected = damage_source

        def garble_checkpoint(p: Pages) -> None:
            leaf = p.root(b"meta")
            for i in range(p.header(leaf)[1]):
                if p.node(leaf, i)[2] == b"checkpoint":
                    at, value = p.value_at(leaf, i)
                    assert value[0] == 0x81  # a map of one partition; 0x92 reads it as a list of two
                    p.data[at] = byte  # 0xC1: a byte msgpack never uses
                    return
            raise AssertionError("no checkpoint in the meta table")

        path, _ = damaged_copy(tmp_path, source, garble_checkpoint)
        done = run_child("open", path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert "checkpoint in its meta table is garbled" in report["open_replay"]["rebuild_reason"]
        assert report["digest"] == expected

    def test_without_move_damaged_a_bare_cache_refuses(
        self, tmp_path: Path, damage_source: tuple[Path, str]
    ) -> None:
        source, _ = damage_source
        path, _ = damaged_copy(tmp_path, source, _zero_meta(0))
        with pytest.raises(CacheError, match=r"damaged: data\.mdb has a damaged meta page 0"):
            Cache(path / "cache")
        assert (cache_env_dir(path / "cache") / "data.mdb").exists()

    def test_a_cache_that_cannot_be_moved_is_a_cache_error(
        self, tmp_path: Path, damage_source: tuple[Path, str]
    ) -> None:
        """The cache directory is a mount point (EXDEV), or the data directory is read-only (EACCES)."""
        source, _ = damage_source
        path, damaged = damaged_copy(tmp_path, source, _zero_meta(0, 1))
        if os.geteuid() == 0:  # root may rename in a read-only directory, but not across file systems
            saved = tmp_path / "saved-cache"
            shutil.move(path / "cache", saved)
            with tmpfs(path / "cache", "8m"):
                shutil.copytree(saved, path / "cache", dirs_exist_ok=True)
                data_file = cache_env_dir(path / "cache") / "data.mdb"
                assert data_file.read_bytes() == damaged
                with pytest.raises(CacheError, match="cannot be moved aside"):
                    KVLog(path, follow=False)
                assert data_file.read_bytes() == damaged
                assert cache_env_dir(path / "cache") == data_file.parent, "HEAD moved without the set-aside"
            return
        os.chmod(path, 0o500)
        try:
            with pytest.raises(CacheError, match="cannot be moved aside"):
                KVLog(path, follow=False)
        finally:
            os.chmod(path, 0o700)


def forge_clean_close(cache_dir: Path) -> None:
    """Make the damaged file look as a clean close left it (what bit rot under an unchanged stat looks like)."""
    env_dir = cache_env_dir(cache_dir)
    st = (env_dir / "data.mdb").stat()
    signature = {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }
    (env_dir / "CLOSED").write_text(json.dumps(signature))


def structure_checked_at_open(cache_dir: Path) -> bool:
    """Whether opening the cache at ``cache_dir`` checks its structure (it must then find it sound)."""
    cache = Cache(cache_dir)
    try:
        assert cache.discarded is None, cache.discarded
        return cache.structure_check_seconds is not None
    finally:
        cache.close()


# The name is cited by the README's "Guarantees and failure modes".
class TestProbe:
    """The structure check in a child process runs after an unclean close, or when data.mdb changed since."""

    def test_a_clean_warm_restart_runs_no_structure_check(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            kv["k"] = "v"
        assert not structure_checked_at_open(tmp_path / "cache")

    def test_a_cache_changed_since_its_clean_close_is_checked(self, tmp_path: Path) -> None:
        with KVLog(tmp_path) as kv:
            kv["k"] = "v"
        os.utime(cache_env_dir(tmp_path / "cache") / "data.mdb")  # what a copy, a restore or an editor does
        assert structure_checked_at_open(tmp_path / "cache")
        with KVLog(tmp_path) as kv:
            assert kv.open_replay["rebuild_reason"] is None and kv["k"] == "v"

    def test_a_cache_left_by_a_killed_process_is_checked(self, tmp_path: Path) -> None:
        path = tmp_path / "data"
        with KVLog(path) as kv:
            kv["k"] = "v"
        holder = subprocess.Popen(
            [sys.executable, str(TESTS / "_crash_child.py"), "hold", str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        with holder:
            for line in holder.stdout:
                if line.startswith("ready"):
                    break
            holder.kill()
            holder.wait(timeout=30)
        assert structure_checked_at_open(path / "cache")
        with KVLog(path) as kv:
            assert kv.open_replay["rebuild_reason"] is None and kv["k"] == "v"


# -- a full map, a full disk ---------------------------------------------------------------------


def test_a_tiny_map_grows_on_writes_and_on_a_cold_replay(tmp_path: Path) -> None:
    """KVLog with a 64 KiB map: writes and a rebuild grow it and carry on."""
    values = {f"k{i:05d}": "v" * 300 + str(i) for i in range(3000)}  # ~1 MB: many times the map
    with KVLog(tmp_path, map_size=64 * 1024, follow=False) as kv:
        for i, (key, value) in enumerate(values.items()):
            if i < 100:
                kv[key] = value  # one transaction each
        kv.update(values)
        assert kv.stats()["map_size"] >= 1 << 20
        assert dict(kv.scan()) == values
    shutil.rmtree(tmp_path / "cache")
    with KVLog(tmp_path, map_size=64 * 1024, follow=False) as kv:
        assert kv.open_replay["mode"] == "cold" and kv.stats()["map_size"] >= 1 << 20
        assert dict(kv.scan()) == values and verify(kv).ok


@contextlib.contextmanager
def tmpfs(at: Path, size: str, *options: str) -> Iterator[Path]:
    """Mount a small tmpfs at ``at`` (skip the test where that is not allowed); unmount it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the file-size-limit test covers a full disk here")
    at.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(at)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the file-size-limit test covers it"
        )
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


def filler(directory: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """``fill()`` takes every free byte of the file system of ``directory``; ``free()`` gives them back."""
    path = directory / "filler"

    def fill() -> None:
        with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
            for chunk in (1 << 20, 4096):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc

    def free() -> None:
        path.unlink()

    return fill, free


def check_log_whole(log_dir: Path) -> None:
    """No partial record at the end of any segment, and the log opens without cutting anything."""
    for segment in active_segments(log_dir).values():
        assert torn_tail(segment).cut == 0, f"{segment} ends with a partial batch"
    local = LocalLog(log_dir, background_compaction=False)
    try:
        assert local.recovery == {p: [] for p in range(local.partitions)}
    finally:
        local.close()


class TestFullDisk:
    def test_log_and_cache_on_a_full_disk(self, tmp_path: Path) -> None:
        with tmpfs(tmp_path / "mnt", "4m") as mnt:
            path = mnt / "data"
            fill, free = filler(mnt)
            report = full_disk(path, fill, free)
            self.check(report)
            assert "No space left on device" in report["error"]["message"]
            check_log_whole(path / "log")
            with KVLog(path) as kv:
                assert (
                    verify(kv).ok and {k: v for k, v in kv.scan() if k != report["failed"]} == report["model"]
                )

    def test_only_the_log_on_a_full_disk(self, tmp_path: Path) -> None:
        """The log refuses the write (WriteError naming ENOSPC): nothing of it in the log or the cache."""
        path = tmp_path / "data"
        with tmpfs(path / "log", "2m"):
            fill, free = filler(path / "log")
            report = full_disk(path, fill, free)
            self.check(report)
            assert report["error"]["type"] == "WriteError", report["error"]
            assert "No space left on device" in report["error"]["message"]
            assert not report["failed_landed"]
            check_log_whole(path / "log")

    def test_only_the_cache_on_a_full_disk(self, tmp_path: Path) -> None:
        """The log took the write, the cache could not apply it: CacheError; applied once space is free."""
        path = tmp_path / "data"
        with tmpfs(path / "cache", "2m"):
            fill, free = filler(path / "cache")
            report = full_disk(path, fill, free)
            self.check(report)
            assert report["error"]["type"] == "CacheError", report["error"]
            assert "No space left on device" in report["error"]["message"]
            assert report["failed_landed"]
            with KVLog(path) as kv:
                assert verify(kv).ok

    def test_a_file_size_limit_as_a_full_disk(self, tmp_path: Path) -> None:
        """Where no tmpfs can be mounted: RLIMIT_FSIZE in a child (writes fail with EFBIG)."""
        path = tmp_path / "data"
        done = run_child("full-disk", path)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        self.check(report)
        assert "File too large" in report["error"]["message"], report["error"]
        check_log_whole(path / "log")

    @staticmethod
    def check(report: dict[str, Any]) -> None:
        assert report["failed"] is not None, "the disk never filled up"
        assert report["error"]["type"] in ("WriteError", "CacheError"), report["error"]
        assert report["verify_full"], "on the full disk, the cache is not the log folded up to its checkpoint"
        assert report["acked_readable"], "an acknowledged write is missing"
        assert report["verify_freed"], "after space was freed, the cache is not the log folded"
        assert report["contents_equal"], (
            "after space was freed, the store does not hold every acknowledged write"
        )

    def test_a_compaction_on_a_full_disk_leaves_no_partial_segment(self, tmp_path: Path) -> None:
        """The rewritten segment cannot be written: compact() raises, removes it, and works once space is free."""
        with tmpfs(tmp_path / "mnt", "2m") as mnt:
            local = LocalLog(mnt / "log", segment_bytes=64 * 1024, background_compaction=False)
            try:
                for round_ in range(2):  # every key twice: compaction rewrites every closed segment
                    local.append([(b"k%04d" % i, b"%d" % round_ + b"x" * 300) for i in range(1800)])
                fill, free = filler(mnt)
                fill()
                with pytest.raises(OSError, match="No space left on device"):
                    local.compact()
                leftovers = [f.name for f in (mnt / "log" / "0").iterdir() if not f.name.endswith(".log")]
                assert not leftovers, f"a failed compaction left {leftovers}, taking the space it lacked"
                free()
                assert local.compact()["segments_rewritten"] > 0
            finally:
                local.close()
            check_log_whole(mnt / "log")
            state, end, _ = fold_log(mnt / "log")
            assert end == {0: 3600} and state == {b"k%04d" % i: b"1" + b"x" * 300 for i in range(1800)}

    @pytest.mark.parametrize("lacking", ["inodes", "blocks"])
    def test_a_segment_roll_that_fails_does_not_fail_the_write(self, tmp_path: Path, lacking: str) -> None:
        """No inode (or block) for a new segment: the write that filled the old one succeeded, and says so.

        Was: the append raised OSError after its records were written and
        published; with no block, an empty segment file was left behind that the
        next open took for the active segment.
        """
        with tmpfs(tmp_path / "mnt", "8m", "nr_inodes=64") as mnt:
            # segment_bytes below the page size: the records of the appends below fit in the
            # segment's first page, already allocated, while a new segment needs a page (or an inode).
            local = LocalLog(mnt / "log", segment_bytes=1024, background_compaction=False)
            spare = mnt / "spare"
            spare.mkdir()
            taken: list[Path] = []
            try:
                local.append([(b"first", b"x" * 100)])
                if lacking == "inodes":
                    with contextlib.suppress(OSError):
                        while True:
                            taken.append(spare / str(len(taken)))
                            taken[-1].touch()
                else:
                    filler(spare)[0]()
                    taken.append(spare / "filler")
                offsets = local.append([(b"k%02d" % i, b"x" * 200) for i in range(5)])
                assert offsets[-1] == (0, 5)  # past segment_bytes: the roll after it failed
                assert local.stats()["partitions"][0]["segments"] == 1
                assert sorted(f.name for f in (mnt / "log" / "0").iterdir()) == ["00000000000000000000.log"]
                assert local.append([(b"more", b"y")]) == [(0, 6)]  # into the oversized segment
                for path in taken[-4:]:
                    path.unlink(missing_ok=True)
                local.append([(b"rolled", b"z")])
                assert local.stats()["partitions"][0]["segments"] == 2
            finally:
                local.close()
            check_log_whole(mnt / "log")
            state, end, _ = fold_log(mnt / "log")
            assert end == {0: 8} and set(state) == {b"first", b"more", b"rolled"} | {
                b"k%02d" % i for i in range(5)
            }


# -- reader slots of killed readers, fork() ----------------------------------------------------


@contextlib.contextmanager
def child(mode: str, path: Path, *args: str, expect: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(expect), f"{mode} child said {line!r}: {proc.communicate()[1][-2000:]}"
        yield proc, line
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def reader_pids(env: Any) -> set[int]:
    """Pids in the reader table of an LMDB environment."""
    return {
        int(line.split()[0])
        for line in env.readers().splitlines()
        if line.split()[:1] != ["pid"] and line.split() and line.split()[0].isdigit()
    }


def readers_in(env_dir: Path) -> set[int]:
    """Pids in the reader table of the LMDB environment at ``env_dir``, which no environment of this process has open."""
    env = lmdb.open(str(env_dir), max_dbs=4, readonly=True)
    try:
        return reader_pids(env)
    finally:
        env.close()


class TestReaderSlots:
    def test_slots_of_killed_readers_are_reclaimed_at_open(self, tmp_path: Path) -> None:
        """Readers SIGKILLed inside a read transaction leave slots; opening the store clears them."""
        with KVLog(tmp_path) as kv:
            kv["k"] = "v"
        cache_dir = cache_env_dir(tmp_path / "cache")  # the LMDB environment the children open
        # A live process keeps lock.mdb open, so the next open does not reset the reader table.
        with child("holder", cache_dir, "--max-readers", "126", expect="ready"):
            dead = []
            for _ in range(3):
                with child("reader", cache_dir, expect="reading") as (proc, _):
                    dead.append(proc.pid)
            assert set(dead) <= readers_in(cache_dir), "the killed readers left no slots: nothing tested"
            with KVLog(tmp_path) as kv:
                assert kv["k"] == "v"
            # The holder keeps the reader table alive after the store closed.
            assert not set(dead) & readers_in(cache_dir)

    def test_a_full_reader_table_is_cleared_of_dead_readers(self, tmp_path: Path) -> None:
        """Every slot taken by readers killed after the cache opened: the next read clears them and succeeds."""
        with KVLog(tmp_path) as kv:
            kv["k"] = "v"
        cache_dir = cache_env_dir(tmp_path / "cache")  # the LMDB environment the children open
        (cache_dir / "lock.mdb").unlink()  # the holder makes a new one with 4 slots
        with child("holder", cache_dir, "--max-readers", "4", expect="ready") as (_, line):
            assert line.split()[2] == "4"
            cache = Cache(tmp_path / "cache")
            assert cache.env_path == cache_dir
            try:
                env = cache.env
                assert env.max_readers() == 4
                # A point read, then a read through the other path (len, scan, meta).
                for use, expected in (
                    (lambda: cache.get(b"k"), MSGPACK.encode("v")),
                    (lambda: len(cache), 1),
                ):
                    # This process holds a slot: the read needs another one.
                    with env.begin() as held:
                        assert held.get(b"k", db=env.open_db(b"data", txn=held, create=False)) is not None
                        free = 4 - len(reader_pids(env))
                        with contextlib.ExitStack() as stack:
                            pids = [
                                stack.enter_context(child("reader", cache_dir, expect="reading"))[0].pid
                                for _ in range(free)
                            ]
                        # SIGKILLed: their slots stay taken, the table is full.
                        assert free >= 2 and set(pids) <= reader_pids(env)
                        assert use() == expected  # was: CacheError (MDB_READERS_FULL)
                        assert not set(pids) & reader_pids(env)
            finally:
                cache.close()


class TestFork:
    def test_a_forked_child_opens_the_store_again_and_a_store_given_its_log_refuses(
        self, tmp_path: Path
    ) -> None:
        """The gunicorn ``--preload`` pattern: a store opened before fork() works in the child, sharing the data.

        A store given ``log=`` cannot be opened again (the child cannot reuse
        that object) and a bare cache is not a store: both raise ClosedError
        in the child. The parent is not affected by anything the child does.
        """
        kv = KVLog(tmp_path / "data")
        given = KVLog(tmp_path / "given", log=LocalLog(tmp_path / "given" / "log"))
        cache = Cache(tmp_path / "bare-cache")  # a cache on its own refuses
        try:
            kv["before"] = 1
            given["before"] = 1
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report what each use did, never return into pytest
                code = 0
                try:
                    os.close(read)
                    outcomes: dict[str, Any] = {}
                    for name, use in {
                        "get": lambda: kv["before"],
                        "get-default": lambda: kv.get("before"),
                        "contains": lambda: "before" in kv,
                        "set": lambda: kv.__setitem__("child", 2),
                        "get-own-write": lambda: kv["child"],
                        "len": lambda: len(kv),
                        "given-get": lambda: given["before"],
                        "given-get-default": lambda: given.get("before"),
                        "given-contains": lambda: "before" in given,
                        "given-set": lambda: given.__setitem__("child", 2),
                        "given-len": lambda: len(given),
                        "given-log-append": lambda: given.log.append([(b"child", b"x")]),
                        "cache-get": lambda: cache.get(b"before"),
                    }.items():
                        try:
                            outcomes[name] = ["ok", use()]
                        except ClosedError as exc:
                            outcomes[name] = ["ClosedError", str(exc)]
                    outcomes["pid-in-repr"] = "unusable after fork" not in repr(kv)
                    kv.close()  # the child's own store, opened here
                    given.close()  # does nothing: the parent still owns the files
                    outcomes["given-repr"] = repr(given)
                    os.write(write, json.dumps(outcomes).encode())
                except BaseException:  # noqa: BLE001 - anything else is a failure the parent reports
                    code = 1
                    with contextlib.suppress(BaseException):
                        os.write(write, traceback.format_exc().encode())
                finally:
                    os._exit(code)
            os.close(write)
            # Bounded: a child that does use LMDB across fork can block forever on
            # a lock a thread of the parent held at the fork.
            ready, _, _ = select.select([read], [], [], 60)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            with os.fdopen(read) as pipe:
                said = pipe.read() if ready else ""
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0 and said, f"the child hung or failed: {said}"
            outcomes = json.loads(said)
            # The store the child inherited opened itself again there, on the same data.
            assert outcomes["get"] == ["ok", 1] and outcomes["get-default"] == ["ok", 1]
            assert outcomes["contains"] == ["ok", True] and outcomes["set"] == ["ok", None]
            assert outcomes["get-own-write"] == ["ok", 2] and outcomes["len"] == ["ok", 2]
            assert outcomes["pid-in-repr"]
            for name in (
                "given-get",
                "given-get-default",
                "given-contains",
                "given-set",
                "given-len",
                "given-log-append",
                "cache-get",
            ):
                kind, message = outcomes[name]
                assert kind == "ClosedError", (name, outcomes[name])
                assert "before this process forked" in message, (name, message)
                assert "open a new KVLog in the child" in message, (name, message)
            assert "unusable after fork" in outcomes["given-repr"]
            # The child's write is in the parent's store (one database); the
            # child's closes did not mark the logs the parent still has open as
            # closed cleanly.
            assert kv["child"] == 2
            assert not log_head_clean(tmp_path / "data" / "log")
            assert not log_head_clean(tmp_path / "given" / "log")
            kv["after"] = 2
            assert dict(kv.scan()) == {"after": 2, "before": 1, "child": 2}
            given["after"] = 2
            assert dict(given.scan()) == {"after": 2, "before": 1}
        finally:
            cache.close()
            given.close()
            kv.close()
        assert log_head_clean(tmp_path / "data" / "log") and log_head_clean(tmp_path / "given" / "log")
        with KVLog(tmp_path / "data") as kv:
            assert dict(kv.scan()) == {"after": 2, "before": 1, "child": 2}
        with KVLog(tmp_path / "given") as kv:
            assert dict(kv.scan()) == {"after": 2, "before": 1} and "child" not in kv


# -- file modes ----------------------------------------------------------------------------------


@pytest.fixture(params=[0o000, 0o077], ids=["umask-000", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """A permissive umask (must not widen kvlog's modes) and a strict one (must not narrow a mode asked for)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    found = {".": root.stat().st_mode & 0o777}
    for item in root.rglob("*"):
        found[str(item.relative_to(root))] = item.stat().st_mode & 0o777
    return found


def make_every_file(path: Path, **options: Any) -> int:
    """A store that has created each kind of file kvlog makes: segments (rolled and compacted), markers, ...

    Returns:
        The mode of an UNSYNCED marker (the close removes it).
    """
    log_dir = path / "log"
    local = LocalLog(
        log_dir, segment_bytes=1024, tombstone_retention=0.0, background_compaction=False, **options
    )
    with KVLog(path, log=local, **options) as kv:
        kv.update({f"k{i:03d}": "v" * 50 for i in range(100)})
        for i in range(50):
            del kv[f"k{i:03d}"]
        local.compact()  # .cleaned -> .swap -> .log, cleaner-checkpoint.json, cleaner-sample.json
    with KVLog(path / "unsynced", fsync="interval", **options) as kv:
        kv["k"] = "v"  # a cache with an UNSYNCED marker, a log synced in the background
        unsynced = (cache_env_dir(path / "unsynced" / "cache") / "UNSYNCED").stat().st_mode & 0o777
    # A damaged cache set aside: the new generation directory and its files.
    data_file = cache_env_dir(path / "cache") / "data.mdb"
    data_file.write_bytes(b"\0" * 8192 + data_file.read_bytes()[8192:])
    with KVLog(path, log=LocalLog(log_dir, **options), **options) as kv:
        assert "moved aside" in kv.open_replay["rebuild_reason"]
    return unsynced


class TestFileModes:
    EXPECTED: frozenset[str] = frozenset(
        {
            ".",
            # the embedded log
            "LOCK",
            "OPEN",
            "COMPACT",
            "head",
            "log.json",
            "cleaner-checkpoint.json",
            "cleaner-sample.json",
            # the cache directory, and its generation made after the damaged one went aside
            "HEAD",
            "USERS",
            "REPLAY",
            "gen-000002",
            "data.mdb",
            "lock.mdb",
            "CLOSED",
        }
    )

    @pytest.mark.parametrize(
        ("file_mode", "dir_mode"),
        [(None, 0o700), (0o640, 0o750), (0o644, 0o755)],
        ids=["0600", "0640", "0644"],
    )
    def test_every_file_gets_the_mode_whatever_the_umask(
        self, tmp_path: Path, umask: int, file_mode: int | None, dir_mode: int
    ) -> None:
        path = tmp_path / "store"
        options = {} if file_mode is None else {"file_mode": file_mode}
        unsynced = make_every_file(path, **options)
        assert unsynced == (file_mode or 0o600)
        found = modes(path)
        names = {Path(name).name for name in found} | {"."}
        assert self.EXPECTED | {"0", "cache", "log", "unsynced"} <= names, sorted(names)
        assert any(name.startswith("cache.corrupt-") for name in names)
        assert any(name.endswith(".log") for name in names)
        wrong = {
            name: oct(mode)
            for name, mode in found.items()
            if mode != (dir_mode if (path / name).is_dir() else file_mode or 0o600)
        }
        assert not wrong, f"not {oct(file_mode or 0o600)} / {oct(dir_mode)}: {wrong}"

    def test_a_file_mode_the_owner_cannot_use_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="owner read and write"):
            KVLog(tmp_path, file_mode=0o400)
        assert not (tmp_path / "log").exists()
