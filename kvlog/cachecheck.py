"""Checks of a cache's LMDB file that run before LMDB opens it in this process.

LMDB trusts its file: a bad page pointer can crash the process instead of
raising. :func:`check_meta_pages` reads both meta pages with plain reads;
:func:`check_structure` walks every table in a child process; :func:`file_signature`
is what the cache records at a clean close, to skip the walk when nothing
changed since. See docs/design.md, "The cache".
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

__all__ = ["check_meta_pages", "check_structure", "file_signature"]

_MDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08
_P_INVALID = (1 << 64) - 1
#: LMDB's two on-disk formats, by page header size: 0.9 (data version 1) and 1.0 (data version 3).
_DATA_VERSION_BY_HEADER = {16: 1, 24: 3}
#: The meta record after the page header: magic, version, address, map size,
#: the free and main table records (48 bytes each), last page, txnid.
_META = struct.Struct("=IIQQ48s48sQQ")
#: A table record: page size (in the free table's record), flags, depth,
#: branch, leaf and overflow pages, entries, root page.
_DB = struct.Struct("=IHHQQQQQ")
_MAX_DEPTH = 32  # LMDB's cursor stack: a deeper tree cannot be read

#: The structure check's program, run by path: ruff and mypy read it like any module.
_CHILD = Path(__file__).with_name("_cachecheck_child.py")
#: Seconds the structure check may take: this much plus one per _BYTES_PER_SECOND of data.mdb.
_TIMEOUT = 60.0
_BYTES_PER_SECOND = 20 * 1024 * 1024


def _parse_meta_page(data: bytes, header: int) -> tuple[str | None, dict[str, int]]:
    """Parse one meta page; return ``(problem or None, fields)``."""
    if len(data) < header + _META.size:
        return "it is cut short", {}
    (flags,) = struct.unpack_from("=H", data, header - 6)
    magic, version, _address, _mapsize, free, main, last_pg, txnid = _META.unpack_from(data, header)
    if not flags & _P_META or magic != _MDB_MAGIC:
        return "it is not an LMDB meta page (zeroed or overwritten)", {}
    if version != _DATA_VERSION_BY_HEADER[header]:
        return f"data version {version}", {}
    psize = _DB.unpack(free)[0]
    fields = {"psize": psize, "last_pg": last_pg, "txnid": txnid}
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"page size {psize}", fields
    if last_pg < 1:
        return f"last page {last_pg}", fields
    for name, record in (("free", free), ("main", main)):
        depth, root = _DB.unpack(record)[2], _DB.unpack(record)[7]
        if depth > _MAX_DEPTH or (root != _P_INVALID and not 2 <= root <= last_pg):
            return f"its {name} table has root page {root} and depth {depth} (last page {last_pg})", fields
    return None, fields


def check_meta_pages(data_file: Path, size: int) -> str | None:
    """Why the meta pages of ``data_file`` (``size`` bytes) are not sound, or ``None``. Plain reads only.

    LMDB reads both meta pages at open and uses the one with the higher
    transaction id; a zeroed one makes it refuse the file, a root page beyond
    the file or a file shorter than its pages makes it read unmapped memory.
    """
    with open(data_file, "rb") as f:
        first = f.read(4096)
        header = next(
            (h for h in _DATA_VERSION_BY_HEADER if first[h : h + 4] == _MDB_MAGIC.to_bytes(4, sys.byteorder)),
            16,
        )
        problem0, meta0 = _parse_meta_page(first, header)
        # Meta page 1 starts one page in: at the page size meta 0 names, else the usual one.
        psize = meta0.get("psize") or 4096
        f.seek(psize)
        problem1, meta1 = _parse_meta_page(f.read(header + _META.size), header)
    if problem0 or problem1:
        damaged = [f"meta page {i} ({problem})" for i, problem in ((0, problem0), (1, problem1)) if problem]
        return "data.mdb has a damaged " + " and a damaged ".join(damaged)
    if meta0["psize"] != meta1["psize"]:
        return f"the meta pages of data.mdb disagree on the page size ({meta0['psize']}, {meta1['psize']})"
    newest = max(meta0, meta1, key=lambda m: m["txnid"])
    needed = (newest["last_pg"] + 1) * newest["psize"]
    if size < needed:
        return f"data.mdb is truncated: it has {size} bytes but its pages need {needed}"
    return None


def file_signature(path: Path) -> dict[str, int]:
    """What changes whenever anyone writes or replaces the file (ctime cannot be set back)."""
    st = path.stat()
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def check_structure(path: Path, size: int, file_mode: int) -> str | None:
    """Walk every table of the environment at ``path`` in a child process; why it is damaged, or ``None``.

    A child that dies of a signal (LMDB's assertions abort, a bad page
    pointer faults), fails, or does not finish in time means the cache is
    damaged, as does an interpreter that cannot be run: the file is then not
    known to be safe to open here.

    Args:
        path: the environment's directory.
        size: the size of its ``data.mdb``, which sets the time allowed.
        file_mode: the mode of the lock file, should the child create it.
    """
    timeout = _TIMEOUT + size / _BYTES_PER_SECOND
    try:
        done = subprocess.run(
            # By path, not -m: -m would import kvlog (and kafka-python) first. -P keeps
            # the child's directory out of sys.path, so no kvlog module shadows another.
            [sys.executable or "", "-P", str(_CHILD), str(path), oct(file_mode)],  # None: not runnable
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"a check of its structure did not finish within {timeout:.0f}s"
    except OSError as exc:
        return f"its structure could not be checked (cannot run {sys.executable}: {exc})"
    if done.returncode == 0 and done.stdout.strip() == "ok":
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return f"reading it crashed a check process with {name}"
    said = (done.stdout.strip() or done.stderr.strip() or f"exit status {done.returncode}").splitlines()[-1]
    return f"a check of its structure failed: {said}"
