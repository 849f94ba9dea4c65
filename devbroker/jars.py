"""Fetching the Kafka broker's jars from Maven Central (with ``mvn``), and finding ``java``."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DevBrokerError, _tail_text

logger = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.2"
"""The Apache Kafka version :class:`~devbroker.DevBroker` and :func:`fetch_jars` use by default."""

DEFAULT_LOG4J_VERSION = "2.24.3"
"""The log4j2 version that backs the broker's logging."""

# Scala binary version of the kafka_2.xx artifact; Kafka 4.x only ships 2.13.
_SCALA_VERSION = "2.13"
_CACHE_ENV = "KVLOG_KAFKA_CACHE"
_MARKER_NAME = ".complete"
_LOCK_NAME = ".lock"
_TMP_PREFIX = ".tmp-"
# Generous: the first fetch downloads ~43 MB, but a wedged mvn must not hang a test run forever.
_MVN_TIMEOUT_S = 30 * 60
_INSTALL_HINT = (
    "install it and make sure it is on PATH "
    "(Debian/Ubuntu: apt-get install maven openjdk-17-jre-headless; "
    "macOS: brew install maven openjdk@17)"
)
# Versions end up in a path and in the pom XML, so only allow what Maven versions look like.
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.\-_]*$")

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
    """Raise :class:`DevBrokerError` unless *version* looks like a Maven version."""
    if not _VERSION_RE.match(version):
        raise DevBrokerError(f"invalid {kind} version {version!r}")


def _require_tool(name: str) -> str:
    """The path of the executable *name* on ``PATH``, or a :class:`DevBrokerError` with a hint."""
    path = shutil.which(name)
    if path is None:
        raise DevBrokerError(f"`{name}` not found: {_INSTALL_HINT}")
    return path


def _find_java() -> str:
    """The ``java`` to run the broker with: ``$JAVA_HOME/bin/java``, else the one on ``PATH``."""
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
