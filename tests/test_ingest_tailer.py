"""File tailer against the real embedded broker: once mode, rotation, truncation, kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from ingest.generators import web_traffic
from ingest.tailer import FileTailer
from ingest.weblog import format_combined
from streaming.config import Settings
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until


def _lines(start: int, n: int) -> list[str]:
    """Combined log lines whose path carries a unique sequence number (``/seq/<n>``)."""
    out = []
    for i, rec in enumerate(web_traffic(n, seed=start)):
        rec["path"] = f"/seq/{start + i}"
        out.append(format_combined(rec) + "\n")
    return out


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.writelines(lines)


def _seqs(settings: Settings, expect: int | None = None, timeout: float = 30.0) -> Counter[str]:
    """Paths on the raw topic, read to its end offsets (callers run this after every ack, so a
    duplicate beyond ``expect`` records is seen too; ``expect`` only documents the count)."""
    items = read_topic(settings, raw_topic(settings, "weblog"), timeout=timeout)
    assert all(item.ok for item in items)
    return Counter(item.value["path"] for item in items)


def _count_raw(settings: Settings) -> int:
    return len(read_topic(settings, raw_topic(settings, "weblog"), decode=False, idle_timeout=0.5))


def test_once_mode_publishes_each_line_and_dead_letters_bad_ones(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    good = _lines(0, 150)
    bad = ["this is not a log line\n", '1.2.3.4 - - [17/Foo/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 1\n']
    _append(log, good[:50] + [bad[0]] + good[50:100] + ["\n"] + [bad[1]] + good[100:])
    with Publisher(settings) as pub:
        stats = FileTailer(settings, pub, log).run()
    assert (stats.published, stats.dead_lettered, stats.blank) == (150, 2, 1)
    seqs = _seqs(settings, expect=150)
    assert sorted(seqs) == sorted(f"/seq/{i}" for i in range(150)) and set(seqs.values()) == {1}
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=2)
    assert [d.value for d in dls] == [bad[0].rstrip("\n").encode(), bad[1].rstrip("\n").encode()]
    h = header_dict(dls[0].headers)
    assert h["dl.stage"] == "parse" and h["dl.source_file"] == str(log) and h["dl.source_line"] == "51"
    assert "combined" in h["dl.message"] and h["dl.error_class"] == "LogParseError"
    assert h["dl.source_reason"] == "not_combined_format"
    assert header_dict(dls[1].headers)["dl.source_line"] == "103"
    # A second run resumes from the checkpoint: nothing is published again.
    _append(log, _lines(150, 5))
    with Publisher(settings) as pub:
        stats = FileTailer(settings, pub, log).run()
    assert stats.published == 5
    seqs = _seqs(settings, expect=155)
    assert len(seqs) == 155 and set(seqs.values()) == {1}


def test_backpressure_bounds_in_flight_lines(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _append(log, _lines(0, 120))
    with Publisher(settings) as pub:
        tailer = FileTailer(settings, pub, log, max_in_flight=10)
        stats = tailer.run()
    peak = tailer.runner.stats.peak_in_flight
    assert stats.published == 120 and peak <= 10
    assert tailer.pos.line == 120 and tailer.pos.offset == log.stat().st_size
    assert len(_seqs(settings)) == 120


def test_follow_survives_rotation_and_truncation(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _append(log, _lines(0, 40))
    stop = threading.Event()
    with Publisher(settings) as pub:
        tailer = FileTailer(settings, pub, log, follow=True, poll_s=0.05, rotate_grace_s=0.3)
        thread = threading.Thread(target=tailer.run, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_until(lambda: tailer.pos.line >= 40, 20, message="first 40 lines acked")
            _append(log, _lines(40, 10))  # written just before the rename: must not be lost
            os.rename(log, tmp_path / "access.log.1")
            _append(tmp_path / "access.log.1", _lines(50, 5))  # writer still on the old inode
            _append(log, _lines(55, 20))  # the new file
            wait_until(lambda: tailer.stats.rotations == 1 and tailer.pos.line >= 20, 20, message="rotation")
            with log.open("r+") as fh:  # copytruncate
                fh.truncate(0)
            wait_until(lambda: tailer.stats.truncations == 1, 20, message="truncation seen")
            _append(log, _lines(75, 25))
            wait_until(lambda: tailer.pos.line >= 25 and tailer.pos.generation == 1, 20, message="after truncate")
        finally:
            stop.set()
            thread.join(30)
    seqs = _seqs(settings, expect=100)
    assert sorted(seqs) == sorted(f"/seq/{i}" for i in range(100))
    assert set(seqs.values()) == {1}


def test_rotation_and_truncation_while_stopped(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _append(log, _lines(0, 30))
    with Publisher(settings) as pub:
        FileTailer(settings, pub, log).run()
    # Down: 10 more lines reach the old file, it is rotated, and a new file starts.
    _append(log, _lines(30, 10))
    os.rename(log, tmp_path / "access.log.1")
    _append(log, _lines(40, 15))
    with Publisher(settings) as pub:
        t = FileTailer(settings, pub, log, follow=True, poll_s=0.02, rotate_grace_s=0.1)
        stats = t.run(idle_exit_s=0.5)
    assert (stats.published, stats.rotations) == (25, 1)
    # Down again: the file is truncated and rewritten with fewer lines than before.
    log.write_text("".join(_lines(55, 5)))
    with Publisher(settings) as pub:
        t = FileTailer(settings, pub, log)
        stats = t.run()
    assert (stats.published, stats.truncations, t.pos.generation) == (5, 1, 1)
    seqs = _seqs(settings, expect=60)
    assert sorted(seqs) == sorted(f"/seq/{i}" for i in range(60)) and set(seqs.values()) == {1}


def _crash_after(tailer: FileTailer, limit: int) -> FileTailer:
    """Checkpoint writes stop after ``limit`` lines: the state a kill -9 between the acks and the
    checkpoint write leaves behind (acked lines beyond the checkpoint)."""
    real_write = tailer.runner._write

    def write() -> None:
        if (tailer.runner.state or {}).get("line", 0) <= limit:
            real_write()

    tailer.runner._write = write  # type: ignore[method-assign]
    return tailer


def test_acked_but_not_checkpointed_lines_are_skipped_on_restart(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    _append(log, _lines(0, 300) + ["garbage line\n"] + _lines(300, 99))
    # The ack ledger off (as on Apache Kafka): each batch is confirmed on its ack, so checkpoints follow
    # the batches one by one (with the ledger, the first confirmation can cover the whole file at once).
    with Publisher(settings.with_(broker_loss_window_s=0.0)) as pub:
        # Small chunks, a checkpoint per batch and few items in flight: the last checkpoint written is
        # mid-file. (With 50,000 in flight the whole file could be sent before the first ack, and the
        # first checkpoint then came after line 120: no checkpoint at all, seen once in a full run.)
        crashed = _crash_after(FileTailer(settings, pub, log, chunk_bytes=4096, checkpoint_every_s=0.0,
                                          max_in_flight=40), 120)
        crashed.run()
    assert crashed.stats.published == 399
    with Publisher(settings) as pub:
        again = FileTailer(settings, pub, log)
        assert 0 < again.pos.line <= 120
        stats = again.run()
    assert stats.published == 0 and stats.dead_lettered == 0 and stats.skipped_duplicates == stats.lines
    seqs = _seqs(settings, expect=399)
    assert len(seqs) == 399 and set(seqs.values()) == {1}
    assert len(read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, idle_timeout=0.5)) == 1


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """Kill -9 a source under test; fails with its stderr when it had already exited."""
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


class _EndOffsets:
    """Cheap progress probe: records in a topic = sum of its end offsets (one round trip)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from streaming.consumer import Subscriber

        self.sub = Subscriber(settings, topic, start="end", decode=False)
        self.tps = list(self.sub.assignment())

    def __call__(self) -> int:
        return sum(self.sub.consumer.end_offsets(self.tps).values())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_at_random_points_loses_and_duplicates_nothing(settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(20261122)
    log = tmp_path / "access.log"
    cmd = streamlearn_cmd("ingest", "weblog", "--follow", str(log), "--poll", "0.05", "--rotate-grace", "0.2")
    env = subprocess_env(settings)
    published = _EndOffsets(settings, raw_topic(settings, "weblog"))
    total = 0
    kills_mid_stream = 0
    for kill in range(5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if kill == 3:  # rotate while a tailer runs, with lines still unread in the old file
                os.rename(log, tmp_path / "access.log.1")
            n = rng.randint(1000, 2500)
            lines = _lines(total, n)
            lines.insert(rng.randint(0, n), f"malformed line {kill}\n")  # one dead letter per round
            _append(log, lines)
            before = published()
            total += n
            # Kill -9 somewhere in the first third of publishing the new lines: the publisher sends ~15,000
            # lines/s, so a later target was often reached with the rest already out, and the kill missed.
            target = before + rng.randint(1, n // 3)
            wait_until(
                lambda t=target, p=proc: published() >= t or p.poll() is not None,
                60,
                interval=0.002,
                message="tailer progress",
            )
        finally:
            kill9(proc)
        kills_mid_stream += published() < total
    assert kills_mid_stream >= 3  # the kills really hit the tailer while it was publishing
    proc = subprocess.Popen(cmd + ["--idle-exit", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    published.sub.close()
    seqs = _seqs(settings, expect=total, timeout=60)
    missing = {f"/seq/{i}" for i in range(total)} - set(seqs)
    dupes = {k: v for k, v in seqs.items() if v > 1}
    assert (len(missing), len(dupes)) == (0, 0), (sorted(missing)[:10], list(dupes.items())[:10])
    assert sum(seqs.values()) == total
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, timeout=30)
    assert sorted(d.value for d in dls) == [f"malformed line {k}".encode() for k in range(5)]
