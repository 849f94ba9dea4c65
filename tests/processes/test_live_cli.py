"""Every ``kvlog`` command against a data directory that a running service holds open and writes to.

A service process (``_proc_child.py writer``) keeps ``KVLog(data)`` open for
the whole module and writes without pause; a reader process checks all the
while that no value goes back in time and that no preloaded key is ever
missing. Against them, each ``kvlog --data DIR ...`` command runs as a real
subprocess, the way an operator would run it beside a live service: the
reading commands (``get``, ``scan``, ``stats``, ``dump``, ``verify``) must
succeed and print what the data holds; the writing ones (``put``, ``del``,
``load``) must be readable in the service the moment the command exits;
``compact`` and ``rewarm`` run alongside the writer without disturbing it.

The last test re-warms a directory while four processes read and write it,
and checks that none of them ever saw a key of the log missing or a value
going back in time during the rebuild and the switch.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from proc_helpers import Child, Children, cache_view, check_cache_is_whole_log, clean_env, decode

#: Keys loaded before the service starts: never deleted, so always present.
PRELOADED = 3000
#: Keys the service overwrites over and over.
SERVICE_KEYS = 50


def kvlog(data: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``kvlog --data DATA ARGS`` as a subprocess (no Kafka settings from the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "kvlog", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded (no traceback on stderr)."""
    assert done.returncode == 0, f"{done.args[4:]} exited {done.returncode}: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def write_dump(path: Path, prefix: str, n: int) -> Path:
    """A dump file (the format ``kvlog load`` reads) of ``n`` keys ``prefix<i>`` = ``{"seq": i}``."""
    path.write_text(
        "".join(json.dumps({"key": f"{prefix}{i}", "value": {"seq": i}}) + "\n" for i in range(n))
    )
    return path


def head_generation(data: Path) -> int:
    """The live cache generation that ``cache/HEAD`` names (8 bytes of magic, then a u64)."""
    return int(struct.unpack_from("<8sQ", (data / "cache" / "HEAD").read_bytes())[1])


class Live(NamedTuple):
    data: Path
    service: Child
    reader: Child
    tmp: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A data directory with PRELOADED keys, a service writing to it, and a reader checking it."""
    tmp = tmp_path_factory.mktemp("live")
    data = tmp / "data"
    ok(kvlog(data, "load", str(write_dump(tmp / "pre.jsonl", "pre-", PRELOADED))))
    with Children(tmp) as children:
        service = children.start(
            "writer", data, "--prefix", "svc-", "--keys", str(SERVICE_KEYS), name="service"
        )
        service.expect("ready")
        reader = children.start(
            "reader",
            data,
            "--watch",
            f"svc-:{SERVICE_KEYS}",
            "--must-exist",
            f"pre-:{PRELOADED}",
            name="reader",
        )
        reader.expect("tick")
        for _ in range(SERVICE_KEYS):  # every service key written at least once: the entry count is stable
            service.expect("ack")
        yield Live(data, service, reader, tmp)
        violations = [line for line in reader.snapshot() if line.startswith("violation")]
        assert not violations, f"the reader saw {violations[:10]}"


def service_get(service: Child, key: str) -> Any:
    """What the service process reads for ``key`` now (``None`` if absent)."""
    start = len(service.snapshot())
    service.send(f"get {key}")
    line = service.expect(f"got {key} ", start=start)
    return json.loads(line.split(" ", 2)[2])


def service_writes_on(service: Child, n: int = 3) -> None:
    """The service acknowledges ``n`` more writes (it was not blocked by the command that just ran)."""
    start = len(service.snapshot())
    for _ in range(n):
        service.expect("ack", start=start)
        start = service.cursor


def last_acked(service: Child) -> dict[str, int]:
    """Per service key, the seq of the last write the service saw return."""
    lines = service.snapshot()
    calls: dict[int, str] = {}
    acked: dict[str, int] = {}
    for line in lines:
        words = line.split()
        if words[0] == "begin":
            calls[int(words[1])] = f"svc-{int(words[2]) % SERVICE_KEYS}"
        elif words[0] == "ack":
            acked[calls[int(words[1])]] = int(words[1])
    return acked


def entries_now(data: Path) -> int:
    return len(cache_view(data)[1])


# -- reading commands -----------------------------------------------------------------------------


def test_get_reads_the_services_latest_writes(live: Live) -> None:
    """``kvlog get`` prints a preloaded value exactly, and a service key at least as new as its last acknowledged write."""
    assert json.loads(ok(kvlog(live.data, "get", "pre-7"))) == {"seq": 7}
    acked = last_acked(live.service)
    for key in ("svc-0", f"svc-{SERVICE_KEYS - 1}"):
        value = json.loads(ok(kvlog(live.data, "get", key)))
        assert value["seq"] >= acked[key], (
            f"kvlog get {key} printed seq {value['seq']}, the service acked {acked[key]}"
        )
    missing = kvlog(live.data, "get", "no-such-key")
    assert missing.returncode == 1 and "key not found" in missing.stderr


def test_scan_prints_every_preloaded_key_in_order(live: Live) -> None:
    lines = ok(kvlog(live.data, "scan", "--prefix", "pre-")).splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["key"] for r in records] == sorted(f"pre-{i}" for i in range(PRELOADED))
    assert all(r["value"] == {"seq": int(r["key"][4:])} for r in records)
    assert len(ok(kvlog(live.data, "scan", "--prefix", "svc-", "--limit", "5")).splitlines()) == 5


def test_stats_shows_the_live_entry_count(live: Live) -> None:
    """``stats`` counts what the shared cache holds while the service writes (it only overwrites its keys)."""
    expected = entries_now(live.data)
    stats = json.loads(ok(kvlog(live.data, "stats", "--json")))
    assert stats["entries"] == expected
    assert stats["log"]["kind"] == "local"
    assert all(stats["checkpoint"][p] <= stats["end_offsets"][p] for p in stats["checkpoint"])
    text = ok(kvlog(live.data, "stats"))
    assert f"entries      {expected:,}" in text, text
    assert "partition    checkpoint    end offset    lag" in text


def test_dump_exports_the_live_data(live: Live, tmp_path: Path) -> None:
    expected = entries_now(live.data)
    out = tmp_path / "dump.jsonl"
    done = kvlog(live.data, "dump", "-o", str(out))
    ok(done)
    lines = out.read_text().splitlines()
    assert len(lines) == expected
    assert f"dumped {expected:,} entries" in done.stderr
    keys = [json.loads(line)["key"] for line in lines]
    assert keys == sorted(keys, key=str.encode)
    assert {f"pre-{i}" for i in range(PRELOADED)} <= set(keys)


def test_verify_finds_no_difference_while_the_service_writes(live: Live) -> None:
    out = ok(kvlog(live.data, "verify"))
    assert "the cache matches the log" in out, out
    service_writes_on(live.service)


# -- writing commands -----------------------------------------------------------------------------


def test_put_by_the_cli_is_readable_in_the_service_when_it_exits(live: Live) -> None:
    for i in range(3):
        ok(kvlog(live.data, "put", "cli-put", json.dumps({"n": i, "list": [1, 2]})))
        assert service_get(live.service, "cli-put") == {"n": i, "list": [1, 2]}
    service_writes_on(live.service)


def test_del_by_the_cli_is_gone_in_the_service_when_it_exits(live: Live) -> None:
    ok(kvlog(live.data, "put", "cli-del", '"doomed"'))
    assert service_get(live.service, "cli-del") == "doomed"
    ok(kvlog(live.data, "del", "cli-del"))
    assert service_get(live.service, "cli-del") is None
    absent = kvlog(live.data, "del", "cli-del")
    assert absent.returncode == 1 and "key not found" in absent.stderr


def test_load_alongside_the_service(live: Live) -> None:
    """``kvlog load`` writes through the shared log: the service reads every loaded key as soon as load exits."""
    before = entries_now(live.data)
    out = ok(kvlog(live.data, "load", str(write_dump(live.tmp / "more.jsonl", "load-", 2000))))
    assert "loaded 2,000 records" in out, out
    for i in (0, 999, 1999):
        assert service_get(live.service, f"load-{i}") == {"seq": i}
    assert entries_now(live.data) == before + 2000
    service_writes_on(live.service)


def test_compact_runs_alongside_the_writer(live: Live) -> None:
    """``kvlog compact`` while the service overwrites its keys: both go on, and the log still folds to the cache."""
    out = ok(kvlog(live.data, "compact"))
    assert "compacted the log" in out, out
    service_writes_on(live.service)
    assert "the cache matches the log" in ok(kvlog(live.data, "verify"))


def test_rewarm_while_the_service_writes(live: Live) -> None:
    """``kvlog rewarm`` builds a new cache generation beside the live one; the service switches and writes on."""
    generation = head_generation(live.data)
    expected = entries_now(live.data)
    out = ok(kvlog(live.data, "rewarm"))
    assert out.startswith("rewarmed "), out
    assert head_generation(live.data) > generation
    assert entries_now(live.data) == expected
    service_writes_on(live.service)
    assert service_get(live.service, "pre-0") == {"seq": 0}
    start = len(live.reader.snapshot())
    live.reader.expect(
        lambda line: line.startswith("tick") and int(line.split()[2]) == head_generation(live.data),
        start=start,
    )


# -- a rewarm under four busy processes ---------------------------------------------------------------


#: Keys in the log before the rewarms: each reader checks every one of them on every pass.
REWARM_PRELOADED = 20_000
REWARMS = 3


def test_rewarm_while_four_processes_read_and_write(tmp_path: Path) -> None:
    """No reader ever misses a key the log held, or sees a value go back, while ``kvlog rewarm`` rebuilds and switches.

    Two writers overwrite their keys without pause; two readers read all
    20,000 preloaded keys and the writers' keys over and over. Three
    ``kvlog rewarm`` runs rebuild the cache beside the live one; every
    reader reads the new generation after each switch.
    """
    data = tmp_path / "data"
    ok(kvlog(data, "load", str(write_dump(tmp_path / "pre.jsonl", "pre-", REWARM_PRELOADED))))
    with Children(tmp_path) as children:
        writers = [
            children.start(
                "writer",
                data,
                "--prefix",
                f"w{i}-",
                "--keys",
                "40",
                "--batch",
                str(i * 4 + 1),
                name=f"writer-{i}",
            )
            for i in range(2)
        ]
        readers = [
            children.start(
                "reader",
                data,
                *("--must-exist", f"pre-:{REWARM_PRELOADED}", "--watch", "w0-:40", "--watch", "w1-:40"),
                name=f"reader-{i}",
            )
            for i in range(2)
        ]
        for child in (*writers, *readers):
            child.expect("ready")
        for n in range(REWARMS):
            generation = head_generation(data)
            out = ok(kvlog(data, "rewarm"))
            assert out.startswith("rewarmed "), out
            assert head_generation(data) > generation
            for child in readers:
                # Every reader makes a whole pass on the new generation.
                start = len(child.snapshot())
                new = head_generation(data)
                child.expect(
                    lambda line, g=new: line.startswith("tick") and int(line.split()[2]) == g, start=start
                )
                child.expect("tick")
            for child in writers:
                service_writes_on(child)
            violations = [
                line for child in readers for line in child.snapshot() if line.startswith("violation")
            ]
            assert not violations, f"rewarm {n + 1}: the readers saw {violations[:10]}"
        for child in writers:
            child.send("pause")
        for child in writers:
            child.expect("paused")
        writers[0].send("sync")
        writers[0].expect("synced")
        cached = check_cache_is_whole_log(data, f"after {REWARMS} rewarms")
        assert sum(1 for key in cached if key.startswith(b"pre-")) == REWARM_PRELOADED
        assert decode(cached[b"pre-123"]) == {"seq": 123}
