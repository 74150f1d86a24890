"""Warm standby for a member slot: wait, warm, on a flock the active process holds; take over at its death.

Why: a serving worker restarted after ``kill -9`` needs 10-15 s on a small box before it answers
(TensorFlow's import and the model's load dominate; docs/STANDBY.md). A second process that did all
of that already, and only waits, answers within about a second of the death.

How: every member slot ``N`` of a group (``streaming.members``) has two locks under
``HOME/members/<group>/``:

* ``slot<N>.lock``, held by the *active* process for its whole life (the ordinary member lock); and
* ``slot<N>.standby.lock``, held by at most one *standby* for slot ``N``.

A process in standby mode takes the lowest slot whose active lock is free (it becomes active, as
without standby), else the lowest slot whose standby lock is free (it becomes that slot's standby).
So 2N copies of the same command pair up as N active and N standby processes, and a restarted copy
fills whichever role is free: after a kill -9 of the active one, its standby takes ``slot<N>.lock``
and the restarted process becomes the new standby. The standby waits in a blocking ``flock`` (in a
thread: no polling, no Kafka client, no CPU); the kernel drops a lock the instant its process dies,
however it dies, and wakes the waiter. The standby then holds the same slot, hence the same static
member id and transactional id as the dead process: its consumer takes the dead member's place in
the group at once and its producer's ``init_transactions`` fences the dead one's open transaction.

A live but hung active process keeps its lock, so a standby never runs beside it (no split brain on
one host); the active process's own liveness watchdog (:mod:`streaming.watchdog`) ends it when its
loop stalls, and the kernel then frees the lock as for any death.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streaming.config import Settings
from streaming.exceptions import MemberSlotBusyError
from streaming.fsutil import pid_alive
from streaming.members import HOST, MAX_SLOTS, Lease, claim, instance_id, members_dir, try_lock, write_status

log = logging.getLogger(__name__)


class Standby:
    """This process's place as the standby of one slot; :meth:`wait_active` turns it into a :class:`Lease`."""

    def __init__(self, settings: Settings, group: str, role: str, slot: int, fd: int) -> None:
        self.settings, self.group, self.role, self.slot = settings, group, role, slot
        self.fd: int | None = fd
        directory = members_dir(settings, group)
        self.lock_path = directory / f"slot{slot}.standby.lock"
        self.active_path = directory / f"slot{slot}.lock"
        self.instance_id = instance_id(settings, group, slot)
        self.info: dict[str, Any] = {}
        self._cancelled = False
        self.set_status(pid=os.getpid(), host=HOST, group=group, role=role, slot=slot, state="standby",
                        standby_for=self.instance_id, instance_id=None, argv=sys.argv, started=time.time(),
                        ready=False, version=None, partitions=None, warning=None)

    @property
    def info_path(self) -> Path:
        return self.lock_path.with_suffix(".json")

    def set_status(self, **fields: Any) -> None:
        """Merge ``fields`` into the standby's JSON (``streamlearn status`` reads it; advisory only)."""
        write_status(self.info_path, self.info, fields)

    def active_pid(self) -> int | None:
        """The pid the active process of this slot recorded (for log lines), None when unknown."""
        try:
            return int(_status(self.active_path.with_suffix(".json"))["pid"])
        except (KeyError, ValueError, TypeError):
            return None

    def wait_active(self, stop: threading.Event, tick: Callable[[], None] | None = None,
                    tick_s: float = 1.0) -> Lease | None:
        """Block until this process holds the slot's active lock (a :class:`Lease`), or None once ``stop`` is set.

        The lock is waited for in a daemon thread with a blocking ``flock``, so the kernel wakes it the
        moment the holder dies; this thread only looks at ``stop`` (and calls ``tick``, e.g. to record
        the warm version) every ``tick_s``. A lock acquired after ``stop`` is dropped at once.
        """
        got: list[int] = []
        acquired = threading.Event()
        guard = threading.Lock()

        def block() -> None:
            fd = os.open(self.active_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                raise
            with guard:
                if self._cancelled:
                    os.close(fd)  # nobody takes over any more: let the next standby have it
                    return
                got.append(fd)
            acquired.set()

        threading.Thread(target=block, name=f"standby-{self.group}-slot{self.slot}", daemon=True).start()
        while not acquired.wait(tick_s):
            if stop.is_set():
                with guard:
                    self._cancelled = True
                    if not got:
                        return None
                break
            if tick is not None:
                tick()
        if stop.is_set() and got:  # stopped just as the lock came: do not take over
            os.close(got[0])
            return None
        lease = Lease(self.settings, self.group, self.role, self.instance_id, self.active_path, self.slot, got[0])
        lease.set_status(pid=os.getpid(), host=HOST, group=self.group, role=self.role, slot=self.slot,
                         instance_id=self.instance_id, argv=sys.argv, started=time.time(), partitions=None,
                         warning=None, state="active", took_over=time.time())
        self.release()
        return lease

    def release(self) -> None:
        """Give up the standby place (its status file first, then the lock: never unlink a lock file)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.info_path.unlink()
        os.close(self.fd)
        self.fd = None


#: Longest wait for a slot whose standby is taking over (see :func:`takeover_in_progress`).
TAKEOVER_WAIT_S = 2.0
TAKEOVER_POLL_S = 0.02


def _status(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def takeover_in_progress(directory: Path, slot: int) -> bool:
    """Whether slot ``slot``'s standby is between taking the active lock and giving up its standby lock.

    Why: in that window both locks of the slot are held, so a restarted copy of the same command (the
    usual case: the supervisor restarts the process that just died) found no place in the slot and
    claimed the next slot's active lock, an extra active replica. The window is recognisable from the
    status files: the standby's file is still there while the active file names either the standby's
    own pid (already rewritten) or a pid that is dead (the process whose death started the takeover).
    A live active process with a live standby beside it is not a takeover, so the caller moves on.
    """
    standby = _status(directory / f"slot{slot}.standby.json")
    if not standby.get("pid"):
        return False
    active = _status(directory / f"slot{slot}.json").get("pid")
    if active is None or active == standby.get("pid"):
        return True
    try:
        return not pid_alive(int(active))
    except (TypeError, ValueError):
        return True


def claim_or_standby(settings: Settings, group: str, role: str, *, slot: int | None = None) -> Lease | Standby:
    """The active lease of the lowest slot that has no live active process, else the standby place of the
    lowest slot that has none (``slot`` pins one). Raises MemberSlotBusyError when every place is held.

    A slot whose standby is taking over is waited for (at most TAKEOVER_WAIT_S), so a restarted copy
    becomes its new standby instead of an extra active replica in the next slot."""
    candidates = [slot] if slot is not None else range(MAX_SLOTS)
    directory = members_dir(settings, group)
    for n in candidates:
        deadline: float | None = None
        while True:
            try:
                lease = claim(settings, group, role, slot=n)
            except MemberSlotBusyError:
                fd = try_lock(directory / f"slot{n}.standby.lock")
                if fd is not None:
                    return Standby(settings, group, role, n, fd)
                if not takeover_in_progress(directory, n):
                    break
                if deadline is None:
                    deadline = time.monotonic() + TAKEOVER_WAIT_S
                    log.info("slot %d of %s: its standby is taking over; waiting for its standby place", n, group)
                if time.monotonic() >= deadline:
                    break
                time.sleep(TAKEOVER_POLL_S)
                continue
            lease.set_status(state="active")
            return lease
    where = f"slot {slot}" if slot is not None else f"all {MAX_SLOTS} slots"
    raise MemberSlotBusyError(f"slot: {where} of group {group!r} on this host already has an active and a standby "
                              "process; stop one of them, or give another --slot")
