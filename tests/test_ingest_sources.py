"""The source contract and the one runner (ingest/source.py, ingest/runner.py) against the embedded
broker: sensor CSV streamed, checkpointed and resumed exactly once, bad rows dead-lettered per row."""

from __future__ import annotations

import doctest
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import ingest.source
from ingest.runner import SourceRunner
from ingest.sensor_csv import SensorCsvSource, default_checkpoint_path, publish_csv
from ingest.sensors import CSV_HEADER, now_ms, validate
from ingest.source import IterSource
from streaming.config import Settings
from streaming.eventtime import EventTimePolicy
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_ingest_tailer import _EndOffsets, kill9


def _csv(path: Path, n: int, bad: dict[int, str] | None = None) -> None:
    """``n`` readings with unique event ids ``r<i>``; ``bad`` replaces row i (0-based) with a line."""
    now = now_ms()
    rows = [f"s{i % 7},{now - (n - i) * 1000},{20 + i % 10}.5,celsius,,40,r{i}" for i in range(n)]
    for i, line in (bad or {}).items():
        rows[i] = line
    path.write_text(CSV_HEADER + ",event_id\n" + "\n".join(rows) + "\n")


def _ids(settings: Settings, expect: int | None = None) -> Counter[str]:
    """event_id -> copies on the raw topic. ``expect``: at least that many are there (a slow first fetch
    on a loaded box must not end the read early: read_topic's idle timeout only counts once it is met)."""
    items = read_topic(settings, raw_topic(settings, "sensor"), idle_timeout=1.0, expect=expect)
    assert all(item.ok for item in items)
    return Counter(item.value["event_id"] for item in items)


def test_source_contract_docstring_example_runs() -> None:
    result = doctest.testmod(ingest.source, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


def test_runner_resumes_a_generator_source_from_its_snapshot(settings: Settings, tmp_path: Path) -> None:
    cp_path = tmp_path / "gen.json"

    def build(state):  # type: ignore[no-untyped-def]
        readings = ({"sensor_id": "s", "timestamp": now_ms(), "value": float(i), "unit": "c"} for i in range(25))
        return IterSource("sensor", readings, name="gen", batch=10, resume_state=state, check=validate)

    with Publisher(settings) as pub:
        first = SourceRunner(settings, pub, build, kind="sensor", checkpoint_path=cp_path).run()
        again = SourceRunner(settings, pub, build, kind="sensor", checkpoint_path=cp_path).run()
    assert (first.published, again.published, again.items) == (25, 0, 0)
    assert json.loads(cp_path.read_text())["index"] == 25
    values = sorted(r.value["value"] for r in read_topic(settings, raw_topic(settings, "sensor")))
    assert values == [float(i) for i in range(25)]


def test_csv_bad_rows_in_the_middle_are_dead_lettered_and_the_rest_published(
        settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    huge = "x" * 100_000  # over the publisher's record limit below: refused (this once aborted the file)
    # (in the unit: a sensor_id that long is refused by the id bound first, schemas/ids.py)
    _csv(path, 100, bad={40: f"s1,{now_ms()},NaN,celsius,,40,r40", 60: f"s1,{now_ms()},1,{huge},,40,r60"})
    with Publisher(settings, max_record_bytes=50_000) as pub:
        stats = publish_csv(settings, pub, path, batch_rows=16)
    assert (stats.published, stats.dead_lettered) == (98, 2)
    assert stats.reasons == {"nan": 1, "schema": 1}
    ids = _ids(settings, expect=98)
    assert set(ids) == {f"r{i}" for i in range(100)} - {"r40", "r60"} and set(ids.values()) == {1}
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=2)
    by_line = {header_dict(d.headers)["dl.source_line"]: (header_dict(d.headers), d.value) for d in dls}
    assert sorted(by_line) == ["42", "62"]
    assert by_line["42"][0]["dl.source_reason"] == "nan" and by_line["42"][1].startswith(b"s1,")
    assert by_line["62"][0]["dl.source_reason"] == "schema"
    assert by_line["62"][0]["dl.error_class"] == "RecordTooLargeError"


def _run_checkpointing_until(settings: Settings, pub: Publisher, path: Path, batch_rows: int, last_line: int) -> int:
    """Run the CSV source to its end while its checkpoints stop at ``last_line``: the state a kill -9
    between the acks and the checkpoint write leaves. Returns how many readings it published."""
    crashed = SourceRunner(settings, pub, lambda st: SensorCsvSource(path, resume_state=st, batch_rows=batch_rows),
                           kind="sensor", checkpoint_path=default_checkpoint_path(settings, path),
                           checkpoint_every_s=0.0)
    real_write = crashed._write
    crashed._write = lambda: real_write() if (crashed.state or {}).get("line", 0) <= last_line else None  # type: ignore
    return crashed.run().published


def test_csv_acked_but_not_checkpointed_rows_are_not_published_again(settings: Settings, tmp_path: Path) -> None:
    """The state a kill -9 between the acks and the checkpoint write leaves: the checkpoint stops at
    row 300 while all 1000 rows (one of them a dead letter) are on the topics."""
    path = tmp_path / "readings.csv"
    _csv(path, 1000, bad={500: "s1,not-a-time,1,celsius,,40,r500"})
    cp_path = default_checkpoint_path(settings, path)
    with Publisher(settings) as pub:
        assert _run_checkpointing_until(settings, pub, path, 50, 301) == 999
        # the last checkpoint written: header + at most 300 rows. Acks of several 50-row batches may
        # arrive together, so which multiple of 50 it stopped at depends on timing; on a loaded box the
        # first seven can all arrive at once and only the start's checkpoint (line 1) is written.
        line = json.loads(cp_path.read_text())["line"]
        assert 1 <= line <= 301 and (line - 1) % 50 == 0, line
        stats = publish_csv(settings, pub, path)
    assert (stats.from_line, stats.published, stats.dead_lettered, stats.skipped_duplicates) == \
        (line + 1, 0, 0, 1001 - line)
    ids = _ids(settings, expect=999)
    assert len(ids) == 999 and set(ids.values()) == {1}
    assert len(read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, idle_timeout=1.0)) == 1
    assert json.loads(cp_path.read_text())["line"] == 1001


def test_csv_changed_file_is_read_again_as_a_new_generation(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    _csv(path, 10)
    with Publisher(settings) as pub:
        assert publish_csv(settings, pub, path).published == 10
        assert publish_csv(settings, pub, path).published == 0  # done: the same command publishes nothing
        path.write_text(CSV_HEADER + ",event_id\n" + f"s9,{now_ms()},1.5,celsius,,40,new\n")  # shorter, rewritten
        assert publish_csv(settings, pub, path).published == 1
        # Other flags are a run of their own: a backfill after a live run publishes the file again.
        backfill = EventTimePolicy(max_age_ms=None, backfill=True, run_id="bf")
        assert publish_csv(settings, pub, path, policy=backfill).published == 1
    assert _ids(settings)["new"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_csv_kill9_mid_file_then_same_command_publishes_each_row_once(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    total = 20_000
    _csv(path, total, bad={12_345: f"s1,{now_ms()},NaN,celsius,,40,r12345"})
    cmd = streamlearn_cmd("ingest", "sensors", "--csv", str(path))
    env = subprocess_env(settings)
    published = _EndOffsets(settings, raw_topic(settings, "sensor"))
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: published() >= 2000 or proc.poll() is not None, 120, interval=0.002,
                       message="CSV ingest progress")
        finally:
            kill9(proc)
        at_kill = published()
        assert at_kill < total - 1  # killed mid-file
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout.decode().strip().splitlines()[-1])["published"] > 0
    finally:
        published.sub.close()
    ids = _ids(settings, expect=total - 1)
    assert len(ids) == total - 1 and set(ids.values()) == {1}, [k for k, v in ids.items() if v > 1][:10]
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, idle_timeout=1.0)
    assert [header_dict(d.headers)["dl.source_line"] for d in dls] == ["12347"]


def test_generator_record_the_publisher_refuses_is_dead_lettered_as_json(settings: Settings) -> None:
    good = {"sensor_id": "s", "timestamp": now_ms(), "value": 1.0, "unit": "c", "values": {}, "label": None,
            "event_id": None}
    bad = {**good, "value": "not a number"}  # unchecked: the publisher's schema refuses it
    with Publisher(settings) as pub:
        stats = SourceRunner(settings, pub, lambda st: IterSource("sensor", [good, bad, good], name="gen"),
                             kind="sensor", checkpoint_path=None).run()
    assert (stats.published, stats.dead_lettered, stats.reasons) == (2, 1, {"schema": 1})
    dl = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=1)[0]
    assert json.loads(dl.value)["value"] == "not a number"
    assert header_dict(dl.headers)["dl.source_line"] == "2" and dl.key == b"gen:1"


def test_csv_with_one_column_per_sensor_is_read_and_resumed_exactly_once(settings: Settings, tmp_path: Path) -> None:
    """Loggers, Grafana/InfluxDB and spreadsheets export one row per time and one column per sensor
    (``Time,temp_1,temp_2,...``); such a file was refused whole ("header lacks sensor_id, value").
    Each filled cell is a reading with an id of its own, so a crash after the acks but before the
    checkpoint re-sends no reading and skips none."""
    from collections import Counter as Count

    path = tmp_path / "export.csv"
    now = now_ms()
    lines = [f"{now - (40 - i) * 1000},{20 + i % 5}.5,{'' if i % 4 == 0 else 40 + i},1013" for i in range(40)]
    lines[7] = f"{now - 33_000},warm,47,1013"  # one bad cell: its own dead letter, the row's others published
    path.write_text("Time,temp (C),humidity,pressure\n" + "\n".join(lines) + "\n")
    expected = 40 * 3 - 10 - 1  # 10 empty humidity cells are no readings; 'warm' is a dead letter
    with Publisher(settings) as pub:
        assert _run_checkpointing_until(settings, pub, path, 5, 11) == expected
        stats = publish_csv(settings, pub, path)
        assert stats.published == 0 and stats.skipped_duplicates > 0
        assert publish_csv(settings, pub, path).published == 0  # finished: nothing again
    items = read_topic(settings, raw_topic(settings, "sensor"), idle_timeout=1.0, expect=expected)
    copies = Count((item.value["sensor_id"], item.value["timestamp"]) for item in items)
    assert len(copies) == expected and set(copies.values()) == {1}
    assert {item.value["sensor_id"] for item in items} == {"temp (C)", "humidity", "pressure"}
    ids = {dict(item.headers)["sl.event_id"] for item in items}  # one per reading, not per row
    assert len(ids) == expected
    (letter,) = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, idle_timeout=1.0)
    headers = dict((k, v.decode()) for k, v in letter.headers)
    assert headers["dl.source_reason"] == "not_a_number" and headers["dl.source_column"] == "temp (C)"
    assert headers["dl.source_line"] == "9"
