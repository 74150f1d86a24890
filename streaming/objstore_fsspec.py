"""The fsspec object store: ``s3://`` (with conditional writes), ``gs://`` and other fsspec URLs.

Why a module of its own: the remote backend's atomicity comes from the server (single PUTs,
S3's ``If-None-Match``/``If-Match`` conditional writes, ETags), not from the file system, and its
error handling (precondition failures, missing backends) has nothing in common with the local
one. Re-exported from :mod:`streaming.objstore`, which chooses the backend for a location.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from streaming.exceptions import ObjectNotFoundError, ObjectStoreError, ObjectStoreUnavailableError
from streaming.objstore_base import _OPTIONS_BY_PREFIX, Location, ObjectStore, check_key

F = TypeVar("F", bound=Callable[..., Any])


def client_errors() -> tuple[type[BaseException], ...]:
    """The backend client's own failure types, which s3fs passes through untranslated (botocore's
    connection and protocol errors, aiohttp's), plus OSError, which s3fs translates the rest into."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
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


def _translated(method: F) -> F:
    """Run ``method``; a backend failure leaves it as :class:`ObjectStoreUnavailableError` (an OSError
    too). Not-found and already-exists keep their own classes: callers decide on them."""

    @functools.wraps(method)
    def wrapper(self: FsspecObjectStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (ObjectStoreError, FileNotFoundError, FileExistsError):
            raise
        except client_errors() as exc:
            what = f"{method.__name__}({args[0]!r})" if args else method.__name__
            raise ObjectStoreUnavailableError(f"object store {self.url}: {what} failed: {exc}; check that the "
                                              "endpoint is reachable and the bucket and credentials are "
                                              "right (it is retried)") from exc

    return wrapper  # type: ignore[return-value]


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

    @_translated
    def container_exists(self) -> bool:
        if self.scheme not in ("s3", "s3a", "gs", "gcs"):
            return True
        try:
            return bool(self.fs.exists(self.base.split("/")[0]))
        except (OSError, ValueError):
            return True  # unreachable: the caller's own listing says so

    def _conditional(self) -> bool:
        return self.scheme in ("s3", "s3a")

    @_translated
    def put(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(key), data)
        except OSError as exc:
            raise ObjectStoreUnavailableError(f"key: cannot write {key} to {self.url}: {exc}; check the bucket "
                                              "and credentials, then retry") from exc

    @_translated
    def put_file(self, key: str, source: Path) -> None:
        try:
            self.fs.put_file(str(source), self._p(key))  # one PUT, or a multipart upload: atomic either way
        except OSError as exc:
            raise ObjectStoreUnavailableError(f"key: cannot upload {source} to {self.url}/{key}: {exc}") from exc

    @_translated
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
            raise ObjectStoreUnavailableError(f"key: cannot write {key} to {self.url}: {exc}") from exc
        return True

    @_translated
    def create(self, key: str, data: bytes) -> bool:
        return self._conditional_put(key, data, IfNoneMatch="*")

    @_translated
    def get(self, key: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(self._p(key))
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc
        return data

    @_translated
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

    @_translated
    def replace_if(self, key: str, data: bytes, token: str | None) -> bool:
        if token is None:
            return self.create(key, data)
        return self._conditional_put(key, data, IfMatch=token)

    @_translated
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._p(key)))

    @_translated
    def size(self, key: str) -> int:
        try:
            return int(self.fs.info(self._p(key))["size"])
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"key: {key} does not exist in {self.url}") from exc

    @_translated
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

    @_translated
    def list_keys(self, prefix: str) -> list[str]:
        try:
            found = self.fs.find(self._dir(prefix))
        except FileNotFoundError:
            return []
        return sorted(self._rel(p) for p in found)

    @_translated
    def names(self, prefix: str) -> list[str]:
        try:
            found = self.fs.ls(self._dir(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted({self._rel(str(p)).rstrip("/").rsplit("/", 1)[-1] for p in found})

    @_translated
    def delete(self, key: str) -> bool:
        existed = self.exists(key)  # S3's DELETE succeeds on a missing key: ask first (informational)
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            return False
        return existed

    def url_of(self, key: str) -> Location:
        return f"{self.url}/{check_key(key)}"
