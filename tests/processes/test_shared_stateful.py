"""Three processes share one data directory and behave like one dict: a hypothesis state machine.

Three long-lived child processes (``_proc_child.py serve``) each open
``KVLog(path)`` on the same directory and take commands over a pipe: put,
delete, update, get, items, sync, close and open again. The machine sends
each write to one of them and compares every process's view with a plain
dict after every step. What a user would notice if this failed: a value
written in one process and not readable in another right after the write
returned, a process reading an older value after a newer one, a delete that
another process does not see, or a store reopened in one process that missed
what the others wrote while it was closed.

The children live for the whole test; each example opens a new data
directory in all three, so an example costs no process start.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from proc_helpers import Child, Children, check_cache_is_whole_log, decode

#: Few keys, so that writes from different processes collide on them.
KEYS = ("a", "b", "c", "order:1", "é", "long-" + "x" * 40)
PROCESSES = 3

#: Payloads that survive JSON (the pipe) and msgpack (the store) unchanged.
payloads = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.text(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
)

#: The loaded profile's examples (ci: 30): one example of 40 steps takes about
#: 0.1-0.3 s, as every step is a few round trips on the pipes and a write is
#: one fdatasync.
MACHINE_SETTINGS = settings(stateful_step_count=40, deadline=None)

_runs = itertools.count()


class SharedStoreMachine(RuleBasedStateMachine):
    """A dict model; three processes that hold the same data directory open, each read and written."""

    #: Set by the test: the children (``serve`` mode) and a directory for the examples' data.
    children: ClassVar[list[Child]] = []
    root: Path = Path()

    def __init__(self) -> None:
        super().__init__()
        self.path = self.root / f"run-{next(_runs)}"
        self.model: dict[str, Any] = {}
        self.version = 0
        #: Per process: key -> the version it read last (for a key it saw deleted: the delete's version).
        self.seen: list[dict[str, int]] = [{} for _ in self.children]
        #: key -> the version of its last delete.
        self.deleted_at: dict[str, int] = {}
        self.open = [True] * len(self.children)
        for child in self.children:
            child.request({"op": "open", "path": str(self.path)})

    def teardown(self) -> None:
        for child in self.children:
            child.ask({"op": "close"})  # an answer either way: the next example opens afresh
        if self.path.exists():
            cached = check_cache_is_whole_log(self.path, "after the example")
            assert {k.decode(): decode(v) for k, v in cached.items()} == self.model

    # -- helpers ------------------------------------------------------------------------------

    def _value(self, payload: Any) -> dict[str, Any]:
        self.version += 1
        return {"v": self.version, "x": payload}

    def _who(self, data: st.DataObject, label: str = "process") -> int:
        return data.draw(st.sampled_from([i for i, is_open in enumerate(self.open) if is_open]), label=label)

    def _read(self, i: int, key: str) -> None:
        """Process ``i`` reads ``key``: the model's value, and never older than what ``i`` read before."""
        got = self.children[i].request({"op": "get", "key": key})
        expected = self.model.get(key)
        assert got == {"present": key in self.model, "value": expected}, (
            f"process {i} reads {key!r} as {got}, the model has {expected}"
        )
        self._note_seen(i, key, expected)

    def _note_seen(self, i: int, key: str, value: dict[str, Any] | None) -> None:
        before = self.seen[i].get(key, -1)
        now = value["v"] if value is not None else self.deleted_at.get(key, -1)
        assert now >= before, f"process {i} read {key!r} at version {now} after version {before}"
        self.seen[i][key] = now

    # -- writes -------------------------------------------------------------------------------

    @rule(data=st.data(), key=st.sampled_from(KEYS), payload=payloads)
    def put(self, data: st.DataObject, key: str, payload: Any) -> None:
        """A put returns once every other process can read it."""
        who = self._who(data)
        value = self._value(payload)
        self.children[who].request({"op": "put", "key": key, "value": value})
        self.model[key] = value
        for i in range(len(self.children)):
            if self.open[i]:
                self._read(i, key)

    @rule(data=st.data(), items=st.lists(st.tuples(st.sampled_from(KEYS), payloads), min_size=1, max_size=5))
    def update(self, data: st.DataObject, items: list[tuple[str, Any]]) -> None:
        """``update()`` with repeated keys: the last one wins, as in a dict, in every process."""
        who = self._who(data)
        batch = [(key, self._value(payload)) for key, payload in items]
        self.children[who].request({"op": "update", "items": batch})
        self.model.update(batch)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """A delete in one process: the key is gone in all of them when it returns."""
        who = self._who(data)
        key = data.draw(st.sampled_from(sorted(self.model)), label="key")
        self.children[who].request({"op": "del", "key": key})
        self.version += 1
        self.deleted_at[key] = self.version
        del self.model[key]
        for i in range(len(self.children)):
            if self.open[i]:
                self._read(i, key)

    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def delete_absent(self, data: st.DataObject, key: str) -> None:
        """Deleting a key no process holds raises KeyError, like a dict, and writes nothing."""
        if key in self.model:
            return
        who = self._who(data)
        answer = self.children[who].ask({"op": "del", "key": key})
        assert not answer["ok"] and answer["error"] == "KeyError", answer

    @precondition(lambda self: sum(self.open) >= 2)
    @rule(data=st.data(), key=st.sampled_from(KEYS), first=payloads, second=payloads)
    def concurrent_puts(self, data: st.DataObject, key: str, first: Any, second: Any) -> None:
        """Two processes write one key at the same moment: once both returned, every process reads the same winner."""
        a = self._who(data, "first writer")
        b = data.draw(
            st.sampled_from([i for i, o in enumerate(self.open) if o and i != a]), label="second writer"
        )
        values = [self._value(first), self._value(second)]
        pending = [
            (who, self.children[who].begin({"op": "put", "key": key, "value": value}))
            for who, value in zip((a, b), values, strict=True)
        ]
        for who, start in pending:
            answer = self.children[who].answer(start)
            assert answer["ok"], answer
        winner = self.children[a].request({"op": "get", "key": key})["value"]
        assert winner in values, f"{key!r} reads {winner}, neither of the two values written"
        self.model[key] = winner
        for i in range(len(self.children)):
            if self.open[i]:
                self._read(i, key)

    # -- reads and the store's lifecycle ------------------------------------------------------

    @rule(data=st.data(), key=st.sampled_from(KEYS))
    def get(self, data: st.DataObject, key: str) -> None:
        self._read(self._who(data), key)

    @rule(data=st.data())
    def sync(self, data: st.DataObject) -> None:
        """``sync()`` in any process returns (nothing is left to replay) and changes nothing."""
        self.children[self._who(data)].request({"op": "sync"})

    @precondition(lambda self: sum(self.open) >= 2)
    @rule(data=st.data())
    def close_store(self, data: st.DataObject) -> None:
        """A process closes its store while the others go on writing."""
        who = self._who(data)
        self.children[who].request({"op": "close"})
        self.open[who] = False

    @precondition(lambda self: not all(self.open))
    @rule(data=st.data())
    def open_store(self, data: st.DataObject) -> None:
        """Opening again (a warm start) shows everything the others wrote meanwhile."""
        who = data.draw(st.sampled_from([i for i, o in enumerate(self.open) if not o]), label="process")
        self.children[who].request({"op": "open", "path": str(self.path)})
        self.open[who] = True

    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        """Close and open again in one step."""
        self.children[self._who(data)].request({"op": "reopen"})

    # -- after every step ---------------------------------------------------------------------

    @invariant()
    def every_process_reads_the_model(self) -> None:
        """Every open process holds exactly the model, and no key went back in time for any of them."""
        for i, child in enumerate(self.children):
            if not self.open[i]:
                continue
            items = child.request({"op": "items"})
            assert items == self.model, f"process {i} holds {items}, the model {self.model}"
            for key in KEYS:
                self._note_seen(i, key, items.get(key))


@pytest.fixture
def serve_children(tmp_path: Path) -> Any:
    with Children(tmp_path) as children:
        started = [children.start("serve", "-", name=f"process-{i}") for i in range(PROCESSES)]
        for child in started:
            child.expect("ready")
        yield started


def test_three_processes_on_one_directory_behave_like_one_dict(
    serve_children: list[Child], tmp_path: Path
) -> None:
    machine = type(
        "SharedStoreMachine", (SharedStoreMachine,), {"children": serve_children, "root": tmp_path / "data"}
    )
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)
