"""gunicorn settings for test_fork.py's run without --preload: each worker opens the store after the fork."""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    import kvlog_wsgi_app

    kvlog_wsgi_app.open_store()
