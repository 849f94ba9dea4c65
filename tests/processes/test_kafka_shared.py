"""Several processes on one Kafka cache directory: one replays the topic for all; another takes over when it dies.

Each process (``_proc_child.py serve``) opens ``KVLog(cache, bootstrap_servers=...,
topic=...)`` on the same cache directory and topic of the session broker.
Exactly one of them follows the topic (its ``stats()["replay_health"]
["replaying_here"]`` is True); every write, from any process, is readable in
every process as soon as it returned. When the replaying process is
SIGKILLed, another one takes over within a second, and writes keep working
everywhere. What a user would notice if this failed: two processes replaying
into one cache (the cache then disagrees with the topic), writes that hang
after the replaying process died, or a write readable in one process and not
in another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from proc_helpers import Child, Children

pytestmark = pytest.mark.kafka

#: The bound on a takeover after the replaying process died (its follower polls the lock every 0.25 s).
TAKEOVER_SECONDS = 1.0
KILLS = 3


class Company:
    """Processes sharing one cache directory on one topic."""

    def __init__(self, children: Children, cache: Path, bootstrap: str, topic: str) -> None:
        self.children = children
        self.cache = cache
        self.kafka = {"bootstrap": bootstrap, "topic": topic, "timeout": 20}
        self.alive: list[Child] = []
        self.written: dict[str, int] = {}
        self.count = 0

    def start(self) -> Child:
        child = self.children.start("serve", "-", name=f"kafka-{len(self.children.all)}")
        child.expect("ready")
        child.request({"op": "open", "path": str(self.cache), "kafka": self.kafka})
        self.alive.append(child)
        return child

    def replayers(self) -> list[Child]:
        """The processes that say they replay the topic now (asked all at once)."""
        pending = [(child, child.begin({"op": "health"})) for child in self.alive]
        answers = [(child, child.answer(start)) for child, start in pending]
        for child, answer in answers:
            assert answer["ok"], f"{child.name}: {answer}"
        return [child for child, answer in answers if answer["result"]["replaying_here"]]

    def the_replayer(self) -> Child | None:
        """The one replaying process, or None while there is none; never two."""
        replaying = self.replayers()
        assert len(replaying) <= 1, f"{[c.name for c in replaying]} all replay into one cache"
        return replaying[0] if replaying else None

    def everyone_writes_and_reads(self) -> None:
        """Each process writes a key; right after each write returned, every process reads it."""
        for child in self.alive:
            self.count += 1
            key = f"{child.name}-{self.count}"
            child.request({"op": "put", "key": key, "value": self.count})
            self.written[key] = self.count
            for reader in self.alive:
                got = reader.request({"op": "get", "key": key})
                assert got == {"present": True, "value": self.count}, (
                    f"{reader.name} reads {key} as {got} right after {child.name}'s write returned"
                )
        for child in self.alive:
            items = child.request({"op": "items"})
            assert items == self.written, (
                f"{child.name} holds {len(items)} keys, {len(self.written)} were written"
            )


@pytest.fixture
def company(tmp_path: Path, bootstrap: str, topic: str) -> Iterator[Company]:
    with Children(tmp_path) as children:
        yield Company(children, tmp_path / "cache", bootstrap, topic)


@pytest.mark.parametrize("processes", [2, 4])
def test_one_process_replays_for_all_and_writes_are_seen_everywhere(company: Company, processes: int) -> None:
    for _ in range(processes):
        company.start()
    replayer = wait_until(company.the_replayer, timeout=10, what="one process to replay the topic")
    company.everyone_writes_and_reads()
    assert company.the_replayer() is replayer, "the replaying process changed while every process lived"


def test_sigkill_of_the_replaying_process_hands_replay_to_another_within_a_second(company: Company) -> None:
    """Four processes; the replaying one is SIGKILLed three times (a new process joins each time)."""
    for _ in range(4):
        company.start()
    replayer = wait_until(company.the_replayer, timeout=10, what="one process to replay the topic")
    company.everyone_writes_and_reads()
    takeovers = []
    for kill in range(KILLS):
        killed_at = time.monotonic()
        replayer.kill()
        company.alive.remove(replayer)
        assert replayer.reap() < 0
        replayer = wait_until(
            company.the_replayer,
            timeout=max(0.0, killed_at + TAKEOVER_SECONDS - time.monotonic()),
            interval=0.02,
            what=f"another process to replay within {TAKEOVER_SECONDS}s of kill {kill + 1}",
        )
        took = time.monotonic() - killed_at
        assert took <= TAKEOVER_SECONDS, f"kill {kill + 1}: the takeover was seen {took:.2f}s after the kill"
        takeovers.append(took)
        company.everyone_writes_and_reads()
        company.start()  # a new process joins, and does not take the role from the live replayer
        company.everyone_writes_and_reads()
        assert company.the_replayer() is replayer
    print(
        f"\nkafka takeover after SIGKILL of the replaying process: {', '.join(f'{t:.2f}s' for t in takeovers)}"
    )
