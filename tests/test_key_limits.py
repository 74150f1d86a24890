"""Kafka keys and ids are bounded at every entry (docs/SECURITY.md, "Hostile input").

* An id field (schemas/ids.py: event_id, client_ip, sensor_id, image_id, request_id, model) over
  MAX_ID_CHARS is refused at encode with RecordValidationError naming the field and the limit, so
  every entry's caller dead-letters that record with its reason and goes on: ``publish --file``,
  the ingest runner (tailer, sensor CSV, image watcher, generators), the HTTP gateway.
* ``Publisher._send`` refuses a key over MAX_KEY_BYTES (InputLimitError naming ``key``).
* A dead letter is never refused for its key: one over MAX_DL_KEY_BYTES is cut, with its digest.
* A foreign producer's huge key on a raw topic neither stops nor wedges the stream worker.

All against the session's embedded broker; no TensorFlow (the serving worker's side is
tests/test_poison_serving.py: a 100 KB raw key and an 800 KB request id from a foreign producer).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ingest.gateway.routes import create_app
from ingest.runner import SourceRunner
from ingest.sensor_csv import publish_csv
from ingest.sensors import CSV_HEADER
from ingest.source import IterSource
from schemas.exceptions import RecordValidationError
from schemas.ids import ID_FIELDS
from streaming.config import Settings
from streaming.limits import MAX_DL_KEY_BYTES, MAX_ID_CHARS, MAX_KEY_BYTES, InputLimitError
from streaming.producer import KEY_FIELDS, Publisher, header_dict
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.poison_helpers import foreign_send
from tests.test_stream_worker import running_worker, stored_offsets, topic_offsets

NOW = int(time.time() * 1000)
LONG = 300_000  # the 300 KB event_id measured by hand before this bound existed


def weblog(i: int, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"w-{i}", "client_ip": f"10.0.0.{i}", "ident": None, "user": None, "timestamp": NOW + i,
            "method": "GET", "path": f"/p/{i}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 100 + i,
            "referrer": None, "user_agent": "Mozilla/5.0", "latency_ms": 3.5, "label": None, "source": None,
            **fields}


RECORDS: dict[str, dict[str, Any]] = {
    "WebLogEvent": weblog(0),
    "SensorReading": {"sensor_id": "s-1", "timestamp": NOW, "value": 1.0, "values": {}, "unit": "C",
                      "label": None, "event_id": "e-1"},
    "ImageEvent": {"image_id": "i-1", "timestamp": NOW, "content_type": "PNG", "width": 1, "height": 1,
                   "data": b"\x89PNG", "label": None, "source": None},
    "PredictionRequest": {"request_id": "r-1", "model": "m", "timestamp": NOW, "event_json": None,
                          "features": [1.0], "reply_topic": None},
    "ModelUpdate": {"model": "m", "version": 1, "action": "CREATED", "path": "/x", "timestamp": NOW,
                    "primary_metric": None, "candidate_score": None, "current_score": None, "reason": None},
}
CASES = [(name, f) for name, fields in ID_FIELDS.items() for f in fields]


def test_every_key_field_is_an_id_field_and_the_bounds_agree() -> None:
    """A record's Kafka key field is always capped (else a new schema could bring an unbounded key back)."""
    assert MAX_KEY_BYTES >= 4 * MAX_ID_CHARS  # no valid id (UTF-8: at most 4 bytes a character) is refused
    assert MAX_KEY_BYTES <= MAX_DL_KEY_BYTES  # a dead letter of a record we published keeps its key whole
    for name, key_field in KEY_FIELDS.items():
        if name != "Prediction":  # written by the serving worker only, under an id it cut (serving/replies.py)
            assert key_field in ID_FIELDS[name], name


@pytest.mark.parametrize(("record_name", "field"), CASES)
def test_an_over_long_id_is_refused_at_encode_naming_the_field_and_the_limit(
        settings: Settings, record_name: str, field: str) -> None:
    topic = settings.topic("keycap.encode")
    with Publisher(settings) as pub:
        pub.encode(topic, record_name, {**RECORDS[record_name], field: "x" * MAX_ID_CHARS})  # at the limit: fine
        pub.encode(topic, record_name, {**RECORDS[record_name], field: "é" * MAX_ID_CHARS})  # characters, not bytes
        with pytest.raises(RecordValidationError) as err:
            pub.encode(topic, record_name, {**RECORDS[record_name], field: "x" * LONG})
    assert err.value.field == field
    message = str(err.value)
    assert f"{record_name}.{field}" in message and str(MAX_ID_CHARS) in message and str(LONG) in message
    assert "shorter id" in message and len(message) < 400  # the hostile id is not echoed whole


def test_the_id_check_keeps_the_field_checks_of_the_schema() -> None:
    """An id field is still checked as its Avro type first (wrong type, missing, optional None)."""
    from schemas import catalog
    from schemas.validate import compile_validator

    check = compile_validator(catalog.parse(catalog.schema_to_dict(catalog.load_schema("SensorReading"))))
    good = RECORDS["SensorReading"]
    check({**good, "event_id": None})  # optional id: None passes
    for bad, reason in (({**good, "sensor_id": 5}, "expected string"), ({**good, "event_id": 5}, "expected"),
                        ({k: v for k, v in good.items() if k != "sensor_id"}, "missing required field")):
        with pytest.raises(RecordValidationError, match=reason) as err:
            check(bad)
        assert err.value.field in ("sensor_id", "event_id")


def test_publish_refuses_a_300_kb_event_id_and_client_ip_before_sending(settings: Settings) -> None:
    with Publisher(settings) as pub:
        for field in ("event_id", "client_ip"):
            with pytest.raises(RecordValidationError, match=f"WebLogEvent.{field}: {LONG} characters"):
                pub.publish("weblog", weblog(1, **{field: "1" * LONG}))
        with pytest.raises(RecordValidationError, match="event_id"):  # all or nothing, as for any invalid record
            pub.publish_many("weblog", [weblog(2), weblog(3, event_id="e" * (MAX_ID_CHARS + 1))])
        pub.publish("weblog", weblog(4)).get(timeout=30)
    got = read_topic(settings, raw_topic(settings, "weblog"), expect=1)
    assert [r.value["event_id"] for r in got] == ["w-4"]


def test_send_refuses_a_key_over_max_key_bytes_naming_key(settings: Settings) -> None:
    topic = settings.topic("keycap.keys")
    with Publisher(settings) as pub:
        at_limit = b"k" * MAX_KEY_BYTES
        pub.send_bytes(topic, b"v", at_limit).get(timeout=30)
        with pytest.raises(InputLimitError) as err:
            pub.send_bytes(topic, b"v", b"k" * (MAX_KEY_BYTES + 1))
        msg = str(err.value)
        assert msg.startswith("key: ") and str(MAX_KEY_BYTES) in msg and "MAX_KEY_BYTES" in msg
        with pytest.raises(InputLimitError, match="^key: 1026 bytes"):  # bytes of UTF-8, not characters
            pub.send_bytes(topic, b"v", "é" * 513)
        with pytest.raises(InputLimitError, match="^key: "):
            pub.publish_to(settings.topic("keycap.keys2"), "SensorReading", RECORDS["SensorReading"],
                           key="k" * 300_000)
        with pytest.raises(InputLimitError, match="^key: "):  # an explicit key is checked like any other
            pub.publish("sensor", RECORDS["SensorReading"], key=b"k" * 5000)
    got = read_topic(settings, topic, decode=False, expect=1)
    assert [bytes(r.key) for r in got] == [at_limit]  # the refused ones were never sent


def test_a_dead_letter_always_cuts_a_long_key_and_keeps_its_digest(settings: Settings) -> None:
    long_key, short_key = b"K" * 5000, b"k" * MAX_DL_KEY_BYTES
    with Publisher(settings) as pub:
        for key in (long_key, short_key):  # small records: the key alone is over the bound
            pub.dead_letter("sensor", b"tiny", stage="decode", error="bad", source={"offset": 1}, key=key).get(30)
        with pytest.raises(InputLimitError):  # the same key is refused on a normal send
            pub.send_bytes(settings.topic("keycap.x"), b"tiny", long_key)
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=2)
    assert len(dls) == 2
    by_value = {bytes(d.key): header_dict(d.headers) for d in dls}
    cut = by_value[long_key[:MAX_DL_KEY_BYTES]]
    assert cut["dl.key_bytes"] == "5000" and cut["dl.key_sha256"] == hashlib.sha256(long_key).hexdigest()
    assert "dl.value_sha256" not in cut  # the value fits: only the key was cut
    assert "dl.key_bytes" not in by_value[short_key]  # at the bound: kept whole, no digest headers
    assert all(bytes(d.raw) == b"tiny" for d in dls)


def test_ingest_runner_dead_letters_an_over_long_id_or_key_and_goes_on(settings: Settings) -> None:
    """The path of the tailer, sensor CSV, image watcher and generators (ingest/runner.py)."""
    records = [weblog(1), weblog(2, event_id="e" * LONG), weblog(3, client_ip="1" * LONG), weblog(4, path="/k"),
               weblog(5)]

    def key(record: dict[str, Any]) -> str:  # a source's own key function (e.g. a foreign field)
        return "k" * (MAX_KEY_BYTES + 1) if record["path"] == "/k" else record["event_id"]

    with Publisher(settings) as pub:
        stats = SourceRunner(settings, pub, lambda _: IterSource("weblog", iter(records), name="keycap", key=key),
                             kind="weblog", checkpoint_path=None).run()
        pub.settle()
    assert (stats.published, stats.dead_lettered) == (2, 3)
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=3)
    messages = sorted(header_dict(d.headers)["dl.message"] for d in dls)
    assert [m.split(":")[0] for m in messages] == ["WebLogEvent.client_ip", "WebLogEvent.event_id", "key"]
    kept = [json.loads(bytes(d.raw)) for d in dls]  # each record is kept whole (its JSON), not dropped
    assert sorted(r["event_id"][:3] for r in kept) == ["eee", "w-3", "w-4"]
    assert sorted(r.value["event_id"] for r in read_topic(settings, raw_topic(settings, "weblog"), expect=2)) == [
        "w-1", "w-5"]


def test_sensor_csv_dead_letters_an_over_long_sensor_id_or_event_id_row(settings: Settings, tmp_path: Path) -> None:
    """The sensor CSV source (the image watcher's image_id is a sha256 of the bytes: 64 characters)."""
    path = tmp_path / "readings.csv"
    rows = [f"s1,{NOW},1.5,celsius,,40,r0", f"{'S' * 5000},{NOW},1.5,celsius,,40,r1",
            f"s1,{NOW + 1},1.5,celsius,,40,{'R' * 5000}", f"s1,{NOW + 2},1.5,celsius,,40,r3"]
    path.write_text(CSV_HEADER + ",event_id\n" + "\n".join(rows) + "\n")
    with Publisher(settings) as pub:
        stats = publish_csv(settings, pub, path)
    assert (stats.published, stats.dead_lettered) == (2, 2)
    dls = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=2)
    assert sorted(header_dict(d.headers)["dl.message"].split(":")[0] for d in dls) == [
        "SensorReading.event_id", "SensorReading.sensor_id"]
    got = read_topic(settings, raw_topic(settings, "sensor"), expect=2)
    assert sorted(r.value["event_id"] for r in got) == ["r0", "r3"]


def test_predict_client_refuses_an_over_long_request_id_before_sending_anything() -> None:
    """``streamlearn serve predict --file``: the whole file is checked first, as for a non-JSON line."""
    from serving.client import read_requests_file
    from serving.exceptions import RequestDecodeError

    ok = read_requests_file("m", ['{"request_id": "%s", "features": [1]}' % ("r" * MAX_ID_CHARS)])
    assert ok[0]["request_id"] == "r" * MAX_ID_CHARS
    lines = ['{"request_id": "a", "features": [1]}', '{"request_id": "%s", "features": [1]}' % ("r" * 5000)]
    refused = f"^line 2: request_id: 5000 characters, over the limit of {MAX_ID_CHARS}"
    with pytest.raises(RequestDecodeError, match=refused):
        read_requests_file("m", lines)


def test_predict_refuses_an_over_long_request_id_before_sending_any_request(settings: Settings) -> None:
    """``serving.client.predict`` called with PredictionRequest dicts (the SDK path, no file): every id is
    checked first, so no request of the call reaches the topic."""
    from serving.client import predict, to_request
    from serving.exceptions import RequestDecodeError
    from streaming.topics import requests_topic

    reqs = [to_request("tiny", {"request_id": "ok-1", "features": [1.0]}),
            {**to_request("tiny", {"features": [1.0]}), "request_id": "r" * (MAX_ID_CHARS + 1)}]
    with pytest.raises(RequestDecodeError, match=f"request_id: {MAX_ID_CHARS + 1} characters.*nothing was sent"):
        predict(settings, "tiny", reqs, timeout_s=5)
    assert topic_offsets(settings, requests_topic(settings, "tiny")) == set()


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(streamlearn_cmd(*args), env=subprocess_env(settings), capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_publish_and_ingest_weblog_dead_letter_an_over_long_id_line_and_go_on(
        settings: Settings, tmp_path: Path) -> None:
    """``streamlearn publish weblog --file`` and ``streamlearn ingest weblog`` (the log tailer, read once)."""
    lines = [weblog(1), weblog(2, event_id="e" * LONG), weblog(3)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    done = _cli(settings, "publish", "weblog", "--file", str(path))
    assert done.returncode == 1, done.stderr  # 1: some lines were rejected
    assert "line 2: rejected (schema): WebLogEvent.event_id: " in done.stderr
    assert "published 2 weblog events" in done.stdout and "1 rejected" in done.stdout
    log = tmp_path / "access.log"  # JSON lines are one of the tailer's formats; it refuses lines over
    long_id = "e" * 5000           # 256 KB itself (LogParseError), so the id here is 5,000 characters
    log.write_text("".join(json.dumps(r) + "\n" for r in (weblog(1), weblog(2, event_id=long_id), weblog(3))))
    tailed = _cli(settings, "ingest", "weblog", str(log), "--checkpoint", str(tmp_path / "cp.json"))
    assert tailed.returncode in (0, 1), tailed.stderr
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=2)
    assert len(dls) == 2
    sizes = []
    for d in dls:
        h = header_dict(d.headers)
        assert h["dl.error_class"] == "RecordValidationError" and h["dl.source_reason"] == "schema", h
        assert h["dl.message"].startswith("WebLogEvent.event_id: ")
        assert f"characters, over the limit of {MAX_ID_CHARS}" in h["dl.message"]
        sizes.append(int(h["dl.message"].split()[1]))
    assert sorted(sizes) == [5000, LONG]
    events = read_topic(settings, raw_topic(settings, "weblog"), expect=4)
    assert sorted(r.value["event_id"] for r in events if r.value["event_id"].startswith("w-")) == [
        "w-1", "w-1", "w-3", "w-3"]


def test_gateway_rejects_an_over_long_id_with_its_reason_and_keeps_it(settings: Settings) -> None:
    token = "tok-Alice_0123456789"
    app = create_app(settings.with_(ingest_tokens=f"alice:{token}"))
    body = [weblog(1), weblog(2, event_id="e" * LONG), weblog(3, client_ip="1" * 5000)]
    with TestClient(app) as tc:
        resp = tc.post("/ingest/weblog", json=body, headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 207, resp.text[:500]
    results = resp.json()["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected", "rejected"]
    assert "WebLogEvent.event_id" in json.dumps(results[1]) and "WebLogEvent.client_ip" in json.dumps(results[2])
    dls = read_topic(settings, dead_letter_topic(settings, "weblog"), decode=False, expect=2)
    assert sorted(header_dict(d.headers)["dl.source_index"] for d in dls) == ["1", "2"]
    assert all(str(MAX_ID_CHARS) in header_dict(d.headers)["dl.message"] for d in dls)


def test_a_foreign_producers_huge_key_neither_stops_nor_wedges_the_stream_worker(settings: Settings) -> None:
    """Keys the SDK refuses, written with the plain kafka-python producer: a valid event under a 500 KB
    key is featurized (the worker reads no key), an undecodable one is dead-lettered with its key cut,
    a valid event with a 300 KB event_id is featurized (its state key, client_ip, is short)."""
    s = settings.with_(batch_max_records=20, batch_max_seconds=0.3)
    topic = raw_topic(s, "weblog")
    huge = b"H" * 500_000
    with Publisher(s) as pub:
        for i in range(5):
            pub.publish("weblog", weblog(10 + i))
        foreign_send(pub, topic, "WebLogEvent", weblog(20), key=huge)
        pub.producer.send(topic, b"\x07\x00\x00\x00\x01garbage", key=huge)  # bad magic byte
        foreign_send(pub, topic, "WebLogEvent", weblog(21, event_id="e" * LONG), key="short")
        for i in range(5):
            pub.publish("weblog", weblog(30 + i))
    expected = topic_offsets(s, topic)
    assert len(expected) == 13
    with running_worker(s, "weblog") as worker:
        wait_until(lambda: set(stored_offsets(s, "weblog")) >= expected, 40, message="every offset stored")
    assert (worker.stats.rows, worker.stats.dead_letters) == (12, 1)
    dl = read_topic(s, dead_letter_topic(s, "weblog"), decode=False, expect=1)
    assert len(dl) == 1 and len(dl[0].key) == MAX_DL_KEY_BYTES
    h = header_dict(dl[0].headers)
    assert h["dl.key_bytes"] == str(len(huge)) and h["dl.key_sha256"] == hashlib.sha256(huge).hexdigest()
