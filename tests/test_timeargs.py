"""The one command-line time parser: ISO 8601, epoch with a unit, relative; errors name the flag."""

from __future__ import annotations

import argparse
import subprocess
from datetime import UTC, datetime

import pytest

from streaming.timeargs import TimeArgError, attach_relative_values, format_ms, parse_time, time_arg
from streamlearn.cli import build_parser
from tests.helpers import streamlearn_cmd

NOW = 1_795_000_000_123  # a fixed "now" for relative forms
T0 = int(datetime(2026, 11, 22, 10, 0, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize("text,expected", [
    ("2026-11-22T10:00:00Z", T0),
    ("2026-11-22T10:00:00z", T0),
    ("2026-11-22T10:00:00", T0),  # no zone = UTC
    ("2026-11-22 10:00", T0),
    ("2026-11-22T11:00:00+01:00", T0),
    ("2026-11-22T10:00:00.250Z", T0 + 250),
    ("2026-11-22", T0 - 10 * 3_600_000),
    (f"{T0 // 1000}s", T0),
    (f"{T0}ms", T0),
    (f"{T0 * 1000}us", T0),
    (f"{T0 * 1_000_000}ns", T0),
    ("-45s", NOW - 45_000),
    ("-30m", NOW - 30 * 60_000),
    ("-2h", NOW - 2 * 3_600_000),
    ("-7d", NOW - 7 * 86_400_000),
    ("-1w", NOW - 7 * 86_400_000),
    (" -2h ", NOW - 2 * 3_600_000),
    ("now", NOW),
])
def test_accepted_forms(text: str, expected: int) -> None:
    assert parse_time(text, flag="--from-timestamp", now_ms=NOW) == expected


@pytest.mark.parametrize("text,fragment", [
    ("1700000000", "bare number; say its unit, e.g. '1700000000s'"),
    ("1700000000000", "'1700000000000ms'"),
    ("-5", "bare number"),
    ("+2h", "relative times look back from now with a minus sign"),
    ("-2y", "one of s, m, h, d, w"),
    ("yesterday", "is not a time"),
    ("2026-13-01", "is not a time"),
    ("", "empty"),
])
def test_refused_forms_name_the_flag_and_the_accepted_forms(text: str, fragment: str) -> None:
    with pytest.raises(TimeArgError) as info:
        parse_time(text, flag="--until-timestamp", now_ms=NOW)
    msg = str(info.value)
    assert msg.startswith("--until-timestamp: ") and fragment in msg
    if text:
        assert "ISO 8601" in msg and "-2h" in msg and "ms" in msg


def test_argparse_type_and_negative_values() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a time"):
        time_arg("--to")("soon")
    parser = build_parser()  # registers the time flags, as streamlearn.cli.main does before parsing
    argv = ["replay", "sensor", "--from-timestamp", "-2h", "--to", "-30m", "--into", "x"]
    assert attach_relative_values(argv) == ["replay", "sensor", "--from-timestamp=-2h", "--to=-30m", "--into", "x"]
    # a wrong relative value reaches our parser too; a following option is left alone
    assert attach_relative_values(["--to", "-2x"]) == ["--to=-2x"]
    assert attach_relative_values(["--to", "--into", "x"]) == ["--to", "--into", "x"]
    # only values of time flags, nothing after "--"
    assert attach_relative_values(["--into", "-2h", "--", "--to", "-1h"]) == ["--into", "-2h", "--", "--to", "-1h"]
    args = parser.parse_args(attach_relative_values(argv))
    assert abs((args.to - args.from_timestamp) - 90 * 60_000) < 5_000


def test_every_time_flag_uses_the_one_parser() -> None:
    parser = build_parser()

    def parsed(argv: list[str], dest: str) -> int:
        value: int = getattr(parser.parse_args(attach_relative_values(argv)), dest)
        return value

    iso = "2026-11-22T10:00:00"
    assert parsed(["subscribe", "sensor.raw", "--from-timestamp", iso], "from_timestamp") == T0
    assert parsed(["subscribe", "sensor.raw", "--until-timestamp", f"{T0}ms"], "until_timestamp") == T0
    assert parsed(["replay", "sensor", "--from-timestamp", iso, "--into", "r"], "from_timestamp") == T0
    assert parsed(["replay", "sensor", "--from-beginning", "--to", iso, "--into", "r"], "to") == T0
    assert parsed(["offsets", "reset", "--kind", "sensor", "--to-timestamp", iso], "to_timestamp") == T0


def test_cli_error_names_the_flag_and_forms() -> None:
    out = subprocess.run(streamlearn_cmd("replay", "sensor", "--from-timestamp", "1700000000", "--into", "x"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "argument --from-timestamp: '1700000000' is a bare number" in out.stderr
    assert "1700000000s" in out.stderr and "-2h" in out.stderr


def test_format_ms_round_trips() -> None:
    text = format_ms(T0 + 7)
    assert text.startswith("2026-11-22T10:00:00.007Z")
    assert parse_time(text.split()[0]) == T0 + 7
    assert parse_time(text.split()[1].strip("()")) == T0 + 7


def test_times_before_1970_are_the_start_of_the_topic_and_after_9999_are_refused() -> None:
    """1000-01-01 was kafka-python's 'target time cannot be negative' traceback in subscribe, replay and
    offsets reset; 99999999999999999999s a struct.error traceback (subscribe: a 30 s hang first)."""
    assert parse_time("1000-01-01", flag="--from-timestamp") == 0
    assert parse_time("1969-12-31T23:59:59Z", flag="--to") == 0
    assert parse_time("-100000w", flag="--from-timestamp", now_ms=NOW) == 0
    assert parse_time("9999-12-31T23:59:59.999Z", flag="--to") == 253_402_300_799_999
    for text in ("99999999999999999999s", "253402300800000ms"):
        with pytest.raises(TimeArgError, match=r"^--to: .* is after 9999-12-31"):
            parse_time(text, flag="--to")


def test_event_time_bounds_keep_times_before_1970_and_every_millisecond_is_exact() -> None:
    """query's --start/--end bound event times, which backfill takes back to 1678; and ISO times were
    read through a float, so 2004-03-15T07:55:47.472Z came out one millisecond early."""
    assert parse_time("1962-01-01", flag="--start", event_time=True) == -252_460_800_000
    assert time_arg("--end", event_time=True)("1678-01-01T00:00:00Z") == -9_214_560_000_000
    assert parse_time("2004-03-15T07:55:47.472Z") == 1_079_337_347_472
    for ms in range(1_079_337_347_000, 1_079_337_348_000):  # every millisecond of a second that went wrong
        assert parse_time(format_ms(ms).split()[0]) == ms


@pytest.mark.parametrize(("args", "fragment"), [
    (["--from-offset", "-5"], "offsets run from 0"),
    (["--from-offset", "99999999999999999999"], "offsets run from 0"),
    (["--until-offset", "x"], "is not an offset"),
    (["--max-records", "-1"], "give at least 1"),
    (["--max-records", "0"], "give at least 1"),
])
def test_subscribe_positions_and_counts_out_of_range_are_usage_errors(args: list[str], fragment: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as code:
        build_parser().parse_args(["subscribe", "weblog.raw", *args])
    assert code.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "fragment"), [
    (["publish", "sensor", "--generate", "-1"], "--generate: -1: give at least 0"),
    (["publish", "sensor", "--generate", "9" * 23], "give at most 100000000"),  # ran for ever before 1970
    (["publish", "sensor", "--generate", "3", "--seed", "-1"], "--seed: -1: give at least 0"),
    (["ingest", "sensors", "--generate", "5", "--sensors", "0"], "--sensors: 0: give at least 1"),
    (["ingest", "sensors", "--generate", "5", "--interval-ms", "-5"], "--interval-ms: -5: give at least 1"),
    (["ingest", "images", "--watch", "d", "--poll", "0"], "--poll: 0: give more than 0"),
    (["stream", "sensor", "--idle-exit", "nan"], "--idle-exit: nan: give a finite number"),  # never exited
    (["stream", "sensor", "--idle-exit", "-1"], "give at least 0"),
    (["subscribe", "x", "--idle-timeout", "inf"], "give a finite number"),
    (["store", "gc", "--retention-days", "-3"], "--retention-days: -3: give at least 0"),
    (["offsets", "reset", "sensor", "--to-offset", "-1"], "offsets run from 0"),
    (["serve", "m", "--http-port", "70000"], "--http-port: 70000: give at most 65535"),
    (["predict", "m", "--file", "f", "--timeout", "0"], "give more than 0"),
    (["query", "features", "--kind", "sensor", "--limit", "0"], "give at least 1"),
    (["jobs", "list", "--limit", "x"], "'x' is not a whole number"),
    (["demo", "--weblog-rate", "nan"], "give a finite number"),
    (["retrain", "--reproduce", "m/1", "--tolerance", "-1"], "give at least 0"),
    (["train", "m", "--keep", "0"], "--keep: 0: give at least 1"),  # trained and published, then failed
    (["store", "gc", "--retention-days", "nan"], "give a finite number"),  # deleted every unprotected batch
])
def test_numbers_no_command_can_use_are_usage_errors_naming_the_flag(argv: list[str], fragment: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """They were tracebacks (--generate -1, --sensors 0), a run that never ended (--idle-exit nan, 23-digit
    --generate) or an instant exit (--idle-exit -1): streamlearn/argtypes.py bounds every such flag."""
    with pytest.raises(SystemExit) as code:
        build_parser().parse_args(argv)
    assert code.value.code == 2
    assert fragment in capsys.readouterr().err
