"""A multi-broker KRaft Kafka cluster on loopback, for the fault-injection tests.

One dedicated controller process and N broker-only processes, each its own JVM in
its own process group: every node is a :class:`devbroker.DevBroker` subclass that
overrides its extension points (``server_properties``, and ``wait_ready`` for the
controller). Killing brokers therefore never costs the controller quorum: the
controller fences a dead broker after ``broker.session.timeout.ms``, shrinks the
ISR of its partitions and elects new leaders, as a production cluster would.

The quorum is static (``controller.quorum.voters`` names the one controller), so
storage is formatted without ``--standalone``/``--initial-controllers``.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devbroker import DevBroker, DevBrokerError, new_cluster_id, port_is_listening

log = logging.getLogger(__name__)

CONTROLLER_ID = 100
#: Small heaps: four JVMs share a 2-core CI machine with the tests.
NODE_HEAP = "256m"
#: A JVM that starts fast rather than one that runs long: C1 only, serial GC.
NODE_JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")

_COMMON = {
    "controller.listener.names": "CONTROLLER",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    # A killed broker is fenced (and dropped from every ISR) once its session
    # expires; the default 9 s would make each leader failover 9 s long.
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    # Fewer threads than the defaults: four JVMs on two cores.
    "num.network.threads": "2",
    "num.io.threads": "2",
    "background.threads": "2",
}


class ControllerNode(DevBroker):
    """The cluster's only KRaft controller (and quorum voter); serves no clients."""

    def __init__(self, workdir: Path, *, cluster_id: str, heap: str) -> None:
        super().__init__(workdir, heap=heap, jvm_options=NODE_JVM_OPTIONS)
        self.cluster_id = self.existing_cluster_id() or cluster_id

    def server_properties(self) -> dict[str, str]:
        return {
            **_COMMON,
            "process.roles": "controller",
            "node.id": str(CONTROLLER_ID),
            "controller.quorum.voters": f"{CONTROLLER_ID}@127.0.0.1:{self.controller_port}",
            "listeners": f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "log.dirs": str(self.data_dir),
        }

    def wait_ready(self, deadline: float, timeout: float) -> None:
        # No client listener to ask: the controller is up once its port listens.
        # The brokers' own readiness (registered and unfenced) proves the quorum works.
        while not port_is_listening(self.controller_port):
            if not self.is_running():
                raise DevBrokerError(f"the KRaft controller exited during startup\n{self.failure_details()}")
            if time.monotonic() >= deadline:
                raise DevBrokerError(
                    f"the KRaft controller did not listen within {timeout:.0f} s\n{self.failure_details()}"
                )
            self.wait_exit(0.1)  # returns at once if the JVM dies


class BrokerNode(DevBroker):
    """A broker-only node that joins the quorum of a :class:`ControllerNode`."""

    def __init__(
        self,
        workdir: Path,
        *,
        node_id: int,
        controller: ControllerNode,
        heap: str,
        broker_configs: Mapping[str, str],
    ) -> None:
        # Set before DevBroker.__init__, which reads the properties (for an existing cluster id).
        self.node_id = node_id
        self.extra_configs = dict(broker_configs)
        super().__init__(
            workdir, controller_port=controller.controller_port, heap=heap, jvm_options=NODE_JVM_OPTIONS
        )
        self.cluster_id = self.existing_cluster_id() or controller.cluster_id

    def server_properties(self) -> dict[str, str]:
        return {
            **_COMMON,
            "process.roles": "broker",
            "node.id": str(self.node_id),
            "controller.quorum.voters": f"{CONTROLLER_ID}@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            **self.extra_configs,
        }


class KafkaCluster:
    """A KRaft controller plus ``brokers`` broker nodes (ids 1..N) on 127.0.0.1.

    Args:
        workdir: parent directory of every node's workdir (kept: data survives restarts).
        brokers: number of broker nodes.
        heap: JVM max heap of every node.
        broker_configs: extra ``server.properties`` entries for every broker.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        brokers: int = 3,
        heap: str = NODE_HEAP,
        broker_configs: Mapping[str, str] | None = None,
    ) -> None:
        self.controller = ControllerNode(workdir / "controller", cluster_id=new_cluster_id(), heap=heap)
        self.brokers: dict[int, BrokerNode] = {
            node_id: BrokerNode(
                workdir / f"broker-{node_id}",
                node_id=node_id,
                controller=self.controller,
                heap=heap,
                broker_configs={
                    "default.replication.factor": str(brokers),
                    "offsets.topic.replication.factor": str(brokers),
                    "transaction.state.log.replication.factor": str(brokers),
                    "transaction.state.log.min.isr": "1",
                    **(broker_configs or {}),
                },
            )
            for node_id in range(1, brokers + 1)
        }

    @property
    def bootstrap_servers(self) -> str:
        """Every broker's address, comma-separated (clients fail over between them)."""
        return ",".join(b.bootstrap_servers for b in self.brokers.values())

    def running(self) -> list[int]:
        """Ids of the brokers whose JVM is alive."""
        return [node_id for node_id, b in self.brokers.items() if b.is_running()]

    def start(self, timeout: float = 120.0) -> None:
        """Start the controller, then every stopped broker in parallel; wait until all serve."""
        self.controller.start(timeout=timeout)
        self.start_brokers(list(self.brokers), timeout=timeout)

    def start_brokers(self, node_ids: list[int], timeout: float = 120.0) -> None:
        """Start the given brokers in parallel (each a no-op if running) and wait for all."""
        errors: list[BaseException] = []

        def run(node: BrokerNode) -> None:
            try:
                node.start(timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(self.brokers[n],)) for n in node_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def kill(self, node_id: int) -> None:
        """SIGKILL one broker's process group (a crash: no controlled shutdown)."""
        self.brokers[node_id].kill()

    def close(self) -> None:
        """SIGKILL every node; their data is throwaway (the workdir is the caller's)."""
        for b in self.brokers.values():
            b.kill()
        self.controller.kill()

    # -- partition state, as the controller publishes it ------------------------------------

    def _admin(self) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from kafka.admin import KafkaAdminClient
        live = [self.brokers[n].bootstrap_servers for n in self.running()]
        return KafkaAdminClient(
            bootstrap_servers=",".join(live), request_timeout_ms=5000, bootstrap_timeout_ms=5000
        )

    def partition_state(self, topic: str, partition: int = 0) -> dict[str, Any] | None:
        """``{"leader": id, "isr": [ids]}`` of a partition, or ``None`` if no live broker answers."""
        try:
            admin = self._admin()
        except Exception as exc:  # noqa: BLE001 - a broker may be starting or dying
            log.debug("no admin client: %s", exc)
            return None
        try:
            for info in admin.describe_topics([topic]):
                for p in info["partitions"]:
                    if p["partition_index"] == partition:
                        return {"leader": p["leader_id"], "isr": sorted(p["isr_nodes"])}
        except Exception as exc:  # noqa: BLE001
            log.debug("describe_topics failed: %s", exc)
        finally:
            admin.close()
        return None
