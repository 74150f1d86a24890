"""One hostile line or label file is one dead letter, never the end of a run (found by exploratory runs on
2026-12-02; each of these stopped its command, and every re-run stopped at the same place)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from ingest.exceptions import ImageValidationError, LogParseError
from ingest.image_check import MAX_LABEL_FILE_BYTES, label_for
from ingest.jsonlines import JsonLinesSource
from ingest.weblog import parse_line
from streaming.eventtime import EventTimePolicy


@pytest.mark.parametrize("bad", ["[1, 2, 3]", "null", '"hello"', "17"])
def test_a_json_line_that_is_no_object_is_rejected_and_the_run_goes_on(bad: str) -> None:
    now = int(time.time() * 1000)
    good = [json.dumps({"sensor_id": s, "timestamp": now - 1000, "value": 1.5, "unit": "c"}) for s in ("a", "b")]
    stream = io.BytesIO("\n".join([good[0], bad, good[1]]).encode() + b"\n")
    src = JsonLinesSource("sensor", stream=stream, policy=EventTimePolicy(max_age_ms=None), timestamp_unit="ms")
    items = []
    with pytest.raises(StopIteration):
        while True:
            items += src.next_batch()
    assert [it.record is not None for it in items] == [True, False, True]
    assert items[1].source["reason"] == "schema" and "expected a JSON object" in str(items[1].error)


def test_an_image_line_whose_data_is_not_base64_is_rejected_and_the_run_goes_on() -> None:
    line = json.dumps({"image_id": "x", "timestamp": int(time.time() * 1000), "content_type": "image/png",
                       "data": "not base64!", "width": 8, "height": 8})
    src = JsonLinesSource("image", stream=io.BytesIO(line.encode() + b"\n"), policy=EventTimePolicy(max_age_ms=None),
                          timestamp_unit="ms")
    (item,) = src.next_batch()
    assert item.record is None and "base64" in str(item.error)


@pytest.mark.parametrize("line", [
    '1.2.3.5 - - [02/Dec/2026:10:00:00 +0000] "GET /b HTTP/1.1" 200 12 "-" "ua" ' + "9" * 400,
    '1.2.3.5 - - [02/Dec/2026:10:00:00 +0000] "GET /b HTTP/1.1" 200 ' + "9" * 5000 + ' "-" "ua"',
    '{"remote_addr": "1.2.3.4", "time": 1796200000, "request": "GET / HTTP/1.1", "status": 200, '
    '"body_bytes_sent": 1e400}',
])
def test_a_number_out_of_range_in_a_log_line_is_that_lines_rejection(line: str) -> None:
    with pytest.raises(LogParseError) as err:
        parse_line(line, source="t")
    assert err.value.reason in {"bad_number", "bad_bytes", "bad_latency"}, err.value.reason


def _image(folder: Path) -> Path:
    img = folder / "secret.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")  # only its name matters to label_for
    return img


def test_a_label_file_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("TOPSECRET")
    drop = tmp_path / "drop"
    drop.mkdir()
    img = _image(drop)
    (drop / "secret.png.label").symlink_to(outside)
    with pytest.raises(ImageValidationError) as err:
        label_for(img)
    assert err.value.reason == "bad_label" and "TOPSECRET" not in str(err.value)


def test_a_label_file_that_is_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    img = _image(tmp_path)
    os.mkfifo(tmp_path / "secret.png.label")  # before: label_for blocked here until a writer came
    with pytest.raises(ImageValidationError, match="not a regular file"):
        label_for(img)


def test_a_label_file_is_read_within_its_bound(tmp_path: Path) -> None:
    img = _image(tmp_path)
    (tmp_path / "secret.png.label").symlink_to("/dev/zero")  # before: read until memory ran out
    with pytest.raises(ImageValidationError):
        label_for(img)
    (tmp_path / "secret.png.label").unlink()
    (tmp_path / "secret.png.label").write_bytes(b"7" * (MAX_LABEL_FILE_BYTES + 1))
    with pytest.raises(ImageValidationError, match="a label is a short class name"):
        label_for(img)
    (tmp_path / "secret.png.label").write_text("7\n")
    assert label_for(img) == "7"


def _clf(**over: str) -> str:
    f = {"ip": "10.0.0.1", "stamp": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(time.time() - 5)),
         "path": "/a", "status": "200", "size": "512", "ua": "curl/8", "tail": ""} | over
    request = f'"GET {f["path"]} HTTP/1.1" {f["status"]} {f["size"]}'
    return f'{f["ip"]} - - [{f["stamp"]}] {request} "-" "{f["ua"]}"{f["tail"]}'


@pytest.mark.parametrize(("line", "reason"), [
    (_clf(path="/" + "p" * 200_000), "bad_path"),
    (_clf(ua="u" * 5000), "bad_user_agent"),
    ('{"remote_addr": "", "time": "2024-01-01T00:00:00Z", "request": "GET / HTTP/1.1", "status": 200}',
     "bad_client_ip"),
    ('{"client_ip": "10.0.0.1", "time": "2024-01-01T00:00:00Z", "request": "GET / HTTP/1.1", "status": 200, '
     '"bytes_sent": -5}', "bad_bytes"),
    ('{"client_ip": "10.0.0.1", "time": "2024-01-01T00:00:00Z", "request": "GET / HTTP/1.1", "status": 200, '
     '"latency_ms": -1}', "bad_latency"),
    (_clf(tail=" " + "9" * 400 + ".5"), "bad_latency"),  # read as infinity, published as such
    (_clf(tail=" 172800.5"), "bad_latency"),  # two days in seconds: over the features' one-day bound
], ids=["long_path", "long_user_agent", "empty_ip", "negative_bytes", "negative_latency", "huge_latency",
        "two_day_latency"])
def test_a_log_line_the_features_cannot_use_is_refused_where_it_is_read(line: str, reason: str) -> None:
    """Such lines were published and then dead-lettered by every stream worker (and a 400-digit latency
    became infinity on the raw topic); now they are one dead letter at ingestion, with the field named."""
    from ingest.exceptions import LogParseError
    from ingest.weblog import parse_line

    with pytest.raises(LogParseError) as err:
        parse_line(line, source="t", policy=EventTimePolicy(max_age_ms=None))
    assert err.value.reason == reason, err.value
    assert "the web-log features cannot use it" in str(err.value) or reason == "bad_latency"


def test_a_weblog_json_line_for_publish_is_held_to_the_same_fields_and_real_odd_statuses_pass() -> None:
    now = int(time.time() * 1000)
    base = {"event_id": "e", "client_ip": "10.0.0.1", "ident": None, "user": None, "timestamp": now - 1000,
            "method": "GET", "path": "/", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1, "referrer": None,
            "user_agent": None, "latency_ms": None, "label": None, "source": "t"}
    lines = [base | {"bytes_sent": -1}, base | {"status": 999}, base | {"status": 0}]
    stream = io.BytesIO(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    src = JsonLinesSource("weblog", stream=stream, policy=EventTimePolicy(max_age_ms=None), timestamp_unit="ms")
    items = []
    with pytest.raises(StopIteration):
        while True:
            items += src.next_batch()
    assert [it.source.get("reason") for it in items] == ["bad_bytes", None, None]


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("status", 200.7, "bad_status"), ("body_bytes_sent", 12.9, "bad_bytes")], ids=["status", "bytes"])
def test_a_fraction_in_an_integer_field_of_a_json_log_line_is_refused_not_cut(field: str, value: float,
                                                                             reason: str) -> None:
    """`"status": 200.7` was published as 200 and `"body_bytes_sent": 12.9` as 12, without a word."""
    from ingest.exceptions import LogParseError
    from ingest.weblog import parse_line

    line = {"remote_addr": "1.2.3.4", "time": "2024-01-01T00:00:00Z", "request": "GET / HTTP/1.1", "status": 200,
            "body_bytes_sent": 10, field: value}
    with pytest.raises(LogParseError) as err:
        parse_line(json.dumps(line), source="t", policy=EventTimePolicy(max_age_ms=None))
    assert reason in err.value.reasons, err.value
    whole = dict(line, **{field: float(int(value))})  # 200.0 is a whole number: taken
    assert parse_line(json.dumps(whole), source="t", policy=EventTimePolicy(max_age_ms=None))
