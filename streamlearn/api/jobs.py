"""Jobs: a control-API request that runs a ``streamlearn`` command as a child process.

Why child processes of the same CLI commands: ``streamlearn train MODEL --once``, ``streamlearn
replay KIND --into NS`` and ``streamlearn store promote`` already hold every guarantee (leases,
lineage, the promotion's roll-forward); a second, in-process copy would drift from them. A job is
that command line, run in its own process group (so a cancel reaches whatever it starts), its output
in ``<home>/jobs/<id>.log`` and its state in ``<home>/jobs/<id>.json``, replaced atomically:
id, kind, tenant, what was asked, status (queued | running | succeeded | failed | cancelled), pid,
start and end times, exit code, the version produced and the gate decision, and a reason.

The result comes from the command's own output: ``train --once``, ``replay`` and ``store promote
--json`` end by printing one JSON object (``retrain --reproduce`` an indented one), which is read
back from the end of the log after the process exits; a failed command's ``error: ...`` line becomes
the job's reason. Nothing is inferred from a guess or a timer.

Who may change a job's state: the runner that started it (its monitor thread records the end), and
``cancel`` (the API's DELETE or ``streamlearn jobs cancel`` on the same home). Every read-modify-write
holds one ``flock`` on ``<home>/jobs/.lock``, so a cancel and the end of the process cannot both win:
a job marked cancelled stays cancelled when its process then exits.

Restarts: each runner has an instance id (``<pid>:<random>``) written into the jobs it starts. A new
runner (``streamlearn api serve`` started again) marks every queued or running job of another
instance failed ("the API restarted while it ran (pid N)") and terminates that job's process group if
it is still alive: nothing would record its end, and a second training run of the model could start.
``streamlearn jobs list|show`` do the same for jobs whose API process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from schemas.exceptions import ConfigError
from streaming.config import Settings, child_env
from streaming.fsutil import pid_alive, write_json_atomic
from streamlearn.api.exceptions import JobConflictError, JobNotFoundError, TooManyJobsError
from streamlearn.api.procs import JOB_ENV, terminate_group

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}\Z")  # \Z: "$" also matched before a final newline
ACTIVE = frozenset({"queued", "running"})
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
#: Bytes of the log end searched for the command's closing JSON object and error line.
RESULT_SCAN_BYTES = 256 * 1024
#: Longest log tail a reader may ask for.
MAX_TAIL_BYTES = 64 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Job:
    """The persisted state of one job (``<home>/jobs/<id>.json``)."""

    id: str
    kind: str  # train | replay | promote
    tenant: str
    resource: str  # what only one active job may hold: "model:<name>" or "namespace:<kind>/<ns>"
    args: dict[str, Any]  # what was asked, as given (validated)
    argv: list[str]  # the streamlearn words the child runs (after the interpreter)
    status: str = "queued"
    owner: str = ""  # instance id of the runner that started it
    pid: int | None = None
    created_ms: int = field(default_factory=now_ms)
    started_ms: int | None = None
    ended_ms: int | None = None
    exit_code: int | None = None
    version: int | None = None
    gate: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    reason: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        """The job of a state file's JSON; TypeError when it is not a job's shape (the store calls the file
        unreadable: a list or an ``"args": null`` was an AttributeError in ``jobs list`` and a 500 of
        ``GET /jobs`` for everybody)."""
        if not isinstance(data, dict):
            raise TypeError(f"a job is a JSON object, not {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        job = cls(**{k: v for k, v in data.items() if k in names})
        for name, want in _FIELD_TYPES.items():
            value = getattr(job, name)
            if not isinstance(value, want) or isinstance(value, bool) and bool not in want:
                raise TypeError(f"job field {name!r} is {type(value).__name__}")
        return job

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def owner_pid(self) -> int | None:
        head = self.owner.split(":", 1)[0]
        return int(head) if head.isdigit() else None


_OPT_INT = (int, type(None))
_OPT_DICT = (dict, type(None))
#: The type each field of a job's state file must have.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "kind": (str,), "tenant": (str,), "resource": (str,), "args": (dict,), "argv": (list,),
    "status": (str,), "owner": (str,), "pid": _OPT_INT, "created_ms": (int,), "started_ms": _OPT_INT,
    "ended_ms": _OPT_INT, "exit_code": _OPT_INT, "version": _OPT_INT, "gate": _OPT_DICT, "result": _OPT_DICT,
    "reason": (str, type(None))}


def new_job_id() -> str:
    """Sortable by creation time (second), unique by 32 random bits."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


class JobStore:
    """The job files of one home: ``<home>/jobs/<id>.json`` and ``<id>.log``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, job_id: str) -> Path:
        return self.root / f"{self._checked(job_id)}.json"

    def log_path(self, job_id: str) -> Path:
        return self.root / f"{self._checked(job_id)}.log"

    @staticmethod
    def _checked(job_id: str) -> str:
        if not JOB_ID_RE.match(job_id):
            raise JobNotFoundError(f"job id {job_id[:40]!r} is not a job id (like 20261130T061500-1a2b3c4d); "
                                   "list jobs with GET /jobs or `streamlearn jobs list`")
        return job_id

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over every read-modify-write of this home's jobs (all processes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def save(self, job: Job) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(job.id), job.to_dict())

    def load(self, job_id: str) -> Job:
        path = self.path(job_id)
        try:
            return Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise JobNotFoundError(f"no job {job_id!r}; list jobs with GET /jobs or `streamlearn jobs list`") from None
        except (OSError, ValueError, TypeError) as exc:
            raise JobNotFoundError(f"job {job_id!r}: its state file {path} is unreadable ({type(exc).__name__}); "
                                   "remove it") from exc

    def ids(self) -> list[str]:
        """Every job id, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.stem for p in self.root.glob("*.json") if JOB_ID_RE.match(p.stem)), reverse=True)

    def jobs(self, limit: int | None = None, keep: Callable[[Job], bool] | None = None) -> list[Job]:
        out: list[Job] = []
        for job_id in self.ids():
            try:
                job = self.load(job_id)
            except JobNotFoundError:
                continue  # removed meanwhile, or unreadable: `jobs show` names it
            if keep is None or keep(job):
                out.append(job)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        with self.locked():
            job = self.load(job_id)
            change(job)
            self.save(job)
            return job

    def tail(self, job_id: str, max_bytes: int = 8192) -> str:
        """The last ``max_bytes`` (at most :data:`MAX_TAIL_BYTES`) of the job's log, from a line start."""
        max_bytes = max(0, min(max_bytes, MAX_TAIL_BYTES))
        return _read_end(self.log_path(job_id), max_bytes)


def _read_end(path: Path, max_bytes: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except OSError:
        return ""
    if size > max_bytes and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", errors="replace")


def progress(store: JobStore, job: Job) -> dict[str, Any]:
    """What a job is doing now: its last output line (replay prints progress lines; a trainer logs its steps)."""
    lines = [ln.strip() for ln in store.tail(job.id, 4096).splitlines() if ln.strip()]
    out: dict[str, Any] = {"last_line": lines[-1][:300] if lines else None}
    if job.started_ms is not None:
        out["elapsed_s"] = round(((job.ended_ms or now_ms()) - job.started_ms) / 1000, 1)
    return out


def parse_outcome(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The command's closing JSON object and its last ``error:`` line, from the end of its output."""
    lines = text.splitlines()
    result: dict[str, Any] | None = None
    decoder = json.JSONDecoder()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:  # the object alone: log lines may follow it (repeat summaries flushed at exit, streaming/logs.py)
                value, _ = decoder.raw_decode("\n".join(lines[i:]))
            except ValueError:
                continue
            if isinstance(value, dict):
                result = value
                break
    error = next((ln[len("error:"):].strip() for ln in reversed(lines) if ln.startswith("error:")), None)
    return result, error


def cancel(store: JobStore, job_id: str, grace_s: float, *, by: str = "a user",
           proc: subprocess.Popen[bytes] | None = None) -> Job:
    """Mark the job cancelled, then end its process group (SIGTERM, SIGKILL after ``grace_s``).

    Marked first, under the lock: the process's exit that follows is then recorded as the end of a
    cancelled job, not as its failure. A job that is over already is a 409.
    """
    def mark(job: Job) -> None:
        if job.status not in ACTIVE:
            raise JobConflictError(f"job {job.id} is {job.status} already; only queued or running jobs can be "
                                   "cancelled", job_id=job.id)
        job.status, job.reason, job.ended_ms = "cancelled", f"cancelled by {by}", now_ms()

    job = store.update(job_id, mark)
    if job.pid is not None:
        terminate_group(job.pid, job.id, grace_s, proc)
    return job


def reap_orphans(store: JobStore, instance: str | None, grace_s: float, *, starting: bool) -> list[str]:
    """Mark failed every active job whose runner is gone; end its process group. Returns their ids.

    ``starting`` (a runner starting with instance id ``instance``): every active job of another
    instance is orphaned, whether or not its old API process still exists. Otherwise (``streamlearn
    jobs``): only jobs whose API process is no longer alive.
    """
    orphaned: list[str] = []
    for job in store.jobs(keep=lambda j: j.status in ACTIVE and j.owner != instance):
        owner_pid = job.owner_pid
        if not starting and owner_pid is not None and pid_alive(owner_pid):
            continue
        why = (f"the API restarted while it ran (pid {job.pid})" if starting
               else f"the API that ran it (pid {owner_pid}) is gone (pid {job.pid})")

        def mark(j: Job, why: str = why) -> None:
            if j.status in ACTIVE and j.owner != instance:
                j.status, j.reason, j.ended_ms = "failed", why, now_ms()

        updated = store.update(job.id, mark)
        if updated.status == "failed" and updated.reason == why:
            orphaned.append(job.id)
            if job.pid is not None and terminate_group(job.pid, job.id, grace_s):
                log.warning("job %s: terminated its orphaned process group %d", job.id, job.pid)
    return orphaned


class JobRunner:
    """Starts jobs as child processes and records their end; one per control-API process."""

    def __init__(self, settings: Settings, *, cli: list[str] | None = None) -> None:
        self.settings = settings
        self.store = JobStore(settings.home / "jobs")
        #: The command that runs ``streamlearn``; a test may put a wrapper in front of the real CLI.
        self.cli = cli or [sys.executable, "-m", "streamlearn.cli"]
        self.max_jobs = settings.api_max_jobs
        #: Jobs one tenant may run at once (create_app keeps one slot for other tenants when keys name tenants).
        self.tenant_cap = self.max_jobs
        self.grace_s = settings.api_cancel_grace_s
        self.instance = f"{os.getpid()}:{secrets.token_hex(4)}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._home_lock: IO[str] | None = None

    def claim_home(self) -> None:
        """Hold ``<home>/jobs/.api.lock`` for this runner's life: one API per home.

        Why: a second API on the same home would take the first one's running jobs for orphans and
        end them. The kernel drops the lock when the process dies, so a crashed API never blocks the
        restart.
        """
        if self._home_lock is not None:
            return
        self.store.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.store.root / ".api.lock", "a+")  # noqa: SIM115 - held open for the runner's life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            raise ConfigError(f"another control API runs on home {self.settings.home} (instance {holder}); stop it, "
                              "or give this one another STREAMLEARN_HOME") from None
        fh.seek(0)
        fh.truncate()
        fh.write(self.instance)
        fh.flush()
        self._home_lock = fh

    def release_home(self) -> None:
        """Let another runner claim the home (what the kernel does when this process dies)."""
        if self._home_lock is not None:
            self._home_lock.close()
            self._home_lock = None

    def recover(self) -> list[str]:
        """At start-up: claim the home, then fail the jobs an earlier API left queued or running
        (see the module docstring)."""
        self.claim_home()
        ids = reap_orphans(self.store, self.instance, self.grace_s, starting=True)
        for job_id in ids:
            log.warning("job %s marked failed: the API restarted while it ran", job_id)
        return ids

    def active(self) -> list[Job]:
        """This runner's jobs that are queued or running (read from their files: a CLI may have cancelled one)."""
        out = []
        for job_id in list(self._procs):
            with contextlib.suppress(JobNotFoundError):
                job = self.store.load(job_id)
                if job.status in ACTIVE:
                    out.append(job)
        return out

    def start(self, kind: str, tenant: str, resource: str, args: dict[str, Any], argv: list[str],
              child: Settings) -> Job:
        """Persist a queued job, start its process, and return it running (or failed to start).

        Raises :class:`JobConflictError` (409) when ``resource`` has an active job of the tenant and
        :class:`TooManyJobsError` (429) at ``api_max_jobs`` running jobs.
        """
        with self._lock, self.store.locked():
            active = self.active()
            holder = next((j for j in active if j.resource == resource and j.tenant == tenant), None)
            if holder is not None:
                raise JobConflictError(f"{resource.split(':', 1)[0]} {args.get('model') or args.get('namespace')!r} "
                                       f"has job {holder.id} {holder.status}; wait for it (GET /jobs/{holder.id}) or "
                                       "cancel it first", job_id=holder.id)
            if len(active) >= self.max_jobs:
                raise TooManyJobsError(f"{len(active)} jobs are running, the limit of api_max_jobs "
                                       "(STREAMLEARN_API_MAX_JOBS); retry when one has ended", retry_after=5)
            mine = sum(1 for j in active if j.tenant == tenant)
            if mine >= self.tenant_cap:  # one tenant's replays kept every other tenant's jobs at 429
                raise TooManyJobsError(f"your tenant runs {mine} jobs already; one of the api_max_jobs slots is kept "
                                       "for other tenants; retry when one has ended", retry_after=5)
            job = Job(new_job_id(), kind, tenant, resource, args, argv, owner=self.instance)
            self.store.save(job)
            env = {**child_env(child), JOB_ENV: job.id, "PYTHONUNBUFFERED": "1"}
            try:
                with open(self.store.log_path(job.id), "ab") as logfile:
                    proc = subprocess.Popen([*self.cli, *argv], stdin=subprocess.DEVNULL, stdout=logfile,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as exc:
                job.status, job.reason, job.ended_ms = "failed", f"could not start the process: {exc}", now_ms()
                self.store.save(job)
                return job
            job.status, job.pid, job.started_ms = "running", proc.pid, now_ms()
            self.store.save(job)
            self._procs[job.id] = proc
        thread = threading.Thread(target=self._monitor, args=(job.id, proc), name=f"job-{job.id}", daemon=True)
        self._threads[job.id] = thread
        thread.start()
        log.info("job %s (%s, tenant %r) started: pid %d", job.id, kind, tenant or "default", proc.pid)
        return job

    def _monitor(self, job_id: str, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        try:
            self.finish(job_id, code)
        finally:
            with self._lock:
                self._procs.pop(job_id, None)

    def finish(self, job_id: str, code: int) -> Job:
        """Record the end of a job's process from its exit code and the end of its output."""
        result, error = parse_outcome(_read_end(self.store.log_path(job_id), RESULT_SCAN_BYTES))

        def record(job: Job) -> None:
            job.exit_code = code
            job.ended_ms = job.ended_ms or now_ms()
            if result is not None:
                job.result = result
                if job.kind == "train" and job.args.get("reproduce_version") is not None:
                    # `retrain --reproduce` produces no version: its report names the one it re-trained
                    job.gate = {"action": result.get("reproduced_decision"),
                                "recorded_action": result.get("recorded_decision"), "reproduced": result.get("ok")}
                elif job.kind == "train":
                    job.version = result.get("version") if isinstance(result.get("version"), int) else None
                    job.gate = {k: v for k, v in result.items() if k not in ("model", "version")} or None
            if job.status not in ACTIVE:  # cancelled (or failed by a restart) while it ran: that stays
                return
            if code == 0:
                job.status, job.reason = "succeeded", None
            else:
                job.status = "failed"
                why = error or f"exit code {code}; see the log (GET /jobs/{job.id}?tail_bytes=8192)"
                job.reason = why if code > 0 else f"killed by signal {-code}"

        job = self.store.update(job_id, record)
        log.info("job %s ended: %s (exit code %s)", job_id, job.status, code)
        return job

    def cancel(self, job_id: str, by: str) -> Job:
        return cancel(self.store, job_id, self.grace_s, by=by, proc=self._procs.get(job_id))

    def wait(self, job_id: str, timeout_s: float) -> bool:
        """Wait for the monitor of ``job_id`` to have recorded its end (tests, shutdown)."""
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    def close(self) -> None:
        """On API shutdown: mark its running jobs failed and end their process groups.

        Why not leave them running: nothing would record their end, and the next start would fail
        them anyway; ending them now frees the model or namespace at once.
        """
        for job in self.active():
            why = f"the API stopped while it ran (pid {job.pid})"

            def mark(j: Job, why: str = why) -> None:
                if j.status in ACTIVE:
                    j.status, j.reason, j.ended_ms = "failed", why, now_ms()

            self.store.update(job.id, mark)
            if job.pid is not None:
                terminate_group(job.pid, job.id, self.grace_s, self._procs.get(job.id))
        for thread in list(self._threads.values()):
            thread.join(5.0)
        self.release_home()
