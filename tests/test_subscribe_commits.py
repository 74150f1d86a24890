"""`subscribe --group` commits what it printed once per fetched batch, and a kill -9 after that loses nothing.

It used to commit after every record (one broker round trip each, ~330 records/s). Now the commit follows
each batch the consumer handed over (``Subscriber.iterate(batch_done=...)``), so it is at least once with a
window of one batch; the test pins both halves: the commit happens while the process runs (not only at its
exit), and a restart after ``kill -9`` prints nothing twice once the printed records were committed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_restart import _publish
from streaming import offsets
from streaming.config import Settings
from tests.helpers import ROOT, printed_records, subprocess_env, wait_until

N = 1500


def _printed(out: Path) -> list[tuple[int, int]]:
    return [(int(rec["partition"]), int(rec["offset"])) for rec in printed_records(out)]


def _ends(rows: list[tuple[int, int]]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for partition, offset in rows:
        ends[partition] = max(ends.get(partition, -1), offset + 1)
    return ends


def _committed(settings: Settings, group: str) -> dict[int, int]:
    return {p.partition: p.committed for p in offsets.show(settings, group, settings.topic("sensor.raw"))
            if p.committed is not None}


def _start(settings: Settings, out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("ab") as fh, err.open("ab") as fe:
        return subprocess.Popen([sys.executable, "-m", "streamlearn.cli", "subscribe", "sensor.raw", "--group",
                                 "tail", "--json"], env=subprocess_env(settings), cwd=ROOT, stdout=fh, stderr=fe)


def test_group_subscription_commits_per_batch_while_running_and_a_kill_9_prints_nothing_twice(
        settings: Settings, tmp_path: Path) -> None:
    _publish(settings, "sensor", N, seed=11)
    out, err = tmp_path / "sub.out", tmp_path / "sub.err"
    group = settings.group("tail")
    proc = _start(settings, out, err)
    try:
        wait_until(lambda: len(_printed(out)) >= N or proc.poll() is not None, 90, 0.05, f"{N} records printed")
        assert proc.poll() is None, err.read_text()[-2000:]
        ends = _ends(_printed(out))
        # still running, idle: what it printed is committed already (batch_done), not left for its exit
        wait_until(lambda: _committed(settings, group) == ends, 30, 0.2, "the printed records committed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        _publish(settings, "sensor", 100, seed=12)
        proc = _start(settings, out, err)
        wait_until(lambda: len(_printed(out)) >= N + 100 or proc.poll() is not None, 90, 0.05,
                   "the new records printed after the restart")
        assert proc.poll() is None, err.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM, err.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    rows = _printed(out)
    assert len(rows) == N + 100 and len(set(rows)) == N + 100  # every record once: none lost, none twice
    assert _committed(settings, group) == _ends(rows)
