"""The object-storage interface and key rules shared by both backends (see :mod:`streaming.objstore`).

Why a module of its own: :class:`ObjectStore`, :func:`check_key` and the location helpers are what
both backends (:mod:`streaming.objstore_local`, :mod:`streaming.objstore_fsspec`) build on, while
:mod:`streaming.objstore` picks a backend for a location; keeping the shared part here lets each
backend import it without an import cycle through the façade. Every name is re-exported from
:mod:`streaming.objstore`, which is what callers import.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from streaming.exceptions import ObjectStoreError

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
    """The directory of a local location (a path or a ``file://`` URL, percent-decoded as RFC 8089 says:
    ``Path("/a b").as_uri()`` is ``file:///a%20b``, which was taken for a directory named ``a%20b``)."""
    text = str(location)
    if not isinstance(location, Path) and urlsplit(text).scheme.lower() in ("file", "local"):
        text = unquote(urlsplit(text).path)
    return Path(text)


def check_key(key: str) -> str:
    """A store-relative POSIX key; refuses absolute keys and ``..`` so no key escapes the root."""
    if not isinstance(key, str) or not key or "\x00" in key:
        raise ObjectStoreError(f"key: {key!r} must be a non-empty store-relative path")
    p = PurePosixPath(key)
    if p.is_absolute() or ".." in p.parts or "" in key.split("/"):
        raise ObjectStoreError(f"key: {key[:200]!r} must be relative, without '..' or empty parts")
    return key


class ObjectStore:
    """The interface both backends implement (see the module docstring for their guarantees)."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Write (or replace) one object atomically: a reader sees the old bytes or the new."""
        raise NotImplementedError

    def container_exists(self) -> bool:
        """Whether what holds the keys exists (an S3/GCS bucket); an empty listing alone cannot tell a
        missing bucket from an empty store. Backends without such a container answer True."""
        return True

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
