"""`streamlearn api serve` as a user runs it: loopback without keys, OpenAPI served, and on start-up the
jobs a crashed API left running are marked failed and their process groups ended; SIGTERM stops it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from streaming import config
from streaming.broker import free_port
from streaming.fsutil import pid_alive
from streamlearn.api.jobs import Job, JobStore, new_job_id
from streamlearn.api.procs import JOB_ENV
from tests.helpers import streamlearn_cmd, subprocess_env, wait_until


def test_api_serve_fails_a_crashed_apis_jobs_and_binds_loopback(tmp_path: Path) -> None:
    s = config.load({"home": tmp_path / "home", "metrics_port": -1, "api_compact_interval_s": 0,
                     "api_cancel_grace_s": 5.0})
    # What a crashed API leaves behind: a job file saying "running" and its child, still alive in its own group.
    store = JobStore(s.home / "jobs")
    job_id = new_job_id()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                              env={**subprocess_env(s), JOB_ENV: job_id})
    store.save(Job(job_id, "train", "", "model:m", {"model": "m"}, ["train", "m", "--once"], status="running",
                   owner="999999999:dead", pid=orphan.pid, started_ms=1))
    port = free_port()
    api = subprocess.Popen(streamlearn_cmd("api", "serve", "--host", "0.0.0.0", "--port", str(port)),
                           env=subprocess_env(s), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, interval=0.2, message="the API answers /healthz")
        paths = set(httpx.get(f"{base}/openapi.json", timeout=5).json()["paths"])
        assert {"/query", "/trainModel", "/process", "/jobs", "/jobs/{job_id}"} <= paths
        job = httpx.get(f"{base}/jobs/{job_id}", timeout=5).json()["job"]
        assert job["status"] == "failed" and job["reason"] == f"the API restarted while it ran (pid {orphan.pid})"
        assert orphan.wait(15) == -signal.SIGTERM  # its process group got SIGTERM
        shown = subprocess.run(streamlearn_cmd("jobs", "show", job_id, "--json"), env=subprocess_env(s),
                               capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["job"]["status"] == "failed"
    finally:
        api.send_signal(signal.SIGTERM)
        out, _ = api.communicate(timeout=30)
        if orphan.poll() is None:
            orphan.kill()
    # uvicorn finishes its shutdown (lifespan included), then re-raises the SIGTERM it caught
    assert api.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out[-2000:]
    assert "binds 127.0.0.1 only" in out  # no key: loopback, whatever --host says, and it says so
    assert not pid_alive(orphan.pid)
