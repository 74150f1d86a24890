"""Consumer-group members of this host: a lock per member slot, stable static ids, dead members removed.

Why: a worker killed with ``kill -9`` leaves its member in the group. Apache Kafka expires it after
the session timeout (10 s here); the embedded broker (noida-db) never does, so a plain restart of a
dynamic member waits forever for a rebalance that cannot complete. Every long-running group consumer
therefore joins with *static membership* (KIP-345) and an id that is the same after a restart with the
same command:

* ``<group>.<host>-<home hash>.slot<N>``: the slot ``N`` is the lowest one whose lock file
  (``HOME/members/<group>/slot<N>.lock``, held with ``flock`` for the process's whole life) is free.
  The kernel drops the lock when a process dies, however it dies, so a restarted worker takes its
  predecessor's slot, joins with the same ``group.instance.id`` and the coordinator hands it the
  partitions at once (no rebalance, no session timeout). Two live processes never share an id: a
  second one takes the next free slot. ``--slot N`` / ``--instance-id X`` pin one; a live holder is
  then an error naming its pid.
* Host and a hash of ``STREAMLEARN_HOME`` are in the id, so workers on other machines (or other
  homes on this one) sharing a Kafka cluster never fence each other.
* Beside each lock a small JSON file records pid, role, instance id and the worker's status (its
  partitions, a stuck warning); ``streamlearn status`` and ``streamlearn offsets show`` read it.
* Consumers of this host set ``client.id = streamlearn-pid<P>-<role>@<host>``, so even a dynamic member
  (an older worker, another tool) can be matched to a local pid.

A member is *dead* when it is of this host and its lock is free (static) or its pid is gone
(dynamic). Dead members are removed with KIP-345 ``RemoveMembersFromConsumerGroup`` (LeaveGroup v3+,
``KafkaAdminClient.remove_group_members``): by a worker at start and when it owns nothing for longer
than the session timeout, and by ``streamlearn offsets reset``. Members of other hosts are never
judged from here. Static members do not leave a group when they close (Kafka's design for rolling
restarts), so a clean stop removes its own member explicitly: the group never keeps a member of a
process that is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from streaming.config import Settings
from streaming.exceptions import GroupActiveError, MemberSlotBusyError
from streaming.fsutil import pid_alive
from streaming.kafka_security import kafka_security

log = logging.getLogger(__name__)

HOST = socket.gethostname()
MAX_SLOTS = 256
_CLIENT_RE = re.compile(r"^streamlearn-pid(\d+)-(.*)@(.+)$")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:200]


def client_id(role: str) -> str:
    """``client.id`` of a consumer of this process: names host and pid, so a member maps to a process."""
    return f"streamlearn-pid{os.getpid()}-{_safe(role)}@{HOST}"


def members_dir(settings: Settings, group: str) -> Path:
    return settings.home / "members" / _safe(group)


def instance_id(settings: Settings, group: str, slot: int) -> str:
    """The static member id of ``slot`` in ``group`` on this host and HOME (stable across restarts)."""
    home = hashlib.sha256(str(settings.home).encode()).hexdigest()[:6]
    return _safe(f"{group}.{HOST}-{home}.slot{slot}")


def _lock_held(path: Path) -> bool:
    """True while some process holds ``path``'s flock (checked without taking it for long)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our own probe lock, if we got it
    return False


def write_status(path: Path, info: dict[str, Any], fields: dict[str, Any]) -> None:
    """Merge ``fields`` into ``info`` and write it to ``path`` by atomic rename (readers never see half a
    file). Status is advisory, for ``streamlearn status``: a full disk must not stop the worker."""
    info.update(fields, updated=time.time())
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(info, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("status %s not written: %s", path, exc)


@dataclass
class Lease:
    """This process's claim on one member slot; the lock lives as long as the file descriptor."""

    settings: Settings
    group: str
    role: str
    instance_id: str
    lock_path: Path
    slot: int | None
    fd: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def info_path(self) -> Path:
        return self.lock_path.with_suffix(".json")

    def set_status(self, **fields: Any) -> None:
        """Merge ``fields`` into this member's JSON (atomic rename: readers never see half a file)."""
        write_status(self.info_path, self.info, fields)

    def leave(self) -> None:
        """Remove this static member from the group (a clean stop: nothing stays behind)."""
        remove_members(self.settings, self.group, [Member("", self.instance_id, "", "", [], os.getpid(),
                                                          True, False)])

    def release(self, leave: bool = True) -> None:
        if self.fd is None:
            return
        if leave:
            try:
                self.leave()
            except Exception as exc:  # best effort: the next start of this slot removes it anyway
                log.info("could not leave group %s as %s: %s", self.group, self.instance_id, exc)
        with contextlib.suppress(OSError):
            self.info_path.unlink()
        os.close(self.fd)  # never unlink the lock file itself: a waiter could lock a stale inode
        self.fd = None


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` without waiting: its descriptor, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock_as_pid(path: Path) -> tuple[int | None, str]:
    """``try_lock`` that writes this process's pid into the lock file: ``(descriptor, "")`` when taken,
    ``(None, "pid N")`` naming the holder when another process has it (one-run-at-a-time locks of an
    input, a stack)."""
    fd = try_lock(path)
    if fd is None:
        try:
            return None, "pid " + (path.read_text(encoding="ascii").strip() or "?")
        except (OSError, UnicodeDecodeError):
            return None, "another process"
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, ""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.with_suffix(".json").read_text())
        return f"pid {info.get('pid')} ({info.get('role')}, {' '.join(info.get('argv', []))[:120]})"
    except (OSError, ValueError):
        return "another process"


def claim(settings: Settings, group: str, role: str, *, slot: int | None = None,
          instance: str | None = None) -> Lease:
    """Lock a member slot of ``group`` for this process: ``instance`` or ``slot`` when given (error if a
    live process holds it), else the lowest free slot. The lease's ``instance_id`` is the static id."""
    directory = members_dir(settings, group)
    if instance is not None:
        path = directory / f"id-{hashlib.sha256(instance.encode()).hexdigest()[:16]}.lock"
        fd = try_lock(path)
        if fd is None:
            raise MemberSlotBusyError(f"instance_id: {instance!r} of group {group!r} is held by {_holder(path)}; "
                                      "stop that process or give another --instance-id")
        chosen: tuple[int | None, int, Path, str] = (None, fd, path, instance)
    elif slot is not None:
        path = directory / f"slot{slot}.lock"
        fd = try_lock(path)
        if fd is None:
            raise MemberSlotBusyError(f"slot: {slot} of group {group!r} is held by {_holder(path)}; stop that "
                                      "process, give another --slot, or leave --slot out to take a free one")
        chosen = (slot, fd, path, instance_id(settings, group, slot))
    else:
        for free in range(MAX_SLOTS):
            path = directory / f"slot{free}.lock"
            fd = try_lock(path)
            if fd is not None:
                chosen = (free, fd, path, instance_id(settings, group, free))
                break
        else:
            raise MemberSlotBusyError(f"group: all {MAX_SLOTS} member slots of {group!r} on this host are held; "
                                      "stop some workers")
    n, fd, path, iid = chosen
    lease = Lease(settings, group, role, iid, path, n, fd)
    lease.set_status(pid=os.getpid(), host=HOST, group=group, role=role, slot=n, instance_id=iid,
                     argv=sys.argv, started=time.time(), partitions=None, warning=None)
    return lease


def local_entries(settings: Settings, group: str | None = None) -> list[dict[str, Any]]:
    """Members recorded under HOME (optionally of one group), each with ``alive`` (its lock is held)."""
    root = settings.home / "members"
    dirs = [members_dir(settings, group)] if group else sorted(p for p in root.glob("*") if p.is_dir())
    out: list[dict[str, Any]] = []
    for d in dirs:
        for info_path in sorted(d.glob("*.json")):
            try:
                info = dict(json.loads(info_path.read_text()))
            except (OSError, ValueError):
                continue
            info["alive"] = _lock_held(info_path.with_suffix(".lock"))
            out.append(info)
    return out


@dataclass(frozen=True)
class Member:
    """One member of a group as the coordinator reports it, with what this host knows about it."""

    member_id: str
    instance_id: str | None
    client_id: str
    client_host: str
    partitions: list[int]
    pid: int | None  # the local process, when the member is of this host
    local: bool
    alive: bool | None  # None: another host's member, not judged from here

    def describe(self) -> str:
        who = self.instance_id or self.member_id
        if not self.local:
            where = f"host {self.client_host or '?'} (client {self.client_id}), liveness unknown from here"
        else:
            where = f"this host, pid {self.pid}, {'ALIVE' if self.alive else 'DEAD'}"
        return f"{who}: partitions {self.partitions} - {where}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _partitions(assignment: Any) -> list[int]:
    """Partition numbers of a decoded member assignment (object or dict form); [] when unknown."""
    parts = getattr(assignment, "assigned_partitions", None)
    if parts is None and isinstance(assignment, dict):
        parts = assignment.get("assigned_partitions")
    out: list[int] = []
    for tp in parts or []:
        ps = tp.get("partitions") if isinstance(tp, dict) else getattr(tp, "partitions", None)
        if ps is None and isinstance(tp, (list, tuple)) and len(tp) == 2:
            ps = tp[1]
        out += [int(p) for p in ps or []]
    return sorted(out)


def describe_group(settings: Settings, group: str) -> tuple[str, list[Member]]:
    """``(state, members)`` of ``group`` (``'Dead'`` and no members when it does not exist)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, bootstrap_timeout_ms=10_000,
                             **kafka_security(settings))
    try:
        info = admin.describe_groups([group])[group]
    finally:
        admin.close()
    registry = {e.get("instance_id"): e for e in local_entries(settings, group)}
    members = []
    for m in info.get("members") or []:
        iid, cid = m.get("group_instance_id"), str(m.get("client_id") or "")
        match = _CLIENT_RE.match(cid)
        pid: int | None = int(match.group(1)) if match else None
        local = bool(match and match.group(3) == HOST)
        alive: bool | None = None
        if iid and iid in registry:  # a slot of this HOME: its lock is the truth
            local, alive, pid = True, bool(registry[iid]["alive"]), registry[iid].get("pid", pid)
        elif local and pid is not None:
            alive = pid_alive(pid)
        members.append(Member(str(m.get("member_id") or ""), iid, cid, str(m.get("client_host") or ""),
                              _partitions(m.get("member_assignment")), pid, local, alive))
    return str(info.get("group_state") or "Dead"), members


def remove_members(settings: Settings, group: str, members: list[Member], timeout_ms: int = 5_000) -> dict[str, str]:
    """KIP-345 RemoveMembersFromConsumerGroup: static members by instance id, dynamic ones by member id."""
    if not members:
        return {}
    from kafka import KafkaAdminClient
    from kafka.admin import MemberToRemove

    targets = [MemberToRemove(group_instance_id=m.instance_id, reason="streamlearn: process is gone")
               if m.instance_id else MemberToRemove(member_id=m.member_id, reason="streamlearn: process is gone")
               for m in members]
    # Bounded: a clean stop while the broker is down must not hang (kafka-python waits 30 s by default).
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, request_timeout_ms=timeout_ms,
                             bootstrap_timeout_ms=timeout_ms, **kafka_security(settings))
    try:
        result = admin.remove_group_members(group, targets)
    finally:
        admin.close()
    return {str(k): v.__name__ for k, v in result.items()}


def remove_dead_local(settings: Settings, group: str, *, quick: bool = False) -> list[Member]:
    """Remove members of ``group`` whose process on this host is gone; returns those removed.

    ``quick`` (a worker's start): ask the broker only when a slot of this HOME was left behind by a dead
    process (its status file outlived it), so a normal start costs no admin round trip; dynamic phantoms
    of other tools are still caught by :class:`StuckWatch` after the session timeout."""
    if quick and all(e["alive"] for e in local_entries(settings, group)):
        return []
    _state, members = describe_group(settings, group)
    dead = [m for m in members if m.local and m.alive is False]
    if dead:
        result = remove_members(settings, group, dead)
        log.warning("removed %d dead member(s) of this host from group %s: %s (%s)", len(dead), group,
                    "; ".join(m.describe() for m in dead), result)
    return dead


def clear_for_reset(settings: Settings, group: str, timeout_s: float = 15.0) -> list[Member]:
    """Make ``group`` memberless for an offset reset: remove dead members of this host, refuse (naming
    them) while a live local process or any member of another host remains. Returns those removed."""
    state, members = describe_group(settings, group)
    live = [m for m in members if not (m.local and m.alive is False)]
    if live:
        raise GroupActiveError(
            f"group: {group!r} is {state} with {len(live)} active member(s): "
            + "; ".join(m.describe() for m in live)
            + ". Stop those workers (e.g. `kill <pid>` for this host's) and retry once the group is Empty")
    removed = [m for m in members if m.local and m.alive is False]
    if removed:
        remove_members(settings, group, removed)
    deadline = time.monotonic() + timeout_s
    while True:  # the coordinator completes the removal asynchronously
        state, members = describe_group(settings, group)
        if not members:
            return removed
        if time.monotonic() > deadline:
            raise GroupActiveError(f"group: {group!r} still has {len(members)} member(s) after removing the dead "
                                   f"ones ({state}): " + "; ".join(m.describe() for m in members))
        time.sleep(0.2)  # bounded poll for the coordinator's state change


class StuckWatch:
    """Says once, loudly, when a group member has owned no partition for longer than the session timeout.

    Why: a worker in a group that cannot rebalance (a phantom member on a broker that never expires
    it, a duplicate worker) otherwise looks healthy and does nothing. On the first check past the
    timeout it describes the group, removes dead members of this host (the likely cause, and safe),
    logs ONE WARNING naming the group state, the members and what to do, and records the warning in
    the member's status file for ``streamlearn status``. Owning partitions again clears it.
    """

    def __init__(self, settings: Settings, group: str, topic: str, lease: Lease | None, what: str,
                 timeout_s: float = 10.0) -> None:
        self.settings, self.group, self.topic, self.lease, self.what = settings, group, topic, lease, what
        self.timeout_s = timeout_s
        self.since: float | None = time.monotonic()
        self.warning: str | None = None
        self._owned: list[int] | None = None

    def observe(self, owned: set[Any]) -> None:
        parts = sorted(int(tp.partition) for tp in owned)
        if parts != self._owned:
            self._owned = parts
            if self.lease is not None:
                self.lease.set_status(partitions=parts, warning=None if parts else self.warning)
        if parts:
            if self.warning is not None:
                log.info("%s owns partitions %s of %s again", self.what, parts, self.topic)
                self.warning = None
            self.since = None
            return
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif self.warning is None and now - self.since > self.timeout_s:
            self.warning = self.diagnose(now - self.since)
            log.warning("%s", self.warning)
            if self.lease is not None:
                self.lease.set_status(warning=self.warning)

    def diagnose(self, idle_s: float) -> str:
        head = (f"{self.what} has owned no partition of {self.topic} for {idle_s:.0f} s (session timeout "
                f"{self.timeout_s:.0f} s): ")
        try:
            state, members = describe_group(self.settings, self.group)
            dead = [m for m in members if m.local and m.alive is False]
            if dead:
                remove_members(self.settings, self.group, dead)
        except Exception as exc:  # the warning must still be said when the broker is unreachable
            return head + f"could not describe group {self.group!r} ({exc}); check the broker (`streamlearn status`)"
        listed = "; ".join(m.describe() for m in members) or "none"
        text = head + f"group {self.group} is {state} with {len(members)} member(s): {listed}. "
        if dead:
            return text + (f"Removed {len(dead)} dead member(s) of this host; the group should rebalance now. "
                           "If it does not, run `streamlearn offsets show` for this group.")
        return text + ("What to do: `streamlearn offsets show` for this group lists members and pids; stop a "
                       "duplicate worker, or when a member of another host is dead wait for its session timeout "
                       "(Apache Kafka) or, on the embedded broker, stop every worker of the group and run "
                       "`streamlearn offsets reset` / `streamlearn broker stop && streamlearn broker start`. "
                       "A group with more members than partitions keeps the extra ones idle by design.")
