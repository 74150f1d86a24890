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
