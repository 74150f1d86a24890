"""The ingest gateway over HTTP (FastAPI TestClient) against the real embedded broker.

Every accepted record is read back from its raw topic with the Subscriber; every rejected one
from the kind's dead-letter topic with its reason headers.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ingest.gateway.limits import GatewayLimits
from ingest.gateway.routes import create_app
from streaming.config import Settings
from streaming.consumer import Record
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic

TOKEN = "tok-Alice_0123456789"
OTHER = "tok-Bob_9876543210"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = int(time.time() * 1000)


def png(width: int = 8, height: int = 8, shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), shade).save(buf, format="PNG")
    return buf.getvalue()


def weblog(i: int) -> dict[str, Any]:
    return {"event_id": f"w-{i}", "client_ip": f"10.0.0.{i % 250}", "timestamp": NOW + i, "method": "GET",
            "path": f"/p/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 100 + i,
            "user_agent": "Mozilla/5.0", "latency_ms": 3.5}


def sensor(i: int) -> dict[str, Any]:
    return {"sensor_id": f"s-{i % 3}", "timestamp": NOW + i * 1000, "value": 20.0 + i, "unit": "celsius",
            "values": {"humidity": 0.5}}


def image(i: int) -> dict[str, Any]:
    return {"data": base64.b64encode(png(shade=i)).decode(), "label": str(i % 10), "timestamp": NOW + i}


EVENTS = {"weblog": weblog, "sensor": sensor, "image": image}


def gateway_settings(settings: Settings) -> Settings:
    return settings.with_(ingest_tokens=f"alice:{TOKEN},bob:{OTHER}")


@contextmanager
def client(settings: Settings, limits: GatewayLimits | None = None) -> Iterator[TestClient]:
    """A TestClient of a gateway on ``settings``' broker (its publisher is closed on exit)."""
    app = create_app(gateway_settings(settings), limits=limits)
    with TestClient(app) as tc:
        yield tc


def raw_records(settings: Settings, kind: str, expect: int | None = None) -> list[Record]:
    items = read_topic(settings, raw_topic(settings, kind), expect=expect, timeout=20)
    assert all(isinstance(it, Record) for it in items), [getattr(it, "error", None) for it in items]
    return items


def dead_letters(settings: Settings, kind: str, expect: int | None = None) -> list[Any]:
    return read_topic(settings, dead_letter_topic(settings, kind), decode=False, expect=expect, timeout=20)


@pytest.mark.parametrize("kind", ["weblog", "sensor", "image"])
def test_single_and_batch_json_are_acked_and_on_the_raw_topic(settings: Settings, kind: str) -> None:
    make = EVENTS[kind]
    with client(settings) as tc:
        one = tc.post(f"/ingest/{kind}", json=make(0), headers=AUTH)
        batch = tc.post(f"/ingest/{kind}", json=[make(i) for i in range(1, 4)], headers=AUTH)
    assert one.status_code == 200, one.text
    assert batch.status_code == 200, batch.text
    results = one.json()["results"] + batch.json()["results"]
    assert [r["status"] for r in results] == ["accepted"] * 4
    assert batch.json()["accepted"] == 3
    records = raw_records(settings, kind, expect=4)
    assert len(records) == 4
    placed = {(r.partition, r.offset) for r in records}
    assert placed == {(r["partition"], r["offset"]) for r in results}
    if kind == "image":
        assert {r.value["data"] for r in records} == {png(shade=i) for i in range(4)}
        assert {(r.value["content_type"], r.value["width"]) for r in records} == {("PNG", 8)}
    elif kind == "weblog":
        assert {r.value["event_id"] for r in records} == {f"w-{i}" for i in range(4)}
        assert all(r.value["source"] == "gateway" for r in records)
    else:
        assert sorted(r.value["value"] for r in records) == [20.0, 21.0, 22.0, 23.0]


def test_confluent_framed_avro_body_is_accepted_and_a_wrong_kind_is_rejected(settings: Settings) -> None:
    gs = gateway_settings(settings)
    with Publisher(gs) as pub:
        framed = pub.encode(raw_topic(gs, "sensor"), "SensorReading", {**sensor(7), "label": None,
                                                                       "event_id": "avro-1"})
        framed_weblog = pub.encode(raw_topic(gs, "weblog"), "WebLogEvent",
                                   {**weblog(1), "ident": None, "user": None, "referrer": None,
                                    "label": None, "source": None})
    with client(settings) as tc:
        ok = tc.post("/ingest/sensor", content=framed,
                     headers={**AUTH, "Content-Type": "application/vnd.streamlearn.avro"})
        wrong = tc.post("/ingest/sensor", content=framed_weblog,
                        headers={**AUTH, "Content-Type": "application/octet-stream"})
        garbage = tc.post("/ingest/sensor", content=b"\x00\x00\x00\x00\x01garbage",
                          headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["results"][0]["id"] == "avro-1"
    assert wrong.status_code == 422 and "WebLogEvent" in wrong.json()["results"][0]["error"]
    assert garbage.status_code == 422
    [record] = raw_records(settings, "sensor", expect=1)
    assert record.value["event_id"] == "avro-1" and record.value["value"] == 27.0
    dls = dead_letters(settings, "sensor", expect=2)
    assert {bytes(d.raw) for d in dls} == {framed_weblog, b"\x00\x00\x00\x00\x01garbage"}


def test_multipart_upload_accepts_good_images_and_dead_letters_bad_ones(settings: Settings) -> None:
    good = png(16, 12)
    truncated = png(9, 9)[:-20]
    files = [("files", ("seven.png", good, "image/png")),
             ("files", ("bad.png", truncated, "image/png")),
             ("files", ("fake.jpg", b"not an image at all", "image/jpeg"))]
    with client(settings) as tc:
        resp = tc.post("/ingest/images", files=files, data={"label": "7"}, headers=AUTH)
    assert resp.status_code == 207, resp.text
    results = resp.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected", "rejected"]
    assert results[1]["reason"] == "truncated" and results[2]["reason"] == "bad_magic"
    [record] = raw_records(settings, "image", expect=1)
    assert record.value["data"] == good and (record.value["width"], record.value["height"]) == (16, 12)
    assert record.value["label"] == "7" and record.value["source"] == "gateway:seven.png"
    dls = dead_letters(settings, "image", expect=2)
    by_index = {header_dict(d.headers)["dl.source_index"]: d for d in dls}
    assert bytes(by_index["1"].raw) == truncated
    assert header_dict(by_index["2"].headers)["dl.stage"] == "gateway"


def test_auth_401_without_or_with_malformed_header_and_403_for_unknown_token(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with client(settings) as tc:
        missing = tc.post("/ingest/weblog", json=weblog(0))
        basic = tc.post("/ingest/weblog", json=weblog(0), headers={"Authorization": f"Basic {TOKEN}"})
        unknown = tc.post("/ingest/weblog", json=weblog(0),
                          headers={"Authorization": "Bearer nope-" + TOKEN})
        ok = tc.post("/ingest/weblog", json=weblog(0), headers={"Authorization": f"Bearer {OTHER}"})
        # an unknown path is a 404 in the gateway's shape; a trailing slash is no redirect
        for path in ("/ingest/..%2Fweblog", "/ingest/weblog/", "/nope"):
            lost = tc.post(path, json=weblog(0), headers={"Authorization": f"Bearer {OTHER}"},
                           follow_redirects=False)
            assert lost.status_code == 404 and "no route" in lost.json()["error"], (path, lost.text)
        metrics = tc.get("/metrics").text
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert basic.status_code == 401 and basic.headers["WWW-Authenticate"].startswith("Bearer")
    assert unknown.status_code == 403
    assert ok.status_code == 200
    for text in (missing.text, basic.text, unknown.text, metrics, caplog.text, repr(caplog.records)):
        assert TOKEN not in text and OTHER not in text
    assert 'streamlearn_gateway_requests_total{route="/ingest/{kind}",status="401"} 2.0' in metrics
    assert raw_records(settings, "weblog", expect=1)[0].value["event_id"] == "w-0"


def test_content_length_over_the_limit_is_413_before_anything_is_read(settings: Settings) -> None:
    with client(settings, GatewayLimits(max_body_bytes=1000)) as tc:
        big = tc.post("/ingest/weblog", content=json.dumps([weblog(i) for i in range(50)]),
                      headers={**AUTH, "Content-Type": "application/json"})
        small = tc.post("/ingest/weblog", json=weblog(1), headers=AUTH)
    assert big.status_code == 413 and "1000 bytes" in big.json()["error"]
    assert small.status_code == 200


def test_rate_limit_is_per_token_and_answers_429_with_retry_after(settings: Settings) -> None:
    with client(settings, GatewayLimits(rate_records_per_s=0.5, burst_records=3)) as tc:
        first = tc.post("/ingest/sensor", json=[sensor(i) for i in range(3)], headers=AUTH)
        limited = tc.post("/ingest/sensor", json=sensor(9), headers=AUTH)
        other = tc.post("/ingest/sensor", json=sensor(10), headers={"Authorization": f"Bearer {OTHER}"})
    assert first.status_code == 200
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert other.status_code == 200
    assert len(raw_records(settings, "sensor", expect=4)) == 4


def test_in_flight_limit_answers_503_immediately_while_held(settings: Settings) -> None:
    with client(settings, GatewayLimits(max_in_flight=0)) as tc:
        zero = tc.post("/ingest/weblog", json=weblog(0), headers=AUTH)
    assert zero.status_code == 503 and zero.headers["Retry-After"] == "1"
    with client(settings, GatewayLimits(max_in_flight=1)) as tc:
        inflight = tc.app.state.gateway.inflight  # type: ignore[attr-defined]
        inflight.add(1)  # another request's record waiting for its ack
        held = tc.post("/ingest/weblog", json=weblog(1), headers=AUTH)
        inflight.release(1)
        freed = tc.post("/ingest/weblog", json=weblog(2), headers=AUTH)
        assert inflight.count == 0
    assert held.status_code == 503
    assert freed.status_code == 200
    assert [r.value["event_id"] for r in raw_records(settings, "weblog", expect=1)] == ["w-2"]


def test_the_same_event_twice_is_published_once(settings: Settings) -> None:
    bare = {k: v for k, v in weblog(5).items() if k != "event_id"}  # id derived from the content
    with client(settings) as tc:
        first = tc.post("/ingest/weblog", json=[weblog(1), weblog(1), bare], headers=AUTH)
        again = tc.post("/ingest/weblog", json=[dict(reversed(list(bare.items()))), weblog(1)], headers=AUTH)
        sensor_again = [tc.post("/ingest/sensor", json=sensor(3), headers=AUTH) for _ in range(2)]
    assert first.status_code == 200
    assert [r["status"] for r in first.json()["results"]] == ["accepted", "duplicate", "accepted"]
    assert [r["status"] for r in again.json()["results"]] == ["duplicate", "duplicate"]
    assert first.json()["results"][0]["offset"] == first.json()["results"][1]["offset"]
    assert [r.json()["results"][0]["status"] for r in sensor_again] == ["accepted", "duplicate"]
    assert sensor_again[1].json()["results"][0]["id"] == f"s-0:{NOW + 3000}"
    assert len(raw_records(settings, "weblog")) == 2
    assert len(raw_records(settings, "sensor")) == 1


def test_idempotency_key_replays_the_stored_answer(settings: Settings) -> None:
    body = [weblog(1), {"client_ip": "x"}]
    with client(settings) as tc:
        headers = {**AUTH, "Idempotency-Key": "req-1"}
        first = tc.post("/ingest/weblog", json=body, headers=headers)
        replay = tc.post("/ingest/weblog", json=body, headers=headers)
        conflict = tc.post("/ingest/weblog", json=[weblog(2)], headers=headers)
        other_token = tc.post("/ingest/weblog", json=body,
                              headers={"Authorization": f"Bearer {OTHER}", "Idempotency-Key": "req-1"})
    assert first.status_code == 207
    assert replay.status_code == 207 and replay.json() == first.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert conflict.status_code == 409
    # another token's key space is its own, and so is its event-id window (issue 12: one key holder
    # must not be able to make another's event a "duplicate"); consumers dedupe by event id
    assert other_token.json()["results"][0]["status"] == "accepted"
    assert len(raw_records(settings, "weblog", expect=2)) == 2
    assert len(dead_letters(settings, "weblog", expect=2)) == 2  # first + other token, not the replay


def test_rejected_records_land_in_the_dead_letter_topic_with_reasons(settings: Settings) -> None:
    bad_sensor = {**sensor(1), "value": "hot"}
    nan_sensor = {**sensor(2), "value": float("nan")}
    with client(settings) as tc:
        resp = tc.post("/ingest/sensor", content=json.dumps([sensor(0), bad_sensor, nan_sensor, 5]),
                       headers={**AUTH, "Content-Type": "application/json"})
        none_valid = tc.post("/ingest/sensor", json=[bad_sensor], headers=AUTH)
    assert resp.status_code == 207, resp.text
    statuses = [r["status"] for r in resp.json()["results"]]
    assert statuses == ["accepted", "rejected", "rejected", "rejected"]
    assert resp.json()["results"][2]["reason"] == "nan"
    assert none_valid.status_code == 422
    dls = dead_letters(settings, "sensor", expect=4)
    headers = [header_dict(d.headers) for d in dls]
    assert sorted(h["dl.source_index"] for h in headers) == ["0", "1", "2", "3"]
    assert all(h["dl.stage"] == "gateway" and h["dl.source_remote"] for h in headers)
    nan_letter = next(d for d, h in zip(dls, headers, strict=True) if h["dl.source_index"] == "2"
                      and "NaN" in h["dl.message"])
    assert json.loads(bytes(nan_letter.raw).replace(b"NaN", b"null"))["sensor_id"] == "s-2"
    assert len(raw_records(settings, "sensor")) == 1


def test_unusable_bodies_get_400_or_415_and_the_body_is_kept(settings: Settings) -> None:
    with client(settings) as tc:
        not_json = tc.post("/ingest/weblog", content=b"{not json",
                           headers={**AUTH, "Content-Type": "application/json"})
        empty = tc.post("/ingest/weblog", json=[], headers=AUTH)
        text = tc.post("/ingest/weblog", content=b"hello", headers={**AUTH, "Content-Type": "text/plain"})
        unknown_kind = tc.post("/ingest/video", json={}, headers=AUTH)
    assert not_json.status_code == 400 and "not valid" in not_json.json()["error"]
    assert empty.status_code == 400
    assert text.status_code == 415
    assert unknown_kind.status_code == 404
    dls = dead_letters(settings, "weblog", expect=2)
    assert {bytes(d.raw) for d in dls} == {b"{not json", b"[]"}


def test_health_metrics_and_openapi(settings: Settings) -> None:
    with client(settings) as tc:
        health = tc.get("/healthz")
        tc.post("/ingest/weblog", json=weblog(0), headers=AUTH)
        metrics = tc.get("/metrics").text
        spec = tc.get("/openapi.json").json()
        docs = tc.get("/docs")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["kafka"]["partitions"] == settings.partitions
    assert 'streamlearn_gateway_records_total{kind="weblog",status="accepted"} 1.0' in metrics
    assert "streamlearn_gateway_ack_latency_seconds_bucket" in metrics
    assert "streamlearn_gateway_in_flight_records 0.0" in metrics
    assert {"/ingest/{kind}", "/ingest/images", "/healthz", "/metrics"} <= set(spec["paths"])
    body_types = spec["paths"]["/ingest/{kind}"]["post"]["requestBody"]["content"]
    assert "application/vnd.streamlearn.avro" in body_types
    assert docs.status_code == 200


def test_health_is_503_when_the_producer_cannot_reach_kafka(settings: Settings) -> None:
    # kafka-python cannot even build a producer without a reachable broker, and the shared test
    # broker must stay up, so the unreachable state is a producer whose connections are closed.
    publisher = Publisher(gateway_settings(settings))
    app = create_app(gateway_settings(settings), publisher=publisher)
    with TestClient(app) as tc:
        assert tc.get("/healthz").status_code == 200
        publisher.close(timeout=5)
        resp = tc.get("/healthz")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
    assert resp.headers["Retry-After"] == "5"


def test_a_rejected_records_id_is_echoed_cut_to_the_id_limit(settings: Settings) -> None:
    """A 2,000,000-character event_id came back whole in the 422: one small request, a 2 MB answer."""
    from streaming.limits import MAX_ID_CHARS

    long_id = "y" * 200_000
    with client(settings) as tc:
        resp = tc.post("/ingest/sensor", json={**sensor(1), "event_id": long_id}, headers=AUTH)
    assert resp.status_code == 422
    result = resp.json()["results"][0]
    assert result["status"] == "rejected" and result["id"] == long_id[:MAX_ID_CHARS]
    assert result["id_chars"] == 200_000 and len(resp.content) < 5_000


def test_concurrent_health_probes_share_one_check(settings: Settings) -> None:
    """Probes queued behind a lock, one 5 s Kafka timeout each while Kafka was down: twelve monitors
    waited up to 60 s. Now probes that arrive during a check wait for that check."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(gateway_settings(settings))
    gw = app.state.gateway
    calls: list[float] = []
    release = threading.Event()

    def slow_unreachable(timeout_s: float) -> int:
        calls.append(timeout_s)
        release.wait(10)
        raise ConnectionError("kafka down")

    with TestClient(app) as tc:
        gw._metadata_round_trip = slow_unreachable  # hangs: each check ends at the 6 s bound
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: tc.get("/healthz"), range(8)))
        finally:
            release.set()
        took = time.monotonic() - started
    assert [a.status_code for a in answers] == [503] * 8
    assert answers[0].json() == {"status": "unavailable", "kafka": "TimeoutError"}
    assert len(calls) == 1, (calls, took)  # every probe arrived within the one check: it was 8 checks, 48 s


def test_records_kafka_does_not_take_are_retryable_503_not_lost_silently(settings: Settings) -> None:
    gs = gateway_settings(settings)
    publisher = Publisher(gs)
    app = create_app(gs, publisher=publisher)
    with TestClient(app) as tc:
        publisher.close(timeout=5)  # the producer no longer sends anything
        resp = tc.post("/ingest/weblog", json=[weblog(1), {"bad": 1}], headers=AUTH)
        with client(settings) as healthy:  # the same event later, through a working gateway
            retried = healthy.post("/ingest/weblog", json=[weblog(1)], headers=AUTH)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    results = resp.json()["results"]
    assert all(r["status"] == "rejected" and r["retryable"] for r in results)
    assert "Kafka" in results[0]["error"]
    assert app.state.gateway.inflight.count == 0
    assert app.state.gateway.seen.claim(("weblog", "w-1"))[0] == "new"  # forgotten: a resend publishes
    assert retried.status_code == 200 and retried.json()["results"][0]["status"] == "accepted"
    assert len(raw_records(settings, "weblog", expect=1)) == 1


def test_a_restarted_gateway_seeded_from_the_topic_still_answers_duplicate(settings: Settings) -> None:
    with client(settings) as first:
        assert first.post("/ingest/sensor", json=[sensor(1), sensor(2)], headers=AUTH).status_code == 200
    app = create_app(gateway_settings(settings))  # a new process would start with an empty window
    assert app.state.gateway.seed_idempotency(600) == 2
    with TestClient(app) as second:
        again = second.post("/ingest/sensor", json=[sensor(1), sensor(3)], headers=AUTH)
    assert [r["status"] for r in again.json()["results"]] == ["duplicate", "accepted"]
    assert len(raw_records(settings, "sensor", expect=3)) == 3


def test_chunked_multipart_upload_over_the_limit_is_413(settings: Settings) -> None:
    head = b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    body = head + png()[:8] + b"\x00" * 5000 + b"\r\n--xx--\r\n"
    with client(settings, GatewayLimits(max_body_bytes=2000)) as tc:
        resp = tc.post("/ingest/images", content=iter([body[:1000], body[1000:3000], body[3000:]]),
                       headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xx"})
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert resp.status_code == 413


def test_an_unusable_multipart_upload_is_a_dead_letter_and_an_error_object(settings: Settings) -> None:
    """Too many fields, an unknown field, a missing closing boundary or a bad timestamp field were answered
    by starlette as {"detail": ...} (not the gateway's {"error": ...}) and kept nothing; a JSON body that
    is unusable as a whole was always dead-lettered. Now an upload is too."""
    boundary = "XyZ"
    unclosed = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + png(4, 4)  # no closing boundary
    many = [("f" + str(i), "x") for i in range(20)]
    with client(settings) as tc:
        answers = [
            tc.post("/ingest/images", data=dict(many), files=[("files", ("a.png", png(4, 4), "image/png"))],
                    headers=AUTH),
            tc.post("/ingest/images", data={"colour": "red"}, files=[("files", ("a.png", png(4, 4), "image/png"))],
                    headers=AUTH),
            tc.post("/ingest/images", content=unclosed,
                    headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}),
            tc.post("/ingest/images", data={"timestamp": "yesterday"},
                    files=[("files", ("a.png", png(4, 4), "image/png"))], headers=AUTH),
        ]
    for answer in answers:
        assert answer.status_code == 400 and set(answer.json()) == {"error", "results"}, answer.text
    assert "not usable multipart" in answers[0].json()["error"]
    assert "no complete file" in answers[2].json()["error"]
    dls = dead_letters(settings, "image", expect=4)
    assert {header_dict(d.headers)["dl.source_index"] for d in dls} == {"body"}
    assert any(bytes(d.raw) == unclosed for d in dls)
