"""The supervised stack: every worker of the platform as a child process, restarted when it dies.

Why child processes rather than threads: each worker owns a Kafka consumer group member, a
TensorFlow runtime or an HTTP server; a crash (or a kill -9 in the fault tests) must take down
one worker, not the platform, and a restarted process starts from durable state only — the
same path production takes.

Restarts use exponential backoff (0.5 s doubling, capped at 30 s, reset after a minute of good
health); each restart is logged and counted, with the last line of the worker's log, so the console
says why it died. A worker that crashes ``give_up_after`` times in a row, each time within
``RAPID_S`` of its start while the broker answers, is not restarted again (a setting or a bug, not a
transient fault; crashes during a broker outage do not count): the
supervisor says so once, with that last log line, and ``status`` shows it as ``gave up``.

Stopping drains in order — intake first (gateway, sources), then stream workers (they flush
their open batch and commit), then trainers and serving, then the registry — each group
with SIGTERM and a bounded wait, then SIGKILL.

The state of the stack (pids, restarts, metrics ports) is written to ``$HOME/stack/state.json``
so ``streamlearn status`` in another terminal can show what runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from schemas.exceptions import StreamlearnError
from streaming.config import Settings, to_env
from streaming.topics import KINDS, MODELS

log = logging.getLogger(__name__)

#: Supervisor events kept in memory (the oldest are dropped; the logs keep everything).
MAX_EVENTS = 1000

#: Drain order: lower stops first.
INTAKE, STREAM, MODEL, CORE = 0, 1, 2, 3
#: A run shorter than this counts as a rapid crash.
RAPID_S = 30.0
#: Rapid crashes in a row after which a worker is not restarted any more.
GIVE_UP_AFTER = 5


@dataclass
class Service:
    name: str
    args: list[str]
    group: int
    metrics_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.5
    last_exit: int | None = None
    rapid_crashes: int = 0
    gave_up: str | None = None  # why the supervisor stopped restarting it

    def state(self) -> str:
        if self.gave_up is not None and self.proc is None:
            return "gave up"
        if self.proc is None:
            return "waiting"
        return "running" if self.proc.poll() is None else f"exited({self.proc.returncode})"


#: Name suffix of a serving worker's warm-standby twin (``serve-<model>-standby``; docs/STANDBY.md).
STANDBY_SUFFIX = "-standby"


def default_services(settings: Settings, base_metrics_port: int = 9100, *, gateway: bool = True,
                     registry_http: bool = False, standby: bool = False) -> list[Service]:
    """The platform's workers: gateway, a stream worker per kind, a trainer and a server per model.

    ``standby``: each server runs as ``serve <model> --standby`` beside a twin with the same command
    (``serve-<model>-standby``); whichever starts first is active, the other waits warm and takes over
    at its death, and the restarted one becomes the standby (the names stay, the roles swap;
    ``streamlearn status`` shows which is which).
    """
    services: list[Service] = []
    port = base_metrics_port
    if registry_http:
        services.append(Service("registry", ["registry", "serve"], CORE))
    if gateway:  # the gateway serves /metrics on its own HTTP port
        services.append(Service("gateway", ["ingest", "serve"], INTAKE, settings.ingest_port))
    for kind in KINDS:
        # No --instance-id: every worker derives its static member id itself (streaming.members), so a
        # restart after kill -9 takes its partitions back at once, supervised or started by hand.
        services.append(Service(f"stream-{kind}", ["stream", kind], STREAM, port))
        port += 1
    for model in MODELS:
        services.append(Service(f"train-{model}", ["train", model], MODEL, port))
        port += 1
    for model in MODELS:
        args = ["serve", model, "--standby"] if standby else ["serve", model]
        services.append(Service(f"serve-{model}", args, MODEL, port))
        port += 1
        if standby:
            services.append(Service(f"serve-{model}{STANDBY_SUFFIX}", list(args), MODEL, port))
            port += 1
    return services


class Supervisor:
    """Start, watch, restart and drain a set of :class:`Service` child processes."""

    def __init__(self, settings: Settings, services: list[Service], *, max_backoff: float = 30.0,
                 give_up_after: int = GIVE_UP_AFTER, rapid_s: float = RAPID_S) -> None:
        self.settings = settings
        self.rapid_s = rapid_s
        self.services = services
        self.max_backoff = max_backoff
        self.give_up_after = give_up_after
        self.dir = settings.home / "stack"
        self.log_dir = self.dir / "logs"
        self._stopping = threading.Event()
        self._holding = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Restart/stop events, newest last; at most MAX_EVENTS (a crash-looping service must not grow it).
        self.events: list[dict[str, Any]] = []

    # -- lifecycle ------------------------------------------------------------------------
    def _spawn(self, svc: Service) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLEARN_")}
        env.update(to_env(self.settings))
        if svc.metrics_port is not None:
            env["STREAMLEARN_METRICS_PORT"] = str(svc.metrics_port)
        env.update(svc.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logf = open(self.log_dir / f"{svc.name}.log", "ab")  # noqa: SIM115 - handed to the child
        svc.proc = subprocess.Popen([sys.executable, "-m", "streamlearn.cli", *svc.args], env=env,
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        svc.started_at = time.monotonic()
        log.info("started %s (pid %s): streamlearn %s", svc.name, svc.proc.pid, " ".join(svc.args))

    def start(self) -> None:
        hold_stack(self.settings)  # no-op when `up` took it already
        self._holding = True
        stop_orphans(self.settings, {s.name: s.group for s in self.services})
        for svc in self.services:
            self._spawn(svc)
        self._write_state()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                now = time.monotonic()
                for svc in self.services:
                    if svc.proc is None:
                        if svc.gave_up is None and now >= svc.next_start:
                            self._spawn(svc)
                        continue
                    code = svc.proc.poll()
                    if code is None:
                        if now - svc.started_at > 60:
                            svc.backoff = 0.5  # healthy for a minute: forget earlier crashes
                        continue
                    svc.last_exit = code
                    svc.proc = None
                    logfile = self.log_dir / f"{svc.name}.log"
                    last = last_log_line(logfile)
                    if now - svc.started_at >= self.rapid_s:
                        svc.rapid_crashes = 1
                    elif self._broker_reachable():  # a broker outage is transient: keep retrying
                        svc.rapid_crashes += 1
                    if svc.rapid_crashes >= self.give_up_after:
                        svc.gave_up = (f"crashed {svc.rapid_crashes} times in a row, each within {self.rapid_s:.0f} s "
                                       f"of starting; last log line: {last}")
                        self.events.append({"t": time.time(), "service": svc.name, "event": "gave-up",
                                            "exit_code": code, "reason": svc.gave_up})
                        log.error("%s exited with code %s and is NOT restarted any more: it %s. Fix the cause "
                                  "(run `streamlearn %s` to see it), then restart `streamlearn up`. Log: %s",
                                  svc.name, code, svc.gave_up, " ".join(svc.args), logfile)
                        continue
                    svc.restarts += 1
                    delay = min(self.max_backoff, svc.backoff)
                    svc.backoff = min(self.max_backoff, svc.backoff * 2)
                    svc.next_start = now + delay
                    self.events.append({"t": time.time(), "service": svc.name, "event": "restart",
                                        "exit_code": code, "delay_s": delay, "last_line": last})
                    del self.events[:-MAX_EVENTS]
                    log.warning("%s exited with code %s: %s; restart #%d in %.1f s (log: %s)", svc.name, code,
                                last, svc.restarts, delay, logfile)
                self._write_state()

    def _broker_reachable(self) -> bool:
        """Whether Kafka answers now; a crash while it does not is not held against the worker."""
        from streaming.broker import probe

        return probe(self.settings.bootstrap, timeout_s=1.0) is not None

    def stop(self, timeout_per_group: float = 20.0) -> dict[str, int | None]:
        """Drain in order (intake, stream, model, core): SIGTERM, bounded wait, then SIGKILL."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        codes: dict[str, int | None] = {}
        with self._lock:
            for group in sorted({s.group for s in self.services}):
                members = [s for s in self.services if s.group == group and s.proc is not None]
                for svc in members:
                    if svc.proc is not None and svc.proc.poll() is None:
                        svc.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout_per_group
                for svc in members:
                    assert svc.proc is not None
                    try:
                        svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        log.warning("%s did not stop within %.0f s of SIGTERM; killing it", svc.name,
                                    timeout_per_group)
                        svc.proc.kill()
                        svc.proc.wait()
                    codes[svc.name] = svc.proc.returncode
                    self.events.append({"t": time.time(), "service": svc.name, "event": "stopped",
                                        "exit_code": svc.proc.returncode, "group": group})
                    del self.events[:-MAX_EVENTS]
            self._write_state(stopped=True)
        if self._holding:
            self._holding = False
            release_stack(self.settings)
        return codes

    # -- inspection -----------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"name": s.name, "command": "streamlearn " + " ".join(s.args), "state": s.state(),
                 "pid": s.proc.pid if s.proc else None, "restarts": s.restarts, "last_exit": s.last_exit,
                 "gave_up": s.gave_up,
                 "uptime_s": round(now - s.started_at, 1) if s.proc else 0.0, "metrics_port": s.metrics_port,
                 "started_unix_s": round(time.time() - (now - s.started_at), 3) if s.proc else None}
                for s in self.services]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to one service (fault injection); returns the pid that was signalled."""
        with self._lock:
            svc = next(s for s in self.services if s.name == name)
            if svc.proc is None or svc.proc.poll() is not None:
                raise RuntimeError(f"service {name!r} is not running")
            svc.proc.send_signal(sig)
            return svc.proc.pid

    def _write_state(self, stopped: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({"supervisor_pid": os.getpid(), "stopped": stopped, "updated": time.time(),
                                   "services": self.status()}, indent=2))
        os.replace(tmp, self.dir / "state.json")


def _runs_command(pid: int, args: list[str]) -> bool:
    """Whether process ``pid`` runs ``streamlearn <args>`` (so a recycled pid is never signalled)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return False
    return "streamlearn.cli" in argv and argv[argv.index("streamlearn.cli") + 1:][:len(args)] == args


def _all_gone(pids: list[int]) -> bool:
    from streaming.fsutil import pid_alive

    return not any(pid_alive(p) for p in pids)


class StackBusyError(StreamlearnError):
    """Another supervisor (``up``, ``demo``) runs a stack in this home now."""


#: Stack locks this process holds: lock path -> (descriptor, holders). A flock is per open file, so a
#: second Supervisor in the same process (tests) shares the first one's instead of blocking on it.
_HELD: dict[Path, list[int]] = {}


def hold_stack(settings: Settings) -> None:
    """Take ``HOME/stack/supervisor.lock`` (an flock: freed when this process dies, kill -9 included).

    Why: a second ``up`` in one home started a second set of workers beside the first: each group got
    extra members, both wrote ``stack/state.json`` (so ``status`` showed whichever wrote last) and both
    appended to the same logs. Now the second is refused, naming the first one's pid.
    """
    from streaming.members import lock_as_pid

    path = settings.home / "stack" / "supervisor.lock"
    if path in _HELD:
        _HELD[path][1] += 1
        return
    fd, holder = lock_as_pid(path)
    if fd is None:
        raise StackBusyError(f"another stack ({holder}) runs in {settings.home} now; use `streamlearn status` to see "
                             "it, stop it (Ctrl-C or SIGTERM) to start this one, or give another --home")
    _HELD[path] = [fd, 1]


def release_stack(settings: Settings) -> None:
    path = settings.home / "stack" / "supervisor.lock"
    held = _HELD.get(path)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[path]
        os.close(held[0])


def stop_orphans(settings: Settings, groups: dict[str, int] | None = None, timeout_s: float = 20.0) -> list[str]:
    """Stop the live workers of a previous stack whose supervisor died (``kill -9``, OOM): drain order,
    SIGTERM, a bounded wait, then SIGKILL. Returns the names of those stopped.

    Why: workers outlive a supervisor killed with -9. Running the same ``streamlearn up`` again then
    started a second set beside them: every group got an unsupervised extra member that nothing stopped
    any more (``up``'s own stop drains only its children), and a gateway orphan kept its port. A restart
    with the same command must leave one supervised stack, so the new supervisor first stops the old
    one's workers, the way that supervisor would have (each drains: a stream worker flushes and commits).
    Only processes named in ``HOME/stack/state.json`` that still run that exact command are touched.
    """
    from streaming.fsutil import pid_alive
    from streaming.polling import poll_until

    state = read_state(settings)
    if not state or state.get("stopped") or pid_alive(int(state.get("supervisor_pid") or 0) or -1):
        return []
    orphans = []
    for entry in state.get("services") or []:
        pid, command = entry.get("pid"), str(entry.get("command") or "")
        args = command.split()[1:]  # "streamlearn <args>"
        if isinstance(pid, int) and pid > 0 and pid_alive(pid) and _runs_command(pid, args):
            orphans.append((int((groups or {}).get(str(entry.get("name")), CORE)), str(entry.get("name")), pid))
    stopped = []
    for group in sorted({g for g, _, _ in orphans}):
        batch = [(name, pid) for g, name, pid in orphans if g == group]
        log.warning("the previous stack's supervisor (pid %s) is gone but its workers still run: %s; stopping them "
                    "before starting this stack", state.get("supervisor_pid"),
                    ", ".join(f"{name} (pid {pid})" for name, pid in batch))
        for _, pid in batch:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not poll_until(partial(_all_gone, [pid for _, pid in batch]), timeout_s, interval_s=0.1):
            for name, pid in batch:
                if pid_alive(pid):
                    log.warning("%s (pid %s) did not stop within %.0f s of SIGTERM; killing it", name, pid, timeout_s)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        stopped += [name for name, _ in batch]
    return stopped


def last_log_line(path: Path, max_bytes: int = 8192) -> str:
    """The last non-empty line of a worker's log (what it said before dying), or a placeholder."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip() and "GLIBC_" not in ln]
    return lines[-1][:500] if lines else "(empty log)"


def read_state(settings: Settings) -> dict[str, Any] | None:
    path = settings.home / "stack" / "state.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
