"""A file's last line without its newline, read once (no --follow), while a writer may still be at it.

Why: a CSV, log or JSON-lines file copied or written while a run read it was cut mid-line: its head
was published as an event of its own (a reading of 2 for 23.5, a truncated log line), and the next
run dead-lettered the rest. Now such a line is taken only once the file has not changed for
``LAST_LINE_SETTLE_S`` (at once when it is older); a file still being written keeps it for the next
run, which publishes it whole. A finished file that simply lacks a final newline (many exports do)
is published as it is.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ingest.lines as lines_mod
from ingest.jsonlines import JsonLinesSource
from ingest.sensor_csv import SensorCsvSource
from ingest.source import SourcePartition
from ingest.tailer import TailSource
from streaming.eventtime import EventTimePolicy

NOW = int(time.time() * 1000)
LOG = '10.0.0.{i} - - [{t}] "GET /p/{i} HTTP/1.1" 200 {i}0 "-" "curl/8"\n'


def _csv(i: int) -> str:
    return f"s{i},{NOW - i},{i}.5\n"


def _json(i: int) -> str:
    return json.dumps({"sensor_id": f"s{i}", "timestamp": NOW - i, "value": i + 0.5, "unit": "c"}) + "\n"


def _log(i: int) -> str:
    return LOG.format(i=i, t=time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(NOW / 1000 - 5)))


KINDS: dict[str, Any] = {
    "csv": ("sensor_id,timestamp,value\n", _csv,
            lambda p, state: SensorCsvSource(p, resume_state=state, policy=EventTimePolicy(max_age_ms=None))),
    "json": ("", _json, lambda p, state: JsonLinesSource("sensor", path=p, resume_state=state, timestamp_unit="ms",
                                                         policy=EventTimePolicy(max_age_ms=None))),
    "weblog": ("", _log, lambda p, state: TailSource(p, resume_state=state)),
}


def _drain(src: SourcePartition) -> tuple[list[bytes], dict[str, Any]]:
    """Every item's bytes (blanks left out) and the snapshot after the last batch."""
    raws, snap = [], {}
    try:
        while True:
            batch = src.next_batch()
            raws += [it.raw.rstrip(b"\r\n") for it in batch if it.event_id]
            snap = src.snapshot()
    except StopIteration:
        src.close()
    return raws, snap


@pytest.fixture
def quick_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lines_mod, "LAST_LINE_SETTLE_S", 0.4)
    monkeypatch.setattr(lines_mod, "LAST_LINE_MAX_WAIT_S", 1.5)


class _Writer:
    """A writer still at the file: touches it far more often than the settle time."""

    def __init__(self, path: Path) -> None:
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            os.utime(self.path)

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _age(path: Path) -> None:
    old = time.time() - 60
    os.utime(path, (old, old))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_last_line_still_being_written_waits_for_the_next_run_and_is_published_whole(
        kind: str, tmp_path: Path, quick_settle: None) -> None:
    head, line, build = KINDS[kind]
    path = tmp_path / f"in.{kind}"
    whole = line(2)
    path.write_text(head + line(0) + line(1) + whole[:7])
    with _Writer(path):
        raws, snap = _drain(build(path, None))
    assert raws == [line(0).rstrip("\n").encode(), line(1).rstrip("\n").encode()]
    with path.open("a") as fh:
        fh.write(whole[7:])
    _age(path)
    again, _ = _drain(build(path, snap))
    assert again == [whole.rstrip("\n").encode()]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_finished_file_without_a_final_newline_gives_its_last_line(kind: str, tmp_path: Path,
                                                                     quick_settle: None) -> None:
    head, line, build = KINDS[kind]
    path = tmp_path / f"in.{kind}"
    path.write_text(head + line(0) + line(1).rstrip("\n"))
    _age(path)
    raws, _ = _drain(build(path, None))
    assert raws == [line(0).rstrip("\n").encode(), line(1).rstrip("\n").encode()]
    fresh = tmp_path / f"fresh.{kind}"  # just written, then left alone: taken after the settle time
    fresh.write_text(head + line(0).rstrip("\n"))
    raws, _ = _drain(build(fresh, None))
    assert raws == [line(0).rstrip("\n").encode()]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_last_line_finished_while_the_run_waits_on_it_is_read_on_and_given_whole(
        kind: str, tmp_path: Path, quick_settle: None) -> None:
    """The writer keeps at the file, then writes the rest of the line: whether the reader met the cut
    line or not, it gives the line once, whole (never its head as a line of its own)."""
    head, line, build = KINDS[kind]
    path = tmp_path / f"in.{kind}"
    whole = line(2)
    path.write_text(head + line(0) + whole[:7])

    def finish() -> None:
        for _ in range(20):  # still at it for ~0.2 s (busy: the reader cannot take the cut line)...
            os.utime(path)
            threading.Event().wait(0.01)
        with path.open("a") as fh:  # ...then the rest of the line
            fh.write(whole[7:])

    writer = threading.Thread(target=finish)
    writer.start()
    raws, _ = _drain(build(path, None))
    writer.join()
    assert raws == [line(0).rstrip("\n").encode(), whole.rstrip("\n").encode()]


def test_a_csv_renamed_over_while_its_last_line_waits_neither_hangs_nor_loses_rows(tmp_path: Path,
                                                                                  quick_settle: None) -> None:
    """Exporters save by writing a new file and renaming it over the old one. The last-line wait looked at
    the path, which then named a longer file: 'grew' forever, re-reading the same line, a core spinning
    and deaf to SIGTERM. The open file is the one read: its last line settles, and the next run reads the
    new file as a new generation."""
    path = tmp_path / "export.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(_csv(i) for i in range(5)) + f"z,{NOW},9")
    src = KINDS["csv"][2](path, None)  # the old file is open
    new = tmp_path / "export.tmp"
    new.write_text("sensor_id,timestamp,value\n" + "".join(_csv(100 + i) for i in range(8)))
    new.replace(path)
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(_drain(src)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the reader never finished its last line"
    raws, snap = result[0]
    assert raws == [_csv(i).rstrip("\n").encode() for i in range(5)] + [f"z,{NOW},9".encode()]
    again, _ = _drain(KINDS["csv"][2](path, snap))
    assert again == [_csv(100 + i).rstrip("\n").encode() for i in range(8)]


def test_a_csv_rewritten_in_place_during_the_wait_is_read_again_from_its_start(
        tmp_path: Path, quick_settle: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated and written longer while the run waited on its last line: the run used to read on at its
    old offset in the new content, and checkpointed a hash of the new bytes, so the next run took the
    file as read and 45 new rows were never sent. Now the wait sees other bytes where the line was and
    leaves it, and the checkpoint keeps the hash of the bytes as they were read."""
    import ingest.sensor_csv as csv_mod

    path = tmp_path / "logger.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(_csv(i) for i in range(50)) + f"z,{NOW},9")
    real = csv_mod.last_line_state

    def rewritten_meanwhile(fd: int, read_to: int, partial: bytes) -> str:
        with path.open("r+b") as fh:  # the logger starts over, in place (same inode)
            fh.truncate(0)
            fh.write(("sensor_id,timestamp,value\n" + "".join(_csv(1000 + i) for i in range(80))).encode())
        return real(fd, read_to, partial)

    monkeypatch.setattr(csv_mod, "last_line_state", rewritten_meanwhile)
    raws, snap = _drain(KINDS["csv"][2](path, None))
    monkeypatch.setattr(csv_mod, "last_line_state", real)
    assert raws == [_csv(i).rstrip("\n").encode() for i in range(50)]
    again, _ = _drain(KINDS["csv"][2](path, snap))
    assert again == [_csv(1000 + i).rstrip("\n").encode() for i in range(80)]
