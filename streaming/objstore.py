"""One small object-storage layer for the feature store and the model registry: a local directory
(the default) or any fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

Why one layer: both stores need the same five verbs (put, get, list a prefix, exists, delete) plus
the two an atomic publication needs on a system without ``rename``: *create only if absent* and
*replace only if unchanged* (compare-and-swap). Keys are store-relative POSIX strings
(``live/sensor/<batch_id>.json``), never absolute paths, so what one host writes into a manifest
or a lineage resolves on every other host that opens the same URL.

Guarantees per backend (docs/STORE.md, "Object storage"):

* :class:`LocalObjectStore` (a plain path or a ``file://`` URL): every put is
  ``streaming.fsutil.write_atomic`` (temp file + fsync + rename + directory fsync), create-if-absent
  is a hard link of a synced temp file (``EEXIST`` when taken), compare-and-swap runs under an
  ``flock``. Same durability as before.
* :class:`FsspecObjectStore` (``s3://`` and other fsspec URLs): a single PUT is atomic on S3 and
  GCS (a reader sees the whole object or none), so there are no temp objects. Create-if-absent is
  S3's conditional write ``If-None-Match: *`` and compare-and-swap is ``If-Match: <ETag>`` (both
  checked against moto's server in tests/test_objstore.py). Backends without conditional writes
  get a clear :class:`ObjectStoreError` from those two verbs, never a silent race.

The local path still goes through ``fsutil``: the registry's and the store's local code keep their
own (unchanged) write paths, and only object-storage URLs take the fsspec route.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from streaming.exceptions import ObjectNotFoundError, ObjectStoreError
from streaming.fsutil import fsync_dir, write_atomic

#: Schemes handled by the local backend (a plain path has none).
LOCAL_SCHEMES = frozenset({"", "file", "local"})


Location = Path | str

#: Storage options of the stores opened in this process, by URL prefix, so that a URL handed out
#: by a store (``BatchInfo.path``) opens with the same endpoint and credentials in :func:`open_url`.
_OPTIONS_BY_PREFIX: dict[str, dict[str, Any]] = {}


def is_remote(location: Location) -> bool:
    """True for an object-storage URL (``s3://``, ``gs://``, ...); False for a path or ``file://``."""
    if isinstance(location, Path):
        return False
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme.lower() not in LOCAL_SCHEMES


def local_path(location: Location) -> Path:
    """The directory of a local location (a path or a ``file://`` URL)."""
    text = str(location)
    if not isinstance(location, Path) and urlsplit(text).scheme.lower() in ("file", "local"):
        text = urlsplit(text).path
    return Path(text)


def check_key(key: str) -> str:
    """A store-relative POSIX key; refuses absolute keys and ``..`` so no key escapes the root."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise ObjectStoreError(f"key: {key!r} must be a non-empty store-relative path")
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts or "" in key.split("/"):
        raise ObjectStoreError(f"key: {key[:200]!r} must be relative, without '..' or empty parts")
    return key


def content_token(data: bytes) -> str:
    """The compare-and-swap token of local objects: sha256 of the content."""
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """The interface both backends implement (see the module docstring for their guarantees)."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) one object atomically: a reader sees the old bytes or the new."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet; False (nothing written) when it does."""
        raise NotImplementedError

    def put_file(self, key: str, source: Path) -> None:
        """:meth:`put` of a local file's content, streamed (model shards can be large)."""
        self.put(key, Path(source).read_bytes())

    def get_file(self, key: str, dest: Path) -> None:
        """Copy one object into a new local file ``dest`` (streamed where the backend allows)."""
        Path(dest).write_bytes(self.get(key))

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFoundError` when it does not exist."""
        raise NotImplementedError

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """``(bytes, token)`` for :meth:`replace_if`, or None when the object does not exist."""
        raise NotImplementedError

    def replace_if(self, key: str, data: bytes, token: str | None) -> bool:
        """Compare-and-swap: write ``data`` only if ``key`` still has ``token`` (from
        :meth:`get_versioned`; None = only if absent). False when another writer got there first."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def modified_s(self, key: str) -> float:
        """Last-modified time of an object (epoch seconds): how old an unpublished orphan is."""
        raise NotImplementedError

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix/`` (recursive), sorted; empty when there is none."""
        raise NotImplementedError

    def names(self, prefix: str) -> list[str]:
        """The immediate child names under ``prefix/`` (objects and "directories"), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> bool:
        """Remove one object; False when it was not there."""
        raise NotImplementedError

    def url_of(self, key: str) -> Location:
        """Where ``key`` lives, for :func:`open_url` (a Path locally, a URL remotely)."""
        raise NotImplementedError

    def publish(self, objects: dict[str, bytes], manifest_key: str, manifest: bytes) -> bool:
        """Publish a unit (a batch, a version): every data object first, the manifest last and
        only if absent. Readers treat a unit as existing iff its manifest exists, so they never see
        a half-published one; data objects left by a crash before the manifest are invisible
        garbage. Returns False when the manifest already existed (nothing newer became visible).
        """
        for key, data in objects.items():
            self.put(key, data)
        return self.create(manifest_key, manifest)


class LocalObjectStore(ObjectStore):
    """A directory; durability from ``streaming.fsutil`` (fsync + atomic rename)."""

    def __init__(self, root: Location) -> None:
        self.root = local_path(root)
        self.url = str(self.root)

    def _p(self, key: str) -> Path:
        return self.root / check_key(key) if key.strip("/") else self.root

    def put(self, key: str, data: bytes) -> None:
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def create(self, key: str, data: bytes) -> bool:
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic create-if-absent of a complete, synced file
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        fsync_dir(path.parent)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self._p(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.get(key)
        except ObjectNotFoundError:
            return None
        return data, content_token(data)

    @contextlib.contextmanager
    def _cas_lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.caslock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def replace_if(self, key: str, data: bytes, token: str | None) -> bool:
        path = self._p(key)
        with self._cas_lock(path):
            current = self.get_versioned(key)
            if (current[1] if current is not None else None) != token:
                return False
            write_atomic(path, data)
            return True

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def size(self, key: str) -> int:
        try:
            return self._p(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    def modified_s(self, key: str) -> float:
        try:
            return self._p(key).stat().st_mtime
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        base = self._p(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith((".tmp", ".caslock")))

    def names(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> bool:
        try:
            self._p(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def url_of(self, key: str) -> Location:
        return self._p(key)


def _is_precondition_failure(exc: BaseException) -> bool:
    text = str(exc)
    return ("PreconditionFailed" in text or "412" in text or "pre-conditions" in text
            or "ConditionalRequestConflict" in text)


class FsspecObjectStore(ObjectStore):
    """An fsspec file system under a URL prefix. Listings are never cached (another host may have
    written since), so every ``list``/``exists`` asks the server."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a pinned dependency
            raise ObjectStoreError(f"location: {url} needs fsspec; pip install -r requirements.lock") from exc
        options = dict(storage_options or {})
        self.scheme = urlsplit(url).scheme.lower()
        if self.scheme in ("s3", "s3a"):
            options.setdefault("use_listings_cache", False)
        try:
            fs, base = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            raise ObjectStoreError(f"location: cannot open {url}: {exc}; install the fsspec backend for "
                                   f"{self.scheme}:// (s3fs for s3://, gcsfs for gs://)") from exc
        self.fs = fs
        self.base = str(base).rstrip("/")
        self.url = url.rstrip("/")
        self.options = options
        if storage_options:
            _OPTIONS_BY_PREFIX[self.url + "/"] = dict(storage_options)

    def _p(self, key: str) -> str:
        return f"{self.base}/{check_key(key)}"

    def _dir(self, prefix: str) -> str:
        return self._p(prefix.strip("/")) if prefix.strip("/") else self.base

    def _conditional(self) -> bool:
        return self.scheme in ("s3", "s3a")

    def put(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(key), data)
        except OSError as exc:
            raise ObjectStoreError(f"key: cannot write {key} to {self.url}: {exc}; check the bucket and "
                                   "credentials, then retry") from exc

    def put_file(self, key: str, source: Path) -> None:
        try:
            self.fs.put_file(str(source), self._p(key))  # one PUT, or a multipart upload: atomic either way
        except OSError as exc:
            raise ObjectStoreError(f"key: cannot upload {source} to {self.url}/{key}: {exc}") from exc

    def get_file(self, key: str, dest: Path) -> None:
        try:
            self.fs.get_file(self._p(key), str(dest))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        if not self._conditional():
            raise ObjectStoreError(
                f"location: {self.url}: conditional writes (create-if-absent, compare-and-swap) are implemented "
                "for s3:// only; use an S3-compatible endpoint (GCS has one) or a local/shared directory")
        try:
            self.fs.pipe_file(self._p(key), data, **condition)
        except FileExistsError:
            return False
        except OSError as exc:
            if _is_precondition_failure(exc):
                return False
            raise ObjectStoreError(f"key: cannot write {key} to {self.url}: {exc}") from exc
        return True

    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    def get(self, key: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(self._p(key))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc
        return data

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        # The ETag is read before the bytes: if a writer slips in between, the token is older than
        # the bytes and a replace_if with it fails (412), so a stale pair can only cause a retry,
        # never a lost update.
        for _ in range(3):
            try:
                info = self.fs.info(self._p(key))
                data = self.get(key)
            except (FileNotFoundError, ObjectNotFoundError):
                return None
            etag = str(info.get("ETag") or info.get("etag") or "")
            if etag:
                return data, etag
        raise ObjectStoreError(f"key: {self.url}/{key} has no ETag; compare-and-swap needs an S3-compatible store")

    def replace_if(self, key: str, data: bytes, token: str | None) -> bool:
        if token is None:
            return self.create(key, data)
        return self._conditional_put(key, data, IfMatch=token)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._p(key)))

    def size(self, key: str) -> int:
        try:
            return int(self.fs.info(self._p(key))["size"])
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    def modified_s(self, key: str) -> float:
        try:
            info = self.fs.info(self._p(key))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc
        stamp = info.get("LastModified") or info.get("mtime") or info.get("updated")
        if hasattr(stamp, "timestamp"):
            return float(stamp.timestamp())
        return float(stamp or 0.0)

    def _rel(self, path: str) -> str:
        path = path.split("://", 1)[-1]
        return path[len(self.base) + 1:] if path.startswith(self.base + "/") else path

    def list_keys(self, prefix: str) -> list[str]:
        try:
            found = self.fs.find(self._dir(prefix))
        except FileNotFoundError:
            return []
        return sorted(self._rel(p) for p in found)

    def names(self, prefix: str) -> list[str]:
        try:
            found = self.fs.ls(self._dir(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted({self._rel(str(p)).rstrip("/").rsplit("/", 1)[-1] for p in found})

    def delete(self, key: str) -> bool:
        existed = self.exists(key)  # S3's DELETE succeeds on a missing key: ask first (informational)
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            return False
        return existed

    def url_of(self, key: str) -> Location:
        return f"{self.url}/{check_key(key)}"


def backend_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the object store failed or is unreachable" (callers turn them into
    backpressure): ours, OSError (what s3fs translates to), and the S3 client's own connection and
    protocol errors, which s3fs passes through untranslated (e.g. EndpointConnectionError)."""
    found: list[type[BaseException]] = [ObjectStoreError, OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        found += [BotoCoreError, ClientError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        from aiohttp import ClientError as HttpClientError

        found.append(HttpClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def open_store(location: Location, storage_options: dict[str, Any] | None = None) -> ObjectStore:
    """The object store of a location: local for a path or ``file://``, fsspec otherwise.

    ``storage_options`` go to the fsspec backend (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
    for an S3-compatible server); without them the backend's own configuration applies (fsspec's
    config, the AWS credential chain).
    """
    if is_remote(location):
        return FsspecObjectStore(str(location), storage_options)
    return LocalObjectStore(location)


def open_url(location: Location, storage_options: dict[str, Any] | None = None) -> Any:
    """A binary read handle for a path or a URL (what :func:`streaming.store.read_batch` and the
    trainer's sha256 use, so a batch named by URL reads the same as a local file)."""
    if not is_remote(location):
        return open(local_path(location), "rb")
    import fsspec

    url = str(location)
    if storage_options is None:
        known = [p for p in _OPTIONS_BY_PREFIX if url.startswith(p)]
        storage_options = _OPTIONS_BY_PREFIX[max(known, key=len)] if known else {}
    return fsspec.open(url, "rb", **storage_options).open()


def relative_key(location: Location, root: Location) -> str | None:
    """``location`` as a key relative to ``root`` (None when it lies outside): what lineage stores."""
    if is_remote(root) or is_remote(location):
        base, loc = str(root).rstrip("/") + "/", str(location)
        return loc[len(base):] if loc.startswith(base) else None
    try:
        return local_path(location).resolve().relative_to(local_path(root).resolve()).as_posix()
    except ValueError:
        return None
