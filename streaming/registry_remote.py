"""The model registry on object storage (``s3://bucket/models``): what ``ModelRegistry(url)`` returns.

Layout under the URL (keys; same names as the local tree, so TF Serving's layout is kept)::

    <name>/<version>/saved_model.pb, variables/..., keras/...   uploaded first
    <name>/<version>/metadata.json   published last, create-if-absent: the version exists iff it exists
    <name>/<version>/.claim          create-if-absent claim of the version number (before the upload)
    <name>/state.json                promoted version, stack, history: compare-and-swap (If-Match)
    <name>/.lock                     writer lease {"owner", "expires_at_ms"}: replaces the local flock

Why: an object store has no rename and no flock, so the local protocol (export into a staging
directory, ``os.rename`` it to ``<version>``, writers serialised by ``flock``) becomes
(1) a version number claimed with create-if-absent, (2) the files uploaded, (3) ``metadata.json``
(sha256 of every file + its own digest) put last and only if absent, (4) under a writer lease
(create-if-absent / compare-and-swap on ``.lock``, expiring on its own if the holder dies) the
``CREATED`` entry appended to ``state.json``, replaced only if nobody changed it since it was read.
The lease is held for state updates only (never during an upload). Lease expiry compares the
writers' wall clocks: hosts must be NTP-synchronised to well under :data:`LEASE_S`. A reader lists
``<version>/metadata.json`` keys only, so it never sees a half-uploaded version; a claim without
metadata is a crashed publish; :meth:`RemoteModelRegistry.clean_staging` collects its objects
after a grace period.

TensorFlow loads from local directories, so :meth:`version_dir` materialises a version into a local
cache (``cache_dir``) and :meth:`verify` re-downloads it and checks every file against the sha256
manifest (a torn or tampered object fails with :class:`ModelIntegrityError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming.clock import now_ms
from streaming.exceptions import ModelIntegrityError, ModelNotFoundError, ModelRegistryError, ObjectNotFoundError
from streaming.model_registry import (
    METADATA_FILE,
    STAGING_PREFIX,
    STATE_FILE,
    ModelRegistry,
    parse_metadata,
    parse_state,
    sha256_file,
    version_metadata,
)
from streaming.objstore import ObjectStore, open_store

LOCK_FILE = ".lock"
CLAIM_FILE = ".claim"
#: A writer lease lasts this long unless renewed; a dead holder blocks others at most this long.
LEASE_S = 60.0
#: How long a writer waits for another's lease before giving up with a clear error.
LOCK_WAIT_S = 120.0
#: A claimed version without metadata older than this is a crashed publish (collectable).
CLAIM_GRACE_S = 900.0


def default_cache_dir(url: str) -> Path:
    """A per-URL local cache (TensorFlow loads SavedModels from local directories)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"streamlearn-registry-{os.getuid()}" / digest


class RemoteModelRegistry(ModelRegistry):
    """:class:`ModelRegistry` on an object store; the local cache is its ``root``."""

    def __init__(self, root: Path | str, storage_options: dict[str, Any] | None = None,
                 cache_dir: Path | None = None) -> None:
        self.url = str(root).rstrip("/")
        self.objects: ObjectStore = open_store(self.url, storage_options)
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.url)
        self._state_tokens: dict[str, str | None] = {}
        self._owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}"

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        found = []
        for name in self.objects.names(""):
            with contextlib.suppress(ModelRegistryError):
                self.model_dir(name)
                found.append(name)
        if not found and not self.objects.container_exists():
            # a typo'd bucket listed as an empty registry: `models list` printed nothing and exited 0
            raise ModelRegistryError(f"model registry {self.url}: its bucket does not exist; check "
                                     "STREAMLEARN_MODEL_DIR (or create the bucket)")
        return sorted(found)

    def versions(self, name: str) -> list[int]:
        """Published versions: those whose ``metadata.json`` exists (never a half upload)."""
        self.model_dir(name)
        out = set()
        for key in self.objects.list_keys(name):  # one paged listing, not a request per version
            parts = key.split("/")
            if len(parts) == 3 and parts[1].isdigit() and parts[2] == METADATA_FILE:
                out.add(int(parts[1]))
        return sorted(out)

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        self.model_dir(name)
        key = f"{name}/{int(version)}/{METADATA_FILE}"
        try:
            data = self.objects.get(key)
        except ObjectNotFoundError as exc:
            raise ModelNotFoundError(f"version: model {name!r} has no version {version} in {self.url}; "
                                     f"existing versions: {self.versions(name)}") from exc
        return parse_metadata(data, f"{self.url}/{key}")

    def version_dir(self, name: str, version: int) -> Path:
        """A local, complete copy of the version (downloaded once into the cache)."""
        path = self.model_dir(name) / str(int(version))
        if path.is_dir():
            return path
        return self._materialize(name, int(version))

    def _materialize(self, name: str, version: int) -> Path:
        meta = self.metadata(name, version)  # raises ModelNotFoundError before any download
        prefix = f"{name}/{version}/"
        mdir = self.model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        tmp = mdir / f"{STAGING_PREFIX}{os.getpid()}-dl-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            for key in self.objects.list_keys(prefix.rstrip("/")):
                rel = key[len(prefix):]
                if not rel or rel == CLAIM_FILE:
                    continue
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.objects.get_file(key, dest)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
            final = mdir / str(version)
            if final.exists():  # a refresh: swap the old copy out in one rename, then delete it
                trash = mdir / f".trash-{version}-{secrets.token_hex(4)}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def verify(self, name: str, version: int) -> dict[str, Any]:
        """Download the version afresh and check it (every file against its sha256, no extra
        files, metadata digest against state.json); raises :class:`ModelIntegrityError`."""
        self._materialize(name, int(version))
        return super().verify(name, version)

    def state(self, name: str) -> dict[str, Any]:
        self.model_dir(name)
        current = self.objects.get_versioned(f"{name}/{STATE_FILE}")
        self._state_tokens[name] = current[1] if current is not None else None
        return parse_state(current[0] if current is not None else None, f"{self.url}/{name}/{STATE_FILE}", name)

    # ------------------------------------------------------------------ writing
    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        body = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        token = self._state_tokens.get(name)
        if not self.objects.replace_if(f"{name}/{STATE_FILE}", body, token):
            raise ModelRegistryError(
                f"name: state.json of {name!r} in {self.url} changed while this writer held the lease (it "
                "expired?); nothing was overwritten; retry the operation")
        current = self.objects.get_versioned(f"{name}/{STATE_FILE}")
        self._state_tokens[name] = current[1] if current is not None else None

    def _refresh_serving_config(self) -> None:
        """TF Serving's models.config is a local file next to a local registry; on object storage
        serving workers follow state.json themselves, so there is nothing to rewrite."""

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """The writer lease ``<name>/.lock``: taken with create-if-absent, or compare-and-swap
        over an expired one; released by writing it expired (compare-and-swap, so a lease another
        writer took over after ours expired is left alone)."""
        key = f"{name}/{LOCK_FILE}"
        deadline = time.monotonic() + LOCK_WAIT_S
        token = self._acquire(key, deadline, name)
        try:
            yield
        finally:
            released = json.dumps({"owner": self._owner, "expires_at_ms": 0}).encode()
            with contextlib.suppress(ModelRegistryError, OSError):
                self.objects.replace_if(key, released, token)

    def _acquire(self, key: str, deadline: float, name: str) -> str:
        body = json.dumps({"owner": self._owner, "expires_at_ms": now_ms() + int(LEASE_S * 1000)}).encode()
        while True:
            current = self.objects.get_versioned(key)
            if current is None:
                taken = self.objects.create(key, body)
            else:
                try:
                    lease = json.loads(current[0])
                    expired = int(lease.get("expires_at_ms", 0)) <= now_ms()
                except (ValueError, TypeError, AttributeError):
                    expired = True  # an unreadable lease protects nothing
                taken = expired and self.objects.replace_if(key, body, current[1])
            if taken:
                mine = self.objects.get_versioned(key)
                if mine is not None and mine[0] == body:
                    return mine[1]
            if time.monotonic() > deadline:
                raise ModelRegistryError(
                    f"name: another writer holds the lease {self.url}/{key} of {name!r}; it expires on its own "
                    f"within {LEASE_S:.0f} s of its holder's death; retry later")
            time.sleep(0.05 + secrets.randbelow(100) / 1000)  # bounded back-off between two polls of the lease

    def clean_staging(self, name: str) -> list[Path]:
        """Local staging left by dead writers, plus remote claims whose publish never finished
        (older than :data:`CLAIM_GRACE_S`): their uploaded objects are deleted."""
        removed = super().clean_staging(name)
        now = time.time()
        for entry in self.objects.names(name):
            claim = f"{name}/{entry}/{CLAIM_FILE}"
            if not entry.isdigit() or self.objects.exists(f"{name}/{entry}/{METADATA_FILE}"):
                continue
            try:
                if now - self.objects.modified_s(claim) < CLAIM_GRACE_S:
                    continue
            except ObjectNotFoundError:
                continue
            for key in self.objects.list_keys(f"{name}/{entry}"):
                if key != claim:
                    self.objects.delete(key)
            removed.append(Path(f"{name}/{entry}"))
        return removed

    def publish(self, name: str, staging_dir: Path | str, metadata: dict[str, Any], *,
                fence: int | None = None) -> int:
        """Upload a filled staging directory as the next version; metadata.json last.

        ``fence``: the trainer's leader epoch (streaming/lease.py); checked before a number is claimed
        and again in the state update, so a stale leader neither uploads nor records a version."""
        self._check_fence(name, self.state(name), fence)
        staging = Path(staging_dir).absolute()
        if not staging.is_dir():
            raise ModelRegistryError(f"staging_dir: {staging} is not a directory; export the model into it first")
        if not (staging / "saved_model.pb").is_file() or not (staging / "variables").is_dir():
            raise ModelIntegrityError(
                f"staging_dir: {staging} lacks saved_model.pb or variables/; export with tf.saved_model.save")
        (staging / METADATA_FILE).unlink(missing_ok=True)
        files = {p.relative_to(staging).as_posix(): p for p in sorted(staging.rglob("*")) if p.is_file()}
        manifest = {rel: sha256_file(p) for rel, p in files.items()}
        # The number is claimed with create-if-absent (no lease needed: two writers can never claim
        # the same one) and the upload runs outside the lease, which is held only for the short
        # state.json update: a slow upload never outlives a lease another writer then steals.
        version = max([int(self.state(name)["last_version"]), *self.versions(name)]) + 1
        while not self.objects.create(f"{name}/{version}/{CLAIM_FILE}", self._owner.encode()):
            version += 1  # another writer, or a crashed publish, holds that number
        meta = version_metadata(metadata, name, version, manifest)
        body = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        for rel, path in files.items():  # data first (streamed), metadata.json last and only if absent
            self.objects.put_file(f"{name}/{version}/{rel}", path)
        if not self.objects.create(f"{name}/{version}/{METADATA_FILE}", body):
            raise ModelRegistryError(f"version: {name}/{version} already has a metadata.json although this "
                                     "writer claimed the number; the registry was edited by hand; retry")
        with self._locked(name):
            state = self.state(name)
            state["last_version"] = max(int(state["last_version"]), version)
            self._check_fence(name, state, fence)
            self._append(state, "CREATED", version, str(meta.get("reason") or "exported"),
                         metadata_sha256=meta["metadata_sha256"], epoch=fence)
            self._write_state(name, state)
        with contextlib.suppress(OSError):  # the cache copy is the staging directory itself
            (staging / METADATA_FILE).write_text(body.decode("utf-8"), "utf-8")
            final = self.model_dir(name) / str(version)
            if staging.parent == self.model_dir(name).absolute() and not final.exists():
                os.rename(staging, final)
        return version

    def _delete_version(self, name: str, version: int) -> None:
        """A version stops existing when its metadata.json is deleted (first), then its other
        objects and its cached copy go."""
        self.objects.delete(f"{name}/{version}/{METADATA_FILE}")
        for key in self.objects.list_keys(f"{name}/{version}"):
            self.objects.delete(key)
        shutil.rmtree(self.model_dir(name) / str(version), ignore_errors=True)

    def _deleted_durable(self, name: str) -> None:
        """Nothing to sync: each delete is done when the object store answers."""
