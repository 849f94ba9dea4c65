"""A throwaway single-node Apache Kafka broker (KRaft mode) for tests, benchmarks and local dev.

kvlog needs a real Kafka broker to talk to. This module fetches the broker's jars from Maven
Central (with ``mvn``, cached under :func:`jar_cache_dir`), formats a KRaft storage directory and
runs ``kafka.Kafka`` as a combined broker+controller listening on 127.0.0.1 only. It is NOT meant
for production: one node, replication factor 1, plaintext, no authentication.

Requirements: ``java`` (17 or newer) and ``mvn`` on ``PATH``, plus access to Maven Central the
first time (Debian/Ubuntu: ``apt-get install maven openjdk-17-jre-headless``).

From the command line::

    python -m kvlog.devbroker                 # 127.0.0.1:9092, data in a temp dir, Ctrl-C to stop
    python -m kvlog.devbroker --port 9192 --dir ./kafka-dev-data
    python -m kvlog.devbroker --fetch-only    # just download the jars and print where they are

From Python (e.g. a pytest fixture)::

    with DevBroker() as broker:
        store = ...(bootstrap_servers=broker.bootstrap_servers)

Any broker still running when the Python process that started it exits is killed by an
``atexit`` handler, so an aborted test run does not leave stray JVMs behind.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "DEFAULT_LOG4J_VERSION",
    "DevBroker",
    "DevBrokerError",
    "fetch_jars",
    "jar_cache_dir",
    "main",
]

logger = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.2"
DEFAULT_LOG4J_VERSION = "2.24.3"

# Scala binary version of the kafka_2.xx artifact; Kafka 4.x only ships 2.13.
_SCALA_VERSION = "2.13"
_CACHE_ENV = "KVLOG_KAFKA_CACHE"
_MARKER_NAME = ".complete"
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
_NODE_ID = 1
_TAIL_LINES = 30
# Generous: the first fetch downloads ~43 MB, but a wedged mvn must not hang a test run forever.
_MVN_TIMEOUT_S = 30 * 60
_INSTALL_HINT = (
    "install it and make sure it is on PATH "
    "(Debian/Ubuntu: apt-get install maven openjdk-17-jre-headless; "
    "macOS: brew install maven openjdk@17)"
)
# Versions end up in a path and in the pom XML, so only allow what Maven versions look like.
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.\-_]*$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_POM_TEMPLATE = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>kvlog</groupId><artifactId>devbroker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


class DevBrokerError(RuntimeError):
    """The development broker could not be fetched, started or stopped.

    The message is meant for humans: it names the missing tool or includes the tail of the
    relevant log so the cause is visible without digging through files.
    """


# --------------------------------------------------------------------------------------------
# Fetching the jars
# --------------------------------------------------------------------------------------------


def jar_cache_dir() -> Path:
    """Return the directory that caches downloaded Kafka jars.

    ``$KVLOG_KAFKA_CACHE`` if set, else ``~/.cache/kvlog/kafka`` (deliberately outside any
    repository so 43 MB of jars never end up in a checkout).
    """
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvlog" / "kafka"


def _check_version(kind: str, version: str) -> None:
    if not _VERSION_RE.match(version):
        raise DevBrokerError(f"invalid {kind} version {version!r}")


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DevBrokerError(f"`{name}` not found: {_INSTALL_HINT}")
    return path


def _find_java() -> str:
    # Honour JAVA_HOME like the Kafka scripts and mvn do, so the same JDK runs both.
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return _require_tool("java")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *path* (created if needed) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock, also if we crash (the kernel closes it).
        os.close(fd)


def _tail_text(text: str, lines: int = _TAIL_LINES) -> str:
    # mvn colours its output even in batch mode; escape codes would garble error messages.
    text = _ANSI_RE.sub("", text)
    return "\n".join(text.rstrip().splitlines()[-lines:])


def fetch_jars(
    kafka_version: str = DEFAULT_KAFKA_VERSION,
    *,
    log4j_version: str = DEFAULT_LOG4J_VERSION,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Download the Kafka broker jars (once) and return the directory holding them.

    The jars land in ``<cache>/kafka_2.13-<kafka_version>-log4j-<log4j_version>/libs``. A call
    that finds a complete download returns immediately. Concurrent callers (also in other
    processes) serialise on a lock file in the cache dir, and a download only becomes visible
    through an atomic rename, so a crash mid-download never leaves a half-filled libs dir.

    Args:
        kafka_version: version of the ``org.apache.kafka:kafka_2.13`` artifact.
        log4j_version: version of the log4j2 backend used for the broker's logging.
        cache_dir: cache root; defaults to :func:`jar_cache_dir`.

    Raises:
        DevBrokerError: ``mvn`` or ``java`` is missing, or ``mvn`` failed (the message carries
            the tail of its output).
    """
    _check_version("Kafka", kafka_version)
    _check_version("log4j", log4j_version)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else jar_cache_dir()
    final = cache / f"kafka_{_SCALA_VERSION}-{kafka_version}-log4j-{log4j_version}"
    libs = final / "libs"
    if (final / _MARKER_NAME).is_file():
        return libs

    mvn = _require_tool("mvn")
    _find_java()  # mvn needs a JVM as well; fail with our hint rather than mvn's.
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / _LOCK_NAME):
        # Someone else may have finished the download while we waited for the lock.
        if (final / _MARKER_NAME).is_file():
            return libs
        # Holding the lock means no download is in progress, so leftovers are from crashes.
        for stale in cache.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)

        logger.info("fetching Kafka %s jars from Maven Central into %s", kafka_version, final)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=cache))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            (tmp / "pom.xml").write_text(
                _POM_TEMPLATE.format(scala=_SCALA_VERSION, kafka=kafka_version, log4j=log4j_version)
            )
            cmd = [
                mvn,
                "-q",
                "-B",
                "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp / 'libs'}",
                "-DincludeScope=runtime",
            ]
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    timeout=_MVN_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise DevBrokerError(
                    f"mvn did not finish within {_MVN_TIMEOUT_S} s while fetching Kafka {kafka_version}"
                ) from exc
            jars = sorted(p.name for p in (tmp / "libs").glob("*.jar"))
            if proc.returncode != 0 or f"kafka_{_SCALA_VERSION}-{kafka_version}.jar" not in jars:
                raise DevBrokerError(
                    f"mvn failed to fetch Kafka {kafka_version} (exit code {proc.returncode}); "
                    f"last lines of its output:\n{_tail_text(proc.stdout or '(no output)')}"
                )
            # The marker is written last and inside the temp dir: the rename below is the single
            # commit point, so `final` either does not exist or is complete.
            marker = tmp / _MARKER_NAME
            with open(marker, "w") as f:
                json.dump(
                    {
                        "kafka_version": kafka_version,
                        "log4j_version": log4j_version,
                        "jars": jars,
                    },
                    f,
                    indent=1,
                )
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("fetched %d jars into %s", len(jars), libs)
    return libs


# --------------------------------------------------------------------------------------------
# Running the broker
# --------------------------------------------------------------------------------------------

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


def _free_ports(count: int) -> list[int]:
    """Return *count* distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        # Keep all sockets bound until the end so the kernel cannot hand out the same port twice.
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_listening(port: int) -> bool:
    """True if something already listens on 127.0.0.1:*port*."""
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
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _new_cluster_id() -> str:
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


def _file_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode(errors="replace")
    except FileNotFoundError:
        return "(file does not exist)"
    return _tail_text(data, lines) or "(empty)"


class DevBroker:
    """A single-node KRaft Kafka broker on loopback, for tests/benchmarks/dev.

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
            free = iter(_free_ports(2))
            port = port if port is not None else next(free)
            controller_port = controller_port if controller_port is not None else next(free)
        if port == controller_port:
            raise ValueError("port and controller_port must differ")
        self.port: int = port
        self.controller_port: int = controller_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        # A reused workdir is already formatted with some cluster id; keep reporting that one.
        self.cluster_id: str = self._existing_cluster_id() or _new_cluster_id()

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

    def _server_properties(self) -> dict[str, str]:
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

    # The three helpers below read the configuration rather than assume the single-node
    # layout, so a subclass that changes the roles or listeners (a node of a multi-node test
    # cluster) only overrides _server_properties.

    def _node_id(self) -> int:
        return int(self._server_properties()["node.id"])

    def _listen_ports(self) -> list[int]:
        """The loopback ports named in ``listeners`` (checked to be free before a start)."""
        listeners = self._server_properties()["listeners"]
        return [int(entry.rsplit(":", 1)[1]) for entry in listeners.split(",") if entry.strip()]

    def _format_options(self) -> list[str]:
        # A static quorum (controller.quorum.voters) is named in the config; only a dynamic
        # quorum needs the first controller to be formatted as its own single voter.
        if "controller.quorum.voters" in self._server_properties():
            return []
        return ["--standalone"]

    def _log_dirs(self) -> list[Path]:
        value = self._server_properties()["log.dirs"]
        return [Path(d.strip()) for d in value.split(",") if d.strip()]

    def _existing_cluster_id(self) -> str | None:
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
        lines = [f"{_prop_escape(k)}={_prop_escape(v)}" for k, v in self._server_properties().items()]
        props_path.write_text(
            "# written by kvlog.devbroker; edits are overwritten\n" + "\n".join(lines) + "\n"
        )
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

    def _failure_details(self, extra_output: str | None = None) -> str:
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

    def start(self, timeout: float = 90.0) -> Self:
        """Start the broker and wait until it serves requests; no-op if already running.

        Fetches the jars if needed (not counted in *timeout*), formats the storage on first
        use only (so a restart keeps the data), launches the JVM in its own process group and
        polls until an admin client sees this broker registered and unfenced.

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
            if _port_is_listening(p):
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
            self._wait_ready(deadline, timeout)
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
            raise DevBrokerError(f"formatting Kafka storage timed out\n{self._failure_details()}") from exc
        if proc.returncode != 0:
            raise DevBrokerError(
                f"formatting Kafka storage failed (exit code {proc.returncode})\n"
                f"{self._failure_details(proc.stdout)}"
            )
        # If a log dir was already formatted, the tool kept its id; report the id actually used.
        self.cluster_id = self._existing_cluster_id() or self.cluster_id

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        assert self._proc is not None
        admin: Any = None
        last_error = "no connection yet"
        try:
            while True:
                if self._proc.poll() is not None:
                    raise DevBrokerError(
                        f"Kafka exited during startup with code {self._proc.returncode}\n"
                        f"{self._failure_details()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DevBrokerError(
                        f"Kafka was not ready within {timeout:.0f} s ({last_error})\n"
                        f"{self._failure_details()}"
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
                try:
                    # Poll interval that also wakes up immediately if the JVM dies.
                    self._proc.wait(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m kvlog.devbroker``: start a broker and keep it up until Ctrl-C/SIGTERM.

    Returns:
        The process exit code: 0 on success, 1 if the broker could not be fetched or started
        (or died while running).
    """
    parser = argparse.ArgumentParser(
        prog="python -m kvlog.devbroker",
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
        print(f"kvlog.devbroker: error: {summary}", file=sys.stderr, flush=True)
        if details:
            print(details, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("kvlog.devbroker: interrupted", file=sys.stderr, flush=True)
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
                raise DevBrokerError(f"Kafka exited unexpectedly\n{broker._failure_details()}")
        print("stopping Kafka ...", file=sys.stderr, flush=True)
        return 0
    finally:
        ready = True  # a second Ctrl-C must not interrupt the graceful stop below
        broker.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
