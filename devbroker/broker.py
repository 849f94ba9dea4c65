"""The broker process: :class:`DevBroker` configures, formats, starts and stops one Kafka node."""

from __future__ import annotations

import atexit
import base64
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .errors import DevBrokerError, _file_tail, _tail_text
from .jars import DEFAULT_KAFKA_VERSION, _check_version, _find_java, fetch_jars
from .ports import _accepts_connections, free_ports, port_is_listening

logger = logging.getLogger(__name__)

_NODE_ID = 1

# Brokers started by this process and possibly still running, killed at interpreter exit.
_LIVE: dict[int, DevBroker] = {}
_LIVE_LOCK = threading.Lock()


def _atexit_kill_all() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE.values())
    for broker in brokers:
        # A forked child inherits _LIVE (and atexit handlers) but does not own the brokers.
        if broker._owner_pid != os.getpid():
            continue
        try:
            broker.kill()
            broker._remove_owned_workdir()
        except Exception:  # best effort while the interpreter shuts down
            logger.exception("could not kill %r at exit", broker)


atexit.register(_atexit_kill_all)


def new_cluster_id() -> str:
    """Return a fresh random KRaft cluster id.

    The format ``kafka-storage.sh random-uuid`` prints: a random 16-byte UUID in URL-safe
    base64 without padding (22 characters). Every node of one cluster must be formatted with
    the same id.
    """
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _prop_escape(text: str) -> str:
    # java.util.Properties treats backslashes as escapes and a newline would end the entry.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _read_properties(path: Path) -> dict[str, str]:
    """Minimal reader for the simple key=value files Kafka writes (meta.properties)."""
    props: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        props[key.strip()] = value.strip()
    return props


class DevBroker:
    """A single-node KRaft Kafka broker on loopback, for tests, benchmarks and development.

    Args:
        workdir: directory for the configuration, data and logs. ``None`` creates a temp dir
            that :meth:`close` removes again; a given directory is kept, and reusing it keeps
            the data of a previous run.
        kafka_version: Kafka version to fetch and run.
        port: client (PLAINTEXT) port on 127.0.0.1; ``None`` picks a free one.
        controller_port: KRaft controller port on 127.0.0.1; ``None`` picks a free one.
        heap: JVM max heap (``-Xmx``).
        jvm_options: further JVM options, e.g. ``["-XX:TieredStopAtLevel=1"]`` for a faster start.
        broker_configs: extra ``server.properties`` entries, overriding the defaults.

    Subclasses may run another kind of node (say, one node of a multi-node cluster) by
    overriding the extension points :meth:`server_properties`, :meth:`wait_ready`,
    :meth:`existing_cluster_id` and :meth:`failure_details`; everything else (ports checked
    before a start, storage formatting, the node id) is derived from :meth:`server_properties`.

    Not thread-safe: start/stop/kill one broker from one thread at a time.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        kafka_version: str = DEFAULT_KAFKA_VERSION,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        jvm_options: Sequence[str] = (),
        broker_configs: Mapping[str, str] | None = None,
    ) -> None:
        _check_version("Kafka", kafka_version)
        self.workdir: Path
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kvlog-broker-"))
            self._owns_workdir = True
        else:
            self.workdir = Path(workdir).expanduser().resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False
        self.kafka_version = kafka_version
        self.heap = heap
        self.jvm_options = list(jvm_options)
        self.broker_configs: dict[str, str] = {str(k): str(v) for k, v in (broker_configs or {}).items()}
        if port is None or controller_port is None:
            free = iter(free_ports(2))
            port = port if port is not None else next(free)
            controller_port = controller_port if controller_port is not None else next(free)
        if port == controller_port:
            raise ValueError("port and controller_port must differ")
        self.port: int = port
        self.controller_port: int = controller_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        # A reused workdir is already formatted with some cluster id; keep reporting that one.
        self.cluster_id: str = self.existing_cluster_id() or new_cluster_id()

    # -- paths and config ---------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"``, for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's log4j log file (``server.log`` in the workdir)."""
        return self.workdir / "server.log"

    @property
    def stdout_path(self) -> Path:
        """File receiving the JVM's stdout and stderr (crashes before log4j is up land here)."""
        return self.workdir / "broker.out"

    @property
    def data_dir(self) -> Path:
        """Default ``log.dirs`` of the broker (unless overridden by ``broker_configs``)."""
        return self.workdir / "data"

    @property
    def pid(self) -> int | None:
        """PID of the JVM (also its process group id) while it runs, else ``None``."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def server_properties(self) -> dict[str, str]:
        """Return the node's ``server.properties`` entries (an extension point).

        The default is a combined broker+controller node (``node.id`` 1) with a client listener
        on :attr:`port`, a controller listener on :attr:`controller_port`, data in
        :attr:`data_dir` and replication factor 1 everywhere, with ``broker_configs`` on top.

        Override it to run another kind of node. ``node.id``, ``listeners`` and ``log.dirs``
        must be present: they give the node id that readiness looks for, the ports that must
        be free before a start, and the storage directories. With ``controller.quorum.voters``
        present the quorum is static and storage is formatted without ``--standalone``.

        It is called often, so keep it cheap and deterministic. ``DevBroker.__init__`` calls it
        already (through :meth:`existing_cluster_id`), after setting ``workdir``, ``port``,
        ``controller_port`` and ``broker_configs``: a subclass must set any attribute of its own
        that it reads here before calling ``super().__init__()``.
        """
        props = {
            "process.roles": "broker,controller",
            "node.id": str(_NODE_ID),
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": (f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            # No reason to delay the first consumer group rebalance on a one-node dev cluster.
            "group.initial.rebalance.delay.ms": "0",
            # kvlog relies on compaction; let the cleaner look for work often.
            "log.cleaner.backoff.ms": "200",
            # After kill() the restarted node must wait for its previous incarnation's
            # session to expire before it is unfenced (9 s by default); keep that short.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
        }
        props.update(self.broker_configs)
        return props

    # The helpers below read the configuration rather than assume the single-node layout, so
    # a subclass that changes the roles or listeners only overrides server_properties().

    def _node_id(self) -> int:
        return int(self.server_properties()["node.id"])

    def _listen_ports(self) -> list[int]:
        """The loopback ports named in ``listeners`` (checked to be free before a start)."""
        listeners = self.server_properties()["listeners"]
        return [int(entry.rsplit(":", 1)[1]) for entry in listeners.split(",") if entry.strip()]

    def _format_options(self) -> list[str]:
        # A static quorum (controller.quorum.voters) is named in the config; only a dynamic
        # quorum needs the first controller to be formatted as its own single voter.
        if "controller.quorum.voters" in self.server_properties():
            return []
        return ["--standalone"]

    def _log_dirs(self) -> list[Path]:
        value = self.server_properties()["log.dirs"]
        return [Path(d.strip()) for d in value.split(",") if d.strip()]

    def existing_cluster_id(self) -> str | None:
        """Return the cluster id the node's storage is formatted with (an extension point).

        Read from ``meta.properties`` in the first log dir of :meth:`server_properties` that
        has one; ``None`` while the storage is not formatted yet. ``DevBroker.__init__`` keeps
        this id for a reused workdir, and :meth:`start` reports the id the storage tool kept.
        """
        for d in self._log_dirs():
            meta = d / "meta.properties"
            if meta.is_file():
                cluster_id = _read_properties(meta).get("cluster.id")
                if cluster_id:
                    return cluster_id
        return None

    def _is_formatted(self) -> bool:
        return all((d / "meta.properties").is_file() for d in self._log_dirs())

    def _write_config(self) -> tuple[Path, Path]:
        props_path = self.workdir / "server.properties"
        lines = [f"{_prop_escape(k)}={_prop_escape(v)}" for k, v in self.server_properties().items()]
        props_path.write_text("# written by devbroker; edits are overwritten\n" + "\n".join(lines) + "\n")
        log4j_path = self.workdir / "log4j2.properties"
        log4j_path.write_text(
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {_prop_escape(str(self.log_path))}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = file\n"
            # These log every request / controller event at INFO and drown everything else.
            "logger.request.name = kafka.request.logger\n"
            "logger.request.level = WARN\n"
            "logger.controller.name = org.apache.kafka.controller\n"
            "logger.controller.level = WARN\n"
            "logger.statechange.name = state.change.logger\n"
            "logger.statechange.level = WARN\n"
            # Every client and config object dumps all its settings (hundreds of lines per
            # start), which would push the interesting lines out of the failure tail.
            "logger.config.name = org.apache.kafka.common.config.AbstractConfig\n"
            "logger.config.level = WARN\n"
        )
        return props_path, log4j_path

    def failure_details(self, extra_output: str | None = None) -> str:
        """Return the text to append to an error message about this node (an extension point).

        The last lines of the broker's log (:attr:`log_path`) and of the JVM's output
        (:attr:`stdout_path`), each under a header naming the file.

        Args:
            extra_output: output of a command that failed (e.g. the storage tool); its last
                lines come first.
        """
        parts = []
        if extra_output is not None:
            parts.append(f"--- command output ---\n{_tail_text(extra_output) or '(empty)'}")
        parts.append(f"--- {self.log_path} (last lines) ---\n{_file_tail(self.log_path)}")
        parts.append(f"--- {self.stdout_path} (last lines) ---\n{_file_tail(self.stdout_path)}")
        return "\n".join(parts)

    # -- lifecycle ----------------------------------------------------------------------------

    def is_running(self) -> bool:
        """True while the broker JVM started by :meth:`start` is alive."""
        return self._proc is not None and self._proc.poll() is None

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to *timeout* seconds for the JVM to exit; return its exit code, or ``None``.

        ``None`` means it still runs. Meant as the pause between two polls in
        :meth:`wait_ready`: unlike ``time.sleep`` it returns as soon as the JVM dies.

        Raises:
            DevBrokerError: there is no JVM to wait for (never started, or stopped already).
        """
        proc = self._proc
        if proc is None:
            raise DevBrokerError(f"{self!r} has no JVM to wait for")
        try:
            return proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def start(self, timeout: float = 90.0) -> Self:
        """Start the broker and wait until it serves requests; no-op if already running.

        Fetches the jars if needed (not counted in *timeout*), formats the storage on first
        use only (so a restart keeps the data), launches the JVM in its own process group and
        waits for :meth:`wait_ready`.

        Args:
            timeout: seconds to wait for formatting plus readiness.

        Returns:
            ``self``, for chaining (``broker = DevBroker().start()``).

        Raises:
            DevBrokerError: tools missing, a port is taken, the JVM exited, or it was not
                ready before the deadline; the message includes the tail of the logs.
        """
        if self.is_running():
            return self
        self._reap()
        java = _find_java()
        libs = fetch_jars(self.kafka_version)
        for p in self._listen_ports():
            if port_is_listening(p):
                raise DevBrokerError(f"cannot start Kafka: 127.0.0.1:{p} is already in use")

        deadline = time.monotonic() + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        props_path, log4j_path = self._write_config()
        base_cmd = [
            java,
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={log4j_path}",
        ]

        if not self._is_formatted():
            self._format(base_cmd, props_path, deadline)

        cmd = [
            *base_cmd[:1],
            f"-Xmx{self.heap}",
            *self.jvm_options,
            # A dev broker that ran out of memory should die loudly, not limp along.
            "-XX:+ExitOnOutOfMemoryError",
            *base_cmd[1:],
            "kafka.Kafka",
            str(props_path),
        ]
        logger.info(
            "starting Kafka %s on %s (workdir %s)",
            self.kafka_version,
            self.bootstrap_servers,
            self.workdir,
        )
        with open(self.stdout_path, "ab") as out:
            # Own session/process group: Ctrl-C in a terminal does not hit the JVM behind our
            # back, and stop()/kill() can signal the whole group at once.
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._owner_pid = os.getpid()
        with _LIVE_LOCK:
            _LIVE[id(self)] = self
        try:
            self.wait_ready(deadline, timeout)
        except BaseException:
            # Never leave a half-started JVM behind (also on KeyboardInterrupt).
            self.kill()
            raise
        logger.info("Kafka ready on %s (pid %d)", self.bootstrap_servers, self._proc.pid)
        return self

    def _format(self, base_cmd: list[str], props_path: Path, deadline: float) -> None:
        cmd = [
            *base_cmd,
            "kafka.tools.StorageTool",
            "format",
            # `=` form: a cluster id may start with "-" and would then parse as an option.
            f"--cluster-id={self.cluster_id}",
            f"--config={props_path}",
            *self._format_options(),
            # Only unformatted log dirs are touched; formatted ones keep their data.
            "--ignore-formatted",
        ]
        logger.info(
            "formatting KRaft storage in %s (cluster id %s)",
            self.data_dir,
            self.cluster_id,
        )
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DevBrokerError(f"formatting Kafka storage timed out\n{self.failure_details()}") from exc
        if proc.returncode != 0:
            raise DevBrokerError(
                f"formatting Kafka storage failed (exit code {proc.returncode})\n"
                f"{self.failure_details(proc.stdout)}"
            )
        # If a log dir was already formatted, the tool kept its id; report the id actually used.
        self.cluster_id = self.existing_cluster_id() or self.cluster_id

    def wait_ready(self, deadline: float, timeout: float) -> None:
        """Block until the JVM :meth:`start` just launched serves requests (an extension point).

        The default polls an admin client on :attr:`bootstrap_servers` until this node is
        registered with the cluster and unfenced. Override it for a node that has no client
        listener (a controller-only node), using :meth:`is_running` and :meth:`wait_exit`.
        If it raises, :meth:`start` kills the JVM.

        Args:
            deadline: the :func:`time.monotonic` value by which the node must be ready.
            timeout: the *timeout* :meth:`start` was given, for the error message.

        Raises:
            DevBrokerError: the JVM exited, or the node was not ready by *deadline*; the
                message ends with :meth:`failure_details`.
        """
        admin: Any = None
        last_error = "no connection yet"
        try:
            while True:
                if not self.is_running():
                    code = self._proc.returncode if self._proc is not None else None
                    raise DevBrokerError(
                        f"Kafka exited during startup with code {code}\n{self.failure_details()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DevBrokerError(
                        f"Kafka was not ready within {timeout:.0f} s ({last_error})\n{self.failure_details()}"
                    )
                # Only bother an admin client once the port accepts connections: a failed
                # KafkaAdminClient bootstrap is slow and logs errors.
                if admin is None and _accepts_connections(self.port, timeout=min(1.0, remaining)):
                    admin, last_error = _open_admin(self.bootstrap_servers, remaining)
                if admin is not None:
                    state, last_error = self._check_ready(admin)
                    if state == "ready":
                        return
                    if state == "error":
                        # The connection may be wedged; start over with a fresh client.
                        admin.close()
                        admin = None
                # Poll interval that also wakes up immediately if the JVM dies.
                self.wait_exit(min(0.2, deadline - time.monotonic()))
        finally:
            if admin is not None:
                admin.close()

    def _check_ready(self, admin: Any) -> tuple[str, str]:
        """Return ``(state, detail)`` with state one of "ready", "waiting", "error"."""
        _, kafka_error, _ = _kafka_api()

        try:
            info = admin.describe_cluster()
        except (kafka_error, OSError) as exc:
            return "error", f"describe_cluster failed: {exc!r}"
        if info.get("cluster_id") != self.cluster_id:
            # Someone else's broker on our port; our JVM will then fail to bind and exit.
            found = info.get("cluster_id")
            return (
                "waiting",
                f"unexpected cluster id {found!r} on {self.bootstrap_servers}",
            )
        for b in info.get("brokers", []):
            if b.get("broker_id") == self._node_id():
                if b.get("is_fenced"):
                    return "waiting", "broker registered but still fenced"
                return "ready", "ready"
        return "waiting", "broker not registered yet"

    def _reap(self) -> None:
        """Forget a JVM that has exited (and stop tracking it for the atexit handler)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            with _LIVE_LOCK:
                _LIVE.pop(id(self), None)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        try:
            # start_new_session=True made the JVM a group leader: pgid == pid.
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker gracefully (SIGTERM), escalating to SIGKILL after *timeout* s.

        Idempotent; safe to call on a broker that was never started or already died.

        Raises:
            DevBrokerError: the process group survived even SIGKILL (should not happen).
        """
        proc = self._proc
        if proc is None:
            self._reap()
            return
        if proc.poll() is None:
            logger.info("stopping Kafka on %s (pid %d)", self.bootstrap_servers, proc.pid)
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "Kafka (pid %d) ignored SIGTERM for %.0f s; killing it",
                    proc.pid,
                    timeout,
                )
                self._kill_and_wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the broker's whole process group right away (simulates a crash). Idempotent.

        Raises:
            DevBrokerError: the process did not die within 30 s of SIGKILL.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            logger.info("killing Kafka on %s (pid %d)", self.bootstrap_servers, proc.pid)
            self._kill_and_wait()
        self._reap()

    def _kill_and_wait(self) -> None:
        assert self._proc is not None
        self._signal_group(signal.SIGKILL)
        try:
            self._proc.wait(timeout=30.0)
        except subprocess.TimeoutExpired as exc:
            raise DevBrokerError(f"Kafka (pid {self._proc.pid}) survived SIGKILL") from exc

    def restart(self, timeout: float = 90.0) -> None:
        """Stop gracefully and start again on the same ports and data dir.

        Args:
            timeout: seconds allowed for the new start (see :meth:`start`).
        """
        self.stop()
        self.start(timeout=timeout)

    def _remove_owned_workdir(self) -> None:
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        """Stop the broker and delete the workdir if this object created it. Idempotent."""
        self.stop()
        self._remove_owned_workdir()

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.bootstrap_servers} {state}>"


def _kafka_api() -> tuple[Any, type[Exception], Any]:
    """Return ``(KafkaAdminClient, KafkaError, KafkaNetClient)``, imported on first use.

    kafka-python 3.0.x triggers a DeprecationWarning (importlib.resources.read_text) on import
    on Python 3.11; under ``-W error`` (as in pytest's ``filterwarnings = error``) that would
    make ``start()`` fail for a reason that has nothing to do with the broker.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaError
        from kafka.net.compat import KafkaNetClient
    return KafkaAdminClient, KafkaError, KafkaNetClient


def _open_admin(bootstrap_servers: str, remaining: float) -> tuple[Any, str]:
    """Try to open a KafkaAdminClient; return ``(client or None, status text)``."""
    admin_cls, kafka_error, net_client_cls = _kafka_api()

    budget_ms = int(max(0.5, min(5.0, remaining)) * 1000)
    created: list[Any] = []

    def net_client(**configs: Any) -> Any:
        client = net_client_cls(**configs)
        created.append(client)
        return client

    try:
        admin = admin_cls(
            bootstrap_servers=bootstrap_servers,
            client_id="kvlog-devbroker",
            request_timeout_ms=budget_ms,
            bootstrap_timeout_ms=budget_ms,
            kafka_client=net_client,
        )
    except (kafka_error, OSError) as exc:
        # A failed constructor leaves its IO thread running; close what it created.
        for client in created:
            client.close()
        return None, f"admin client could not bootstrap: {exc!r}"
    return admin, "connected"
