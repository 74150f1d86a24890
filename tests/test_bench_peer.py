"""The peer benchmark compares like with like: the Quix app computes exactly our sensor rows.

The speed figure itself lives in ``benchmarks/bench_peer.py`` (JSON out); these tests only check that
the peer side is the same pipeline (registry decode, the same features from per-key state, a file
sink) and that the benchmark is registered and skips cleanly without quixstreams.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import bench_peer, peer_quix
from benchmarks.run_all import BENCHMARKS
from ingest.sensors import generate
from streaming import config
from streaming.features.sensor import SensorFeaturizer, SensorState
from streaming.producer import Publisher
from streaming.topics import raw_topic


class JsonState:
    """Stands in for one key's Quix ``State``: values go through JSON, as Quix stores them."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    def set(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)


def _expected(events: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[np.ndarray, dict[str, Any]]]:
    ours, state = SensorFeaturizer(), SensorState()
    out = {}
    for event in events:
        row = ours.featurize(dict(event), state)
        out[(row.key, row.event_time_ms)] = (row.x, row.labels)
    return out


def test_quix_features_equal_our_featurizer_rows() -> None:
    events = list(generate(600, n_sensors=5, seed=3))
    expected = _expected(events)
    features = peer_quix.make_features(peer_quix.quix_featurizer())
    states: dict[str, JsonState] = {}
    for event in events:
        value = dict(event)
        # the Confluent deserializer hands timestamp-millis over as an aware datetime
        value["timestamp"] = peer_quix.EPOCH + dt.timedelta(milliseconds=event["timestamp"])
        row = features(value, states.setdefault(event["sensor_id"], JsonState()))
        x, labels = expected[(row["key"], row["event_time_ms"])]
        np.testing.assert_array_equal(np.array(row["x"], dtype=np.float32), x)
        assert {k: row[k] for k in labels} == labels
    assert len(states) == 5


def test_bench_peer_is_registered_in_run_all() -> None:
    assert "bench_peer" in BENCHMARKS


def test_bench_peer_skips_with_a_reason_without_quixstreams(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench_peer, "available", lambda: "quixstreams not installed (test)")
    result = bench_peer.run(config.load({"home": tmp_path, "metrics_port": -1}))
    assert result["skipped"] == "quixstreams not installed (test)"
    (row,) = result["table"]
    assert row["ratio"] is None and "not installed" in row["baseline"]


@pytest.mark.timeout(240)
def test_quix_app_decodes_via_registry_serve_and_sinks_our_rows(settings: config.Settings) -> None:
    if peer_quix.available() is not None:
        pytest.skip(str(peer_quix.available()))
    n = 300
    events = list(generate(n, n_sensors=6, seed=11))
    with Publisher(settings) as pub:
        for event in events:
            pub.publish("sensor", event)
    expected = _expected(events)
    registry = bench_peer.RegistryServer(settings)
    try:
        registry.wait_ready()
        result = peer_quix.run_quix(bootstrap=settings.bootstrap, topic=raw_topic(settings, "sensor"),
                                    group=settings.group("peer-test"), registry_url=registry.url,
                                    workdir=settings.home / "quix", n=n, deadline_s=120)
    finally:
        registry.close()
    assert result["rows"] == n
    with (settings.home / "quix" / "features.csv").open(encoding="utf-8") as f:
        rows = [json.loads(r["value"]) for r in csv.DictReader(f)]
    assert len(rows) == n
    for row in rows:
        x, labels = expected[(row["key"], row["event_time_ms"])]
        np.testing.assert_array_equal(np.array(row["x"], dtype=np.float32), x)
        assert {k: row[k] for k in labels} == labels
