"""``POST /process`` runs the real commands: a replay over a time range (the later half of the records)
into a namespace, then (admin) its promotion to live; each job's result is the command's own closing JSON.
About 5 s (two CLI processes)."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from ingest.sensors import generate
from schemas.access import load_keys
from streaming.config import Settings
from streaming.producer import Publisher
from streaming.store import FeatureStore
from streamlearn.api.app import create_app
from tests.helpers import wait_until

KEYS = "proc:tok-proc:process,boss:tok-boss:admin"
PROC, BOSS = {"Authorization": "Bearer tok-proc"}, {"Authorization": "Bearer tok-boss"}


def finished(tc: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = tc.get(f"/jobs/{job_id}", headers=headers).json()["job"]
        return job if job["status"] not in ("queued", "running") else None

    job = wait_until(ended, timeout=120, interval=0.2, message=f"job {job_id} ended")
    assert job is not None
    return job


def test_replay_a_time_range_into_a_namespace_then_promote_it(settings: Settings) -> None:
    events = list(generate(120, n_sensors=2, seed=4))
    with Publisher(settings) as pub:
        for event in events[:60]:
            pub.publish("sensor", event)
        pub.flush()
        split_ms = int(time.time() * 1000) + 2
        wait_until(lambda: time.time() * 1000 > split_ms + 1, timeout=5, interval=0.001, message="the clock passed")
        for event in events[60:]:  # record time (Kafka's) after split_ms
            pub.publish("sensor", event)
        pub.flush()
    s = settings.with_(api_compact_interval_s=0)
    with TestClient(create_app(s, keys=load_keys(KEYS, None), compact=False)) as tc:
        started = tc.post("/process", headers=PROC, json={
            "action": "replay", "kind": "sensor", "namespace": "rebuild-1", "start": str(split_ms), "end": "now"})
        assert started.status_code == 202, started.text
        replay = finished(tc, started.json()["job"]["id"], PROC)
        assert replay["status"] == "succeeded", tc.get(f"/jobs/{replay['id']}", headers=PROC).text
        assert replay["result"]["namespace"] == "rebuild-1" and replay["result"]["records"] == 60
        assert FeatureStore(s.feature_store).batches("sensor", namespace="rebuild-1")
        assert not FeatureStore(s.feature_store).batches("sensor")  # live untouched until the promotion

        promote = {"action": "promote", "kind": "sensor", "namespace": "rebuild-1"}
        assert tc.post("/process", headers=PROC, json=promote).status_code == 403
        started = tc.post("/process", headers=BOSS, json=promote)
        assert started.status_code == 202, started.text
        promoted = finished(tc, started.json()["job"]["id"], BOSS)
        assert promoted["status"] == "succeeded", tc.get(f"/jobs/{promoted['id']}", headers=BOSS).text
        assert promoted["result"]["from"] == "rebuild-1" and promoted["result"]["kind"] == "sensor"
        assert len(FeatureStore(s.feature_store).batches("sensor")) > 0  # the rebuilt batches are live
