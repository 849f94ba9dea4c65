"""File operations shared by the embedded log and the cache: durable writes, and the modes of new files.

Every file kvlog creates gets exactly ``file_mode`` (0600 unless the user asks
otherwise) and every directory the matching ``dir_mode`` (0700), whatever the
process umask: a cache and a log hold the user's data, so a permissive umask
must not make them readable by other users. Files and directories that
already exist keep their modes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = [
    "DEFAULT_FILE_MODE",
    "check_file_mode",
    "dir_mode",
    "fsync_dir",
    "make_dirs",
    "open_file",
    "write_file_atomically",
]

#: Readable and writable by the owner only.
DEFAULT_FILE_MODE = 0o600


def check_file_mode(file_mode: int) -> int:
    """Return ``file_mode`` if kvlog can work with it; raise ``ValueError`` otherwise."""
    if isinstance(file_mode, bool) or not isinstance(file_mode, int) or not 0 <= file_mode <= 0o777:
        raise ValueError(f"file_mode must be permission bits such as 0o600, not {file_mode!r}")
    if file_mode & 0o600 != 0o600:
        raise ValueError(f"file_mode must let the owner read and write (0o600), not {file_mode:#o}")
    return file_mode


def dir_mode(file_mode: int) -> int:
    """The mode of a directory holding files of ``file_mode``: each class that may read may also enter."""
    return file_mode | ((file_mode & 0o444) >> 2)


def make_dirs(path: Path, file_mode: int = DEFAULT_FILE_MODE) -> None:
    """Create ``path`` and its missing parents with exactly ``dir_mode(file_mode)``.

    Unlike ``Path.mkdir(parents=True)``, parents get the mode too (not the
    umask's default), and the umask cannot widen or narrow it.
    """
    if path.is_dir():
        return
    if path.parent != path:
        make_dirs(path.parent, file_mode)
    mode = dir_mode(file_mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if path.is_dir():
            return  # created meanwhile (another thread or process): its mode is its creator's
        raise
    os.chmod(path, mode)


def open_file(path: Path, flags: int, file_mode: int = DEFAULT_FILE_MODE) -> int:
    """``os.open(path, flags | O_CREAT)``; a file this creates gets exactly ``file_mode``."""
    flags &= ~os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, file_mode)
    except FileExistsError:
        return os.open(path, flags)
    try:
        os.fchmod(fd, file_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: Path) -> None:
    """Sync a directory: a rename or a new file is durable only once its directory entry is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes, *, sync: bool, file_mode: int = DEFAULT_FILE_MODE) -> None:
    """Replace ``path`` with ``data`` through a temporary file and a rename (synced if ``sync``).

    A failure (a full disk) leaves ``path`` as it was and no temporary file behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crash: its mode is not necessarily ours
    try:
        fd = open_file(tmp, os.O_WRONLY | os.O_TRUNC, file_mode)
        with open(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)
