"""A real single-node Apache Kafka broker for development and tests, no Docker needed.

The broker's jars come from Maven Central through `mvn` (resolved once into
<cache_dir>/kafka/<version>/libs); the broker runs as a detached `java` process
in KRaft combined mode (broker + controller in one process) with its state in
<data_dir>/kafka/. A pid file there lets any later process (`streamscore infra
down`, a test session's teardown) find and stop it.

When settings.kafka_bootstrap_servers points at an external cluster nothing
here is used: the broker refuses to start so a misconfiguration is loud.

Secure mode (`streamscore infra up --secure`, docs/connectivity.md): the broker also
listens with SASL_SSL on port+2, SCRAM-SHA-512 user `streamscore`, a TLS
certificate signed by a CA made here with openssl (<data_dir>/kafka/tls/, 0600,
git-ignored with the data dir), and <data_dir>/kafka/client.properties holds what a
client needs to connect through it. Once secured, later starts keep the listener.
"""
from __future__ import annotations

import base64
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamscore.settings import Settings

# Tried in this order after settings.kafka_version when that one does not
# resolve (e.g. not released yet, or removed from the mirror in use).
FALLBACK_KAFKA_VERSIONS = ("4.3.1", "4.2.0", "4.1.1")

# Kafka's own dependencies pull slf4j 1.7, which cannot bind to log4j2's slf4j2
# provider; declaring these directly makes Maven's nearest-wins pick them.
LOG4J_VERSION = "2.25.5"
SLF4J_VERSION = "2.0.17"

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LOG_CLEANER_BYTES_PER_S = 8 * 1024 * 1024  # log.cleaner.io.max.bytes.per.second (_server_properties)
INSTALLED_MARKER = "INSTALLED"  # inside <cache_dir>/kafka/<version>/, holds the version
FALLBACK_MARKER = "RESOLVED_AS"  # inside the requested version's dir, names the version used


class KafkaBrokerError(RuntimeError):
    """The local broker could not be installed, started or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    version: str | None  # installed Kafka version, None when not installed


SCRAM_USER = "streamscore"
SCRAM_MECHANISM = "SCRAM-SHA-512"


class LocalKafkaBroker:
    def __init__(self, settings: Settings, secure: bool = False):
        self.settings = settings
        self.port = settings.kafka_port
        self.controller_port = settings.kafka_port + 1
        self.secure_port = settings.kafka_port + 2
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.secure_bootstrap = f"127.0.0.1:{self.secure_port}"
        self.home = (settings.data_dir / "kafka").resolve()
        self.cache = (settings.cache_dir / "kafka").resolve()
        self.secure = secure or (self.tls_dir / "SECURE").is_file()  # once secured, it stays so
        self._process: subprocess.Popen | None = None  # set only when this process started the broker

    # --- paths --------------------------------------------------------------
    @property
    def server_properties(self) -> Path:
        return self.home / "server.properties"

    @property
    def log4j_properties(self) -> Path:
        return self.home / "log4j2.properties"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def console_log(self) -> Path:
        return self.log_dir / "console.out"

    def libs_dir(self, version: str) -> Path:
        return self.cache / version / "libs"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def client_properties_file(self) -> Path:
        """What a client needs to connect through the SASL_SSL listener (STREAMSCORE_KAFKA_CLIENT_PROPERTIES)."""
        return self.home / "client.properties"

    def start_state(self) -> str:
        """What start() is about to do, for humans: already running, restarted (data kept) or started."""
        if self._running_pid() is not None:
            return "already running"
        if (self.data_dir / "meta.properties").is_file():
            return "restarted (it was not running; its topics and data are kept)"
        return "started"

    # --- install ------------------------------------------------------------
    def installed_version(self) -> str | None:
        """The Kafka version whose jars are ready for settings.kafka_version, or None."""
        requested = self.settings.kafka_version
        if (self.cache / requested / INSTALLED_MARKER).is_file():
            return requested
        fallback_marker = self.cache / requested / FALLBACK_MARKER
        if fallback_marker.is_file():
            used = fallback_marker.read_text().strip()
            if (self.cache / used / INSTALLED_MARKER).is_file():
                return used
        return None

    def install(self) -> str:
        """Resolve the broker's jars once; returns the Kafka version installed (maybe an older fallback)."""
        version = self.installed_version()
        if version:
            return version
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaBrokerError(
                "Maven (`mvn`) is not on PATH; it is needed once to download the Kafka broker jars. "
                "Install Maven, or point KAFKA_BOOTSTRAP_SERVERS at an existing Kafka cluster."
            )
        requested = self.settings.kafka_version
        candidates = [requested] + [v for v in FALLBACK_KAFKA_VERSIONS if _version_key(v) < _version_key(requested)]
        failures: list[str] = []
        for version in candidates:
            try:
                self._resolve(mvn, version)
            except KafkaBrokerError as error:
                failures.append(f"{version}: {error}")
                continue
            if version != requested:
                marker_dir = self.cache / requested
                marker_dir.mkdir(parents=True, exist_ok=True)
                (marker_dir / FALLBACK_MARKER).write_text(version + "\n")
            return version
        raise KafkaBrokerError(
            "could not resolve the Kafka broker jars with Maven for any of "
            f"{', '.join(candidates)} (STREAMSCORE_KAFKA_VERSION={requested}):\n" + "\n".join(failures)
        )

    def _resolve(self, mvn: str, version: str) -> None:
        version_dir = self.cache / version
        version_dir.mkdir(parents=True, exist_ok=True)
        # Two processes installing at once (parallel test runs) would race on the rename.
        with _file_lock(version_dir / ".install.lock"):
            if (version_dir / INSTALLED_MARKER).is_file():
                return
            (version_dir / "pom.xml").write_text(_pom_xml(version))
            staging = version_dir / f"libs.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            result = subprocess.run(
                [mvn, "-q", "-B", "-f", str(version_dir / "pom.xml"), "dependency:copy-dependencies",
                 f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
                capture_output=True, text=True, cwd=version_dir,
            )
            if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
                shutil.rmtree(staging, ignore_errors=True)
                output = (result.stdout + result.stderr).strip().splitlines()
                raise KafkaBrokerError("mvn failed: " + " | ".join(output[-5:]))
            libs = version_dir / "libs"
            shutil.rmtree(libs, ignore_errors=True)
            os.rename(staging, libs)
            (version_dir / INSTALLED_MARKER).write_text(version + "\n")

    # --- start / stop -------------------------------------------------------
    def start(self, die_with_parent: bool = False) -> None:
        """Start the broker for this data dir unless it already runs; returns once it answers metadata requests.

        die_with_parent (Linux): the broker gets SIGTERM when this process dies, so a
        killed test session leaves no broker behind. `infra up` wants the opposite.
        """
        if not self.settings.uses_local_broker:
            raise KafkaBrokerError(
                f"KAFKA_BOOTSTRAP_SERVERS={self.settings.kafka_bootstrap_servers} is set: "
                "use that cluster instead of starting a local broker."
            )
        pid = self._running_pid()
        if pid is not None:
            if self.secure and f"SASL_SSL://127.0.0.1:{self.secure_port}" not in self.server_properties.read_text():
                raise KafkaBrokerError(
                    f"the local broker (pid {pid}) runs without the SASL_SSL listener: stop it with "
                    "`streamscore infra down`, then `streamscore infra up --secure`")
            self._wait_until_ready(pid, timeout_s=READY_TIMEOUT_S)
            if self.secure:
                self._ensure_scram_user()
            return
        self.pid_file.unlink(missing_ok=True)
        for port in (self.port, self.controller_port, *((self.secure_port,) if self.secure else ())):
            if not _port_is_free(port):
                raise KafkaBrokerError(
                    f"port {port} on 127.0.0.1 is already in use by another program, so the local Kafka broker "
                    f"cannot listen on {self.port} (clients) and {self.controller_port} (controller). "
                    "Stop that program or choose another port with STREAMSCORE_KAFKA_PORT."
                )
        version = self.install()
        libs = self.libs_dir(version)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self._ensure_certificates()
        self.server_properties.write_text(self._server_properties())
        self.server_properties.chmod(0o600)  # holds the keystore password in secure mode
        self.log4j_properties.write_text(_LOG4J2_PROPERTIES)
        self._format_storage(libs)
        java = _java()
        with open(self.console_log, "ab") as console:
            self._process = subprocess.Popen(
                [java, *JVM_HEAP_FLAGS, *JVM_PERFORMANCE_FLAGS, *self._jvm_logging_flags(),
                 "-cp", f"{libs}/*", "kafka.Kafka", str(self.server_properties)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                cwd=self.home, start_new_session=True,  # own process group: survives our exit, stoppable as a group
                preexec_fn=_terminate_when_parent_dies if die_with_parent else None,
            )
        self.pid_file.write_text(f"{self._process.pid}\n")
        self._wait_until_ready(self._process.pid, timeout_s=READY_TIMEOUT_S)
        if self.secure:
            self._ensure_scram_user()

    def kill(self) -> int | None:
        """kill -9 of the broker JVM (fault drills); returns its pid, None when none was running."""
        pid = self._running_pid()
        if pid is None:
            return None
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self._is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid

    # --- secure listener -----------------------------------------------------------
    def _secret(self, name: str) -> str:
        """A random secret kept in tls_dir/<name> (made once, 0600)."""
        path = self.tls_dir / name
        if not path.is_file():
            path.write_text(secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
        return path.read_text().strip()

    def _ensure_certificates(self) -> None:
        """A CA and the broker's certificate (SAN 127.0.0.1 and localhost) in a PKCS12 keystore, made once."""
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        self.tls_dir.chmod(0o700)
        keystore = self.tls_dir / "broker.p12"
        if not keystore.is_file():
            make_certificate_authority(self.tls_dir)
            _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
                     "-subj", "/CN=localhost", cwd=self.tls_dir)
            (self.tls_dir / "broker.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                     "extendedKeyUsage=serverAuth\n")
            _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                     "-out", "broker.pem", "-days", "3650", "-sha256", "-extfile", "broker.ext", cwd=self.tls_dir)
            _openssl("pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-certfile", "ca.pem",
                     "-name", "broker", "-out", "broker.p12", "-passout", f"pass:{self._secret('keystore.password')}",
                     cwd=self.tls_dir)
            for path in self.tls_dir.iterdir():
                path.chmod(0o600)
        (self.tls_dir / "SECURE").write_text("the local broker has a SASL_SSL listener (infra up --secure)\n")

    def _ensure_scram_user(self) -> None:
        """Create (or reset) the SCRAM user, through the plain listener, and write client.properties."""
        from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

        from streamscore.kafka.io import admin_result

        password = self._secret("scram.password")
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        upsert = UserScramCredentialUpsertion(SCRAM_USER, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                              password.encode())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                for future in admin.alter_user_scram_credentials([upsert], request_timeout=10).values():
                    admin_result(future)
                break
            except Exception as error:  # noqa: BLE001 - the controller may still be electing itself
                if time.monotonic() > deadline:
                    raise KafkaBrokerError(f"could not create the SCRAM user {SCRAM_USER}: {error}") from error
                time.sleep(0.5)
        self.client_properties_file.write_text(
            "# Written by `streamscore infra up --secure`: the local broker's SASL_SSL listener.\n"
            "# Use it with STREAMSCORE_KAFKA_CLIENT_PROPERTIES=<this file> (docs/connectivity.md).\n"
            f"bootstrap.servers={self.secure_bootstrap}\n"
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanisms={SCRAM_MECHANISM}\n"
            f"sasl.username={SCRAM_USER}\n"
            f"sasl.password={password}\n"
            f"ssl.ca.location={self.ca_file}\n")
        self.client_properties_file.chmod(0o600)

    def stop(self) -> bool:
        """Stop the broker of this data dir; returns False when none was running. Leaves no process behind."""
        pid = self._running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)  # controlled shutdown: flushes logs, faster next start
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._is_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self._is_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        self._process = None
        return True

    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        running = pid is not None and _port_accepts(self.port)
        return BrokerStatus(running=running, pid=pid, bootstrap=self.bootstrap, version=self.installed_version())

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for path in (self.console_log, self.log_dir / "server.log"):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                chunks.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(chunks) or "(no broker log written)"

    # --- internals ----------------------------------------------------------
    def _server_properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "offsets.topic.replication.factor": "1",
            # The first consumer group creates __consumer_offsets; 50 partitions (the default) cost seconds.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A single consumer joining should not wait 3 s for others that never come.
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # Topics are created explicitly (shared/topics.py) with their partition counts and configs.
            "auto.create.topics.enable": "false",
            # The log cleaner compacts scorer-state when a segment rolls, all partitions at once (they fill
            # alike): unthrottled it took 0.25-0.38 of a core for 40 s (and ZGC as much again) beside the
            # pipeline on this 2-core machine. At 8 MiB/s it still keeps up with the changelog (~1.2 MB/s in
            # the soak at 2,500 events/s) and spreads the same work thin.
            "log.cleaner.io.max.bytes.per.second": str(LOG_CLEANER_BYTES_PER_S),
        }
        if self.secure:
            tls = self.tls_dir
            props["listeners"] += f",SASL_SSL://127.0.0.1:{self.secure_port}"
            props["advertised.listeners"] += f",SASL_SSL://127.0.0.1:{self.secure_port}"
            props["listener.security.protocol.map"] += ",SASL_SSL:SASL_SSL"
            props.update({
                "sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "listener.name.sasl_ssl.sasl.enabled.mechanisms": SCRAM_MECHANISM,
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "listener.name.sasl_ssl.ssl.keystore.type": "PKCS12",
                "listener.name.sasl_ssl.ssl.keystore.location": str(tls / "broker.p12"),
                "listener.name.sasl_ssl.ssl.keystore.password": self._secret("keystore.password"),
            })
        header = "# Written by streamscore (shared/kafka_broker.py) on every start; edits are overwritten.\n"
        return header + "".join(f"{key}={value}\n" for key, value in props.items())

    def _jvm_logging_flags(self) -> list[str]:
        return [f"-Dkafka.logs.dir={self.log_dir}", f"-Dlog4j2.configurationFile={self.log4j_properties}"]

    def _format_storage(self, libs: Path) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return
        cluster_id = _random_kafka_uuid()
        result = subprocess.run(
            [_java(), *self._jvm_logging_flags(), "-cp", f"{libs}/*", "kafka.tools.StorageTool",
             "format", "--standalone", "-t", cluster_id, "-c", str(self.server_properties)],
            capture_output=True, text=True, cwd=self.home,
        )
        if result.returncode != 0:
            raise KafkaBrokerError(
                f"formatting the broker storage in {self.data_dir} failed:\n{(result.stdout + result.stderr).strip()}"
            )

    def _wait_until_ready(self, pid: int, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        # A TCP probe first: the admin client would log a connection-refused line per retry.
        while not _port_accepts(self.port):
            self._raise_if_dead(pid)
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"the Kafka broker (pid {pid}) did not open port {self.port} within {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            self._raise_if_dead(pid)
            try:
                if admin.list_topics(timeout=2).brokers:
                    return
            except Exception:  # KafkaException while the broker finishes starting
                pass
            if time.monotonic() > deadline:
                raise KafkaBrokerError(f"the Kafka broker (pid {pid}) did not answer within {timeout_s:.0f} s\n{self.log_tail()}")
            time.sleep(0.2)

    def _raise_if_dead(self, pid: int) -> None:
        if not self._is_alive(pid):
            self.pid_file.unlink(missing_ok=True)
            raise KafkaBrokerError(f"the Kafka broker process (pid {pid}) exited during startup:\n{self.log_tail()}")

    def _running_pid(self) -> int | None:
        """The pid from the pid file if that process is alive and is this data dir's broker (pids get reused)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not self._is_alive(pid):
            return None
        cmdline = _cmdline(pid)
        if cmdline is not None and str(self.server_properties) not in cmdline:
            return None
        return pid

    def _is_alive(self, pid: int) -> bool:
        if self._process is not None and self._process.pid == pid:
            return self._process.poll() is None  # also reaps our own child
        return _pid_alive(pid)


# --- helpers ----------------------------------------------------------------
def _pom_xml(version: str) -> str:
    deps = [
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.kafka", "kafka-server", version),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
        ("org.slf4j", "slf4j-api", SLF4J_VERSION),
    ]
    dep_xml = "".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>\n"
        for g, a, v in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>streamscore.local</groupId>\n"
        f"  <artifactId>kafka-broker-libs</artifactId>\n  <version>{version}</version>\n"
        "  <packaging>pom</packaging>\n"
        f"  <dependencies>\n{dep_xml}  </dependencies>\n"
        "</project>\n"
    )


_LOG4J2_PROPERTIES = """\
# Broker log: <data_dir>/kafka/logs/server.log (kafka.logs.dir is set on the java command line).
status = warn
name = streamscore-kafka
# Kafka stops log4j itself; log4j's own JVM hook only prints a warning at SIGTERM.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Per-request and per-client chatter that buries the interesting lines.
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.coordinator.name = org.apache.kafka.coordinator
logger.coordinator.level = WARN
"""


# The broker is in the latency path twice (event in, prediction out), so its collector's pauses are the
# pipeline's. Kafka's start script passes G1 with a 20 ms pause goal; on this 2-core machine at 5k events/s
# G1 (256-512 MB) kept its live set near its IHOP and ran back-to-back marking cycles with young pauses of
# 7-113 ms (gc log). ZGC collects concurrently (pauses < 1 ms), here in a fixed 1 GB heap. Eight quick bench
# runs at 5k/s, G1 and ZGC interleaved: e2e p99 G1 47 / 104 / 118 / 359 ms, ZGC 52 / 57 / 120 / 101 ms;
# p50 G1 13.7 / 15.0 / 22.8 / 43.1, ZGC 16.5 / 17.0 / 20.5 / 13.9 ms.
# (-XX:+AlwaysPreTouch would add 2 s to every start to save page faults in the broker's first minute.)
JVM_HEAP_FLAGS = ("-Xms1g", "-Xmx1g")
JVM_PERFORMANCE_FLAGS = ("-server", "-XX:+UseZGC", "-Djava.awt.headless=true")


def make_certificate_authority(directory: Path, name: str = "streamscore local CA") -> Path:
    """A self-signed CA (ca.key, ca.pem) in `directory`; returns the path of ca.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "3650", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return directory / "ca.pem"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise KafkaBrokerError("`openssl` is not on PATH; `infra up --secure` needs it once to make the local "
                               "broker's TLS certificates")
    result = subprocess.run([openssl, *args], capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise KafkaBrokerError(f"openssl {args[0]} failed: {(result.stdout + result.stderr).strip()}")


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError("`java` (17 or newer) is not on PATH; the local Kafka broker needs it. "
                               "Install a JDK, or point KAFKA_BOOTSTRAP_SERVERS at an existing Kafka cluster.")
    return java


def _random_kafka_uuid() -> str:
    # Same format as `kafka-storage random-uuid` (base64url of 16 random bytes, no
    # padding, never starting with '-'), without paying a JVM start for it.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; os.kill still succeeds on it
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None  # no /proc (macOS): trust the pid file


def _terminate_when_parent_dies() -> None:
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the session teardown's stop() is the only cleanup


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the broker leads its own group (start_new_session)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


@contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
