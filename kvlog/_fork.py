"""fork() with open stores: the child cannot use them, and says so.

LMDB forbids using an environment in a process forked after it was opened
(its reader slots and locks belong to the parent; py-lmdb does not stop a
child from reading or even writing). The embedded log's writer lock and file
descriptors are shared with the parent too, so a child appending, or closing
the log and leaving a clean-shutdown marker, would corrupt the parent's log.

So every open :class:`~kvlog.KVLog`, cache and embedded log registers here,
and right after ``fork()`` the child marks each one abandoned: any use raises
:class:`~kvlog.ClosedError` saying to open a new store in the child, and
``close()`` does nothing (the parent still owns the files). Registration is a
weak reference, and the read hot path pays nothing: it already checks
``_closed``. The parent is not affected.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["after_fork_message", "register", "unregister"]


class _Abandonable(Protocol):
    def _abandon_after_fork(self) -> None: ...


# By id(): a KVLog is a mapping, and mappings are not hashable. An entry goes
# when its object is collected, so an id is never taken for another object's.
_open: weakref.WeakValueDictionary[int, _Abandonable] = weakref.WeakValueDictionary()


def register(obj: _Abandonable) -> None:
    """Make ``obj`` unusable in a child forked while it is open."""
    _open[id(obj)] = obj


def unregister(obj: _Abandonable) -> None:
    """``obj`` was closed: nothing to do for it after a fork."""
    _open.pop(id(obj), None)


def after_fork_message(what: str) -> str:
    """The error message for a use of ``what`` in a child forked after it was opened."""
    return (
        f"{what} was opened before this process forked; LMDB and the log's files cannot be "
        "shared across fork(): open a new KVLog in the child (the parent keeps using this one)"
    )


def _abandon_in_child() -> None:
    for obj in list(_open.values()):
        obj._abandon_after_fork()
    _open.clear()


os.register_at_fork(after_in_child=_abandon_in_child)
