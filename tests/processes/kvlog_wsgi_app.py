"""A tiny WSGI service over one KVLog, for the gunicorn test in test_fork.py.

``GET /kv/KEY`` answers ``{"value": ..., "pid": ..., "opened_in": ...}`` (404
if absent); ``PUT /kv/KEY`` with a JSON body stores it and answers ``{"pid":
..., "opened_in": ...}``. ``pid`` is the worker that served the request,
``opened_in`` the process that opened the store this worker uses.

The data directory is ``$KVLOG_TEST_DATA``. ``$KVLOG_TEST_OPEN`` says when
the store opens: ``import`` (when this module is imported: with gunicorn's
``--preload``, in the master, before the workers fork, so each worker uses
an object opened in its parent), ``post_fork`` (in each worker, by the hook
in kvlog_gunicorn_conf.py) or ``lazy`` (at a worker's first request).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from kvlog import KVLog

DATA = os.environ["KVLOG_TEST_DATA"]
OPEN = os.environ.get("KVLOG_TEST_OPEN", "import")

store: KVLog | None = None
opened_in: int | None = None


def open_store() -> KVLog:
    global store, opened_in
    if store is None:
        store = KVLog(DATA)
        opened_in = os.getpid()
    return store


if OPEN == "import":
    open_store()


def _answer(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    kv = store if store is not None else open_store()
    path = environ.get("PATH_INFO", "")
    if not path.startswith("/kv/"):
        return _answer(start_response, "404 Not Found", {"error": "no such path"})
    key = path[len("/kv/") :]
    me = {"pid": os.getpid(), "opened_in": opened_in}
    if environ["REQUEST_METHOD"] == "PUT":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        kv[key] = json.loads(environ["wsgi.input"].read(length))
        return _answer(start_response, "200 OK", me)
    missing = object()
    value = kv.get(key, missing)
    if value is missing:
        return _answer(start_response, "404 Not Found", me)
    return _answer(start_response, "200 OK", {"value": value, **me})
