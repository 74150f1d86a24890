"""The process groups of jobs: is a recorded pid still our job, is its group alive, end it.

Why a module of its own: the control API, ``streamlearn jobs cancel`` and the API's start-up all end
process groups they may not have started in this process (an orphan of a crashed API), so a recorded
pid is signalled only after checking it is still that job's process: alive, leader of its own group,
and carrying the job id in its environment (``/proc/<pid>/environ``), so a reused pid is never hit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from streaming.fsutil import pid_alive

log = logging.getLogger(__name__)

#: Environment variable that marks a job's child process (read back from /proc/<pid>/environ before a
#: signal is sent to a recorded pid, so a pid reused by another process is never signalled).
JOB_ENV = "STREAMLEARN_JOB_ID"


def is_job_process(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is alive, leads its own process group, and carries ``job_id`` in its environment."""
    if not pid_alive(pid):
        return False
    try:
        if os.getpgid(pid) != pid:
            return False
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{JOB_ENV}={job_id}".encode() in fh.read().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): the process group check is what is left
        return True


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields_ = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields_) > 2 and fields_[2] == str(pgid) and fields_[0] != "Z":
            return True
    return False


def terminate_group(pid: int, job_id: str, grace_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """SIGTERM the job's process group, SIGKILL it after ``grace_s``; True when it was alive.

    ``proc``: the runner's own handle of the child, reaped here so a zombie leader does not count.
    """
    if proc is None and not is_job_process(pid, job_id):
        return False
    if proc is not None and proc.poll() is not None and not _group_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        else:
            time.sleep(0.1)  # bounded poll of a process we did not start (no handle to wait on)
        if not _group_alive(pid):
            return True
    log.warning("job %s: process group %d still alive %.0f s after SIGTERM; sending SIGKILL", job_id, pid, grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return True
