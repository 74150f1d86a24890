"""The one home of durable file writes (streaming/fsutil.py) and of the wall clock (streaming/clock.py)."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from streaming import clock, fsutil


def test_write_atomic_replaces_or_keeps_the_old_content_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint.json"
    target.write_bytes(b"old")
    fsutil.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        fsutil.write_atomic(target, b"newer")
    assert target.read_bytes() == b"new"  # a failed write changes nothing visible
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]  # and removes its temp file


def test_fsync_dir_tolerates_file_systems_that_cannot_sync_directories_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = [errno.EINVAL]

    def fsync(fd: int) -> None:
        raise OSError(code[0], os.strerror(code[0]))

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.fsync_dir(tmp_path)  # EINVAL: the file system cannot; not an error
    code[0] = errno.EIO
    with pytest.raises(OSError) as info:
        fsutil.fsync_dir(tmp_path)  # a real I/O error is reported
    assert info.value.errno == errno.EIO


def test_write_json_atomic_formats(tmp_path: Path) -> None:
    fsutil.write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    fsutil.write_json_atomic(tmp_path / "c.json", {"b": 1, "a": 2}, indent=None)
    assert (tmp_path / "c.json").read_text() == '{"a":2,"b":1}\n'


def test_write_synced_refuses_to_overwrite(tmp_path: Path) -> None:
    fsutil.write_synced(tmp_path / "x", b"1")
    with pytest.raises(FileExistsError):
        fsutil.write_synced(tmp_path / "x", b"2")
    assert (tmp_path / "x").read_bytes() == b"1"


def test_now_ms_is_integer_epoch_milliseconds() -> None:
    before = time.time_ns() // 1_000_000
    now = clock.now_ms()
    assert isinstance(now, int)
    assert before <= now <= time.time_ns() // 1_000_000
