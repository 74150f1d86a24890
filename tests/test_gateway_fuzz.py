"""Hypothesis fuzz of the gateway: random bodies, content types and kinds never give a 5xx and
never put garbage on a raw topic (everything there decodes and passes the same validation again).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from ingest import images, sensors
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.topics import KINDS, raw_topic
from tests.test_gateway_http import AUTH, EVENTS, client, gateway_settings, png, raw_records

CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/octet-stream",
                 "application/vnd.streamlearn.avro", "text/plain", "", "application/x-thing+json",
                 "multipart/form-data; boundary=xyz"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)


@st.composite
def mutated_event(draw: st.DrawFn) -> tuple[str, Any]:
    """A valid event of a random kind with fields replaced or dropped: close to valid, often not."""
    kind = draw(st.sampled_from(sorted(KINDS)))
    event: dict[str, Any] = EVENTS[kind](draw(st.integers(0, 5)))
    for name in draw(st.lists(st.sampled_from(sorted(event) + ["extra"]), max_size=3)):
        if draw(st.booleans()):
            event.pop(name, None)
        else:
            event[name] = draw(json_values)
    if kind == "image" and draw(st.booleans()):  # truncated / corrupted image bytes
        raw = png(shade=draw(st.integers(0, 255)))
        cut = draw(st.integers(0, len(raw)))
        event["data"] = base64.b64encode(raw[:cut] + draw(st.binary(max_size=8))).decode()
    return kind, draw(st.sampled_from([event, [event], [event, EVENTS[kind](9)]]))


def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _check_on_topic(settings: Settings, kind: str, record: dict[str, Any]) -> None:
    """A record read back from a raw topic must pass the gateway's own checks again."""
    if kind == "sensor":
        sensors.validate(record)
    elif kind == "image":
        info = images.inspect(record["data"])
        assert (info.content_type, info.width, info.height) == (record["content_type"], record["width"],
                                                               record["height"])
    else:
        assert record["latency_ms"] is None or math.isfinite(record["latency_ms"])
        assert 100 <= record["status"] <= 999


def test_random_bodies_never_5xx_and_never_publish_garbage(settings: Settings) -> None:
    gs = gateway_settings(settings)
    with Publisher(gs) as pub:
        schema_ids = [pub.serializer(raw_topic(gs, k), KINDS[k]).schema_id for k in sorted(KINDS)]
    accepted = {kind: 0 for kind in KINDS}
    statuses: list[int] = []

    with client(settings) as tc:
        @hsettings(max_examples=200, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            shape = data.draw(st.sampled_from(["binary", "json", "event", "framed", "upload"]))
            kind = data.draw(st.sampled_from([*sorted(KINDS), "images", "nope"]))
            ctype = data.draw(st.sampled_from(CONTENT_TYPES))
            if shape == "binary":
                body = data.draw(st.binary(max_size=300))
            elif shape == "json":
                body = _dump(data.draw(json_values))
            elif shape == "event":
                kind, value = data.draw(mutated_event())
                body, ctype = _dump(value), "application/json"
            else:  # a valid Confluent header (any kind's schema id) and a random Avro body
                header = struct.pack(">bI", 0, data.draw(st.sampled_from([*schema_ids, 999])))
                body = header + data.draw(st.binary(max_size=120))
                ctype = "application/vnd.streamlearn.avro"
            headers = {**AUTH, "Content-Type": ctype} if ctype else dict(AUTH)
            if shape == "upload":  # a well-formed multipart envelope around random or damaged images
                kind, raw = "images", png(shade=data.draw(st.integers(0, 255)))
                files = [("files", (data.draw(st.sampled_from(["a.png", "b.jpg", "c", "d.gif"])),
                                    data.draw(st.sampled_from([raw, raw[: len(raw) // 2], b""]))
                                    + data.draw(st.binary(max_size=16)), "image/png"))
                         for _ in range(data.draw(st.integers(1, 3)))]
                resp = tc.post("/ingest/images", files=files, headers=AUTH)
            else:
                resp = tc.post(f"/ingest/{kind}", content=body, headers=headers)
            statuses.append(resp.status_code)
            assert resp.status_code < 500, (resp.status_code, resp.text, body[:200])
            assert resp.status_code in (200, 207, 400, 404, 413, 415, 422), resp.text
            if resp.status_code in (200, 207):
                results = resp.json()["results"]
                target = "image" if kind == "images" else kind
                accepted[target] += sum(r["status"] == "accepted" for r in results)
                assert all(r["status"] in ("accepted", "duplicate", "rejected") for r in results)
                assert resp.status_code == 207 or all(r["status"] != "rejected" for r in results)

        fuzz()

    assert len(statuses) >= 100 and any(s == 200 for s in statuses) and any(s == 422 for s in statuses)
    assert sum(accepted.values()) > 0  # the fuzz reached the publishing path, not only the refusals
    for kind in KINDS:
        records = raw_records(settings, kind, expect=accepted[kind] or None)
        assert len(records) == accepted[kind]  # nothing published that was not reported accepted
        for rec in records:
            _check_on_topic(settings, kind, rec.value)
