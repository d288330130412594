"""A real single-node Apache Kafka (KRaft) on 127.0.0.1, from Maven Central's artifacts.

`fetch_runtime` resolves ``org.apache.kafka:kafka_2.13`` and a log4j binding with the
machine's Maven into the cache directory; `LocalBroker` formats KRaft storage, starts one
combined broker+controller on free loopback ports, waits until it serves metadata, and
records its PID and port so that it can be stopped by PID.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import SluiceError
from pipeline.ops.broker.secure import Security

if TYPE_CHECKING:
    from pipeline.config import Settings

KAFKA_VERSION = "3.9.1"
_POM = Path(__file__).with_name("pom.xml")
_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.storage=WARN
"""


class BrokerError(SluiceError, RuntimeError):
    """The local broker could not be fetched, started or stopped."""


def runtime_dir(cache_dir: Path) -> Path:
    """The jar folder for this Kafka version; keyed on the pom so a change refetches."""
    digest = hashlib.sha256(_POM.read_bytes()).hexdigest()[:10]
    return cache_dir / f"kafka-{KAFKA_VERSION}-{digest}"


def fetch_runtime(cache_dir: Path, quiet: bool = True) -> Path:
    """Resolve the broker's jars with Maven into the cache (once) and return their folder."""
    target = runtime_dir(cache_dir)
    libs = target / "libs"
    if (target / ".complete").exists():
        return libs
    mvn = shutil.which("mvn")
    java = shutil.which("java")
    if not mvn or not java:
        raise BrokerError("fetching Kafka needs `mvn` and `java` on PATH")
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        *(["-q"] if quiet else []),
        "-f",
        str(_POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging / 'libs'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"mvn failed ({result.returncode}):\n{result.stdout[-4000:]}")
    (staging / "log4j.properties").write_text(_LOG4J)
    (staging / ".complete").write_text(KAFKA_VERSION)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class BrokerState:
    pid: int
    port: int
    controller_port: int
    log_path: str
    data_dir: str
    secure: bool = False
    internal_port: int = 0  # secured: the BROKER listener (SSL, client certificates)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalBroker:
    """One KRaft broker+controller whose files live under ``state_dir``; ``secure``: SASL_SSL
    with SCRAM users and ACLs (`pipeline.ops.broker.secure`)."""

    def __init__(
        self,
        state_dir: Path,
        cache_dir: Path,
        heap_mb: int = 1024,
        secure: bool = False,
        node_id: int = 1,
        replicas: int = 1,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.cache_dir = Path(cache_dir)
        self.heap_mb = heap_mb
        self.secure = secure
        self.node_id = node_id  # in a cluster (`LocalCluster`): its node and the topics'
        self.replicas = replicas  # replication (internal topics, and the default)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def security(self) -> Security:
        """The secured broker's CA, certificates and users (made on first use)."""
        return Security.load_or_create(self.state_dir)

    def admin_config(self, state: BrokerState) -> dict[str, Any]:
        """librdkafka settings for a super user of this broker."""
        config: dict[str, Any] = {"bootstrap.servers": state.bootstrap, "log_level": 0}
        if state.secure:
            config.update(self.security.client_config(self.security.admin))
        return config

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "broker.log"

    def state(self) -> BrokerState | None:
        """The recorded broker, or None when none is recorded or its process is gone."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return state if _alive(state.pid) else None

    def start(self, port: int | None = None, timeout_s: float = 90.0) -> BrokerState:
        """Start the broker unless one is already recorded and alive; wait until it serves."""
        running = self.state()
        if running is not None:
            return running
        state = self.launch(port)
        try:
            self._wait_ready(state, timeout_s)
        except BaseException:
            self.stop()
            raise
        return state

    def launch(
        self,
        port: int | None = None,
        controller_port: int | None = None,
        voters: str | None = None,
        cluster_id: str | None = None,
    ) -> BrokerState:
        """Format the storage (once) and start the process, without waiting for it to serve.
        ``voters``: the controller quorum (``id@host:port,...``), this node alone by default."""
        libs = fetch_runtime(self.cache_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        controller_port = controller_port or free_port()
        voters = voters or f"{self.node_id}@127.0.0.1:{controller_port}"
        data_dir = self.state_dir / "data"
        config = self.state_dir / "server.properties"
        internal_port = free_port() if self.secure else 0
        if self.secure:
            listeners = self.security.listeners(port, internal_port, controller_port)
        else:
            listeners = _PLAINTEXT_LISTENERS.format(port=port, controller_port=controller_port)
        config.write_text(
            listeners + _server_properties(self.node_id, voters, data_dir, self.replicas)
        )
        java = shutil.which("java") or "java"
        classpath = f"{libs}/*"
        log4j = f"-Dlog4j.configuration=file:{libs.parent / 'log4j.properties'}"
        if not (data_dir / "meta.properties").exists():
            shutil.rmtree(data_dir, ignore_errors=True)
            cluster_id = cluster_id or new_cluster_id()
            fmt = subprocess.run(
                [
                    java,
                    "-cp",
                    classpath,
                    log4j,
                    "kafka.tools.StorageTool",
                    "format",
                    # "=" form: a base64 id may start with "-".
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(config),
                    *(self.security.scram_arguments() if self.secure else []),
                ],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        cmd = [
            java,
            # The whole heap up front, and ZGC: with G1 and 512 MB, young collections paused
            # the broker for 30-100 ms on 2 busy cores, which was the pipeline's p99 at
            # 25k req/s; ZGC's pauses are under a millisecond (benchmarks/README.md).
            f"-Xmx{self.heap_mb}m",
            f"-Xms{self.heap_mb}m",
            "-XX:+UseZGC",
            "-Djava.awt.headless=true",
            log4j,
            "-cp",
            classpath,
            "kafka.Kafka",
            str(config),
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        state = BrokerState(
            pid=self._proc.pid,
            port=port,
            controller_port=controller_port,
            log_path=str(self.log_path),
            data_dir=str(data_dir),
            secure=self.secure,
            internal_port=internal_port,
        )
        self.state_file.write_text(json.dumps(state.__dict__))
        return state

    def kill(self) -> None:
        """SIGKILL the recorded process (a crash, for the fault scenarios)."""
        state = self.state()
        if state is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
            while _alive(state.pid):
                self._reap()
                time.sleep(0.05)
            self._reap(block=True)

    def provision(self, settings: Settings, models: list[str]) -> Path:
        """On the secured broker, as the admin: create the pipeline's topics for ``models``
        and grant the worker's principal its ACLs; returns the env file (mode 0600) that
        connects a worker as that principal."""
        from confluent_kafka.admin import AdminClient

        from pipeline.kafka import ensure_topics, pipeline_topics
        from pipeline.ops.broker.secure import grant, worker_acls

        state = self.state()
        if state is None or not state.secure:
            raise BrokerError("provision needs the secured broker running")
        sec = self.security
        admin_settings = settings.replace(
            bootstrap=state.bootstrap, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
            sasl_username=sec.admin.username, sasl_password=sec.admin.password,
            ssl_cafile=str(sec.ca_file),
        )  # fmt: skip
        ensure_topics(admin_settings, pipeline_topics(admin_settings, models))
        grant(AdminClient(self.admin_config(state)), worker_acls(settings.topic_prefix))
        env = {"SLUICE_BOOTSTRAP": state.bootstrap, **sec.settings_env(sec.worker)}
        path = self.state_dir / "worker.env"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in env.items())
        return path

    def _wait_ready(self, state: BrokerState, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(state.pid):
                raise BrokerError(f"broker exited during start; log:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", state.port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.2)
                continue
            config = self.admin_config(state)
            admin = AdminClient(config)
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    _warm_up(config, admin, max(1.0, deadline - time.monotonic()))
                    return
            except Exception:  # noqa: BLE001 - not ready yet, retried until the deadline
                pass
            time.sleep(0.2)
        raise BrokerError(f"broker not ready after {timeout_s}s; log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the recorded broker by PID (SIGTERM, then SIGKILL); True if one was running."""
        try:
            pid = int(json.loads(self.state_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return False
        stopped = False
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped = True
        self._reap(block=True)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def _reap(self, block: bool = False) -> None:
        if self._proc is not None:
            if block:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10)
            else:
                self._proc.poll()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"


WARM_UP_TOPIC = "sluice-broker-warm-up"


def _retrying(step: Any, deadline: float, done_anyway: tuple[int, ...] = ()) -> None:
    """Run ``step`` until it returns, a Kafka error it raises is neither retriable nor one of a
    cluster still joining, or the monotonic ``deadline`` passes. A cluster whose nodes are
    still joining drops connections and moves its coordinators meanwhile; librdkafka does
    not mark a coordinator error on `Consumer.committed` retriable, so those are named too.
    An error in ``done_anyway`` counts as done (the thing was already there, or gone)."""
    from confluent_kafka import KafkaError, KafkaException

    joining = (
        KafkaError._DESTROY_BROKER,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    )
    while True:
        try:
            step()
            return
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() in done_anyway:
                return
            again = error.retriable() or error.code() in joining
            if time.monotonic() > deadline or not again:
                raise
            time.sleep(0.5)


def _warm_up(config: dict[str, Any], admin: Any, timeout_s: float) -> None:
    """Have a fresh broker load its group coordinator and hand out a producer id once, with
    clients of its own that log nothing. Until then it answers both with
    COORDINATOR_LOAD_IN_PROGRESS, which the first worker's or client's librdkafka would print
    as a warning while it retries. Each step is tried again (`_retrying`) until the deadline."""
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
    from confluent_kafka.admin import NewTopic

    quiet = {**config, "log_level": 0}
    deadline = time.monotonic() + timeout_s

    def create() -> None:
        topics = [NewTopic(WARM_UP_TOPIC, 1, 1)]
        for future in admin.create_topics(topics, operation_timeout=timeout_s).values():
            future.result()

    # Already there: left by a warm-up that was cut short.
    _retrying(create, deadline, (KafkaError.TOPIC_ALREADY_EXISTS,))
    producer = Producer({**quiet, "enable.idempotence": True})
    producer.produce(WARM_UP_TOPIC, b"")
    if producer.flush(timeout_s):
        raise BrokerError("the warm-up record was not delivered")
    consumer = Consumer({**quiet, "group.id": WARM_UP_TOPIC})
    try:
        warm_up = [TopicPartition(WARM_UP_TOPIC, 0)]
        _retrying(lambda: consumer.committed(warm_up, timeout=timeout_s), deadline)
    finally:
        consumer.close()

    def delete() -> None:
        for future in admin.delete_topics([WARM_UP_TOPIC], operation_timeout=timeout_s).values():
            future.result()

    _retrying(delete, deadline, (KafkaError.UNKNOWN_TOPIC_OR_PART,))


_PLAINTEXT_LISTENERS = """\
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"""


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _server_properties(node_id: int, voters: str, data_dir: Path, replicas: int) -> str:
    # With three replicas or more, a write needs two of them (what Kafka's documentation
    # advises for durability): one broker may fail without losing an acknowledged record.
    min_isr = 2 if replicas >= 3 else 1
    return f"""\
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
default.replication.factor={replicas}
min.insync.replicas={min_isr}
log.dirs={data_dir}
num.partitions=1
# A topic exists because sluice or its operator created it, never because a client named it.
auto.create.topics.enable=false
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=1
group.initial.rebalance.delay.ms=0
message.max.bytes=8388608
log.retention.hours=24
log.segment.bytes=104857600
num.network.threads=2
num.io.threads=2
"""


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[Settings]:
    """``settings`` as they are when they name a broker; otherwise a local broker started in a
    temporary folder for the duration, and the settings pointing at it."""
    if settings.bootstrap:
        yield settings
        return
    with tempfile.TemporaryDirectory(prefix="sluice-broker-") as state_dir:
        broker = LocalBroker(Path(state_dir), settings.cache_dir)
        state = broker.start()
        try:
            yield settings.replace(bootstrap=state.bootstrap)
        finally:
            broker.stop()
