"""Backfill end to end on the embedded broker: a decades-old weekly series goes through
``ingest sensors --csv --backfill`` and the stream worker into feature rows in the store, next to
live readings of the same sensor; and generated events are accepted whenever they are published.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from streaming.config import Settings
from streaming.eventtime import BACKFILL_HEADER
from streaming.producer import Publisher, header_dict
from streaming.store import FeatureStore, read_batch
from streaming.topics import dead_letter_topic, raw_topic
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until
from tests.test_stream_worker import running_worker

WEEKLY = Path(__file__).parent / "fixtures" / "eventtime" / "weekly_1962_1975_s.csv"
ROWS, NANS = 660, 23


def _ingest(settings: Settings, *args: str) -> tuple[int, dict, str]:
    done = subprocess.run(streamlearn_cmd("ingest", "sensors", *args), env=subprocess_env(settings),
                          capture_output=True, timeout=180)
    out = done.stdout.decode().strip().splitlines()
    return done.returncode, json.loads(out[-1]) if out else {}, done.stderr.decode()


def _stored(settings: Settings) -> dict[str, np.ndarray]:
    parts = [read_batch(b.path) for b in FeatureStore(settings.feature_store).batches("sensor")]
    if not parts:
        return {"event_time_ms": np.array([], dtype=np.int64)}
    return {k: np.concatenate([p[k] for p in parts]) for k in ("x", "event_time_ms")}


def test_weekly_history_backfills_into_feature_rows_beside_live_readings(settings: Settings) -> None:
    s = settings.with_(batch_max_records=100, batch_max_seconds=0.5)
    # Live first: the history is refused, every row with the reason naming the flag.
    rc, live, err = _ingest(s, "--csv", str(WEEKLY))
    # Nothing published: exit 1, saying so and where to look (it was 0, and scripts went on as if loaded).
    assert rc == 1 and live["published"] == 0 and live["dead_lettered"] == ROWS + NANS
    assert "every record read was refused" in err and "--backfill" in err, err
    assert live["reasons"] == {"timestamp_too_old": ROWS, "nan": NANS}
    dls = read_topic(s, dead_letter_topic(s, "sensor"), decode=False, expect=ROWS + NANS)
    nan_dl = [header_dict(d.headers) for d in dls if b",nan," in d.value]
    assert {h["dl.source_reasons"] for h in nan_dl} == {"nan,timestamp_too_old"}
    assert all("--backfill" in header_dict(d.headers)["dl.message"] for d in dls)

    # A live reading of the same sensor, now; then the backfill.
    now = int(time.time() * 1000)
    with Publisher(s) as pub:
        pub.publish("sensor", {"sensor_id": "station-mlo", "timestamp": now - 1000, "value": 420.0, "values": {},
                               "unit": "ppm", "label": None, "event_id": None}).get(timeout=30)
    rc, bf, err = _ingest(s, "--csv", str(WEEKLY), "--backfill")
    assert rc == 0, err
    assert (bf["published"], bf["dead_lettered"], bf["reasons"]) == (ROWS, NANS, {"nan": NANS})
    assert bf["timestamp_unit"] == "s" and bf["backfill"]
    raw = read_topic(s, raw_topic(s, "sensor"), decode=False, expect=ROWS + 1)
    assert sum(1 for r in raw if BACKFILL_HEADER in header_dict(r.headers)) == ROWS

    with running_worker(s, "sensor"):
        wait_until(lambda: len(_stored(s)["event_time_ms"]) >= ROWS + 1, 90, message="all rows featurized")
    rows = _stored(s)
    times = rows["event_time_ms"]
    assert len(times) == ROWS + 1  # nothing dead-lettered as "late" by the featurizer
    assert int(times.min()) == -251_942_400_000  # 1962-01-07T00:00:00Z
    assert np.isfinite(rows["x"]).all()
    # Every history row after the first has a full window of its own past (not the live reading's).
    history = rows["x"][times < now - 86_400_000]
    assert len(history) == ROWS and (history[:, 10] > 0).sum() == ROWS - 1  # window_fill; only the first is empty


def test_generated_sensor_events_are_accepted_after_live_ones(settings: Settings) -> None:
    """Issue 14: the generator back-dates from now at 1-minute spacing; after live readings of the same
    sensors nearly all used to be "late". Published as a backfill run, every one is featurized."""
    s = settings.with_(batch_max_records=200, batch_max_seconds=0.5)
    now = int(time.time() * 1000)
    with Publisher(s) as pub:
        for i in range(4):
            pub.publish("sensor", {"sensor_id": f"sensor-{i:03d}", "timestamp": now - 500, "value": 20.0,
                                   "values": {}, "unit": "celsius", "label": None, "event_id": None})
        pub.flush()
    done = subprocess.run(streamlearn_cmd("publish", "sensor", "--generate", "400", "--seed", "3"),
                          env=subprocess_env(s), capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    with running_worker(s, "sensor") as worker:
        wait_until(lambda: len(_stored(s)["event_time_ms"]) >= 404, 90, message="generated rows featurized")
        assert worker.stats.dead_letters == 0


def test_publish_file_and_weblog_ingest_take_history_with_the_flags(settings: Settings, tmp_path: Path) -> None:
    lines = [json.dumps({"sensor_id": "gauge-1", "timestamp": -126_230_400 + i * 2_678_400, "value": 10.0 + i,
                         "unit": "m"}) for i in range(5)]
    lines.append(json.dumps({"sensor_id": "gauge-1", "timestamp": "1966-06-01T00:00:00Z", "value": 16.0, "unit": "m"}))
    jsonl = tmp_path / "history.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    env = subprocess_env(settings)
    live = subprocess.run(streamlearn_cmd("publish", "sensor", "--file", str(jsonl), "--timestamp-unit", "s"),
                          env=env, capture_output=True, timeout=120)
    assert live.returncode == 1 and b"timestamp_too_old" in live.stderr and b"--backfill" in live.stderr
    bf = subprocess.run(streamlearn_cmd("publish", "sensor", "--file", str(jsonl), "--timestamp-unit", "s",
                                        "--backfill"), env=env, capture_output=True, timeout=120)
    assert bf.returncode == 0, bf.stderr.decode()
    got = [r for r in read_topic(settings, raw_topic(settings, "sensor"), expect=6)]
    assert sorted(r.value["timestamp"] for r in got)[0] == -126_230_400_000  # 1966-01-01, negative epoch
    assert all(BACKFILL_HEADER in header_dict(r.headers) for r in got)

    log = tmp_path / "app.log"
    log.write_text("".join(json.dumps({"remote_addr": "10.0.0.1", "time": 946_684_800 + i, "request": "GET / HTTP/1.1",
                                       "status": 200}) + "\n" for i in range(3)))
    done = subprocess.run(streamlearn_cmd("ingest", "weblog", str(log), "--backfill", "--max-age", "none"),
                          env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    events = read_topic(settings, raw_topic(settings, "weblog"), expect=3)
    assert sorted(e.value["timestamp"] for e in events) == [946_684_800_000, 946_684_801_000, 946_684_802_000]
    assert all(BACKFILL_HEADER in header_dict(e.headers) for e in events)


def test_gateway_rejects_a_reading_a_day_ahead_and_marks_backfill_posts(settings: Settings) -> None:
    """Issue 12: a reading dated now+23 h was accepted (+24 h allowed) and made the sensor's real readings
    "late" for 23 h. Now the gateway applies the shared 5-minute window; a backfill gateway marks its records."""
    from fastapi.testclient import TestClient

    from ingest.gateway.records import TimeRules
    from ingest.gateway.routes import create_app
    from streaming.eventtime import EventTimePolicy

    s = settings.with_(ingest_tokens="alice:tok-Alice_0123456789")
    auth = {"Authorization": "Bearer tok-Alice_0123456789"}
    now = int(time.time() * 1000)
    with TestClient(create_app(s)) as tc:
        resp = tc.post("/ingest/sensor", json=[
            {"sensor_id": "s1", "timestamp": now + 23 * 3_600_000, "value": 1.0, "unit": "c"},
            {"sensor_id": "s1", "timestamp": now - 1000, "value": 2.0, "unit": "c"}])
        assert resp.status_code in (400, 401)  # no token: nothing published
        resp = tc.post("/ingest/sensor", headers=auth, json=[
            {"sensor_id": "s1", "timestamp": now + 23 * 3_600_000, "value": 1.0, "unit": "c"},
            {"sensor_id": "s1", "timestamp": now - 1000, "value": 2.0, "unit": "c"}])
        results = resp.json()["results"]
        assert [r["status"] for r in results] == ["rejected", "accepted"]
        assert results[0]["reason"] == "timestamp_in_future"
    rules = TimeRules(EventTimePolicy(max_age_ms=None, backfill=True, run_id="gw-run"), "s")
    with TestClient(create_app(s, time_rules=rules)) as tc:
        resp = tc.post("/ingest/sensor", headers=auth,
                       json={"sensor_id": "s2", "timestamp": "1966-01-01T00:00:00Z", "value": 3.0, "unit": "c"})
        assert resp.json()["results"][0]["status"] == "accepted", resp.text
    got = {r.value["sensor_id"]: r for r in read_topic(s, raw_topic(s, "sensor"), expect=2)}
    assert set(got) == {"s1", "s2"} and got["s2"].value["timestamp"] == -126_230_400_000
    assert header_dict(got["s2"].headers)[BACKFILL_HEADER] == "gw-run" and BACKFILL_HEADER not in header_dict(
        got["s1"].headers)
