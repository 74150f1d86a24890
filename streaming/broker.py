"""The embedded Kafka-compatible broker: `noida-db` (pinned wheel) run as a child process.

Why a child process and not a library: the broker is a native binary; running it as a process
gives it its own lifetime (``streamlearn broker start`` returns while it keeps running), a log
file, and a clean SIGTERM stop.

Readiness is a real Kafka metadata request answered before a deadline, not "the port is open":
the binary binds early and only then loads its state file.

Durability limit (also in the README): noida-db persists by rewriting one JSON file shortly
after changes, so acknowledged writes of the last second or two can vanish when the broker itself
is killed with SIGKILL (measured 0.2-1.2 s at 2,000 records/s; docs/RECOVERY.md), after which the
restarted broker re-uses the lost offsets. Publishers re-send what was lost (``streaming/ackguard.py``)
and stream workers detect the re-use (``streaming/divergence.py``). A clean stop (SIGTERM,
``streamlearn broker stop``) persists everything.
Production runs Apache Kafka (docker-compose.yml) and has no such window.

When a bootstrap address is configured (``STREAMLEARN_KAFKA_BOOTSTRAP`` or the config file),
nothing is started: every component talks to that address instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from streaming.config import Settings
from streaming.exceptions import BrokerAlreadyRunningError, BrokerError
from streaming.fsutil import pid_alive
from streaming.polling import poll_until

log = logging.getLogger(__name__)

NOIDA_VERSION = "0.2.3"


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    address: str
    data_dir: Path
    log_file: Path
    external: bool
    topics: int | None = None

    def describe(self) -> str:
        if self.external:
            return f"external broker at {self.address} (no embedded broker is managed)"
        if not self.running:
            return f"embedded broker not running (data dir {self.data_dir})"
        return (f"embedded broker running: pid {self.pid}, address {self.address}, data dir {self.data_dir}, "
                f"topics {self.topics if self.topics is not None else '?'}, log {self.log_file}")


def binary_path() -> Path:
    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        raise BrokerError(f"noida-db binary not found at {path}; "
                          f"reinstall with `pip install noida-db=={NOIDA_VERSION}`")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def probe(bootstrap: str, timeout_s: float = 2.0) -> int | None:
    """Send a Kafka metadata request; return the number of topics, or None if no broker answers.

    A plain TCP connect goes first: against a port nobody listens on (a broker still starting),
    kafka-python logs an ERROR per refused connection, which made an expected start-up wait look
    like a failure.
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError):
        return None
    consumer = None
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000) + 500,
                                 connections_max_idle_ms=int(timeout_s * 1000) + 1000,
                                 metadata_max_age_ms=1000)
        return len(consumer.topics())
    except (KafkaError, OSError, ValueError, AssertionError):
        return None
    finally:
        if consumer is not None:
            consumer.close()


def wait_ready(bootstrap: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None,
               log_file: Path | None = None) -> None:
    """Poll with metadata requests until the broker answers or the deadline passes."""
    def answered() -> bool:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"embedded broker exited with code {proc.returncode} while starting; "
                              f"last log lines:\n{_tail(log_file)}")
        return probe(bootstrap, timeout_s=1.0) is not None

    if poll_until(answered, deadline_s, interval_s=0.1):
        return
    raise BrokerError(f"no Kafka broker answered a metadata request at {bootstrap} within {deadline_s:.0f} s; "
                      f"last log lines:\n{_tail(log_file)}")


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in text[-lines:] if "GLIBC_2.39" not in line)


class EmbeddedBroker:
    """Start, stop and inspect the embedded broker of one data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.broker_dir
        self.data_dir = self.root / "data"
        self.log_file = self.root / "broker.log"
        self.pid_file = self.root / "broker.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.settings.bootstrap

    def _read_pid(self) -> dict[str, object] | None:
        try:
            info = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        if isinstance(pid, int) and pid_alive(pid):
            return dict(info)
        return None

    def status(self) -> BrokerStatus:
        if not self.settings.embedded:
            return BrokerStatus(True, None, self.address, self.data_dir, self.log_file, True,
                                probe(self.address))
        info = self._read_pid()
        if info is None:
            return BrokerStatus(False, None, self.address, self.data_dir, self.log_file, False)
        address = f"{info.get('host')}:{info.get('port')}"
        return BrokerStatus(True, int(info["pid"]), address, self.data_dir,  # type: ignore[call-overload]
                            self.log_file, False, probe(address))

    def start(self, timeout_s: float = 30.0, detach: bool = True) -> BrokerStatus:
        """Start the broker and wait until it answers metadata requests.

        Raises BrokerAlreadyRunningError if a broker already runs on this data directory, and
        BrokerError if the port is taken by something else or the broker does not come up.
        """
        if not self.settings.embedded:
            log.info("bootstrap %s is configured; not starting an embedded broker", self.address)
            return self.status()
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "broker.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two concurrent `start`s on one data dir: one wins
            info = self._read_pid()
            if info is not None:
                raise BrokerAlreadyRunningError(
                    f"a broker already runs on data dir {self.data_dir} (pid {info['pid']}, port {info['port']}); "
                    "stop it with `streamlearn broker stop` or use another STREAMLEARN_HOME")
            host, port = self.settings.broker_host, self.settings.broker_port
            if _port_in_use(host, port):
                raise BrokerError(f"port {port} on {host} is already in use by another program; choose another "
                                  "with --broker-port (demo, up), --port (broker start) or the environment "
                                  "variable STREAMLEARN_BROKER_PORT")
            cmd = [str(binary_path()), "start", "--data-dir", str(self.data_dir), "--host", host,
                   "--only", "kafka", "--kafka-port", str(port)]
            logf = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
            self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=detach)
            logf.close()
            self.pid_file.write_text(json.dumps({"pid": self._proc.pid, "host": host, "port": port,
                                                 "started_at": time.time(), "version": NOIDA_VERSION}))
        try:
            wait_ready(self.address, timeout_s, self._proc, self.log_file)
        except BrokerError:
            self.stop()
            raise
        log.info("embedded broker ready at %s (pid %s)", self.address, self._proc.pid)
        return self.status()

    def stop(self, timeout_s: float = 15.0) -> bool:
        """Stop the broker with SIGTERM (it persists its state), SIGKILL after the timeout.

        Returns False when no broker was running.
        """
        if not self.settings.embedded:
            return False
        info = self._read_pid()
        pid = int(info["pid"]) if info else (self._proc.pid if self._proc else None)  # type: ignore[call-overload]
        if pid is None or not pid_alive(pid):
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        proc = self._proc

        def gone() -> bool:  # our own child must be reaped, or its zombie stays "alive"
            return proc.poll() is not None if proc is not None else not pid_alive(pid)

        poll_until(gone, timeout_s)
        if not gone():
            log.warning("broker pid %s ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker (fault-injection tests only: the last ~2 s of writes may be lost)."""
        info = self._read_pid()
        if info:
            os.kill(int(info["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
            if self._proc is not None:
                self._proc.wait()
                self._proc = None
            self.pid_file.unlink(missing_ok=True)


def resolve(settings: Settings) -> Settings:
    """Point ``settings`` at the embedded broker that actually runs on its data dir, if any.

    ``streamlearn broker start --port P`` records P in the pid file; later commands of the same
    STREAMLEARN_HOME find the broker there without repeating the port.
    """
    if not settings.embedded:
        return settings
    info = EmbeddedBroker(settings)._read_pid()
    if info and isinstance(info.get("port"), int) and info["port"] != settings.broker_port:
        return settings.with_(broker_port=int(info["port"]))  # type: ignore[call-overload]
    return settings


#: What to do when the embedded broker cannot be reached (also in :mod:`streamlearn.broker_errors`' message).
START_HINT = ("start it with `streamlearn broker start` (same STREAMLEARN_HOME and STREAMLEARN_BROKER_PORT), "
              "or point --bootstrap / STREAMLEARN_KAFKA_BOOTSTRAP at a running Kafka")


def not_started(settings: Settings) -> str | None:
    """Why no command can reach the embedded broker now, when that is certain; else None.

    Certain means: the embedded broker is the configured one, it was never started under this
    ``STREAMLEARN_HOME`` or was stopped cleanly (no pid file at all), and its port refuses connections.
    Why: a Kafka client waits out its bootstrap timeout (30 s) before it gives up, so a user who had not
    run ``streamlearn broker start`` stared at a silent command for half a minute before the error. A
    pid file, even of a dead process, means a broker ran here and may be coming back (a supervisor or
    the user restarting it after a crash): commands then wait for it as before. So does every external
    bootstrap address, which may be a cluster restarting.
    """
    if not settings.embedded or EmbeddedBroker(settings).pid_file.exists():
        return None
    if _connect_errno(settings.broker_host, settings.broker_port) != errno.ECONNREFUSED:
        return None
    return (f"no Kafka broker is running at {settings.bootstrap}: the embedded broker of {settings.home} was not "
            f"started (or was stopped); {START_HINT}; then run the same command again")


def _connect_errno(host: str, port: int) -> int:
    """0 when something accepts a TCP connection at ``host:port`` within 0.5 s, else the error number."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port))


def _port_in_use(host: str, port: int) -> bool:
    return _connect_errno(host, port) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class KeptBroker:
    """The broker a supervisor uses, and for one it started itself a restart should that broker die.

    Why: ``streamlearn up`` starts the embedded broker unless one is configured or already runs, and
    every worker it supervises survives a broker outage by retrying. Without this, a broker that died
    (an OOM kill, a crash of the binary) stayed dead until somebody ran ``streamlearn broker start``
    by hand, so the whole supervised stack waited for a person. A broker that ``up`` did not start (a
    configured bootstrap, or one from ``streamlearn broker start``) belongs to whoever started it and
    is never restarted here.
    """

    BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(self, broker: EmbeddedBroker, status: BrokerStatus, owned: bool, timeout_s: float) -> None:
        self.broker = broker
        self.status = status
        self.owned = owned
        self.timeout_s = timeout_s
        self.restarts = 0
        self._failures = 0
        self._next_try = 0.0

    def revive(self) -> str | None:
        """Start the broker again if the one started here has exited; a line saying what happened, or None.

        A failed start (the port taken meanwhile, a broker that does not come up) is retried at the next
        call after a back-off of 1 s growing to 30 s, so a broken binary is not restarted in a tight loop.
        """
        proc = self.broker._proc
        if not self.owned or proc is None or proc.poll() is None or time.monotonic() < self._next_try:
            return None
        old, code = proc.pid, proc.returncode
        self.broker._proc = None
        # The pid file still names the dead broker: should that pid be reused by another process meanwhile,
        # start() would read it as a broker already running.
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.broker.pid_file.read_text()).get("pid") == old:
                self.broker.pid_file.unlink()
        try:
            self.status = self.broker.start(timeout_s=self.timeout_s, detach=False)
        except BrokerAlreadyRunningError as exc:  # somebody started one by hand meanwhile: theirs to stop
            self.owned = False
            return f"the embedded broker (pid {old}) exited with code {code}; {exc}; using that one"
        except BrokerError as exc:
            wait = self.BACKOFF_S[min(self._failures, len(self.BACKOFF_S) - 1)]
            self._failures += 1
            self._next_try = time.monotonic() + wait
            if self.broker._proc is None:  # keep watching the failed start's process for the next try
                self.broker._proc = proc
            return (f"the embedded broker (pid {old}) exited with code {code} and could not be started again: "
                    f"{exc}; trying again in {wait:.0f} s")
        self._failures = 0
        self.restarts += 1
        return (f"the embedded broker (pid {old}) exited with code {code}; started it again as pid "
                f"{self.status.pid} on the same data dir {self.broker.data_dir}")


@contextlib.contextmanager
def kept_broker(settings: Settings, timeout_s: float = 30.0) -> Iterator[KeptBroker]:
    """Use the configured or already-running broker, or start one, restart it with ``revive()`` should
    it die, and stop it on exit."""
    broker = EmbeddedBroker(settings)
    status = broker.status()
    if status.external:
        wait_ready(settings.bootstrap, timeout_s)
        yield KeptBroker(broker, status, owned=False, timeout_s=timeout_s)
        return
    if status.running:
        yield KeptBroker(broker, status, owned=False, timeout_s=timeout_s)
        return
    kept = KeptBroker(broker, broker.start(timeout_s=timeout_s, detach=False), owned=True, timeout_s=timeout_s)
    try:
        yield kept
    finally:
        if kept.owned:
            broker.stop()


@contextlib.contextmanager
def running_broker(settings: Settings, timeout_s: float = 30.0) -> Iterator[BrokerStatus]:
    """Use the configured or already-running broker, or start one and stop it on exit."""
    with kept_broker(settings, timeout_s) as kept:
        yield kept.status
