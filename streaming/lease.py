"""One trainer leader per model: a lease object (owner, expiry, fencing epoch) plus a registry fence.

Why a lease and not a consumer group: the embedded broker (noida-db) never expires a dead group
member, so a group-based election would not fail over after ``kill -9``; a Kafka transactional id
fences producers, not writes to the model registry. The lease needs only what every store offers,
local directory or object storage alike:

* **one small object** per model (``<model_dir>/<name>/leader.json``), written only by
  *atomic create-if-absent* and *compare-and-replace* (:class:`LeaseStore`; a local file here,
  an S3/GCS conditional put over fsspec elsewhere);
* a **fencing epoch**: every takeover writes ``epoch + 1``. Compare-and-replace makes the epoch
  unique: two candidates that both saw the old record race on one replace, and only one wins.

Liveness comes from the expiry: the holder renews every ``ttl / 3``; a standby polls every
``ttl / 3`` and takes over a record whose ``expires_at_ms`` has passed. Safety does not depend on
clocks: the new leader first *claims* its epoch in the model's registry state
(:meth:`streaming.model_registry.ModelRegistry.claim_leadership`), and every registry write of a
trainer carries its epoch (``fence=``) and is refused with :class:`FencedError` once a newer epoch
was claimed. A stale leader that wakes up after its lease expired (GC pause, SIGSTOP, a partition)
therefore cannot publish, promote or reject anything. See docs/LEADER.md for the failover bound.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from streaming.clock import now_ms
from streaming.exceptions import LeaseError
from streaming.fsutil import pid_alive
from streaming.objstore_local import LocalObjectStore

log = logging.getLogger(__name__)

LEASE_FILE = "leader.json"


@dataclass(frozen=True)
class LeaseRecord:
    """The content of the lease object."""

    model: str
    owner: str
    epoch: int
    expires_at_ms: int
    renewed_at_ms: int
    ttl_s: float
    host: str = ""
    pid: int = 0

    def expired(self, now: int) -> bool:
        return now >= self.expires_at_ms

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes, where: str) -> LeaseRecord:
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(model=str(raw["model"]), owner=str(raw["owner"]), epoch=int(raw["epoch"]),
                       expires_at_ms=int(raw["expires_at_ms"]), renewed_at_ms=int(raw["renewed_at_ms"]),
                       ttl_s=float(raw["ttl_s"]), host=str(raw.get("host", "")), pid=int(raw.get("pid", 0)))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise LeaseError(
                f"lease: {where} is not a valid lease record ({exc}); stop every trainer of the model, "
                "delete the file and start them again (the registry keeps the fencing epoch)"
            ) from exc


class LeaseStore(Protocol):
    """The seam to the storage: one object, atomic create and compare-and-replace.

    ``read`` returns the object's bytes and an opaque token (an ETag/generation on object storage,
    a content hash here), or ``(None, None)`` when it does not exist. ``create`` writes only if the
    object does not exist; ``replace`` only if its token is still ``token``. Both return False when
    the condition fails (someone else wrote first) and raise on I/O errors.
    """

    where: str

    def read(self) -> tuple[bytes | None, str | None]: ...

    def create(self, data: bytes) -> bool: ...

    def replace(self, data: bytes, token: str) -> bool: ...


def host_id() -> str:
    """This host and pid namespace: a pid in a lease record is only checkable where both match.

    Two containers may share a host name (``network_mode: host``) but never a pid namespace inode.
    """
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}:{ns}"


def new_owner_id() -> str:
    """A process-unique owner id: host, pid and randomness (a restarted pid never matches)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class Lease:
    """One candidate's view of a model's lease: acquire, renew, release.

    ``epoch`` is the epoch this candidate holds (None when it holds none). ``valid()`` is the local
    view: True until ``ttl_s - margin_s`` after the start of the last successful write, measured on
    the monotonic clock, so a paused holder stops trusting itself before others may take over (the
    registry fence is what makes a holder that does not notice harmless).
    """

    def __init__(self, store: LeaseStore, model: str, *, ttl_s: float, owner: str | None = None,
                 clock: Callable[[], int] = now_ms, monotonic: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise LeaseError(f"ttl_s: the lease must last more than 0 s (got {ttl_s}); set leader_lease_s")
        self.store = store
        self.model = model
        self.ttl_s = float(ttl_s)
        self.margin_s = min(1.0, self.ttl_s / 10)
        self.owner = owner or new_owner_id()
        self._clock = clock
        self._monotonic = monotonic
        self.epoch: int | None = None
        self._valid_until = 0.0

    def current(self) -> LeaseRecord | None:
        """The lease record as stored (None when no trainer ever held the lease)."""
        data, _ = self.store.read()
        return None if data is None else LeaseRecord.decode(data, self.store.where)

    def _record(self, epoch: int, now: int) -> LeaseRecord:
        return LeaseRecord(self.model, self.owner, epoch, now + int(self.ttl_s * 1000), now, self.ttl_s,
                           host_id(), os.getpid())

    def _write(self, epoch: int, token: str | None) -> bool:
        started = self._monotonic()
        record = self._record(epoch, self._clock())
        done = self.store.create(record.encode()) if token is None else self.store.replace(record.encode(), token)
        if done:
            self.epoch = epoch
            self._valid_until = started + self.ttl_s - self.margin_s
        return done

    def try_acquire(self, floor: int = 0) -> int | None:
        """Hold the lease after this call (renew, create or take over an expired one); the epoch or None.

        ``floor``: the newest epoch known elsewhere (the registry's claimed one), so a deleted lease
        object never restarts the epochs below what the fence already accepted.
        """
        data, token = self.store.read()
        if data is None:
            return self.epoch if self._write(max(0, floor) + 1, None) else None
        rec = LeaseRecord.decode(data, self.store.where)
        if rec.owner == self.owner:  # still ours (also after our local validity ran out): nobody took over
            return self.epoch if self._write(rec.epoch, token) else None
        self.epoch = None
        if not rec.expired(self._clock()) and not self._holder_dead(rec):
            return None
        assert token is not None
        return self.epoch if self._write(max(rec.epoch, floor) + 1, token) else None

    @staticmethod
    def _holder_dead(rec: LeaseRecord) -> bool:
        """The holder ran in this host's pid namespace and its process is gone (``kill -9``, a crash).

        Then waiting for the expiry gains nothing: a trainer restarted with the same command leads
        again at once. Across hosts only the expiry tells. A reused pid reads as alive: we just wait.
        """
        return rec.host == host_id() and rec.pid > 0 and rec.pid != os.getpid() and not pid_alive(rec.pid)

    def renew(self) -> bool:
        """Extend the lease this candidate holds; False (and ``epoch`` None) when it was taken over."""
        if self.epoch is None:
            return False
        data, token = self.store.read()
        rec = None if data is None else LeaseRecord.decode(data, self.store.where)
        if rec is None or rec.owner != self.owner or rec.epoch != self.epoch:
            log.warning("lease of %s: lost to %s (epoch %s); this process is a standby now", self.model,
                        rec.owner if rec else "nobody", rec.epoch if rec else "-")
            self.epoch = None
            return False
        assert token is not None
        if not self._write(rec.epoch, token):
            self.epoch = None
            return False
        return True

    def valid(self) -> bool:
        return self.epoch is not None and self._monotonic() < self._valid_until

    def release(self) -> None:
        """Give the lease up (expiry now) so a standby takes over at its next poll, not after the ttl."""
        if self.epoch is None:
            return
        data, token = self.store.read()
        if data is not None and token is not None:
            rec = LeaseRecord.decode(data, self.store.where)
            if rec.owner == self.owner and rec.epoch == self.epoch:
                now = self._clock()
                gone = LeaseRecord(self.model, self.owner, rec.epoch, now, now, self.ttl_s, rec.host, rec.pid)
                self.store.replace(gone.encode(), token)
        self.epoch = None


class LeaseKeeper:
    """A daemon thread that keeps trying to hold a model's lease and renews it while held.

    ``epoch()`` is what the trainer asks before each step: the epoch while the lease is held and
    locally valid, None on a standby. The thread renews (holder) or polls (standby) every
    ``ttl / 3``: a holder gets two more tries before its lease can expire, and a standby takes
    over at most ``ttl / 3`` after the expiry, so failover after a crash takes at most
    ``4/3 x ttl`` plus the clock skew between hosts (docs/LEADER.md).
    """

    def __init__(self, lease: Lease, *, floor: Callable[[], int] | None = None,
                 interval_s: float | None = None) -> None:
        self.lease = lease
        self.floor = floor or (lambda: 0)
        self.interval_s = interval_s if interval_s is not None else lease.ttl_s / 3
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> int | None:
        """One renewal or acquisition attempt (the thread's body; tests call it directly)."""
        with self._lock:
            try:
                if self.lease.epoch is not None and self.lease.renew():
                    return self.lease.epoch
                epoch = self.lease.try_acquire(self.floor())
            except (OSError, LeaseError) as exc:  # the store is unreachable: the local validity runs out
                log.warning("lease of %s: %s", self.lease.model, exc)
                return self.lease.epoch if self.lease.valid() else None
            if epoch is not None:
                log.info("lease of %s: held by %s with epoch %d", self.lease.model, self.lease.owner, epoch)
            return epoch

    def epoch(self) -> int | None:
        return self.lease.epoch if self.lease.valid() else None

    def start(self) -> LeaseKeeper:
        self.step()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.lease.model}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # an error step() does not know: the thread must outlive it, or this process
                # could never lead again (the lease runs out on its own; a later step retries)
                log.exception("lease of %s: renewal failed; retrying in %.1f s", self.lease.model, self.interval_s)

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval_s * 2))
        if release:
            with self._lock:
                try:
                    self.lease.release()
                except (OSError, LeaseError) as exc:
                    log.warning("lease of %s: not released (%s); it expires after %.0f s", self.lease.model,
                                exc, self.lease.ttl_s)


class ObjectLeaseStore:
    """:class:`LeaseStore` over an object store with conditional puts (S3 ``If-None-Match``/``If-Match``,
    GCS generations): any object with ``get_versioned(key) -> (bytes, token) | None``,
    ``create(key, data) -> bool`` and ``replace_if(key, data, token) -> bool``.
    """

    def __init__(self, objects: Any, key: str) -> None:
        self.objects = objects
        self.key = key
        self.where = f"{getattr(objects, 'url', 'object store')}/{key}"

    def read(self) -> tuple[bytes | None, str | None]:
        current = self.objects.get_versioned(self.key)
        return (None, None) if current is None else (bytes(current[0]), str(current[1]))

    def create(self, data: bytes) -> bool:
        return bool(self.objects.create(self.key, data))

    def replace(self, data: bytes, token: str) -> bool:
        return bool(self.objects.replace_if(self.key, data, token))


class FileLeaseStore(ObjectLeaseStore):
    """:class:`LeaseStore` on a local (or single-host shared) file system: the object lease over a
    :class:`~streaming.objstore_local.LocalObjectStore` of the file's directory.

    create: a fully written temp file is hard-linked to the name (``link`` fails if it exists);
    replace: under an ``flock`` the token (sha256 of the content) is compared, then the file is renamed
    over. The kernel drops the flock of a killed process, so a crash never wedges the lease.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        super().__init__(LocalObjectStore(self.path.parent), self.path.name)
        self.where = str(self.path)


def lease_store(registry: Any, name: str) -> LeaseStore:
    """The lease object of model ``name`` beside its versions (the one place that chooses the store).

    ``registry``: a :class:`streaming.model_registry.ModelRegistry`. One on object storage (it has an
    ``objects`` store) keeps the lease as the object ``<name>/leader.json`` there, so trainers on
    different hosts elect one leader; a local one uses the file ``<model_dir>/<name>/leader.json``.
    """
    objects = getattr(registry, "objects", None)
    if objects is not None:
        return ObjectLeaseStore(objects, f"{name}/{LEASE_FILE}")
    return FileLeaseStore(registry.model_dir(name) / LEASE_FILE)


def live_holder(registry: Any, name: str) -> LeaseRecord | None:
    """The record of a trainer that leads ``name`` now (unexpired, its process not known dead), else None.

    Why: a one-off run (`train --once`, the control API's /trainModel) beside a periodic leader can only
    end with "another trainer leads this model"; asked up front, the caller says so before starting one.
    A damaged record reads as no holder: the run itself then reports it.
    """
    try:
        data, _ = lease_store(registry, name).read()
        rec = None if data is None else LeaseRecord.decode(data, name)
    except (LeaseError, OSError):
        return None
    if rec is None or rec.expired(now_ms()) or Lease._holder_dead(rec):
        return None
    return rec


def describe(record: LeaseRecord | None, now: int | None = None) -> dict[str, Any]:
    """The lease for status output: owner, epoch and seconds until it expires (negative: expired)."""
    if record is None:
        return {"held": False}
    now = now_ms() if now is None else now
    return {"held": not record.expired(now), "owner": record.owner, "epoch": record.epoch,
            "host": record.host, "pid": record.pid, "expires_in_s": round((record.expires_at_ms - now) / 1000, 3)}
