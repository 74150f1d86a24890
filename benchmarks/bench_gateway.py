"""HTTP ingest gateway throughput against publishing the same events directly with the SDK, same run.

* gateway: ``streamlearn ingest serve`` as a separate process (uvicorn, as deployed) on a free port;
  an httpx async client posts batched JSON (``BATCH`` web-log events per request, ``CONCURRENCY``
  requests in flight). A request counts only once its answer arrived, i.e. after Kafka acked all
  of its events (acks=all). Bodies are serialized before the clock starts.
* baseline: ``Publisher.publish`` of the same events in this process, then every future awaited.

Each side runs twice, alternating, best of each kept. Event ids differ per round so the gateway's
idempotency window never answers "duplicate" instead of publishing. Goal (where the issue was
silent): the gateway reaches at least 0.25x of the SDK's events/s; it does HTTP, JSON parsing
and per-event validation the SDK caller skips.

    python -m benchmarks.bench_gateway
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from benchmarks.bench_idle import cpu_seconds
from benchmarks.common import bench_settings, child_env, fresh, machine, write_report
from streaming.broker import free_port
from streaming.config import Settings
from streaming.polling import poll_until
from streaming.producer import Publisher
from streaming.topics import raw_topic

EVENTS = 20_000
BATCH = 500
CONCURRENCY = 4
TOKEN = "bench-token-0123456789"
GOAL = 0.25


def _events(n: int, round_no: int) -> list[dict[str, Any]]:
    from streamlearn.commands.publish import generated

    out = []
    for i, event in enumerate(generated("weblog", n, seed=7)):
        event = {k: v for k, v in event.items() if v is not None}
        event["event_id"] = f"bench-{round_no}-{i}"
        out.append(event)
    return out


def _sdk(settings: Settings, events: list[dict[str, Any]]) -> float:
    with Publisher(settings) as pub:
        pub.serializer(raw_topic(settings, "weblog"), "WebLogEvent")  # registration is setup
        start = time.perf_counter()
        futures = [pub.publish("weblog", e) for e in events]
        pub.flush()
        for f in futures:
            f.get(timeout=60)
        return time.perf_counter() - start


async def _post_all(url: str, bodies: list[bytes]) -> tuple[float, list[float], int]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    accepted = 0
    queue = list(reversed(bodies))

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            resp = await http.post("/ingest/weblog", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise RuntimeError(f"gateway answered {resp.status_code}: {resp.text[:300]}")
            accepted += resp.json()["accepted"]

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await http.get("/healthz")  # open a connection before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(CONCURRENCY)])
        return time.perf_counter() - start, latencies, accepted


def _start_gateway(settings: Settings) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = child_env(settings, STREAMLEARN_INGEST_TOKENS=f"bench:{TOKEN}", STREAMLEARN_INGEST_PORT=str(port),
               STREAMLEARN_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "streamlearn.cli", "ingest", "serve", "--rate", "0",
                             "--max-in-flight", "1000000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {(proc.stderr.read() if proc.stderr else b'').decode()[-2000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if poll_until(healthy, 60, interval_s=0.1):
        return proc, url
    proc.kill()
    raise RuntimeError("gateway did not become healthy within 60 s")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(settings: Settings) -> dict[str, Any]:
    s_gw, s_sdk = fresh(settings), fresh(settings)
    proc, url = _start_gateway(s_gw)
    gw_t = sdk_t = float("inf")
    latencies: list[float] = []
    gw_cpu: list[float] = []  # the gateway process's CPU s per round: steadier than wall on a shared box
    sdk_cpu: list[float] = []
    try:
        for round_no in range(2):  # alternate the two sides and keep the best of each: less noise
            events = _events(EVENTS, round_no)
            bodies = [json.dumps(events[i:i + BATCH]).encode() for i in range(0, EVENTS, BATCH)]
            before = cpu_seconds(proc.pid) or 0.0
            elapsed, lat, accepted = asyncio.run(_post_all(url, bodies))
            gw_cpu.append(round((cpu_seconds(proc.pid) or 0.0) - before, 3))
            if accepted != EVENTS:
                raise RuntimeError(f"gateway accepted {accepted} of {EVENTS} events")
            if elapsed < gw_t:
                gw_t, latencies = elapsed, lat
            before = time.process_time()
            sdk_t = min(sdk_t, _sdk(s_sdk, events))
            sdk_cpu.append(round(time.process_time() - before, 3))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    gw_rate, sdk_rate = EVENTS / gw_t, EVENTS / sdk_t
    out: dict[str, Any] = {
        "benchmark": "gateway", "machine": machine(), "events": EVENTS, "batch": BATCH,
        "concurrency": CONCURRENCY,
        "gateway_events_per_s": round(gw_rate), "sdk_events_per_s": round(sdk_rate),
        "ratio": round(gw_rate / sdk_rate, 3), "goal": GOAL,
        "cpu_s_per_round": {"gateway_process": gw_cpu, "sdk_process": sdk_cpu},
        "cpu_ratio": round(min(sdk_cpu) / min(gw_cpu), 3) if min(gw_cpu) > 0 else None,
        "request_latency_ms": {"p50": round(_percentile(latencies, 0.5) * 1000, 1),
                               "p99": round(_percentile(latencies, 0.99) * 1000, 1)},
    }
    out["table"] = [{"figure": f"gateway weblog events/s ({BATCH}/request, {CONCURRENCY} concurrent; best-round "
                               f"CPU s gateway {min(gw_cpu)} / SDK {min(sdk_cpu)})",
                     "value": out["gateway_events_per_s"], "baseline": out["sdk_events_per_s"],
                     "ratio": out["ratio"], "goal": f">= {GOAL}"}]
    out["ok"] = out["ratio"] >= GOAL
    write_report("gateway", out)
    return out


if __name__ == "__main__":
    with bench_settings() as s:
        print(json.dumps(run(s), indent=2))
