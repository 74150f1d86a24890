"""The takeover window of a warm standby (streaming/standby.py): a restarted copy becomes the slot's new
standby, not an extra active replica in the next slot. Cheap: locks and status files only."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming import standby as standby_mod
from streaming.config import Settings
from streaming.members import Lease, members_dir, try_lock
from streaming.standby import Standby, claim_or_standby, takeover_in_progress
from tests.helpers import wait_until

GROUP = "takeover-race-group"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture()
def slot0(settings: Settings) -> Iterator[tuple[Path, int, int]]:
    """Both locks of slot 0 held by this process (as the standby mid-takeover holds them)."""
    directory = members_dir(settings, GROUP)
    active_fd = try_lock(directory / "slot0.lock")
    standby_fd = try_lock(directory / "slot0.standby.lock")
    assert active_fd is not None and standby_fd is not None
    yield directory, active_fd, standby_fd
    for fd in (active_fd, standby_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def _write(path: Path, pid: int) -> None:
    path.write_text(json.dumps({"pid": pid, "state": path.stem}))


def _claim_in_thread(settings: Settings) -> tuple[threading.Thread, list[Lease | Standby]]:
    out: list[Lease | Standby] = []
    thread = threading.Thread(target=lambda: out.append(claim_or_standby(settings, GROUP, "serve-x")), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("active_pid", ["dead", "standby's"])
def test_a_copy_started_during_a_takeover_waits_and_becomes_the_new_standby(
        settings: Settings, slot0: tuple[Path, int, int], active_pid: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory, _active_fd, standby_fd = slot0
    monkeypatch.setattr(standby_mod, "TAKEOVER_WAIT_S", 60.0)
    caplog.set_level(logging.INFO, logger="streaming.standby")
    _write(directory / "slot0.json", _dead_pid() if active_pid == "dead" else os.getpid())
    _write(directory / "slot0.standby.json", os.getpid())
    assert takeover_in_progress(directory, 0)
    thread, out = _claim_in_thread(settings)
    wait_until(lambda: "is taking over" in caplog.text, timeout=20, message="the claim to wait for the takeover")
    assert not out, "it took a place while the takeover was still under way"
    (directory / "slot0.standby.json").unlink()  # the standby finishes taking over: gives up its place
    os.close(standby_fd)
    thread.join(timeout=20)
    assert out and isinstance(out[0], Standby) and out[0].slot == 0, out
    out[0].release()


def test_a_live_pair_is_not_a_takeover_and_the_copy_takes_the_next_slot(
        settings: Settings, slot0: tuple[Path, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    directory = slot0[0]
    monkeypatch.setattr(standby_mod, "TAKEOVER_WAIT_S", 60.0)
    _write(directory / "slot0.json", os.getpid())
    _write(directory / "slot0.standby.json", os.getppid())
    assert not takeover_in_progress(directory, 0)
    thread, out = _claim_in_thread(settings)
    thread.join(timeout=20)
    assert out and isinstance(out[0], Lease) and out[0].slot == 1, out
    out[0].release(leave=False)
