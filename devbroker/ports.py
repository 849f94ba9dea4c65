"""Loopback port helpers: pick free ports, and tell whether something listens on one."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """Return *count* distinct ports on 127.0.0.1 that were free a moment ago.

    Nothing reserves them: another process may take one before the caller binds it, so use
    them right away (a port nobody listens on is also a good "broker is down" address).

    Args:
        count: how many ports to return.
    """
    socks: list[socket.socket] = []
    try:
        # Keep all sockets bound until the end so the kernel cannot hand out the same port twice.
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_listening(port: int) -> bool:
    """Return whether something already listens on 127.0.0.1:*port*.

    The check tries to bind the port rather than connect to it, so the listener (perhaps a
    JVM that is still starting) never sees a connection.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR so leftover TIME_WAIT connections from our own previous run (restart) do
        # not count; on Linux bind still fails if there is a live listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _accepts_connections(port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to 127.0.0.1:*port* succeeds within *timeout* seconds."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
