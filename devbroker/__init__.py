"""A throwaway single-node Apache Kafka broker (KRaft mode) for tests, benchmarks and local dev.

kvlog needs a real Kafka broker to talk to. This package fetches the broker's jars from Maven
Central (with ``mvn``, cached under :func:`jar_cache_dir`), formats a KRaft storage directory and
runs ``kafka.Kafka`` as a combined broker+controller listening on 127.0.0.1 only. It is NOT meant
for production: one node, replication factor 1, plaintext, no authentication.

It lives next to ``kvlog/`` in the source checkout and is not part of the installed ``kvlog``
distribution: run it from the checkout (the tests and benchmarks do, with the checkout on
``sys.path``).

Requirements: ``java`` (17 or newer) and ``mvn`` on ``PATH``, plus access to Maven Central the
first time (Debian/Ubuntu: ``apt-get install maven openjdk-17-jre-headless``).

From the command line, in the checkout::

    python -m devbroker                 # 127.0.0.1:9092, data in a temp dir, Ctrl-C to stop
    python -m devbroker --port 9192 --dir ./kafka-dev-data
    python -m devbroker --fetch-only    # just download the jars and print where they are

From Python (e.g. a pytest fixture)::

    with DevBroker() as broker:
        store = ...(bootstrap_servers=broker.bootstrap_servers)

A subclass of :class:`DevBroker` can run another kind of node (e.g. one node of a multi-node
test cluster) by overriding :meth:`DevBroker.server_properties`, :meth:`DevBroker.wait_ready`,
:meth:`DevBroker.existing_cluster_id` and :meth:`DevBroker.failure_details`.

Any broker still running when the Python process that started it exits is killed by an
``atexit`` handler, so an aborted test run does not leave stray JVMs behind. Log records go to
the ``devbroker`` logger and its children.
"""

from __future__ import annotations

from .broker import DevBroker, new_cluster_id
from .cli import main
from .errors import DevBrokerError
from .jars import DEFAULT_KAFKA_VERSION, DEFAULT_LOG4J_VERSION, fetch_jars, jar_cache_dir
from .ports import free_ports, port_is_listening

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_LOG4J_VERSION",
    "DevBroker",
    "DevBrokerError",
    "fetch_jars",
    "free_ports",
    "jar_cache_dir",
    "main",
    "new_cluster_id",
    "port_is_listening",
]
