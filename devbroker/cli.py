"""The command line, ``python -m devbroker``: run one broker until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .broker import DevBroker
from .errors import DevBrokerError
from .jars import DEFAULT_KAFKA_VERSION, fetch_jars

_PROG = "devbroker"


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m devbroker``: start a broker and keep it up until Ctrl-C/SIGTERM.

    Args:
        argv: the command-line arguments (without the program name); ``None`` reads
            ``sys.argv[1:]``. ``--port``, ``--controller-port``, ``--dir``,
            ``--kafka-version`` and ``--fetch-only``; ``--help`` describes them.

    Returns:
        The process exit code: 0 on success, 1 if the broker could not be fetched or started
        (or died while running), 130 if interrupted before it was up.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {_PROG}",
        description="Run a throwaway single-node Kafka broker (KRaft) on 127.0.0.1 for "
        "kvlog development and tests. Not for production.",
    )
    parser.add_argument("--port", type=int, default=9092, help="client port (default: 9092)")
    parser.add_argument(
        "--controller-port",
        type=int,
        default=None,
        help="KRaft controller port (default: port + 1)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="data/config/log directory, kept afterwards and reusable (default: a temp dir deleted on exit)",
    )
    parser.add_argument("--kafka-version", default=DEFAULT_KAFKA_VERSION, help="Kafka version to run")
    parser.add_argument(
        "--fetch-only",
        action="store_true",
        help="only fetch the jars and print their directory",
    )
    args = parser.parse_args(argv)
    if args.controller_port is not None and args.controller_port == args.port:
        parser.error("--controller-port must differ from --port")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.fetch_only:
            print(fetch_jars(args.kafka_version), flush=True)
            return 0
        return _serve(args)
    except DevBrokerError as exc:
        # The first line is the summary; any further lines are log tails that would be lost
        # otherwise (a temp workdir is deleted on exit), so keep them below it.
        summary, _, details = str(exc).partition("\n")
        print(f"{_PROG}: error: {summary}", file=sys.stderr, flush=True)
        if details:
            print(details, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


def _serve(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()
    ready = False

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()
        if not ready:
            # Abort fetching/starting right away; start() kills a half-started JVM.
            raise KeyboardInterrupt

    broker = DevBroker(
        args.dir,
        kafka_version=args.kafka_version,
        port=args.port,
        # Fixed rather than random: a reused --dir then always gets the same controller port.
        controller_port=args.controller_port or args.port + 1,
    )
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker.start()
        ready = True
        print(
            f"Kafka {broker.kafka_version} (KRaft, single node) listening on "
            f"{broker.bootstrap_servers} — data in {broker.workdir}; Ctrl-C to stop",
            flush=True,
        )
        while not stop_requested.wait(0.5):
            if not broker.is_running():
                raise DevBrokerError(f"Kafka exited unexpectedly\n{broker.failure_details()}")
        print("stopping Kafka ...", file=sys.stderr, flush=True)
        return 0
    finally:
        ready = True  # a second Ctrl-C must not interrupt the graceful stop below
        broker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
