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

import ingest.source as source_mod
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
    monkeypatch.setattr(source_mod, "LAST_LINE_SETTLE_S", 0.4)
    monkeypatch.setattr(source_mod, "LAST_LINE_MAX_WAIT_S", 1.5)


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
