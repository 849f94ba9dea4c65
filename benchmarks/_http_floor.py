"""The HTTP floor of the http workload: a bare Starlette route returning a dict, on uvicorn.

    python -m benchmarks._http_floor

Binds a free loopback port, prints ``listening PORT`` and serves
``GET /v1/keys/{key}`` with the same order-like dict for every key, run by
uvicorn exactly as ``kvlog serve`` runs its app (one process, the same
config): what any Starlette route costs before it does any work of its own.
SIGTERM stops it.
"""

from __future__ import annotations

import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarks.harness import value_of_size

#: The value every key answers: the size of the workload's values.
VALUE = value_of_size(1, 100)


async def get_key(request: Request) -> Response:
    return JSONResponse(VALUE)


def main() -> int:
    app = Starlette(routes=[Route("/v1/keys/{key:path}", get_key, methods=["GET"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # as kvlog serve's
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"listening {sock.getsockname()[1]}", flush=True)
    # The settings kvlog serve gives uvicorn (kvlog/cli.py, _cmd_serve).
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
