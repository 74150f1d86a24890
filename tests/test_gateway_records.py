"""Pure tests of how the gateway turns request bodies into records (no broker needed)."""

from __future__ import annotations

import base64
import json

import pytest

from ingest.gateway.errors import BadRequestError, RecordRejectedError
from ingest.gateway.records import event_key, image_file_item, is_json, media_type, parse_json_body
from tests.test_gateway_http import NOW, png, sensor, weblog


def test_media_type_and_json_detection() -> None:
    assert media_type("Application/JSON; charset=utf-8") == "application/json"
    assert media_type(None) == ""
    assert is_json("application/json") and is_json("application/cloudevents+json") and is_json("")
    assert not is_json("text/plain") and not is_json("application/octet-stream")


@pytest.mark.parametrize("body, message", [
    (b"", "empty"), (b"   ", "empty"), (b"[]", "empty JSON array"), (b"42", "JSON int"),
    (b"{oops", "not valid"), (b"\xff\xfe\x00", "not valid"), (b"[" * 100_000, "not valid"),
])
def test_bodies_unusable_as_a_whole_are_bad_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_json_body("weblog", body, 100)
    assert message in info.value.message


def test_batch_over_the_record_limit_is_refused() -> None:
    with pytest.raises(BadRequestError, match="over the limit of 2"):
        parse_json_body("sensor", json.dumps([sensor(i) for i in range(3)]).encode(), 2)


def test_each_element_is_judged_on_its_own() -> None:
    body = json.dumps([sensor(0), "text", {**sensor(1), "value": None}, {**sensor(2), "colour": 1}]).encode()
    items = parse_json_body("sensor", body, 100)
    assert [i.status for i in items] == ["pending", "rejected", "rejected", "rejected"]
    assert items[0].key == f"s-0:{NOW}" and items[0].record is not None
    assert "JSON object" in str(items[1].error) and "colour" in str(items[3].error)
    assert json.loads(items[3].original)["colour"] == 1  # the element itself is what is dead-lettered


def test_weblog_ids_come_from_the_event_or_from_its_content_regardless_of_key_order() -> None:
    supplied = parse_json_body("weblog", json.dumps(weblog(3)).encode(), 10)[0]
    assert supplied.key == "w-3"
    bare = {k: v for k, v in weblog(4).items() if k != "event_id"}
    a = parse_json_body("weblog", json.dumps(bare).encode(), 10)[0]
    b = parse_json_body("weblog", json.dumps(dict(reversed(list(bare.items())))).encode(), 10)[0]
    assert a.key == b.key and a.key is not None and len(a.key) == 40


def test_json_image_gets_type_and_size_from_its_bytes_and_declared_mismatch_is_rejected() -> None:
    data = png(5, 3)
    ok = parse_json_body("image", json.dumps({"data": base64.b64encode(data).decode(), "label": "1"}).encode(), 10)[0]
    assert ok.record is not None
    assert (ok.record["content_type"], ok.record["width"], ok.record["height"]) == ("PNG", 5, 3)
    assert ok.key == event_key("image", ok.record) == ok.record["image_id"]
    wrong = {"data": base64.b64encode(data).decode(), "width": 6}
    assert "does not match" in str(parse_json_body("image", json.dumps(wrong).encode(), 10)[0].error)
    not_b64 = {"data": "***"}
    assert "base64" in str(parse_json_body("image", json.dumps(not_b64).encode(), 10)[0].error)


def test_sensor_iso_timestamps_and_non_finite_values() -> None:
    iso = {**sensor(0), "timestamp": "2026-11-22T03:00:00Z"}
    [item] = parse_json_body("sensor", json.dumps(iso).encode(), 10)
    assert item.record is not None and item.record["timestamp"] == 1795316400000
    nan = b'{"sensor_id": "s", "timestamp": %d, "value": NaN, "unit": "c"}' % NOW
    [bad] = parse_json_body("sensor", nan, 10)
    assert bad.status == "rejected" and getattr(bad.error, "reason", None) == "nan"


def test_uploaded_file_extension_is_checked_only_when_present() -> None:
    data = png()
    assert image_file_item(0, "x.png", data, label=None, timestamp=NOW).record is not None
    assert image_file_item(0, "blob", data, label=None, timestamp=NOW).record is not None
    wrong = image_file_item(0, "x.jpg", data, label=None, timestamp=NOW)
    assert wrong.status == "rejected" and getattr(wrong.error, "reason", None) == "wrong_extension"
    source = image_file_item(0, "C:\\dir\\y.png", data, label=None, timestamp=NOW).record
    assert source is not None and source["source"] == "gateway:y.png"


def test_gateway_latency_bound_is_the_featurizers_so_nothing_accepted_is_dead_lettered_later() -> None:
    from streaming.features import weblog as weblog_features

    top = weblog_features.MAX_LATENCY_MS
    body = json.dumps([{**weblog(1), "latency_ms": top}, {**weblog(2), "latency_ms": top * 1.01}]).encode()
    ok, too_slow = parse_json_body("weblog", body, 10)
    assert ok.status == "pending", ok.error
    assert too_slow.status == "rejected" and "latency_ms" in str(too_slow.error)


def test_one_event_key_for_the_gateway_and_the_label_join() -> None:
    from streaming.topics import event_key as key

    assert key("weblog", {"event_id": "w-1"}) == "w-1"
    assert key("image", {"image_id": "i-1", "event_id": "ignored"}) == "i-1"
    assert key("sensor", {"event_id": None, "sensor_id": "s", "timestamp": 5}) == "s:5"
    assert key("sensor", {"sensor_id": "s"}) is None and key("weblog", {"event_id": ""}) is None
    with pytest.raises(RecordRejectedError, match="needs an id"):
        event_key("image", {"image_id": None})


def _outcome(item: object) -> tuple[object, ...]:
    error = getattr(item, "error", None)
    return (getattr(item, "status"), getattr(item, "key"), getattr(item, "record"),  # noqa: B009
            type(error).__name__, str(error), getattr(error, "reason", None))


def test_weblog_events_read_as_parsed_are_judged_exactly_as_through_the_text_path() -> None:
    """A body whose size and depth already bound each event skips the per-event dump + parse
    (``bounded``); every outcome -- record, derived id, error class, text and reason -- must be the
    one the text path gives."""
    bare = {k: v for k, v in weblog(7).items() if k != "event_id"}
    events: list[object] = [
        weblog(1), bare, dict(reversed(list(bare.items()))), {**bare, "extra": {"nested": [1, {"a": None}]}},
        {**weblog(2), "status": True}, {**weblog(3), "status": "abc"}, {**weblog(4), "status": 99},
        {**weblog(5), "latency_ms": float("nan")}, {**weblog(6), "latency_ms": -1}, {**weblog(8), "bytes_sent": "x"},
        {**weblog(9), "timestamp": "not a time"}, {**weblog(10), "timestamp": -2_208_988_800_000},
        {k: v for k, v in weblog(11).items() if k != "client_ip"}, {"remote_addr": "1.2.3.4", "request": 5},
        {"remote_addr": "1.2.3.4", "time": NOW, "request": "GET /a?b=1 HTTP/1.1", "status": 200},
        {"httpRequest": {"remoteIp": "::1", "requestMethod": "GET", "requestUrl": "https://h/x?q", "status": 201,
                         "latency": "0.25s"}, "timestamp": NOW, "event_id": "gcp-1"},
        {**weblog(12), "user_agent": "ünïcødé \ud800", "referrer": "-"}, "not an object", [],
    ]
    body = json.dumps(events).encode()
    text_path = parse_json_body("weblog", body, 100)
    parsed = parse_json_body("weblog", body, 100, depth=4)
    assert [_outcome(i) for i in parsed] == [_outcome(i) for i in text_path]
    assert sum(i.status == "pending" for i in parsed) >= 5 and sum(i.status == "rejected" for i in parsed) >= 8


def test_events_whose_bounds_the_body_does_not_imply_still_go_through_the_text_path() -> None:
    """An event over one JSON line's limit (1 MB) in a larger body is refused as a file source refuses
    the line; the bounded path is only taken where it cannot arise."""
    from ingest.gateway.records import MAX_REENCODE_GROWTH
    from streaming.limits import MAX_JSON_BYTES

    big = {**weblog(1), "user_agent": "x" * (MAX_JSON_BYTES + 10)}
    body = json.dumps([big, weblog(2)]).encode()
    assert len(body) * MAX_REENCODE_GROWTH > MAX_JSON_BYTES
    first, second = parse_json_body("weblog", body, 10, depth=2)
    assert first.status == "rejected" and "over the limit" in str(first.error)
    assert second.status == "pending"
    assert repr(1e15) == "1000000000000000.0" and len(repr(1e15)) / len("1e15") <= MAX_REENCODE_GROWTH


def test_which_bodies_bound_their_events_without_the_text_round_trip() -> None:
    from ingest.gateway.records import events_within_line_bounds
    from streaming.limits import MAX_JSON_BYTES

    small = json.dumps([weblog(i) for i in range(3)]).encode()
    assert events_within_line_bounds(small, 2)
    assert not events_within_line_bounds(small, None) and not events_within_line_bounds(small, 33)
    pad = "y" * (MAX_JSON_BYTES // 3)
    mid = json.dumps([{**weblog(1), "user_agent": pad}]).encode()  # over 1/5 MB, under 1 MB
    assert events_within_line_bounds(mid, 2)
    for exponent in (b"1e15", b"-2.5E+3", b"[1E400]"):
        assert not events_within_line_bounds(mid[:-2] + b', "n": ' + exponent + b"}]", 2), exponent
    assert events_within_line_bounds(mid[:-2] + b', "n": "a 1e15 in text", "m": 1.5}]', 2)
    assert not events_within_line_bounds(json.dumps([{"a": "z" * MAX_JSON_BYTES}]).encode(), 2)
