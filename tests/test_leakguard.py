"""The leak guard (tests/leakguard.py) errors a test that leaves a process running, and kills it.

Runs an inner pytest session (a subprocess, so its hooks and token are its own) over a small file:
one test leaks a child, one leaks an orphan (its parent exits, so only the session token finds it),
one cleans up after itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, wait_until

INNER = '''
import subprocess, sys

import tests.leakguard

tests.leakguard.GRACE_S = 1.0  # the outer suite's wall time; the grace itself is not under test

def _write_pid(path, pid):
    with open(path, "w") as fh:
        fh.write(str(pid))

def test_leaks_a_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    _write_pid(PIDS / "child", proc.pid)

def test_leaks_an_orphan():
    out = subprocess.run(["bash", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, check=True)
    _write_pid(PIDS / "orphan", int(out.stdout))

def test_cleans_up():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    proc.terminate()
    proc.wait(timeout=30)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_guard_errors_the_leaking_tests_and_kills_what_they_left(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(f"from pathlib import Path\nPIDS = Path({str(pids)!r})\n{INNER}")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_LEAKGUARD_SESSION"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.leakguard", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-c", os.devnull, "-q", "-rE", str(test_file)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "3 passed, 2 errors" in text, text
    assert "ERROR at teardown of test_leaks_a_child" in text and "ERROR at teardown of test_leaks_an_orphan" in text
    assert "leak guard" in text and "sleep 300" in text, text
    for name in ("child", "orphan"):
        pid = int((pids / name).read_text())
        wait_until(lambda: not _alive(pid), timeout=10,  # noqa: B023 (called within this iteration)
                   message=f"the leaked {name} (pid {pid}) to be gone")
