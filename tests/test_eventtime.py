"""The event-time policy (streaming/eventtime.py) and its use by every entry, without a broker.

Fixtures under tests/fixtures/eventtime/ are small hand-made files shaped like public data:
a weekly station series 1962-1975 (00:00 UTC readings, gaps, ``nan`` values), a yearly series
from 1700 with ISO dates, and monthly readings 1966-1973 in each epoch unit (negative epochs
before 1970).
"""

from __future__ import annotations

import calendar
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from ingest import sensors
from ingest.exceptions import SourceError
from ingest.gateway import records as gateway_records
from ingest.weblog import parse_line
from streaming import config, eventtime
from streaming.eventtime import (
    BACKFILL_HEADER,
    EventTimePolicy,
    TimestampReader,
    backfill_run,
    magnitude_unit,
    parse_iso_ms,
)
from streaming.exceptions import EventTimeError, FeatureValidationError
from streaming.features.sensor import SensorFeaturizer

FIXTURES = Path(__file__).parent / "fixtures" / "eventtime"
NOW = 1_795_000_000_000  # 2026-11-18
MIN = 60_000


def ms(y: int, mo: int = 1, d: int = 1) -> int:
    return calendar.timegm((y, mo, d, 0, 0, 0)) * 1000


# -- units -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_epochs_1966_1973_read_exactly_in_each_declared_unit(unit: str) -> None:
    rows = list(sensors.read_csv(FIXTURES / f"monthly_1966_1973_{unit}.csv", now=NOW, timestamp_unit=unit,
                                 policy=EventTimePolicy(max_age_ms=None)))
    assert [r.error for r in rows if r.error] == []
    times = [r.record["timestamp"] for r in rows if r.record]
    assert times[0] == ms(1966) < 0 and times[-1] == ms(1973, 12)
    assert ms(1970) in times  # the epoch itself
    assert times == sorted(times) and len(times) == 96


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_auto_decides_once_per_file_and_logs_it(unit: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streaming.eventtime")
    rows = list(sensors.read_csv(FIXTURES / f"monthly_1966_1973_{unit}.csv", now=NOW,
                                 policy=EventTimePolicy(max_age_ms=None)))
    assert [r.record["timestamp"] for r in rows if r.record][0] == ms(1966)
    assert all(r.error is None for r in rows)
    decided = [m for m in caplog.messages if "auto decided" in m]
    assert len(decided) == 1 and f"'{unit}'" in decided[0] and "1966-01-01" in decided[0]


def test_january_1970_milliseconds_declared_are_read_as_milliseconds(caplog: pytest.LogCaptureFixture) -> None:
    # The reported case: epoch ms of January 1970 (< 1e11) was published as October 2013, silently.
    jan_1970_ms = 1_209_600_000  # 1970-01-15 in ms; as seconds it would be 2008
    assert TimestampReader("ms")(jan_1970_ms) == jan_1970_ms
    assert TimestampReader("ms")(str(jan_1970_ms)) == jan_1970_ms
    # auto cannot know better from this value alone; it decides once and says so in the log.
    caplog.set_level(logging.INFO, logger="streaming.eventtime")
    assert TimestampReader("auto", source="f.csv")(jan_1970_ms) == jan_1970_ms * 1000
    assert any("f.csv" in m and "auto decided 's'" in m and "2008-05-01" in m for m in caplog.messages)
    with pytest.raises(EventTimeError) as info:
        TimestampReader("auto")(86_400_000)  # 1 day in ms or 1972 in seconds: refuses to guess
    assert info.value.reason == "timestamp_unit_ambiguous" and "--timestamp-unit" in str(info.value)


def test_auto_refuses_a_file_it_cannot_decide(tmp_path: Path) -> None:
    path = tmp_path / "jan1970.csv"
    path.write_text("sensor_id,timestamp,value\n" + "".join(f"a,{1_000_000 + i * 3_600_000},1\n" for i in range(20)))
    with pytest.raises(SourceError, match="--timestamp-unit s"):
        list(sensors.read_csv(path, now=NOW))


def test_auto_rejects_later_rows_in_another_unit_instead_of_reinterpreting(tmp_path: Path) -> None:
    lines = [f"a,{ms(2026, 11) + i * MIN},{i}" for i in range(5)]
    lines.append(f"a,{(ms(2026, 11) + 9 * MIN) // 1000},9")  # seconds in a millisecond file
    lines.append(f"a,{ms(2026, 11) + 10 * MIN},nan")
    path = tmp_path / "mixed.csv"
    path.write_text("sensor_id,timestamp,value\n" + "\n".join(lines) + "\n")
    rows = list(sensors.read_csv(path, now=NOW))
    assert [r.error.reason if r.error else None for r in rows] == [None] * 5 + ["timestamp_unit_mismatch", "nan"]
    assert "auto decided 'ms'" in str(rows[5].error)


@pytest.mark.parametrize("where", [3, 30], ids=["early", "late"])
def test_one_row_in_a_larger_unit_does_not_turn_the_others_into_1970(tmp_path: Path, where: int) -> None:
    """The largest value used to decide: one nanosecond row among millisecond ones made every
    millisecond row January 1970 (with --backfill, published as such). The rows now vote."""
    base = ms(2026, 11)
    lines = [f"a,{base + i * MIN},{i}" for i in range(50)]
    lines[where] = f"a,{(base + where * MIN) * 1_000_000},{where}"  # the same instant, in ns
    path = tmp_path / "outlier.csv"
    path.write_text("sensor_id,timestamp,value\n" + "\n".join(lines) + "\n")
    rows = list(sensors.read_csv(path, now=NOW, policy=EventTimePolicy(max_age_ms=None)))
    reasons = [r.error.reason if r.error else None for r in rows]
    assert reasons == [None] * where + ["timestamp_unit_mismatch"] + [None] * (49 - where)
    assert [r.record["timestamp"] for r in rows if r.record][:2] == [base, base + MIN]


def test_a_tied_vote_is_refused_not_guessed() -> None:
    with pytest.raises(EventTimeError) as info:
        TimestampReader("auto", source="f").decide([ms(2026, 11), ms(2026, 11) * 1_000_000])
    assert info.value.reason == "timestamp_unit_ambiguous" and "1 like ms, 1 like ns" in str(info.value)


def test_magnitude_classes_do_not_overlap() -> None:
    assert [magnitude_unit(v) for v in (1.7e9, 1.7e12, 1.7e15, 1.7e18, -1.26e8, 5e7, 5e10)] == [
        "s", "ms", "us", "ns", "s", None, None]


def test_iso_8601_forms() -> None:
    assert parse_iso_ms("1700-01-01") == ms(1700)
    assert parse_iso_ms("1962-01-07T00:00:00Z") == ms(1962, 1, 7)
    assert parse_iso_ms("1962-01-07T02:00:00+02:00") == ms(1962, 1, 7)
    assert parse_iso_ms("2026-11-29T12:00:00.250Z") % 1000 == 250
    with pytest.raises(EventTimeError, match="no UTC offset"):
        parse_iso_ms("1962-01-07T00:00:00")
    with pytest.raises(EventTimeError) as info:
        TimestampReader("iso")(1_700_000_000)
    assert info.value.reason == "bad_timestamp" and "--timestamp-unit" in str(info.value)


def test_naive_iso_times_are_read_in_the_zone_the_source_names() -> None:
    """Spreadsheets, loggers and SQL dumps write '2024-01-01 00:04:00' with no offset; such a time was
    refused with 'append Z or +hh:mm', so a user had to rewrite the file. --timezone (or
    STREAMLEARN_TIMESTAMP_TIMEZONE) names the zone; times with an offset keep their own."""
    from zoneinfo import ZoneInfo

    with pytest.raises(EventTimeError, match="--timezone"):
        parse_iso_ms("2024-01-01 00:04:00")
    berlin = ZoneInfo("Europe/Berlin")
    assert parse_iso_ms("2024-01-01 00:04:00", ZoneInfo("UTC")) == parse_iso_ms("2024-01-01T00:04:00Z")
    assert parse_iso_ms("2024-01-15 12:00:00", berlin) == parse_iso_ms("2024-01-15T11:00:00Z")  # CET, +1
    assert parse_iso_ms("2024-07-15 12:00:00", berlin) == parse_iso_ms("2024-07-15T10:00:00Z")  # CEST, +2
    assert parse_iso_ms("2024-10-27 02:30:00", berlin) == parse_iso_ms("2024-10-27T00:30:00Z")  # repeated: first
    assert parse_iso_ms("2024-07-15T12:00:00-05:00", berlin) == parse_iso_ms("2024-07-15T17:00:00Z")  # its own
    assert parse_iso_ms("2024-07-15", berlin) == parse_iso_ms("2024-07-15T00:00:00Z")  # a bare date stays UTC
    reader = eventtime.policy(config.load(environ={"STREAMLEARN_TIMESTAMP_TIMEZONE": "America/New_York"}),
                              source="x").reader("auto", source="x")
    assert reader("2024-01-15 07:00:00") == parse_iso_ms("2024-01-15T12:00:00Z")
    assert eventtime.policy(config.load(environ={}), timezone="UTC").timezone == "UTC"  # the flag wins
    with pytest.raises(EventTimeError, match="--timezone 'Mars/Olympus' is not a time zone") as info:
        eventtime.policy(config.load(environ={}), timezone="Mars/Olympus")
    assert info.value.reason == "bad_setting"
    with pytest.raises(EventTimeError, match="STREAMLEARN_TIMESTAMP_TIMEZONE"):
        eventtime.policy(config.load(environ={"STREAMLEARN_TIMESTAMP_TIMEZONE": "CEST+2"}))


# -- the window -------------------------------------------------------------------------------------
def test_window_messages_name_the_flags() -> None:
    live = EventTimePolicy()
    (old,) = live.problems(ms(1962), NOW)
    assert old.reason == "timestamp_too_old" and "--backfill" in str(old) and "--max-age" in str(old)
    (ahead,) = live.problems(NOW + 6 * MIN, NOW)
    assert ahead.reason == "timestamp_in_future" and "5m" in str(ahead)
    assert live.problems(NOW + 4 * MIN, NOW) == []
    backfill = EventTimePolicy(max_age_ms=None, backfill=True, run_id="r1")
    assert backfill.problems(ms(1678), NOW) == [] and backfill.problems(ms(1700), NOW) == []
    assert [p.reason for p in backfill.problems(ms(1677), NOW)] == ["timestamp_out_of_range"]
    assert [p.reason for p in backfill.problems(NOW + 6 * MIN, NOW)] == ["timestamp_in_future"]
    assert backfill.headers() == [(BACKFILL_HEADER, b"r1")] and live.headers() == []
    assert backfill_run(backfill.headers()) == "r1" and backfill_run([("other", b"x")]) is None


def test_policy_from_flags_and_env(tmp_path: Path) -> None:
    env = {"STREAMLEARN_HOME": str(tmp_path), "STREAMLEARN_MAX_FUTURE_SKEW_S": "120",
           "STREAMLEARN_EVENT_MAX_AGE": "30d"}
    s = config.load(environ=env)
    live = eventtime.policy(s)
    assert (live.max_age_ms, live.max_future_ms, live.backfill) == (30 * 86_400_000, 120_000, False)
    bf = eventtime.policy(s, backfill=True, source="x.csv")
    assert bf.backfill and bf.max_age_ms is None and bf.run_id
    assert eventtime.policy(s, backfill=True, max_age="400y").max_age_ms == eventtime.parse_duration_ms("400y")
    assert eventtime.policy(config.load(environ={**env, "STREAMLEARN_BACKFILL": "1"})).backfill
    with pytest.raises(EventTimeError, match="--max-age"):
        eventtime.policy(s, max_age="ten years")
    for absurd in ("9" * 300 + "y", "20000y"):  # the first was an OverflowError traceback
        with pytest.raises(EventTimeError, match="--max-age .* use none for no limit"):
            eventtime.parse_duration_ms(absurd)
    assert eventtime.format_duration(97_138_700_000) == "3.1y"  # was '9.71387e+07s' in messages
    assert eventtime.parse_duration_ms(eventtime.format_duration(97_138_700_000)) is not None


# -- sources ----------------------------------------------------------------------------------------
def test_weekly_series_from_decades_ago_live_vs_backfill() -> None:
    path = FIXTURES / "weekly_1962_1975_s.csv"
    live = list(sensors.read_csv(path, now=NOW))
    assert live and all(r.error is not None for r in live)
    nan_rows = [r for r in live if b",nan," in r.raw]
    assert len(nan_rows) == 23
    # The value problem is reported first, the clock problem too: all reasons, never masked.
    assert {tuple(getattr(r.error, "reasons", ())) for r in nan_rows} == {("nan", "timestamp_too_old")}
    assert all("--backfill" in str(r.error) for r in live)
    bf = EventTimePolicy(max_age_ms=None, backfill=True, run_id="w")
    rows = list(sensors.read_csv(path, now=NOW, policy=bf))
    good = [r.record for r in rows if r.record]
    assert len(good) == len(rows) - 23 == 660
    assert {tuple(r.error.reasons) for r in rows if r.error} == {("nan",)}
    assert good[0]["timestamp"] == ms(1962, 1, 7) and all(r["timestamp"] % 86_400_000 == 0 for r in good)


def test_yearly_series_from_1700_with_iso_dates() -> None:
    rows = list(sensors.read_csv(FIXTURES / "yearly_1700_iso.csv", now=NOW,
                                 policy=EventTimePolicy(max_age_ms=None, backfill=True, run_id="y")))
    assert all(r.error is None for r in rows) and len(rows) == 101
    times = [r.record["timestamp"] for r in rows if r.record]
    assert times[0] == ms(1700) and times[-1] == ms(1800)


def test_several_problems_are_all_reported_value_first() -> None:
    rec = {"sensor_id": "", "timestamp": NOW + 3_600_000, "value": math.inf, "values": {"h": math.nan},
           "unit": "c"}
    with pytest.raises(sensors.SensorValidationError) as info:
        sensors.validate(rec, now=NOW)
    assert info.value.reasons == ["infinite", "nan", "missing_sensor_id", "timestamp_in_future"]
    assert info.value.reason == "infinite"


def test_weblog_json_numbers_use_the_stream_unit() -> None:
    line = json.dumps({"remote_addr": "1.2.3.4", "time": 1_700_000_000, "request": "GET / HTTP/1.1",
                       "status": 200})
    assert parse_line(line, source="t", read_time=TimestampReader("s"))["timestamp"] == 1_700_000_000_000
    assert parse_line(line, source="t")["timestamp"] == 1_700_000_000  # default: epoch ms, as documented


def test_publish_file_lines_accept_iso_and_declared_units() -> None:
    from ingest.jsonlines import event_from_line

    live = EventTimePolicy()
    rec = event_from_line("sensor", json.dumps({"sensor_id": "a", "timestamp": "2026-11-29T10:00:00Z",
                                                 "value": 1.5, "unit": "c"}), TimestampReader("auto"), live)
    assert rec["timestamp"] == parse_iso_ms("2026-11-29T10:00:00Z")
    bf = EventTimePolicy(max_age_ms=None, backfill=True, run_id="p")
    old = event_from_line("weblog", json.dumps(_weblog_event(timestamp=-126_230_400)), TimestampReader("s"), bf)
    assert old["timestamp"] == ms(1966)
    with pytest.raises(sensors.SensorValidationError) as info:
        event_from_line("sensor", json.dumps({"sensor_id": "a", "timestamp": "1962-01-07", "value": "nan?",
                                              "unit": "c"}), TimestampReader("auto"), live)
    assert info.value.reasons == ["not_a_number", "timestamp_too_old"]


def _weblog_event(**over: Any) -> dict[str, Any]:
    rec = {"event_id": "e1", "client_ip": "1.2.3.4", "ident": None, "user": None, "timestamp": 0, "method": "GET",
           "path": "/", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1, "referrer": None,
           "user_agent": None, "latency_ms": None, "label": None, "source": "t"}
    rec.update(over)
    return rec


def test_gateway_applies_the_same_window_minutes_not_a_day() -> None:
    now = eventtime.now_ms()
    ahead = gateway_records.record_item("sensor", 0, {"sensor_id": "a", "timestamp": now + 23 * 3_600_000,
                                                      "value": 1.0, "unit": "c"})
    assert ahead.status == "rejected" and getattr(ahead.error, "reason", None) == "timestamp_in_future"
    near = gateway_records.record_item("sensor", 0, {"sensor_id": "a", "timestamp": now + 2 * MIN,
                                                     "value": 1.0, "unit": "c"})
    assert near.status == "pending" and near.record is not None
    iso = gateway_records.record_item("sensor", 0, {"sensor_id": "a", "timestamp": "2026-11-29T00:00:00Z",
                                                    "value": 1.0, "unit": "c"})
    assert iso.record is not None or getattr(iso.error, "reason", None) == "timestamp_in_future"
    weblog = gateway_records.record_item("weblog", 0, {"remote_addr": "1.2.3.4", "time": now + 10 * MIN,
                                                       "request": "GET / HTTP/1.1", "status": 200})
    assert weblog.status == "rejected" and getattr(weblog.error, "reason", None) == "timestamp_in_future"
    rules = gateway_records.TimeRules(EventTimePolicy(max_age_ms=None, backfill=True, run_id="g"), "s")
    old = gateway_records.record_item("sensor", 0, {"sensor_id": "a", "timestamp": -126_230_400, "value": 1.0,
                                                    "unit": "c"}, rules)
    assert old.record is not None and old.record["timestamp"] == ms(1966)


# -- featurizer state ----------------------------------------------------------------------------------
def _reading(t: int, value: float = 1.0, sid: str = "s1") -> dict[str, Any]:
    return {"sensor_id": sid, "timestamp": t, "value": value, "values": {}, "unit": "c", "label": None}


def test_a_future_reading_never_makes_later_real_readings_late() -> None:
    f = SensorFeaturizer(clock_ms=lambda: NOW, allowed_lateness_ms=10_000)
    assert f.max_future_ms == 5 * MIN
    s = f.new_state()
    f.featurize(_reading(NOW - 1000), s)
    before = f.state_to_json(s)
    with pytest.raises(FeatureValidationError, match="ahead of now"):
        f.featurize(_reading(NOW + 6 * MIN), s)  # beyond the shared window: rejected, state untouched
    assert f.state_to_json(s) == before
    f.featurize(_reading(NOW + 4 * MIN), s)  # a clock 4 minutes ahead: accepted
    row = f.featurize(_reading(NOW), s)  # the real reading after it is NOT late
    assert row.event_time_ms == NOW
    with pytest.raises(FeatureValidationError, match="late reading"):
        f.featurize(_reading(NOW - 60_000), s)  # genuinely late by the live rules


def test_backfill_runs_are_featurized_apart_from_live_state() -> None:
    f = SensorFeaturizer(clock_ms=lambda: NOW)
    s = f.new_state()
    live = f.featurize_event(_reading(NOW - 1000, 5.0), s)
    history = [f.featurize_event(_reading(ms(1962, 1, 7) + w * 7 * 86_400_000, 300.0 + w), s, "run-a")
               for w in range(20)]
    assert history[-1].labels["next_value_delta"] == pytest.approx(1.0)  # its own window, in order
    assert history[-1].key == "s1" and live.key == "s1"
    # Out of order inside the run, within the retained history: inserted, not "late".
    f.featurize_event(_reading(ms(1962, 1, 8), 300.5), s, "run-a")
    # The live window is untouched by the history: the next live reading follows the live one.
    nxt = f.featurize_event(_reading(NOW, 6.0), s)
    assert nxt.labels["next_value_delta"] == pytest.approx(1.0)
    restored = f.state_from_json(f.state_to_json(s))
    assert restored == s


@pytest.mark.parametrize("kind", ["weblog", "sensor", "image"])
def test_demo_generators_never_emit_event_times_ahead_of_the_clock(kind: str) -> None:
    """Issue 14: the demo publishes faster than the generators' own spacing (weblog 6x, images 15x);
    event times ran ahead and, with a 5-minute future window, would be rejected after a minute."""
    import itertools

    from streamlearn.demo import _events

    start = eventtime.now_ms()
    events = list(itertools.islice(_events(kind, 1, start), 3000))
    assert max(e["timestamp"] for e in events) <= eventtime.now_ms()
    times = [e["timestamp"] for e in events]
    assert times == sorted(times)  # still in event-time order
    f = {"weblog": None, "sensor": SensorFeaturizer(), "image": None}[kind]
    if f is not None:
        state = f.new_state()
        for e in events:
            f.featurize(e, state)  # none is late or ahead


def test_gateway_answers_carry_all_reasons() -> None:
    item = gateway_records.record_item("sensor", 3, {"sensor_id": "a", "timestamp": eventtime.now_ms() + 3_600_000,
                                                     "value": math.nan, "unit": "c"})
    assert item.result()["reason"] == "nan" and item.result()["reasons"] == "nan,timestamp_in_future"
    assert item.reason_fields() == {"reason": "nan", "reasons": "nan,timestamp_in_future"}


def test_a_future_request_does_not_push_real_requests_out_of_the_client_window() -> None:
    from streaming.features.weblog import WeblogFeaturizer

    f = WeblogFeaturizer(clock_ms=lambda: NOW)
    s = f.new_state()
    ev = _weblog_event(client_ip="9.9.9.9")
    f.featurize(ev | {"timestamp": NOW + 4 * MIN}, s)  # a clock 4 minutes ahead: accepted
    counts = [f.featurize(ev | {"timestamp": NOW + i * 1000}, s).x for i in range(5)]
    rate = f.feature_names.index("log1p_client_rate_60s")
    assert [round(math.expm1(float(x[rate]))) for x in counts] == [1, 2, 3, 4, 5]  # real requests all counted
    with pytest.raises(FeatureValidationError):
        f.featurize(ev | {"timestamp": NOW + 6 * MIN}, s)


def test_weblog_json_line_with_several_problems_reports_all_value_first() -> None:
    from ingest.exceptions import LogParseError

    line = json.dumps({"remote_addr": "1.2.3.4", "time": "1962-01-07T00:00:00Z", "request": "GET / HTTP/1.1",
                       "status": 42, "latency_ms": float("inf")})
    with pytest.raises(LogParseError) as info:
        parse_line(line.replace("Infinity", "1e999"), source="t", policy=EventTimePolicy())
    assert info.value.reasons == ["bad_latency", "bad_status", "timestamp_too_old"]


def test_gateway_refuses_auto_and_unknown_units_with_a_config_error() -> None:
    for unit in ("auto", "minutes"):
        with pytest.raises(config.ConfigError, match="STREAMLEARN_INGEST_TIMESTAMP_UNIT"):
            gateway_records.TimeRules(EventTimePolicy(), unit)
