"""The README's HTTP block (ingest, query, train, process with `curl`) runs as written, line by line.

Why a second README test: tests/test_readme.py runs the ``streamlearn`` lines of the ``sh`` blocks; the
HTTP block is ``curl`` against three services started in the background, and its value is in what
each answer is. Here every line of that block runs through bash, in order, in one environment (so
``export TOKEN=...`` and ``$JOB_ID`` carry over, as in the user's shell), against the session broker.
What differs from a user's shell, and why:

* the services listen on free ports, and the block's ``127.0.0.1:8088``/``:8090`` are rewritten to
  them: two test workers must not fight for fixed ports;
* ``JOB_ID`` is set from the ``/trainModel`` answer, as the README's comment tells the user to;
* before the promote line the test waits for the replay job to end (the README says "once its job
  succeeded"), and before each ``curl`` for the services to answer ``/healthz``.

Every ``curl`` uses ``--fail-with-body``, so an HTTP error is a non-zero exit with the error's body:
each line must exit 0, except the cancel, which may be a 409 when the job is over already (the
README says so). About 20-40 s (three service start-ups, one training and one replay job).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaming import config
from streaming.broker import free_port
from streaming.polling import poll_until
from tests.helpers import ROOT, subprocess_env, wait_until

HEADING = "## HTTP: ingest, query, train, process"


def http_block() -> list[str]:
    """The block's logical lines: continuations joined, blank lines dropped (comments stay: bash skips them)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(HEADING):]
    body = re.search(r"```bash\n(.*?)```", section, re.S)
    assert body, f"README section {HEADING!r} has no ```bash block"
    joined = re.sub(r"\\\n\s*", " ", body.group(1))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def _wait_healthy(url: str, procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    def up() -> bool:
        for proc in procs:
            assert proc.poll() is None, f"a service of the block exited:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 120, 0.2, f"{url} to answer")


def _job(api: str, token: str, job_id: str) -> dict[str, Any]:
    reply = httpx.get(f"{api}/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    reply.raise_for_status()
    body: dict[str, Any] = reply.json()["job"]
    return body


def _wait_ended(api: str, token: str, job_id: str, want: str) -> None:
    """Wait (bounded) until the job is over; it must have ended ``want``."""
    def over() -> dict[str, Any] | None:
        job = _job(api, token, job_id)
        return job if job["status"] not in ("queued", "running") else None

    job = wait_until(over, 180, 0.5, f"job {job_id} to end")
    assert job is not None and job["status"] == want, job


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (the README block is curl)")
def test_readme_http_block_runs_as_written(settings: config.Settings, tmp_path: Path) -> None:
    lines = http_block()
    assert any("/trainModel" in line for line in lines) and any("/process" in line for line in lines)
    ingest_port, api_port = free_port(), free_port()
    ingest, api = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{api_port}"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "streamlearn").write_text(f'#!/bin/sh\nexec {sys.executable} -m streamlearn.cli "$@"\n')
    (shim / "streamlearn").chmod(0o755)
    env = subprocess_env(settings, STREAMLEARN_INGEST_PORT=str(ingest_port), STREAMLEARN_API_PORT=str(api_port),
                         STREAMLEARN_METRICS_PORT="-1", STREAMLEARN_API_COMPACT_INTERVAL_S="1",
                         PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
                         PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    work = tmp_path / "work"
    work.mkdir()
    services: list[subprocess.Popen[bytes]] = []  # the block's background jobs: %1, %2, ...
    log = tmp_path / "services.log"
    replay_id: str | None = None
    promote_id: str | None = None
    try:
        for i, raw in enumerate(lines):
            line = raw.replace("127.0.0.1:8088", f"127.0.0.1:{ingest_port}").replace(
                "127.0.0.1:8090", f"127.0.0.1:{api_port}")
            if line.startswith("#"):
                continue
            job = re.fullmatch(r"kill %(\d+)\b.*", line)
            if job:  # the shell's job control: SIGTERM the N-th background job, as `kill %N` does
                _stop_groups(services[int(job.group(1)) - 1:int(job.group(1))])
                continue
            if re.search(r"&\s*(#.*)?$", line):  # a service, as the user starts it in the background
                if promote_id:  # "once its job succeeded, start the stream worker again"
                    _wait_ended(api, env["TOKEN"], promote_id, "succeeded")
                mark = log.stat().st_size if log.exists() else 0
                with log.open("ab") as fh:
                    services.append(subprocess.Popen(["bash", "-c", f"{line}\nwait"], cwd=work, env=env, stdout=fh,
                                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                     start_new_session=True))
                if "api serve" in line:
                    _wait_healthy(f"{api}/healthz", services, log)
                elif "ingest serve" in line:
                    _wait_healthy(f"{ingest}/healthz", services, log)
                else:
                    def assigned(m: int = mark) -> bool:
                        return "assigned" in log.read_bytes()[m:].decode(errors="replace")

                    wait_until(assigned, 120, 0.2, f"{line!r} to be assigned its partitions")
                continue
            if '"action": "promote"' in line:
                assert replay_id, "the block promotes before it replays"
                _wait_ended(api, env["TOKEN"], replay_id, "succeeded")  # "once its job succeeded"
            done = subprocess.run(["bash", "-c", f"{line}\nstatus=$?\nenv -0 > {tmp_path}/env.out\nexit $status"],
                                  cwd=work, env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
            out = (done.stdout + done.stderr).decode(errors="replace")
            (tmp_path / f"line{i:02d}.log").write_text(f"{line}\n{out}")
            if line.startswith("export "):
                pairs = (tmp_path / "env.out").read_bytes().split(b"\0")
                env.update(dict(p.decode().split("=", 1) for p in pairs if b"=" in p))
            if "-X DELETE" in line and done.returncode == 22:
                assert "already" in out, f"{line!r}: the cancel failed, and not for a job that is over:\n{out}"
                continue
            assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{out[-3000:]}"
            if "/trainModel" in line:
                env["JOB_ID"] = json.loads(done.stdout)["job"]["id"]
            elif '"action": "replay"' in line:
                replay_id = json.loads(done.stdout)["job"]["id"]
            elif '"action": "promote"' in line:
                promote_id = json.loads(done.stdout)["job"]["id"]
            elif "/ingest/" in line:
                assert json.loads(done.stdout)["accepted"] == 1, out
            elif "what=features" in line:
                assert "rows" in json.loads(done.stdout), out
            elif "jobs/$JOB_ID" in line and "DELETE" not in line:
                assert json.loads(done.stdout)["job"]["id"] == env["JOB_ID"], out
            elif line.startswith("streamlearn jobs list"):
                assert env["JOB_ID"] in out and str(replay_id) in out and str(promote_id) in out, out
        assert (work / "rows.parquet").stat().st_size > 0  # the predictions page, as Parquet
        assert "JOB_ID" in env and replay_id and promote_id
        _wait_ended(api, env["TOKEN"], promote_id, "succeeded")
    finally:
        _stop_groups(services)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each service's process group (its bash and the service), as Ctrl-C would; wait for every
    member to exit (they drain and commit); SIGKILL what is left after 60 s. ``poll()`` reaps the bash,
    whose zombie would otherwise keep its group alive."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    def gone() -> bool:
        return all(proc.poll() is not None for proc in procs) and not any(_group_alive(p.pid) for p in procs)

    if not poll_until(gone, 60, interval_s=0.1):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
