"""One cache directory shared by several processes: map growth, generations, first and last users.

The README rows "Another process grew the LMDB map, or moved the cache to a new
generation" and the cache's directory layout (docs/design.md, "The cache").
Other processes are real ones (``python -c``), each with its own LMDB handle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvlog.cache import Cache, CheckpointMoved
from kvlog.log import Record


def run_child(code: str, *args: str) -> str:
    """Run ``code`` in a new Python process (with ``args`` in sys.argv); return what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def records(keys: range, value: bytes, partition: int = 0) -> list[Record]:
    return [Record(partition, i, f"key:{i:06d}".encode(), value) for i in keys]


GROW = """
    import sys
    from kvlog.cache import Cache
    from kvlog.log import Record
    cache = Cache(sys.argv[1], map_size=64 * 1024)
    before = cache.map_size
    start = cache.checkpoint().get(0, 0)
    batch = [Record(0, i, f"key:{i:06d}".encode(), b"v" * 2000) for i in range(start, start + 2000)]
    cache.apply(batch, {0: start + 2000}, expect=cache.checkpoint())
    print(before, cache.map_size)
    cache.close()
"""


def test_a_reader_adopts_a_map_another_process_grew(tmp_path: Path) -> None:
    """The reader's next transaction sees MDB_MAP_RESIZED; it maps the new size and reads what was written."""
    cache = Cache(tmp_path / "cache", map_size=64 * 1024)
    try:
        cache.apply(records(range(10), b"small"), {0: 10})
        assert cache.get(b"key:000005") == b"small"
        size_before = cache.map_size
        grown_from, grown_to = map(int, run_child(GROW, str(tmp_path / "cache")).split())
        assert grown_to > grown_from, "the child did not grow the map: the test shows nothing"
        # Every read path of this process copes: a point read, a count, a scan, the meta table.
        assert cache.get(b"key:002005") == b"v" * 2000
        assert len(cache) == 2010
        assert sum(1 for _ in cache.items(prefix=b"key:001")) == 1000
        assert cache.checkpoint() == {0: 2010}
        assert cache.map_size > size_before
        # And this process can write after the other one grew the map.
        cache.apply(records(range(2010, 2020), b"after"), {0: 2020}, expect={0: 2010})
        assert cache.get(b"key:002019") == b"after"
    finally:
        cache.close()


def test_a_batch_applies_only_on_the_checkpoint_it_follows(tmp_path: Path) -> None:
    """Two replays racing: the one whose checkpoint moved writes nothing and is told so."""
    cache = Cache(tmp_path / "cache")
    try:
        cache.apply(records(range(5), b"a"), {0: 5})
        with pytest.raises(CheckpointMoved):
            cache.apply(records(range(3, 8), b"stale"), {0: 8}, expect={0: 3})
        assert cache.get(b"key:000004") == b"a" and cache.get(b"key:000007") is None
        assert cache.checkpoint() == {0: 5}
        assert not cache.apply_appended([(b"key:000009", b"x")], {0: 6}, {0: 7})
        assert cache.apply_appended([(b"key:000005", b"b")], {0: 5}, {0: 6})
        assert cache.get(b"key:000005") == b"b" and cache.checkpoint() == {0: 6}
    finally:
        cache.close()


READER = """
    import json, sys
    from kvlog.cache import Cache
    cache = Cache(sys.argv[1])
    value = (cache.get(b"key:000001") or b"").decode()  # a read first: it follows HEAD
    print(json.dumps({"value": value, "entries": len(cache), "generation": cache.generation}), flush=True)
    sys.stdin.readline()  # the parent switches the cache to a new generation meanwhile
    value = (cache.get(b"key:000001") or b"").decode()  # a read first: it follows HEAD
    print(json.dumps({"value": value, "entries": len(cache), "generation": cache.generation}), flush=True)
    cache.close()
"""


def test_every_process_follows_a_switch_to_a_new_generation(tmp_path: Path) -> None:
    """A rebuild beside the live cache becomes live for a process that has the old one open, at its next read."""
    path = tmp_path / "cache"
    cache = Cache(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(READER), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cache.reset({"log": "one"})
        cache.apply(records(range(3), b"old"), {0: 3}, expect={})
        assert reader.stdin is not None and reader.stdout is not None
        # The reader may have opened before or after the first batch: it reads what is there.
        first = json.loads(reader.stdout.readline())
        assert first["generation"] == 1
        old_dir = cache.env_path

        builder = cache.new_generation({"log": "one"})
        assert builder.generation == 2 and cache.generation == 1
        builder.apply(records(range(2), b"new"), {0: 2}, expect={})
        assert not cache.switch_to(builder), "a builder behind the live cache must not become live"
        assert cache.get(b"key:000001") == b"old"
        builder.apply(records(range(2, 5), b"new"), {0: 5}, expect={0: 2})
        assert cache.switch_to(builder)
        assert cache.generation == 2 and cache.get(b"key:000001") == b"new" and len(cache) == 5
        assert not old_dir.exists(), "the superseded generation's directory is deleted"

        reader.stdin.write("\n")
        reader.stdin.flush()
        second = json.loads(reader.stdout.readline())
        assert second == {"generation": 2, "value": "new", "entries": 5}
        # Nothing more can be applied to the superseded generation by anyone.
        assert reader.wait(timeout=60) == 0, reader.stderr.read() if reader.stderr else ""
    finally:
        reader.kill()
        reader.wait()
        for stream in (reader.stdin, reader.stdout, reader.stderr):
            if stream is not None:
                stream.close()
        cache.close()


HOLDER = """
    import json, sys
    from kvlog.cache import Cache
    cache = Cache(sys.argv[1])
    print(json.dumps({"first_user": cache.first_user, "checked": cache.structure_check_seconds}), flush=True)
    sys.stdin.readline()  # hold the cache open until the parent says
    cache.close()
    print("closed", flush=True)
"""


def test_only_the_last_process_to_close_records_a_clean_close(tmp_path: Path) -> None:
    """CLOSED (which lets the next first open skip the structure check) describes the file all processes left."""
    path = tmp_path / "cache"
    first = Cache(path)
    assert first.first_user
    first.apply(records(range(100), b"v"), {0: 100})
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        said = json.loads(holder.stdout.readline())
        assert said == {"first_user": False, "checked": None}, (
            "a process that finds the cache in use checks nothing"
        )
        env_path = first.env_path
        first.close()
        assert not (env_path / "CLOSED").exists(), "another process still has the cache open"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        assert (env_path / "CLOSED").exists(), "the last process to close records the clean close"
    finally:
        holder.kill()
        holder.wait()
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    again = Cache(path)
    try:
        assert again.first_user and again.structure_check_seconds is None
        assert again.get(b"key:000042") == b"v"
    finally:
        again.close()


def test_a_cache_of_the_one_directory_layout_becomes_generation_one(tmp_path: Path) -> None:
    """A cache written before generations (data.mdb directly in the cache directory) is kept, not rebuilt."""
    path = tmp_path / "cache"
    path.mkdir()
    import lmdb

    env = lmdb.open(str(path), max_dbs=4)
    data, meta = env.open_db(b"data"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value", db=data)
    env.close()
    cache = Cache(path)
    try:
        assert cache.generation == 1 and cache.env_path == path / "gen-000001"
        assert not (path / "data.mdb").exists()
        assert cache.get(b"key") == b"value"
        assert meta is not None
    finally:
        cache.close()


def test_a_rebuild_a_process_died_in_is_deleted_by_the_next_first_open(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    cache = Cache(path)
    builder = cache.new_generation({"log": "one"})
    builder_dir = builder.env_path
    builder.close()  # as if its process died: the directory stays
    cache.close()
    assert builder_dir.exists()
    Cache(path).close()
    assert not builder_dir.exists()
    assert (path / "gen-000001").exists()
