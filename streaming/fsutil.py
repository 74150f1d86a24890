"""Small OS helpers shared by the feature store, the model registry, the file sources'
checkpoints, the broker manager and the trainer: the one home of durable file writes.

Why one home: the same temp-file / fsync / rename / fsync-the-directory dance was written three
times (model registry, ingest checkpoints, feature store) with small differences (one ignored every
directory-fsync error, one left its temp file behind on failure). A write that is "atomic" must be
all four steps; a reader then sees the old content or the new, never a mix, also after power loss.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: Errors of ``fsync`` on a directory that mean "this file system cannot sync directories" (some
#: network and FUSE file systems): the rename is as durable as that file system makes it.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to disk before returning.
    The building block of :func:`write_atomic`, and of multi-file commits that rename later."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _synced_temp(path: Path, data: bytes, prefix: str) -> str:
    """A unique temp file beside ``path`` holding ``data``, fsynced; removed again if writing fails."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: a unique temp file in the same
    directory, fsync, rename over ``path``, fsync of the directory. On failure the temp file is
    removed and the old content stays."""
    path = Path(path)
    tmp = _synced_temp(path, data, f".{path.name}.")
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def create_atomic(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist, atomically and durably: a synced temp
    file hard-linked to ``path`` (the link fails if it exists), then the directory synced. Returns
    False, writing nothing, when ``path`` already existed."""
    path = Path(path)
    tmp = _synced_temp(path, data, f".{path.name}.{os.getpid()}-")
    try:
        try:
            os.link(tmp, path)  # atomic create-if-absent of a complete, synced file
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """:func:`write_atomic` of ``data`` as sorted-key JSON and a newline (``indent=None``: compact)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(data, indent=indent, sort_keys=True, separators=separators) + "\n"
    write_atomic(path, text.encode("utf-8"))


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
