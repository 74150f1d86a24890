"""Sensor validation, CSV parsing and the deterministic generator (pure logic, no broker)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ingest.exceptions import SensorValidationError, SourceError
from ingest.sensors import CSV_HEADER, DAY_MS, generate, read_csv, to_csv_line, validate

NOW = 1_750_000_000_000


def _reading(**changes: object) -> dict:
    rec = {"sensor_id": "s1", "timestamp": NOW - 1000, "value": 21.5, "values": {}, "unit": "celsius"}
    rec.update(changes)
    return rec


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"value": math.nan}, "nan"),
        ({"value": math.inf}, "infinite"),
        ({"value": -math.inf}, "infinite"),
        ({"value": 1e12}, "absurd_magnitude"),
        ({"values": {"humidity": math.nan}}, "nan"),
        ({"timestamp": NOW - 30 * 365 * DAY_MS}, "timestamp_too_old"),
        ({"timestamp": NOW + 2 * DAY_MS}, "timestamp_in_future"),
        ({"timestamp": 1.5}, "bad_timestamp"),
        ({"sensor_id": ""}, "missing_sensor_id"),
        ({"value": "12"}, "not_a_number"),
        ({"unit": ""}, "missing_unit"),
        ({"label": "yes"}, "bad_label"),
    ],
)
def test_bad_readings_are_rejected_with_reason(changes: dict, reason: str) -> None:
    with pytest.raises(SensorValidationError) as info:
        validate(_reading(**changes), now=NOW)
    assert info.value.reason == reason


def test_good_reading_passes() -> None:
    out = validate(_reading(value=3, values={"h": 1}), now=NOW)
    assert out["value"] == 3.0 and isinstance(out["value"], float) and out["label"] is None


def test_a_null_channel_is_no_reading_not_a_rejected_reading() -> None:
    """JSON null in ``values`` (a channel whose sensor gave nothing) rejected the whole reading; the main
    value is still required."""
    out = validate(_reading(value=3, values={"h": None, "p": 2}), now=NOW)
    assert out["values"] == {"p": 2.0}
    with pytest.raises(SensorValidationError):
        validate(_reading(value=None, values={"p": 2}), now=NOW)


def test_csv_rows_good_and_bad(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    rows = [
        CSV_HEADER,
        f"s1,{NOW},20.5,celsius,false,40",
        f"s1,{NOW - 1000},nan,celsius,,40",  # NaN value (units are decided per file, not per row)
        "s2,2025-06-15T16:26:40Z,inf,celsius,,",
        f"s3,{NOW},1e300,celsius,true,",
        f"s4,{NOW - 40 * 365 * DAY_MS},1,celsius,,",
        f"s5,{NOW},abc,celsius,,",
        "s6,1,2",
        "",
        f"s7,{NOW},7,,true,",
    ]
    path.write_text("\n".join(rows) + "\n")
    got = list(read_csv(path, now=NOW))
    assert [r.line for r in got] == [2, 3, 4, 5, 6, 7, 8, 10]
    good = [r for r in got if r.record is not None]
    assert [r.record["sensor_id"] for r in good] == ["s1", "s7"]
    assert good[0].record["values"] == {"humidity": 40.0} and good[0].record["label"] is False
    assert good[1].record["unit"] == "unit" and good[1].record["label"] is True
    reasons = [r.error.reason for r in got if r.error is not None]
    assert reasons == [
        "nan",
        "infinite",
        "absurd_magnitude",
        "timestamp_too_old",
        "not_a_number",
        "wrong_cell_count",
    ]
    assert got[1].raw == rows[2].encode()


def test_missing_value_markers_are_no_reading_in_extra_and_wide_columns_not_a_dead_row(tmp_path: Path) -> None:
    """R writes NA, Excel #N/A, pandas NaN, SQL dumps NULL. In an extra column of a long file such a cell
    made the whole row a dead letter (a station whose humidity sensor died lost every temperature); in a
    wide file it made a dead letter per cell. It is now no reading, as an empty cell always was. The main
    value of a long row is still required."""
    long = tmp_path / "long.csv"
    long.write_text("sensor_id,timestamp,value,unit,humidity,pressure\n"
                    + "".join(f"s1,{NOW - i * 1000},{20 + i},celsius,{m},1013\n"
                              for i, m in enumerate(["NA", "N/A", "#N/A", "NaN", "null", " None ", "", "41"]))
                    + f"s1,{NOW},NA,celsius,40,1013\n")
    got = list(read_csv(long, now=NOW))
    assert [r.record["values"] for r in got[:8]] == [{"pressure": 1013.0}] * 7 + [{"humidity": 41.0,
                                                                                    "pressure": 1013.0}]
    assert got[8].record is None and got[8].error.reason == "not_a_number"
    wide = tmp_path / "wide.csv"
    wide.write_text(f"time,temp_1,temp_2\n{NOW},21.5,NA\n{NOW - 1000},#N/A,22\n{NOW - 2000},x,\n")
    rows = list(read_csv(wide, now=NOW))
    assert [(r.record["sensor_id"], r.record["value"]) for r in rows if r.record] == [("temp_1", 21.5),
                                                                                      ("temp_2", 22.0)]
    assert [r.error.reason for r in rows if r.error] == ["not_a_number"]


def test_csv_header_must_name_required_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,ts,v\n1,2,3\n")
    with pytest.raises(SourceError, match="sensor_id"):
        list(read_csv(path))


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _readings(path: Path, now: int = NOW) -> list[tuple[str, float]]:
    return [(r.record["sensor_id"], r.record["value"]) for r in read_csv(path, now=now)]


def test_the_long_layout_in_other_letters_is_refused_not_read_as_wide(tmp_path: Path) -> None:
    """Read as the wide layout, sensor ids became readings of a sensor "Sensor_ID" (exit 0); and with
    "Timestamp,Device,Value,Unit" the device names were dead letters and every device's readings one sensor
    "Value", degrees and bar mixed (exit 0)."""
    refused = {
        "caps.csv": (f"Sensor_ID,Timestamp,Value\n101,{NOW},20.5\n", r"required columns \(lower case\)"),
        "devices.csv": (f"Timestamp,Device,Value,Unit\n{NOW},boiler,71.5,C\n{NOW},pump,3.2,bar\n",
                        r"column\(s\) \['Device', 'Unit'\] hold text, not readings"),
    }
    for name, (text, match) in refused.items():
        with pytest.raises(SourceError, match=match):
            list(read_csv(_csv(tmp_path, name, text)))
    assert _readings(_csv(tmp_path, "grafana.csv", f"Time,Value\n{NOW},20.5\n")) == [("Value", 20.5)]
    # a wide file with a dead sensor column (all missing) and decimal commas is still a wide file
    wide = _csv(tmp_path, "wide.csv", f"time;temp;hum\n{NOW};20,5;NA\n{NOW + 1000};21,0;\n")
    assert _readings(wide, NOW + 1000) == [("temp", 20.5), ("temp", 21.0)]


def test_a_header_cell_over_the_csv_field_limit_is_refused_with_a_message(tmp_path: Path) -> None:
    """Was a `_csv.Error: field larger than field limit` traceback (the same cell in a row was already a
    `bad_csv` dead letter)."""
    path = tmp_path / "big_header.csv"
    path.write_text("sensor_id,timestamp,value," + "c" * 200_000 + "\n1,2,3,4\n")
    with pytest.raises(SourceError, match="the header line is not CSV"):
        list(read_csv(path))


def test_generator_is_deterministic_valid_and_labelled() -> None:
    a = list(generate(6000, n_sensors=6, seed=5, start_ms=NOW - 2 * DAY_MS))
    b = list(generate(6000, n_sensors=6, seed=5, start_ms=NOW - 2 * DAY_MS))
    c = list(generate(6000, n_sensors=6, seed=6, start_ms=NOW - 2 * DAY_MS))
    assert a == b and a != c
    for r in a:
        validate(r, now=NOW)
    assert {r["sensor_id"] for r in a} == {f"sensor-{i:03d}" for i in range(6)}
    labels = np.array([r["label"] for r in a])
    assert 0.005 < labels.mean() < 0.1
    # Daily seasonality: a normal sensor's readings correlate with sin(time of day).
    s0 = [r for r in a if r["sensor_id"] == "sensor-000" and not r["label"]]
    v = np.array([r["value"] for r in s0])
    t = np.array([(r["timestamp"] % DAY_MS) / DAY_MS for r in s0])
    design = np.column_stack([np.sin(2 * np.pi * t), np.cos(2 * np.pi * t), np.ones_like(t)])
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    assert math.hypot(coef[0], coef[1]) > 1.5
    # Anomalies stand out from the seasonal fit more than normal readings do.
    anomalies = [r for r in a if r["label"] and r["sensor_id"] == "sensor-000"]
    assert anomalies
    assert len({r["event_id"] for r in a}) == len(a)


def test_generator_default_start_ends_near_now_and_csv_line_round_trips(tmp_path: Path) -> None:
    recs = list(generate(100, n_sensors=4, seed=1))
    for r in recs:
        validate(r)
    path = tmp_path / "g.csv"
    path.write_text(CSV_HEADER + "\n" + "\n".join(to_csv_line(r) for r in recs) + "\n")
    back = [row.record for row in read_csv(path)]
    assert [(r["sensor_id"], r["timestamp"], r["value"], r["label"]) for r in back] == [
        (r["sensor_id"], r["timestamp"], r["value"], r["label"]) for r in recs
    ]


# -- against the real broker ------------------------------------------------------------------


def test_cli_sensors_csv_with_naive_times_and_timezone(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A logger's export without offsets: refused row by row with a reason naming --timezone, then
    published by the same command with --timezone (another checkpoint: another run); a zone that does not
    exist is one error line before anything is read."""
    import subprocess

    from streaming.eventtime import parse_iso_ms
    from streaming.topics import raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

    path = tmp_path / "logger.csv"
    path.write_text("sensor_id,timestamp,value,unit\ns1,2024-07-15 12:00:00,20.5,celsius\n"
                    "s1,2024-07-15 12:01:00,20.7,celsius\n")

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(streamlearn_cmd("ingest", "sensors", "--csv", str(path), "--backfill", *flags),
                              env=subprocess_env(settings), capture_output=True, text=True, timeout=120)

    refused = run()
    assert "\"dead_lettered\": 2" in refused.stdout and "--timezone" in refused.stderr, refused.stdout + refused.stderr
    bad = run("--timezone", "Europe/Berlln")
    assert bad.returncode != 0 and "--timezone 'Europe/Berlln' is not a time zone" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    done = run("--timezone", "Europe/Berlin")
    assert done.returncode == 0 and '"published": 2' in done.stdout, done.stdout + done.stderr
    times = sorted(r.value["timestamp"] for r in read_topic(settings, raw_topic(settings, "sensor"), expect=2))
    assert times == [parse_iso_ms("2024-07-15T10:00:00Z"), parse_iso_ms("2024-07-15T10:01:00Z")]


def test_cli_sensors_csv_dead_letters_bad_values_with_reasons(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess

    from ingest.sensors import now_ms
    from streaming.producer import header_dict
    from streaming.topics import dead_letter_topic, raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

    now = now_ms()
    path = tmp_path / "readings.csv"
    path.write_text(
        "\n".join(
            [
                CSV_HEADER,
                f"s1,{now},20.5,celsius,false,40",
                f"s1,{now},NaN,celsius,,40",
                f"s2,{now},-inf,celsius,,",
                f"s3,{now},3e15,celsius,,",
                f"s4,{now - 50 * 365 * DAY_MS},1,celsius,,",
                f"s5,{now + 30 * DAY_MS},1,celsius,,",
                f"s6,{now},21,celsius,true,41",
            ]
        )
        + "\n"
    )
    done = subprocess.run(
        streamlearn_cmd("ingest", "sensors", "--csv", str(path)),
        env=subprocess_env(settings),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert (summary["published"], summary["dead_lettered"]) == (2, 5)
    readings = read_topic(settings, raw_topic(settings, "sensor"))
    assert sorted((r.value["sensor_id"], r.value["value"]) for r in readings) == [("s1", 20.5), ("s6", 21.0)]
    assert all(math.isfinite(r.value["value"]) for r in readings)
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False)
    got = {header_dict(d.headers)["dl.source_line"]: header_dict(d.headers) for d in dls}
    assert {k: v["dl.source_reason"] for k, v in got.items()} == {
        "3": "nan",
        "4": "infinite",
        "5": "absurd_magnitude",
        "6": "timestamp_too_old",
        "7": "timestamp_in_future",
    }
    assert dls[0].value.startswith(b"s1,") and "NaN" in got["3"]["dl.message"]


def test_cli_sensors_generate(settings) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from streaming.topics import raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

    done = subprocess.run(
        streamlearn_cmd("ingest", "sensors", "--generate", "300", "--sensors", "5", "--seed", "3"),
        env=subprocess_env(settings),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    got = [r.value for r in read_topic(settings, raw_topic(settings, "sensor"))]
    assert len(got) == 300 and len({r["sensor_id"] for r in got}) == 5
    want = {
        r["event_id"]: r["value"] for r in generate(300, n_sensors=5, seed=3, start_ms=min(r["timestamp"] for r in got))
    }
    assert {r["event_id"]: r["value"] for r in got} == want


def test_cli_creates_missing_topics_of_its_kind(bare_settings) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    from streaming.topics import raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

    done = subprocess.run(
        streamlearn_cmd("ingest", "sensors", "--generate", "20", "--sensors", "2"),
        env=subprocess_env(bare_settings),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert len(read_topic(bare_settings, raw_topic(bare_settings, "sensor"))) == 20


def test_thousands_dots_with_a_decimal_comma_are_read_in_a_semicolon_file(tmp_path: Path) -> None:
    """German Excel writes 1.234,5: it was a dead letter ("must be a number")."""
    path = tmp_path / "de.csv"
    path.write_text(f"sensor_id;timestamp;value\nn1;{NOW};1.234,5\nn2;{NOW};-12.345.678,25\nn3;{NOW};20.125\n")
    got = [(r.record["sensor_id"], r.record["value"]) for r in read_csv(path, now=NOW)]
    assert got == [("n1", 1234.5), ("n2", -12345678.25), ("n3", 20.125)]


def test_the_same_csv_for_a_second_tenant_is_published_to_its_topic(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The checkpoint was keyed by the file and the flags only: the second tenant found the first one's finished
    run ("published to its end by an earlier run with these flags") and published nothing, with exit 0."""
    import subprocess

    from streaming.topics import raw_topic
    from tests.helpers import read_topic, streamlearn_cmd, subprocess_env

    path = tmp_path / "ten.csv"
    path.write_text("sensor_id,timestamp,value\ns9,2024-07-15T12:00:00Z,1\n")
    for tenant in ("acme", "globex", "acme"):
        s = settings.with_(tenant=tenant)
        done = subprocess.run(streamlearn_cmd("ingest", "sensors", "--csv", str(path), "--backfill"),
                              env=subprocess_env(s), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(read_topic(s, raw_topic(s, "sensor"), expect=1)) == 1, (tenant, done.stdout, done.stderr)
    assert '"published": 0' in done.stdout  # acme's own checkpoint still holds: its second run sends nothing


def test_a_quoted_cell_with_a_line_break_is_two_dead_letters_not_a_wrong_reading(tmp_path: Path) -> None:
    """Rows are read a line at a time: `"hall` became one dead letter and its rest, `A",...,1.5`, a reading of
    sensor `A"`, published; a unit `"°C\\n(calibrated)"` published the reading with its unit cut to °C."""
    path = tmp_path / "nl.csv"
    path.write_text(f'sensor_id,timestamp,value,unit\n"hall\nA",{NOW},1.5,celsius\ns1,{NOW},2.5,"°C\n(cal)"\n'
                    f's2,{NOW},3.5,"a ""quoted"" unit"\ns3,{NOW},4.5,celsius\n')
    got = list(read_csv(path, now=NOW))
    assert [(r.line, r.record["sensor_id"] if r.record else r.error.reason) for r in got] == [  # type: ignore[union-attr]
        (2, "bad_csv"), (3, "bad_csv"), (4, "bad_csv"), (5, "bad_csv"), (6, "s2"), (7, "s3")]
    assert "a quoted cell with a line break in it" in str(got[0].error)
    assert got[4].record["unit"] == 'a "quoted" unit'  # type: ignore[index]


def test_a_comma_inside_a_quoted_header_name_does_not_decide_the_separator(tmp_path: Path) -> None:
    """`sensor_id;timestamp;value;"Ort, Halle"` was read as ','-separated and refused: header lacks its columns."""
    path = tmp_path / "semi.csv"
    path.write_text(f'sensor_id;timestamp;value;"Ort, Halle"\ns1;{NOW};1,5;3\n')
    got = [r.record for r in read_csv(path, now=NOW)]
    assert got and got[0] is not None and got[0]["value"] == 1.5 and got[0]["values"] == {"Ort, Halle": 3.0}


def test_a_file_saved_again_by_rename_with_the_same_bytes_is_not_published_twice(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Exporters, rsync and Excel save by writing a copy and renaming it over: another inode, so the checkpoint
    read it as a new generation and published every row again. Same first line and same bytes before the
    saved offset: the run resumes; rows added by the new save are published once."""
    import os
    import shutil

    from ingest.sensor_csv import publish_csv
    from streaming.producer import Publisher

    path = tmp_path / "re.csv"
    path.write_text(f"sensor_id,timestamp,value\ns1,{NOW},1\ns1,{NOW + 1000},2\n")

    def save(text: str) -> None:  # write a copy, rename it over the original
        shutil.copy(path, tmp_path / "re.tmp")
        with open(tmp_path / "re.tmp", "a") as fh:
            fh.write(text)
        os.replace(tmp_path / "re.tmp", path)

    with Publisher(settings) as pub:
        assert publish_csv(settings, pub, path).published == 2
        before = path.stat().st_ino
        save("")
        assert path.stat().st_ino != before
        assert publish_csv(settings, pub, path).published == 0
        save(f"s1,{NOW + 2000},3\n")
        assert publish_csv(settings, pub, path).published == 1
        path.write_text(f"sensor_id,timestamp,value\ns2,{NOW},9\ns2,{NOW + 1000},8\n")  # other data: read anew
        assert publish_csv(settings, pub, path).published == 2


def test_a_resumed_backfill_keeps_its_run_id(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A killed `ingest sensors --csv F --backfill` run again got a new run id, so the featurizers split one
    history into two runs at the kill (windows kept apart): a training row lost and 16 partial windows more per
    sensor. The checkpoint keeps the run id; a resumed run's records carry it."""
    from ingest.sensor_csv import publish_csv
    from streaming import eventtime
    from streaming.producer import Publisher
    from streaming.topics import raw_topic
    from tests.helpers import read_topic

    path = tmp_path / "hist.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(f"s1,{946_684_800_000 + i * 3_600_000},{i}\n"
                                                             for i in range(3)))
    with Publisher(settings) as pub:
        first = eventtime.policy(settings, backfill=True, source="hist", run_id="run-1")
        assert publish_csv(settings, pub, path, policy=first).backfill_run == "run-1"
        with path.open("a") as fh:  # the rest of the history, read by the same command run again
            fh.write("".join(f"s1,{946_684_800_000 + i * 3_600_000},{i}\n" for i in range(3, 5)))
        again = eventtime.policy(settings, backfill=True, source="hist", run_id="run-2")
        stats = publish_csv(settings, pub, path, policy=again)
    assert (stats.published, stats.backfill_run) == (2, "run-1")
    runs = [dict(r.headers)[eventtime.BACKFILL_HEADER] for r in read_topic(settings, raw_topic(settings, "sensor"),
                                                                           decode=False, expect=5)]
    assert runs == [b"run-1"] * 5


def test_cli_sensors_csv_shows_progress_off_a_terminal(settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The README promises a line every 10 s off a terminal for file ingest: `ingest sensors --csv` printed
    none (only `ingest weblog` did), so a 400k-row run said nothing for minutes."""
    import subprocess

    from tests.helpers import streamlearn_cmd, subprocess_env

    path = tmp_path / "p.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(f"s{i % 5},{NOW + i},{i}\n" for i in range(50)))
    done = subprocess.run(streamlearn_cmd("ingest", "sensors", "--csv", str(path)), env=subprocess_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ingest p.csv: done" in done.stderr, done.stderr[-2000:]  # the closing line, with the bytes read
