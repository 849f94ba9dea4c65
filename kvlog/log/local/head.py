"""The head file: the published state of every partition, shared by every process that has the log open.

``head`` is a fixed binary file that each open :class:`~kvlog.log.local.LocalLog`
maps ``MAP_SHARED``, so an append in one process is seen by the others
without a system call. All fields are 64-bit words in native byte order
(little-endian on every platform kvlog runs on), so that one aligned word is
written and read with a single instruction:

=========================  =====================================================================
word                       meaning
=========================  =====================================================================
0                          magic ``KVLHEAD1``
1                          format (1)
2                          partitions P
3                          version: bumped by every publish; its low bit picks the current copy
4                          writing: 1 while a writer may have bytes past the published ends
5                          clean: 1 when the last close synced everything (cleared before a write)
6, 7                       boot id (16 bytes) of the boot that last wrote the head
8 to 15                    reserved (0)
16 to 16+P-1               suspect[p]: 1 once a bad record was read in p's active segment
then copy 0, then copy 1   each: generation, then per partition: end offset, active base, active size
=========================  =====================================================================

Writers hold the log's write lock. A publish writes the copy that is not
current and then stores the next version, whose low bit selects it: one word,
so a writer killed at any point leaves one whole copy current, and a reader
that reads the version, then the copy, then the version again and finds it
unchanged read a copy nobody was writing (a copy is only rewritten after the
version moved past it). The generation is bumped whenever a partition's
segment list changes (a roll, a compaction swap): a process that sees it move
reloads the segment lists from the directory. See docs/design.md, "The
embedded log".
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from ..._files import fsync_dir, open_file

__all__ = [
    "HEAD_FILE",
    "W_CLEAN",
    "W_VERSION",
    "W_WRITING",
    "Entry",
    "Head",
    "Snapshot",
    "current_boot_id",
    "head_size",
]

#: The head's file name in the log directory.
HEAD_FILE = "head"
_MAGIC = int.from_bytes(b"KVLHEAD1", "little")
_FORMAT = 1
_HEADER_WORDS = 16
_W_MAGIC, _W_FORMAT, _W_PARTITIONS, _W_VERSION, _W_WRITING, _W_CLEAN, _W_BOOT = 0, 1, 2, 3, 4, 5, 6
#: Indexes in :attr:`Head.words` of the words the append path reads and writes directly.
W_VERSION, W_WRITING, W_CLEAN = _W_VERSION, _W_WRITING, _W_CLEAN
_ENTRY_WORDS = 3
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_boot_id: bytes | None = None


def current_boot_id() -> bytes:
    """The 16 bytes of this boot's id (zeros where the OS does not tell: a head is then never trusted by it)."""
    global _boot_id
    if _boot_id is None:
        try:
            with open(_BOOT_ID_PATH, encoding="ascii") as f:
                _boot_id = uuid.UUID(f.read().strip()).bytes
        except (OSError, ValueError):
            _boot_id = bytes(16)
    return _boot_id


def head_size(partitions: int) -> int:
    """The size in bytes of the head of a log of ``partitions`` partitions."""
    return 8 * (_HEADER_WORDS + partitions + 2 * (1 + _ENTRY_WORDS * partitions))


class Entry(NamedTuple):
    """What the head publishes of one partition."""

    end: int
    base: int
    size: int


class Snapshot(NamedTuple):
    """A consistent read of the head's current copy."""

    version: int
    generation: int
    entries: list[Entry]


class Head:
    """The mapped head file of a log (see the module docstring for the layout)."""

    def __init__(self, path: Path, fd: int, partitions: int) -> None:
        self.path = path
        self.partitions = partitions
        self._fd = fd
        self._mm = mmap.mmap(fd, head_size(partitions), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._mm).cast("Q")
        #: The head as 64-bit words (the hot paths index it directly; see W_VERSION).
        self.words = self._words
        self._copy_words = 1 + _ENTRY_WORDS * partitions
        self._copy_bytes = 8 * self._copy_words
        #: (version, partition) of this object's last publish_one (see there).
        self._last: tuple[int, int] | None = None
        self._copies = (
            _HEADER_WORDS + partitions,
            _HEADER_WORDS + partitions + self._copy_words,
        )

    # -- opening and creating ------------------------------------------------------

    @classmethod
    def open(cls, log_path: Path, partitions: int) -> Head | None:
        """Map the head of the log at ``log_path``; None if it is missing or not a head of this log."""
        path = log_path / HEAD_FILE
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size != head_size(partitions):
                os.close(fd)
                return None
            head = cls(path, fd, partitions)
        except BaseException:
            os.close(fd)
            raise
        w = head._words
        if w[_W_MAGIC] != _MAGIC or w[_W_FORMAT] != _FORMAT or w[_W_PARTITIONS] != partitions:
            head.close()
            return None
        return head

    @classmethod
    def create(cls, log_path: Path, entries: list[Entry], file_mode: int, *, sync: bool = True) -> Head:
        """Write a new head (through a temporary file and a rename) and map it."""
        partitions = len(entries)
        path = log_path / HEAD_FILE
        tmp = log_path / (HEAD_FILE + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        words = [0] * (head_size(partitions) // 8)
        words[_W_MAGIC], words[_W_FORMAT], words[_W_PARTITIONS] = _MAGIC, _FORMAT, partitions
        boot = current_boot_id()
        words[_W_BOOT] = int.from_bytes(boot[:8], "little")
        words[_W_BOOT + 1] = int.from_bytes(boot[8:], "little")
        start = _HEADER_WORDS + partitions
        for p, entry in enumerate(entries):
            words[start + 1 + _ENTRY_WORDS * p : start + 1 + _ENTRY_WORDS * (p + 1)] = entry
        data = b"".join(word.to_bytes(8, "little") for word in words)
        fd = open_file(tmp, os.O_RDWR | os.O_TRUNC, file_mode)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            os.replace(tmp, path)
            if sync:
                fsync_dir(log_path)
            return cls(path, fd, partitions)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        """Unmap the head and close its file (never touches what other processes see)."""
        with contextlib.suppress(Exception):
            self._words.release()
        with contextlib.suppress(Exception):
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def abandon(self) -> None:
        """In a forked child: close the descriptor only (the child's mapping goes with the process)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- reading ----------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The publish counter (read it to see whether anything changed since a snapshot)."""
        return int(self._words[_W_VERSION])

    def snapshot(self) -> Snapshot:
        """A consistent read of the current copy (retried while a writer moves the version under it)."""
        w = self._words
        n = self._copy_words
        while True:
            version = w[_W_VERSION]
            start = self._copies[version & 1]
            copy = w[start : start + n].tolist()
            if w[_W_VERSION] == version:
                break
        entries = [Entry(*copy[i : i + _ENTRY_WORDS]) for i in range(1, n, _ENTRY_WORDS)]
        return Snapshot(version, copy[0], entries)

    @property
    def writing(self) -> bool:
        return bool(self._words[_W_WRITING])

    @writing.setter
    def writing(self, value: bool) -> None:
        self._words[_W_WRITING] = int(value)

    @property
    def clean(self) -> bool:
        return bool(self._words[_W_CLEAN])

    @clean.setter
    def clean(self, value: bool) -> None:
        self._words[_W_CLEAN] = int(value)

    @property
    def boot_id(self) -> bytes:
        w = self._words
        return int(w[_W_BOOT]).to_bytes(8, "little") + int(w[_W_BOOT + 1]).to_bytes(8, "little")

    def stamp_boot(self) -> None:
        """Record that this boot wrote the head."""
        boot = current_boot_id()
        self._words[_W_BOOT] = int.from_bytes(boot[:8], "little")
        self._words[_W_BOOT + 1] = int.from_bytes(boot[8:], "little")

    def suspect(self, p: int) -> bool:
        return bool(self._words[_HEADER_WORDS + p])

    def set_suspect(self, p: int, value: bool = True) -> None:
        self._words[_HEADER_WORDS + p] = int(value)

    # -- writing (callers hold the write lock) -----------------------------------------------

    def publish(
        self, changes: Mapping[int, Entry] | Iterable[tuple[int, Entry]], *, generation_step: int = 0
    ) -> int:
        """Publish new entries for some partitions (and a new generation); return the new version.

        Sets the writing flag first (the caller clears it when done): a writer
        that dies half-way through the copy leaves it set, which tells the next
        holder of the write lock that the copy that is not current is garbage.
        """
        w = self._words
        w[_W_WRITING] = 1
        self._last = None
        version = w[_W_VERSION]
        current = self._copies[version & 1]
        target = self._copies[(version + 1) & 1]
        self._mm.move(8 * target, 8 * current, self._copy_bytes)
        if generation_step:
            w[target] = w[current] + generation_step
        items = changes.items() if isinstance(changes, Mapping) else changes
        for p, entry in items:
            at = target + 1 + _ENTRY_WORDS * p
            w[at], w[at + 1], w[at + 2] = entry
        w[_W_VERSION] = version + 1  # the commit: one aligned word
        return int(version + 1)

    def publish_one(self, p: int, end: int, base: int, size: int) -> int:
        """:meth:`publish` for one partition whose segment list did not change (the append path).

        Callers have set the writing flag. When the last publish was this
        object's own, of the same partition, the copy being written differs
        from the current one in that partition's entry only, which is
        overwritten: the copy of the rest is skipped.
        """
        w = self._words
        version = w[_W_VERSION]
        if version & 1:
            target, current = self._copies
        else:
            current, target = self._copies
        if self._last != (version, p):
            self._mm.move(8 * target, 8 * current, self._copy_bytes)
        at = target + 1 + _ENTRY_WORDS * p
        w[at] = end
        w[at + 1] = base
        w[at + 2] = size
        w[_W_VERSION] = version = version + 1
        self._last = (version, p)
        return version

    def forget_last(self) -> None:
        """A writer died holding the write lock: the copy that is not current may be half-written."""
        self._last = None

    def sync(self) -> None:
        """msync the head (what makes the clean flag and the sizes durable)."""
        self._mm.flush()
