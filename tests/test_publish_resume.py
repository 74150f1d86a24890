"""`streamlearn publish KIND --file F` is a checkpointed source: the same command resumes after a crash.

Before, it had no checkpoint: run again after a kill -9 it published every line again (20,000 lines
killed after 4 s and re-run: 12,437 duplicates), and a finished run repeated published the file twice.
Over the real session broker, the CLI as a user runs it; bounded polls, no sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

from streaming.config import Settings
from streaming.consumer import Subscriber
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_gateway_http import sensor

LINES = 50_000


def _write(path: Path, n: int, *, bad_every: int = 0) -> None:
    ts = sensor(0)["timestamp"]
    with path.open("w") as fh:
        for i in range(n):
            if bad_every and i % bad_every == 0:
                fh.write(json.dumps({"sensor_id": f"s{i}", "value": "warm"}) + "\n")  # dead-lettered, with its line
            else:
                fh.write(json.dumps({"sensor_id": f"s{i % 50}", "timestamp": ts + i, "value": float(i),
                                     "unit": "celsius"}) + "\n")


def _published_values(settings: Settings) -> Counter[float]:
    return Counter(float(r.value["value"]) for r in read_topic(settings, raw_topic(settings, "sensor")))


def _end_offset(settings: Settings) -> int:
    with Subscriber(settings, raw_topic(settings, "sensor"), start="end", decode=False) as sub:
        return sum(sub.consumer.end_offsets(list(sub.assignment())).values())


def _run(settings: Settings, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(streamlearn_cmd("publish", "sensor", "--file", str(path)), env=subprocess_env(settings),
                          capture_output=True, text=True, timeout=240, check=False)


def _interrupt(settings: Settings, path: Path, sig: int, *, past_line: int, acked: int) -> str:
    """Start the command; once it has read past ``past_line`` and ``acked`` records are on the topic,
    send ``sig``; its stderr.

    Progress is read from the run's own stderr (each 1000th line is a rejected one, printed as it is
    read), not from the topic: a run reads about 15,000 lines a second here, and polling end offsets
    through a new consumer each time once let a run reach its last line before the signal (CI), so the
    run ended before its "stopped after line" or the rejected lines the next run must find."""
    sub = Subscriber(settings, raw_topic(settings, "sensor"), start="end", decode=False)  # ready before the run
    parts = list(sub.assignment())
    proc = subprocess.Popen(streamlearn_cmd("publish", "sensor", "--file", str(path)), env=subprocess_env(settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            lines.append(text)
            m = re.match(r"line (\d+): rejected", text)
            if m and int(m.group(1)) > past_line:
                reached.set()
        reached.set()  # the run ended: the check below says so

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(reached.is_set, timeout=120, message=f"the run to read past line {past_line}")
        assert proc.poll() is None, "the run ended before it could be interrupted; make LINES larger"
        wait_until(lambda: sum(sub.consumer.end_offsets(parts).values()) >= acked, timeout=60,
                   interval=0.01, message=f"{acked} records on the topic")
        assert proc.poll() is None, "the run ended before it could be interrupted; make LINES larger"
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=30)
        sub.close()
    return "".join(lines)


def test_publish_file_resumes_after_kill_and_sigterm_exactly_once(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    _write(path, LINES, bad_every=1000)
    _interrupt(settings, path, signal.SIGKILL, past_line=1_000, acked=1)  # acked past its checkpoint: read back
    first = _end_offset(settings)
    assert first < LINES // 2, f"the killed run published {first} lines before the kill; make LINES larger"
    # No wait for acks here: they trail the reads by thousands of lines, and the stop must come mid-file.
    stopped = _interrupt(settings, path, signal.SIGTERM, past_line=first + 3_000, acked=0)  # acked, checkpointed
    assert "stopped after line " in stopped and "the same command resumes" in stopped, stopped[-2000:]
    done = _run(settings, path)  # the same command, no flag
    assert done.returncode == 1, done.stderr[-2000:]  # some lines were rejected (dead letters)
    values = _published_values(settings)
    assert sum(values.values()) == LINES - LINES // 1000, "a line is missing or on the topic twice"
    assert max(values.values()) == 1
    assert "from line " in done.stderr and "(checkpoint " in done.stderr, done.stderr[-2000:]
    letters = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False)
    lines = Counter(next(v for k, v in r.headers if k == "dl.source_line") for r in letters)
    assert sorted(int(n) for n in lines) == [i + 1 for i in range(0, LINES, 1000)] and max(lines.values()) == 1

    again = _run(settings, path)  # finished: the same command publishes nothing
    assert "published to its end" in again.stderr and "published 0 sensor events" in again.stdout, again.stderr
    assert sum(_published_values(settings).values()) == LINES - LINES // 1000


def test_a_changed_file_is_published_again_and_other_flags_are_a_run_of_their_own(settings: Settings,
                                                                                    tmp_path: Path) -> None:
    path = tmp_path / "few.jsonl"
    _write(path, 5)
    assert "published 5 sensor events" in _run(settings, path).stdout
    with path.open("a") as fh:  # appended lines are all a re-run sends
        fh.write(json.dumps({**json.loads(path.read_text().splitlines()[0]), "value": 99.0}) + "\n")
    assert "published 1 sensor events" in _run(settings, path).stdout
    _write(path, 3)  # rewritten in place: another first line is another file
    path.write_text(path.read_text().replace('"value": 0.0', '"value": 7.0'))
    assert "published 3 sensor events" in _run(settings, path).stdout
    backfill = subprocess.run(streamlearn_cmd("publish", "sensor", "--file", str(path), "--backfill"),
                              env=subprocess_env(settings), capture_output=True, text=True, timeout=120, check=False)
    assert "published 3 sensor events" in backfill.stdout, backfill.stderr[-2000:]
    assert sum(_published_values(settings).values()) == 5 + 1 + 3 + 3


def test_publish_stdin_has_no_checkpoint_and_sends_each_run(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "piped.jsonl"
    _write(path, 4)
    for _ in range(2):
        done = subprocess.run(streamlearn_cmd("publish", "sensor", "--stdin"), env=subprocess_env(settings),
                              input=path.read_text(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and "published 4 sensor events" in done.stdout, done.stderr[-2000:]
    assert sum(_published_values(settings).values()) == 8


def test_publish_file_reads_a_fifo_once_as_a_stream(settings: Settings, tmp_path: Path) -> None:
    """A FIFO (or ``--file /dev/stdin`` on a pipe) cannot be seeked or read twice: it used to end in
    ``io.UnsupportedOperation`` after the unit look-ahead had eaten its first lines."""
    path = tmp_path / "r.jsonl"
    _write(path, 4)
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()), daemon=True)
    writer.start()
    done = _run(settings, fifo)
    writer.join(timeout=30)
    assert done.returncode == 0 and "published 4 sensor events" in done.stdout, done.stderr[-2000:]
    assert "not a regular file" in done.stderr
    assert sum(_published_values(settings).values()) == 4


def test_checkpointed_file_sources_refuse_a_fifo_before_reading_it(settings: Settings, tmp_path: Path) -> None:
    """Through a FIFO the CSV source's identity read ate the data and the run published nothing while
    saying the file was done; the log tailer ended in a traceback (illegal seek)."""
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    for args in (("ingest", "sensors", "--csv", str(fifo)), ("ingest", "weblog", str(fifo))):
        done = subprocess.run(streamlearn_cmd(*args), env=subprocess_env(settings), capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode != 0 and "is not a regular file (a FIFO, pipe or device)" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
