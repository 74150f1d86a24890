"""The bounds behind the poison suites, one by one (fast; one test uses the broker)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from serving.replies import ReplyTopics, SerializerCache, cut_answer, cut_id
from streaming import config
from streaming.config import Settings
from streaming.exceptions import FeatureValidationError
from streaming.features import get_featurizer
from streaming.features.sensor import SensorFeaturizer
from streaming.features.weblog import WeblogFeaturizer
from streaming.limits import (
    MAX_JSON_DEPTH,
    InputLimitError,
    bounded_json,
    effective_limit,
    fit_record,
    json_depth,
    record_size,
)
from streaming.producer import Publisher, header_dict
from streaming.topics import dead_letter_topic
from tests.helpers import read_topic


def test_bounded_json_refuses_deep_and_big_text_before_building_it() -> None:
    for deep in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(InputLimitError, match="nested"):
            bounded_json(deep, "event_json")
    with pytest.raises(InputLimitError, match="over the limit"):
        bounded_json('"' + "x" * 2_000_000 + '"', "event_json")
    with pytest.raises(InputLimitError, match="not valid JSON"):
        bounded_json("{nope", "event_json")
    assert bounded_json('{"path": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "n": [1, [2]]}', "e") == {
        "path": "[" * 41, "n": [1, [2]]}  # brackets inside strings do not count
    assert json_depth("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) == MAX_JSON_DEPTH
    assert json_depth(r'["\"[[[", {"a": []}]') == 3


def test_fit_record_accounts_for_key_and_headers_and_keeps_digest_sizes_reason() -> None:
    key, value = b"k" * 100_000, bytes(range(250)) * 3792  # 948 KB
    headers = [("dl.stage", b"decode"), ("dl.message", b"m" * 5000)]
    limit = 1_000_000
    v, k, h = fit_record(value, key, headers, broker_limit=limit, reason="test")
    assert record_size(v, k, h) <= effective_limit(limit)
    hd = dict(h)
    assert hd["dl.value_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert hd["dl.value_bytes"] == b"948000" and hd["dl.truncated"] == b"948000"
    assert hd["dl.key_sha256"] == hashlib.sha256(key).hexdigest().encode() and hd["dl.key_bytes"] == b"100000"
    assert hd["dl.cut_reason"] == b"test" and len(hd["dl.message"]) == 2000
    assert value.startswith(v) and len(v) > 800_000 and key.startswith(k)
    small = (b"v" * 10, b"k", [("dl.stage", b"x")])
    assert fit_record(*small, broker_limit=limit) == (small[0], small[1], small[2])


def test_dead_letter_of_a_record_the_broker_took_is_always_stored(settings: Settings) -> None:
    """100 KB key + 948 KB body: the dead letter used to exceed the broker limit and wedge the worker."""
    key, value = b"K" * 100_000, b"\x00" * 948_000
    with Publisher(settings) as pub:
        fut = pub.dead_letter("sensor", value, stage="decode", error=ValueError("e" * 100_000), key=key,
                              source={"topic": "x", "partition": 0, "offset": 1})
        fut.get(timeout=30)  # raised MessageSizeTooLargeError before
    dl = read_topic(settings, dead_letter_topic(settings, "sensor"), decode=False, expect=1)[0]
    h = header_dict(dl.headers)
    assert h["dl.value_sha256"] == hashlib.sha256(value).hexdigest() and h["dl.value_bytes"] == "948000"
    assert h["dl.key_bytes"] == "100000" and h["dl.error_class"] == "ValueError"


def test_featurizer_state_is_bounded_by_bytes() -> None:
    now = int(time.time() * 1000)
    sensor = SensorFeaturizer(max_state_bytes=200_000, clock_ms=lambda: now)
    state = sensor.new_state()
    for i in range(2000):
        for j in range(3):
            sensor.featurize({"sensor_id": f"{i:04d}" + "s" * 250, "timestamp": now - 1000 + j, "value": 1.0 * j,
                              "values": {}, "label": None}, state)
    text = sensor.state_to_json(state)
    assert len(text) <= 200_000 and state.nbytes <= 200_000 and len(text) >= 0.7 * state.nbytes
    assert 0 < len(state.sensors) < 2000
    restored = sensor.state_from_json(text)
    assert restored == state and restored.nbytes == state.nbytes
    weblog = WeblogFeaturizer(max_state_bytes=100_000, clock_ms=lambda: now)
    wstate = weblog.new_state()
    for i in range(3000):
        weblog.featurize({"client_ip": f"{i}-" + "c" * 200, "timestamp": now, "method": "GET", "path": "/",
                          "status": 200, "bytes_sent": 1}, wstate)
    wtext = weblog.state_to_json(wstate)
    assert len(wtext) <= 100_000 and len(wtext) >= 0.7 * wstate.nbytes
    assert weblog.state_from_json(wtext) == wstate


def test_keys_and_absurd_values_are_feature_errors() -> None:
    now = int(time.time() * 1000)
    sensor = get_featurizer("sensor")
    with pytest.raises(FeatureValidationError, match="over the limit of 256"):
        sensor.featurize({"sensor_id": "s" * 257, "timestamp": now, "value": 1.0}, sensor.new_state())
    weblog = get_featurizer("weblog")
    base = {"client_ip": "1.2.3.4", "timestamp": now, "method": "GET", "path": "/", "status": 200}
    for bad, match in (({"latency_ms": 1e308}, "absurd magnitude"), ({"client_ip": "1" * 900_000}, "over the limit"),
                       ({"path": "/" * 9000}, "path"), ({"user_agent": "u" * 5000}, "user_agent")):
        with pytest.raises(FeatureValidationError, match=match) as err:
            weblog.featurize({**base, **bad}, weblog.new_state())
        assert len(str(err.value)) < 500  # hostile values are never echoed whole


def test_reply_topics_allow_list(tmp_path: Any) -> None:
    settings = config.load({"home": tmp_path, "topic_prefix": "t."}, environ={})
    existing = {"t.m.predictions", "t.m.predictions.eu", "t.other.predictions", "t.models.updates"}
    rt = ReplyTopics(settings, "m", "t.m.predictions", list_topics=lambda: existing)
    assert rt.problem(None) is None and rt.problem("t.m.predictions") is None
    assert rt.problem("t.m.predictions.eu") is None
    assert "does not exist" in (rt.problem("t.m.predictions.missing") or "")
    for bad in ("t.other.predictions", "t.models.updates", "t.m.requests"):
        assert "not allowed" in (rt.problem(bad) or ""), bad
    for illegal in ("../../etc/passwd", "a b", "x" * 300, ".", 5):
        assert "not a legal topic name" in (rt.problem(illegal) or ""), illegal
    custom = config.load({"home": tmp_path, "topic_prefix": "t."}, environ={"STREAMLEARN_REPLY_TOPICS": "t.{model}.r*"})
    rt2 = ReplyTopics(custom, "m", "t.m.predictions", list_topics=lambda: {"t.m.r1"})
    assert rt2.problem("t.m.r1") is None and "not allowed" in (rt2.problem("t.m.predictions.eu") or "")


def test_serializer_cache_and_cut_answers_are_bounded() -> None:
    cache = SerializerCache(registry=None, capacity=8)  # type: ignore[arg-type]  # never registers here
    for i in range(100):
        cache(f"topic-{i}")
    assert len(cache) == 8
    rid = "r" * 800_000
    assert len(cut_id(rid, 256)) < 150 and cut_id(rid, 256).endswith(hashlib.sha256(rid.encode()).hexdigest())
    pred = {"request_id": "a", "outputs": [1.0] * 1000, "predicted_label": "x", "error": None}
    cut = cut_answer(pred, 5_000_000, 1_000)
    assert cut["outputs"] == [] and "AnswerTooLargeError" in cut["error"] and "5000000" in cut["error"]
    assert json.dumps(cut)  # still a plain answer
