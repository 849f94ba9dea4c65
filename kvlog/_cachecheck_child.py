"""The child process of the cache's structure check: walk every table of an LMDB environment.

Run by :func:`kvlog.cachecheck.check_structure` as ``python -P <this file> PATH MODE``
(``MODE`` in octal, such as ``0o600``), so that LMDB crashing on a damaged file
kills this process, not the user's. Prints ``ok`` and exits 0 if every table
can be walked in key order and holds the entries it claims; otherwise prints
why and exits 3. It imports only lmdb: importing kvlog would double its start time.
"""

from __future__ import annotations

import sys

import lmdb

#: Exit status when the walk found damage (LMDB raising exits 1, LMDB crashing is a signal exit).
DAMAGED = 3


def walk(path: str, mode: int) -> str | None:
    """Open the environment at ``path`` read-only and walk every table; return what is wrong, or ``None``."""
    env = lmdb.open(path, readonly=True, max_dbs=16, max_readers=512, mode=mode, readahead=False)
    with env.begin(buffers=False) as txn:
        names = [bytes(name) for name, _ in txn.cursor()]
        for name in [None, *names]:
            db = None if name is None else env.open_db(name, txn=txn, create=False)
            count, previous = 0, None
            # Values are copied (buffers=False): a value's page pointer that leads
            # outside the file faults here, in the child.
            for key, _value in txn.cursor() if db is None else txn.cursor(db):
                if previous is not None and key <= previous:
                    return f"table {name!r}: key {key[:40]!r} after {previous[:40]!r}: keys out of order"
                previous, count = key, count + 1
            entries = env.stat()["entries"] if db is None else txn.stat(db)["entries"]
            if count != entries:
                return f"table {name!r} says it has {entries} entries, a walk found {count}"
    return None


def main(argv: list[str]) -> int:
    """Walk the environment named by ``argv`` (``PATH MODE``); print the outcome and return the exit status."""
    problem = walk(argv[0], int(argv[1], 8))
    print("ok" if problem is None else problem)
    return 0 if problem is None else DAMAGED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
