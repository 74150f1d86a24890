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

Modules: the interface and key rules in :mod:`streaming.objstore_base`, the backends in
:mod:`streaming.objstore_local` and :mod:`streaming.objstore_fsspec`; this module chooses one for a
location (:func:`open_store`) and re-exports every name, so callers import from here only.
"""

from __future__ import annotations

from typing import Any

from streaming.exceptions import ObjectNotFoundError, ObjectStoreError
from streaming.objstore_base import (  # re-exported: callers import these from streaming.objstore
    _OPTIONS_BY_PREFIX,
    LOCAL_SCHEMES,
    Location,
    ObjectStore,
    check_key,
    is_remote,
    local_path,
)
from streaming.objstore_fsspec import FsspecObjectStore, client_errors
from streaming.objstore_local import LocalObjectStore, content_token

__all__ = [
    "LOCAL_SCHEMES", "FsspecObjectStore", "LocalObjectStore", "Location", "ObjectNotFoundError", "ObjectStore",
    "ObjectStoreError", "backend_errors", "check_key", "content_token", "is_remote", "local_path",
    "open_store", "open_url", "relative_key",
]


def backend_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the object store failed or is unreachable" (callers turn them into
    backpressure): ours, OSError (what s3fs translates to), and the S3 client's own connection and
    protocol errors, which s3fs passes through untranslated (e.g. EndpointConnectionError). The
    fsspec store translates them itself now (ObjectStoreUnavailableError); this stays for reads that
    go around it (``open_url``)."""
    return (ObjectStoreError, *client_errors())


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
