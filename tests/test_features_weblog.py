"""weblog-v1 on hand-computed records, its client-rate window across a checkpoint, and validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from streaming.exceptions import FeatureValidationError
from streaming.features import FeatureStateError, get_featurizer
from streaming.features.weblog import WeblogFeaturizer, user_agent_class

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z: 80 000 s into the UTC day
NOW = T0 + 3_600_000


def fz(**kw: Any) -> WeblogFeaturizer:
    return WeblogFeaturizer(clock_ms=lambda: NOW, **kw)


def rec(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "event_id": "e1",
        "client_ip": "10.0.0.1",
        "ident": None,
        "user": None,
        "timestamp": T0,
        "method": "GET",
        "path": "/a/b",
        "protocol": "HTTP/1.1",
        "status": 404,
        "bytes_sent": 100,
        "referrer": None,
        "user_agent": "curl/8.4.0",
        "latency_ms": None,
        "label": None,
        "source": "test",
    }
    r.update(over)
    return r


def test_get_a_b_404_exact_features() -> None:
    f = fz()
    row = f.featurize(rec(), f.new_state())
    assert row.x.dtype == np.float32 and row.x.shape == (f.n_features,) == (64,)
    expected = dict.fromkeys(f.feature_names, 0.0)
    expected.update(
        {
            "method_GET": 1.0,
            "status_4xx": 1.0,
            "path_depth": 2.0,
            "log1p_path_len": math.log1p(4),
            "path_hash_21": -1.0,  # token "a" (pinned in test_features_hashing)
            "path_hash_15": 1.0,  # token "b"
            "log1p_bytes": math.log1p(100),
            "latency_missing": 1.0,
            "ua_tool": 1.0,
            "log1p_client_rate_60s": math.log1p(1),
            "client_first_seen": 1.0,
            "hour_sin": math.sin(2 * math.pi * 80_000 / 86_400),
            "hour_cos": math.cos(2 * math.pi * 80_000 / 86_400),
        }
    )
    np.testing.assert_array_equal(row.x, np.array([expected[n] for n in f.feature_names], dtype=np.float32))
    assert row.labels == {"is_bot_or_attack": None, "is_error": 0.0}
    assert row.event_time_ms == T0 and row.key == "10.0.0.1"


def test_method_other_status_5xx_latency_query_and_labels() -> None:
    f = fz()
    row = f.featurize(
        rec(method="PROPFIND", status=503, latency_ms=9.0, path="/x?id=3&q=1", label="attack"), f.new_state()
    )
    v = dict(zip(f.feature_names, row.x.tolist(), strict=True))
    assert v["method_other"] == 1.0 and v["method_GET"] == 0.0
    assert v["status_5xx"] == 1.0
    assert v["log1p_latency_ms"] == pytest.approx(math.log1p(9.0)) and v["latency_missing"] == 0.0
    assert v["has_query"] == 1.0 and v["path_depth"] == 1.0
    assert row.labels == {"is_bot_or_attack": 1.0, "is_error": 1.0}
    assert f.featurize(rec(label="normal"), f.new_state()).labels["is_bot_or_attack"] == 0.0
    assert f.featurize(rec(label="bot"), f.new_state()).labels["is_bot_or_attack"] == 1.0


def test_suspicious_path_flag() -> None:
    f = fz()
    idx = f.feature_names.index("suspicious_path")
    assert f.featurize(rec(path="/cgi-bin/../../etc/passwd"), f.new_state()).x[idx] == 1.0
    assert f.featurize(rec(path="/images/logo.png"), f.new_state()).x[idx] == 0.0


@pytest.mark.parametrize(
    ("ua", "cls"),
    [
        ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36", "browser"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("python-requests/2.31.0", "tool"),
        ("curl/7.68.0", "tool"),
        ("Wget/1.21", "tool"),
        ("-", "empty"),
        ("", "empty"),
        (None, "empty"),
        ("SomethingElse/1.0", "other"),
        ("UniversalFeedParser/4.2-pre-314-svn +http://feedparser.org/", "bot"),
        ("Tiny Tiny RSS/1.11 (http://tt-rss.org/)", "bot"),
        ("Chef Client/10.18.2 (ruby-1.9.3-p327; ohai-6.16.0; x86_64-linux; +http://opscode.com)", "tool"),
    ],
)
def test_user_agent_classes(ua: str | None, cls: str) -> None:
    assert user_agent_class(ua) == cls


def test_client_rate_sliding_window_and_lru_bound() -> None:
    f = fz(max_clients=2)
    s = f.new_state()
    rate = f.feature_names.index("log1p_client_rate_60s")
    gap = f.feature_names.index("log1p_secs_since_prev")
    first = f.feature_names.index("client_first_seen")
    counts = []
    for dt in (0, 10_000, 20_000, 75_000):  # at 75 s only 20 s and 75 s are within 60 s
        row = f.featurize(rec(timestamp=T0 + dt), s)
        counts.append(round(math.expm1(float(row.x[rate]))))
    assert counts == [1, 2, 3, 2]
    assert row.x[gap] == pytest.approx(math.log1p(55.0)) and row.x[first] == 0.0
    # an out-of-order event is counted against the events around its own time
    late = f.featurize(rec(timestamp=T0 + 70_000), s)
    # window [10 s, 70 s]; 10 s was already pruned (older than 75 s - 60 s), so: 20 s and itself
    assert round(math.expm1(float(late.x[rate]))) == 2
    assert late.x[gap] == pytest.approx(math.log1p(50.0))
    assert list(s.clients["10.0.0.1"]) == [T0 + 20_000, T0 + 70_000, T0 + 75_000]
    f.featurize(rec(client_ip="b", timestamp=T0), s)
    f.featurize(rec(client_ip="c", timestamp=T0), s)
    assert list(s.clients) == ["b", "c"]  # "10.0.0.1" was least recently seen: evicted


def test_events_per_client_bounded() -> None:
    f = fz(max_events_per_client=5)
    s = f.new_state()
    for i in range(20):
        f.featurize(rec(timestamp=T0 + i), s)
    assert len(s.clients["10.0.0.1"]) == 5


def test_state_json_round_trip_continues_identically() -> None:
    f = fz(max_clients=3)
    events = [
        rec(client_ip=f"c{i % 4}", timestamp=T0 + i * 7_000 - (5_000 if i % 5 == 0 else 0)) for i in range(40)
    ]
    s1 = f.new_state()
    straight = [f.featurize(e, s1) for e in events]
    s2 = f.new_state()
    resumed = [f.featurize(e, s2) for e in events[:17]]
    text = f.state_to_json(s2)
    s3 = get_featurizer("weblog", "weblog-v1").state_from_json(text)
    assert s3 == s2 and f.state_to_json(s3) == text
    resumed += [f.featurize(e, s3) for e in events[17:]]
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
    assert s3 == s1


def test_state_from_json_rejects_garbage_and_other_settings() -> None:
    f = fz()
    with pytest.raises(FeatureStateError, match="state"):
        f.state_from_json("{not json")
    with pytest.raises(FeatureStateError, match="bad window"):
        f.state_from_json(
            '{"featurizer":"weblog-v1","rate_window_ms":60000,"max_events_per_client":256,'
            '"clients":[["a",[3,1]]]}'
        )
    with pytest.raises(FeatureStateError, match="rate_window_ms=60000"):
        fz(rate_window_ms=1000).state_from_json(f.state_to_json(f.new_state()))


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"status": 42}, "status"),
        ({"status": "404"}, "status"),
        ({"bytes_sent": -1}, "bytes_sent"),
        ({"latency_ms": float("nan")}, "latency_ms"),
        ({"latency_ms": float("inf")}, "latency_ms"),
        ({"latency_ms": -3.0}, "latency_ms"),
        ({"label": "spam"}, "label"),
        ({"timestamp": -9_300_000_000_000}, "timestamp"),  # before 1678 (units are checked at the entries)
        ({"timestamp": NOW + 2 * 86_400_000}, "timestamp"),
        ({"client_ip": ""}, "client_ip"),
        ({"method": None}, "method"),
    ],
)
def test_validation_errors_name_the_field(over: dict[str, Any], field: str) -> None:
    f = fz()
    s = f.new_state()
    with pytest.raises(FeatureValidationError, match=rf"WebLogEvent\.{field}"):
        f.featurize(rec(**over), s)
    assert s == f.new_state()  # a rejected record leaves the state untouched


def test_real_apache_logs_featurize_cleanly_and_resume_identically() -> None:
    from tests.helpers import APACHE_LOGS

    if not APACHE_LOGS.exists():
        pytest.skip(f"{APACHE_LOGS} is absent (real combined-log sample beside the project root)")
    from ingest.weblog import parse_line

    with APACHE_LOGS.open(encoding="utf-8", errors="replace") as fh:
        records = [parse_line(line, source="apache_logs", position=i) for i, line in enumerate(fh)]
    f = get_featurizer("weblog")
    straight, s1 = [], f.new_state()
    for r in records:
        straight.append(f.featurize(r, s1).x)
    x = np.stack(straight)
    assert x.shape == (len(records), f.n_features) and np.isfinite(x).all()
    v = dict(zip(f.feature_names, x.sum(axis=0).tolist(), strict=True))
    assert v["method_GET"] > 0.9 * len(records) and v["ua_browser"] > 0 and v["ua_bot"] > 0
    half = len(records) // 2
    s2 = f.new_state()
    for r in records[:half]:
        f.featurize(r, s2)
    s3 = f.state_from_json(f.state_to_json(s2))
    resumed = np.stack([f.featurize(r, s3).x for r in records[half:]])
    np.testing.assert_array_equal(resumed, x[half:])
