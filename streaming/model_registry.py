"""The on-disk model registry: versioned SavedModels written by the trainer, read by serving.

Layout (TF Serving compatible, so a stock ``tensorflow_model_server`` can serve the same tree)::

    <root>/<name>/<version>/saved_model.pb
    <root>/<name>/<version>/variables/...
    <root>/<name>/<version>/metadata.json     # lineage, scores, gate decision, sha256 manifest
    <root>/<name>/state.json                  # promoted version, promotion stack, history
    <root>/<name>/.tmp-<pid>-<rand>/          # staging exports (never visible as a version)
    <root>/<name>/.lock                       # flock serialising writers

Why it is built this way:

* A version appears atomically: the trainer exports into a staging directory on the same file
  system, :meth:`ModelRegistry.publish` writes ``metadata.json`` (with the sha256 of every file)
  into it, fsyncs files and directories and then ``os.rename``\\ s it to ``<version>``. A crash at
  any point leaves either no version or a complete one; a reader listing numeric directories
  therefore never sees a half-written model.
* ``state.json`` is replaced with write-temp + fsync + rename, so concurrent readers (serving)
  see the old or the new state, never a torn one.
* Writers (trainer, ``streamlearn models promote``) serialise through an ``flock`` on
  ``.lock``; readers take no lock.
* Version numbers are never reused, even after retention deleted the newest ones, because
  ``state.json`` remembers the highest number ever allocated.
* One trainer leader per model (docs/LEADER.md): ``state.json`` keeps ``leader_epoch``, the newest
  epoch a lease holder claimed (:meth:`ModelRegistry.claim_leadership`); a write given ``fence=``
  an older epoch is refused with :class:`FencedError` in the same locked read-modify-write of
  ``state.json`` that allocates the version, so a stale leader can never publish or decide.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming.clock import now_ms
from streaming.config import MODEL_NAME_RE
from streaming.exceptions import (  # noqa: F401 (re-exported)
    FencedError,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistryError,
    StreamingError,
)
from streaming.fsutil import fsync_dir, pid_alive, write_json_atomic
from streaming.registry_integrity import (  # re-exported: registry_remote and tests import them here
    METADATA_FILE,
    RegistryIntegrityMixin,
    fsync_tree,
    metadata_digest,  # noqa: F401 (re-exported for tests)
    sha256_file,
    version_metadata,
)
from streaming.registry_leader import RegistryLeaderMixin
from streaming.tf_serving import refresh_quietly

STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
STATE_FILE = "state.json"


class ModelRegistry(RegistryIntegrityMixin, RegistryLeaderMixin):
    """Reader and writer of ``<root>/<name>/...``; safe to use from several processes at once.

    A root that is an object-storage URL (``s3://bucket/models``) gives a
    :class:`streaming.registry_remote.RemoteModelRegistry` (same API; docs/STORE.md).
    """

    def __new__(cls, root: Path | str, *args: Any, **kwargs: Any) -> ModelRegistry:
        from streaming.objstore import is_remote

        if cls is ModelRegistry and is_remote(root):
            from streaming.registry_remote import RemoteModelRegistry

            return super().__new__(RemoteModelRegistry)
        return super().__new__(cls)

    def __init__(self, root: Path | str, storage_options: dict[str, Any] | None = None,
                 cache_dir: Path | None = None) -> None:
        from streaming.objstore import ObjectStore, local_path, open_store

        self.root = local_path(root)
        self.url = str(root)
        #: Small objects beside the versions (e.g. a trainer lease: ``create`` / ``replace_if``), keyed
        #: ``<name>/<file>``; the same API on object storage (streaming/objstore.py).
        self.objects: ObjectStore = open_store(self.root)

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        """Replace the model's state.json (the seam object storage overrides with compare-and-swap)."""
        write_json_atomic(self._state_path(name), state)

    def _refresh_serving_config(self) -> None:
        refresh_quietly(self)  # TF Serving's models.config follows every promotion

    # ------------------------------------------------------------------ paths
    def model_dir(self, name: str) -> Path:
        """Directory of model ``name``; the name is checked so it cannot escape the root."""
        if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
            raise ModelRegistryError(
                f"name: {name!r} is not a valid model name; use letters, digits, '_', '-', '.' "
                "(starting with a letter or digit)"
            )
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        """Directory of an existing version; raises ModelNotFoundError when it does not exist."""
        path = self.model_dir(name) / str(int(version))
        if not path.is_dir():
            raise ModelNotFoundError(
                f"version: model {name!r} has no version {version} under {self.root}; "
                f"existing versions: {self.versions(name)}"
            )
        return path

    def names(self) -> list[str]:
        """Every model that has a directory in the registry."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and MODEL_NAME_RE.match(p.name))

    def versions(self, name: str) -> list[int]:
        """Published versions, ascending. Staging and trash directories are never listed."""
        mdir = self.model_dir(name)
        if not mdir.is_dir():
            return []
        # ASCII digits, no leading zero: "²" and "١" are str.isdigit() (int("²") raised), a hand copy "01"
        # of version 1 listed it twice
        return sorted(int(p.name) for p in mdir.iterdir() if _VERSION_DIR.match(p.name) and p.is_dir())

    def latest(self, name: str) -> int | None:
        found = self.versions(name)
        return found[-1] if found else None

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        path = self.version_dir(name, version) / METADATA_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            msg = f"version: {path} is missing; the version is damaged, delete it"
            raise ModelIntegrityError(msg) from exc
        return parse_metadata(raw, path)

    # ------------------------------------------------------------------ state
    def _state_path(self, name: str) -> Path:
        return self.model_dir(name) / STATE_FILE

    def state(self, name: str) -> dict[str, Any]:
        """The model's state.json (promoted version, promotion stack, history); empty state if none."""
        path = self._state_path(name)
        try:
            raw: bytes | None = path.read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            raise ModelRegistryError(_state_damaged(path, name, f"{type(exc).__name__}: {exc}")) from None
        return parse_state(raw, path, name)

    def promoted(self, name: str) -> int | None:
        """The version serving should answer with, or None before the first promotion."""
        value = self.state(name)["promoted"]
        return int(value) if value is not None else None

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every recorded action (CREATED/PROMOTED/REJECTED/ROLLED_BACK/DELETED), oldest first."""
        return list(self.state(name)["history"])

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """Exclusive writer lock of one model (flock: released by the kernel if the holder dies)."""
        mdir = self.model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        with (mdir / ".lock").open("a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _append(self, state: dict[str, Any], action: str, version: int, reason: str, **extra: Any) -> None:
        entry = {"action": action, "version": int(version), "reason": reason, "at_ms": now_ms()}
        entry.update({k: v for k, v in extra.items() if v is not None})
        state["history"].append(entry)

    def record(self, name: str, version: int, action: str, reason: str, *, fence: int | None = None,
               **extra: Any) -> None:
        """Append a decision (e.g. REJECTED with both scores) to the model's history."""
        with self._locked(name):
            state = self.state(name)
            self._check_fence(name, state, fence)
            self._append(state, action, version, reason, **extra)
            self._write_state(name, state)

    # ------------------------------------------------------------------ writing
    def staging(self, name: str) -> Path:
        """A fresh staging directory on the registry's file system for an export to fill.

        Its name carries the writer's pid, so :meth:`clean_staging` can tell an abandoned export
        (writer killed) from one in progress.
        """
        mdir = self.model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        path = mdir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        return path

    def clean_staging(self, name: str) -> list[Path]:
        """Remove staging and trash directories left by dead writers; returns what was removed."""
        mdir = self.model_dir(name)
        removed: list[Path] = []
        if not mdir.is_dir():
            return removed
        for path in mdir.iterdir():
            if path.name.startswith(TRASH_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif path.name.startswith(STAGING_PREFIX):
                pid_text = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
                pid = int(pid_text) if pid_text.isdigit() else -1
                if pid == os.getpid() or (pid > 0 and pid_alive(pid)):
                    continue  # an export in progress
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def publish(self, name: str, staging_dir: Path | str, metadata: dict[str, Any], *,
                fence: int | None = None) -> int:
        """Turn a filled staging directory into the next version, atomically; returns the version.

        ``staging_dir`` should come from :meth:`staging` (same file system, so the final step is a
        rename); a directory elsewhere is first copied into one. The registry adds ``version``,
        ``created_at`` (if absent) and ``manifest`` (sha256 of every file) to ``metadata``.
        ``fence``: the publishing leader's epoch; refused with FencedError unless it is the newest.
        """
        mdir = self.model_dir(name)
        staging = Path(staging_dir).absolute()
        if not staging.is_dir():
            raise ModelRegistryError(
                f"staging_dir: {staging} is not a directory; export the model into it first"
            )
        if not (staging / "saved_model.pb").is_file() or not (staging / "variables").is_dir():
            raise ModelIntegrityError(
                f"staging_dir: {staging} lacks saved_model.pb or variables/; export with tf.saved_model.save"
            )
        if staging.parent != mdir.absolute() or not staging.name.startswith(STAGING_PREFIX):
            copy = self.staging(name)
            shutil.copytree(staging, copy, dirs_exist_ok=True)
            staging = copy
        (staging / METADATA_FILE).unlink(missing_ok=True)
        manifest = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*")) if p.is_file()
        }
        with self._locked(name):
            state = self.state(name)
            self._check_fence(name, state, fence)
            version = max([int(state["last_version"]), *self.versions(name)]) + 1
            meta = version_metadata(metadata, name, version, manifest)
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", "utf-8")
            fsync_tree(staging)
            os.rename(staging, mdir / str(version))
            fsync_dir(mdir)
            state["last_version"] = version
            self._append(state, "CREATED", version, str(meta.get("reason") or "exported"),
                         metadata_sha256=meta["metadata_sha256"], epoch=fence)
            self._write_state(name, state)
        return version

    def set_promoted(self, name: str, version: int, reason: str, *, fence: int | None = None) -> int | None:
        """Make ``version`` the one serving answers with; returns the previously promoted version.

        The version is verified first: a damaged export is never promoted.
        """
        version = int(version)
        self.verify(name, version)
        with self._locked(name):
            state = self.state(name)
            self._check_fence(name, state, fence)
            previous = state["promoted"]
            state["promoted"] = version
            stack = [v for v in state["promoted_stack"] if v != version]
            stack.append(version)
            state["promoted_stack"] = stack
            self._append(state, "PROMOTED", version, reason, previous=previous)
            self._write_state(name, state)
        self._refresh_serving_config()
        return int(previous) if previous is not None else None

    def rollback(self, name: str, reason: str = "manual rollback") -> int:
        """Return to the version promoted before the current one; returns it.

        Repeated rollbacks walk further back. Versions that no longer verify are skipped.
        """
        if not self.model_dir(name).is_dir():  # before the lock, whose mkdir would make a phantom model
            known = ", ".join(self.names()) or "none yet"
            raise ModelRegistryError(
                f"name: there is no model {name!r} in {self.root} (models: {known}); check the name")
        with self._locked(name):
            state = self.state(name)
            current = state["promoted"]
            if current is None:
                raise ModelRegistryError(
                    f"name: model {name!r} has no promoted version; nothing to roll back"
                )
            stack = [v for v in state["promoted_stack"] if v != current]
            target = None
            while stack:
                candidate = stack[-1]
                try:
                    self.verify(name, candidate)
                    target = candidate
                    break
                except ModelRegistryError:
                    stack.pop()
            if target is None:
                raise ModelRegistryError(
                    f"name: model {name!r} has no earlier promoted version that still verifies; "
                    "promote a version explicitly with `streamlearn models promote`"
                )
            state["promoted"] = target
            state["promoted_stack"] = stack
            self._append(state, "ROLLED_BACK", target, reason, previous=current)
            self._write_state(name, state)
        self._refresh_serving_config()
        return int(target)

    def apply_retention(self, name: str, keep_last: int, *, fence: int | None = None) -> list[int]:
        """Delete old versions except the last ``keep_last``, the promoted one and the last ``keep_last``
        promoted before it (the rollback depth); trim the history to match.

        Returns the deleted versions. A version is first renamed to a trash name (one atomic
        step, so readers never see it half-deleted), then removed.

        Why bounded: every version ever promoted used to be kept, and the promotion stack and history
        grew with every decision. A stack that promotes regularly then never expired a version (199
        versions, 29 kept, in a 25-minute soak), so ``store gc`` could free no batch (every one was some
        kept version's lineage) and state.json, re-read by every serving replica, grew ~20 entries a minute.
        History entries of versions that no longer exist are dropped beyond the newest
        :data:`HISTORY_KEEP` (the ModelUpdate events on Kafka keep the full record).
        """
        if keep_last < 1:
            raise ModelRegistryError(
                f"keep_last: must be >= 1 (got {keep_last}); the newest version is always kept"
            )
        deleted: list[int] = []
        with self._locked(name):
            state = self.state(name)
            self._check_fence(name, state, fence)
            stack = [int(v) for v in state["promoted_stack"]][-(keep_last + 1):]  # the promoted one + keep_last
            changed = stack != state["promoted_stack"]
            state["promoted_stack"] = stack
            keep = set(self.versions(name)[-keep_last:]) | set(stack)
            if state["promoted"] is not None:
                keep.add(int(state["promoted"]))
            for version in self.versions(name):
                if version in keep:
                    continue
                self._delete_version(name, version)
                deleted.append(version)
                self._append(state, "DELETED", version, f"retention keep_last={keep_last}")
            history = state["history"]
            if len(history) > HISTORY_KEEP:
                cut, existing = len(history) - HISTORY_KEEP, set(self.versions(name))
                trimmed = [e for e in history[:cut] if e.get("version") in existing] + history[cut:]
                changed = changed or len(trimmed) != len(history)
                state["history"] = trimmed
            if deleted:
                self._deleted_durable(name)
            if deleted or changed:
                self._write_state(name, state)
        return deleted

    def _delete_version(self, name: str, version: int) -> None:
        """Remove one version (the seam object storage overrides): renamed to a trash name first,
        one atomic step, so readers never see it half-deleted, then removed."""
        mdir = self.model_dir(name)
        trash = mdir / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
        os.rename(mdir / str(version), trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _deleted_durable(self, name: str) -> None:
        """Make the deletions durable before state.json records them."""
        fsync_dir(self.model_dir(name))


_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")
#: History entries kept whatever their version; older ones only while their version exists.
HISTORY_KEEP = 1000


def parse_metadata(raw: bytes, where: object) -> dict[str, Any]:
    """A version's metadata.json (``where``: its path or URL, for the message); both backends read it so."""
    try:
        data = json.loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8
        raise ModelIntegrityError(f"version: {where} is not valid JSON ({exc}); delete the version") from exc
    if not isinstance(data, dict):  # a JSON list was a TypeError in `models show`, AttributeError in promote
        raise ModelIntegrityError(f"version: {where} is a JSON {type(data).__name__}, not an object; the version "
                                  "is damaged, delete it")
    return data


def parse_state(raw: bytes | None, where: object, name: str) -> dict[str, Any]:
    """A model's state.json (None: there is none yet), checked, with defaults; both backends read it so
    (the object-storage registry's bare json.loads was a JSONDecodeError traceback on a damaged one)."""
    if raw is None:
        data: Any = {}
    else:
        try:
            data = json.loads(raw)
        except ValueError as exc:  # truncated, empty, not UTF-8
            raise ModelRegistryError(_state_damaged(where, name, f"{type(exc).__name__}: {exc}")) from None
    if not isinstance(data, dict):
        raise ModelRegistryError(_state_damaged(where, name, f"a JSON {type(data).__name__}, not an object"))
    promoted = data.get("promoted")
    if promoted is not None and (isinstance(promoted, bool) or not isinstance(promoted, int)):
        raise ModelRegistryError(_state_damaged(where, name, f"promoted is {str(promoted)[:40]!r}, not a version"))
    if not isinstance(data.get("history", []), list) or not isinstance(data.get("promoted_stack", []), list):
        raise ModelRegistryError(_state_damaged(where, name, "history or promoted_stack is not a list"))
    data.setdefault("promoted", None)
    data.setdefault("promoted_stack", [])
    data.setdefault("last_version", 0)
    data.setdefault("history", [])
    data.setdefault("leader_epoch", 0)
    return data


def _state_damaged(path: object, name: str, what: str) -> str:
    return (f"state: {path} of model {name!r} is damaged ({what}); the versions beside it are intact. Restore "
            "the file from a backup, or move it aside: the registry then starts a fresh state (no version "
            f"promoted) and `streamlearn models promote {name}/<N>` promotes one again")
