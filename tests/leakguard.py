"""Leak guard: a test that leaves processes of this test session running errors at its teardown.

Why: a worker, broker or CLI process a test forgets (or an orphan of a supervisor it killed) keeps
running for the rest of the suite. Idle Kafka consumers spin on the embedded broker, so every leak
steals CPU from the tests after it and turns their deadlines into order-dependent failures that pass
alone. The guard names the process and the test that left it, kills it, and errors that test.

Which processes are "ours": descendants of the pytest process, plus any process whose environment
carries this session's token (:data:`TOKEN_VAR`, inherited through ``os.environ`` by every
subprocess, so an orphan re-parented to init after its parent was killed with -9 is still found).
Processes alive before a test's setup began and the session fixtures' own long-lived processes
(:func:`adopt`, e.g. the session broker) are never counted. A leftover gets a short grace period to
finish exiting (a SIGTERM just sent) before it counts as leaked.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Generator

import pytest

TOKEN_VAR = "PYTEST_LEAKGUARD_SESSION"
TOKEN = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
os.environ[TOKEN_VAR] = TOKEN  # set at import (conftest), before any test starts a process
_NEEDLE = f"{TOKEN_VAR}={TOKEN}".encode()
GRACE_S = 10.0

Key = tuple[int, int]  # (pid, start time in clock ticks): a reused pid is another process
_adopted: set[Key] = set()
_before: dict[str, set[Key]] = {}


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
    except OSError:
        return "?"


def _carries_token(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return _NEEDLE in fh.read()
    except OSError:
        return False


_MY_START = (_stat(os.getpid()) or (0, "", None))[2] if os.path.isdir("/proc") else None


def session_processes() -> dict[Key, str]:
    """Live (non-zombie) processes of this session other than pytest itself: key -> command line."""
    if not os.path.isdir("/proc"):
        return {}
    me = os.getpid()
    stats: dict[int, tuple[int, str, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            st = _stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _start) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ours: set[int] = set()
    todo = [me]
    while todo:
        for kid in children.get(todo.pop(), []):
            if kid not in ours:
                ours.add(kid)
                todo.append(kid)
    # an orphan started after this session did (cheap filter before reading environments)
    since = _MY_START if _MY_START is not None else -1
    ours.update(pid for pid, st in stats.items() if pid not in ours and st[2] >= since and _carries_token(pid))
    return {(pid, stats[pid][2]): _cmdline(pid) for pid in ours if stats[pid][1] not in ("Z", "X")}


def adopt() -> None:
    """Mark every process of the session alive now as a session fixture's (never a leak)."""
    _adopted.update(session_processes())


def _leftovers(before: set[Key]) -> dict[Key, str]:
    return {k: c for k, c in session_processes().items() if k not in before and k not in _adopted}


def _kill(keys: list[Key]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, start in keys:
            st = _stat(pid)
            if st is not None and st[2] == start:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
                (st := _stat(pid)) is not None and st[2] == start and st[1] not in ("Z", "X") for pid, start in keys):
            time.sleep(0.05)  # bounded wait for the signal to take effect (no condition to poll other than this)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    _before[item.nodeid] = set(session_processes())
    yield


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    error: BaseException | None = None
    try:
        yield  # every fixture this test alone needed is finalized after this
    except BaseException as exc:  # re-raised below, after the leftovers are stopped
        error = exc
    before = _before.pop(item.nodeid, set())
    left = _leftovers(before)
    deadline = time.monotonic() + GRACE_S
    while left and time.monotonic() < deadline:
        time.sleep(0.1)  # bounded: a process just sent SIGTERM may still be shutting down
        left = _leftovers(before)
    if left:
        _kill(list(left))
    if error is not None:
        raise error
    if left:
        listing = "\n".join(f"  pid {pid}: {cmd}" for (pid, _), cmd in sorted(left.items()))
        raise AssertionError(
            f"leak guard: {item.nodeid} left {len(left)} process(es) running {GRACE_S:.0f} s after its "
            f"teardown (now killed); stop them in the test's finally/fixture teardown:\n{listing}")
