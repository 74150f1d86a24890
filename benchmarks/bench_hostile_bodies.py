"""Gateway memory under hostile bodies, and slow-header clients, against a normal request (same run).

Issue 12 saw six concurrent authenticated 16.5 MB bodies of ``[[],[],...]`` take the gateway to
1.2 GB RSS, and 200 slow-header connections never timed out. This starts ``streamlearn ingest serve``
as deployed (a subprocess, uvicorn), measures its peak RSS (VmHWM) after one normal request (the
baseline), then after ``CONCURRENT`` such bodies sent at once, and counts how many of ``SLOW``
connections that send a partial request head are closed by the server within ``SLOW_WAIT_S``.

``--src DIR`` runs the gateway from another checkout (e.g. ``/work/main``) for a before/after.
Goal (where the issue was silent): peak RSS grows by less than 2x the bodies' total size, every
hostile body gets a 4xx (or 503 while the body budget is spent), and every slow connection is closed.

    python -m benchmarks.bench_hostile_bodies [--src DIR]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import bench_settings, child_env, fresh, machine, write_report
from streaming.broker import free_port
from streaming.config import Settings

TOKEN = "bench-token-0123456789"
CONCURRENT = 6
BODY_BYTES = 16_500_000
SLOW = 200
SLOW_WAIT_S = 20.0


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _start(settings: Settings, src: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = child_env(settings, STREAMLEARN_INGEST_TOKENS=f"bench:{TOKEN}", STREAMLEARN_INGEST_PORT=str(port),
               STREAMLEARN_LOG_LEVEL="WARNING", PYTHONPATH=src, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "streamlearn.cli", "ingest", "serve",
                             "--max-body-bytes", str(BODY_BYTES + 1024)], env=env, cwd=src,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError("gateway exited at start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("gateway did not become healthy within 90 s")
        time.sleep(0.1)  # poll interval inside a deadline loop


def _slow_headers(port: int) -> int:
    """Open SLOW connections that never finish their request head; return how many the server closed."""
    conns = []
    for _ in range(SLOW):
        c = socket.create_connection(("127.0.0.1", port), timeout=SLOW_WAIT_S)
        c.sendall(b"POST /ingest/weblog HTTP/1.1\r\nHost: x\r\n")
        conns.append(c)
    closed = 0
    deadline = time.monotonic() + SLOW_WAIT_S
    for c in conns:
        c.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if c.recv(1) == b"":
                closed += 1
        except (TimeoutError, OSError):
            pass
        c.close()
    return closed


def run(settings: Settings, src: str) -> dict[str, Any]:
    proc, url = _start(fresh(settings), src)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = b"[" + b",".join([b"[]"] * ((BODY_BYTES - 2) // 3)) + b"]"
    try:
        event = {"event_id": "ok-1", "client_ip": "10.0.0.1", "timestamp": int(time.time() * 1000), "method": "GET",
                 "path": "/", "protocol": "HTTP/1.1", "status": 200, "bytes_sent": 1, "user_agent": "x"}
        normal = httpx.post(f"{url}/ingest/weblog", json=[event], headers=headers, timeout=60).status_code
        base_hwm = _rss_kib(proc.pid, "VmHWM")
        statuses: list[int] = []

        def post() -> None:
            try:
                statuses.append(httpx.post(f"{url}/ingest/weblog", content=body, headers=headers,
                                           timeout=300).status_code)
            except httpx.HTTPError as exc:
                statuses.append(-1 if "timed out" not in str(exc) else -2)

        started = time.perf_counter()
        threads = [threading.Thread(target=post) for _ in range(CONCURRENT)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hostile_s = time.perf_counter() - started
        peak_hwm, after_rss = _rss_kib(proc.pid, "VmHWM"), _rss_kib(proc.pid, "VmRSS")
        closed = _slow_headers(int(url.rsplit(":", 1)[1]))
        alive = httpx.get(f"{url}/healthz", timeout=10).status_code
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    growth_mb = (peak_hwm - base_hwm) / 1024
    total_mb = CONCURRENT * len(body) / 1e6
    out: dict[str, Any] = {
        "benchmark": "hostile_bodies", "machine": machine(), "src": src, "normal_status": normal,
        "hostile_statuses": sorted(statuses), "hostile_seconds": round(hostile_s, 2),
        "rss_peak_before_mb": round(base_hwm / 1024), "rss_peak_after_mb": round(peak_hwm / 1024),
        "rss_after_mb": round(after_rss / 1024), "bodies_total_mb": round(total_mb, 1),
        "slow_connections": SLOW, "slow_closed_within_s": {str(SLOW_WAIT_S): closed}, "healthz_after": alive,
    }
    out["table"] = [{"figure": f"gateway peak RSS growth, {CONCURRENT} x {len(body) / 1e6:.1f} MB [[],...] bodies",
                     "value": round(growth_mb), "baseline": round(total_mb), "ratio": round(growth_mb / total_mb, 2),
                     "goal": "< 2"},
                    {"figure": f"slow-header connections closed within {SLOW_WAIT_S:g} s", "value": closed,
                     "baseline": SLOW, "ratio": round(closed / SLOW, 2), "goal": "1.0"}]
    refused = all(400 <= s < 500 or s == 503 for s in statuses)  # 503: the body budget is spent, retry
    out["ok"] = growth_mb < 2 * total_mb and closed == SLOW and refused
    write_report("hostile_bodies", out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent),
                        help="checkout whose gateway to run (default: this one)")
    args = parser.parse_args()
    with bench_settings() as s:
        print(json.dumps(run(s, args.src), indent=2))
