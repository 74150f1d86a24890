"""Web-log parsers on the real 10,000-line sample and on hand-made good and malformed lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.exceptions import LogParseError
from ingest.generators import web_traffic
from ingest.weblog import event_id_for, format_combined, parse_clf_time, parse_line

APACHE_LOGS = Path(__file__).resolve().parents[2] / "shared/data/weblogs/apache_logs"

LINE = (
    '83.149.9.216 - - [17/May/2015:10:05:03 +0000] "GET /presentations/logstash-monitorama-2013/'
    'images/kibana-search.png HTTP/1.1" 200 203023 '
    '"http://semicomplete.com/presentations/logstash-monitorama-2013/" '
    '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_1) AppleWebKit/537.36 (KHTML, like Gecko) '
    'Chrome/32.0.1700.77 Safari/537.36"'
)


def test_every_line_of_the_real_sample_parses() -> None:
    if not APACHE_LOGS.is_file():
        pytest.skip(f"{APACHE_LOGS} is absent (shared test data lives beside the project root)")
    ids = set()
    statuses = set()
    with APACHE_LOGS.open("rb") as fh:
        offset = 0
        for n, raw in enumerate(fh, 1):
            rec = parse_line(raw, source=str(APACHE_LOGS), position=offset)
            offset += len(raw)
            assert rec["client_ip"] and rec["method"] in ("GET", "HEAD", "POST", "OPTIONS"), n
            assert 1431820800000 <= rec["timestamp"] < 1432252800000, n  # 17-21 May 2015
            ids.add(rec["event_id"])
            statuses.add(rec["status"])
    assert n == 10_000
    assert len(ids) == 10_000
    assert {200, 304, 404} <= statuses


def test_combined_fields() -> None:
    rec = parse_line(LINE + "\n", source="access.log", position=0)
    assert rec["client_ip"] == "83.149.9.216"
    assert rec["ident"] is None and rec["user"] is None
    assert rec["timestamp"] == 1431857103000
    assert (rec["method"], rec["protocol"], rec["status"], rec["bytes_sent"]) == (
        "GET",
        "HTTP/1.1",
        200,
        203023,
    )
    assert rec["path"].endswith("kibana-search.png")
    assert rec["referrer"].startswith("http://semicomplete.com/")
    assert rec["user_agent"].startswith("Mozilla/5.0 (Macintosh")
    assert rec["latency_ms"] is None
    assert rec["event_id"] == event_id_for("access.log", 0, LINE)
    assert rec["event_id"] != parse_line(LINE, source="access.log", position=1)["event_id"]


def test_request_time_common_format_and_escapes() -> None:
    apache_d = parse_line(LINE + " 1534", source="s")  # %D microseconds
    assert apache_d["latency_ms"] == pytest.approx(1.534)
    nginx = parse_line(LINE + " 0.250", source="s")  # $request_time seconds
    assert nginx["latency_ms"] == pytest.approx(250.0)
    common = parse_line('10.0.0.1 - bob [01/Jan/2024:00:00:00 -0130] "POST /x HTTP/1.0" 500 -', source="s")
    assert common["user"] == "bob" and common["bytes_sent"] == 0 and common["referrer"] is None
    assert common["timestamp"] == 1704067200000 + 90 * 60 * 1000
    esc = parse_line('1.2.3.4 - - [01/Jan/2024:00:00:00 +0000] "GET /a HTTP/1.1" 200 5 "-" "say \\"hi\\""', source="s")
    assert esc["user_agent"] == 'say "hi"'
    dash = parse_line('1.2.3.4 - - [01/Jan/2024:00:00:00 +0000] "-" 408 0 "-" "-"', source="s")
    assert dash["method"] == "-" and dash["status"] == 408 and dash["user_agent"] is None
    xff = parse_line(LINE + ' "10.1.1.1"', source="s")  # nginx extra $http_x_forwarded_for
    assert xff["user_agent"].endswith("Safari/537.36")


def test_json_lines() -> None:
    nginx = json.dumps(
        {
            "remote_addr": "9.9.9.9",
            "time_iso8601": "2024-03-01T12:00:00+00:00",
            "request": "GET /api?q=1 HTTP/2.0",
            "status": "201",
            "body_bytes_sent": "12",
            "http_user_agent": "curl/8",
            "request_time": "0.004",
        }
    )
    rec = parse_line(nginx, source="s", position=7)
    assert rec["client_ip"] == "9.9.9.9" and rec["timestamp"] == 1709294400000
    assert (rec["method"], rec["path"], rec["protocol"]) == ("GET", "/api?q=1", "HTTP/2.0")
    assert rec["status"] == 201 and rec["bytes_sent"] == 12 and rec["latency_ms"] == pytest.approx(4.0)
    native = parse_line(
        json.dumps(
            {
                "client_ip": "1.1.1.1",
                "timestamp": 1709294400123,
                "method": "GET",
                "path": "/",
                "status": 200,
                "label": "bot",
                "event_id": "abc",
            }
        ),
        source="s",
    )
    assert native["timestamp"] == 1709294400123 and native["label"] == "bot" and native["event_id"] == "abc"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "empty"),
        ("garbage that is not a log line", "not_combined_format"),
        ('1.2.3.4 - - [17/Foo/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 1 "-" "-"', "bad_timestamp"),
        ('1.2.3.4 - - [17/May/2015:10:05:03] "GET / HTTP/1.1" 200 1 "-" "-"', "bad_timestamp"),
        ('1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" abc 1 "-" "-"', "not_combined_format"),
        ("{not json", "bad_json"),
        ("[1, 2]", "not_combined_format"),
        ('{"remote_addr": "1.1.1.1"}', "missing_field"),
        ('{"remote_addr": "1.1.1.1", "time": 1, "request": "GET / HTTP/1.1", "status": 99}', "bad_status"),
        (
            '{"remote_addr": "1.1.1.1", "time": "yesterday", "request": "GET /", "status": 200}',
            "bad_timestamp",
        ),
        (
            '{"remote_addr": "1.1.1.1", "time": "2024-01-01T00:00:00", "request": "GET /", "status": 200}',
            "bad_timestamp",
        ),
    ],
)
def test_malformed_lines_raise_with_reason(line: str, reason: str) -> None:
    with pytest.raises(LogParseError) as info:
        parse_line(line, source="s", position=0)
    assert info.value.reason == reason
    assert str(info.value)


def test_clf_time_offsets() -> None:
    assert parse_clf_time("01/Jan/1970:00:00:00 +0000") == 0
    assert parse_clf_time("01/Jan/1970:01:00:00 +0100") == 0
    assert parse_clf_time("01/Jan/1970:14:00:00 +1400") == parse_clf_time("31/Dec/1969:12:00:00 -1200") == 0


@pytest.mark.parametrize("text", ["31/Feb/2023:10:00:00 +0000", "29/Feb/2023:10:00:00 +0000",
                                  "31/Apr/2024:00:00:00 +0000", "01/Jan/2024:00:00:00 +0099",
                                  "01/Jan/2026:00:00:00 +9900", "01/Jan/2026:00:00:00 -1500"])
def test_clf_dates_that_do_not_exist_are_refused_not_carried_into_the_next_month(text: str) -> None:
    """31/Feb/2023 was read as 3 Mar 2023 (timegm carries the days over): a wrong time, not an error."""
    with pytest.raises(LogParseError) as err:
        parse_clf_time(text)
    assert err.value.reason == "bad_timestamp"


def test_clf_month_ends_and_leap_days_that_exist_are_read() -> None:
    assert parse_clf_time("29/Feb/2024:00:00:00 +0000") == 1709164800000
    assert parse_clf_time("31/Dec/1999:23:59:59 +0000") == 946684799000
    assert parse_clf_time("30/Apr/2024:00:00:00 +0000") + 86_400_000 == parse_clf_time("01/May/2024:00:00:00 +0000")


def test_format_combined_round_trips_generated_traffic() -> None:
    for rec in web_traffic(300, seed=3):
        back = parse_line(format_combined(rec), source="x")
        for key in ("client_ip", "method", "path", "protocol", "status", "user_agent", "referrer"):
            assert back[key] == rec[key], key
        assert back["timestamp"] == rec["timestamp"] // 1000 * 1000
        assert back["latency_ms"] == pytest.approx(rec["latency_ms"], abs=0.001)


@pytest.mark.parametrize("vhost", ["www.example.com:443", "example.org:80", "[2001:db8::1]:80"])
def test_vhost_combined_lines_read_as_the_combined_line_after_the_vhost(vhost: str) -> None:
    """Debian/Ubuntu write other_vhosts_access.log as ``%v:%p`` + combined; every line used to be a
    dead letter (not_combined_format)."""
    plain = '203.0.113.9 - alice [17/May/2015:10:05:03 +0000] "GET /a?b=1 HTTP/1.1" 404 120 "-" "curl/8.0"'
    got = parse_line(f"{vhost} {plain}", source="s", event_id="e")
    assert got == parse_line(plain, source="s", event_id="e")
    assert got["client_ip"] == "203.0.113.9" and got["user"] == "alice" and got["status"] == 404


@pytest.mark.parametrize("line", [
    'a b 1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 1 "-" "-"',
    'example.org 1.2.3.4 - - [17/May/2015:10:05:03 +0000] "GET / HTTP/1.1" 200 1 "-" "-"',  # %v without %p
    # a user name with a space must not be read one field to the left (client "-", ident "John")
    '203.0.113.9 - John Smith [17/May/2015:10:05:03 +0000] "GET /a HTTP/1.1" 200 120 "-" "curl/8.0"',
    '2001:db8::1 - John Smith [17/May/2015:10:05:03 +0000] "GET /a HTTP/1.1" 200 120 "-" "curl/8.0"',
])
def test_a_line_that_is_not_vhost_combined_is_still_refused(line: str) -> None:
    with pytest.raises(LogParseError) as err:
        parse_line(line, source="s")
    assert err.value.reason == "not_combined_format"


def _now_iso(fraction: str = "") -> str:
    import time as _time

    return _time.strftime(f"%Y-%m-%dT%H:%M:%S{fraction}Z", _time.gmtime())


@pytest.mark.parametrize(("name", "obj", "expected"), [
    ("caddy", {"level": "info", "ts": "NOW_S", "logger": "http.log.access", "msg": "handled request",
               "request": {"remote_ip": "203.0.113.7", "proto": "HTTP/2.0", "method": "GET", "host": "example.com",
                           "uri": "/shop?q=1", "headers": {"User-Agent": ["curl/8.4.0"],
                                                           "Referer": ["https://example.com/"]}},
               "user_id": "", "duration": 0.0125, "size": 10900, "status": 200},
     ("203.0.113.7", "GET", "/shop?q=1", "HTTP/2.0", 200, 10900, "curl/8.4.0", 12.5)),
    ("google cloud load balancer", {"httpRequest": {
        "requestMethod": "POST", "requestUrl": "https://example.com/api/v1/items?id=3", "status": 503,
        "responseSize": "1234", "userAgent": "Mozilla/5.0", "remoteIp": "198.51.100.4", "latency": "0.250s",
        "protocol": "HTTP/1.1"}, "timestamp": "NOW_ISO", "severity": "INFO"},
     ("198.51.100.4", "POST", "/api/v1/items?id=3", "HTTP/1.1", 503, 1234, "Mozilla/5.0", 250.0)),
    ("elastic common schema (filebeat)", {
        "@timestamp": "NOW_ISO", "source": {"ip": "192.0.2.9"}, "url": {"original": "/missing", "path": "/missing"},
        "http": {"request": {"method": "GET"}, "response": {"status_code": 404, "body": {"bytes": 321}}},
        "user_agent": {"original": "Go-http-client/1.1"}, "event": {"duration": 4_500_000}},
     ("192.0.2.9", "GET", "/missing", None, 404, 321, "Go-http-client/1.1", 4.5)),
    ("traefik", {"ClientHost": "192.0.2.33", "DownstreamContentSize": 42, "DownstreamStatus": 302,
                 "Duration": 1_500_000, "RequestMethod": "GET", "RequestPath": "/login", "RequestProtocol": "HTTP/1.1",
                 "StartUTC": "NOW_ISO_NS", "request_User-Agent": "Mozilla/5.0 (X11)"},
     ("192.0.2.33", "GET", "/login", "HTTP/1.1", 302, 42, "Mozilla/5.0 (X11)", 1.5)),
])
def test_json_access_logs_of_common_proxies_are_read(name: str, obj: dict, expected: tuple) -> None:  # type: ignore[type-arg]
    """Caddy, Google Cloud load balancers, Filebeat (ECS) and Traefik write JSON access logs with nested
    or differently named fields; every line of them was dead-lettered ('needs request or method + path')."""
    import time as _time

    from streaming.eventtime import EventTimePolicy, TimestampReader

    text = (json.dumps(obj).replace('"NOW_S"', repr(_time.time())).replace("NOW_ISO_NS", _now_iso(".542906519"))
            .replace("NOW_ISO", _now_iso(".123456")))
    record = parse_line(text, source="proxy.json", read_time=TimestampReader("auto"),
                        policy=EventTimePolicy())
    fields = ("client_ip", "method", "path", "protocol", "status", "bytes_sent", "user_agent")
    assert tuple(record[f] for f in fields) == expected[:7], name
    assert record["latency_ms"] == pytest.approx(expected[7]), name
    assert abs(record["timestamp"] - _time.time() * 1000) < 60_000, name


@pytest.mark.parametrize(
    "sent",
    ["\\x16\\x03\\x01\\x00\\xa5\\x01\\x00\\x00\\xa1\\x03\\x03", "\\x00", "G3T/ junk", "GET"],
)
def test_a_request_line_that_is_not_a_request_is_kept_as_an_event(sent: str) -> None:
    """A TLS handshake sent to the plain-HTTP port, which Apache logs escaped and answers 400, was a
    dead letter ('bad_request_line'); internet-facing logs hold a few percent of them, and they are what
    a bot or attack model must see. The line is well-formed: it is an event with method '-' (as a 408's
    '"-"' already was) and the request text as its path. Through the JSON path too."""
    line = f'203.0.113.9 - - [02/Dec/2026:10:00:01 +0000] "{sent}" 400 226 "-" "-"'
    r = parse_line(line, source="s", position=0)
    assert (r["method"], r["path"], r["protocol"], r["status"]) == ("-", sent, None, 400)  # as the server wrote it
    j = parse_line(json.dumps({"remote_addr": "203.0.113.9", "time": 1_796_205_601_000, "request": sent,
                               "status": 400}), source="s", position=0)
    assert (j["method"], j["path"], j["protocol"]) == ("-", sent, None)
