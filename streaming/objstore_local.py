"""The local-directory object store: a plain path or a ``file://`` URL (the default).

Why a module of its own: the local backend's durability comes from :mod:`streaming.fsutil` (fsync
+ atomic rename), hard links and ``flock``, nothing of which the fsspec backend shares; keeping the
two apart makes each backend's guarantees (listed in :mod:`streaming.objstore`) readable on their
own. Re-exported from :mod:`streaming.objstore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from streaming.exceptions import ObjectNotFoundError
from streaming.fsutil import create_atomic, write_atomic
from streaming.objstore_base import Location, ObjectStore, check_key, local_path


def content_token(data: bytes) -> str:
    """The compare-and-swap token of local objects: sha256 of the content."""
    return hashlib.sha256(data).hexdigest()


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
        return create_atomic(path, data)

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
