"""Broker kill -9 (x5) under a running source: every acked event ends up on the topic exactly once.

Each test starts its own embedded broker (the session broker must not be killed), runs the source
the way the README shows (``streamlearn ingest weblog --follow``, ``streamlearn ingest serve``) as a
subprocess, kills the broker with SIGKILL five times while load runs, and reads the topic back.
The embedded broker loses the acks of its last ~1 s on every such kill and re-uses those offsets;
the publishers' ack ledger (streaming/ackguard.py) must re-send exactly what vanished.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ingest.checkpoint import EVENT_ID_HEADER
from ingest.generators import web_traffic_lines
from ingest.source import source_state_dir
from ingest.tailer import default_checkpoint_path
from streaming import config
from streaming.broker import free_port
from streaming.topics import raw_topic
from tests.broker_crash_helpers import crash_broker_fixture  # noqa: F401 (the crash_broker fixture)
from tests.helpers import read_topic, streamlearn_cmd, subprocess_env, wait_until

KILLS = 5
pytestmark = pytest.mark.slow


class Paced(threading.Thread):
    """A load generator: calls ``step`` every ``period_s`` until stopped (pacing, not a wait)."""

    def __init__(self, step: Callable[[], None], period_s: float) -> None:
        super().__init__(daemon=True)
        self.step, self.period_s, self.halt = step, period_s, threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.wait(self.period_s):
                self.step()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _ids(settings: config.Settings, kind: str) -> Counter[str]:
    records = read_topic(settings, raw_topic(settings, kind), decode=False, timeout=120)
    return Counter(dict(r.headers).get(EVENT_ID_HEADER, b"").decode() or r.raw.hex() for r in records)


def test_broker_kill9_x5_during_tail_ingest_every_line_once(crash_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, kill9_restart = crash_broker
    log = tmp_path / "access.log"
    log.touch()
    lines = web_traffic_lines(200_000, seed=7)
    written = [0]

    def append() -> None:
        with log.open("a") as fh:
            fh.writelines(next(lines) for _ in range(25))
        written[0] += 25

    cp = default_checkpoint_path(settings, log)

    def acked_lines() -> int:
        try:
            return int(json.loads(cp.read_text())["line"])
        except (OSError, ValueError, KeyError):
            return 0

    proc = subprocess.Popen(streamlearn_cmd("ingest", "weblog", str(log), "--follow", "--poll", "0.05"),
                            env=subprocess_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = Paced(append, 0.02)
    try:
        writer.start()
        for _ in range(KILLS):
            mark = acked_lines()
            wait_until(lambda m=mark: acked_lines() >= m + 1500, 90, message="tailer progress after a restart")
            kill9_restart()
        wait_until(lambda: acked_lines() >= mark + 3000, 90, message="tailer progress after the last restart")
        writer.halt.set()
        writer.join()
        assert writer.error is None, writer.error
        total = written[0]
        wait_until(lambda: acked_lines() >= total, 120, message=f"all {total} lines acked")
    finally:
        writer.halt.set()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    ids = _ids(settings, "weblog")
    assert sum(ids.values()) == total and len(ids) == total, \
        f"{total} lines, {len(ids)} distinct ids on the topic, {sum(ids.values()) - len(ids)} duplicates"
    # the kills did lose acked lines (so this test exercised the re-send), and they were re-sent
    assert "the broker lost" in err, err[-3000:]


def test_broker_kill9_x5_during_gateway_load_every_event_once(crash_broker) -> None:  # type: ignore[no-untyped-def]
    settings, kill9_restart = crash_broker
    token = "tok-crash_0123456789"
    port = free_port()
    env = subprocess_env(settings.with_(ingest_tokens=f"crash:{token}", ingest_port=port))
    proc = subprocess.Popen(streamlearn_cmd("ingest", "serve", "--ack-timeout", "5"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    accepted: list[str] = []
    statuses: Counter[int] = Counter()
    next_id = [0]
    http = httpx.Client(base_url=url, timeout=30)

    def post_batch() -> None:
        batch = [f"e-{next_id[0] + i}" for i in range(20)]
        next_id[0] += 20
        body = [{"event_id": eid, "client_ip": f"10.1.0.{i % 250}", "timestamp": 1_700_000_000_000 + i,
                 "method": "GET", "path": f"/{eid}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1,
                 "user_agent": "crash-test", "latency_ms": 1.0} for i, eid in enumerate(batch)]
        while True:  # a client retries until the gateway says 2xx (what a 503 asks for)
            try:
                r = http.post("/ingest/weblog", json=body, headers=auth)
            except httpx.HTTPError:
                statuses[0] += 1
                threading.Event().wait(0.05)  # client back-off before a retry
                continue
            statuses[r.status_code] += 1
            if r.status_code == 200:
                accepted.extend(batch)
                return
            assert r.status_code == 503, r.text  # while the broker is down: 503, never a 2xx
            threading.Event().wait(0.05)  # client back-off (Retry-After is 1 s; shortened here)

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    client = Paced(post_batch, 0.01)
    try:
        wait_until(healthy, 60, message="gateway healthy")
        client.start()
        for n in range(KILLS):
            mark = len(accepted)
            wait_until(lambda m=mark: len(accepted) >= m + 600 or client.error, 120,
                       message="gateway accepting after a restart")
            assert client.error is None, client.error
            if n == KILLS - 1:  # the last outage lasts until the client has seen the gateway's 503
                kill9_restart(lambda: wait_until(lambda: statuses[503] > 0, 60, message="503 while down"))
            else:
                kill9_restart()
        mark = len(accepted)
        wait_until(lambda: len(accepted) >= mark + 600 or client.error, 120, message="accepting after the last")
        client.halt.set()
        client.join(timeout=120)
        assert client.error is None, client.error
    finally:
        client.halt.set()
        http.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode in (0, -signal.SIGTERM), out[-3000:]  # uvicorn re-raises SIGTERM after its shutdown
    assert "Application shutdown complete" in out  # the lifespan ran: the publisher settled its acks
    expected = set(accepted)
    event_ids = Counter(json_event_ids(settings))
    missing = expected - set(event_ids)
    dups = {k: n for k, n in event_ids.items() if n > 1}
    assert not missing, f"{len(missing)} accepted events missing from the topic, e.g. {sorted(missing)[:5]}"
    assert not dups, f"{len(dups)} events on the topic more than once, e.g. {list(dups.items())[:5]}"
    assert "the broker lost" in out, out[-3000:]
    assert statuses[503] > 0 and set(statuses) <= {200, 503}  # while down: 503, never another answer


def json_event_ids(settings: config.Settings) -> list[str]:
    """``event_id`` of every weblog record on the raw topic (decoded Avro)."""
    return [r.value["event_id"] for r in read_topic(settings, raw_topic(settings, "weblog"), timeout=120)]


def test_source_and_broker_killed_together_lose_no_checkpointed_line(crash_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of `publish --file` and, at once, of the broker: the broker loses the acks of its last
    seconds and only the killed source's ledger knew them. The checkpoint must be behind every one of
    them (it follows the ledger's confirmation, not the acks), so the same command sends them again.
    Before, the checkpoint followed the acks: 2,659 of 30,000 lines were lost."""
    settings, kill9_restart = crash_broker
    lines = 30_000
    path = tmp_path / "readings.jsonl"
    now = 1_700_000_000_000
    with path.open("w") as fh:
        for i in range(lines):
            fh.write(json.dumps({"sensor_id": f"s{i % 50}", "timestamp": now + i, "value": float(i),
                                 "unit": "celsius"}) + "\n")
    cmd = streamlearn_cmd("publish", "sensor", "--file", str(path))
    state = source_state_dir(settings, "publish") / "sensor"

    def checkpointed() -> int:
        for f in state.glob("*.json"):
            try:
                return int(json.loads(f.read_text()).get("line", 0))
            except (OSError, ValueError):
                return 0
        return 0

    proc = subprocess.Popen(cmd, env=subprocess_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: checkpointed() >= 3_000 or proc.poll() is not None, 120, interval=0.05,
                   message="a checkpoint past line 3,000")
        assert proc.poll() is None, "the run ended before it could be killed; write more lines"
        proc.kill()
        kill9_restart()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    again = subprocess.run(cmd, env=subprocess_env(settings), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    values = Counter(float(r.value["value"]) for r in read_topic(settings, raw_topic(settings, "sensor"),
                                                                  timeout=120))
    missing = lines - len(values)
    assert missing == 0 and max(values.values()) == 1, \
        f"{missing} lines missing, {sum(values.values()) - len(values)} on the topic twice"


def test_gateway_and_broker_killed_together_lose_no_accepted_event(crash_broker) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of `ingest serve` and, at once, of the broker. The broker loses its last seconds of acked
    writes; the client was told "accepted" for them and will not send them again. The gateway's journal
    (streaming/ackjournal.py) keeps them: the same command, run again, finds them missing on the topic
    and sends them once, before it answers anything."""
    settings, kill9_restart = crash_broker
    token = "tok-crash_0123456789"
    port = free_port()
    env = subprocess_env(settings.with_(ingest_tokens=f"crash:{token}", ingest_port=port))
    cmd = streamlearn_cmd("ingest", "serve")
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    accepted: list[str] = []
    halt = threading.Event()

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client() -> None:  # one client, one request at a time; stops at the first answer that is not 200
        with httpx.Client(base_url=url, timeout=30) as http:
            n = 0
            while not halt.is_set():
                batch = [f"g-{n + i}" for i in range(50)]
                n += 50
                body = [{"event_id": eid, "client_ip": "10.2.0.1", "timestamp": 1_700_000_000_000 + i,
                         "method": "GET", "path": f"/{eid}", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1,
                         "user_agent": "crash-test", "latency_ms": 1.0} for i, eid in enumerate(batch)]
                try:
                    r = http.post("/ingest/weblog", json=body, headers=auth)
                except httpx.HTTPError:
                    return
                if r.status_code != 200:
                    return
                accepted.extend(batch)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    thread = threading.Thread(target=client, daemon=True)
    try:
        wait_until(healthy, 60, message="gateway healthy")
        thread.start()
        wait_until(lambda: len(accepted) >= 3_000 or not thread.is_alive(), 120, message="3,000 events accepted")
        assert thread.is_alive(), "the client stopped before the kill"
        proc.kill()
        kill9_restart()
        halt.set()
        thread.join(timeout=60)
    finally:
        halt.set()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    again = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(healthy, 180, message="the restarted gateway healthy")
    finally:
        again.send_signal(signal.SIGTERM)
        out, _ = again.communicate(timeout=180)
    event_ids = Counter(json_event_ids(settings))
    missing = set(accepted) - set(event_ids)
    dups = {k: n for k, n in event_ids.items() if n > 1}
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events missing, e.g. {sorted(missing)[:5]}"
    assert not dups, f"{len(dups)} events on the topic more than once, e.g. {list(dups.items())[:5]}"
    assert "journal of the last run" in out, out[-3000:]
    print(next(line for line in out.splitlines() if "journal of the last run" in line))
